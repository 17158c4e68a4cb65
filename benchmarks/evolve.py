"""Architecture evolution on the shapes teacher (issue 14): does the lookup predict, and does evolving beat
removing blocks by hand?

    python benchmarks/evolve.py --output out/evolve                 # full: 4 x 200 steps at batch 64 per student
    python benchmarks/evolve.py --output out/evolve_quick --quick   # about 20 minutes on 2 quiet cores
    python benchmarks/evolve.py --output out/lookup_check --lookup_only --statistic min   # part 1 only

Part 1, the lookup (``students.lookup``): for each UNet preset in ``--lookup_presets`` (big ones at
``--lookup_pixels``), the table measured on the preset, then the predicted latency (sum of entries +
rest) against a fresh plain measurement of the preset and of variants of it (each evolvable block
removed, one copied), all in this invocation. Target: within 10%.

Part 2, the students (same dump, recipe, batch, learning rate, seed and total optimizer steps):

- ``evolved``: ``distill evolve`` from the ``shapes`` preset to ``--target_ratio`` of its predicted
  latency: ``--iterations`` segments of ``--steps_per_iteration`` robust-training steps, scored on
  ``--val_images`` validation captions (the analyser's adherence), one action per evolution;
- ``unevolved``: the ``shapes`` preset trained for the same total steps (no skipping);
- ``uniform``: the ``shapes`` preset with as many evolvable blocks removed as the evolution removed
  in net, spread evenly over them in execution order, trained for the same total steps.

Each is evaluated on ``--eval_images`` held-out captions (other scenes than the validation ones, the same
image seeds for every row) at ``--student_steps`` steps: adherence, exact, Frechet (analyser), and the
predicted and measured UNet latency. Writes ``evolve_bench.json`` and ``evolve_bench.md``; re-running
resumes (finished trainings and evaluations are kept).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

KEYS = ("adherence", "exact", "frechet_analyser")
BIG = ("snapfusion", "mobilediffusion", "snapgen", "sd15_reference", "sdxl_reference")


def paired_ms(cfgs: list, settings, rounds: int) -> list[list[float]]:
    """Plain forward times of several UNets timed back to back in rotating order, ``rounds`` rounds
    (after one warm-up round): per round, every model once, so load from other processes hits them alike."""
    import torch

    from students import lookup as L

    models = [L.build_random_unet(c, settings) for c in cfgs]
    inputs = [L.unet_inputs(m, settings, settings.side or c.sample_size) for m, c in zip(models, cfgs)]
    times = [[] for _ in cfgs]
    with torch.inference_mode():
        for r in range(rounds + 1):
            for i in [(r + k) % len(cfgs) for k in range(len(cfgs))]:
                t0 = time.perf_counter()
                models[i](*inputs[i][0], **inputs[i][1])
                if r:
                    times[i].append((time.perf_counter() - t0) * 1e3)
    return times


def lookup_check(args) -> list[dict]:
    """Predicted against measured latency for each preset and a few evolved variants of it.

    ``measured_ms``: a fresh plain measurement (the settings' statistic). ``ratio``: the variant's time
    over the preset's, timed back to back in the same rounds (median over rounds), against the predicted
    ratio: the figure that survives load from other processes."""
    import statistics

    from students import evolve as E
    from students import lookup as L
    from students.unet import preset

    rows = []
    for name in args.lookup_presets:
        cfg = preset(name)
        side = args.lookup_pixels // 8 if name in BIG else cfg.sample_size
        repeats = args.lookup_repeats_big if name in BIG else args.lookup_repeats
        settings = L.LookupSettings(batch_size=2, side=side, repeats=repeats, warmup=1 if name in BIG else 3,
                                    statistic=args.statistic)
        t0 = time.monotonic()
        table = L.measure_table(cfg, settings)
        variants = [("preset", cfg)]
        blocks = E.evolvable(cfg)
        for b in blocks[: args.lookup_variants]:
            variants.append((f"-{b.module}", E.apply_actions(cfg, [E.Action("remove", b.module, 0, 0)])[0]))
        if blocks:
            b = blocks[len(blocks) // 2]
            variants.append((f"+{b.module}", E.apply_actions(cfg, [E.Action("copy", b.module, 0, 0)])[0]))
        paired = paired_ms([v for _, v in variants], settings, repeats)
        for (label, variant), runs in zip(variants, paired):
            predicted, measured = table.predict_ms(variant), L.STATISTICS[settings.statistic](runs)
            ratio = statistics.median(a / b for a, b in zip(runs, paired[0]))
            predicted_ratio = predicted / table.predict_ms(cfg)
            rows.append({"preset": name, "variant": label, "latent_side": side, "predicted_ms": predicted,
                         "measured_ms": measured, "error": predicted / measured - 1, "ratio": ratio,
                         "predicted_ratio": predicted_ratio, "ratio_error": predicted_ratio / ratio - 1})
            print(f"[lookup] {name:<16} {label:<32} side {side:>3}: predicted {predicted:9.2f} ms, measured {measured:9.2f} "
                  f"({predicted / measured - 1:+.1%}); vs preset predicted {predicted_ratio:.3f}, measured {ratio:.3f}", flush=True)
        print(f"[lookup] {name}: {time.monotonic() - t0:.0f} s", flush=True)
    return rows


def uniform_removal(cfg, count: int):
    """``count`` evolvable blocks removed, evenly spaced over them in execution order (by hand)."""
    from students import evolve as E

    blocks = E.evolvable(cfg)
    count = min(count, len(blocks))
    picks = sorted({min(len(blocks) - 1, int((i + 0.5) * len(blocks) / count)) for i in range(count)}) if count else []
    return E.apply_actions(cfg, [E.Action("remove", blocks[i].module, 0, 0) for i in picks])[0]


def _train(args, data, out, student_cfg=None):
    from students.checkpoint import checkpoints
    from students.train import TrainConfig, train
    from students.unet import EfficientUNet2DConditionModel

    total = args.iterations * args.steps_per_iteration
    if checkpoints(out) and checkpoints(out)[-1].endswith(f"{total:07d}"):
        return out
    cfg = TrainConfig(data=data, output=out, preset="shapes", recipe="snapfusion_step", student_steps=args.student_steps,
                      max_steps=total, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
                      ema_decay=0.99, checkpoint_every=args.steps_per_iteration, keep_checkpoints=1, log_every=50, shuffle_buffer=256, seed=args.seed)
    student = EfficientUNet2DConditionModel.from_student_config(student_cfg) if student_cfg is not None else None
    train(cfg, student=student)
    return out


def _evolve(args, data, out, val_captions):
    from students.evolve import EvolveConfig, evolve

    cfg = EvolveConfig(data=data, output=out, preset="shapes", recipe="snapfusion_step", student_steps=args.student_steps,
                       robust_skip_prob=args.robust_skip_prob, latency_target_ratio=args.target_ratio,
                       iterations=args.iterations, steps_per_iteration=args.steps_per_iteration, max_actions=1,
                       val_captions=val_captions, val_images=args.val_images, metric="adherence", batch_size=args.batch_size,
                       lr=args.lr, warmup_steps=args.warmup_steps, ema_decay=0.99, seed=args.seed, shuffle_buffer=256,
                       lookup_repeats=args.lookup_repeats, lookup_statistic=args.statistic)
    return evolve(cfg)


def _evaluate(args, student, out, captions, analyser):
    from students.evaluate import EvalConfig, evaluate
    from teachers.shapes.analyser import Adherence, AnalyserFrechet

    path = os.path.join(out, "metrics.json")
    if os.path.isfile(path):
        res = json.load(open(path, encoding="utf-8"))["results"]
    else:
        cfg = EvalConfig(output=out, captions=captions, student=student, teacher="shapes", num_images=args.eval_images,
                         teacher_steps=(), student_steps=(args.student_steps,), metrics=(), batch_size=64, grid_images=8,
                         latency_repeats=0)
        res = evaluate(cfg, extra_metrics=(Adherence(analyser), AnalyserFrechet(analyser)), progress=False)["results"]
    row = next(iter(res["student"].values()))
    return {k: float(row[k]) for k in KEYS}


def table_md(rows: list[dict], lookup: list[dict]) -> str:
    lines = ["| student | layouts (down / mid / up) | blocks | predicted ms | measured ms | latency vs preset | adherence | exact | Frechet |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"] if rows else []
    base = next((r for r in rows if r["student"] == "unevolved"), None)
    for r in rows:
        lines.append(f"| {r['student']} | {r['layouts']} | {r['blocks']} | {r['predicted_ms']:.2f} | {r['measured_ms']:.2f} | "
                     f"{r['measured_ms'] / base['measured_ms']:.1%} | {r['adherence']:.3f} | {r['exact']:.3f} | "
                     f"{r['frechet_analyser']:.1f} |")
    if lookup:
        lines += ["", "| preset | variant | latent side | predicted ms | measured ms | error | predicted / preset | "
                  "measured / preset | error |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['preset']} | {r['variant']} | {r['latent_side']} | {r['predicted_ms']:.2f} | {r['measured_ms']:.2f} | "
                  f"{r['error']:+.1%} | {r['predicted_ratio']:.3f} | {r['ratio']:.3f} | {r['ratio_error']:+.1%} |" for r in lookup]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True)
    p.add_argument("--iterations", type=int, default=4)
    p.add_argument("--steps_per_iteration", type=int, default=200)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup_steps", type=int, default=40)
    p.add_argument("--student_steps", type=int, default=8)
    p.add_argument("--robust_skip_prob", type=float, default=0.1)
    p.add_argument("--target_ratio", type=float, default=0.7)
    p.add_argument("--val_images", type=int, default=48, help="validation captions the blocks are scored on")
    p.add_argument("--eval_images", type=int, default=180, help="held-out captions of the final comparison")
    p.add_argument("--train_prompts", type=int, default=0, help="about this many scene captions for the dump (0 = all 450)")
    p.add_argument("--seeds_per_prompt", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lookup_presets", default="shapes,tiny,tiny_xl,mobilediffusion,snapfusion,snapgen")
    p.add_argument("--lookup_pixels", type=int, default=256, help="pixels of the big presets' lookup check")
    p.add_argument("--lookup_repeats", type=int, default=30, help="timed rounds of the small UNets' lookups")
    p.add_argument("--lookup_repeats_big", type=int, default=3, help="timed rounds of the big UNets' lookups")
    p.add_argument("--lookup_variants", type=int, default=4, help="single-removal variants checked per preset")
    p.add_argument("--statistic", default="median", choices=("median", "min"),
                   help="latency statistic of the lookups and measurements (min resists other processes' load)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: tiny models on a shared machine run far faster than with 2 fighting for cores)")
    p.add_argument("--skip_lookup_check", action="store_true")
    p.add_argument("--lookup_only", action="store_true", help="part 1 only: the lookup check, written to lookup_check.md")
    p.add_argument("--quick", action="store_true",
                   help="about 20 minutes on 2 shared cores: 4 x 50 steps at batch 32, 150 captions x 1 seed, 32 validation "
                        "and 96 evaluation captions, the lookup check on shapes, tiny, tiny_xl and mobilediffusion")
    args = p.parse_args(argv)
    if args.quick:
        args.steps_per_iteration, args.batch_size, args.warmup_steps, args.train_prompts = 50, 32, 10, 150
        args.seeds_per_prompt, args.val_images, args.eval_images, args.lookup_repeats_big = 1, 32, 96, 2
        args.lookup_presets, args.lookup_variants = "shapes,tiny,tiny_xl,mobilediffusion", 2
    args.lookup_presets = tuple(x.strip() for x in args.lookup_presets.split(",") if x.strip())

    import torch

    from diffusion_distill import workflow
    from students import lookup as L
    from students.evolve import evolvable, layouts
    from students.unet import preset
    from teachers.shapes import world
    from teachers.shapes.analyser import load_analyser

    torch.set_num_threads(args.threads)
    os.makedirs(args.output, exist_ok=True)
    t0 = time.monotonic()
    results_path = os.path.join(args.output, "evolve_bench.json")
    saved = json.load(open(results_path, encoding="utf-8")) if os.path.isfile(results_path) else {}
    lookup = saved.get("lookup")
    if lookup is None and not args.skip_lookup_check:
        lookup = lookup_check(args)
        json.dump({"args": vars(args), "lookup": lookup}, open(results_path, "w", encoding="utf-8"), indent=1)
    if args.lookup_only:
        md = table_md([], lookup or [])
        with open(os.path.join(args.output, "lookup_check.md"), "w", encoding="utf-8") as f:
            f.write(md)
        print(md)
        print(f"{(time.monotonic() - t0) / 60:.1f} min")
        return 0
    # the dump: scene captions -> curation job -> teacher (40 trailing DDIM steps, all recorded)
    prompts = os.path.join(args.output, "prompts.txt")
    scenes = list(world.all_scenes())
    with open(prompts, "w", encoding="utf-8") as f:
        f.write("\n".join(world.caption(s) for s in scenes[:: max(1, len(scenes) // args.train_prompts)
                                                          if args.train_prompts else 1]) + "\n")
    if not os.path.isfile(os.path.join(args.output, "curate", "manifest.parquet")):
        workflow.curate(prompts, os.path.join(args.output, "curate"))
    data = os.path.join(args.output, "dump")
    if not os.path.isfile(os.path.join(data, "dataset.json")):
        workflow.dump(os.path.join(args.output, "curate", "manifest.parquet"), data, seeds_per_prompt=args.seeds_per_prompt,
                      save_images=False)
    print(f"[bench] dump ready after {(time.monotonic() - t0) / 60:.1f} min", flush=True)
    val_captions, eval_captions = os.path.join(args.output, "val_captions.txt"), os.path.join(args.output, "eval_captions.txt")
    world.write_captions(val_captions, args.val_images, seed=777)
    world.write_captions(eval_captions, args.eval_images, seed=12_345)
    # the three students
    evo_dir = os.path.join(args.output, "evolved")
    records = _evolve(args, data, evo_dir, val_captions)
    print(f"[bench] evolved after {(time.monotonic() - t0) / 60:.1f} min", flush=True)
    start = preset("shapes")
    final = json.load(open(os.path.join(evo_dir, "student_config.json"), encoding="utf-8"))
    evolved_cfg = dataclasses.replace(start, **{k: tuple(final[k]) if isinstance(final[k], list) else final[k]
                                                for k in ("down_layouts", "mid_layout", "up_layouts")})
    removed = len(L.unet_blocks(start)) - len(L.unet_blocks(evolved_cfg))
    uniform_cfg = uniform_removal(start, removed)
    _train(args, data, os.path.join(args.output, "unevolved"))
    print(f"[bench] unevolved trained after {(time.monotonic() - t0) / 60:.1f} min", flush=True)
    _train(args, data, os.path.join(args.output, "uniform"), uniform_cfg)
    print(f"[bench] uniform trained after {(time.monotonic() - t0) / 60:.1f} min", flush=True)
    table = L.LookupTable.load(os.path.join(evo_dir, "lookup.json"))
    settings = L.settings_of(table)
    analyser = load_analyser()
    rows = []
    for name, cfg, run in (("unevolved", start, "unevolved"), ("evolved", evolved_cfg, "evolved/run"),
                           ("uniform", uniform_cfg, "uniform")):
        metrics = _evaluate(args, os.path.join(args.output, run), os.path.join(args.output, "eval", name), eval_captions, analyser)
        lay = layouts(cfg)
        rows.append({"student": name, "layouts": f"{' / '.join(lay['down_layouts'])} | {lay['mid_layout']} | "
                                                 f"{' / '.join(lay['up_layouts'])}",
                     "blocks": len(L.unet_blocks(cfg)), "evolvable": len(evolvable(cfg)), "predicted_ms": table.predict_ms(cfg),
                     "measured_ms": L.measure_ms(cfg, settings), **metrics})
    md = table_md(rows, lookup or [])
    path_lines = ["", "Evolution path (validation adherence at the end of each segment, before its evolution):", ""]
    for r in records:
        acts = ", ".join(f"{a['kind']} {a['module']} (delta {a['delta_metric']:+.3f}, {a['latency_ms']:.2f} ms)" for a in r["actions"])
        path_lines.append(f"- iteration {r['iteration']} (step {r['step']}): {r['metric_name']} {r['metric']:.3f}, predicted "
                          f"{r['predicted_ms']:.2f} ms, measured {r['measured_ms']:.2f} ms (target {r['target_ms']:.2f}); "
                          f"{acts or 'no action'}")
    md += "\n".join(path_lines) + "\n"
    json.dump({"args": vars(args), "lookup": lookup, "students": rows, "evolution": records},
              open(results_path, "w", encoding="utf-8"), indent=1)
    with open(os.path.join(args.output, "evolve_bench.md"), "w", encoding="utf-8") as f:
        f.write(md)
    print(md)
    print(f"{(time.monotonic() - t0) / 60:.1f} min; {results_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
