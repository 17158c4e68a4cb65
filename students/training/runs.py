"""Reading a training run back: its newest checkpoint (``resolve_checkpoint``), what the checkpoint
says about the run (``read_run`` -> ``RunInfo``), and its student UNet and decoder weights.
Export, evaluation, evolution and progressive rounds read runs through here.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile

import atexit
import json
import shutil

from core.errors import UserError
from core.options import not_one_of
from core.fs import exists, is_local, join, read_json, url_to_fs
from shards.schema import DatasetInfo

WEIGHTS = {"ema": "ema", "raw": "student"}  # --weights -> checkpoint subfolder


class RunError(UserError):
    """A checkpoint or run folder that cannot be read (missing, not a run, damaged weights)."""


_DOWNLOADS: list[str] = []  # local copies of remote checkpoints, removed at exit


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """What a checkpoint says about its run: where it is, its configs and the dump it trained on."""

    checkpoint: str  # .../checkpoints/step-NNNNNNN (local path or URL)
    train: dict  # TrainConfig as saved
    recipe: dict  # DistillRecipe as saved
    step: int
    dataset: DatasetInfo  # the dump's dataset.json
    teacher: str  # teacher spec (the dump's, or the override)
    files: str = ""  # a local folder with the checkpoint's files (the checkpoint itself when local)


def resolve_checkpoint(path: str) -> str:
    """A checkpoint folder itself, or a run folder -> its newest checkpoint; ``RunError`` otherwise."""
    from students.training.checkpoint import CONFIG, checkpoints

    fs, fpath = url_to_fs(path)
    if fs.isfile(fpath):
        raise RunError(f"{path!r} is a file, not a checkpoint folder or a training output folder")
    if fs.isfile(url_to_fs(join(path, CONFIG))[1]) and fs.isdir(url_to_fs(join(path, "student"))[1]):
        return path
    found = checkpoints(path) if fs.isdir(fpath) else []
    if found:
        return found[-1]
    raise RunError(f"{path!r} is neither a checkpoint folder (config.json + student/) nor a training output "
                      "folder with checkpoints/step-NNNNNNN")


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

    A checkpoint carries its dump's ``dataset.json`` (``config.json``'s ``dataset``), so no dump folder is
    needed; ``data`` reads the dump's own file instead (and is needed for checkpoints older than that);
    ``teacher`` replaces the teacher spec recorded in the dump (a local copy of the same teacher). Either way
    the dataset is the typed ``shards.schema.DatasetInfo``.
    """
    from shards.loader import read_dataset_info

    ckpt = resolve_checkpoint(path)
    config = join(ckpt, "config.json")
    try:
        saved = read_json(config)
    except (OSError, ValueError) as err:
        raise RunError(f"{config}: cannot read the checkpoint's config ({err})") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("train"), dict) or not isinstance(saved.get("recipe"), dict):
        raise RunError(f"{config} is not a training checkpoint's config (no 'train' and 'recipe' sections): "
                          "not a folder written by distill train")
    if data is None and isinstance(saved.get("dataset"), dict):  # the checkpoint describes itself
        dataset = DatasetInfo.from_dict(saved["dataset"], source=f"{config} (its 'dataset' section)")
    else:  # an older checkpoint (no dataset section), or --data given: the dump's own dataset.json
        data_dir = data or saved["train"].get("data")
        if not data_dir or not exists(join(data_dir, "dataset.json")):
            raise RunError(f"the dump this checkpoint trained on has no {join(data_dir or '?', 'dataset.json')!r} "
                           "(moved or on another machine?), and the checkpoint predates self-describing ones: pass "
                           "--data with the dump folder (only its dataset.json is read)")
        dataset = read_dataset_info(data_dir)
    spec = teacher or dataset.dump_recipe.teacher
    return RunInfo(checkpoint=ckpt, train=saved["train"], recipe=saved["recipe"], step=int(saved.get("step", 0)),
                   dataset=dataset, teacher=spec, files=_local_files(ckpt))


def _from_pretrained(cls, folder: str, what: str):
    """``cls.from_pretrained(folder)`` with a missing or damaged weights file as one ``RunError``."""
    names = set(os.listdir(folder))
    if "config.json" not in names or not names & {"diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"}:
        raise RunError(f"{folder!r} has no config.json and weights file (diffusion_pytorch_model.safetensors): "
                          f"the checkpoint's {what} is incomplete or damaged")
    try:
        return cls.from_pretrained(folder)
    except (OSError, ValueError, RuntimeError) as err:
        raise RunError(f"cannot load the checkpoint's {what} from {folder!r}: {type(err).__name__}: {err}") from None


def load_student_unet(ckpt: str, weights: str = "ema"):
    """The student UNet of a local checkpoint folder (``RunInfo.files``)."""
    from students.models.unet import EfficientUNet2DConditionModel

    if weights not in WEIGHTS:
        raise RunError(not_one_of("--weights", weights, sorted(WEIGHTS)))
    folder = os.path.join(ckpt, WEIGHTS[weights])
    if not os.path.isdir(folder):
        raise RunError(f"checkpoint {ckpt!r} has no {WEIGHTS[weights]}/ (EMA off in that run?): use --weights raw")
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
        raise RunError(f"{folder!r}: the checkpoint's decoder has no readable config.json ({err})") from None
    return _from_pretrained(getattr(diffusers, cls_name), folder, "decoder")
