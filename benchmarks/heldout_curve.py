"""Students against the teacher on captions no model trained on, along training: the quality curve.

    python benchmarks/heldout_curve.py --runs runs/small-s4-seed0,runs/small-s4-seed1 --output out/curve
    python benchmarks/heldout_curve.py --runs R --output O --teacher_steps 50,4 --num_images 450 --every 2

For every checkpoint of every run (``--every`` k: each k-th, and always the last) the student samples at
the step count it was trained for, and the teacher samples at ``--teacher_steps``, all at the dump's
guidance (read from the run: matched), on two caption sets of ``--num_images`` lines each:

    heldout   the 45 held-out scenes of the shapes world (``teachers.shapes.world.heldout_scenes``),
              cycled: no student dump of the training split holds them (the shapes-sd15 teacher never saw
              them either; the shapes teacher did)
    seen      the 405 training scenes, cycled: the captions the students were distilled on

Image i of a row has noise seed i (``kit.evaluate_row``; rows cached by their settings). Prints a table
(mean ± standard error over images; with several runs, the mean and spread over the runs' seeds) and
writes ``curve.json`` and ``curve.png`` (adherence against optimizer steps; the teacher's rows as lines).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from diffusion_distill import kit


def plot(table: dict, teacher: dict, path: str, steps: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, split in zip(axes, ("heldout", "seen")):
        for run, points in table.items():
            pts = sorted((step, row["adherence"], row["adherence_se"]) for (sp, step), row in points.items() if sp == split)
            if pts:
                xs, ys, se = zip(*pts)
                ax.errorbar(xs, ys, yerr=se, marker="o", ms=3, capsize=2, label=f"{os.path.basename(run)} ({steps[run]} steps)")
        for t_steps, rows in sorted(teacher.items(), key=lambda kv: -kv[0]):
            row = rows.get(split)
            if row:
                ax.axhline(row["adherence"], ls="--", lw=1, color="k" if t_steps >= 50 else "grey")
                ax.text(ax.get_xlim()[0], row["adherence"], f" teacher {t_steps} steps", va="bottom", fontsize=7)
        ax.set_title(f"{split} captions")
        ax.set_xlabel("optimizer steps")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("adherence (analyser, 5 attributes)")
    axes[0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _spread(values: list[float]) -> float:
    """Sample standard deviation over training seeds (0 for one seed)."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(last: dict, steps: dict, teacher: dict) -> dict:
    """{student steps: {"seeds": k, split: mean over the runs' last checkpoints of adherence, exact, Frechet and
    the per-image standard error, with the spread (sample standard deviation; 0 for one seed) over runs}}."""
    out: dict = {}
    for n in sorted(set(steps.values()), reverse=True):
        group = [last[run] for run in last if steps[run] == n]
        row: dict = {"seeds": len(group)}
        for split in group[0]:
            vals = {k: [g[split][k] for g in group] for k in ("adherence", "adherence_se", "exact", "frechet_analyser")}
            row[split] = {k: statistics.fmean(v) for k, v in vals.items()}
            row[split].update(adherence_sd=_spread(vals["adherence"]), frechet_sd=_spread(vals["frechet_analyser"]))
            if n in teacher and split in teacher[n]:
                row[split]["teacher_adherence"] = teacher[n][split]["adherence"]
        out[n] = row
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", required=True, help="comma-separated run folders (distill train outputs)")
    p.add_argument("--output", required=True)
    p.add_argument("--teacher_steps", default="50,4", help="teacher DDIM step counts (at the dump's guidance)")
    p.add_argument("--num_images", type=int, default=450)
    p.add_argument("--every", type=int, default=1, help="evaluate every k-th checkpoint (and the last)")
    args = p.parse_args(argv)
    from students.distill.inference import guidance_for
    from students.training.checkpoint import checkpoints
    from students.training.runs import read_run
    from teachers.shapes import world
    from teachers.shapes.analyser import load_analyser

    runs = [r for r in args.runs.split(",") if r]
    os.makedirs(args.output, exist_ok=True)
    captions = {split: world.write_cycled_captions(os.path.join(args.output, f"captions_{split}.txt"), args.num_images,
                                                   "heldout" if split == "heldout" else "train")
                for split in ("heldout", "seen")}
    infos = {run: read_run(run) for run in runs}
    info = infos[runs[0]]
    guidance, teacher_spec = guidance_for(info.dataset), info.teacher
    steps = {run: int(i.recipe["student_steps"]) for run, i in infos.items()}  # each run at its own step count
    for run, i in infos.items():
        if guidance_for(i.dataset) != guidance or i.teacher != teacher_spec:
            p.error(f"{run}: another teacher or guidance than {runs[0]} (rows must be matched)")
    analyser, t0 = load_analyser(), time.monotonic()
    teacher_steps = tuple(int(s) for s in args.teacher_steps.split(","))
    teacher: dict = {}
    for split, path in captions.items():
        res = kit.evaluate_row(os.path.join(args.output, f"teacher-{split}"), captions=path, num_images=args.num_images,
                               guidance_scale=guidance, teacher_steps=teacher_steps, teacher=teacher_spec, analyser=analyser)
        for s, row in res["teacher"].items():
            teacher.setdefault(int(s), {})[split] = row
    table: dict = {}
    for run in runs:
        found = checkpoints(run)
        chosen = [c for i, c in enumerate(found) if (len(found) - 1 - i) % args.every == 0]
        for ckpt in chosen:
            step = int(os.path.basename(ckpt).split("-")[1])
            for split, path in captions.items():
                res = kit.evaluate_row(os.path.join(args.output, os.path.basename(run), f"{split}-{step:07d}"),
                                       captions=path, num_images=args.num_images, guidance_scale=guidance, student=ckpt,
                                       student_steps=(steps[run],), teacher=teacher_spec, analyser=analyser)
                table.setdefault(run, {})[(split, step)] = next(iter(res["student"].values()))
            print(f"{run} step {step}: " + ", ".join(
                f"{sp} {table[run][(sp, step)]['adherence']:.4f}" for sp in captions), flush=True)
    print(f"\n{teacher_spec} teacher, guidance {guidance:g} (the dump's), {args.num_images} images per row; "
          "mean ± standard error over images")
    print(f"{'model':<28}{'steps':>6}{'opt. steps':>11}  {'held-out adherence':>20}  {'seen adherence':>18}  "
          f"{'held-out Frechet':>16}")
    for s, rows in sorted(teacher.items(), key=lambda kv: -kv[0]):
        h, sn = rows["heldout"], rows["seen"]
        print(f"{'teacher':<28}{s:>6}{'':>11}  {h['adherence']:.4f}±{h['adherence_se']:.4f}      "
              f"{sn['adherence']:.4f}±{sn['adherence_se']:.4f}  {h['frechet_analyser']:>16.1f}")
    last = {}
    for run, points in table.items():
        for (split, step), row in sorted(points.items(), key=lambda kv: kv[0][1]):
            if split == "heldout":
                sn = points[("seen", step)]
                print(f"{os.path.basename(run):<28}{steps[run]:>6}{step:>11}  {row['adherence']:.4f}±{row['adherence_se']:.4f}"
                      f"      {sn['adherence']:.4f}±{sn['adherence_se']:.4f}  {row['frechet_analyser']:>16.1f}")
        final = max(step for _, step in points)
        last[run] = {split: points[(split, final)] for split in captions}
    summary = summarise(last, steps, teacher)
    for n, row in summary.items():
        print(f"last checkpoints at {n} steps, {row['seeds']} training seed(s): " + "; ".join(
            f"{split} adherence {row[split]['adherence']:.4f} ± {row[split]['adherence_sd']:.4f} (seeds), "
            f"mean SE {row[split]['adherence_se']:.4f}, exact {row[split]['exact']:.4f}, "
            f"Frechet {row[split]['frechet_analyser']:.1f} ± {row[split]['frechet_sd']:.1f}" for split in captions))
    plot(table, teacher, os.path.join(args.output, "curve.png"), steps)
    with open(os.path.join(args.output, "curve.json"), "w", encoding="utf-8") as f:
        json.dump(dict(args=vars(args), guidance=guidance, teacher={str(k): v for k, v in teacher.items()},
                       runs={run: {f"{sp}/{st}": row for (sp, st), row in pts.items()} for run, pts in table.items()},
                       student_steps=steps, summary={str(n): row for n, row in summary.items()},
                       minutes=(time.monotonic() - t0) / 60), f, indent=1)
    print(f"{(time.monotonic() - t0) / 60:.1f} min; {os.path.join(args.output, 'curve.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
