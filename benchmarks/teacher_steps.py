"""The teacher itself at the students' step counts, at matched guidance, with standard errors.

    python benchmarks/teacher_steps.py --output out/teacher_steps                       # shapes, all 450 captions
    python benchmarks/teacher_steps.py --output out/teacher_steps --guidance 6.0,7.5 --steps 50,8,4,2,1 --seeds 3

A student row means something only beside the teacher sampled with the same step count, guidance,
captions and seeds: the fairest baseline a user would write is the teacher at the student's step
count. Every row goes through ``diffusion_distill.kit.evaluate_row`` (the guidance is passed to every
row; the result cache refuses a row made with other settings). ``--seeds`` repeats each row with other
noise seeds (the spread over seeds); each row also carries the standard error of its mean over images.
Prints the table and writes ``teacher_steps.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from diffusion_distill import kit


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True)
    p.add_argument("--teacher", default=kit.TEACHER)
    p.add_argument("--steps", default="50,8,4,2,1", help="teacher DDIM step counts")
    p.add_argument("--guidance", default="", help="CFG weights (default: the teacher's calibrated one)")
    p.add_argument("--seeds", type=int, default=1, help="noise seeds per row (image i of seed s: seed s * 100000 + i)")
    p.add_argument("--num_images", type=int, default=450, help="captions, one image each (450: every scene once)")
    args = p.parse_args(argv)
    from teachers.shapes import world
    from teachers.shapes.analyser import load_analyser

    steps = tuple(int(s) for s in args.steps.split(","))
    guidances = [float(g) for g in args.guidance.split(",")] if args.guidance else [kit.shapes_guidance()]
    os.makedirs(args.output, exist_ok=True)
    captions = world.write_cycled_captions(os.path.join(args.output, "captions.txt"), args.num_images)
    analyser, t0, table = load_analyser(), time.monotonic(), {}
    for g in guidances:
        for seed in range(args.seeds):
            res = kit.evaluate_row(os.path.join(args.output, f"g{g:g}-seed{seed}"), captions=captions,
                                   num_images=args.num_images, guidance_scale=g, teacher_steps=steps,
                                   teacher=args.teacher, seed=seed * 100_000, analyser=analyser)
            for s, row in res["teacher"].items():
                table.setdefault(f"{g:g} {s}", []).append(row)
    print(f"\n{args.teacher}, {args.num_images} captions, {args.seeds} noise seed(s); mean ± standard error over images "
          "(± spread over seeds)")
    print(f"{'guidance':>8} {'steps':>5} {'adherence':>22} {'exact':>22} {'Frechet':>14}")
    out = {}
    for key, rows in table.items():
        g, s = key.split()
        cell = {}
        for k in ("adherence", "exact", "frechet_analyser"):
            vals = [r[k] for r in rows]
            cell[k] = statistics.fmean(vals)
            cell[f"{k}_spread"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        for k in ("adherence_se", "exact_se"):
            cell[k] = statistics.fmean(r[k] for r in rows)
        out[key] = cell

        def fmt(k):
            return f"{cell[k]:.4f}±{cell[k + '_se']:.4f}" + (f" (±{cell[k + '_spread']:.4f})" if len(rows) > 1 else "")
        print(f"{g:>8} {s:>5} {fmt('adherence'):>22} {fmt('exact'):>22} {cell['frechet_analyser']:>8.1f}"
              + (f" ±{cell['frechet_analyser_spread']:.1f}" if len(rows) > 1 else ""))
    with open(os.path.join(args.output, "teacher_steps.json"), "w", encoding="utf-8") as f:
        json.dump(dict(args=vars(args), table=out, minutes=(time.monotonic() - t0) / 60), f, indent=1)
    print(f"{(time.monotonic() - t0) / 60:.1f} min; {os.path.join(args.output, 'teacher_steps.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
