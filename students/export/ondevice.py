"""Run an exported pipeline without torch: ``deploy.json``, the tokenizer(s), the DDIM or flow loop, a PNG.

    distill export runs/s1 out/s1-onnx --format onnx
    distill generate --onnx out/s1-onnx "a small red circle at the top left on a white background" --seed 0

This module imports numpy, onnxruntime, tokenizers (the Rust tokenizer library) and Pillow only, never
torch nor a module that imports it (``tests/test_deploy.py`` runs it in a fresh interpreter and checks
``sys.modules``). It is the reference a mobile developer ports: every number the loop uses comes from
``deploy.json`` (fields: ``docs/deploy.md``), so this file is also the proof that the manifest is complete.

A UNet student's folder (``scheduler.name`` DDIMScheduler, schema 1) runs what diffusers'
``StableDiffusionPipeline`` does with a ``DDIMScheduler`` (eta 0):

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

A flow student's folder (``scheduler.prediction_type`` flow, schema 2: a flow recipe on an SD3-shaped
teacher's dump) runs ``students.distill.inference.flow_sample``, the trainer's own sampler, which is what
``StableDiffusion3Pipeline`` does with ``TrainedSigmasFlowScheduler`` (``teachers/flow_scheduler.py``):

1. ids of ``prompt`` from both CLIP tokenizers (``tokenizer``, ``tokenizer_2``: CLIP-G pads with "!");
   ``prompt_embeds, pooled = text_encoder(input_ids, input_ids_2)``, the model computing SD3's
   ``encode_prompt`` (both CLIPs' penultimate states side by side, zero-padded to the joint width, then
   the absent T5's zero rows; the two projected pooled outputs side by side); with CFG the negative
   prompt's rows are computed once at load and put first, as above;
2. ``latents`` by the same noise rule (``init_noise_sigma`` 1: the flow state starts as the noise itself,
   as in ``flow_sample`` and SD3's pipeline);
3. per step i: ``velocity = unet(latents per CFG row, timesteps[i], prompt_embeds, pooled)`` with
   ``timesteps[i] = sigmas[i] * num_train_timesteps``, the CFG mix, then the Euler step
   ``latents + (sigma_next - sigma) * velocity`` (``sigma_next`` = ``sigmas[i + 1]``, 0 after the last);
4. ``image = decoder(latents / scaling_factor + shift_factor)`` (``latent_decode``, applied here), then step 5 above.
"""

from __future__ import annotations

import dataclasses
import os
import sys

from core.errors import UserError, run_main
from core.options import option, parse

DEPLOY_FILE = "deploy.json"
SCHEMA_VERSION = 2  # a flow folder's manifest; a DDIM folder's is still written as 1 (DDIM_SCHEMA_VERSION)
DDIM_SCHEMA_VERSION = 1  # the fields of a UNet student's manifest, unchanged since 1: readers of 1 still run them
SUPPORTED_SCHEMA_VERSIONS = (1, 2)  # what read_manifest accepts (2 adds the flow rule: FlowSchedulerSpec,
                                    # tokenizer_2, latent_decode; a reader of 1 refuses it on the version)
PRECISIONS = ("fp32", "fp16")
COMPONENTS = ("text_encoder", "unet", "decoder")
NOISE_RULE = "numpy.random.default_rng(seed).standard_normal(latent_shape, dtype=numpy.float32) * init_noise_sigma"
GUIDANCE_RULE = "uncond + guidance_scale * (text - uncond), (uncond, text) = the UNet's output rows (negative, prompt)"
FLOW_TIMESTEP_RULE = "timestep = sigma * num_train_timesteps (timesteps[i] = sigmas[i] * num_train_timesteps, as trained)"
FLOW_STEP_RULE = ("latents = latents + (sigma_next - sigma) * velocity in float32, sigma = sigmas[i], "
                  "sigma_next = sigmas[i + 1] (final_sigma after the last step)")
LATENT_DECODE_RULE = "decoder input = latents / scaling_factor + shift_factor (float32), the decoder being vae.decode alone"
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
class FlowSchedulerSpec:
    """The flow rule of a flow student (``students.distill.inference.flow_schedule`` / ``flow_sample``)."""

    name: str  # FlowMatchEulerDiscreteScheduler: its Euler step, at the trained sigmas (TrainedSigmasFlowScheduler)
    prediction_type: str  # flow: the UNet's output is the velocity v = noise - x0
    sigmas: tuple[float, ...]  # the trained sigmas, first step first, the final 0 left out (flow_schedule's list)
    timesteps: tuple[float, ...]  # the UNet's timestep input per step (float): sigmas[i] * num_train_timesteps
    num_train_timesteps: int  # the scale of the timestep input (1000)
    final_sigma: float  # the sigma after the last step: 0, the clean latent
    timestep_rule: str  # FLOW_TIMESTEP_RULE
    step_rule: str  # FLOW_STEP_RULE
    guidance_rule: str  # GUIDANCE_RULE
    init_noise_sigma: float  # the initial noise's scale (1: the flow state at sigma 1 is the noise)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LatentDecodeSpec:
    """What turns the final latents into the decoder's input (SD3's VAE has a shift as well as a scale)."""

    scaling_factor: float  # vae.config.scaling_factor
    shift_factor: float  # vae.config.shift_factor (0 where the VAE has none)
    rule: str  # LATENT_DECODE_RULE


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
    scheduler: SchedulerSpec | FlowSchedulerSpec  # DDIM (schema 1) or the flow rule (schema 2)
    tokenizer: TokenizerSpec
    models: dict  # component -> precision -> ModelSpec
    source: dict  # where it came from: checkpoint, step, teacher, preset, decoder, exporter versions
    tokenizer_2: TokenizerSpec | None = None  # schema 2: the text encoder's second input (SD3's CLIP-G)
    latent_decode: LatentDecodeSpec | None = None  # schema 2: the decoder's input from the latents; None: the
                                                   # decoder takes the latents as they are (1 / scaling_factor inside)

    @property
    def is_flow(self) -> bool:
        return self.scheduler.prediction_type == "flow"

    @property
    def num_inference_steps(self) -> int:
        return len(self.scheduler.timesteps)

    def model(self, component: str, precision: str) -> ModelSpec:
        if precision not in self.models.get(component, {}):
            have = sorted(self.models.get(component, {}))
            raise DeployError(f"{DEPLOY_FILE} has no {precision} {component} (has {have}): export with that precision")
        return self.models[component][precision]


OPTIONAL_FIELDS = ("tokenizer_2", "latent_decode")  # schema 2 only; left out of the JSON when None


def scheduler_class(data):
    """``FlowSchedulerSpec`` for a ``scheduler`` object whose ``prediction_type`` is flow, else ``SchedulerSpec``."""
    return FlowSchedulerSpec if isinstance(data, dict) and data.get("prediction_type") == "flow" else SchedulerSpec


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
    nested = {"scheduler": scheduler_class(data.get("scheduler")), "tokenizer": TokenizerSpec,
              "tokenizer_2": TokenizerSpec, "latent_decode": LatentDecodeSpec}
    kwargs = {}
    for name, value in data.items():
        if name in nested and cls is DeployManifest:
            value = None if value is None and name in OPTIONAL_FIELDS else _build(nested[name], value, name)
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
    """A ``DeployManifest`` from parsed JSON; a wrong schema version or field is a ``DeployError``. Schema 1
    (DDIM folders) and 2 (flow folders too) are read; the flow fields need 2, and a flow rule its decode rule."""
    if not isinstance(data, dict) or data.get("schema_version") not in SUPPORTED_SCHEMA_VERSIONS:
        got = data.get("schema_version") if isinstance(data, dict) else None
        raise DeployError(f"{DEPLOY_FILE}: schema_version {got!r} is not one of {', '.join(map(str, SUPPORTED_SCHEMA_VERSIONS))} "
                          "(written by another version?)")
    manifest = _build(DeployManifest, data, "the manifest")
    for component in COMPONENTS:
        if component not in manifest.models:
            raise DeployError(f"{DEPLOY_FILE}: models has no {component!r} (has {sorted(manifest.models)})")
    newer = [n for n in OPTIONAL_FIELDS if getattr(manifest, n) is not None] + (["a flow scheduler"] if manifest.is_flow else [])
    if manifest.schema_version == DDIM_SCHEMA_VERSION and newer:
        raise DeployError(f"{DEPLOY_FILE}: schema_version 1 has no {', '.join(newer)} (schema 2 does)")
    if manifest.is_flow and manifest.latent_decode is None:
        raise DeployError(f"{DEPLOY_FILE}: a flow scheduler needs latent_decode (the decoder's input rule)")
    return manifest


def manifest_schema_version(manifest: DeployManifest) -> int:
    """The version a manifest is written at: 2 for a flow folder, else 1 (its fields are those of 1)."""
    return SCHEMA_VERSION if manifest.is_flow or any(getattr(manifest, n) is not None for n in OPTIONAL_FIELDS) \
        else DDIM_SCHEMA_VERSION


def manifest_to_dict(manifest: DeployManifest) -> dict:
    """The JSON object of ``manifest``; the schema-2 fields are left out when None (a schema-1 manifest is as before)."""
    data = dataclasses.asdict(manifest)
    for name in OPTIONAL_FIELDS:
        if data[name] is None:
            del data[name]
    return data


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


def flow_step(velocity, sample, i: int, scheduler: FlowSchedulerSpec):
    """``FlowMatchEulerDiscreteScheduler.step`` (deterministic) at the trained sigmas, as ``flow_sample``:
    ``sample + (sigma_next - sigma) * velocity`` in float32, ``sigma_next`` the next sigma or ``final_sigma``."""
    import numpy as np

    f32 = np.float32
    sigmas = scheduler.sigmas
    sigma_next = f32(sigmas[i + 1]) if i + 1 < len(sigmas) else f32(scheduler.final_sigma)
    return (sample.astype(f32) + (sigma_next - f32(sigmas[i])) * velocity).astype(f32)


def guide(output, guidance_scale: float):
    """Classifier-free guidance on the UNet's (2, ...) output rows (negative, prompt): ``GUIDANCE_RULE``, float32."""
    import numpy as np

    uncond, text = output[:1], output[1:]
    return uncond + np.float32(guidance_scale) * (text - uncond)


def decoder_input(latents, manifest: DeployManifest):
    """The decoder's input from the final latents: ``latent_decode``'s rule, or the latents themselves (schema 1)."""
    import numpy as np

    rule = manifest.latent_decode
    if rule is None:
        return latents
    return (latents / np.float32(rule.scaling_factor) + np.float32(rule.shift_factor)).astype(np.float32)


def to_uint8(image):
    """Decoder output (batch, 3, H, W) in [-1, 1] -> uint8 (batch, H, W, 3), as diffusers' postprocess + PIL."""
    import numpy as np

    image = np.clip(image.astype(np.float32) / 2 + 0.5, 0, 1)
    return (image * 255).round().astype(np.uint8).transpose(0, 2, 3, 1)


# ------------------------------------------------------------------------------------------
# the pipeline
# ------------------------------------------------------------------------------------------


class OnnxPipeline:
    """The exported text encoder, UNet and decoder in ONNX Runtime, run as ``StableDiffusionPipeline`` would
    (a DDIM folder) or as ``students.distill.inference.flow_sample`` (a flow folder)."""

    def __init__(self, folder: str, precision: str = "fp32", threads: int = 0):
        import onnxruntime as ort

        if precision not in PRECISIONS:
            raise DeployError(f"--precision {precision!r} is not one of {PRECISIONS}")
        self.folder, self.precision = folder, precision
        self.manifest = m = read_manifest(folder)
        if m.format != "onnx":
            raise DeployError(f"{folder!r} holds {m.format} models; distill generate runs an --format onnx export")
        # one tokenizer per text-encoder input: input_ids, and a flow folder's input_ids_2
        self.tokenizers = [self._tokenizer(spec) for spec in (m.tokenizer, m.tokenizer_2) if spec is not None]
        self.tokenizer = self.tokenizers[0]
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
        text_inputs = len(self.specs["text_encoder"].inputs)
        if text_inputs != len(self.tokenizers):
            raise DeployError(f"{DEPLOY_FILE}: the text encoder takes {text_inputs} token inputs but "
                              f"{len(self.tokenizers)} tokenizers are named (tokenizer, tokenizer_2)")
        # the text encoder's rows: 1 (this version: the negative row is encoded here, once) or cfg_batch (older exports)
        self.text_rows = int(self.specs["text_encoder"].inputs[0].shape[0])
        self.negative_embeds = self.negative_outputs = None
        if m.cfg_batch == 2 and self.text_rows == 1:
            self.negative_outputs = self.run_all("text_encoder", *self.text_inputs([m.negative_prompt]))
            self.negative_embeds = self.negative_outputs[0]

    def _tokenizer(self, spec: TokenizerSpec):
        from tokenizers import Tokenizer

        path = os.path.join(self.folder, spec.file)
        if not os.path.isfile(path):
            raise DeployError(f"{path}: the tokenizer file named in {DEPLOY_FILE} is missing")
        tokenizer = Tokenizer.from_file(path)
        tokenizer.enable_truncation(max_length=spec.max_length)
        tokenizer.enable_padding(length=spec.max_length, pad_id=spec.pad_id)
        return tokenizer

    def run_all(self, component: str, *arrays) -> list:
        """One model on float32/int64 arrays (cast to the model's input dtypes) -> its outputs as float32."""
        import numpy as np

        spec = self.specs[component]
        feeds = {t.name: np.ascontiguousarray(a, dtype=NUMPY_DTYPES[t.dtype]) for t, a in zip(spec.inputs, arrays)}
        outputs = self.sessions[component].run([t.name for t in spec.outputs], feeds)
        return [o.astype(np.float32) for o in outputs]

    def run(self, component: str, *arrays):
        """``run_all``'s first output."""
        return self.run_all(component, *arrays)[0]

    def _ids(self, texts: list[str], tokenizer=None):
        import numpy as np

        tokenizer = tokenizer or self.tokenizer
        return np.array([e.ids for e in tokenizer.encode_batch(texts)], dtype=np.int64)

    def text_inputs(self, texts: list[str]) -> tuple:
        """The text encoder's inputs for ``texts``: int64 (rows, max_length) ids from each tokenizer."""
        return tuple(self._ids(texts, tokenizer) for tokenizer in self.tokenizers)

    def token_ids(self, prompt: str):
        """int64 (rows, max_length), the text encoder's (first) input: ``[prompt]``, or for a folder whose text
        encoder takes both CFG rows (exported before the negative row was cached) ``[negative_prompt, prompt]``."""
        return self.text_inputs(self._text_rows(prompt))[0]

    def _text_rows(self, prompt: str) -> list[str]:
        return [self.manifest.negative_prompt, prompt] if self.text_rows == 2 else [prompt]

    def text(self, prompt: str) -> tuple:
        """(``prompt_embeds`` (cfg_batch, L, D), ``pooled`` (cfg_batch, P) or None): ``[negative, prompt]`` rows
        with CFG, else ``[prompt]``; ``pooled`` is a flow folder's pooled projections (the second output)."""
        import numpy as np

        outputs = self.run_all("text_encoder", *self.text_inputs(self._text_rows(prompt)))
        if self.negative_outputs is not None:
            outputs = [np.concatenate([n, o]) for n, o in zip(self.negative_outputs, outputs)]
        return outputs[0], (outputs[1] if len(outputs) > 1 else None)

    def encode(self, prompt: str):
        """``prompt_embeds`` (cfg_batch, L, D): ``[negative, prompt]`` rows with CFG, else ``[prompt]``."""
        return self.text(prompt)[0]

    def denoise(self, prompt_embeds, latents, pooled=None):
        """The sampling loop from the initial ``latents`` to the final ones: DDIM, or the flow rule (Euler over
        the trained sigmas, the UNet also taking ``pooled``)."""
        import numpy as np

        m = self.manifest
        for i, t in enumerate(m.scheduler.timesteps):
            model_input = np.concatenate([latents] * m.cfg_batch) if m.cfg_batch > 1 else latents
            timestep = np.full((m.cfg_batch,), t, dtype=np.float32)
            conditioning = (prompt_embeds,) if pooled is None else (prompt_embeds, pooled)
            output = self.run("unet", model_input, timestep, *conditioning)
            if m.cfg_batch == 2:
                output = guide(output, m.guidance_scale)
            latents = flow_step(output, latents, i, m.scheduler) if m.is_flow else ddim_step(output, latents, i, m.scheduler)
        return latents

    def decode(self, latents):
        """The decoder's image (batch, 3, H, W) in about [-1, 1], float32, from the final latents."""
        return self.run("decoder", decoder_input(latents, self.manifest))

    def __call__(self, prompt: str, seed: int = 0, latents=None):
        """uint8 (height, width, 3) for ``prompt``; ``latents`` replaces the seed's initial noise."""
        prompt_embeds, pooled = self.text(prompt)
        latents = initial_noise(seed, self.manifest) if latents is None else latents
        latents = self.denoise(prompt_embeds, latents, pooled)
        return to_uint8(self.decode(latents))[0]


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
