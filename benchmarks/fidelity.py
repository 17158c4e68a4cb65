"""Fidelity of step-distilled students against the shapes teacher at 50, 8, 4 and 1 steps.

    python benchmarks/fidelity.py --output out/fidelity [--budget 1500] [--seeds 3] [--seeds_per_prompt 4] [--eval_images 240]
        [--init_from_teacher mid_only] [--curve_points 4] [--recipes snapfusion_step,snapgen_adv,ufogen] [--adv_real image]
    python benchmarks/fidelity.py --output out/fidelity_quick --quick      # minutes: a small run of every row

Through the whole pipeline: every scene of the shapes world as a caption -> the curation job ->
the teacher dump (40 DDIM steps, trailing, all steps recorded) -> one student per step count and
training seed (``snapfusion_step`` recipe, the ``shapes`` preset, or with ``--init_from_teacher`` the
teacher's UNet cut and started from its weights) -> export -> evaluation of the teacher at 50/8/4/1
steps and each exported student at its own step count, on held-out captions with the same image
seeds for every row. Student rows are the mean and spread (sample standard deviation) over
``--seeds`` training seeds. The curve: the first seed's students evaluated at ``--curve_points``
checkpoints, adherence/exact/Frechet against training steps (under-training or a ceiling).

Beside each regression student (``snapfusion_step``), the adversarial students of the same start,
budget and seeds (``--recipes``; issue 13): ``snapgen_adv`` at every step count and ``ufogen`` at 2 and 1
steps, their discriminator's "real" side the teacher's final latents or, with ``--adv_real image``, real
images of the captions (the dump then stores them VAE-encoded: ``--real_images``). Every row trains
through ``benchmarks/ablation.py``'s ``train_row``, the ablation's own runs.
Prints the table and the curve and writes ``fidelity.json``. The ablation table is ``benchmarks/ablation.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from diffusion_distill import kit

KEYS = ("adherence", "exact", "frechet_analyser")


REGRESSION = "snapfusion_step"


def _rows(args, steps_list) -> list[tuple[str, int]]:
    """(recipe, student steps) of every student row, regression first at each step count."""
    return [(recipe, n) for n in steps_list for recipe in args.recipes
            if recipe == REGRESSION or recipe in kit.ADVERSARIAL.get(n, ())]


def _train(args, data, out, recipe, steps, seed):
    """A row's training run (``kit.train_row``; this script has one ``--lr``)."""
    adv = (dict(adv_weight=args.adv_weight, adv_warmup=args.adv_warmup, disc_layers=args.disc_layers, adv_real=args.adv_real)
           if recipe in kit.ADVERSARIAL_RECIPES else {})
    kit.train_row(data, out, student_steps=steps, max_steps=args.budget, curve_points=args.curve_points, recipe=recipe,
                  init_from_teacher=args.init_from_teacher, batch_size=args.batch_size, lr=args.lr, seed=seed, **adv)


def _eval(args, student, out, captions, analyser, steps, teacher_steps=()):
    """Every row at the dump's guidance (the teacher's calibrated weight), teacher-only rows included."""
    return kit.evaluate_row(out, captions=captions, num_images=args.eval_images, guidance_scale=kit.shapes_guidance(),
                            student=student, student_steps=(steps,) if student else (), teacher_steps=teacher_steps,
                            analyser=analyser, grid_images=8, latency_repeats=3)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True)
    p.add_argument("--budget", "--train_steps", dest="budget", type=int, default=1500, help="optimizer steps per student")
    p.add_argument("--seeds", type=int, default=1, help="training seeds per student row (mean and spread)")
    p.add_argument("--curve_points", type=int, default=4, help="checkpoints of the first seed evaluated for the curve")
    p.add_argument("--init_from_teacher", default=None, help="a students.models.teacher_init cut (default: the shapes preset)")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: kit.SCRATCH_LR from scratch, INIT_LR teacher-initialised)")
    p.add_argument("--seeds_per_prompt", type=int, default=4)
    p.add_argument("--eval_images", type=int, default=240)
    p.add_argument("--student_steps", default="8,4,1")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--recipes", default="snapfusion_step,snapgen_adv,ufogen",
                   help="student rows: snapfusion_step (regression), snapgen_adv (every step count), ufogen (2 and 1 steps)")
    p.add_argument("--adv_real", default="teacher", choices=("teacher", "image"),
                   help="the adversarial rows' real side: the teacher's final latents, or real images (dumps --real_images)")
    p.add_argument("--adv_weight", type=float, default=-1.0, help="the adversarial rows' --adv_weight (-1 = the recipe's)")
    p.add_argument("--adv_warmup", type=int, default=0, help="the adversarial rows' --adv_warmup")
    p.add_argument("--disc_layers", default="", help="the adversarial rows' --disc_layers")
    p.add_argument("--quick", action="store_true", help="a small run of every row: budget 100, batch 16, 1 sample "
                   "per caption, 48 held-out images, 4/2/1 steps, curve of 2 points (flags given explicitly win)")
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--quick" in argv:
        p.set_defaults(budget=100, batch_size=16, seeds_per_prompt=1, eval_images=48, student_steps="4,2,1", curve_points=2)
    args = p.parse_args(argv)
    args.recipes = tuple(r.strip() for r in args.recipes.split(",") if r.strip())
    unknown = set(args.recipes) - {REGRESSION, *kit.ADVERSARIAL_RECIPES}
    if unknown:
        p.error(f"--recipes: unknown {sorted(unknown)} (choose from {REGRESSION}, {', '.join(kit.ADVERSARIAL_RECIPES)})")
    if args.lr is None:
        from students.training.train import INIT_LR, SCRATCH_LR

        args.lr = INIT_LR if args.init_from_teacher else SCRATCH_LR
    args.init_lr = args.lr  # train_row's rate for teacher-initialised rows: this script has one --lr

    from students.training.checkpoint import checkpoints
    from students.export.folder import export
    from teachers.shapes import world
    from teachers.shapes.analyser import load_analyser

    out = args.output
    os.makedirs(out, exist_ok=True)
    captions = os.path.join(out, "captions.txt")
    with open(captions, "w", encoding="utf-8") as f:
        f.write("\n".join(world.caption(s) for s in world.all_scenes()) + "\n")
    t0 = time.monotonic()
    if not os.path.isfile(os.path.join(out, "curate", "manifest.parquet")):
        kit.curate(captions, os.path.join(out, "curate"))
    data = os.path.join(out, "dump")
    if not os.path.isfile(os.path.join(data, "dataset.json")):
        kit.dump(os.path.join(out, "curate", "manifest.parquet"), data, seeds_per_prompt=args.seeds_per_prompt,
                      save_images=False, real_images=args.adv_real == "image")
    steps_list = [int(s) for s in args.student_steps.split(",")]
    eval_captions = os.path.join(out, "eval_captions.txt")
    world.write_captions(eval_captions, args.eval_images, seed=12_345)
    analyser = load_analyser()
    teacher_steps = (50, *steps_list)
    table = {f"{m} {s}": r for m, by in _eval(args, None, os.path.join(out, "eval-teacher"), eval_captions, analyser, 0,
                                              teacher_steps).items() for s, r in by.items()}
    runs: dict[tuple[str, int], list[dict]] = {}
    curve: dict[int, dict[int, dict]] = {}
    variant = kit.adversarial_variant(args)[0] + ("-real" if args.adv_real == "image" else "")
    for seed in range(args.seeds):
        for recipe, n in _rows(args, steps_list):
            # the regression rows keep the folder names of the runs before adversarial rows existed
            name = f"{n}" if recipe == REGRESSION else f"{recipe}{variant}-{n}"
            suffix = name if seed == 0 else f"{name}-seed{seed}"
            run_dir, folder = os.path.join(out, f"train-{suffix}"), os.path.join(out, f"student-{suffix}")
            _train(args, data, run_dir, recipe, n, seed)
            if not os.path.isdir(folder):
                export(run_dir, folder)
            res = _eval(args, folder, os.path.join(out, f"eval-{suffix}"), eval_captions, analyser, n)
            runs.setdefault((recipe, n), []).append(dict(next(iter(res["student"].values())), **kit.run_stats(run_dir)))
            if seed == 0 and recipe == REGRESSION:
                for ckpt in checkpoints(run_dir)[:-1]:  # the last one is the exported student's row
                    at = int(ckpt.rsplit("-", 1)[1])
                    r = _eval(args, ckpt, os.path.join(out, f"eval-{n}-at-{at}"), eval_captions, analyser, n)
                    curve.setdefault(n, {})[at] = next(iter(r["student"].values()))
                curve.setdefault(n, {})[args.budget] = runs[(recipe, n)][0]
    print(f"\n{'model':<16}{'steps':>6}{'adherence':>17} {'exact':>15} {'Frechet':>15}{'ms/img':>8}{'D acc real/fake':>17}")
    for s in teacher_steps:
        r = table[f"teacher {s}"]
        print(f"{'teacher':<16}{s:>6}{r['adherence']:>17.3f} {r['exact']:>15.3f} {r['frechet_analyser']:>15.2f}"
              f"{r['latency_s'] * 1000:>8.1f}")
    for (recipe, n), seeds in runs.items():
        cells, row = [], dict(seeds[0])  # the first seed's row, plus mean and spread over seeds
        for key in KEYS:
            vals = [r[key] for r in seeds]
            spread = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{statistics.fmean(vals):.3f}±{spread:.3f}")
            row.update({f"{key}_mean": statistics.fmean(vals), f"{key}_spread": spread})
        label = recipe if recipe == REGRESSION else recipe + variant
        table[f"{'student' if recipe == REGRESSION else label} {n}"] = row  # "student N": the regression row, as before
        acc = [(r["acc_real"], r["acc_fake"]) for r in seeds if "acc_real" in r]
        acc_cell = f"{statistics.fmean(a for a, _ in acc):.2f} / {statistics.fmean(b for _, b in acc):.2f}" if acc else "-"
        print(f"{label:<16}{n:>6}{cells[0]:>17} {cells[1]:>15} {cells[2]:>15}{seeds[0]['latency_s'] * 1000:>8.1f}{acc_cell:>17}")
    print("\ncurve (first seed): steps -> adherence / exact / Frechet")
    for n, by in curve.items():
        print(f"  {n}-step student: " + ", ".join(f"{at}: {r['adherence']:.3f}/{r['exact']:.3f}/{r['frechet_analyser']:.2f}"
                                              for at, r in sorted(by.items())))
    with open(os.path.join(out, "fidelity.json"), "w", encoding="utf-8") as f:
        json.dump(dict(args=vars(args), table=table, seeds={f"{r} {n}": v for (r, n), v in runs.items()},
                       curve={str(n): {str(a): r for a, r in by.items()} for n, by in curve.items()},
                       minutes=(time.monotonic() - t0) / 60), f, indent=1)
    print(f"\n{(time.monotonic() - t0) / 60:.1f} min; {os.path.join(out, 'fidelity.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
