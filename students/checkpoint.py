"""Checkpoints (atomic, resumable), the student EMA, and what people watch during training.

A checkpoint is a folder ``OUTPUT/checkpoints/step-NNNNNNN``:

    student/            save_pretrained of the student UNet
    ema/                save_pretrained of the EMA student (if EMA is on)
    decoder/            save_pretrained of the small decoder (if one is distilled)
    distill_head.safetensors   the feature projections (dropped at export)
    trainer_state.pt    optimizer, LR scheduler, RNG states, step, data position (loaded weights_only=True)
    config.json         the TrainConfig and the DistillRecipe

It is written under a temporary name and renamed into place; the newest ``keep_checkpoints`` stay.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import random
import shutil
import uuid

import numpy as np
import torch

CKPT_DIR = "checkpoints"


def make_ema(model):
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    return ema


@torch.no_grad()
def update_ema(ema, model, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - decay)


def checkpoints(output: str) -> list[str]:
    root = os.path.join(output, CKPT_DIR)
    if not os.path.isdir(root):
        return []
    return sorted(os.path.join(root, n) for n in os.listdir(root) if n.startswith("step-") and "tmp" not in n)


def save(cfg, recipe, step, epoch, position, student, heads, ema, optimizer, scheduler, generator, decoder=None) -> str:
    from safetensors.torch import save_file

    root = os.path.join(cfg.output, CKPT_DIR)
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step-{step:07d}")
    tmp = f"{final}.tmp-{uuid.uuid4().hex}"
    student.save_pretrained(os.path.join(tmp, "student"))
    if ema is not None:
        ema.save_pretrained(os.path.join(tmp, "ema"))
    if decoder is not None:
        decoder.save_pretrained(os.path.join(tmp, "decoder"))
    save_file({k: v.contiguous() for k, v in heads.state_dict().items()}, os.path.join(tmp, "distill_head.safetensors"))
    state = {
        "step": step, "epoch": epoch, "position": position,
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(), "generator": generator.get_state(),
        "numpy_rng": torch.from_numpy(np.random.get_state()[1].astype(np.int64)), "numpy_pos": int(np.random.get_state()[2]),
        "python_rng": torch.tensor(random.getstate()[1], dtype=torch.int64),
    }
    torch.save(state, os.path.join(tmp, "trainer_state.pt"))
    with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
        json.dump({"train": dataclasses.asdict(cfg), "recipe": dataclasses.asdict(recipe), "step": step}, f, indent=1)
    if os.path.exists(final):  # a re-run reaching the same step: replace the old copy
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in checkpoints(cfg.output)[: -cfg.keep_checkpoints]:
        shutil.rmtree(old)
    return final


def load_latest(output, student, heads, ema, optimizer, scheduler, generator, decoder=None) -> dict:
    """Restore the newest checkpoint in ``output`` into the given objects; returns its state ({} if none)."""
    from safetensors.torch import load_file

    found = checkpoints(output)
    if not found:
        return {}
    path = found[-1]
    cls = type(student)
    student.load_state_dict(cls.from_pretrained(os.path.join(path, "student")).state_dict())
    if ema is not None and os.path.isdir(os.path.join(path, "ema")):
        ema.load_state_dict(cls.from_pretrained(os.path.join(path, "ema")).state_dict())
    heads.load_state_dict(load_file(os.path.join(path, "distill_head.safetensors")))
    if decoder is not None:
        decoder.load_state_dict(type(decoder).from_pretrained(os.path.join(path, "decoder")).state_dict())
    state = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    generator.set_state(state["generator"])
    np.random.set_state(("MT19937", state["numpy_rng"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(int(x) for x in state["python_rng"]), None))
    return state


class RunLog:
    """Progress bar (loss, samples/s) and TensorBoard scalars on rank 0."""

    def __init__(self, cfg, rank: int):
        from tqdm import tqdm

        self.cfg = cfg
        os.makedirs(cfg.output, exist_ok=True)
        self.bar = tqdm(total=cfg.max_steps, desc="train", unit="step", disable=rank != 0)
        self.writer = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(cfg.output, "tb"))
        except ImportError:  # tensorboard is a declared dependency; without it, the bar still shows progress
            self.writer = None

    def step(self, step: int, terms: dict, lr: float, grad_norm: float, samples_per_s: float) -> None:
        # losses.jsonl: one line per step (a resumed run appends the steps it redoes, with the same values)
        with open(os.path.join(self.cfg.output, "losses.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **terms, "lr": lr, "grad_norm": grad_norm}) + "\n")
        if self.bar.n < step:
            self.bar.update(step - self.bar.n)
        self.bar.set_postfix(loss=f"{terms['loss']:.4f}", samples_s=f"{samples_per_s:.1f}")
        if self.writer is not None and (step % self.cfg.log_every == 0 or step == 1):
            for k, v in terms.items():
                self.writer.add_scalar(f"loss/{k}", v, step)
            self.writer.add_scalar("lr", lr, step)
            self.writer.add_scalar("grad_norm", grad_norm, step)
            self.writer.add_scalar("samples_per_s", samples_per_s, step)

    def grid(self, step: int, student, ema, dataset: dict, urls: list[str], recipe) -> str:
        """PNG grid: teacher at its steps, then the student (and its EMA) at the recipe's student steps."""
        from students.data import record_pipeline
        from students.grid import grid_png, sample_images
        from teachers.load import load_teacher

        if getattr(self, "_teacher", None) is None:
            self._teacher = load_teacher(dataset["recipe"]["teacher"])
            records = [r for _, r in zip(range(4), record_pipeline(urls[:1]))]
            self._prompts = [r.caption for r in records]
            self._seeds = list(range(len(records)))
            self._teacher_images = sample_images(self._teacher.pipe, self._teacher.unet, self._prompts, self._seeds,
                                                 dataset["recipe"]["num_inference_steps"])
        steps = recipe.student_steps if recipe.step_weight > 0 else dataset["recipe"]["num_inference_steps"]
        student.eval()
        rows = [self._teacher_images, sample_images(self._teacher.pipe, student, self._prompts, self._seeds, steps)]
        labels = [f"teacher {dataset['recipe']['num_inference_steps']} st", f"student {steps} st"]
        if ema is not None:
            rows.append(sample_images(self._teacher.pipe, ema, self._prompts, self._seeds, steps))
            labels.append(f"EMA {steps} st")
        student.train()
        path = os.path.join(self.cfg.output, "grids", f"step-{step:07d}.png")
        grid_png(rows, path, labels)
        return path

    def close(self, stats) -> None:
        self.bar.close()
        if stats.skipped:
            print(f"train: skipped {stats.skipped} corrupt samples {stats.reasons}")
        if self.writer is not None:
            self.writer.close()


def write_audit(output: str, rank: int, world: int, model, seen: dict) -> None:
    """``ranks/rank-R.json``: which keys this rank read in each epoch and a hash of its final weights."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    os.makedirs(os.path.join(output, "ranks"), exist_ok=True)
    with open(os.path.join(output, "ranks", f"rank-{rank}.json"), "w", encoding="utf-8") as f:
        json.dump({"rank": rank, "world": world, "weights_sha256": digest.hexdigest(),
                   "keys_by_epoch": {str(k): v for k, v in seen.items()}}, f)
