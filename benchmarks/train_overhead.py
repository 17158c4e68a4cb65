"""Trainer steps/s against a bare forward-backward loop of the same student, in one invocation.

    python benchmarks/train_overhead.py [--preset tiny] [--recipe output_kd] [--resolution 256] \\
        [--batch_size 8] [--steps 30] [--num_workers 1]

First a tiny-teacher dump is made (not timed). Then, in this order: the bare loop, the trainer, the
bare loop again. The bare loop runs the same student on in-memory random tensors of the batch's
shapes with the same number of student forwards per step as the recipe (output KD at the recorded
point, plus the task-loss forward), MSE, backward, AdamW. The trainer adds what the ratio measures:
reading and decoding shards (DataLoader workers), batch assembly, the loss terms, gradient
clipping, EMA and the LR schedule. Checkpoints are set beyond the run so no save is timed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path



def bare_loop(preset: str, batch: int, latent: int, steps: int, forwards: int) -> float:
    import torch

    from students.models.unet import build_unet

    torch.manual_seed(0)
    student = build_unet(preset)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    z, c = torch.randn(batch, 4, latent, latent), torch.randn(batch, 77, student.config.cross_attention_dim)
    target, t = torch.randn(batch, 4, latent, latent), torch.randint(0, 1000, (batch,))
    start = None
    for i in range(steps + 2):
        if i == 2:  # two warm-up steps, as the trainer's first steps also warm up
            start = time.perf_counter()
        opt.zero_grad()
        loss = sum(torch.nn.functional.mse_loss(student(z, t, c).sample, target) for _ in range(forwards))
        loss.backward()
        opt.step()
    return (time.perf_counter() - start) / steps


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--recipe", default="output_kd")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--num_workers", type=int, default=1)
    args = parser.parse_args(argv)

    from pipelines import teacher_dump
    from students.distill.recipes import get_recipe
    from students.training.train import TrainConfig, train

    tmp = tempfile.mkdtemp(prefix="train-overhead-")
    n = args.batch_size * (args.steps + 2)
    Path(tmp, "p.txt").write_text("".join(f"a photo of object {i}\n" for i in range(n)))
    teacher_dump.run(["--prompts", os.path.join(tmp, "p.txt"), "--output", os.path.join(tmp, "dump"), "--teacher", "tiny",
                      "--resolution", str(args.resolution), "--num_inference_steps", "4", "--samples_per_shard", "32",
                      "--batch_size", "16", "--progress", "off"])
    recipe = get_recipe(args.recipe)
    forwards = 1 + (recipe.task_weight > 0) + (recipe.guidance_prob > 0 or recipe.step_weight > 0)
    latent = args.resolution // 8

    bare_1 = bare_loop(args.preset, args.batch_size, latent, args.steps, forwards)
    cfg = TrainConfig(data=os.path.join(tmp, "dump"), output=os.path.join(tmp, "run"), preset=args.preset,
                      recipe=args.recipe, batch_size=args.batch_size, max_steps=args.steps + 2,
                      checkpoint_every=10**9, num_workers=args.num_workers, shuffle_buffer=32, log_every=10**9)
    # time steps 3.. of the trainer from its own loss log timestamps: run and time the whole, minus 2 steps
    start = time.perf_counter()
    train(cfg)
    total = time.perf_counter() - start
    warm = train_first_steps_time(cfg)
    trainer = (total - warm) / args.steps
    bare_2 = bare_loop(args.preset, args.batch_size, latent, args.steps, forwards)
    bare = (bare_1 + bare_2) / 2
    print(f"student {args.preset}, recipe {args.recipe} ({forwards} student forwards/step), batch {args.batch_size}, "
          f"{args.resolution}px ({latent}x{latent} latents), {args.num_workers} loader worker(s)")
    print(f"bare forward-backward : {1 / bare:7.2f} steps/s  ({bare_1 * 1e3:.0f} ms, {bare_2 * 1e3:.0f} ms per step)")
    print(f"trainer               : {1 / trainer:7.2f} steps/s  ({trainer * 1e3:.0f} ms per step)")
    print(f"ratio trainer/bare (time per step): {trainer / bare:.3f}")
    return 0


def train_first_steps_time(cfg) -> float:
    """Wall time of setup plus the first two steps (a fresh 2-step run: same setup, same warm-up)."""
    import dataclasses
    import shutil

    from students.training.train import train

    out = cfg.output + "-warm"
    start = time.perf_counter()
    train(dataclasses.replace(cfg, output=out, max_steps=2))
    took = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    return took


if __name__ == "__main__":
    sys.exit(main())
