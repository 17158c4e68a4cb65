"""Fidelity of step-distilled students against the shapes teacher at 50, 8, 4 and 1 steps.

    python benchmarks/fidelity.py --output out/fidelity [--budget 1500] [--seeds 3] [--seeds_per_prompt 4] [--eval_images 240]
        [--init_from_teacher mid_only] [--curve_points 4]

Through the whole pipeline: every scene of the shapes world as a caption -> the curation job ->
the teacher dump (40 DDIM steps, trailing, all steps recorded) -> one student per step count and
training seed (``snapfusion_step`` recipe, the ``shapes`` preset, or with ``--init_from_teacher`` the
teacher's UNet cut and started from its weights) -> export -> evaluation of the teacher at 50/8/4/1
steps and each exported student at its own step count, on held-out captions with the same image
seeds for every row. Student rows are the mean and spread (sample standard deviation) over
``--seeds`` training seeds. The curve: the first seed's students evaluated at ``--curve_points``
checkpoints, adherence/exact/Frechet against training steps (under-training or a ceiling).
Prints the table and the curve and writes ``fidelity.json``. The ablation table is ``benchmarks/ablation.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

KEYS = ("adherence", "exact", "frechet_analyser")


def _train(args, data, out, steps, seed):
    from students.checkpoint import checkpoints
    from students.train import TrainConfig, train

    if checkpoints(out) and checkpoints(out)[-1].endswith(f"{args.budget:07d}"):
        return
    init = args.init_from_teacher
    cfg = TrainConfig(data=data, output=out, preset=None if init else "shapes", init_from_teacher=init,
                      recipe="snapfusion_step", student_steps=steps, max_steps=args.budget, batch_size=64, lr=args.lr,
                      warmup_steps=max(10, args.budget // 20), ema_decay=0.99,
                      checkpoint_every=max(1, args.budget // args.curve_points), keep_checkpoints=args.curve_points + 1,
                      log_every=50, shuffle_buffer=256, seed=seed)
    train(cfg)


def _eval(args, student, out, captions, analyser, steps, teacher_steps=()):
    from diffusion_distill import workflow
    from students.evaluate import EvalConfig, evaluate
    from teachers.shapes.analyser import Adherence, AnalyserFrechet

    cfg = EvalConfig(output=out, captions=captions, student=student, teacher=workflow.TEACHER, num_images=args.eval_images,
                     teacher_steps=teacher_steps, student_steps=(steps,) if student else (), metrics=(),
                     batch_size=60, grid_images=8, latency_repeats=3)
    return evaluate(cfg, extra_metrics=(Adherence(analyser), AnalyserFrechet(analyser)))["results"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True)
    p.add_argument("--budget", "--train_steps", dest="budget", type=int, default=1500, help="optimizer steps per student")
    p.add_argument("--seeds", type=int, default=1, help="training seeds per student row (mean and spread)")
    p.add_argument("--curve_points", type=int, default=4, help="checkpoints of the first seed evaluated for the curve")
    p.add_argument("--init_from_teacher", default=None, help="a students.teacher_init cut (default: the shapes preset)")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: workflow.SCRATCH_LR from scratch, INIT_LR teacher-initialised)")
    p.add_argument("--seeds_per_prompt", type=int, default=4)
    p.add_argument("--eval_images", type=int, default=240)
    p.add_argument("--student_steps", default="8,4,1")
    args = p.parse_args(argv)
    if args.lr is None:
        from diffusion_distill import workflow

        args.lr = workflow.INIT_LR if args.init_from_teacher else workflow.SCRATCH_LR

    from diffusion_distill import workflow
    from students.checkpoint import checkpoints
    from students.export import export
    from teachers.shapes import world
    from teachers.shapes.analyser import load_analyser

    out = args.output
    os.makedirs(out, exist_ok=True)
    captions = os.path.join(out, "captions.txt")
    with open(captions, "w", encoding="utf-8") as f:
        f.write("\n".join(world.caption(s) for s in world.all_scenes()) + "\n")
    t0 = time.monotonic()
    if not os.path.isfile(os.path.join(out, "curate", "manifest.parquet")):
        workflow.curate(captions, os.path.join(out, "curate"))
    data = os.path.join(out, "dump")
    if not os.path.isfile(os.path.join(data, "dataset.json")):
        workflow.dump(os.path.join(out, "curate", "manifest.parquet"), data, seeds_per_prompt=args.seeds_per_prompt,
                      save_images=False)
    steps_list = [int(s) for s in args.student_steps.split(",")]
    eval_captions = os.path.join(out, "eval_captions.txt")
    world.write_captions(eval_captions, args.eval_images, seed=12_345)
    analyser = load_analyser()
    teacher_steps = (50, *steps_list)
    table = {f"{m} {s}": r for m, by in _eval(args, None, os.path.join(out, "eval-teacher"), eval_captions, analyser, 0,
                                              teacher_steps).items() for s, r in by.items()}
    runs: dict[int, list[dict]] = {}
    curve: dict[int, dict[int, dict]] = {}
    for seed in range(args.seeds):
        for n in steps_list:
            suffix = f"{n}" if seed == 0 else f"{n}-seed{seed}"
            run_dir, folder = os.path.join(out, f"train-{suffix}"), os.path.join(out, f"student-{suffix}")
            _train(args, data, run_dir, n, seed)
            if not os.path.isdir(folder):
                export(run_dir, folder)
            res = _eval(args, folder, os.path.join(out, f"eval-{suffix}"), eval_captions, analyser, n)
            runs.setdefault(n, []).append(next(iter(res["student"].values())))
            if seed == 0:
                for ckpt in checkpoints(run_dir)[:-1]:  # the last one is the exported student's row
                    at = int(ckpt.rsplit("-", 1)[1])
                    r = _eval(args, ckpt, os.path.join(out, f"eval-{n}-at-{at}"), eval_captions, analyser, n)
                    curve.setdefault(n, {})[at] = next(iter(r["student"].values()))
                curve.setdefault(n, {})[args.budget] = runs[n][0]
    print(f"\n{'model':<14}{'steps':>6}{'adherence':>17} {'exact':>15} {'Frechet':>15}{'ms/img':>8}")
    for s in teacher_steps:
        r = table[f"teacher {s}"]
        print(f"{'teacher':<14}{s:>6}{r['adherence']:>17.3f} {r['exact']:>15.3f} {r['frechet_analyser']:>15.2f}"
              f"{r['latency_s'] * 1000:>8.1f}")
    for n in steps_list:
        cells, row = [], dict(runs[n][0])  # the first seed's row, plus mean and spread over seeds
        for key in KEYS:
            vals = [r[key] for r in runs[n]]
            spread = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{statistics.fmean(vals):.3f}±{spread:.3f}")
            row.update({f"{key}_mean": statistics.fmean(vals), f"{key}_spread": spread})
        table[f"student {n}"] = row
        print(f"{'student':<14}{n:>6}{cells[0]:>17} {cells[1]:>15} {cells[2]:>15}{runs[n][0]['latency_s'] * 1000:>8.1f}")
    print("\ncurve (first seed): steps -> adherence / exact / Frechet")
    for n, by in curve.items():
        print(f"  {n}-step student: " + ", ".join(f"{at}: {r['adherence']:.3f}/{r['exact']:.3f}/{r['frechet_analyser']:.2f}"
                                              for at, r in sorted(by.items())))
    with open(os.path.join(out, "fidelity.json"), "w", encoding="utf-8") as f:
        json.dump(dict(args=vars(args), table=table, seeds={str(n): v for n, v in runs.items()},
                       curve={str(n): {str(a): r for a, r in by.items()} for n, by in curve.items()},
                       minutes=(time.monotonic() - t0) / 60), f, indent=1)
    print(f"\n{(time.monotonic() - t0) / 60:.1f} min; {os.path.join(out, 'fidelity.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
