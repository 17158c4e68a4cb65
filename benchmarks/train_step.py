"""The trainer's optimizer step today against the step before the fast-step kernels, in one process.

    python benchmarks/train_step.py                                   # shapes + shapes_small, batch 16
    python benchmarks/train_step.py --presets shapes --batch_size 16 --steps 40 --rounds 3 --compile

A shapes-teacher dump of ``--captions`` training-split captions is made first (40 DDIM steps, not
timed). Each variant is the real ``distill train`` loop (SnapFusion step distillation at 4 steps: three
student forwards per step) run twice, to ``--warmup`` and to ``--warmup + --steps`` optimizer steps;
the difference over ``--steps`` is its time per step without the start-up (building the student, the
scheduler search, the first batches). Variants, interleaved ``--rounds`` times (load on the machine hits
each alike), medians:

    before      --channels_last false --fused_optimizer false (the trainer's step before this benchmark)
    default     channels-last student, fused AdamW (the defaults)
    compile     default + --compile (with ``--compile``: inductor; its compile time is printed apart)

One thread (``--threads``), as the benchmarks' other CPU timings.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

VARIANTS = {"before": dict(channels_last=False, fused_optimizer=False), "default": {}, "compile": dict(compile=True)}


def timed_run(data: str, folder: str, preset: str, batch: int, steps: int, variant: dict) -> float:
    """Wall seconds of one ``train`` to ``steps`` optimizer steps (no checkpoint but the last, no logs)."""
    from diffusion_distill import kit
    from students.training.train import train

    shutil.rmtree(folder, ignore_errors=True)
    cfg = kit.train_config(data, folder, student_steps=4, max_steps=steps, batch_size=batch, preset=preset,
                           log_every=10_000, checkpoint_every=10_000, **variant)
    t0 = time.perf_counter()
    train(cfg)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="shapes,shapes_small")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--steps", type=int, default=40, help="timed optimizer steps per run")
    p.add_argument("--warmup", type=int, default=5, help="steps of the start-up run subtracted")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--captions", type=int, default=64)
    p.add_argument("--compile", action="store_true", help="also time --compile")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    import torch

    from diffusion_distill import kit
    from teachers.shapes import world

    torch.set_num_threads(args.threads)
    work = tempfile.mkdtemp(prefix="train-step-")
    try:
        captions = os.path.join(work, "captions.txt")
        with open(captions, "w", encoding="utf-8") as f:
            f.write("\n".join(world.caption(s) for s in world.train_scenes()[: args.captions]) + "\n")
        kit.dump(captions, os.path.join(work, "dump"), save_images=False, cpu_threads=args.threads,
                 batch_size=min(64, args.captions))
        variants = [v for v in VARIANTS if v != "compile" or args.compile]
        rows = []
        for preset in args.presets.split(","):
            per_step = {v: [] for v in variants}
            for r in range(args.rounds):
                for v in variants:
                    short = timed_run(os.path.join(work, "dump"), os.path.join(work, "run"), preset, args.batch_size,
                                      args.warmup, VARIANTS[v])
                    long = timed_run(os.path.join(work, "dump"), os.path.join(work, "run"), preset, args.batch_size,
                                     args.warmup + args.steps, VARIANTS[v])
                    per_step[v].append((long - short) / args.steps)
                    print(f"{preset} {v} round {r + 1}: {per_step[v][-1] * 1e3:.0f} ms/step "
                          f"(start-up run {short:.1f} s)", flush=True)
            base = statistics.median(per_step["before"])
            for v in variants:
                med = statistics.median(per_step[v])
                rows.append((preset, v, med, base / med))
        print(f"\ntrainer step, snapfusion_step at 4 steps, batch {args.batch_size}, {args.threads} thread(s), "
              f"median of {args.rounds} interleaved rounds of {args.steps} steps")
        print(f"{'preset':<14}{'variant':<10}{'ms/step':>9}{'speed-up':>10}")
        for preset, v, med, ratio in rows:
            print(f"{preset:<14}{v:<10}{med * 1e3:>9.0f}{ratio:>9.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
