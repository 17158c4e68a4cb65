"""Run an exported pipeline without torch: ``deploy.json``, the tokenizer, the DDIM loop, a PNG.

    distill export runs/s1 out/s1-onnx --format onnx
    distill generate --onnx out/s1-onnx "a small red circle at the top left on a white background" --seed 0

This module imports numpy, onnxruntime, tokenizers (the Rust tokenizer library) and Pillow only, never
torch nor a module that imports it (``tests/test_deploy.py`` runs it in a fresh interpreter and checks
``sys.modules``). It is the reference a mobile developer ports: every number the loop uses comes from
``deploy.json`` (fields: ``docs/deploy.md``), so this file is also the proof that the manifest is complete.

The loop is what diffusers' ``StableDiffusionPipeline`` does with a ``DDIMScheduler`` (eta 0):

1. token ids of ``prompt``, padded to 77; ``prompt_embeds = text_encoder(input_ids)``; with classifier-free
   guidance the rows are ``[negative, prompt_embeds]``, where ``negative = text_encoder(ids of negative_prompt)``
   is computed once when the folder is loaded (the negative prompt is constant: one text-encoder row per image);
2. (folders exported before that take both rows at once: ``text_encoder(ids of [negative_prompt, prompt])``);
3. ``latents = numpy.random.default_rng(seed).standard_normal(latent_shape, float32) * init_noise_sigma``
   (the noise rule is numpy's, so the PyTorch pipeline gets the same start through ``latents=``);
4. per step i: ``noise_pred = unet(latents repeated per CFG row, timesteps[i], prompt_embeds)``, the CFG mix
   ``uncond + guidance_scale * (text - uncond)``, then the DDIM update of ``scheduling_ddim.py`` with
   ``alpha_prod_t[i]`` and ``alpha_prod_t_prev[i]``;
5. ``image = decoder(latents)`` in [-1, 1] -> ``round(clip(image / 2 + 0.5, 0, 1) * 255)`` as uint8 HWC.
"""

from __future__ import annotations

import dataclasses
import os
import sys

from core.errors import UserError, run_main
from core.options import option, parse

DEPLOY_FILE = "deploy.json"
SCHEMA_VERSION = 1
PRECISIONS = ("fp32", "fp16")
COMPONENTS = ("text_encoder", "unet", "decoder")
NOISE_RULE = "numpy.random.default_rng(seed).standard_normal(latent_shape, dtype=numpy.float32) * init_noise_sigma"
POSTPROCESS = "uint8(round(clip(image / 2 + 0.5, 0, 1) * 255)), (batch, 3, height, width) -> (height, width, 3)"
NUMPY_DTYPES = {"float32": "float32", "float16": "float16", "int64": "int64", "int32": "int32"}


class DeployError(UserError):
    """A deploy folder or manifest that cannot be used; the message names the file and field."""


# ------------------------------------------------------------------------------------------
# deploy.json
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class TensorSpec:
    name: str  # the ONNX input/output name
    shape: tuple[int, ...]  # fixed shape, (batch, channels, height, width) for images and latents
    dtype: str  # float32 | float16 | int64 | int32 (Core ML's token ids)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSpec:
    file: str  # path inside the deploy folder
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    kept_fp32: tuple[str, ...] = ()  # fp16 variant: blocks run in float32 because fp16 overflows inside ("" = all)
    overflows: tuple[tuple[str, float], ...] = ()  # fp16 variant: (tensor, its fp32 peak) past the fp16 limit
    parity: tuple[tuple[str, float, float, float], ...] = ()  # (output, max_abs, max_abs / max|ref|, tolerance)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SchedulerSpec:
    name: str  # DDIMScheduler (eta 0): the only sampler the exported loop runs
    prediction_type: str  # epsilon | v_prediction
    timesteps: tuple[int, ...]  # the UNet's timestep input per step
    alpha_prod_t: tuple[float, ...]  # alphas_cumprod[timesteps[i]]
    alpha_prod_t_prev: tuple[float, ...]  # alphas_cumprod of the timestep stepped to (final_alpha_cumprod at the end)
    sample_coef: tuple[float, ...]  # without clipping, DDIM is linear: prev = sample_coef * latents + model_output_coef * output
    model_output_coef: tuple[float, ...]
    clip_sample: bool  # clip the predicted x0 to [-clip_sample_range, clip_sample_range] (breaks linearity)
    clip_sample_range: float
    init_noise_sigma: float  # the initial noise's scale


@dataclasses.dataclass(frozen=True, kw_only=True)
class TokenizerSpec:
    file: str  # tokenizer.json (Hugging Face tokenizers format) inside the folder
    files: tuple[str, ...]  # every tokenizer file copied (tokenizer.json, tokenizer_config.json, ...)
    max_length: int  # pad/truncate to this many ids (CLIP: 77, BOS and EOS included)
    pad_id: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeployManifest:
    schema_version: int  # SCHEMA_VERSION
    format: str  # onnx | executorch | coreml (distill generate runs onnx)
    pipeline: str  # the diffusers pipeline the models come from
    height: int  # image pixels
    width: int
    latent_shape: tuple[int, ...]  # (1, channels, height / f, width / f) for one image
    guidance_scale: float
    negative_prompt: str  # the unconditional row's text under CFG ("" as the diffusers pipelines)
    cfg_batch: int  # rows of the UNet's batch: 2 (negative, prompt) with CFG, else 1
    noise: str  # NOISE_RULE
    postprocess: str  # POSTPROCESS
    scheduler: SchedulerSpec
    tokenizer: TokenizerSpec
    models: dict  # component -> precision -> ModelSpec
    source: dict  # where it came from: checkpoint, step, teacher, preset, decoder, exporter versions

    @property
    def num_inference_steps(self) -> int:
        return len(self.scheduler.timesteps)

    def model(self, component: str, precision: str) -> ModelSpec:
        if precision not in self.models.get(component, {}):
            have = sorted(self.models.get(component, {}))
            raise DeployError(f"{DEPLOY_FILE} has no {precision} {component} (has {have}): export with that precision")
        return self.models[component][precision]


def _build(cls, data, where: str):
    """``cls(**data)`` for the manifest's dataclasses: nested specs built, lists made tuples, every
    missing or unknown key a ``DeployError`` naming it."""
    if not isinstance(data, dict):
        raise DeployError(f"{DEPLOY_FILE}: {where} must be an object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    missing = [n for n, f in fields.items() if n not in data and f.default is dataclasses.MISSING]
    if unknown or missing:
        raise DeployError(f"{DEPLOY_FILE}: {where} has unknown fields {unknown} / lacks {missing}")
    nested = {"scheduler": SchedulerSpec, "tokenizer": TokenizerSpec}
    kwargs = {}
    for name, value in data.items():
        if name in nested and cls is DeployManifest:
            value = _build(nested[name], value, name)
        elif name == "models" and cls is DeployManifest:
            value = {c: {p: _build(ModelSpec, m, f"models.{c}.{p}") for p, m in v.items()} for c, v in value.items()}
        elif name in ("inputs", "outputs"):
            value = tuple(_build(TensorSpec, t, f"{where}.{name}") for t in value)
        elif name in ("parity", "overflows"):
            value = tuple(tuple(row) for row in value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def manifest_from_dict(data: dict) -> DeployManifest:
    """A ``DeployManifest`` from parsed JSON; a wrong schema version or field is a ``DeployError``."""
    if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
        got = data.get("schema_version") if isinstance(data, dict) else None
        raise DeployError(f"{DEPLOY_FILE}: schema_version {got!r} is not {SCHEMA_VERSION} (written by another version?)")
    manifest = _build(DeployManifest, data, "the manifest")
    for component in COMPONENTS:
        if component not in manifest.models:
            raise DeployError(f"{DEPLOY_FILE}: models has no {component!r} (has {sorted(manifest.models)})")
    return manifest


def manifest_to_dict(manifest: DeployManifest) -> dict:
    return dataclasses.asdict(manifest)


def read_manifest(folder: str) -> DeployManifest:
    from core.fs import exists, join, read_json

    path = join(folder, DEPLOY_FILE)
    if not exists(path):
        raise DeployError(f"{folder!r} has no {DEPLOY_FILE}: not a folder written by distill export --format onnx")
    try:
        data = read_json(path)
    except (OSError, ValueError) as err:
        raise DeployError(f"{path}: cannot read ({err})") from None
    return manifest_from_dict(data)


# ------------------------------------------------------------------------------------------
# the sampler, in numpy
# ------------------------------------------------------------------------------------------


def initial_noise(seed: int, manifest: DeployManifest):
    """The initial latents of ``NOISE_RULE``: ``latent_shape``, float32."""
    import numpy as np

    noise = np.random.default_rng(seed).standard_normal(tuple(manifest.latent_shape), dtype=np.float32)
    return noise * np.float32(manifest.scheduler.init_noise_sigma)


def ddim_step(model_output, sample, i: int, scheduler: SchedulerSpec):
    """diffusers ``DDIMScheduler.step`` with eta 0 (its formulas (12) and (16), Song et al. 2021), in float32.

    ``model_output``, ``sample``: (batch, channels, height, width) -> the latents at the next timestep.
    """
    import numpy as np

    f32 = np.float32
    a_t, a_prev = f32(scheduler.alpha_prod_t[i]), f32(scheduler.alpha_prod_t_prev[i])
    b_t = f32(1) - a_t
    if scheduler.prediction_type == "epsilon":
        x0 = (sample - b_t ** f32(0.5) * model_output) / a_t ** f32(0.5)
        eps = model_output
    elif scheduler.prediction_type == "v_prediction":
        x0 = a_t ** f32(0.5) * sample - b_t ** f32(0.5) * model_output
        eps = a_t ** f32(0.5) * model_output + b_t ** f32(0.5) * sample
    else:
        raise DeployError(f"{DEPLOY_FILE}: scheduler.prediction_type {scheduler.prediction_type!r} is not epsilon or v_prediction")
    if scheduler.clip_sample:
        r = f32(scheduler.clip_sample_range)
        x0 = np.clip(x0, -r, r)
    return (a_prev ** f32(0.5) * x0 + (f32(1) - a_prev) ** f32(0.5) * eps).astype(np.float32)


def to_uint8(image):
    """Decoder output (batch, 3, H, W) in [-1, 1] -> uint8 (batch, H, W, 3), as diffusers' postprocess + PIL."""
    import numpy as np

    image = np.clip(image.astype(np.float32) / 2 + 0.5, 0, 1)
    return (image * 255).round().astype(np.uint8).transpose(0, 2, 3, 1)


# ------------------------------------------------------------------------------------------
# the pipeline
# ------------------------------------------------------------------------------------------


class OnnxPipeline:
    """The exported text encoder, UNet and decoder in ONNX Runtime, run as ``StableDiffusionPipeline`` would."""

    def __init__(self, folder: str, precision: str = "fp32", threads: int = 0):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        if precision not in PRECISIONS:
            raise DeployError(f"--precision {precision!r} is not one of {PRECISIONS}")
        self.folder, self.precision = folder, precision
        self.manifest = m = read_manifest(folder)
        if m.format != "onnx":
            raise DeployError(f"{folder!r} holds {m.format} models; distill generate runs an --format onnx export")
        tok_path = os.path.join(folder, m.tokenizer.file)
        if not os.path.isfile(tok_path):
            raise DeployError(f"{tok_path}: the tokenizer file named in {DEPLOY_FILE} is missing")
        self.tokenizer = Tokenizer.from_file(tok_path)
        self.tokenizer.enable_truncation(max_length=m.tokenizer.max_length)
        self.tokenizer.enable_padding(length=m.tokenizer.max_length, pad_id=m.tokenizer.pad_id)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0 = onnxruntime's default (one per core)
        options.log_severity_level = 3  # errors only
        self.specs, self.sessions = {}, {}
        for component in COMPONENTS:
            spec = m.model(component, precision)
            path = os.path.join(folder, spec.file)
            if not os.path.isfile(path):
                raise DeployError(f"{path}: the {precision} {component} named in {DEPLOY_FILE} is missing")
            self.specs[component] = spec
            try:
                self.sessions[component] = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            except Exception as err:  # onnxruntime's Fail / InvalidProtobuf / ...: a truncated or foreign file
                reason = " ".join(str(err).split())[:200]
                raise DeployError(f"{path}: the {precision} {component} is not a loadable ONNX model ({reason}); "
                                  "re-export it (distill export --format onnx)") from None
        # the text encoder's rows: 1 (this version: the negative row is encoded here, once) or cfg_batch (older exports)
        self.text_rows = int(self.specs["text_encoder"].inputs[0].shape[0])
        self.negative_embeds = None
        if m.cfg_batch == 2 and self.text_rows == 1:
            self.negative_embeds = self.run("text_encoder", self._ids([m.negative_prompt]))

    def run(self, component: str, *arrays):
        """One model on float32/int64 arrays (cast to the model's input dtypes) -> its first output as float32."""
        import numpy as np

        spec = self.specs[component]
        feeds = {t.name: np.ascontiguousarray(a, dtype=NUMPY_DTYPES[t.dtype]) for t, a in zip(spec.inputs, arrays)}
        return self.sessions[component].run([spec.outputs[0].name], feeds)[0].astype(np.float32)

    def _ids(self, texts: list[str]):
        import numpy as np

        return np.array([e.ids for e in self.tokenizer.encode_batch(texts)], dtype=np.int64)

    def token_ids(self, prompt: str):
        """int64 (rows, max_length), the text encoder's input: ``[prompt]``, or for a folder whose text encoder
        takes both CFG rows (exported before the negative row was cached) ``[negative_prompt, prompt]``."""
        if self.text_rows == 2:
            return self._ids([self.manifest.negative_prompt, prompt])
        return self._ids([prompt])

    def encode(self, prompt: str):
        """``prompt_embeds`` (cfg_batch, 77, D): ``[negative, prompt]`` rows with CFG, else ``[prompt]``."""
        import numpy as np

        embeds = self.run("text_encoder", self.token_ids(prompt))
        if self.negative_embeds is None:
            return embeds
        return np.concatenate([self.negative_embeds, embeds])

    def denoise(self, prompt_embeds, latents):
        import numpy as np

        m = self.manifest
        for i, t in enumerate(m.scheduler.timesteps):
            model_input = np.concatenate([latents] * m.cfg_batch) if m.cfg_batch > 1 else latents
            timestep = np.full((m.cfg_batch,), t, dtype=np.float32)
            noise_pred = self.run("unet", model_input, timestep, prompt_embeds)
            if m.cfg_batch == 2:
                uncond, text = noise_pred[:1], noise_pred[1:]
                noise_pred = uncond + np.float32(m.guidance_scale) * (text - uncond)
            latents = ddim_step(noise_pred, latents, i, m.scheduler)
        return latents

    def __call__(self, prompt: str, seed: int = 0, latents=None):
        """uint8 (height, width, 3) for ``prompt``; ``latents`` replaces the seed's initial noise."""
        prompt_embeds = self.encode(prompt)
        latents = initial_noise(seed, self.manifest) if latents is None else latents
        latents = self.denoise(prompt_embeds, latents)
        return to_uint8(self.run("decoder", latents))[0]


def write_png(image, path: str) -> None:
    """uint8 (H, W, 3) -> a PNG at ``path`` (local or fsspec URL, written atomically)."""
    import io

    from PIL import Image

    from core.fs import atomic_write_bytes

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


_S_MODEL = "model"
_S_IMAGE = "image"


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerateConfig:
    onnx: str = option(section=_S_MODEL, help="a folder written by distill export --format onnx (deploy.json inside)")
    prompt: str = option(section=_S_IMAGE, help="the caption")
    seed: int = option(0, section=_S_IMAGE, help="initial noise seed (numpy.random.default_rng)")
    output: str = option("image.png", section=_S_IMAGE, help="the PNG to write")
    precision: str = option("fp32", section=_S_MODEL, help="which exported variant runs", choices=PRECISIONS)
    threads: int = option(0, section=_S_MODEL, help="onnxruntime intra-op threads (0: one per core)")


def _main(argv: list[str]) -> int:
    # one positional argument, the caption: every other token is a flag or a flag's value
    caption, rest, i = [], [], 0
    while i < len(argv):
        if argv[i].startswith("-"):
            rest += argv[i:i + (1 if "=" in argv[i] else 2)]
            i += 1 if "=" in argv[i] else 2
        else:
            caption.append(argv[i])
            i += 1
    if len(caption) > 1:
        raise UserError(f"expected one caption, got {len(caption)}: {caption} (quote the caption)")
    rest += ["--prompt", caption[0]] if caption else []
    cfg = parse(GenerateConfig, rest, prog="distill generate",
                description="Make an image with an exported ONNX pipeline (numpy + onnxruntime, no torch). "
                            'Usage: distill generate --onnx DIR "caption" [--seed N] [--output image.png]',
                usage='%(prog)s --onnx DIR "caption" [options]')[0]
    from core.fs import check_output_file

    if not 0 <= cfg.seed < 2**63:  # numpy's default_rng takes no negative seed
        raise UserError(f"--seed must be an integer in [0, 2**63), got {cfg.seed}")
    if cfg.threads < 0:
        raise UserError(f"--threads must be >= 0, got {cfg.threads}")
    check_output_file(cfg.output, "--output")  # before the models load and run
    pipe = OnnxPipeline(cfg.onnx, precision=cfg.precision, threads=cfg.threads)
    write_png(pipe(cfg.prompt, seed=cfg.seed), cfg.output)
    print(f"wrote {cfg.output}: {pipe.manifest.width}x{pipe.manifest.height}, {pipe.manifest.num_inference_steps} steps, "
          f"guidance {pipe.manifest.guidance_scale}, seed {cfg.seed}, {cfg.precision}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main("distill generate", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
