"""Checkpoints (atomic, resumable, through ``core.fs``), the student EMA, and what people watch during training.

The trainer's state is a dict of stateful objects (torchtitan's pattern): each has ``state_dict()``
and ``load_state_dict()``. ``save(output, state, step=..., config=...)`` writes it as a folder
``OUTPUT/checkpoints/step-NNNNNNN``:

    student/, ema/, decoder/     save_pretrained of each diffusers model in ``state`` (EMA, decoder: if on)
    distill_head.safetensors     any other ``nn.Module`` (the feature projections, dropped at export)
    trainer_state.pt             every other object's state_dict (optimizer, LR scheduler, RNG states,
                                 data position) and the step; tensors and plain values only (weights_only load)
    scheduler/                   the student's scheduler (``save_pretrained``): how export and eval sample it
    config.json                  the TrainConfig, the DistillRecipe, the dump's dataset.json (``dataset``) and how
                                 the student samples (``student``: steps, timesteps, guidance, parameterisation,
                                 size, teacher), so export and eval need no --data (written last: a folder
                                 without it is incomplete)

Locally it is written under a temporary name and renamed into place; on an object store (``gs://``,
``s3://``, ``memory://``) the files are uploaded with ``config.json`` last, and a folder without
``config.json`` is ignored. The newest ``keep`` checkpoints stay.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import shutil
import tempfile
import uuid

import numpy as np
import torch

from core.fs import (TMP_MARK, atomic_write_bytes, atomic_write_json, exists, is_local, join, publish_folder,
                     read_bytes, remove_temporaries, url_to_fs)
from shards.schema import DatasetInfo

CKPT_DIR = "checkpoints"
CONFIG = "config.json"
TRAINER_STATE = "trainer_state.pt"


def make_ema(model):
    return copy.deepcopy(model).requires_grad_(False).eval()


@torch.no_grad()
def update_ema(ema, model, decay: float) -> None:
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1 - decay)  # one call, not one per tensor


class RNGState:
    """Every random number generator the trainer draws from, as one stateful object: the global torch
    (and CUDA) RNG, the trainer's own ``torch.Generator``, numpy's global RNG and Python's ``random``."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    @staticmethod
    def seed_all(seed: int) -> None:
        torch.manual_seed(seed)  # seeds CUDA too
        np.random.seed(seed % 2**32)
        random.seed(seed)

    def state_dict(self) -> dict:
        np_state = np.random.get_state()
        py_state = random.getstate()
        state = {"torch": torch.get_rng_state(), "generator": self.generator.get_state(),
                 "numpy": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2]),
                 "numpy_gauss": torch.tensor([float(np_state[3]), float(np_state[4])], dtype=torch.float64),
                 "python": torch.tensor(py_state[1], dtype=torch.int64)}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        self.generator.set_state(state["generator"])
        gauss = state.get("numpy_gauss", torch.zeros(2, dtype=torch.float64)).tolist()
        np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), int(state["numpy_pos"]),
                             int(gauss[0]), float(gauss[1])))
        random.setstate((3, tuple(int(x) for x in state["python"]), None))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


def _kind(obj) -> str:
    if hasattr(obj, "save_pretrained"):
        return "pretrained"
    if isinstance(obj, torch.nn.Module):
        return "module"
    return "state"


def checkpoints(output: str) -> list[str]:
    """Complete checkpoint folders of a run, oldest first (local path or URL)."""
    root = join(output, CKPT_DIR)
    fs, path = url_to_fs(root)
    if not fs.isdir(path):
        return []
    names = sorted(os.path.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))
    return [join(root, n) for n in names if n.startswith("step-") and TMP_MARK not in n and exists(join(join(root, n), CONFIG))]


def _write_local(folder: str, state: dict, step: int, config: dict, describe: dict | None = None) -> None:
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    for name, obj in (describe or {}).items():  # written for readers (export, eval), never loaded back into state
        obj.save_pretrained(os.path.join(folder, name))
    plain = {"step": step}
    for name, obj in state.items():
        if obj is None:
            continue
        kind = _kind(obj)
        if kind == "pretrained":
            obj.save_pretrained(os.path.join(folder, name))
        elif kind == "module":
            save_file({k: v.contiguous() for k, v in obj.state_dict().items()}, os.path.join(folder, f"{name}.safetensors"))
        else:
            plain[name] = obj.state_dict()
    torch.save(plain, os.path.join(folder, TRAINER_STATE))
    with open(os.path.join(folder, CONFIG), "w", encoding="utf-8") as f:
        json.dump(dict(config, step=step), f, indent=1)


def save(output: str, state: dict, *, step: int, config: dict, keep: int = 2, describe: dict | None = None) -> str:
    """Write ``state`` (name -> stateful object, None = absent) as ``OUTPUT/checkpoints/step-NNNNNNN``; returns its path.

    ``config`` (JSON-able: the train config, recipe, the dump's dataset.json and how the student samples)
    goes into ``config.json`` with the step; ``describe`` (name -> object with ``save_pretrained``, such as
    the student's scheduler) is written beside the models for readers and is not part of the resumed state.
    A checkpoint of the same step (a re-run reaching it again) is replaced; the newest ``keep`` stay.
    """
    root = join(output, CKPT_DIR)
    final = join(root, f"step-{step:07d}")
    fs, froot = url_to_fs(root)
    if is_local(fs):
        os.makedirs(froot, exist_ok=True)
        ffinal = url_to_fs(final)[1]
        tmp = f"{ffinal}{TMP_MARK}{uuid.uuid4().hex}"
        try:
            _write_local(tmp, state, step, config, describe)
            publish_folder(tmp, ffinal, CONFIG)
        finally:
            if os.path.exists(tmp):
                shutil.rmtree(tmp)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            _write_local(tmp, state, step, config, describe)
            publish_folder(tmp, final, CONFIG)  # config.json last: it marks the folder complete
    for old in checkpoints(output)[:-keep] if keep > 0 else []:
        ofs, opath = url_to_fs(old)
        ofs.rm(opath, recursive=True)
    return final


@contextlib.contextmanager
def local_copy(path: str):
    """A local folder with the contents of ``path`` (itself when local; a temporary download otherwise)."""
    fs, fpath = url_to_fs(path)
    if is_local(fs):
        yield fpath
        return
    with tempfile.TemporaryDirectory() as tmp:
        fs.get(fpath.rstrip("/") + "/", tmp + "/", recursive=True)
        yield tmp


def load(path: str, state: dict) -> int:
    """Restore the checkpoint at ``path`` into ``state``'s objects; returns its step."""
    from safetensors.torch import load_file

    with local_copy(path) as folder:
        plain = torch.load(os.path.join(folder, TRAINER_STATE), weights_only=True)
        for name, obj in state.items():
            if obj is None:
                continue
            kind = _kind(obj)
            if kind == "pretrained":
                sub = os.path.join(folder, name)
                if os.path.isdir(sub):
                    obj.load_state_dict(type(obj).from_pretrained(sub).state_dict())
            elif kind == "module":
                obj.load_state_dict(load_file(os.path.join(folder, f"{name}.safetensors")))
            elif name in plain:
                obj.load_state_dict(plain[name])
    return int(plain["step"])


def load_latest(output: str, state: dict) -> int:
    """Restore the newest checkpoint of ``output`` into ``state``; returns its step (0 if none)."""
    found = checkpoints(output)
    return load(found[-1], state) if found else 0


def remove_stale(output: str) -> list[str]:
    """Delete what killed writers left in the run folder, the whole tree: ``checkpoints/step-N.tmp-<uuid>``
    folders of a killed save, ``*.tmp-<uuid>`` files (a ``losses.jsonl`` rewrite), and a replaced
    checkpoint's ``step-N.old-<uuid>`` (renamed back to ``step-N`` when the kill came between the
    swap's two renames); returns their paths relative to the run folder. Rank 0 only, before it
    resumes: the one writer of the folder is not saving then."""
    return remove_temporaries(output, recursive=True)


def _lines_up_to(lines: list[str], step: int) -> list[str]:
    """The ``losses.jsonl`` lines of steps 1..``step``: a resumed run redoes and logs again the later ones.
    A line a kill cut short (not JSON) goes too; a complete last line gets back its newline."""
    kept = []
    for line in lines:
        try:
            logged = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            continue
        if logged <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    return kept


class RunLog:
    """Progress bar (loss, samples/s), ``losses.jsonl`` and TensorBoard scalars on rank 0."""

    def __init__(self, cfg, rank: int, resume_step: int = 0):
        from tqdm import tqdm

        self.cfg = cfg
        self.path = join(cfg.output, "losses.jsonl")
        fs, fpath = url_to_fs(cfg.output)
        self.local = is_local(fs)
        if self.local:
            os.makedirs(fpath, exist_ok=True)
        self._truncate(resume_step)
        self.bar = tqdm(total=cfg.max_steps, desc="train", unit="step", disable=rank != 0)
        self.writer = None
        if self.local:  # TensorBoard writes local files only
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(os.path.join(fpath, "tb"))
            except ImportError:  # tensorboard is a declared dependency; without it, the bar still shows progress
                self.writer = None

    def _truncate(self, step: int) -> None:
        """Keep the logged lines of steps up to ``step`` (the checkpoint resumed from), so that each step
        has one line. Local: rewritten atomically, then appended to. An object store cannot append: the
        lines are kept here (``self.lines``) and the file rewritten whole at each checkpoint."""
        found = read_bytes(self.path).decode("utf-8").splitlines(keepends=True) if exists(self.path) else []
        kept = _lines_up_to(found, step)
        self.lines: list[str] = [] if self.local else kept
        if self.local and kept != found:
            atomic_write_bytes(self.path, "".join(kept).encode("utf-8"))

    def step(self, step: int, terms: dict, lr: float, grad_norm: float, samples_per_s: float) -> None:
        # losses.jsonl: one line per step (a resumed run has dropped the lines after its checkpoint)
        line = json.dumps({"step": step, **terms, "lr": lr, "grad_norm": grad_norm}) + "\n"
        if self.local:
            with open(url_to_fs(self.path)[1], "a", encoding="utf-8") as f:
                f.write(line)
        else:
            self.lines.append(line)
        if self.bar.n < step:
            self.bar.update(step - self.bar.n)
        self.bar.set_postfix(loss=f"{terms['loss']:.4f}", samples_s=f"{samples_per_s:.1f}")
        if self.writer is not None and (step % self.cfg.log_every == 0 or step == 1):
            for k, v in terms.items():
                self.writer.add_scalar(k, v, step)  # already namespaced: loss, loss/<term>, loss_scaled/<term>, disc/<stat>
            self.writer.add_scalar("lr", lr, step)
            self.writer.add_scalar("grad_norm", grad_norm, step)
            self.writer.add_scalar("samples_per_s", samples_per_s, step)

    def flush(self) -> None:
        if not self.local:
            atomic_write_bytes(self.path, "".join(self.lines).encode("utf-8"))

    def grid(self, step: int, student, ema, dataset: DatasetInfo, urls: list[str], sampler, sampling: dict, decoder=None) -> str:
        """PNG grid (and TensorBoard image): the teacher as the dump ran it (its scheduler, steps and guidance),
        then the student (and its EMA) as ``distill export`` will sample it (``student_sampling``: its own
        scheduler, trained timesteps, parameterisation and the dump's guidance; its decoder if one is trained):
        ``sampler`` and ``sampling`` are what the loop computed once and writes into every checkpoint."""
        from shards.loader import record_pipeline
        from students.distill.inference import student_pipeline, teacher_pipeline, teacher_sampler
        from students.training.grid import grid_png, sample_images
        from teachers.load import load_teacher

        guidance = sampling["guidance_scale"]
        recipe = dataset.dump_recipe
        if getattr(self, "_teacher", None) is None:
            self._teacher = load_teacher(recipe.teacher)
            records = [r for _, r in zip(range(4), record_pipeline(urls[:1]))]
            self._prompts = [r.caption for r in records]
            self._seeds = list(range(len(records)))
            pipe = teacher_pipeline(self._teacher, teacher_sampler(dataset))
            self._teacher_images = sample_images(pipe, self._prompts, self._seeds,
                                                 recipe.sampler.num_inference_steps, guidance)
        student.eval()
        rows, labels = [self._teacher_images], [f"teacher {recipe.sampler.num_inference_steps} st"]
        for name, unet in (("student", student), ("EMA", ema)):
            if unet is None:
                continue
            pipe = student_pipeline(self._teacher, unet, sampler, decoder)
            rows.append(sample_images(pipe, self._prompts, self._seeds, sampling["num_inference_steps"], guidance))
            labels.append(f"{name} {sampling['num_inference_steps']} st")
        student.train()
        if decoder is not None:
            decoder.train()
        path = join(join(self.cfg.output, "grids"), f"step-{step:07d}.png")
        grid = grid_png(rows, path, labels, captions=self._prompts)
        if self.writer is not None:
            self.writer.add_image("grid", grid, step, dataformats="HWC")
        return path

    def close(self, stats) -> None:
        self.flush()
        self.bar.close()
        if stats.skipped:
            print(f"train: {stats.summary()}")
        if self.writer is not None:
            self.writer.close()


def write_audit(output: str, rank: int, world: int, model, seen: dict, heads=None) -> None:
    """``ranks/rank-R.json``: which keys this rank read in each epoch and a hash of its final weights (and
    of the discriminator heads of an adversarial run, which DDP does not wrap: their gradients are averaged
    by hand, so equal hashes on every rank check that)."""
    import hashlib

    def sha(module) -> str:
        digest = hashlib.sha256()
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    fs, fpath = url_to_fs(join(output, "ranks"))
    if is_local(fs):
        os.makedirs(fpath, exist_ok=True)
    record = {"rank": rank, "world": world, "weights_sha256": sha(model),
              "keys_by_epoch": {str(k): v for k, v in seen.items()}}
    if heads is not None:
        record["disc_heads_sha256"] = sha(heads)
    atomic_write_json(join(join(output, "ranks"), f"rank-{rank}.json"), record)
