"""How a distilled student samples: the teacher's timesteps in a dump, the jumps a step-distilled
student was trained on (``trained_jumps``, from ``students.distill.batches.step_rows``), the diffusers
scheduler that reproduces them (``student_scheduler``) and the guidance it was trained at
(``guidance_for``). A checkpoint records these; export and evaluation read them from there.

A flow student (a flow recipe on a rectified-flow dump) samples with Euler steps between the sigmas it
was trained on (``flow_schedule``): the teacher's (``flow_kd``), or its rows 0, k, 2k, ... (``flow_step``,
the rows of ``students.distill.batches.step_rows``), through ``teachers.flow_scheduler.TrainedSigmasFlowScheduler``;
``flow_sample`` is that loop written out (the trainer's own sampler, which the exported pipeline reproduces).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shards.schema import DatasetInfo


def torch_no_grad(fn):
    """``torch.no_grad()`` as a decorator, importing torch on the first call (this module imports it lazily)."""
    import functools

    @functools.wraps(fn)
    def run(*args, **kwargs):
        import torch

        with torch.no_grad():
            return fn(*args, **kwargs)
    return run


def teacher_timesteps(dataset: DatasetInfo) -> list[float]:
    """The teacher's sampling timesteps in the dump (``dataset.json``; recomputed if an old dump lacks them)."""
    if dataset.timesteps:
        return [float(t) for t in dataset.timesteps]
    from teachers.sampler import scheduler_class

    scheduler = scheduler_class(dataset.scheduler_class).from_config(dataset.scheduler_config)
    scheduler.set_timesteps(dataset.dump_recipe.sampler.num_inference_steps)
    return [float(t) for t in scheduler.timesteps]


def trained_jumps(dataset: DatasetInfo, student_steps: int) -> tuple[list[float], list[float]]:
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


def student_scheduler(dataset: DatasetInfo, recipe: dict):
    """(scheduler, info) for sampling the student: see the module docstring. ``info`` has
    ``num_inference_steps``, ``timesteps``, ``trained_timesteps`` and ``timesteps_exact``."""
    from diffusers import DDIMScheduler

    from teachers.sampler import scheduler_class

    if recipe.get("prediction_type") == "flow":
        return flow_scheduler(dataset, recipe)

    # the student's own parameterisation (a v-prediction student of an epsilon teacher samples as v)
    own_param = {"prediction_type": recipe["prediction_type"]} if recipe.get("prediction_type") else {}
    if not recipe.get("step_weight"):  # not step-distilled: the teacher's own sampler and steps
        scheduler = scheduler_class(dataset.scheduler_class).from_config(dataset.scheduler_config, **own_param)
        steps = int(dataset.dump_recipe.sampler.num_inference_steps)
        scheduler.set_timesteps(steps)
        ts = [int(t) for t in scheduler.timesteps]
        return scheduler, dict(num_inference_steps=steps, timesteps=ts, trained_timesteps=teacher_timesteps(dataset),
                               timesteps_exact=True)
    want, want_next = trained_jumps(dataset, int(recipe["student_steps"]))
    steps = len(want)
    base = DDIMScheduler.from_config(dataset.scheduler_config, **own_param)
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


def flow_schedule(dataset: DatasetInfo, recipe: dict) -> tuple[list[float], list[float]]:
    """(sigmas, timesteps) a flow student was trained between, the final sigma 0 left out: the teacher's
    recorded timesteps t (the student's time input, ``noise_levels``) at every row (no step distillation)
    or at the start rows 0, k, 2k, ... of its jumps (``step_rows``), and sigma = t / num_train_timesteps."""
    from students.distill.batches import step_rows

    ts = teacher_timesteps(dataset)
    if recipe.get("step_weight"):
        ts = [ts[r] for r in step_rows(len(ts), int(recipe["student_steps"]))]
    scale = float(dataset.scheduler_config.get("num_train_timesteps", 1000))
    return [t / scale for t in ts], ts


def flow_scheduler(dataset: DatasetInfo, recipe: dict):
    """(scheduler, info) of a flow student: ``TrainedSigmasFlowScheduler`` at ``flow_schedule``'s sigmas, its
    config otherwise the teacher's (dynamic shifting off: the sigmas are the teacher's shifted ones already)."""
    from teachers.flow_scheduler import TrainedSigmasFlowScheduler

    sigmas, ts = flow_schedule(dataset, recipe)
    scheduler = TrainedSigmasFlowScheduler.from_config(dataset.scheduler_config, use_dynamic_shifting=False,
                                                       trained_sigmas=sigmas, trained_timesteps=ts)
    scheduler.set_timesteps(len(sigmas))
    return scheduler, dict(num_inference_steps=len(sigmas), timesteps=[float(t) for t in scheduler.timesteps],
                           trained_timesteps=ts, trained_sigmas=sigmas, timesteps_exact=True)


@torch_no_grad
def flow_sample(student, scheduler, noise, cond, uncond, pooled=None, pooled_uncond=None, guidance: float = 1.0):
    """The trainer's own sampler of a flow student: Euler over ``scheduler``'s sigmas, z_{i+1} = z_i +
    (s_{i+1} - s_i) v_i, v_i the student's velocity at (z_i, timesteps[i]) guided as SD3 does
    (v_u + w (v_c - v_u), one batch of [uncond, cond], when w > 1). ``noise`` (B, C, h, w), ``cond``/``uncond``
    (B, L, D), ``pooled``/``pooled_uncond`` (B, P). -> the final latents (B, C, h, w), float32."""
    import torch

    scheduler.set_timesteps(len(scheduler.config.trained_sigmas))
    z = noise.float()
    cfg = guidance > 1
    text = torch.cat([uncond, cond]) if cfg else cond
    added = None
    if pooled is not None:
        added = {"text_embeds": torch.cat([pooled_uncond, pooled]) if cfg else pooled}
    sig = scheduler.sigmas
    for i, t in enumerate(scheduler.timesteps):
        zin = torch.cat([z, z]) if cfg else z
        v = student(zin, t.expand(zin.shape[0]), encoder_hidden_states=text, added_cond_kwargs=added).sample
        if cfg:
            v_u, v_c = v.chunk(2)
            v = v_u + guidance * (v_c - v_u)
        z = (z.float() + (sig[i + 1] - sig[i]) * v).to(v.dtype)
    return z.float()


def guidance_for(dataset: DatasetInfo) -> float:
    """The CFG weight the teacher dump used (a range: 7.5 clamped into it; SnapFusion samples w in [2, 14])."""
    sampler = dataset.dump_recipe.sampler
    if sampler.guidance_range:
        lo, hi = sampler.guidance_range
        return float(min(max(7.5, lo), hi))
    return float(sampler.guidance_scale)


def student_sampling(dataset: DatasetInfo, recipe: dict, *, height: int | None = None) -> tuple[object, dict]:
    """(scheduler, description) of how the student samples, written into every checkpoint.

    ``description``: ``num_inference_steps``, ``timesteps``, ``trained_timesteps``, ``timesteps_exact``
    (from ``student_scheduler``), ``guidance_scale`` (the dump's, ``guidance_for``), ``prediction_type``
    (the student's own), ``height``/``width`` (pixels; the dump's, else ``height``) and ``teacher`` (spec).
    """
    scheduler, info = student_scheduler(dataset, recipe)
    dump = dataset.dump_recipe
    size = dump.sampler.height or height
    return scheduler, dict(info, guidance_scale=guidance_for(dataset),
                           prediction_type=recipe.get("prediction_type") or dataset.prediction_type or "epsilon",
                           height=None if size is None else int(size),
                           width=None if size is None else int(dump.sampler.width or size),
                           teacher=dump.teacher)


def teacher_sampler(dataset: DatasetInfo):
    """The scheduler the dump ran its teacher with (class and config from ``dataset.json``)."""
    from teachers.sampler import scheduler_class

    return scheduler_class(dataset.scheduler_class).from_config(dataset.scheduler_config)


def teacher_pipeline(teacher, scheduler):
    """The teacher's own pipeline (its UNet, or an SD3 teacher's transformer) with ``scheduler`` (the dump's,
    ``teacher_sampler``): the teacher row of the training grids. ``teacher`` is a ``teachers.load.Teacher``."""
    if teacher.is_flow:  # student_pipeline would seat the network as a student's UNet
        pipe = type(teacher.pipe)(**dict(teacher.pipe.components, scheduler=scheduler))
        pipe.set_progress_bar_config(disable=True)
        return pipe
    return student_pipeline(teacher, teacher.unet, scheduler)


def student_pipeline(teacher, unet, scheduler, decoder=None):
    """The teacher's pipeline class and text side with the student ``unet``, ``scheduler`` and ``decoder``
    (else the teacher's VAE): what ``distill export`` writes and what the training grids sample.
    ``teacher`` is a ``teachers.load.Teacher``; its modules are shared, not copied."""
    if teacher.is_flow:  # SD3's pipeline: the student UNet in the transformer's seat (students.models.flow_student)
        from students.models.flow_student import FlowUNetTransformer

        transformer = FlowUNetTransformer.wrap(unet, patch_size=int(teacher.denoiser.config.patch_size))
        pipe = type(teacher.pipe)(**dict(teacher.pipe.components, transformer=transformer, scheduler=scheduler,
                                         vae=decoder or teacher.pipe.vae))
        pipe.set_progress_bar_config(disable=True)
        return pipe
    components = dict(teacher.pipe.components, unet=unet, scheduler=scheduler, vae=decoder or teacher.pipe.vae)
    extra = ({"force_zeros_for_empty_prompt": teacher.pipe.config.force_zeros_for_empty_prompt} if teacher.is_xl
             else {"requires_safety_checker": False})
    pipe = type(teacher.pipe)(**components, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe
