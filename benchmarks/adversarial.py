"""Adversarial against regression-only step distillation on the shapes teacher, at the same budget.

    python benchmarks/adversarial.py --output out/adversarial [--train_steps 900] [--student_steps 2,1]
    python benchmarks/adversarial.py --output out/adversarial_quick --quick

The same pipeline as ``benchmarks/fidelity.py`` (scene captions -> curation job -> teacher dump, 40
trailing DDIM steps, all recorded), then for each student step count one student per recipe:
``snapfusion_step`` (regression only), ``snapgen_adv`` (the same terms + the LADD hinge term on the
teacher-feature discriminator) and ``ufogen`` (diffusion-GAN on the posterior sample + reconstruction),
each with the same steps, batch and learning rate -> export -> evaluation with the shapes analyser
(adherence, exact, analyser Frechet) on held-out captions with the same seeds for every row, beside
the teacher at 50 steps and at each student step count. Also reports each run's training step time
against the regression run's (the discriminator's cost) and the discriminator's accuracy on real and
fake inputs over the last quarter of training (a collapse shows as both near 1 or real near 0).
Writes ``adversarial.json``. ``--quick``: 120 captions, 60 steps, 60 eval images (minutes, a smoke run).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RECIPES = ("snapfusion_step", "snapgen_adv", "ufogen")


def train_student(dump: str, run_dir: str, *, recipe: str, student_steps: int, max_steps: int, batch_size: int,
                  lr: float, adv_warmup: int) -> float:
    """One ``shapes`` student (the settings of ``diffusion_distill.workflow.train`` plus the recipe);
    returns the seconds per optimizer step."""
    from students.train import TrainConfig, train

    cfg = TrainConfig(data=dump, output=run_dir, preset="shapes", recipe=recipe, student_steps=student_steps,
                      max_steps=max_steps, batch_size=batch_size, lr=lr, warmup_steps=max(10, max_steps // 20),
                      ema_decay=0.99, checkpoint_every=max_steps, keep_checkpoints=1, log_every=50, shuffle_buffer=256,
                      adv_warmup=adv_warmup if recipe != "snapfusion_step" else 0)
    t0 = time.monotonic()
    train(cfg)
    return (time.monotonic() - t0) / max_steps


def disc_accuracy(run_dir: str) -> dict | None:
    """Mean discriminator accuracy (real, fake) over the last quarter of ``losses.jsonl``."""
    with open(os.path.join(run_dir, "losses.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    rows = [r for r in rows[-max(1, len(rows) // 4):] if "disc/acc_real" in r]
    if not rows:
        return None
    return {k: sum(r[f"disc/{k}"] for r in rows) / len(rows) for k in ("acc_real", "acc_fake")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True)
    p.add_argument("--quick", action="store_true", help="a smoke run: 120 captions, 60 steps, 60 eval images")
    p.add_argument("--train_steps", type=int, default=900)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--adv_warmup", type=int, default=0, help="steps without the generator's adversarial term")
    p.add_argument("--seeds_per_prompt", type=int, default=4)
    p.add_argument("--captions", type=int, default=0, help="scene captions dumped (0 = every scene)")
    p.add_argument("--eval_images", type=int, default=180)
    p.add_argument("--student_steps", default="2,1")
    args = p.parse_args(argv)
    if args.quick:
        args.train_steps, args.seeds_per_prompt, args.captions, args.eval_images, args.batch_size = 60, 1, 120, 60, 32

    from diffusion_distill import workflow
    from students.evaluate import EvalConfig, evaluate
    from students.export import export
    from teachers.shapes import world
    from teachers.shapes.analyser import Adherence, AnalyserFrechet, load_analyser

    out = args.output
    os.makedirs(out, exist_ok=True)
    t0 = time.monotonic()
    captions = os.path.join(out, "captions.txt")
    scenes = list(world.all_scenes())
    if args.captions:
        scenes = scenes[:: max(1, len(scenes) // args.captions)][: args.captions]
    with open(captions, "w", encoding="utf-8") as f:
        f.write("\n".join(world.caption(s) for s in scenes) + "\n")
    if not os.path.isfile(os.path.join(out, "curate", "manifest.parquet")):
        workflow.curate(captions, os.path.join(out, "curate"))
    dump = os.path.join(out, "dump")
    if not os.path.isfile(os.path.join(dump, "dataset.json")):
        workflow.dump(os.path.join(out, "curate", "manifest.parquet"), dump, seeds_per_prompt=args.seeds_per_prompt,
                      save_images=False)
    steps_list = [int(s) for s in args.student_steps.split(",")]
    students, step_s, accuracy = {}, {}, {}
    for n in steps_list:
        for recipe in RECIPES:
            name = f"{recipe}-{n}"
            run_dir, folder = os.path.join(out, f"train-{name}"), os.path.join(out, f"student-{name}")
            if not os.path.isdir(folder):
                step_s[name] = train_student(dump, run_dir, recipe=recipe, student_steps=n, max_steps=args.train_steps,
                                             batch_size=args.batch_size, lr=args.lr, adv_warmup=args.adv_warmup)
                export(run_dir, folder)
            students[name] = folder
            accuracy[name] = disc_accuracy(run_dir)
    eval_captions = os.path.join(out, "eval_captions.txt")
    world.write_captions(eval_captions, args.eval_images, seed=12_345)
    analyser = load_analyser()
    table = {}
    for i, (name, folder) in enumerate(students.items()):
        n = int(name.rsplit("-", 1)[1])
        cfg = EvalConfig(output=os.path.join(out, f"eval-{name}"), captions=eval_captions, student=folder,
                         teacher=workflow.TEACHER, num_images=args.eval_images,
                         teacher_steps=(50, *steps_list) if i == 0 else (), student_steps=(n,), metrics=(),
                         batch_size=60, grid_images=8, latency_repeats=0)
        res = evaluate(cfg, extra_metrics=(Adherence(analyser), AnalyserFrechet(analyser)))["results"]
        for model, by_steps in res.items():
            for steps, row in by_steps.items():
                table[f"teacher {steps}" if model == "teacher" else f"{name} {steps}"] = row
    print(f"\n{'model':<20}{'steps':>6}{'adherence':>11}{'exact':>8}{'Frechet':>9}{'step s':>8}{'x regr':>7}"
          f"{'D acc real/fake':>17}")
    for key, r in table.items():
        model, steps = key.split()
        regression = step_s.get(f"snapfusion_step-{steps}")
        ratio = f"{step_s[model] / regression:.2f}" if model in step_s and regression else ""
        acc = accuracy.get(model)
        acc_s = f"{acc['acc_real']:.2f}/{acc['acc_fake']:.2f}" if acc else ""
        print(f"{model:<20}{steps:>6}{r['adherence']:>11.3f}{r['exact']:>8.3f}{r['frechet_analyser']:>9.2f}"
              f"{step_s.get(model, float('nan')):>8.2f}{ratio:>7}{acc_s:>17}")
    with open(os.path.join(out, "adversarial.json"), "w", encoding="utf-8") as f:
        json.dump(dict(args=vars(args), table=table, step_s=step_s, disc_accuracy=accuracy,
                       minutes=(time.monotonic() - t0) / 60), f, indent=1)
    print(f"\n{(time.monotonic() - t0) / 60:.1f} min; {os.path.join(out, 'adversarial.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
