"""Fidelity of step-distilled students against the shapes teacher at 50, 8, 4 and 1 steps.

    python benchmarks/fidelity.py --output out/fidelity [--train_steps 1500] [--seeds_per_prompt 4] [--eval_images 240]

Through the whole pipeline: every scene of the shapes world as a caption -> the curation job ->
the teacher dump (40 DDIM steps, trailing, all steps recorded) -> one student per step count
(``snapfusion_step`` recipe, the ``shapes`` preset) -> export -> evaluation of the teacher at
50/8/4/1 steps and each exported student at its own step count, on held-out captions with the same
seeds for every row. Prints one table (adherence, exact, analyser Frechet distance, latency), like
the papers' tables, and writes ``fidelity.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True)
    p.add_argument("--train_steps", type=int, default=1500)
    p.add_argument("--seeds_per_prompt", type=int, default=4)
    p.add_argument("--eval_images", type=int, default=240)
    p.add_argument("--student_steps", default="8,4,1")
    args = p.parse_args(argv)

    from diffusion_distill import workflow
    from students.evaluate import EvalConfig, evaluate
    from students.export import export
    from teachers.shapes import world
    from teachers.shapes.analyser import Adherence, AnalyserFrechet, load_analyser

    out = args.output
    os.makedirs(out, exist_ok=True)
    captions = os.path.join(out, "captions.txt")
    with open(captions, "w", encoding="utf-8") as f:
        f.write("\n".join(world.caption(s) for s in world.all_scenes()) + "\n")
    t0 = time.monotonic()
    if not os.path.isfile(os.path.join(out, "curate", "manifest.parquet")):
        workflow.curate(captions, os.path.join(out, "curate"))
    if not os.path.isfile(os.path.join(out, "dump", "dataset.json")):
        workflow.dump(os.path.join(out, "curate", "manifest.parquet"), os.path.join(out, "dump"),
                      seeds_per_prompt=args.seeds_per_prompt, save_images=False)
    steps_list = [int(s) for s in args.student_steps.split(",")]
    students = {}
    for n in steps_list:
        run_dir, folder = os.path.join(out, f"train-{n}"), os.path.join(out, f"student-{n}")
        if not os.path.isdir(folder):
            workflow.train(os.path.join(out, "dump"), run_dir, student_steps=n, max_steps=args.train_steps)
            export(run_dir, folder)
        students[n] = folder
    eval_captions = os.path.join(out, "eval_captions.txt")
    world.write_captions(eval_captions, args.eval_images, seed=12_345)
    analyser = load_analyser()
    table = {}
    teacher_steps = (50, *steps_list)
    for i, n in enumerate(steps_list):
        cfg = EvalConfig(output=os.path.join(out, f"eval-{n}"), captions=eval_captions, student=students[n],
                         teacher=workflow.TEACHER, num_images=args.eval_images,
                         teacher_steps=teacher_steps if i == 0 else (), student_steps=(n,), metrics=(),
                         batch_size=60, grid_images=8, latency_repeats=3)
        res = evaluate(cfg, extra_metrics=(Adherence(analyser), AnalyserFrechet(analyser)))["results"]
        for model, by_steps in res.items():
            for steps, row in by_steps.items():
                table[f"{model} {steps}"] = row
    keys = [f"teacher {s}" for s in teacher_steps] + [f"student {n}" for n in steps_list]
    print(f"\n{'model':<14}{'steps':>6}{'adherence':>11}{'exact':>8}{'Frechet':>9}{'ms/img':>8}")
    for k in keys:
        r = table[k]
        model, steps = k.split()
        print(f"{model:<14}{steps:>6}{r['adherence']:>11.3f}{r['exact']:>8.3f}{r['frechet_analyser']:>9.2f}"
              f"{r['latency_s'] * 1000:>8.1f}")
    with open(os.path.join(out, "fidelity.json"), "w", encoding="utf-8") as f:
        json.dump(dict(args=vars(args), table=table, minutes=(time.monotonic() - t0) / 60), f, indent=1)
    print(f"\n{(time.monotonic() - t0) / 60:.1f} min; {os.path.join(out, 'fidelity.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
