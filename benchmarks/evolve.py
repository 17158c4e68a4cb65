"""Architecture evolution on the shapes teacher (issue 14): does the lookup predict, and does evolving beat
removing blocks by hand?

    python benchmarks/evolve.py --output out/evolve --skip_lookup_check --statistic min   # the students: 20 x 80 steps each
    python benchmarks/evolve.py --output out/evolve_quick --quick         # 10 x 40 steps, and the lookup check on 4 presets
    python benchmarks/evolve.py --output out/lookup_check --lookup_only --statistic min   # part 1 only

Part 1, the lookup (``students.cost.lookup``): for each UNet preset in ``--lookup_presets`` (big ones at
``--lookup_pixels``), the table measured on the preset, then the predicted latency (sum of entries +
rest) against a fresh plain measurement of the preset and of variants of it (each evolvable block
removed, one copied), all in this invocation. Target: within 10%.

Part 2, the students (same dump, recipe, batch, learning rate, seed, captions, image seeds and total
optimizer steps), all started from the same UNet: the teacher's own UNet cut by ``--init_from_teacher``
(default ``full``: the whole teacher, SnapFusion's start) with the teacher's weights, at
``students.training.train.INIT_LR``; ``--init_from_teacher ''`` starts from the ``shapes`` preset, from scratch, at
``SCRATCH_LR``:

- ``evolved``: ``distill evolve`` to ``--target_ratio`` of the start's latency (the lookup's prediction of
  the start equals its measured forward): ``--iterations`` segments of ``--steps_per_iteration``
  robust-training steps, scored on ``--val_images`` validation captions (the analyser's adherence),
  up to ``--max_actions`` actions per evolution;
- ``unevolved``: the start trained for the same total steps (no skipping);
- ``uniform``: the start with as many evolvable blocks removed as the evolution removed in net, spread
  evenly over them in execution order (by hand, the weights of the kept blocks as in the start),
  trained for the same total steps.

Each is evaluated on ``--eval_images`` held-out captions (other scenes than the validation ones, the same
image seeds for every row) at ``--student_steps`` steps: adherence, exact, Frechet (analyser), the
predicted and measured UNet latency, and the latency against the unevolved one's, timed back to back.
Writes ``evolve_bench.json`` and ``evolve_bench.md``; re-running resumes (finished trainings and
evaluations are kept).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time


KEYS = ("adherence", "exact", "frechet_analyser")
BIG = ("snapfusion", "mobilediffusion", "snapgen", "sd15_reference", "sdxl_reference")


def paired_ms(cfgs: list, settings, rounds: int, resident: int = 0) -> tuple[list[list[float]], list[list[float]]]:
    """Plain forward times of several UNets timed back to back in rotating order, ``rounds`` rounds (after
    one warm-up round), so load from other processes hits them alike; in the lookup's allocator state.

    With ``resident`` >= 2 and more UNets than that, each UNet is timed in its own rounds against the
    first one, with only those two built: six 3 GB UNets resident at once put the process under memory
    pressure that no single UNet sees. Returns (times per UNet, the first UNet's times in the same rounds)."""
    import torch

    from core.allocator import set_allocator
    from students.cost import lookup as L

    set_allocator(settings.allocator)
    if resident >= 2 and len(cfgs) > resident:
        pairs = [paired_ms([cfgs[0], c], settings, rounds)[0] for c in cfgs[1:]]  # [first's times, c's times]
        return [pairs[0][0]] + [p[1] for p in pairs], [pairs[0][0]] + [p[0] for p in pairs]
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
    return times, [times[0]] * len(cfgs)


def lookup_check(args) -> list[dict]:
    """Predicted against measured latency for each preset and a few evolved variants of it.

    ``measured_ms``: a fresh plain measurement (the settings' statistic). ``ratio``: the variant's time
    over the preset's, timed back to back in the same rounds (median over rounds), against the predicted
    ratio: the figure that survives load from other processes."""
    import statistics

    from students.search import evolve as E
    from students.cost import lookup as L
    from students.models.unet import preset

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
        paired, base = paired_ms([v for _, v in variants], settings, repeats, resident=2 if name in BIG else 0)
        for (label, variant), runs, base_runs in zip(variants, paired, base):
            predicted, measured = table.predict_ms(variant), L.STATISTICS[settings.statistic](runs)
            ratio = statistics.median(a / b for a, b in zip(runs, base_runs))
            predicted_ratio = predicted / table.predict_ms(cfg)
            rows.append({"preset": name, "variant": label, "latent_side": side, "predicted_ms": predicted,
                         "measured_ms": measured, "error": predicted / measured - 1, "ratio": ratio,
                         "predicted_ratio": predicted_ratio, "ratio_error": predicted_ratio / ratio - 1})
            print(f"[lookup] {name:<16} {label:<32} side {side:>3}: predicted {predicted:9.2f} ms, measured {measured:9.2f} "
                  f"({predicted / measured - 1:+.1%}); vs preset predicted {predicted_ratio:.3f}, measured {ratio:.3f}", flush=True)
        print(f"[lookup] {name}: {time.monotonic() - t0:.0f} s", flush=True)
    return rows


def uniform_removal(cfg, count: int) -> list:
    """The removals of ``count`` evolvable blocks, evenly spaced over them in execution order (by hand);
    a pick that would empty the mid stage moves to the next block."""
    from students.search import evolve as E

    blocks = E.evolvable(cfg)
    count = min(count, len(blocks))
    picks = sorted({min(len(blocks) - 1, int((i + 0.5) * len(blocks) / count)) for i in range(count)}) if count else []
    mid = sum(b.stage == "mid_block" for b in E.unet_blocks(cfg))
    chosen = []
    for i in picks:
        while blocks[i].stage == "mid_block" and mid <= 1 or blocks[i].module in chosen:
            i = (i + 1) % len(blocks)
        mid -= blocks[i].stage == "mid_block"
        chosen.append(blocks[i].module)
    return [E.Action("remove", m, 0, 0) for m in chosen]


def _train_config(args, data, out):
    from students.training.train import TrainConfig

    return TrainConfig(data=data, output=out, preset=None if args.init_from_teacher else "shapes",
                       init_from_teacher=args.init_from_teacher or None, recipe="snapfusion_step",
                       student_steps=args.student_steps, max_steps=args.iterations * args.steps_per_iteration,
                       batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps, ema_decay=0.99,
                       checkpoint_every=args.steps_per_iteration, keep_checkpoints=1, log_every=50, shuffle_buffer=256,
                       seed=args.seed)


def start_model(args, data):
    """The start UNet with its initial weights: the teacher cut (teacher weights) or the preset (seeded random)."""
    import torch

    from shards.loader import read_dataset
    from students.training.train import student_from_teacher
    from students.models.unet import build_unet

    if args.init_from_teacher:
        return student_from_teacher(_train_config(args, data, "unused"), read_dataset(data)[0])
    torch.manual_seed(args.seed)
    return build_unet("shapes")


def _train(args, data, out, removals=()):
    """Train the start (with ``removals`` applied to it first) for the evolution's total steps."""
    from students.training.checkpoint import checkpoints
    from students.search.edit import evolve_model
    from students.training.train import train

    total = args.iterations * args.steps_per_iteration
    if checkpoints(out) and checkpoints(out)[-1].endswith(f"{total:07d}"):
        return out
    student = evolve_model(start_model(args, data), list(removals))[0] if removals else None
    train(_train_config(args, data, out), student=student)
    return out


def _evolve(args, data, out, val_captions):
    from students.search.evolve import EvolveConfig, evolve

    cfg = EvolveConfig(data=data, output=out, preset=None if args.init_from_teacher else "shapes",
                       init_from_teacher=args.init_from_teacher or None, recipe="snapfusion_step",
                       student_steps=args.student_steps, robust_skip_prob=args.robust_skip_prob,
                       latency_target_ratio=args.target_ratio, iterations=args.iterations,
                       steps_per_iteration=args.steps_per_iteration, max_actions=args.max_actions,
                       val_captions=val_captions, val_images=args.val_images, metric="adherence", batch_size=args.batch_size,
                       lr=args.lr, warmup_steps=args.warmup_steps, ema_decay=0.99, seed=args.seed, shuffle_buffer=256,
                       lookup_repeats=args.lookup_repeats, lookup_statistic=args.statistic)
    return evolve(cfg)


def _evaluate(args, student, out, captions, analyser):
    from students.evaluation.evaluate import EvalConfig, evaluate
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
    lines = ["| student | layouts (down / mid / up) | blocks | predicted ms | measured ms | predicted vs start | "
             "measured vs start (paired) | adherence | exact | Frechet |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"] if rows else []
    for r in rows:
        lines.append(f"| {r['student']} | {r['layouts']} | {r['blocks']} | {r['predicted_ms']:.2f} | {r['measured_ms']:.2f} | "
                     f"{r['predicted_ratio']:.1%} | {r['measured_ratio']:.1%} | {r['adherence']:.3f} | {r['exact']:.3f} | "
                     f"{r['frechet_analyser']:.1f} |")
    if lookup:
        lines += ["", "| preset | variant | latent side | predicted ms | measured ms | error | predicted / preset | "
                  "measured / preset | error |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['preset']} | {r['variant']} | {r['latent_side']} | {r['predicted_ms']:.2f} | {r['measured_ms']:.2f} | "
                  f"{r['error']:+.1%} | {r['predicted_ratio']:.3f} | {r['ratio']:.3f} | {r['ratio_error']:+.1%} |" for r in lookup]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True)
    p.add_argument("--init_from_teacher", default="full",
                   help="the start: a students.models.teacher_init cut of the teacher with its weights ('' = the shapes preset from scratch)")
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--steps_per_iteration", type=int, default=80)
    p.add_argument("--max_actions", type=int, default=1, help="blocks removed or copied per evolution")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--lr", type=float, default=None, help="default: INIT_LR from a cut, SCRATCH_LR from scratch")
    p.add_argument("--warmup_steps", type=int, default=20)
    p.add_argument("--student_steps", type=int, default=4)
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
    p.add_argument("--lookup", default=None,
                   help="the evolution's latency lookup (distill profile --lookup, or an earlier run's evolved/lookup.json); "
                        "default: measured on the start in this run, which on a loaded machine can be far off")
    p.add_argument("--skip_lookup_check", action="store_true")
    p.add_argument("--lookup_only", action="store_true", help="part 1 only: the lookup check, written to lookup_check.md")
    p.add_argument("--quick", action="store_true",
                   help="smaller: 10 x 40 steps, 150 captions x 1 seed, 32 validation and 96 evaluation captions, the lookup "
                        "check on shapes, tiny, tiny_xl and mobilediffusion")
    args = p.parse_args(argv)
    if args.quick:
        args.iterations, args.steps_per_iteration, args.warmup_steps, args.train_prompts = 10, 40, 10, 150
        args.seeds_per_prompt, args.val_images, args.eval_images, args.lookup_repeats_big = 1, 32, 96, 2
        args.lookup_presets, args.lookup_variants = "shapes,tiny,tiny_xl,mobilediffusion", 2
    if args.lr is None:
        from students.training.train import INIT_LR, SCRATCH_LR

        args.lr = INIT_LR if args.init_from_teacher else SCRATCH_LR
    args.lookup_presets = tuple(x.strip() for x in args.lookup_presets.split(",") if x.strip())

    import torch

    from diffusion_distill import kit
    from students.cost import lookup as L
    from students.search.evolve import apply_actions, evolvable, layouts
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
        kit.curate(prompts, os.path.join(args.output, "curate"))
    data = os.path.join(args.output, "dump")
    if not os.path.isfile(os.path.join(data, "dataset.json")):
        kit.dump(os.path.join(args.output, "curate", "manifest.parquet"), data, seeds_per_prompt=args.seeds_per_prompt,
                      save_images=False)
    print(f"[bench] dump ready after {(time.monotonic() - t0) / 60:.1f} min", flush=True)
    val_captions, eval_captions = os.path.join(args.output, "val_captions.txt"), os.path.join(args.output, "eval_captions.txt")
    world.write_captions(val_captions, args.val_images, seed=777)
    world.write_captions(eval_captions, args.eval_images, seed=12_345)
    # the three students
    evo_dir = os.path.join(args.output, "evolved")
    if args.lookup and not os.path.isfile(os.path.join(evo_dir, "lookup.json")):  # the evolution's own lookup, as if measured
        os.makedirs(evo_dir, exist_ok=True)
        L.LookupTable.load(args.lookup).save(os.path.join(evo_dir, "lookup.json"))
    records = _evolve(args, data, evo_dir, val_captions)
    print(f"[bench] evolved after {(time.monotonic() - t0) / 60:.1f} min", flush=True)
    start = start_model(args, data).student_config
    final = json.load(open(os.path.join(evo_dir, "student_config.json"), encoding="utf-8"))
    evolved_cfg = dataclasses.replace(start, **{k: tuple(final[k]) if isinstance(final[k], list) else final[k]
                                                for k in ("down_layouts", "mid_layout", "up_layouts")})
    removed = len(L.unet_blocks(start)) - len(L.unet_blocks(evolved_cfg))
    removals = uniform_removal(start, removed)
    uniform_cfg = apply_actions(start, removals)[0]
    _train(args, data, os.path.join(args.output, "unevolved"))
    print(f"[bench] unevolved trained after {(time.monotonic() - t0) / 60:.1f} min", flush=True)
    _train(args, data, os.path.join(args.output, "uniform"), removals)
    print(f"[bench] uniform trained after {(time.monotonic() - t0) / 60:.1f} min", flush=True)
    table = L.LookupTable.load(os.path.join(evo_dir, "lookup.json"))
    settings = L.settings_of(table)
    analyser = load_analyser()
    students = (("unevolved", start, "unevolved"), ("evolved", evolved_cfg, "evolved/run"), ("uniform", uniform_cfg, "uniform"))
    paired, base = paired_ms([cfg for _, cfg, _ in students], settings, args.lookup_repeats)  # back to back, rotating
    rows = []
    for (name, cfg, run), runs, base_runs in zip(students, paired, base):
        metrics = _evaluate(args, os.path.join(args.output, run), os.path.join(args.output, "eval", name), eval_captions, analyser)
        lay = layouts(cfg)
        rows.append({"student": name, "layouts": f"{' / '.join(lay['down_layouts'])} | {lay['mid_layout']} | "
                                                 f"{' / '.join(lay['up_layouts'])}",
                     "blocks": len(L.unet_blocks(cfg)), "evolvable": len(evolvable(cfg)), "predicted_ms": table.predict_ms(cfg),
                     "predicted_ratio": table.predict_ms(cfg) / table.predict_ms(start),
                     "measured_ms": L.STATISTICS[settings.statistic](runs),
                     "measured_ratio": statistics.median(a / b for a, b in zip(runs, base_runs)), **metrics})
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
