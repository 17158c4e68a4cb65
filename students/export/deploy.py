"""Export a distilled pipeline for devices: ONNX models in fp32 and fp16, checked for parity, and deploy.json.

    distill export runs/s1 out/s1-onnx --format onnx                    # fp32 + fp16 variants
    distill export runs/s1 out/s1-onnx --format onnx --precisions fp32
    distill generate --onnx out/s1-onnx "a small red circle at the top left on a white background"

The text encoder, the student UNet and the decoder become three ONNX models with fixed input shapes
(the student's resolution; the UNet's batch is the CFG batch, 2, when guidance is on), exported with
``torch.onnx.export``'s TorchScript exporter at opset 17 (its dynamo exporter needs onnxscript, which
this project does not install). ``deploy.json`` (``students.export.ondevice.DeployManifest``, fields in
``docs/deploy.md``) holds everything else an app needs: shapes and dtypes, the DDIM timesteps and
coefficients for the trained step count, the guidance weight, the noise rule and the tokenizer files
(copied into ``tokenizer/``). ``students.export.ondevice`` runs the folder with numpy and onnxruntime only.

A flow student (a flow recipe on an SD3-shaped teacher's dump: ``StableDiffusion3Pipeline`` with the
student in the transformer's seat, ``students/export/folder.py``) exports the same three models
(``flow_components``): the text encoder is both CLIP encoders computing SD3's ``encode_prompt``
(``encoder_hidden_states`` and ``pooled_projections``; no T5, whose rows are zeros as in the pipeline
without it), the UNet takes the pooled embedding as in training and returns the velocity, and the decoder
is ``vae.decode`` alone. Its ``deploy.json`` (schema 2) carries the flow rule: the trained sigmas of
``students.distill.inference.flow_schedule``, timestep = sigma * num_train_timesteps, the Euler step
z + (sigma_next - sigma) v, the CFG mix and the decode rule latents / scaling_factor + shift_factor
(``flow_scheduler_spec``, ``latent_decode_spec``).

Every exported model is run in onnxruntime against the PyTorch module on the same inputs at export
time; the errors (max abs, and max abs relative to the output's scale) go into ``deploy.json`` and an
error above ``students.export.onnx_convert.error_bound`` stops the export. fp16 variants: where a module's fp32
output passes the fp16 range (with a margin), the innermost block around it whose output fits runs in
fp32; ``deploy.json`` names both (``overflows``, ``kept_fp32``). A conversion failure names the block
and the operator (``onnx_convert.locate_failure``), not a converter stack trace.
``--format coreml`` and ``--format executorch`` need packages that are not installed beside torch 2.14.1;
they fail with one line naming the package and why (``docs/deploy.md``).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import shutil
import sys
import tempfile
import uuid

from core.errors import UserError, run_main
from core.options import choice_list, not_one_of, option, parse
from students.export.ondevice import (COMPONENTS, DEPLOY_FILE, FLOW_STEP_RULE, FLOW_TIMESTEP_RULE, GUIDANCE_RULE,
                                      LATENT_DECODE_RULE, NOISE_RULE, POSTPROCESS, PRECISIONS, DeployError,
                                      DeployManifest, FlowSchedulerSpec, LatentDecodeSpec, SchedulerSpec, TokenizerSpec,
                                      manifest_schema_version, manifest_to_dict)
from students.export.onnx_convert import OPSET, Component, convert
from core.fs import atomic_write_json, exists, is_local, join, publish_folder, url_to_fs

FORMATS = ("diffusers", "onnx", "coreml", "executorch")
FLOW_FORMATS = ("diffusers", "onnx")  # where a flow student's rule is carried (coreml/executorch: not checked yet)
T5_ROWS = 256  # StableDiffusion3Pipeline.encode_prompt's max_sequence_length: the absent T5's zero rows


# ------------------------------------------------------------------------------------------
# the three models, as plain tensor-in tensor-out modules
# ------------------------------------------------------------------------------------------


def wrappers():
    """(UNet, text encoder, decoder) wrapper classes; defined here so importing this module stays light."""
    import torch

    class UNetForExport(torch.nn.Module):
        """``(sample, timestep, encoder_hidden_states[, text_embeds, time_ids]) -> noise_pred``."""

        def __init__(self, unet):
            super().__init__()
            self.unet = unet

        def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
            added = None if text_embeds is None else {"text_embeds": text_embeds, "time_ids": time_ids}
            return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False)[0]

    class TextEncoderForExport(torch.nn.Module):
        """``input_ids -> prompt_embeds``, as ``StableDiffusionPipeline.encode_prompt`` (no clip skip, no mask)."""

        def __init__(self, text_encoder):
            super().__init__()
            self.text_encoder = text_encoder

        def forward(self, input_ids):
            return self.text_encoder(input_ids)[0]

    class DecoderForExport(torch.nn.Module):
        """``latents -> image`` in about [-1, 1]: ``vae.decode(latents / scaling_factor).sample``."""

        def __init__(self, vae):
            super().__init__()
            self.vae = vae

        def forward(self, latents):
            return self.vae.decode(latents / self.vae.config.scaling_factor).sample

    return UNetForExport, TextEncoderForExport, DecoderForExport


def flow_wrappers():
    """(UNet, text encoder, decoder) wrapper classes of a flow student's SD3-shaped pipeline."""
    import torch

    class FlowUNetForExport(torch.nn.Module):
        """``(sample, timestep, encoder_hidden_states, pooled_projections) -> velocity``: the student as
        ``flow_sample`` calls it (the pooled embedding as ``added_cond_kwargs["text_embeds"]``)."""

        def __init__(self, unet):
            super().__init__()
            self.unet = unet

        def forward(self, sample, timestep, encoder_hidden_states, pooled_projections):
            return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs={"text_embeds": pooled_projections},
                             return_dict=False)[0]

    class FlowTextEncoderForExport(torch.nn.Module):
        """``(input_ids, input_ids_2) -> (prompt_embeds, pooled_prompt_embeds)``, as ``StableDiffusion3Pipeline.
        encode_prompt`` without T5 and clip skip: each CLIP's penultimate hidden state and projected pooled
        output (``_get_clip_prompt_embeds``), the states side by side zero-padded (or cut) to ``joint_width``,
        then ``t5_rows`` zero rows (``_get_t5_prompt_embeds`` without T5); the pooled outputs side by side."""

        def __init__(self, text_encoder, text_encoder_2, joint_width: int, t5_rows: int):
            super().__init__()
            self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2
            self.joint_width, self.t5_rows = joint_width, t5_rows

        def forward(self, input_ids, input_ids_2):
            one = self.text_encoder(input_ids, output_hidden_states=True)
            two = self.text_encoder_2(input_ids_2, output_hidden_states=True)
            clip = torch.cat([one.hidden_states[-2], two.hidden_states[-2]], dim=-1)
            clip = torch.nn.functional.pad(clip, (0, self.joint_width - clip.shape[-1]))
            t5 = clip.new_zeros((clip.shape[0], self.t5_rows, self.joint_width))
            return torch.cat([clip, t5], dim=-2), torch.cat([one[0], two[0]], dim=-1)

    class FlowDecoderForExport(torch.nn.Module):
        """``decoder input -> image`` in about [-1, 1]: ``vae.decode(z).sample``; the input is
        ``latents / scaling_factor + shift_factor`` (``latent_decode`` in deploy.json, applied by the app)."""

        def __init__(self, vae):
            super().__init__()
            self.vae = vae

        def forward(self, latents):
            return self.vae.decode(latents).sample

    return FlowUNetForExport, FlowTextEncoderForExport, FlowDecoderForExport


def is_flow_pipeline(pipe) -> bool:
    """An SD3-shaped pipeline (a flow student's, ``students/export/folder.py``): a transformer seat, no UNet."""
    return getattr(pipe, "transformer", None) is not None


def eager_copy(text_encoder):
    """A copy of a CLIP text encoder with eager attention: SDPA's traced causal mask is float32 even in an fp16 model."""
    encoder = copy.deepcopy(text_encoder)
    if hasattr(encoder, "set_attn_implementation"):
        encoder.set_attn_implementation("eager")
    return encoder


def flow_components(pipe, info: dict, prompt: str = "a photo", seed: int = 0) -> list[Component]:
    """The three models of a flow student's SD3-shaped pipeline with inputs at the student's shapes."""
    import torch

    if getattr(pipe, "text_encoder_3", None) is not None:
        raise DeployError("--format onnx exports SD3-shaped pipelines without T5 (text_encoder_3): the exported text "
                          "encoder computes the two CLIP encoders and T5's zero rows; export from a teacher without T5")
    unet = getattr(pipe.transformer, "unet", None)
    if unet is None:
        raise DeployError(f"the pipeline's transformer is {type(pipe.transformer).__name__}, not a flow student's "
                          "FlowUNetTransformer: --format onnx exports distilled students")
    if getattr(unet.config, "time_cond_proj_dim", None) is not None:
        raise DeployError("the student UNet takes a guidance embedding (time_cond_proj_dim): not supported by --format onnx")
    unet_cls, text_cls, decoder_cls = flow_wrappers()
    batch = cfg_batch(info)
    # one row: the constant negative prompt's rows are computed once per loaded pipeline, not per image
    ids = tuple(tokenizer([prompt], padding="max_length", truncation=True, max_length=pipe.tokenizer_max_length,
                          return_tensors="pt").input_ids for tokenizer in (pipe.tokenizer, pipe.tokenizer_2))
    text = text_cls(eager_copy(pipe.text_encoder), eager_copy(pipe.text_encoder_2),
                    int(pipe.transformer.config.joint_attention_dim), T5_ROWS).eval()
    with torch.no_grad():
        embeds, pooled = (t.repeat(batch, *[1] * (t.dim() - 1)) for t in text(*ids))
    gen = torch.Generator().manual_seed(seed)
    shape = latent_shape(pipe, info)
    sample = torch.randn((batch,) + shape[1:], generator=gen)
    t = float(info["timesteps"][len(info["timesteps"]) // 2])
    latents = torch.randn(shape, generator=gen)
    return [Component("text_encoder", text, ids, ("input_ids", "input_ids_2"), ("prompt_embeds", "pooled_prompt_embeds")),
            Component("unet", unet_cls(unet).eval(), (sample, torch.full((batch,), t), embeds, pooled),
                      ("sample", "timestep", "encoder_hidden_states", "pooled_projections"), ("velocity",)),
            Component("decoder", decoder_cls(pipe.vae).eval(), (latents,), ("latents",), ("image",))]


def pipeline_components(pipe, info: dict, prompt: str = "a photo", seed: int = 0) -> list[Component]:
    """The three models of an SD-shaped pipeline (or a flow student's SD3-shaped one: ``flow_components``)
    with inputs at the student's shapes (see ``latent_shape``)."""
    import torch

    if is_flow_pipeline(pipe):
        return flow_components(pipe, info, prompt, seed)
    if hasattr(pipe, "text_encoder_2"):
        raise DeployError("--format onnx exports SD-shaped pipelines (one text encoder); this one is "
                          f"{type(pipe).__name__} with two text encoders and time ids, which the exported loop does not run yet")
    if getattr(pipe.unet.config, "time_cond_proj_dim", None) is not None:
        raise DeployError("the student UNet takes a guidance embedding (time_cond_proj_dim): not supported by --format onnx")
    unet_cls, text_cls, decoder_cls = wrappers()
    batch = cfg_batch(info)
    # one row: the constant negative prompt's embedding is computed once per loaded pipeline, not per image
    ids = pipe.tokenizer([prompt], padding="max_length", truncation=True,
                         max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
    text = text_cls(eager_copy(pipe.text_encoder)).eval()
    with torch.no_grad():
        embeds = text(ids).repeat(batch, 1, 1)
    gen = torch.Generator().manual_seed(seed)
    shape = latent_shape(pipe, info)
    sample = torch.randn((batch,) + shape[1:], generator=gen)
    t = float(info["timesteps"][len(info["timesteps"]) // 2])
    latents = torch.randn(shape, generator=gen)
    return [Component("text_encoder", text, (ids,), ("input_ids",), ("prompt_embeds",)),
            Component("unet", unet_cls(pipe.unet).eval(), (sample, torch.full((batch,), t), embeds),
                      ("sample", "timestep", "encoder_hidden_states"), ("noise_pred",)),
            Component("decoder", decoder_cls(pipe.vae).eval(), (latents,), ("latents",), ("image",))]


def cfg_batch(info: dict) -> int:
    """2 rows (negative, prompt) under classifier-free guidance, as the diffusers pipelines (guidance > 1)."""
    return 2 if float(info["guidance_scale"]) > 1 else 1


def latent_shape(pipe, info: dict) -> tuple[int, ...]:
    """(1, channels, height / f, width / f): what the pipeline's ``prepare_latents`` makes for ``info``'s size
    (channels: the UNet's, or in SD3's pipeline the transformer seat's ``in_channels``)."""
    f = pipe.vae_scale_factor
    denoiser = pipe.transformer if is_flow_pipeline(pipe) else pipe.unet
    return (1, int(denoiser.config.in_channels), int(info["height"]) // f, int(info["width"]) // f)


# ------------------------------------------------------------------------------------------
# scheduler, tokenizer, manifest
# ------------------------------------------------------------------------------------------


def scheduler_spec(scheduler, steps: int) -> SchedulerSpec:
    """The DDIM (eta 0) loop of ``scheduler`` at ``steps`` as numbers: what ``DDIMScheduler.step`` uses."""
    from diffusers import DDIMScheduler

    if not isinstance(scheduler, DDIMScheduler):  # OffsetDDIMScheduler (teachers/offset_scheduler.py) is one
        raise DeployError(f"the pipeline's scheduler is {type(scheduler).__name__}; the exported loop runs DDIMScheduler "
                          "only (a step-distilled student always has one; else export from a DDIM teacher)")
    cfg = scheduler.config
    if cfg.get("thresholding"):
        raise DeployError("the DDIMScheduler uses dynamic thresholding, which the exported loop does not run")
    if cfg.prediction_type not in ("epsilon", "v_prediction"):
        raise DeployError(f"prediction_type {cfg.prediction_type!r}: the exported loop runs epsilon and v_prediction")
    scheduler.set_timesteps(steps)
    ratio = cfg.num_train_timesteps // steps  # DDIMScheduler.step: prev_timestep = t - T // steps
    ts = [int(t) for t in scheduler.timesteps]
    a_t = [float(scheduler.alphas_cumprod[t]) for t in ts]
    a_prev = [float(scheduler.alphas_cumprod[t - ratio]) if t - ratio >= 0 else float(scheduler.final_alpha_cumprod) for t in ts]
    sample_coef, model_coef = [], []
    for a, p in zip(a_t, a_prev):  # DDIM without clipping, written as prev = c_s * sample + c_m * model_output
        if cfg.prediction_type == "epsilon":
            sample_coef.append(math.sqrt(p / a))
            model_coef.append(math.sqrt(1 - p) - math.sqrt(p) * math.sqrt(1 - a) / math.sqrt(a))
        else:
            sample_coef.append(math.sqrt(p * a) + math.sqrt((1 - p) * (1 - a)))
            model_coef.append(math.sqrt(1 - p) * math.sqrt(a) - math.sqrt(p) * math.sqrt(1 - a))
    return SchedulerSpec(name="DDIMScheduler", prediction_type=cfg.prediction_type, timesteps=tuple(ts),
                         alpha_prod_t=tuple(a_t), alpha_prod_t_prev=tuple(a_prev), sample_coef=tuple(sample_coef),
                         model_output_coef=tuple(model_coef), clip_sample=bool(cfg.clip_sample),
                         clip_sample_range=float(cfg.clip_sample_range), init_noise_sigma=float(scheduler.init_noise_sigma))


def flow_scheduler_spec(scheduler) -> FlowSchedulerSpec:
    """The flow rule of a flow student's ``TrainedSigmasFlowScheduler`` as numbers: its ``trained_sigmas`` and
    ``trained_timesteps`` (``students.distill.inference.flow_schedule``'s lists, which ``flow_sample`` and SD3's
    pipeline step through at the trained step count) and the deterministic Euler step of its parent
    ``FlowMatchEulerDiscreteScheduler``, checked against the sigmas and timesteps ``set_timesteps`` gives."""
    import torch

    from teachers.flow_scheduler import TrainedSigmasFlowScheduler

    if not isinstance(scheduler, TrainedSigmasFlowScheduler) or not scheduler.config.trained_sigmas:
        raise DeployError(f"the flow pipeline's scheduler is {type(scheduler).__name__} without trained sigmas; the "
                          "exported loop runs a flow student's TrainedSigmasFlowScheduler (teachers/flow_scheduler.py)")
    cfg = scheduler.config
    if cfg.get("stochastic_sampling") or cfg.get("invert_sigmas"):
        raise DeployError("the flow scheduler samples stochastically or inverts its sigmas: the exported loop runs the "
                          "deterministic Euler step only")
    sigmas = [float(s) for s in cfg.trained_sigmas]
    scale = int(cfg.num_train_timesteps)
    timesteps = [float(t) for t in cfg.trained_timesteps] if cfg.trained_timesteps else [s * scale for s in sigmas]
    scheduler.set_timesteps(len(sigmas))
    if not (torch.equal(scheduler.sigmas.cpu(), torch.tensor(sigmas + [0.0], dtype=torch.float32))
            and torch.equal(scheduler.timesteps.cpu(), torch.tensor(timesteps, dtype=torch.float32))):
        raise DeployError("the flow scheduler does not step through its trained sigmas and timesteps at the trained "
                          "step count (teachers/flow_scheduler.py changed?)")
    return FlowSchedulerSpec(name="FlowMatchEulerDiscreteScheduler", prediction_type="flow", sigmas=tuple(sigmas),
                             timesteps=tuple(timesteps), num_train_timesteps=scale, final_sigma=0.0,
                             timestep_rule=FLOW_TIMESTEP_RULE, step_rule=FLOW_STEP_RULE, guidance_rule=GUIDANCE_RULE,
                             init_noise_sigma=1.0)  # SD3's prepare_latents and flow_sample start from the noise itself


def latent_decode_spec(vae) -> LatentDecodeSpec:
    """SD3's decode rule (``StableDiffusion3Pipeline.__call__``): ``vae.decode(latents / scaling_factor +
    shift_factor)``; a VAE without a shift (``shift_factor`` None) has 0."""
    return LatentDecodeSpec(scaling_factor=float(vae.config.scaling_factor),
                            shift_factor=float(vae.config.get("shift_factor") or 0.0), rule=LATENT_DECODE_RULE)


CHECK_CAPTIONS = ("a photo", "a small red circle at the top left on a white background", "",
                  "  Ünïcode, PUNCTUATION!! and   spaces ", " ".join(["long"] * 100))


def write_tokenizer(tokenizer, folder: str, sub: str = "tokenizer") -> TokenizerSpec:
    """Save the pipeline's tokenizer into ``folder/sub`` and check that the ``tokenizers`` library alone
    (what ``students.export.ondevice`` uses) gives the same padded ids on ``CHECK_CAPTIONS``."""
    from tokenizers import Tokenizer

    out = os.path.join(folder, sub)
    tokenizer.save_pretrained(out)
    if not os.path.isfile(os.path.join(out, "tokenizer.json")):
        raise DeployError(f"the pipeline's tokenizer ({type(tokenizer).__name__}) saved no tokenizer.json (not a fast "
                          "tokenizer): the exported loop reads tokenizer.json")
    spec = TokenizerSpec(file=f"{sub}/tokenizer.json", files=tuple(f"{sub}/{f}" for f in sorted(os.listdir(out))),
                         max_length=int(tokenizer.model_max_length), pad_id=int(tokenizer.pad_token_id))
    plain = Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
    plain.enable_truncation(max_length=spec.max_length)
    plain.enable_padding(length=spec.max_length, pad_id=spec.pad_id)
    want = tokenizer(list(CHECK_CAPTIONS), padding="max_length", truncation=True, max_length=spec.max_length).input_ids
    got = [e.ids for e in plain.encode_batch(list(CHECK_CAPTIONS))]
    for caption, w, g in zip(CHECK_CAPTIONS, want, got):
        if list(w) != list(g):
            raise DeployError(f"tokenizer.json alone tokenizes {caption[:40]!r} differently from the pipeline's tokenizer")
    return spec


EXPORTERS = {"onnx": f"torch.onnx.export (TorchScript), opset {OPSET}",
             "executorch": "torch.export + executorch to_edge_transform_and_lower (XNNPACK)",
             "coreml": "torch.jit.trace + coremltools.convert (ML program, iOS16)"}


def build_manifest(pipe, info: dict, models: dict, tokenizer: TokenizerSpec, source: dict, fmt: str = "onnx",
                   tokenizer_2: TokenizerSpec | None = None) -> DeployManifest:
    """The manifest: a UNet student's DDIM rule (schema 1, as before), or a flow student's flow rule, second
    tokenizer and decode rule (schema 2, ``manifest_schema_version``)."""
    import torch

    flow = is_flow_pipeline(pipe)
    shape = latent_shape(pipe, info)
    image = models["decoder"]["fp32"].outputs[0].shape
    scheduler = (flow_scheduler_spec(pipe.scheduler) if flow
                 else scheduler_spec(pipe.scheduler, int(info["num_inference_steps"])))
    manifest = DeployManifest(
        schema_version=0, format=fmt, pipeline=type(pipe).__name__, height=int(image[2]),
        width=int(image[3]), latent_shape=shape, guidance_scale=float(info["guidance_scale"]), negative_prompt="",
        cfg_batch=cfg_batch(info), noise=NOISE_RULE, postprocess=POSTPROCESS, scheduler=scheduler, tokenizer=tokenizer,
        models=models, source=dict(source, torch=torch.__version__, exporter=EXPORTERS[fmt]), tokenizer_2=tokenizer_2,
        latent_decode=latent_decode_spec(pipe.vae) if flow else None)
    return dataclasses.replace(manifest, schema_version=manifest_schema_version(manifest))


# ------------------------------------------------------------------------------------------
# writing the folder
# ------------------------------------------------------------------------------------------


def converter(fmt: str):
    """The per-component converter of a format: ``(component, folder, precision) -> ModelSpec``."""
    if fmt == "onnx":
        return convert
    from students.export import device_formats

    device_formats.check_available(fmt)
    return {"executorch": device_formats.to_executorch, "coreml": device_formats.to_coreml}[fmt]


def write_deploy_folder(pipe, info: dict, folder: str, precisions=PRECISIONS, progress=None, fmt: str = "onnx") -> DeployManifest:
    """Convert, check and describe the three models into the local ``folder`` (made if absent)."""
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad or not precisions:
        raise DeployError(f"--precisions {','.join(precisions)!r}: choose from {','.join(PRECISIONS)}")
    if "fp32" not in precisions:
        raise DeployError("--precisions must include fp32 (the reference the fp16 variant is checked against)")
    to_format = converter(fmt)
    os.makedirs(folder, exist_ok=True)
    components = pipeline_components(pipe, info)
    models: dict = {c.name: {} for c in components}
    for c in components:
        for precision in precisions:
            if progress:
                progress(f"{c.name} {precision}")
            models[c.name][precision] = to_format(c, folder, precision)
    tokenizer = write_tokenizer(pipe.tokenizer, folder)
    tokenizer_2 = write_tokenizer(pipe.tokenizer_2, folder, "tokenizer_2") if is_flow_pipeline(pipe) else None
    keys = ("checkpoint", "step", "teacher", "preset", "recipe", "decoder", "weights", "teacher_steps", "timesteps_exact")
    manifest = build_manifest(pipe, info, models, tokenizer, {k: info[k] for k in keys if k in info}, fmt, tokenizer_2)
    atomic_write_json(os.path.join(folder, DEPLOY_FILE), manifest_to_dict(manifest))
    return manifest


def is_deploy(folder: str) -> bool:
    return exists(join(folder, DEPLOY_FILE))


def export_deploy(pipe, info: dict, output: str, *, precisions=PRECISIONS, overwrite: bool = False, progress=None,
                  fmt: str = "onnx") -> DeployManifest:
    """Write the deploy folder at ``output`` (local path or fsspec URL), complete or not at all: built in a
    temporary folder, then renamed into place (local) or uploaded with ``deploy.json`` last (URL)."""
    fs, fpath = url_to_fs(output)
    if fs.exists(fpath):
        if not overwrite:
            raise DeployError(f"{output!r} exists: pass --overwrite to replace it")
        if not is_deploy(output):
            raise DeployError(f"{output!r} exists and is not a previous --format onnx export (no {DEPLOY_FILE}): "
                              "--overwrite replaces only such a folder")
    local = is_local(fs)
    parent = os.path.dirname(os.path.abspath(fpath)) if local else None
    if parent:
        os.makedirs(parent, exist_ok=True)
    tmp = f"{os.path.abspath(fpath)}.tmp-{uuid.uuid4().hex}" if local else tempfile.mkdtemp(prefix="distill-deploy-")
    try:
        manifest = write_deploy_folder(pipe, info, tmp, precisions=precisions, progress=progress, fmt=fmt)
        publish_folder(tmp, fpath if local else output, DEPLOY_FILE)  # deploy.json last: it marks the folder complete
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    return manifest


# ------------------------------------------------------------------------------------------
# the command: distill export ... --format
# ------------------------------------------------------------------------------------------


_S_IO = "checkpoint and output"
_S_WHAT = "what is exported"


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeployConfig:
    checkpoint: str = option(section=_S_IO,
                             help="a checkpoint folder (checkpoints/step-N) or a training output folder (its newest)")
    output: str = option(section=_S_IO, help="the deploy folder to write (local path or fsspec URL)")
    format: str = option("onnx", section=_S_WHAT, help="model format", choices=FORMATS[1:])
    precisions: tuple[str, ...] = option(PRECISIONS, section=_S_WHAT,
                                         help="variants to export (comma-separated; fp32 required)")
    weights: str = option("ema", section=_S_WHAT, help="EMA or the raw student weights", choices=("ema", "raw"))
    teacher: str | None = option(None, section=_S_WHAT,
                                 help="teacher spec for the text encoder and VAE (default: the dump's)")
    data: str | None = option(None, section=_S_IO,
                              help="the dump folder, if it moved since training (reads its dataset.json)")
    overwrite: bool = option(False, section=_S_IO, help="replace OUTPUT if it is a previous --format onnx export")


def check_format(fmt: str) -> None:
    """``--format``: a ``UserError`` for an unknown one or one whose converter is not installed here."""
    if fmt not in FORMATS:
        raise UserError(not_one_of("--format", fmt, FORMATS))
    if fmt in ("coreml", "executorch"):
        from students.export.device_formats import check_available

        check_available(fmt)


def split_format(argv: list[str]) -> tuple[str, list[str]]:
    """(the ``--format`` value, argv without it); ``diffusers`` when absent."""
    fmt, rest, i = "diffusers", [], 0
    while i < len(argv):
        a = argv[i]
        if a == "--format":
            if i + 1 >= len(argv):
                raise UserError("--format needs a value: " + choice_list(FORMATS))
            fmt, i = argv[i + 1], i + 2
            continue
        if a.startswith("--format="):
            fmt = a.split("=", 1)[1]
        else:
            rest.append(a)
        i += 1
    return fmt, rest


def _export(argv: list[str]) -> int:
    from students.export import folder as export
    from students.training import runs as student_runs

    fmt, rest = split_format(argv)
    if fmt == "diffusers":
        if any(a in ("-h", "--help") for a in rest):
            print("--format diffusers (default) | onnx | coreml | executorch: "
                  "distill export --format onnx --help lists the device export's flags (docs/deploy.md)")
        return export.main(rest)
    check_format(fmt)
    flags, positional, i = [], [], 0
    while i < len(rest):
        a = rest[i]
        if a.startswith("-"):
            takes_value = "=" not in a and a.lstrip("-").replace("-", "_") != "overwrite"
            flags += rest[i:i + 2] if takes_value else [a]
            i += 2 if takes_value else 1
        else:
            positional.append(a)
            i += 1
    if len(positional) > 2:
        raise UserError(f"expected CHECKPOINT OUTPUT, got {len(positional)} positional arguments: {positional}")
    named = [x for pair in zip(["--checkpoint", "--output"], positional) for x in pair]
    cfg = parse(DeployConfig, named + flags + ["--format", fmt], prog="distill export",
                description="Export a checkpoint for devices. Usage: distill export CHECKPOINT OUTPUT --format onnx",
                usage=f"%(prog)s CHECKPOINT OUTPUT --format {choice_list(FORMATS[1:])} [options]")[0]
    run = student_runs.read_run(cfg.checkpoint, data=cfg.data, teacher=cfg.teacher)
    if run.recipe.get("prediction_type") == "flow" and cfg.format not in FLOW_FORMATS:
        raise UserError(f"{cfg.checkpoint!r} is a flow student (recipe {run.recipe.get('name')!r}): --format "
                        f"{cfg.format} does not carry the flow rule yet; export it with --format onnx, or as a "
                        "diffusers folder (--format diffusers: SD3's pipeline with the trained sigmas)")
    pipe, info = export.assemble_pipeline(run, weights=cfg.weights)
    manifest = export_deploy(pipe, info, cfg.output, precisions=cfg.precisions, overwrite=cfg.overwrite, fmt=cfg.format,
                             progress=lambda what: print(f"converting {what}", file=sys.stderr, flush=True))
    for component in COMPONENTS:
        for precision, spec in manifest.models[component].items():
            parity = (f"parity {max(r for _, _, r, _ in spec.parity):.2g} of output scale" if spec.parity
                      else "spec checked (Core ML runs only on Apple hardware: no parity here)")
            kept = f", kept in fp32: {', '.join(spec.kept_fp32)}" if spec.kept_fp32 else ""
            print(f"{spec.file}: inputs {[(t.name, list(t.shape), t.dtype) for t in spec.inputs]}, {parity}{kept}")
    run_it = f'; run with: distill generate --onnx {cfg.output} "a caption"' if cfg.format == "onnx" else ""
    print(f"wrote {cfg.output}: {manifest.width}x{manifest.height}, {manifest.num_inference_steps} steps, guidance "
          f"{manifest.guidance_scale}{run_it}")
    return 0


def export_main(argv: list[str] | None = None) -> int:
    """``distill export``: ``--format diffusers`` (the default) is ``students.export.folder``; the others are here."""
    return run_main("distill export", _export, argv)


if __name__ == "__main__":
    sys.exit(export_main())
