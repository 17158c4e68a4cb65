"""Turn a training checkpoint into a diffusers pipeline folder that loads without this project.

    distill export runs/s1 out/student                          # newest checkpoint of a run, EMA weights
    distill export runs/s1/checkpoints/step-0000200 out/student --weights raw --teacher /models/sd15

    # anywhere with diffusers and torch (no diffusion-distill installed):
    pipe = DiffusionPipeline.from_pretrained("out/student", trust_remote_code=True)
    image = pipe("a red bicycle", num_inference_steps=8, guidance_scale=7.5).images[0]

The folder is the teacher's pipeline (``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline``,
its text encoder(s) and tokenizer(s)) with the student UNet, the student decoder when the run
distilled one (else the teacher's VAE), and a scheduler set for the student's step count.
``inference.json`` and ``README.md`` in the folder record the intended ``num_inference_steps``,
``guidance_scale`` and image size.

The student UNet is a custom class. diffusers (0.42) loads a component whose code is not part of
diffusers or transformers from a Python file in the component's own folder, named by
``model_index.json`` (``"unet": ["student_unet", "EfficientUNet2DConditionModel"]`` with
``unet/student_unet.py``), and only with ``trust_remote_code=True``, since loading it runs that file.
The other route, ``model_index.json`` naming an installed module, needs this project imported
before ``from_pretrained`` (diffusers no longer imports a module just because a folder names it),
so the folder carries the code: ``students/models/unet.py`` and ``students/models/blocks.py`` copied with the one
import between them made relative; they need only torch and diffusers.

Scheduler: DDIM, deterministic (eta 0), with the teacher's noise schedule. A step-distilled student
(``snapfusion_step``) was trained to jump from teacher timestep ``timesteps[r]`` to ``timesteps[r + k]``
(k = teacher steps // student steps, ``students.distill.batches.rows_for``) with a DDIM update, so the exported
DDIMScheduler's spacing and ``steps_offset`` are chosen to reproduce exactly those timesteps and jumps
where a DDIM configuration can (``inference.json``: ``timesteps_exact``), else the nearest one. A
leading-spacing offset other than 1 (which diffusers resets to 1 on every load) is carried by
``OffsetDDIMScheduler`` (``teachers/offset_scheduler.py``), copied into ``scheduler/`` like the UNet's code.
A student distilled without step distillation keeps the teacher's scheduler at the teacher's steps.

A flow student (a flow recipe on an SD3-shaped teacher's dump) is written into the teacher's
``StableDiffusion3Pipeline``: the student UNet wrapped as its ``transformer``
(``students/models/flow_student.py``'s ``FlowUNetTransformer``, copied into ``transformer/`` with the
UNet's code) and ``TrainedSigmasFlowScheduler`` (``teachers/flow_scheduler.py``, copied into
``scheduler/``) holding the sigmas it was trained between, so the folder samples at its trained step
count with exactly those Euler steps (``students.distill.inference.flow_schedule``). A plain
``FlowMatchEulerDiscreteScheduler`` cannot: at S / k steps its linspace does not pass through the
teacher's rows 0, k, 2k, ...
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
import tempfile
import uuid

from core.errors import UserError, run_main
from core.options import not_one_of, option, parse
from core.fs import exists, is_local, join, publish_folder, read_json, url_to_fs
from students.distill.inference import guidance_for, student_pipeline, student_scheduler, teacher_timesteps
from students.training.runs import WEIGHTS, RunInfo, load_decoder, load_student_unet, read_run

UNET_MODULE = "student_unet"  # unet/student_unet.py in the exported folder
SCHEDULER_MODULE = "student_scheduler"  # scheduler/student_scheduler.py when the scheduler is OffsetDDIMScheduler
BLOCKS_MODULE = "student_blocks"  # unet/student_blocks.py, imported relatively by student_unet.py
UNET_CLASS = "EfficientUNet2DConditionModel"
TRANSFORMER_MODULE = "student_transformer"  # transformer/student_transformer.py of a flow student's folder
TRANSFORMER_CLASS = "FlowUNetTransformer"
FLOW_SCHEDULER_CLASS = "TrainedSigmasFlowScheduler"
INFERENCE_FILE = "inference.json"


class ExportError(UserError):
    """A checkpoint or option that cannot be exported; the message names the value."""


# ------------------------------------------------------------------------------------------
# reading a checkpoint
# ------------------------------------------------------------------------------------------




# ------------------------------------------------------------------------------------------
# the student's scheduler
# ------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------
# the pipeline
# ------------------------------------------------------------------------------------------


def check_compatible(unet, teacher) -> None:
    """The student must take the teacher's text conditioning and latents; ``ExportError`` naming the mismatch."""
    if teacher.is_flow:
        return check_flow_compatible(unet, teacher)
    if unet.config.addition_embed_type == "pooled":
        raise ExportError(f"the student is a flow student (addition_embed_type 'pooled', SD3-shaped) but teacher "
                          f"{teacher.spec!r} is a UNet teacher: wrong --teacher?")
    s, t = unet.config, teacher.unet.config
    if s.cross_attention_dim != t.cross_attention_dim:
        raise ExportError(f"student cross_attention_dim={s.cross_attention_dim} does not match teacher "
                          f"{teacher.spec!r} ({t.cross_attention_dim}): wrong --teacher?")
    if (s.addition_embed_type == "text_time") != teacher.is_xl:
        raise ExportError(f"student addition_embed_type={s.addition_embed_type!r} but teacher {teacher.spec!r} is "
                          f"{'SDXL' if teacher.is_xl else 'SD'}-shaped: wrong --teacher?")
    if s.in_channels != t.in_channels:
        raise ExportError(f"student in_channels={s.in_channels} != teacher {t.in_channels}")


def check_flow_compatible(unet, teacher) -> None:
    """A flow student takes the SD3 teacher's latents, text-state width and pooled width."""
    s, t = unet.config, teacher.denoiser.config
    want = (t.in_channels, t.joint_attention_dim, "pooled", t.pooled_projection_dim)
    got = (s.in_channels, s.cross_attention_dim, s.addition_embed_type, s.projection_class_embeddings_input_dim)
    if got != want:
        raise ExportError(f"student (in_channels, cross_attention_dim, addition_embed_type, pooled width) = {got} does "
                          f"not take flow teacher {teacher.spec!r}'s {want}: wrong --teacher?")


def assemble_pipeline(run: RunInfo, weights: str = "ema", device: str = "cpu", dtype: str = "float32", teacher=None):
    """(pipeline, inference info): the teacher's pipeline class and text side with the student UNet,
    decoder and scheduler. Used by export and by ``students.evaluation.evaluate`` for checkpoints, which passes
    its already loaded ``teacher`` (a ``teachers.load.Teacher``; its text encoder and VAE are shared)."""
    from teachers.load import load_teacher, torch_dtype

    unet = load_student_unet(run.files or run.checkpoint, weights)
    if teacher is None:
        from teachers.load import TeacherError

        try:
            teacher = load_teacher(run.teacher, dtype="float32", device="cpu")
        except TeacherError as err:
            raise ExportError(str(err)) from None
    check_compatible(unet, teacher)
    decoder = load_decoder(run.files or run.checkpoint)
    scheduler, info = student_scheduler(run.dataset, run.recipe)
    pipe = student_pipeline(teacher, unet, scheduler, decoder)
    pipe.to(device)
    if dtype != "float32":  # built in float32; cast only when asked
        pipe.to(dtype=torch_dtype(dtype))
    sampler = run.dataset.dump_recipe.sampler
    size = int(sampler.height or teacher.default_resolution)
    decoder_name = "teacher" if decoder is None else run.train.get("decoder") or type(decoder).__name__
    info = dict(info, guidance_scale=guidance_for(run.dataset), height=size, width=int(sampler.width or size),
                pipeline=type(pipe).__name__, teacher=run.teacher, teacher_steps=len(teacher_timesteps(run.dataset)),
                recipe=run.recipe["name"], preset=run.train.get("preset"), weights=weights, checkpoint=run.checkpoint,
                step=run.step, decoder=decoder_name, prediction_type=run.recipe.get("prediction_type", "epsilon"))
    return pipe, info


# ------------------------------------------------------------------------------------------
# writing the folder
# ------------------------------------------------------------------------------------------


def unet_code() -> dict[str, str]:
    """{file name: source} of the student UNet for the exported ``unet/`` folder (torch + diffusers only)."""
    from students.models import blocks, unet

    with open(unet.__file__, encoding="utf-8") as f:
        unet_src = f.read()
    with open(blocks.__file__, encoding="utf-8") as f:
        blocks_src = f.read()
    unet_src = unet_src.replace("from students.models.blocks import", f"from .{BLOCKS_MODULE} import")
    header = "# Copied from diffusion-distill's students/{} by `distill export` (diffusers loads it with trust_remote_code).\n"
    files = {f"{UNET_MODULE}.py": header.format("unet.py") + unet_src,
             f"{BLOCKS_MODULE}.py": header.format("blocks.py") + blocks_src}
    for name, src in files.items():  # the folder must not need this project: fail here, not at the user's load
        if re.search(r"^\s*(from|import)\s+(students|teachers|filters|pipelines)\b", src, flags=re.MULTILINE):
            raise ExportError(f"{name} would import project code; students/models/unet.py and blocks.py may import "
                              "only torch and diffusers")
    return files


def _card_header(info: dict) -> str:
    """The Hub's model-card metadata (YAML front matter): what the folder is and what it came from."""
    base = info["teacher"] if "/" in str(info["teacher"]) and not os.path.isabs(str(info["teacher"])) else None
    lines = ["---", "library_name: diffusers", "pipeline_tag: text-to-image", "license: apache-2.0"]
    if base:  # a hub id: the Hub links the card to its base model
        lines.append(f"base_model: {base}")
    lines += ["tags:", "- text-to-image", "- diffusers", "- distillation", f"- {info['recipe']}",
              f"- {info['num_inference_steps']}-step", "---", ""]
    return "\n".join(lines)


def _readme(info: dict) -> str:
    return _card_header(info) + f"""# Distilled student ({info['pipeline']})

Exported by `distill export` from `{info['checkpoint']}` (step {info['step']}, {info['weights']} weights).
Teacher `{info['teacher']}`; recipe `{info['recipe']}`; student preset `{info['preset']}`; decoder: {info['decoder']}.

```python
import torch
from diffusers import DiffusionPipeline

# the student UNet's code is unet/{UNET_MODULE}.py (torch + diffusers only): hence trust_remote_code
pipe = DiffusionPipeline.from_pretrained("path/to/this/folder", {info['load_kwargs']})
image = pipe("a photo of a red bicycle", num_inference_steps={info['num_inference_steps']},
             guidance_scale={info['guidance_scale']}, height={info['height']}, width={info['width']},
             generator=torch.Generator().manual_seed(0)).images[0]
```

Scheduler: {info['scheduler']} with timesteps {info['timesteps']} at {info['num_inference_steps']} steps
(trained on {info['trained_timesteps']}; exact match: {info['timesteps_exact']}).
The same values are in `{INFERENCE_FILE}`.

Loading prints diffusers' `Expected types for unet ... got EfficientUNet2DConditionModel`: the pipeline
class declares `UNet2DConditionModel`, and this folder's UNet is the student's own class (same inputs
and outputs), so the warning is expected and harmless.
"""


def scheduler_code(flow: bool = False) -> dict[str, str]:
    """{file name: source} of ``OffsetDDIMScheduler`` (or, ``flow``, ``TrainedSigmasFlowScheduler``) for the
    exported ``scheduler/`` folder."""
    from teachers import flow_scheduler, offset_scheduler

    module = flow_scheduler if flow else offset_scheduler
    with open(module.__file__, encoding="utf-8") as f:
        src = f.read()
    header = (f"# Copied from diffusion-distill's teachers/{os.path.basename(module.__file__)} by `distill export` "
              "(trust_remote_code).\n")
    return {f"{SCHEDULER_MODULE}.py": header + src}


def transformer_code() -> dict[str, str]:
    """{file name: source} of a flow student's ``transformer/`` folder: the wrapper and the UNet's code."""
    from students.models import flow_student

    with open(flow_student.__file__, encoding="utf-8") as f:
        src = f.read()
    src = src.replace("from students.models.unet import", f"from .{UNET_MODULE} import")
    # diffusers copies only the direct relative imports of the file it loads into its module cache: name the
    # UNet's blocks here too, or a fresh machine's load fails on student_unet's own relative import
    src = src.replace(f"from .{UNET_MODULE} import", f"from .{BLOCKS_MODULE} import parse_layout  # noqa: F401 "
                      "(diffusers copies direct relative imports only)\n" + f"from .{UNET_MODULE} import", 1)
    header = "# Copied from diffusion-distill's students/models/flow_student.py by `distill export` (trust_remote_code).\n"
    files = {f"{TRANSFORMER_MODULE}.py": header + src, **unet_code()}
    if re.search(r"^\s*(from|import)\s+(students|teachers|filters|pipelines)\b", src, flags=re.MULTILINE):
        raise ExportError("flow_student.py would import project code beyond the UNet's")
    return files


def _patch_model_index(folder: str, custom_scheduler: bool = False, flow: bool = False) -> None:
    path = os.path.join(folder, "model_index.json")
    with open(path, encoding="utf-8") as f:
        index = json.load(f)
    if flow:  # the student in SD3's transformer seat, its scheduler holding the trained sigmas
        index["transformer"] = [TRANSFORMER_MODULE, TRANSFORMER_CLASS]
        index["scheduler"] = [SCHEDULER_MODULE, FLOW_SCHEDULER_CLASS]
    else:
        index["unet"] = [UNET_MODULE, UNET_CLASS]  # library = the .py file in unet/ (diffusers' custom component rule)
    if custom_scheduler and not flow:
        index["scheduler"] = [SCHEDULER_MODULE, "OffsetDDIMScheduler"]
    with open(path, "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2, sort_keys=True)


def load_kwargs(pipeline: str) -> str:
    """The keyword arguments ``from_pretrained`` needs for an exported folder of ``pipeline``: the student's
    code (``trust_remote_code``), and for SD3 the absent T5, which diffusers loads only when told it is None."""
    if pipeline.startswith("StableDiffusion3"):
        return "trust_remote_code=True, text_encoder_3=None, tokenizer_3=None"
    return "trust_remote_code=True"


def is_export(folder: str) -> bool:
    """True for a folder written by ``distill export`` (``inference.json`` and ``model_index.json``)."""
    return exists(join(folder, INFERENCE_FILE)) and exists(join(folder, "model_index.json"))


def check_output(output: str, overwrite: bool) -> None:
    """``output`` must be new, or (with ``overwrite``) a previous export; ``ExportError`` naming it otherwise."""
    fs, fpath = url_to_fs(output)
    if not fs.exists(fpath):
        return
    if not fs.isdir(fpath):
        raise ExportError(f"{output!r} is an existing file, not an export folder")
    if not overwrite:
        raise ExportError(f"{output!r} exists: pass --overwrite to replace it")
    if not is_export(output):
        raise ExportError(f"{output!r} exists and is not a previous export (no {INFERENCE_FILE} and model_index.json): "
                          "--overwrite replaces only a folder written by distill export")


def _write_folder(pipe, info: dict, folder: str) -> None:
    pipe.save_pretrained(folder)
    flow = type(pipe.scheduler).__name__ == FLOW_SCHEDULER_CLASS
    custom_scheduler = flow or type(pipe.scheduler).__name__ == "OffsetDDIMScheduler"
    _patch_model_index(folder, custom_scheduler, flow)
    if flow:
        code = {("transformer", name): src for name, src in transformer_code().items()}
    else:
        code = {("unet", name): src for name, src in unet_code().items()}
    if custom_scheduler:
        code.update({("scheduler", name): src for name, src in scheduler_code(flow).items()})
    for (sub, name), src in code.items():
        with open(os.path.join(folder, sub, name), "w", encoding="utf-8") as f:
            f.write(src)
    with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as f:
        f.write(_readme(info))
    with open(os.path.join(folder, INFERENCE_FILE), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1)


def export(checkpoint: str, output: str, *, weights: str = "ema", teacher: str | None = None, data: str | None = None,
           dtype: str = "float32", overwrite: bool = False) -> str:
    """Write the pipeline folder for ``checkpoint`` (a checkpoint or a run folder) at ``output``; returns ``output``.

    Local: written under a temporary name beside ``output`` and renamed into place when complete.
    An fsspec URL (``gs://``, ``memory://``): uploaded with ``inference.json`` last (it marks the folder complete).
    ``overwrite`` replaces only a previous export.
    """
    fs, fpath = url_to_fs(output)
    local = is_local(fs)
    if local:
        output = fpath = os.path.abspath(fpath)
    check_output(output, overwrite)
    if weights not in WEIGHTS:
        raise ExportError(not_one_of("--weights", weights, sorted(WEIGHTS)))
    run = read_run(checkpoint, data=data, teacher=teacher)
    pipe, info = assemble_pipeline(run, weights=weights, dtype=dtype)
    info["scheduler"] = type(pipe.scheduler).__name__
    info["load_kwargs"] = load_kwargs(info["pipeline"])
    info["load"] = f"DiffusionPipeline.from_pretrained(folder, {info['load_kwargs']})"
    if not local:
        with tempfile.TemporaryDirectory() as tmp:
            _write_folder(pipe, info, tmp)
            publish_folder(tmp, output, INFERENCE_FILE)  # replaces a previous export (--overwrite, checked above)
        return output
    os.makedirs(os.path.dirname(output), exist_ok=True)
    tmp = f"{output}.tmp-{uuid.uuid4().hex}"
    try:
        _write_folder(pipe, info, tmp)
        publish_folder(tmp, output, INFERENCE_FILE)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    return output


def read_inference(folder: str) -> dict:
    """``inference.json`` of an exported folder ({} if absent: a folder not made by ``distill export``)."""
    path = join(folder, INFERENCE_FILE)
    return read_json(path) if exists(path) else {}


_S_IO = "checkpoint and output"
_S_WHAT = "what is exported"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExportConfig:
    checkpoint: str = option(section=_S_IO,
                             help="a checkpoint folder (checkpoints/step-N) or a training output folder (its newest)")
    output: str = option(section=_S_IO, help="the diffusers pipeline folder to write (local path or fsspec URL)")
    weights: str = option("ema", section=_S_WHAT, help="EMA or the raw student weights", choices=sorted(WEIGHTS))
    teacher: str | None = option(None, section=_S_WHAT,
                                 help="teacher spec for the text encoder and VAE (default: the dump's)")
    data: str | None = option(None, section=_S_IO,
                              help="the dump folder, if it moved since training (reads its dataset.json)")
    dtype: str = option("float32", section=_S_WHAT,
                        help="saved weights dtype", choices=("float32", "float16", "bfloat16"))
    overwrite: bool = option(False, section=_S_IO, help="replace OUTPUT if it is a previous export")


def parse_args(argv: list[str]) -> ExportConfig:
    """``CHECKPOINT OUTPUT [flags]``: the two positionals become --checkpoint/--output."""
    positional = []
    rest, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("-"):
            rest.append(a)
            bool_flag = a.lstrip("-").replace("-", "_").split("=")[0] == "overwrite"
            if "=" not in a and not bool_flag and i + 1 < len(argv):
                rest.append(argv[i + 1])
                i += 1
        else:
            positional.append(a)
        i += 1
    if len(positional) > 2:
        raise UserError(f"expected CHECKPOINT OUTPUT, got {len(positional)} positional arguments: {positional}")
    names = ["--checkpoint", "--output"][: len(positional)]
    flat = [x for pair in zip(names, positional) for x in pair]
    description = __doc__.split("\n")[0] + " Usage: distill export CHECKPOINT OUTPUT [flags] (or --checkpoint, --output)."
    return parse(ExportConfig, flat + rest, prog="distill export", description=description,
                 usage="%(prog)s CHECKPOINT OUTPUT [options]")[0]


def _main(argv: list[str]) -> int:
    cfg = parse_args(argv)
    path = export(cfg.checkpoint, cfg.output, weights=cfg.weights, teacher=cfg.teacher, data=cfg.data, dtype=cfg.dtype,
                  overwrite=cfg.overwrite)
    info = read_inference(path)
    print(f"wrote {path}: {info['pipeline']}, {info['num_inference_steps']} steps, guidance {info['guidance_scale']}; "
          f"load with DiffusionPipeline.from_pretrained({path!r}, {load_kwargs(info['pipeline'])})")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main("distill export", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
