"""How a distilled student samples: the teacher's timesteps in a dump, the jumps a step-distilled
student was trained on (``trained_jumps``, from ``students.distill.batches.step_rows``), the diffusers
scheduler that reproduces them (``student_scheduler``) and the guidance it was trained at
(``guidance_for``). A checkpoint records these; export and evaluation read them from there.
"""

from __future__ import annotations


def teacher_timesteps(dataset: dict) -> list[float]:
    """The teacher's sampling timesteps in the dump (``dataset.json``; recomputed if an old dump lacks them)."""
    if dataset.get("timesteps"):
        return [float(t) for t in dataset["timesteps"]]
    from teachers.sampler import scheduler_class

    scheduler = scheduler_class(dataset["scheduler_class"]).from_config(dataset["scheduler_config"])
    scheduler.set_timesteps(dataset["recipe"]["num_inference_steps"])
    return [float(t) for t in scheduler.timesteps]


def trained_jumps(dataset: dict, student_steps: int) -> tuple[list[float], list[float]]:
    """(timesteps, next timesteps) a step-distilled student was trained on; -1 = the final latent.

    The rows are ``students.distill.batches.step_rows`` (what ``rows_for`` draws from) and their timesteps come from
    the dump's exact float timesteps, as in the trainer's ``noise_levels`` (a test keeps the two in step).
    """
    from students.distill.batches import step_rows, step_stride

    ts = teacher_timesteps(dataset)  # exact floats, as the record and the trainer's noise_levels have them
    total, k = len(ts), step_stride(len(ts), student_steps)
    rows = step_rows(total, student_steps)
    return [ts[r] for r in rows], [ts[r + k] if r + k < total else -1 for r in rows]


def _ddim_jumps(scheduler, steps: int) -> tuple[list[int], list[int]]:
    """What ``DDIMScheduler.step`` does at ``steps``: its timesteps and the timestep each one steps to."""
    scheduler.set_timesteps(steps)
    ratio = scheduler.config.num_train_timesteps // steps  # DDIMScheduler.step: prev = t - T // steps
    ts = [int(t) for t in scheduler.timesteps]
    return ts, [t - ratio if t - ratio >= 0 else -1 for t in ts]


def student_scheduler(dataset: dict, recipe: dict):
    """(scheduler, info) for sampling the student: see the module docstring. ``info`` has
    ``num_inference_steps``, ``timesteps``, ``trained_timesteps`` and ``timesteps_exact``."""
    from diffusers import DDIMScheduler

    from teachers.sampler import scheduler_class

    # the student's own parameterisation (a v-prediction student of an epsilon teacher samples as v)
    own_param = {"prediction_type": recipe["prediction_type"]} if recipe.get("prediction_type") else {}
    if not recipe.get("step_weight"):  # not step-distilled: the teacher's own sampler and steps
        scheduler = scheduler_class(dataset["scheduler_class"]).from_config(dataset["scheduler_config"], **own_param)
        steps = int(dataset["recipe"]["num_inference_steps"])
        scheduler.set_timesteps(steps)
        ts = [int(t) for t in scheduler.timesteps]
        return scheduler, dict(num_inference_steps=steps, timesteps=ts, trained_timesteps=teacher_timesteps(dataset),
                               timesteps_exact=True)
    want, want_next = trained_jumps(dataset, int(recipe["student_steps"]))
    steps = len(want)
    base = DDIMScheduler.from_config(dataset["scheduler_config"], **own_param)
    ratio = base.config.num_train_timesteps // steps
    # The teacher's own spacing first (a tie keeps the earlier candidate), then the other spacings.
    own = dict(timestep_spacing=base.config.timestep_spacing, steps_offset=base.config.steps_offset)
    candidates = [own] + [dict(timestep_spacing="trailing", steps_offset=0), dict(timestep_spacing="linspace", steps_offset=0)]
    # leading spacing at offset o is leading at offset 0 shifted by o (DDIMScheduler.set_timesteps adds
    # steps_offset last): one scheduler gives all ratio + 1 offsets (one per offset took seconds)
    leading, _ = _ddim_jumps(DDIMScheduler.from_config(base.config, timestep_spacing="leading", steps_offset=0), steps)
    jumps = {}
    for o in range(ratio + 1):
        shifted = [t + o for t in leading]
        jumps[("leading", o)] = (shifted, [t - ratio if t - ratio >= 0 else -1 for t in shifted])
    candidates += [dict(timestep_spacing="leading", steps_offset=o) for o in range(ratio + 1)]
    best, best_err = None, None
    for overrides in candidates:
        key = (overrides["timestep_spacing"], overrides["steps_offset"])
        if key not in jumps:
            jumps[key] = _ddim_jumps(DDIMScheduler.from_config(base.config, **overrides), steps)
        ts, nxt = jumps[key]
        err = max(abs(a - b) for a, b in zip(ts + nxt, want + want_next))
        if best_err is None or err < best_err:
            best, best_err = overrides, err
    if best["timestep_spacing"] == "leading" and best["steps_offset"] != 1:
        # diffusers resets a steps_offset != 1 to 1 whenever a pipeline is built or loaded: carry the
        # offset in OffsetDDIMScheduler's own field instead (teachers/offset_scheduler.py)
        from teachers.offset_scheduler import OffsetDDIMScheduler

        scheduler = OffsetDDIMScheduler.from_config(base.config, timestep_spacing="leading", steps_offset=1,
                                                    timestep_offset=best["steps_offset"])
    else:
        scheduler = DDIMScheduler.from_config(base.config, **best)
    scheduler.set_timesteps(steps)
    return scheduler, dict(num_inference_steps=steps, timesteps=[int(t) for t in scheduler.timesteps],
                           trained_timesteps=want, timesteps_exact=best_err == 0)


def guidance_for(dataset: dict) -> float:
    """The CFG weight the teacher dump used (a range: 7.5 clamped into it; SnapFusion samples w in [2, 14])."""
    recipe = dataset["recipe"]
    if recipe.get("guidance_range"):
        lo, hi = recipe["guidance_range"]
        return float(min(max(7.5, lo), hi))
    return float(recipe["guidance_scale"])


def student_sampling(dataset: dict, recipe: dict, *, height: int | None = None) -> tuple[object, dict]:
    """(scheduler, description) of how the student samples, written into every checkpoint.

    ``description``: ``num_inference_steps``, ``timesteps``, ``trained_timesteps``, ``timesteps_exact``
    (from ``student_scheduler``), ``guidance_scale`` (the dump's, ``guidance_for``), ``prediction_type``
    (the student's own), ``height``/``width`` (pixels; the dump's, else ``height``) and ``teacher`` (spec).
    """
    scheduler, info = student_scheduler(dataset, recipe)
    size = dataset["recipe"].get("height") or height
    return scheduler, dict(info, guidance_scale=guidance_for(dataset),
                           prediction_type=recipe.get("prediction_type") or dataset.get("prediction_type", "epsilon"),
                           height=None if size is None else int(size),
                           width=None if size is None else int(dataset["recipe"].get("width") or size),
                           teacher=dataset["recipe"]["teacher"])


def teacher_sampler(dataset: dict):
    """The scheduler the dump ran its teacher with (class and config from ``dataset.json``)."""
    from teachers.sampler import scheduler_class

    return scheduler_class(dataset["scheduler_class"]).from_config(dataset["scheduler_config"])


def student_pipeline(teacher, unet, scheduler, decoder=None):
    """The teacher's pipeline class and text side with the student ``unet``, ``scheduler`` and ``decoder``
    (else the teacher's VAE): what ``distill export`` writes and what the training grids sample.
    ``teacher`` is a ``teachers.load.Teacher``; its modules are shared, not copied."""
    components = dict(teacher.pipe.components, unet=unet, scheduler=scheduler, vae=decoder or teacher.pipe.vae)
    extra = ({"force_zeros_for_empty_prompt": teacher.pipe.config.force_zeros_for_empty_prompt} if teacher.is_xl
             else {"requires_safety_checker": False})
    pipe = type(teacher.pipe)(**components, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe
