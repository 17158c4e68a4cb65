"""SnapFusion-style ablation of step distillation on the ``shapes`` teacher: which start, which loss,
which schedule of teachers gives the best few-step student.

    python benchmarks/ablation.py --output out/ablation [--budget 900] [--seeds 3] [--eval_images 180]
    python benchmarks/ablation.py --output out/ablation_quick --quick       # minutes, not hours

One dump of the teacher (``--teacher_steps`` DDIM steps, trailing, every step recorded; 32 so that
progressive rounds halve exactly down to 1), then, for each training seed, these student rows
(the ``shapes`` preset unless said otherwise), at 8, 4 and 1 sampling steps:

- ``direct (mixed loss)``: ``snapfusion_step`` as shipped: step distillation + the CFG-aware output
  term with p = 0.1 (SnapFusion's mixed loss) + the task loss at dynamic gamma;
- ``direct (vanilla loss)``: the same with p = 0 (output KD on the conditional branch only);
- ``direct (CFG-aware loss)``: the same with p = 1;
- ``teacher-initialised``: the teacher's own UNet cut ``mid_only`` (``--init_from_teacher``) starting
  from its weights, the mixed loss, at ``--init_lr`` (fine-tuning);
- ``teacher-initialised, v-prediction`` (``init_v``): the same start trained to predict v instead of the
  teacher's epsilon (no output KD term, which needs the teacher's parameterisation): at t ~ T,
  x0 = (z - sigma eps) / alpha multiplies an eps error by sigma / alpha (about 15 at SD's last
  timestep), x0 = alpha z - sigma v by sigma (about 1);
- ``snapgen_adv`` / ``ufogen (teacher-initialised)`` (``adv``): the adversarial recipes from the same start
  (``adv_v``: predicting v, their output KD term off; ``adv_real``: the discriminator's "real" side is real
  images of the captions, the shapes world's rendered truth VAE-encoded by the dump (``--real_images``,
  ``distill train --adv_real image``), instead of the teacher's samples; ``--adv_warmup``, ``--disc_layers``
  and ``--adv_weight`` vary every adversarial family);
- ``progressive (teacher-initialised)``: Salimans & Ho rounds 32 -> 16 -> 8 -> 4 -> 2 -> 1
  (``--recipe progressive``), round 1's student a copy of the teacher (cut ``mid_only``, as Algorithm 2
  starts every student from its teacher), ``--budget`` steps per round (its budget column counts every
  round up to that row);
- ``two-stage chain`` (8 steps only): the teacher-architecture student step-distilled to 16 steps
  (``--init_from_teacher full``), exported, dumped as the next teacher at its 16 steps, and the
  efficient 8-step student distilled from that dump (SnapFusion's 50 -> 16 -> 8 chain, here 32 -> 16 -> 8).

Every row is evaluated on the same held-out captions with the same image seeds (``students.evaluation.evaluate``,
the analyser's adherence, exact and Frechet distance); the teacher rows at 32/8/4/1 steps once.
Rows report the mean and the spread (sample standard deviation) over training seeds. The direct
8-step row (``--curve_steps``; the teacher-initialised one without direct rows) is also evaluated at every
checkpoint: the curve of adherence against training steps
shows whether a gap is under-training (still rising) or a ceiling (flat).

Writes ``ablation.json``, ``ablation.md`` (the table) and ``report.html`` (table + curve) in ``--output``.
Re-running resumes: finished trainings and evaluations are kept.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from diffusion_distill import kit

STEPS = (8, 4, 1)
LOSSES = {"vanilla": 0.0, "CFG-aware": 1.0, "mixed": 0.1}  # SnapFusion fig. (c): p of the CFG-aware term
ADVERSARIAL_FAMILIES = {"adv": (None, "teacher"), "adv_v": ("v_prediction", "teacher"), "adv_real": (None, "image")}


def train_row(args, data, out, *, steps, seed, recipe="snapfusion_step", guidance_prob=None, init=None, progressive_from=0,
              budget=None, prediction_type=None, adv_real="teacher"):
    """One training run of this benchmark (``kit.train_row``; skipped when its last checkpoint exists) -> its run folder.

    ``args``: this script's flags (``batch_size``, ``lr``, ``init_lr``, ``budget``, ``curve_points``, and for the
    adversarial recipes ``adv_weight``, ``adv_warmup``, ``disc_layers``). Teacher-initialised runs (``init``)
    train at ``--init_lr``: they start at the teacher's weights, and the from-scratch learning rate pulls them
    away from it (fine-tuning, not training)."""
    adv = (dict(adv_weight=args.adv_weight, adv_warmup=args.adv_warmup, disc_layers=args.disc_layers, adv_real=adv_real)
           if recipe in kit.ADVERSARIAL_RECIPES else {})
    return kit.train_row(data, out, student_steps=steps, max_steps=budget or args.budget, curve_points=args.curve_points,
                         guidance_prob=guidance_prob, init_from_teacher=init, recipe=recipe,
                         progressive_from=progressive_from, batch_size=args.batch_size,
                         lr=args.init_lr if init else args.lr, seed=seed, prediction_type=prediction_type or "", **adv)


def _evaluate(args, student, out, steps, analyser, captions, teacher_steps=()):
    """Every row at the dump's guidance (the teacher's calibrated weight), teacher-only rows included."""
    return kit.evaluate_row(out, captions=captions, num_images=args.eval_images, guidance_scale=kit.shapes_guidance(),
                            student=student, student_steps=(steps,) if student else (), teacher_steps=teacher_steps,
                            analyser=analyser)


def _dump(args, out, teacher, steps, prompts, real_images=False):
    if not os.path.isfile(os.path.join(out, "dataset.json")):
        kit.dump(prompts, out, teacher=teacher, steps=steps, seeds_per_prompt=args.seeds_per_prompt, save_images=False,
                 real_images=real_images)
    return out


def run_seed(args, seed: int, data: str, analyser, captions, results: dict) -> None:
    """Every student row for one training seed; results[row][steps] -> list of metric dicts (+ budget)."""
    out = os.path.join(args.output, f"seed-{seed}")

    def record(row, steps, student, budget):
        metrics = kit.row_metrics(_evaluate(args, student, os.path.join(out, "eval", f"{row}-{steps}".replace(" ", "_"), ), steps,
                                 analyser, captions))
        stats = kit.run_stats(student) if os.path.isdir(student) else {}
        results.setdefault(row, {}).setdefault(str(steps), []).append(dict(metrics, **stats, budget=budget, seed=seed))
        _save(args, results)

    init_dir = "init" if args.init_lr == 2e-3 else f"init-lr{args.init_lr:g}"  # the first quick run's folders: 2e-3
    for steps in args.steps:
        if "direct" in args.rows:
            for loss, p in LOSSES.items():
                run = train_row(args, data, os.path.join(out, f"direct-{loss}-{steps}"), steps=steps, seed=seed,
                                guidance_prob=p)
                record(f"direct ({loss} loss)", steps, run, args.budget)
        if "init" in args.rows:
            run = train_row(args, data, os.path.join(out, f"{init_dir}-{steps}"), steps=steps, seed=seed, init="mid_only")
            record(f"teacher-initialised (lr {args.init_lr:g})", steps, run, args.budget)
        if "init_v" in args.rows:  # x0 = alpha z - sigma v: at t ~ T an eps error is not amplified by sigma/alpha
            run = train_row(args, data, os.path.join(out, f"{init_dir}-v-{steps}"), steps=steps, seed=seed, init="mid_only",
                            prediction_type="v_prediction")
            record(f"teacher-initialised, v-prediction (lr {args.init_lr:g})", steps, run, args.budget)
        for family, (param, real) in ADVERSARIAL_FAMILIES.items():  # LADD / UFOGen start from the teacher too
            if family not in args.rows:
                continue
            tag, label = kit.adversarial_variant(args)
            tag += ("-v" if param else "") + ("-real" if real == "image" else "")
            label += (", v-prediction" if param else "") + (", real images as real" if real == "image" else "")
            for recipe in kit.ADVERSARIAL[steps]:
                run = train_row(args, data, os.path.join(out, f"{recipe}-{init_dir}{tag}-{steps}"), steps=steps,
                                seed=seed, init="mid_only", recipe=recipe, prediction_type=param, adv_real=real)
                record(f"{recipe} (teacher-initialised{label})", steps, run, args.budget)
    if "progressive" in args.rows:
        _progressive(args, data, out, seed, record)
    if "chain" in args.rows:
        _chain(args, data, out, seed, record)
    if seed == args.first_seed and {"direct", "init"} & set(args.rows):  # the curve: one run at each checkpoint
        from students.training.checkpoint import checkpoints

        steps = args.curve_steps or max(args.steps)
        curve_run = f"direct-mixed-{steps}" if "direct" in args.rows else f"{init_dir}-{steps}"
        results["_curve_run"] = curve_run
        for ckpt in checkpoints(os.path.join(out, curve_run)):
            at = int(ckpt.rsplit("-", 1)[1])
            res = kit.row_metrics(_evaluate(args, ckpt, os.path.join(out, "eval", f"curve-{curve_run}-{at}"), steps, analyser, captions))
            results.setdefault("_curve", {})[str(at)] = res
        _save(args, results)


def _progressive(args, data, out, seed, record):
    """Salimans & Ho's Algorithm 2 starts each round's student as a copy of its teacher: round 1's
    teacher is the dump's, so round 1 starts from the teacher's weights (the ``mid_only`` cut, as the
    teacher-initialised direct row) at ``--init_lr``."""
    init_dir = "init" if args.init_lr == 2e-3 else f"init-lr{args.init_lr:g}"
    prog = train_row(args, data, os.path.join(out, f"progressive-{init_dir}"), steps=min(args.steps), seed=seed,
                     recipe="progressive", progressive_from=args.teacher_steps, init="mid_only")
    from students.distill.progressive import rounds

    done = rounds(args.teacher_steps, min(args.steps))
    for steps in args.steps:
        record("progressive (teacher-initialised)", steps, os.path.join(prog, f"round-{steps:02d}"),
               args.budget * (done.index(steps) + 1))


def _chain(args, data, out, seed, record):
    from students.export.folder import export

    if 8 in args.steps and args.teacher_steps % 16 == 0:  # the two-stage chain: teacher arch at 16 -> export -> 8
        stage1 = train_row(args, data, os.path.join(out, "chain-16"), steps=16, seed=seed, init="full")
        folder = os.path.join(out, "chain-16-export")
        if not os.path.isdir(folder):
            export(stage1, folder)
        prompts = os.path.join(args.output, "chain_prompts.txt")
        lines = open(os.path.join(args.output, "prompts.txt"), encoding="utf-8").read().splitlines()
        with open(prompts, "w", encoding="utf-8") as f:
            f.write("\n".join(lines[: args.chain_prompts or None]) + "\n")
        data2 = _dump(args, os.path.join(out, "chain-dump"), folder, 16, prompts)
        run = train_row(args, data2, os.path.join(out, "chain-8"), steps=8, seed=seed)
        record("two-stage chain", 8, run, 2 * args.budget)


def _save(args, results):
    with open(os.path.join(args.output, "ablation.json"), "w", encoding="utf-8") as f:
        json.dump(dict(args=vars(args), results=results), f, indent=1)


def _stat(values):
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else float("nan"))


def table(results: dict, teacher: dict) -> str:
    """The markdown table: mean +- spread over seeds per (row, steps), the seconds per optimizer step (mean
    over the runs this invocation trained) and, for adversarial rows, the discriminator's accuracy."""
    lines = ["| row | steps | train steps | seeds | adherence | exact | Frechet | s/step | D acc real/fake |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, by_steps in teacher.items():
        lines.append(f"| teacher | {name} | - | - | {by_steps['adherence']:.3f} | {by_steps['exact']:.3f} | "
                     f"{by_steps['frechet_analyser']:.2f} | - | - |")
    for row, by_steps in results.items():
        if row.startswith("_"):
            continue
        for steps, runs in sorted(by_steps.items(), key=lambda kv: -int(kv[0])):
            cells = []
            for key, fmt in (("adherence", ".3f"), ("exact", ".3f"), ("frechet_analyser", ".2f")):
                m, s = _stat([r[key] for r in runs])
                cells.append(f"{m:{fmt}} ± {s:{fmt}}")
            timed = [r["step_s"] for r in runs if "step_s" in r]
            cells.append(f"{statistics.fmean(timed):.3f}" if timed else "-")
            acc = [(r["acc_real"], r["acc_fake"]) for r in runs if "acc_real" in r]
            cells.append(f"{statistics.fmean(a for a, _ in acc):.2f} / {statistics.fmean(b for _, b in acc):.2f}"
                         if acc else "-")
            lines.append(f"| {row} | {steps} | {runs[0]['budget']} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(out: str, md: str, curve: dict, curve_run: str = "") -> str:
    import base64
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img = ""
    if curve:
        xs = sorted(int(k) for k in curve)
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.plot(xs, [curve[str(x)]["adherence"] for x in xs], marker="o")
        ax.set_xlabel("training step"), ax.set_ylabel("adherence"), ax.set_title(f"{curve_run}: adherence vs training")
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        img = f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'
    rows = [line.strip("|").split("|") for line in md.strip().splitlines() if not line.startswith("|---")]
    html = "".join("<tr>" + "".join(f"<td>{c.strip()}</td>" for c in r) + "</tr>" for r in rows)
    path = os.path.join(out, "report.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"<html><body><h1>Step-distillation ablation (shapes)</h1><table border=1>{html}</table>{img}</body></html>")
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True)
    p.add_argument("--budget", type=int, default=900, help="optimizer steps per training run (per progressive round)")
    p.add_argument("--seeds", type=int, default=3, help="training seeds per row (mean and spread reported)")
    p.add_argument("--eval_images", type=int, default=180, help="held-out captions (= images per row)")
    p.add_argument("--seeds_per_prompt", type=int, default=4, help="teacher dump: samples per caption")
    p.add_argument("--teacher_steps", type=int, default=32, help="teacher DDIM steps in the dump")
    p.add_argument("--batch_size", type=int, default=64)
    from students.training.train import INIT_LR, SCRATCH_LR

    p.add_argument("--lr", type=float, default=SCRATCH_LR, help="peak learning rate of the from-scratch students")
    p.add_argument("--init_lr", type=float, default=INIT_LR,
                   help="peak learning rate of the teacher-initialised students (fine-tuning; 2e-3 drifts off the teacher)")
    p.add_argument("--adv_weight", type=float, default=-1.0,
                   help="the generator's adversarial weight in the adv rows (-1 = the recipe's: 0.1)")
    p.add_argument("--adv_warmup", type=int, default=0, help="the adversarial rows' --adv_warmup (steps without the "
                   "generator's adversarial term)")
    p.add_argument("--disc_layers", default="", help="the adversarial rows' --disc_layers ('' = the trainer's default)")
    p.add_argument("--rows", default="direct,init,progressive,chain,adv",
                   help="which row families to train and evaluate (adv: snapgen_adv at every step count, ufogen at 2 and 1; "
                        "adv_real: the same with real images as the discriminator's real side, which dumps with --real_images)")
    p.add_argument("--curve_points", type=int, default=4, help="checkpoints evaluated for the curve")
    p.add_argument("--curve_steps", type=int, default=0, help="the student step count whose run is the curve (0 = the most)")
    p.add_argument("--steps", default="8,4,1", help="student step counts")
    p.add_argument("--first_seed", type=int, default=0)
    p.add_argument("--train_prompts", type=int, default=0, help="about this many scene captions, evenly spaced, for the dump (0 = all 450)")
    p.add_argument("--chain_prompts", type=int, default=0, help="captions the 16-step stage dumps (0 = all)")
    p.add_argument("--quick", action="store_true",
                   help="a smaller run: budget 200, 3 seeds, 48 images, batch 16, 1 sample per caption (all 450 "
                        "scene captions), 60 captions in the chain's second dump "
                        "(defaults: flags given explicitly override them)")
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--quick" in argv:  # the quick run's sizes are defaults: flags given explicitly still win
        p.set_defaults(budget=200, seeds=3, eval_images=48, seeds_per_prompt=1, batch_size=16, curve_points=4,
                       chain_prompts=60, train_prompts=0)
    args = p.parse_args(argv)
    args.steps = tuple(int(s) for s in args.steps.split(","))
    args.rows = tuple(r.strip() for r in args.rows.split(",") if r.strip())
    families = ("direct", "init", "init_v", "progressive", "chain", *ADVERSARIAL_FAMILIES)
    unknown = set(args.rows) - set(families)
    if unknown:
        p.error(f"--rows: unknown row families {sorted(unknown)} (choose from {', '.join(families)})")

    from teachers.shapes import world
    from teachers.shapes.analyser import load_analyser

    os.makedirs(args.output, exist_ok=True)
    t0 = time.monotonic()
    prompts = os.path.join(args.output, "prompts.txt")
    with open(prompts, "w", encoding="utf-8") as f:
        scenes = list(world.all_scenes())
        f.write("\n".join(world.caption(s) for s in scenes[:: max(1, len(scenes) // args.train_prompts)
                                                            if args.train_prompts else 1]) + "\n")
    if not os.path.isfile(os.path.join(args.output, "curate", "manifest.parquet")):
        kit.curate(prompts, os.path.join(args.output, "curate"))
    data = _dump(args, os.path.join(args.output, "dump"), kit.TEACHER, args.teacher_steps,
                 os.path.join(args.output, "curate", "manifest.parquet"), real_images="adv_real" in args.rows)
    captions = os.path.join(args.output, "eval_captions.txt")
    world.write_captions(captions, args.eval_images, seed=12_345)  # held out: the same for every row
    analyser = load_analyser()
    res = _evaluate(args, None, os.path.join(args.output, "eval-teacher"), 0, analyser, captions,
                    teacher_steps=(args.teacher_steps, *args.steps))
    teacher = {str(s): {k: float(v[k]) for k in ("adherence", "exact", "frechet_analyser")} for s, v in res["teacher"].items()}
    # the papers' reference, the teacher at 50 steps, and any step count a later invocation added
    missing = tuple(s for s in (50, *args.steps) if str(s) not in teacher)
    if missing:
        extra = _evaluate(args, None, os.path.join(args.output, "eval-teacher-" + "-".join(map(str, missing))), 0,
                          analyser, captions, teacher_steps=missing)
        teacher.update({str(s): {k: float(v[k]) for k in ("adherence", "exact", "frechet_analyser")}
                        for s, v in extra["teacher"].items()})
    results: dict = {"_teacher": teacher}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        run_seed(args, seed, data, analyser, captions, results)
    md = table({k: v for k, v in results.items() if k != "_teacher"}, teacher)
    with open(os.path.join(args.output, "ablation.md"), "w", encoding="utf-8") as f:
        f.write(md)
    write_report(args.output, md, results.get("_curve", {}), results.get("_curve_run", ""))
    print(md)
    print(f"{(time.monotonic() - t0) / 60:.1f} min; {os.path.join(args.output, 'ablation.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
