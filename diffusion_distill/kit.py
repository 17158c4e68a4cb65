"""The shapes experiment kit: the whole pipeline as Python calls (curate -> dump -> train -> evaluate),
shared by ``distill demo`` and every script in ``benchmarks/`` (one harness, no copies).

Every stage is the project's own job or trainer, called in-process with the same arguments a user
would type (the Beam jobs on DirectRunner), so the demo exercises exactly what a cluster run does.
``evaluate_row`` samples teacher-only and student rows at the guidance it is given (the dump's, for
matched comparisons) and caches each row's ``metrics.json`` beside a ``settings.json`` holding
everything that changes the result: a cached row whose settings differ is refused, never reused.

The recipe for step distillation: the teacher samples with DDIM over ``TEACHER_STEPS`` trailing
timesteps and every step is recorded; a student for n steps learns to jump ``TEACHER_STEPS / n``
teacher steps at once (SnapFusion's x-target), guided at the recorded CFG weight. Trailing spacing
makes the student's n-step timesteps a subset of the teacher's, so it samples where it was trained.
"""

from __future__ import annotations

import json
import os
import time
from importlib import resources

from core.options import differing_fields

TEACHER = "shapes"
TEACHER_STEPS = 40  # divisible by 8, 4 and 1: every student step spans a whole number of teacher steps


def stage(name: str):
    """Print a stage banner; returns the start time."""
    print(f"\n=== {name} ===", flush=True)
    return time.monotonic()


def shapes_guidance(teacher: str = TEACHER) -> float:
    """The CFG weight the shapes teacher (``shapes``, ``shapes-sd15`` or ``shapes-sd3``) was calibrated at
    (``weights.json``)."""
    from teachers.load import SHAPES_ARCHS
    from teachers.shapes import model as M

    if teacher not in SHAPES_ARCHS:
        raise ValueError(f"teacher {teacher!r}: the kit's guidance default knows {', '.join(SHAPES_ARCHS)}; "
                         "pass guidance=")
    with open(os.path.join(M.WEIGHTS_DIRS[SHAPES_ARCHS[teacher]], "weights.json"), encoding="utf-8") as f:
        return float(json.load(f)["guidance_scale"])


def bundled_captions() -> str:
    return str(resources.files("diffusion_distill") / "data" / "shapes_captions.txt")


def curate(captions: str, output: str, runner_args: list[str] = ()) -> dict:
    """The curation job (caption rules, exact dedup) over a captions file -> ``manifest.parquet``."""
    from pipelines import curate as job

    return job.run(["--input", captions, "--output", output, "--preset", "default", *runner_args])


def dump(prompts: str, output: str, *, teacher: str = TEACHER, steps: int = TEACHER_STEPS, seeds_per_prompt: int = 1,
         samples_per_shard: int = 256, batch_size: int = 64, save_images: bool = True, cpu_threads: int = 0,
         guidance: float | None = None, real_images: bool = False) -> dict:
    """The teacher dump on DirectRunner: full DDIM trajectories, no features (output and step KD need none);
    ``real_images``: also each caption's rendered truth, VAE-encoded (the adversarial trainer's ``--adv_real image``)."""
    from pipelines import dump as job

    argv = ["--runner=DirectRunner", "--prompts", prompts, "--output", output, "--teacher", teacher,
            "--num_inference_steps", str(steps), "--scheduler", "ddim", "--record_steps", "all",
            "--feature_layers", "", "--guidance_scale", str(guidance if guidance is not None else shapes_guidance(teacher)),
            "--seeds_per_prompt", str(seeds_per_prompt), "--samples_per_shard", str(samples_per_shard),
            "--batch_size", str(batch_size), "--cpu_threads", str(cpu_threads)]
    if save_images:
        argv.append("--save_images")
    if real_images:
        argv.append("--real_images")
    return job.run(argv)


def train_config(data: str, output: str, *, student_steps: int, max_steps: int, batch_size: int = 64,
                 lr: float | None = None, init_from_teacher: str | None = None, init_from: str | None = None,
                 seed: int = 0, recipe: str = "snapfusion_step", checkpoint_every: int | None = None, keep_checkpoints: int = 1,
                 image_every: int = 0, **overrides):
    """The ``TrainConfig`` of one kit run: the ``shapes`` preset from scratch, or with ``init_from_teacher``
    (a ``students.models.teacher_init`` cut) the teacher's own UNet cut and started from its weights, or with
    ``init_from`` (a run or checkpoint) another student's architecture and weights. ``lr`` defaults to
    ``SCRATCH_LR`` from scratch and ``INIT_LR`` from weights (fine-tuning: the from-scratch rate pulls a
    teacher-initialised student away from the teacher; BENCHMARKS.md).
    ``overrides``: any other ``TrainConfig`` field (an unknown one is a ``TypeError``)."""
    from students.training.train import INIT_LR, SCRATCH_LR, TrainConfig

    if lr is None:
        lr = INIT_LR if init_from_teacher or init_from else SCRATCH_LR
    fields = dict(data=data, output=output, preset=None if init_from_teacher or init_from else "shapes",
                  init_from_teacher=init_from_teacher, init_from=init_from, recipe=recipe, student_steps=student_steps,
                  max_steps=max_steps, batch_size=batch_size, lr=lr, warmup_steps=max(10, max_steps // 20),
                  ema_decay=0.99, checkpoint_every=checkpoint_every or max_steps, keep_checkpoints=keep_checkpoints,
                  log_every=50, image_every=image_every, shuffle_buffer=256, seed=seed)
    return TrainConfig(**dict(fields, **overrides))


def train(data: str, output: str, *, student_steps: int, max_steps: int, batch_size: int = 64, lr: float | None = None,
          init_from_teacher: str | None = None, init_from: str | None = None, image_every: int = 0, seed: int = 0,
          **overrides) -> list[float]:
    """Step-distil a student for ``student_steps`` sampling steps (``train_config``); -> its losses."""
    from students.training.train import train as run_train

    return run_train(train_config(data, output, student_steps=student_steps, max_steps=max_steps, batch_size=batch_size,
                                  lr=lr, init_from_teacher=init_from_teacher, init_from=init_from,
                                  image_every=image_every, seed=seed,
                                  **overrides))


# the adversarial rows of the benchmarks: recipes per student step count (UFOGen is a 1-2 step recipe)
ADVERSARIAL = {8: ("snapgen_adv",), 4: ("snapgen_adv",), 2: ("snapgen_adv", "ufogen"), 1: ("snapgen_adv", "ufogen")}
ADVERSARIAL_RECIPES = ("snapgen_adv", "ufogen")


def adversarial_variant(args) -> tuple[str, str]:
    """(run-folder suffix, row-label suffix) of the adversarial flags that differ from the trainer's defaults."""
    parts = [(f"-w{args.adv_weight:g}", f", adversarial weight {args.adv_weight:g}") if args.adv_weight >= 0 else None,
             (f"-warm{args.adv_warmup}", f", adversarial term from step {args.adv_warmup + 1}") if args.adv_warmup else None,
             (f"-D{args.disc_layers.replace(',', '+')}", f", discriminator on {args.disc_layers}") if args.disc_layers else None]
    return "".join(p[0] for p in parts if p), "".join(p[1] for p in parts if p)


def train_row(data: str, output: str, *, student_steps: int, max_steps: int, curve_points: int = 1,
              guidance_prob: float | None = None, **config) -> str:
    """One benchmark training run (``train_config`` with ``config``), skipped when its last checkpoint exists;
    ``curve_points`` checkpoints are kept for a quality-against-steps curve, ``guidance_prob`` replaces the
    recipe's (SnapFusion's CFG-aware term). Progressive runs (``progressive_from``) chain their rounds.
    Writes ``step_time.json`` (seconds per optimizer step) when it trains. -> the run folder."""
    import dataclasses

    from students.training.checkpoint import checkpoints
    from students.training.rounds import run_rounds
    from students.training.train import train as run_train

    config.setdefault("warmup_steps", max(5, max_steps // 20))
    cfg = train_config(data, output, student_steps=student_steps, max_steps=max_steps,
                       checkpoint_every=max(1, max_steps // curve_points), keep_checkpoints=curve_points + 1, **config)
    if cfg.progressive_from:
        run_rounds(cfg)
        return output
    found = checkpoints(output)
    if found and found[-1].endswith(f"{max_steps:07d}"):
        return output
    recipe = cfg.resolved_recipe()  # the recipe's preset with this run's steps and --adv_weight
    if guidance_prob is not None:
        recipe = dataclasses.replace(recipe, guidance_prob=guidance_prob)
    t0 = time.monotonic()
    run_train(cfg, recipe=recipe)
    with open(os.path.join(output, "step_time.json"), "w", encoding="utf-8") as f:
        json.dump({"step_s": (time.monotonic() - t0) / max_steps}, f)
    return output


def run_stats(run: str) -> dict:
    """Seconds per optimizer step (when this invocation trained it) and the discriminator's accuracy on
    real and fake inputs over the last quarter of ``losses.jsonl`` (adversarial runs; a collapse shows as
    both near 1, or real near 0)."""
    stats = {}
    path = os.path.join(run, "step_time.json")
    if os.path.isfile(path):
        stats.update(json.load(open(path, encoding="utf-8")))
    path = os.path.join(run, "losses.jsonl")
    if os.path.isfile(path):
        rows = [json.loads(line) for line in open(path, encoding="utf-8")]
        rows = [r for r in rows[-max(1, len(rows) // 4):] if "disc/acc_real" in r]
        if rows:
            stats.update({k: sum(r[f"disc/{k}"] for r in rows) / len(rows) for k in ("acc_real", "acc_fake")})
    return stats


# ------------------------------------------------------------------------------------------
# evaluation rows: matched guidance, a cache keyed by everything that changes the result
# ------------------------------------------------------------------------------------------

ROW_CACHE_VERSION = 2  # bump when the evaluation code changes what a row measures (2: guidance recorded, matched)
SETTINGS = "settings.json"


class StaleRow(Exception):
    """A cached row was made with other settings: refused, so old results never mix into a new table."""


def file_digest(path: str) -> str:
    import hashlib

    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def row_settings(*, captions: str, num_images: int, guidance_scale: float, student: str | None = None,
                 student_steps=(), teacher_steps=(), teacher: str = TEACHER, seed: int = 0) -> dict:
    """Everything that changes an evaluation row's numbers, as plain JSON values. A student checkpoint
    or run is named by its newest checkpoint's path and step, so a run that trained on is a new row."""
    student_id = None
    if student is not None:
        student_id = os.path.abspath(student)
        if not os.path.isfile(os.path.join(student, "inference.json")):  # a run or checkpoint, not an export
            from students.training.runs import resolve_checkpoint

            student_id = os.path.abspath(resolve_checkpoint(student))
    return dict(version=ROW_CACHE_VERSION, captions=os.path.abspath(captions), captions_sha256=file_digest(captions),
                num_images=int(num_images), guidance_scale=float(guidance_scale), student=student_id,
                student_steps=[int(s) for s in student_steps], teacher_steps=[int(s) for s in teacher_steps],
                teacher=teacher, seed=int(seed))


def cached_row(output: str, settings: dict) -> dict | None:
    """The cached results of ``output`` if its settings equal ``settings``; None if there are none;
    ``StaleRow`` naming the differing fields if they differ (delete the folder to re-measure)."""
    metrics, saved = os.path.join(output, "metrics.json"), os.path.join(output, SETTINGS)
    if not os.path.isfile(metrics):
        return None
    found = json.load(open(saved, encoding="utf-8")) if os.path.isfile(saved) else {}
    differ = differing_fields(found, settings)
    if differ:
        raise StaleRow(f"{output}: cached results were made with other settings ({', '.join(differ)}); "
                       "delete the folder to re-measure")
    return json.load(open(metrics, encoding="utf-8"))["results"]


def evaluate_row(output: str, *, captions: str, num_images: int, guidance_scale: float, student: str | None = None,
                 student_steps=(), teacher_steps=(), teacher: str = TEACHER, seed: int = 0, batch_size: int = 60,
                 analyser=None, grid_images: int = 0, latency_repeats: int = 0) -> dict:
    """Adherence, exact and analyser Frechet of the teacher at ``teacher_steps`` and the student at
    ``student_steps`` on the same captions and seeds, every row at ``guidance_scale`` (pass the dump's:
    teacher-only rows otherwise fall back to diffusers' 7.5). -> ``results[model][steps]``; cached."""
    from students.evaluation.evaluate import EvalConfig, evaluate
    from teachers.shapes.analyser import Adherence, AnalyserFrechet, load_analyser

    settings = dict(row_settings(captions=captions, num_images=num_images, guidance_scale=guidance_scale,
                                 student=student, student_steps=student_steps, teacher_steps=teacher_steps,
                                 teacher=teacher, seed=seed), latency_repeats=int(latency_repeats))
    cached = cached_row(output, settings)
    if cached is not None:
        return cached
    analyser = analyser if analyser is not None else load_analyser()
    cfg = EvalConfig(output=output, captions=captions, student=student, teacher=teacher, num_images=num_images,
                     teacher_steps=tuple(teacher_steps), student_steps=tuple(student_steps) if student else (),
                     guidance_scale=float(guidance_scale), metrics=(), batch_size=batch_size, grid_images=grid_images,
                     latency_repeats=latency_repeats, seed=seed)
    results = evaluate(cfg, extra_metrics=(Adherence(analyser), AnalyserFrechet(analyser)), progress=False)["results"]
    with open(os.path.join(output, SETTINGS), "w", encoding="utf-8") as f:  # after metrics.json: marks the row complete
        json.dump(settings, f, indent=1)
    return results


def row_metrics(results: dict, model: str = "student") -> dict:
    """The one (steps) entry of ``results[model]`` as floats: adherence, exact, frechet_analyser."""
    row = next(iter(results[model].values()))
    return {k: float(row[k]) for k in ("adherence", "exact", "frechet_analyser")}
