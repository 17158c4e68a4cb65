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
so the folder carries the code: ``students/unet.py`` and ``students/blocks.py`` copied with the one
import between them made relative; they need only torch and diffusers.

Scheduler: DDIM, deterministic (eta 0), with the teacher's noise schedule. A step-distilled student
(``snapfusion_step``) was trained to jump from teacher timestep ``timesteps[r]`` to ``timesteps[r + k]``
(k = teacher steps // student steps, ``students.data._rows_for``) with a DDIM update, so the exported
DDIMScheduler's spacing and ``steps_offset`` are chosen to reproduce exactly those timesteps and jumps
where a DDIM configuration can (``inference.json``: ``timesteps_exact``), else the nearest one.
A student distilled without step distillation keeps the teacher's scheduler at the teacher's steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import sys
import uuid

UNET_MODULE = "student_unet"  # unet/student_unet.py in the exported folder
BLOCKS_MODULE = "student_blocks"  # unet/student_blocks.py, imported relatively by student_unet.py
UNET_CLASS = "EfficientUNet2DConditionModel"
INFERENCE_FILE = "inference.json"
WEIGHTS = {"ema": "ema", "raw": "student"}  # --weights -> checkpoint subfolder


class ExportError(ValueError):
    """A checkpoint or option that cannot be exported; the message names the value."""


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """What a checkpoint says about its run: where it is, its configs and the dump it trained on."""

    checkpoint: str  # .../checkpoints/step-NNNNNNN
    train: dict  # TrainConfig as saved
    recipe: dict  # DistillRecipe as saved
    step: int
    dataset: dict  # the dump's dataset.json
    teacher: str  # teacher spec (the dump's, or the override)


# ------------------------------------------------------------------------------------------
# reading a checkpoint
# ------------------------------------------------------------------------------------------


def resolve_checkpoint(path: str) -> str:
    """A checkpoint folder itself, or a run folder -> its newest checkpoint; ``ExportError`` otherwise."""
    from students.checkpoint import checkpoints

    if os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(os.path.join(path, "student")):
        return path
    found = checkpoints(path)
    if found:
        return found[-1]
    raise ExportError(f"{path!r} is neither a checkpoint folder (config.json + student/) nor a training output "
                      "folder with checkpoints/step-NNNNNNN")


def read_run(path: str, *, data: str | None = None, teacher: str | None = None) -> RunInfo:
    """Read the checkpoint at ``path`` (or a run's newest) and the ``dataset.json`` of its dump.

    ``data`` replaces the dump folder recorded in the checkpoint (moved or on another machine);
    ``teacher`` replaces the teacher spec recorded in the dump (a local copy of the same teacher).
    """
    ckpt = resolve_checkpoint(path)
    with open(os.path.join(ckpt, "config.json"), encoding="utf-8") as f:
        saved = json.load(f)
    data_dir = data or saved["train"]["data"]
    dataset_json = os.path.join(data_dir, "dataset.json")
    if not os.path.isfile(dataset_json):
        raise ExportError(f"the dump this checkpoint trained on has no {dataset_json!r} (moved or on another machine?): "
                          "pass --data with the dump folder (only its dataset.json is read)")
    with open(dataset_json, encoding="utf-8") as f:
        dataset = json.load(f)
    spec = teacher or dataset["recipe"]["teacher"]
    return RunInfo(checkpoint=ckpt, train=saved["train"], recipe=saved["recipe"], step=int(saved.get("step", 0)),
                   dataset=dataset, teacher=spec)


# ------------------------------------------------------------------------------------------
# the student's scheduler
# ------------------------------------------------------------------------------------------


def teacher_timesteps(dataset: dict) -> list[int]:
    """The teacher's sampling timesteps in the dump (``dataset.json``; recomputed if an old dump lacks them)."""
    if dataset.get("timesteps"):
        return [int(t) for t in dataset["timesteps"]]
    import diffusers

    scheduler = getattr(diffusers, dataset["scheduler_class"]).from_config(dataset["scheduler_config"])
    scheduler.set_timesteps(dataset["recipe"]["num_inference_steps"])
    return [int(t) for t in scheduler.timesteps]


def trained_jumps(dataset: dict, student_steps: int) -> tuple[list[int], list[int]]:
    """(timesteps, next timesteps) a step-distilled student was trained on; -1 = the final latent.

    Mirrors ``students.data._rows_for``: k = S // student_steps teacher steps per student step, start
    rows 0, k, 2k, ... with r + k <= S (a test keeps the two in step).
    """
    ts = teacher_timesteps(dataset)
    total = len(ts)
    k = max(1, total // student_steps)
    rows = [r for r in range(0, total, k) if r + k <= total]
    return [ts[r] for r in rows], [ts[r + k] if r + k < total else -1 for r in rows]


def _ddim_jumps(scheduler, steps: int) -> tuple[list[int], list[int]]:
    """What ``DDIMScheduler.step`` does at ``steps``: its timesteps and the timestep each one steps to."""
    scheduler.set_timesteps(steps)
    ratio = scheduler.config.num_train_timesteps // steps  # DDIMScheduler.step: prev = t - T // steps
    ts = [int(t) for t in scheduler.timesteps]
    return ts, [t - ratio if t - ratio >= 0 else -1 for t in ts]


def student_scheduler(dataset: dict, recipe: dict):
    """(scheduler, info) for sampling the student: see the module docstring. ``info`` has
    ``num_inference_steps``, ``timesteps``, ``trained_timesteps`` and ``timesteps_exact``."""
    import diffusers
    from diffusers import DDIMScheduler

    if not recipe.get("step_weight"):  # not step-distilled: the teacher's own sampler and steps
        scheduler = getattr(diffusers, dataset["scheduler_class"]).from_config(dataset["scheduler_config"])
        steps = int(dataset["recipe"]["num_inference_steps"])
        scheduler.set_timesteps(steps)
        ts = [int(t) for t in scheduler.timesteps]
        return scheduler, dict(num_inference_steps=steps, timesteps=ts, trained_timesteps=teacher_timesteps(dataset),
                               timesteps_exact=True)
    want, want_next = trained_jumps(dataset, int(recipe["student_steps"]))
    steps = len(want)
    base = DDIMScheduler.from_config(dataset["scheduler_config"])
    ratio = base.config.num_train_timesteps // steps
    # The teacher's own spacing first (a tie keeps the earlier candidate), then the other spacings.
    own = dict(timestep_spacing=base.config.timestep_spacing, steps_offset=base.config.steps_offset)
    candidates = [own] + [dict(timestep_spacing="trailing", steps_offset=0), dict(timestep_spacing="linspace", steps_offset=0)]
    candidates += [dict(timestep_spacing="leading", steps_offset=o) for o in range(ratio + 1)]
    best, best_err = None, None
    for overrides in candidates:
        scheduler = DDIMScheduler.from_config(base.config, **overrides)
        ts, nxt = _ddim_jumps(scheduler, steps)
        err = max(abs(a - b) for a, b in zip(ts + nxt, want + want_next))
        if best_err is None or err < best_err:
            best, best_err = overrides, err
    scheduler = DDIMScheduler.from_config(base.config, **best)
    scheduler.set_timesteps(steps)
    return scheduler, dict(num_inference_steps=steps, timesteps=[int(t) for t in scheduler.timesteps],
                           trained_timesteps=want, timesteps_exact=best_err == 0)


def guidance_for(dataset: dict) -> float:
    """The CFG weight the teacher dump used (a range: 7.5 clamped into it; SnapFusion samples w in [2, 14])."""
    recipe = dataset["recipe"]
    if recipe.get("guidance_range"):
        lo, hi = recipe["guidance_range"]
        return float(min(max(7.5, lo), hi))
    return float(recipe["guidance_scale"])


# ------------------------------------------------------------------------------------------
# the pipeline
# ------------------------------------------------------------------------------------------


def load_student_unet(ckpt: str, weights: str = "ema"):
    from students.unet import EfficientUNet2DConditionModel

    if weights not in WEIGHTS:
        raise ExportError(f"--weights {weights!r} is not one of {sorted(WEIGHTS)}")
    folder = os.path.join(ckpt, WEIGHTS[weights])
    if not os.path.isdir(folder):
        raise ExportError(f"checkpoint {ckpt!r} has no {WEIGHTS[weights]}/ (EMA off in that run?): use --weights raw")
    return EfficientUNet2DConditionModel.from_pretrained(folder)


def load_decoder(ckpt: str):
    """The run's distilled decoder (AutoencoderTiny / AutoencoderKL, by its config), or None."""
    folder = os.path.join(ckpt, "decoder")
    if not os.path.isdir(folder):
        return None
    import diffusers

    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        cls_name = json.load(f)["_class_name"]
    return getattr(diffusers, cls_name).from_pretrained(folder)


def check_compatible(unet, teacher) -> None:
    """The student must take the teacher's text conditioning and latents; ``ExportError`` naming the mismatch."""
    s, t = unet.config, teacher.unet.config
    if s.cross_attention_dim != t.cross_attention_dim:
        raise ExportError(f"student cross_attention_dim={s.cross_attention_dim} does not match teacher "
                          f"{teacher.spec!r} ({t.cross_attention_dim}): wrong --teacher?")
    if (s.addition_embed_type == "text_time") != teacher.is_xl:
        raise ExportError(f"student addition_embed_type={s.addition_embed_type!r} but teacher {teacher.spec!r} is "
                          f"{'SDXL' if teacher.is_xl else 'SD'}-shaped: wrong --teacher?")
    if s.in_channels != t.in_channels:
        raise ExportError(f"student in_channels={s.in_channels} != teacher {t.in_channels}")


def assemble_pipeline(run: RunInfo, weights: str = "ema", device: str = "cpu", dtype: str = "float32", teacher=None):
    """(pipeline, inference info): the teacher's pipeline class and text side with the student UNet,
    decoder and scheduler. Used by export and by ``students.evaluate`` for checkpoints, which passes
    its already loaded ``teacher`` (a ``teachers.load.Teacher``; its text encoder and VAE are shared)."""
    from teachers.load import load_teacher, torch_dtype

    unet = load_student_unet(run.checkpoint, weights)
    if teacher is None:
        teacher = load_teacher(run.teacher, dtype="float32", device="cpu")
    check_compatible(unet, teacher)
    decoder = load_decoder(run.checkpoint)
    scheduler, info = student_scheduler(run.dataset, run.recipe)
    components = dict(teacher.pipe.components, unet=unet, scheduler=scheduler, vae=decoder or teacher.pipe.vae)
    extra = ({"force_zeros_for_empty_prompt": teacher.pipe.config.force_zeros_for_empty_prompt} if teacher.is_xl
             else {"requires_safety_checker": False})
    pipe = type(teacher.pipe)(**components, **extra)
    pipe.to(device)
    if dtype != "float32":  # built in float32; cast only when asked
        pipe.to(dtype=torch_dtype(dtype))
    pipe.set_progress_bar_config(disable=True)
    recipe = run.dataset["recipe"]
    size = int(recipe.get("height") or teacher.default_resolution)
    decoder_name = "teacher" if decoder is None else run.train.get("decoder") or type(decoder).__name__
    info = dict(info, guidance_scale=guidance_for(run.dataset), height=size, width=int(recipe.get("width") or size),
                pipeline=type(pipe).__name__, teacher=run.teacher, teacher_steps=len(teacher_timesteps(run.dataset)),
                recipe=run.recipe["name"], preset=run.train.get("preset"), weights=weights, checkpoint=run.checkpoint,
                step=run.step, decoder=decoder_name, prediction_type=run.recipe.get("prediction_type", "epsilon"))
    return pipe, info


# ------------------------------------------------------------------------------------------
# writing the folder
# ------------------------------------------------------------------------------------------


def unet_code() -> dict[str, str]:
    """{file name: source} of the student UNet for the exported ``unet/`` folder (torch + diffusers only)."""
    from students import blocks, unet

    with open(unet.__file__, encoding="utf-8") as f:
        unet_src = f.read()
    with open(blocks.__file__, encoding="utf-8") as f:
        blocks_src = f.read()
    unet_src = unet_src.replace("from students.blocks import", f"from .{BLOCKS_MODULE} import")
    header = "# Copied from diffusion-distill's students/{} by `distill export` (diffusers loads it with trust_remote_code).\n"
    files = {f"{UNET_MODULE}.py": header.format("unet.py") + unet_src,
             f"{BLOCKS_MODULE}.py": header.format("blocks.py") + blocks_src}
    for name, src in files.items():  # the folder must not need this project: fail here, not at the user's load
        if re.search(r"^\s*(from|import)\s+(students|teachers|filters|pipelines)\b", src, flags=re.MULTILINE):
            raise ExportError(f"{name} would import project code; students/unet.py and blocks.py may import "
                              "only torch and diffusers")
    return files


def _readme(info: dict) -> str:
    return f"""# Distilled student ({info['pipeline']})

Exported by `distill export` from `{info['checkpoint']}` (step {info['step']}, {info['weights']} weights).
Teacher `{info['teacher']}`; recipe `{info['recipe']}`; student preset `{info['preset']}`; decoder: {info['decoder']}.

```python
import torch
from diffusers import DiffusionPipeline

# the student UNet's code is unet/{UNET_MODULE}.py (torch + diffusers only): hence trust_remote_code
pipe = DiffusionPipeline.from_pretrained("path/to/this/folder", trust_remote_code=True)
image = pipe("a photo of a red bicycle", num_inference_steps={info['num_inference_steps']},
             guidance_scale={info['guidance_scale']}, height={info['height']}, width={info['width']},
             generator=torch.Generator().manual_seed(0)).images[0]
```

Scheduler: {info['scheduler']} with timesteps {info['timesteps']} at {info['num_inference_steps']} steps
(trained on {info['trained_timesteps']}; exact match: {info['timesteps_exact']}).
The same values are in `{INFERENCE_FILE}`.
"""


def _patch_model_index(folder: str) -> None:
    path = os.path.join(folder, "model_index.json")
    with open(path, encoding="utf-8") as f:
        index = json.load(f)
    index["unet"] = [UNET_MODULE, UNET_CLASS]  # library = the .py file in unet/ (diffusers' custom component rule)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2, sort_keys=True)


def export(checkpoint: str, output: str, *, weights: str = "ema", teacher: str | None = None, data: str | None = None,
           dtype: str = "float32", overwrite: bool = False) -> str:
    """Write the pipeline folder for ``checkpoint`` (a checkpoint or a run folder) at ``output``; returns ``output``.

    Written under a temporary name beside ``output`` and renamed into place when complete.
    """
    output = os.path.abspath(output)
    if os.path.exists(output) and not overwrite:
        raise ExportError(f"{output!r} exists: pass --overwrite to replace it")
    if weights not in WEIGHTS:
        raise ExportError(f"--weights {weights!r} is not one of {sorted(WEIGHTS)}")
    run = read_run(checkpoint, data=data, teacher=teacher)
    pipe, info = assemble_pipeline(run, weights=weights, dtype=dtype)
    info["scheduler"] = type(pipe.scheduler).__name__
    info["load"] = "DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)"
    os.makedirs(os.path.dirname(output), exist_ok=True)
    tmp = f"{output}.tmp-{uuid.uuid4().hex}"
    try:
        pipe.save_pretrained(tmp)
        _patch_model_index(tmp)
        for name, src in unet_code().items():
            with open(os.path.join(tmp, "unet", name), "w", encoding="utf-8") as f:
                f.write(src)
        with open(os.path.join(tmp, INFERENCE_FILE), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=1)
        with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
            f.write(_readme(info))
        old = None
        if os.path.exists(output):  # --overwrite: move the old folder aside, then swap
            old = f"{output}.old-{uuid.uuid4().hex}"
            os.replace(output, old)
        os.replace(tmp, output)
        if old:
            shutil.rmtree(old)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    return output


def read_inference(folder: str) -> dict:
    """``inference.json`` of an exported folder ({} if absent: a folder not made by ``distill export``)."""
    path = os.path.join(folder, INFERENCE_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="distill export", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="a checkpoint folder (checkpoints/step-N) or a training output folder (newest)")
    parser.add_argument("output", help="the diffusers pipeline folder to write")
    parser.add_argument("--weights", default="ema", choices=sorted(WEIGHTS), help="EMA (default) or the raw student weights")
    parser.add_argument("--teacher", default=None, help="teacher spec for the text encoder and VAE (default: the dump's)")
    parser.add_argument("--data", default=None, help="the dump folder, if it moved since training (reads its dataset.json)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"), help="saved weights dtype")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    args = parser.parse_args(argv)
    try:
        path = export(args.checkpoint, args.output, weights=args.weights, teacher=args.teacher, data=args.data,
                      dtype=args.dtype, overwrite=args.overwrite)
    except ValueError as err:  # ExportError, TeacherError, bad configs: one line, no traceback
        print(f"distill export: error: {err}", file=sys.stderr)
        return 2
    info = read_inference(path)
    print(f"wrote {path}: {info['pipeline']}, {info['num_inference_steps']} steps, guidance {info['guidance_scale']}; "
          f"load with DiffusionPipeline.from_pretrained({path!r}, trust_remote_code=True)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
