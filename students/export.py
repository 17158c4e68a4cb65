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
(k = teacher steps // student steps, ``students.data.rows_for``) with a DDIM update, so the exported
DDIMScheduler's spacing and ``steps_offset`` are chosen to reproduce exactly those timesteps and jumps
where a DDIM configuration can (``inference.json``: ``timesteps_exact``), else the nearest one. A
leading-spacing offset other than 1 (which diffusers resets to 1 on every load) is carried by
``OffsetDDIMScheduler`` (``teachers/offset_scheduler.py``), copied into ``scheduler/`` like the UNet's code.
A student distilled without step distillation keeps the teacher's scheduler at the teacher's steps.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import re
import shutil
import sys
import tempfile
import uuid

from diffusion_distill.errors import UserError, run_main
from diffusion_distill.options import option, parse
from teachers.fs import exists, is_local, join, publish_folder, read_json, url_to_fs

UNET_MODULE = "student_unet"  # unet/student_unet.py in the exported folder
SCHEDULER_MODULE = "student_scheduler"  # scheduler/student_scheduler.py when the scheduler is OffsetDDIMScheduler
BLOCKS_MODULE = "student_blocks"  # unet/student_blocks.py, imported relatively by student_unet.py
UNET_CLASS = "EfficientUNet2DConditionModel"
INFERENCE_FILE = "inference.json"
WEIGHTS = {"ema": "ema", "raw": "student"}  # --weights -> checkpoint subfolder


class ExportError(UserError):
    """A checkpoint or option that cannot be exported; the message names the value."""


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """What a checkpoint says about its run: where it is, its configs and the dump it trained on."""

    checkpoint: str  # .../checkpoints/step-NNNNNNN (local path or URL)
    train: dict  # TrainConfig as saved
    recipe: dict  # DistillRecipe as saved
    step: int
    dataset: dict  # the dump's dataset.json
    teacher: str  # teacher spec (the dump's, or the override)
    files: str = ""  # a local folder with the checkpoint's files (the checkpoint itself when local)


# ------------------------------------------------------------------------------------------
# reading a checkpoint
# ------------------------------------------------------------------------------------------


def resolve_checkpoint(path: str) -> str:
    """A checkpoint folder itself, or a run folder -> its newest checkpoint; ``ExportError`` otherwise."""
    from students.checkpoint import CONFIG, checkpoints

    fs, fpath = url_to_fs(path)
    if fs.isfile(fpath):
        raise ExportError(f"{path!r} is a file, not a checkpoint folder or a training output folder")
    if fs.isfile(url_to_fs(join(path, CONFIG))[1]) and fs.isdir(url_to_fs(join(path, "student"))[1]):
        return path
    found = checkpoints(path) if fs.isdir(fpath) else []
    if found:
        return found[-1]
    raise ExportError(f"{path!r} is neither a checkpoint folder (config.json + student/) nor a training output "
                      "folder with checkpoints/step-NNNNNNN")


_DOWNLOADS: list[str] = []  # local copies of remote checkpoints, removed at exit


def _local_files(ckpt: str) -> str:
    fs, fpath = url_to_fs(ckpt)
    if is_local(fs):
        return fpath
    tmp = tempfile.mkdtemp(prefix="distill-ckpt-")
    if not _DOWNLOADS:
        atexit.register(lambda: [shutil.rmtree(d, ignore_errors=True) for d in _DOWNLOADS])
    _DOWNLOADS.append(tmp)
    fs.get(fpath.rstrip("/") + "/", tmp + "/", recursive=True)
    return tmp


def read_run(path: str, *, data: str | None = None, teacher: str | None = None) -> RunInfo:
    """Read the checkpoint at ``path`` (or a run's newest) and the ``dataset.json`` of its dump.

    ``data`` replaces the dump folder recorded in the checkpoint (moved or on another machine);
    ``teacher`` replaces the teacher spec recorded in the dump (a local copy of the same teacher).
    """
    from students.data import read_dataset_info

    ckpt = resolve_checkpoint(path)
    config = join(ckpt, "config.json")
    try:
        saved = read_json(config)
    except (OSError, ValueError) as err:
        raise ExportError(f"{config}: cannot read the checkpoint's config ({err})") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("train"), dict) or not isinstance(saved.get("recipe"), dict):
        raise ExportError(f"{config} is not a training checkpoint's config (no 'train' and 'recipe' sections): "
                          "not a folder written by distill train")
    data_dir = data or saved["train"].get("data")
    if not data_dir or not exists(join(data_dir, "dataset.json")):
        raise ExportError(f"the dump this checkpoint trained on has no {join(data_dir or '?', 'dataset.json')!r} "
                          "(moved or on another machine?): pass --data with the dump folder (only its dataset.json is read)")
    dataset = read_dataset_info(data_dir)
    spec = teacher or dataset["recipe"]["teacher"]
    return RunInfo(checkpoint=ckpt, train=saved["train"], recipe=saved["recipe"], step=int(saved.get("step", 0)),
                   dataset=dataset, teacher=spec, files=_local_files(ckpt))


# ------------------------------------------------------------------------------------------
# the student's scheduler
# ------------------------------------------------------------------------------------------


def teacher_timesteps(dataset: dict) -> list[float]:
    """The teacher's sampling timesteps in the dump (``dataset.json``; recomputed if an old dump lacks them)."""
    if dataset.get("timesteps"):
        return [float(t) for t in dataset["timesteps"]]
    from teachers.sampler import scheduler_class

    scheduler = scheduler_class(dataset["scheduler_class"]).from_config(dataset["scheduler_config"])
    scheduler.set_timesteps(dataset["recipe"]["num_inference_steps"])
    return [float(t) for t in scheduler.timesteps]


def trained_jumps(dataset: dict, student_steps: int) -> tuple[list[float], list[float]]:
    """(timesteps, next timesteps) a step-distilled student was trained on; -1 = the final latent.

    The rows are ``students.data.step_rows`` (what ``rows_for`` draws from) and their timesteps come from
    the dump's exact float timesteps, as in the trainer's ``noise_levels`` (a test keeps the two in step).
    """
    from students.data import step_rows, step_stride

    ts = teacher_timesteps(dataset)  # exact floats, as the record and the trainer's noise_levels have them
    total, k = len(ts), step_stride(len(ts), student_steps)
    rows = step_rows(total, student_steps)
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
    from diffusers import DDIMScheduler

    from teachers.sampler import scheduler_class

    # the student's own parameterisation (a v-prediction student of an epsilon teacher samples as v)
    own_param = {"prediction_type": recipe["prediction_type"]} if recipe.get("prediction_type") else {}
    if not recipe.get("step_weight"):  # not step-distilled: the teacher's own sampler and steps
        scheduler = scheduler_class(dataset["scheduler_class"]).from_config(dataset["scheduler_config"], **own_param)
        steps = int(dataset["recipe"]["num_inference_steps"])
        scheduler.set_timesteps(steps)
        ts = [int(t) for t in scheduler.timesteps]
        return scheduler, dict(num_inference_steps=steps, timesteps=ts, trained_timesteps=teacher_timesteps(dataset),
                               timesteps_exact=True)
    want, want_next = trained_jumps(dataset, int(recipe["student_steps"]))
    steps = len(want)
    base = DDIMScheduler.from_config(dataset["scheduler_config"], **own_param)
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
    if best["timestep_spacing"] == "leading" and best["steps_offset"] != 1:
        # diffusers resets a steps_offset != 1 to 1 whenever a pipeline is built or loaded: carry the
        # offset in OffsetDDIMScheduler's own field instead (teachers/offset_scheduler.py)
        from teachers.offset_scheduler import OffsetDDIMScheduler

        scheduler = OffsetDDIMScheduler.from_config(base.config, timestep_spacing="leading", steps_offset=1,
                                                    timestep_offset=best["steps_offset"])
    else:
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


def _from_pretrained(cls, folder: str, what: str):
    """``cls.from_pretrained(folder)`` with a missing or damaged weights file as one ``ExportError``."""
    names = set(os.listdir(folder))
    if "config.json" not in names or not names & {"diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"}:
        raise ExportError(f"{folder!r} has no config.json and weights file (diffusion_pytorch_model.safetensors): "
                          f"the checkpoint's {what} is incomplete or damaged")
    try:
        return cls.from_pretrained(folder)
    except (OSError, ValueError, RuntimeError) as err:
        raise ExportError(f"cannot load the checkpoint's {what} from {folder!r}: {type(err).__name__}: {err}") from None


def load_student_unet(ckpt: str, weights: str = "ema"):
    """The student UNet of a local checkpoint folder (``RunInfo.files``)."""
    from students.unet import EfficientUNet2DConditionModel

    if weights not in WEIGHTS:
        raise ExportError(f"--weights {weights!r} is not one of {sorted(WEIGHTS)}")
    folder = os.path.join(ckpt, WEIGHTS[weights])
    if not os.path.isdir(folder):
        raise ExportError(f"checkpoint {ckpt!r} has no {WEIGHTS[weights]}/ (EMA off in that run?): use --weights raw")
    return _from_pretrained(EfficientUNet2DConditionModel, folder, f"{WEIGHTS[weights]} UNet")


def load_decoder(ckpt: str):
    """The run's distilled decoder (AutoencoderTiny / AutoencoderKL, by its config), or None."""
    folder = os.path.join(ckpt, "decoder")
    if not os.path.isdir(folder):
        return None
    import diffusers

    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            cls_name = json.load(f)["_class_name"]
    except (OSError, ValueError, KeyError) as err:
        raise ExportError(f"{folder!r}: the checkpoint's decoder has no readable config.json ({err})") from None
    return _from_pretrained(getattr(diffusers, cls_name), folder, "decoder")


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


def scheduler_code() -> dict[str, str]:
    """{file name: source} of ``OffsetDDIMScheduler`` for the exported ``scheduler/`` folder."""
    from teachers import offset_scheduler

    with open(offset_scheduler.__file__, encoding="utf-8") as f:
        src = f.read()
    header = "# Copied from diffusion-distill's teachers/offset_scheduler.py by `distill export` (trust_remote_code).\n"
    return {f"{SCHEDULER_MODULE}.py": header + src}


def _patch_model_index(folder: str, custom_scheduler: bool = False) -> None:
    path = os.path.join(folder, "model_index.json")
    with open(path, encoding="utf-8") as f:
        index = json.load(f)
    index["unet"] = [UNET_MODULE, UNET_CLASS]  # library = the .py file in unet/ (diffusers' custom component rule)
    if custom_scheduler:
        index["scheduler"] = [SCHEDULER_MODULE, "OffsetDDIMScheduler"]
    with open(path, "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2, sort_keys=True)


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
    custom_scheduler = type(pipe.scheduler).__name__ == "OffsetDDIMScheduler"
    _patch_model_index(folder, custom_scheduler)
    code = {("unet", name): src for name, src in unet_code().items()}
    if custom_scheduler:
        code.update({("scheduler", name): src for name, src in scheduler_code().items()})
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
        raise ExportError(f"--weights {weights!r} is not one of {sorted(WEIGHTS)}")
    run = read_run(checkpoint, data=data, teacher=teacher)
    pipe, info = assemble_pipeline(run, weights=weights, dtype=dtype)
    info["scheduler"] = type(pipe.scheduler).__name__
    info["load"] = "DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)"
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


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExportConfig:
    checkpoint: str = option(help="a checkpoint folder (checkpoints/step-N) or a training output folder (its newest)")
    output: str = option(help="the diffusers pipeline folder to write (local path or fsspec URL)")
    weights: str = option("ema", help="EMA or the raw student weights", choices=sorted(WEIGHTS))
    teacher: str | None = option(None, help="teacher spec for the text encoder and VAE (default: the dump's)")
    data: str | None = option(None, help="the dump folder, if it moved since training (reads its dataset.json)")
    dtype: str = option("float32", help="saved weights dtype", choices=("float32", "float16", "bfloat16"))
    overwrite: bool = option(False, help="replace OUTPUT if it is a previous export")


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
    return parse(ExportConfig, flat + rest, prog="distill export", description=description)[0]


def _main(argv: list[str]) -> int:
    cfg = parse_args(argv)
    path = export(cfg.checkpoint, cfg.output, weights=cfg.weights, teacher=cfg.teacher, data=cfg.data, dtype=cfg.dtype,
                  overwrite=cfg.overwrite)
    info = read_inference(path)
    print(f"wrote {path}: {info['pipeline']}, {info['num_inference_steps']} steps, guidance {info['guidance_scale']}; "
          f"load with DiffusionPipeline.from_pretrained({path!r}, trust_remote_code=True)")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main("distill export", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
