"""The whole pipeline as Python calls: curate -> dump -> train -> export, on the ``shapes`` teacher.

Shared by ``distill demo`` and ``benchmarks/fidelity.py``. Every stage is the project's own job
or trainer, called in-process with the same arguments a user would type (the Beam jobs on
DirectRunner), so the demo exercises exactly what a cluster run does.

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

TEACHER = "shapes"
TEACHER_STEPS = 40  # divisible by 8, 4 and 1: every student step spans a whole number of teacher steps


def stage(name: str):
    """Print a stage banner; returns the start time."""
    print(f"\n=== {name} ===", flush=True)
    return time.monotonic()


def shapes_guidance() -> float:
    """The CFG weight the shapes teacher was calibrated at (``weights.json``)."""
    from teachers.shapes import model as M

    with open(os.path.join(M.WEIGHTS_DIR, "weights.json"), encoding="utf-8") as f:
        return float(json.load(f)["guidance_scale"])


def bundled_captions() -> str:
    return str(resources.files("diffusion_distill") / "data" / "shapes_captions.txt")


def curate(captions: str, output: str, runner_args: list[str] = ()) -> dict:
    """The curation job (caption rules, exact dedup) over a captions file -> ``manifest.parquet``."""
    from pipelines import curate as job

    return job.run(["--input", captions, "--output", output, "--preset", "default", *runner_args])


def dump(prompts: str, output: str, *, seeds_per_prompt: int = 1, samples_per_shard: int = 256, batch_size: int = 64,
         save_images: bool = True, cpu_threads: int = 0, guidance: float | None = None, real_images: bool = False) -> dict:
    """The teacher dump on DirectRunner: full DDIM trajectories, no features (output and step KD need none);
    ``real_images``: also each caption's rendered truth, VAE-encoded (the adversarial trainer's ``--adv_real image``)."""
    from pipelines import dump as job

    argv = ["--runner=DirectRunner", "--prompts", prompts, "--output", output, "--teacher", TEACHER,
            "--num_inference_steps", str(TEACHER_STEPS), "--scheduler", "ddim", "--record_steps", "all",
            "--feature_layers", "", "--guidance_scale", str(guidance if guidance is not None else shapes_guidance()),
            "--seeds_per_prompt", str(seeds_per_prompt), "--samples_per_shard", str(samples_per_shard),
            "--batch_size", str(batch_size), "--cpu_threads", str(cpu_threads)]
    if save_images:
        argv.append("--save_images")
    if real_images:
        argv.append("--real_images")
    return job.run(argv)


def train(data: str, output: str, *, student_steps: int, max_steps: int, batch_size: int = 64, lr: float | None = None,
          init_from_teacher: str | None = None, image_every: int = 0, seed: int = 0) -> list[float]:
    """Step-distil a student for ``student_steps`` sampling steps: the ``shapes`` preset from scratch, or
    with ``init_from_teacher`` (a ``students.models.teacher_init`` cut) the teacher's own UNet cut and started
    from its weights. ``lr`` defaults to ``SCRATCH_LR`` from scratch and ``INIT_LR`` teacher-initialised (fine-tuning: the
    from-scratch rate pulls a teacher-initialised student away from the teacher; BENCHMARKS.md)."""
    from students.training.train import INIT_LR, SCRATCH_LR, TrainConfig, train as run_train

    if lr is None:
        lr = INIT_LR if init_from_teacher else SCRATCH_LR
    cfg = TrainConfig(data=data, output=output, preset=None if init_from_teacher else "shapes",
                      init_from_teacher=init_from_teacher, recipe="snapfusion_step", student_steps=student_steps,
                      max_steps=max_steps, batch_size=batch_size, lr=lr, warmup_steps=max(10, max_steps // 20),
                      ema_decay=0.99, checkpoint_every=max_steps, keep_checkpoints=1, log_every=50,
                      image_every=image_every, shuffle_buffer=256, seed=seed)
    return run_train(cfg)
