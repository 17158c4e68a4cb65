"""The trajectory sampler: classifier-free-guided sampling that records what distillation needs.

For a batch of requests (prompt, seed, guidance scale) it runs the teacher's denoising loop, with
the conditional and unconditional branches in one batched UNet call, and records per sample:

- ``prompt_embeds`` (SDXL: ``pooled_prompt_embeds`` and ``add_time_ids`` too),
- ``noise``: the initial Gaussian noise, drawn from the sample's own seed on the CPU,
- ``latents``: the UNet's input latent at each recorded step (the scheduler's ``scale_model_input``
  of the sampling state), and the final latent last,
- ``timesteps`` (exact floats, all S steps of the schedule) and, per recorded step, ``alphas`` and
  ``sigmas``: the variance-preserving coefficients of that input, ``latents[i] = alphas[i] x0 +
  sigmas[i] eps`` (``final_alpha``/``final_sigma`` for the final latent),
- ``pred_cond`` / ``pred_uncond``: the teacher's raw outputs (epsilon or v) at the recorded steps,
- ``feats``: outputs of chosen UNet blocks (``down_blocks.N``, ``mid_block``, ``up_blocks.N``) from
  the conditional branch at a few feature steps drawn from the sample's seed,
- optionally the decoded image,
- optionally (``real_images``) a real image of the caption encoded by the teacher's VAE
  (``image_latents``; ``teachers.real_image``).

The loop is diffusers' ``StableDiffusionPipeline.__call__`` / ``StableDiffusionXLPipeline.__call__``
step for step (same prompt encoding, noise, scheduler calls and guidance arithmetic), so the final
latent equals the pipeline's ``output_type="latent"`` result; tests check that. It differs only in
what it records and in allowing a guidance scale per sample (SnapFusion's CFG range).

One parameterisation whatever the scheduler. The UNet of a variance-preserving teacher is trained
on ``z_t = alpha_t x0 + sigma_t eps`` (alpha_t^2 + sigma_t^2 = 1); that is what it receives at every
step, so that is what is recorded. DDIM and DPM-Solver++ keep their state as z_t already
(``scale_model_input`` is the identity). Euler keeps the variance-exploding ``x = x0 + s eps`` and
feeds the UNet ``x / sqrt(s^2 + 1)``, which is z_t with alpha = 1/sqrt(s^2 + 1), sigma = s alpha
(Karras et al. 2022, EDM, Table 1 "VP"); the record holds that scaled input, not the state.
Readers convert through ``shards.record.noise_levels``.

Guidance: CFG is applied in float32 with the float32 weight recorded (``guidance_scale``), so the
json holds the weight the arithmetic used even for bfloat16/float16 teachers. A weight at or
below 1 disables CFG exactly as diffusers does (``do_classifier_free_guidance = guidance_scale >
1``): that sample follows the conditional prediction alone and records ``guidance_scale = 1.0``,
the weight for which the CFG formula gives that prediction (both branches are still recorded).
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

from core.errors import UserError
from shards.recipe import FLOW_SCHEDULERS, SCHEDULERS, SamplerConfig  # noqa: F401 (the sampler's settings live with the recipe)

DEFAULT_FEATURE_LAYERS = ("mid_block",)  # UNet teachers; a flow teacher's default: flow_feature_layers()


@dataclasses.dataclass(frozen=True)
class SampleRequest:
    key: str  # the record's key
    prompt: str
    seed: int  # seeds the noise, the guidance draw and the feature steps
    guidance_scale: float | None = None  # overrides the config's fixed/range guidance (<= 1: no CFG)
    image: str | None = None  # path/URL of a real image of the prompt (real_images; teachers.real_image)


@dataclasses.dataclass
class SampleResult:
    """One generation. Arrays are numpy, float32 unless the teacher ran in a lower precision."""

    key: str
    prompt: str
    seed: int
    guidance_scale: float  # the CFG weight applied (float32-exact; 1.0 where CFG was off)
    num_tokens: int  # prompt length in CLIP tokens incl. BOS/EOS; > 77 means truncated
    prompt_embeds: np.ndarray  # (77, D)
    noise: np.ndarray  # (4, h, w)
    latents: np.ndarray  # (S_rec + 1, 4, h, w): UNet input (VP z_t) at each recorded step, then the final latent
    pred_cond: np.ndarray  # (S_rec, 4, h, w)
    pred_uncond: np.ndarray  # (S_rec, 4, h, w)
    feature_steps: list[int]  # step indices where features were captured
    feats: dict[str, np.ndarray]  # layer -> (F, C, H, W)
    pooled_prompt_embeds: np.ndarray | None = None  # SDXL (D2,)
    add_time_ids: np.ndarray | None = None  # SDXL (6,)
    image: np.ndarray | None = None  # (H, W, 3) uint8; all zeros where image_error is set (never stored)
    image_error: str | None = None  # reason code when the decoded image was unusable (non-finite): a rejection
    noise_schedule: "NoiseSchedule | None" = None  # timesteps and VP coefficients (json fields)
    image_latents: np.ndarray | None = None  # (4, h, w) a real image of the prompt, VAE-encoded (real_images)
    real_image_error: str | None = None  # "reason: detail" when real_images found no usable image: a rejection


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    """Where a trajectory's recorded latents sit: the json fields ``shards.record.noise_levels`` reads."""

    timesteps: list[float]  # all S UNet timesteps of the schedule, exact (Euler's are not integers)
    recorded_steps: list[int]  # step indices kept; the rows of latents[:-1], pred_cond, pred_uncond
    alphas: list[float]  # per recorded step: latents[i] = alphas[i] x0 + sigmas[i] eps
    sigmas: list[float]  # per recorded step
    final_alpha: float  # the final latent's coefficients (1, 0 unless DDIM stops at alphas_cumprod[0])
    final_sigma: float

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class BatchInfo:
    """What is the same for every sample of a recipe (stored once per dataset)."""

    timesteps: list[float]  # all S timesteps of the schedule, exact
    recorded_steps: list[int]
    negative_prompt_embeds: np.ndarray  # (77, D) the unconditional embedding
    negative_pooled_prompt_embeds: np.ndarray | None
    scheduler_class: str
    scheduler_config: dict
    prediction_type: str
    noise_schedule: NoiseSchedule | None = None


def _sub_seed(seed: int, purpose: str) -> int:
    digest = hashlib.sha256(f"{seed}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def draw_guidance(cfg: SamplerConfig, seed: int) -> float:
    """The guidance scale for a sample: fixed, or U[lo, hi] drawn from its seed; float32-exact
    (the value the sampler's float32 arithmetic applies, see ``applied_guidance``)."""
    if cfg.guidance_range is None:
        return applied_guidance(cfg.guidance_scale)
    lo, hi = cfg.guidance_range
    return applied_guidance(np.random.default_rng(_sub_seed(seed, "guidance")).uniform(lo, hi))


def applied_guidance(w: float) -> float:
    """The CFG weight the sampler applies for a requested ``w``: ``w`` rounded to float32, or 1.0
    for ``w <= 1`` (diffusers runs no CFG there, and w = 1 is the weight meaning "cond alone").
    NaN and huge weights stay NaN/inf, so that sample's trajectory is non-finite and rejected."""
    if w <= 1:
        return 1.0
    with np.errstate(over="ignore"):  # beyond float32's range: inf, rejected downstream as non_finite
        return float(np.float32(w))


def noise_schedule_of(scheduler, recorded: tuple[int, ...]) -> NoiseSchedule:
    """The VP coefficients of the UNet input at each step of a scheduler after ``set_timesteps``.

    Euler and DPM-Solver keep a variance-exploding sigma s per step (``scheduler.sigmas``, S + 1
    entries, the last for the final latent); their UNet input is z_t with alpha = 1/sqrt(1 + s^2),
    sigma = s alpha (the scaling ``scale_model_input`` and DPM-Solver's ``_sigma_to_alpha_sigma_t``
    apply). DDIM indexes ``alphas_cumprod`` at the integer timestep: alpha = sqrt(abar), sigma =
    sqrt(1 - abar), and its final latent sits at ``final_alpha_cumprod``. The flow-matching Euler
    scheduler's state is the rectified-flow z = (1 - s) x0 + s eps itself (the transformer's input):
    alpha = 1 - s, sigma = s with its shifted ``sigmas`` (S + 1, the last 0). Float64 throughout.
    """
    timesteps = [float(t) for t in scheduler.timesteps]
    ve = getattr(scheduler, "sigmas", None)
    if type(scheduler).__name__ == SCHEDULERS["flow-euler"]:  # rectified flow: z = (1 - s) x0 + s eps
        s = np.asarray(ve.double().cpu().numpy(), np.float64)
        alpha, sigma = 1.0 - s, s
    elif ve is not None and len(ve) == len(timesteps) + 1:
        s = np.asarray(ve.double().cpu().numpy() if hasattr(ve, "double") else ve, np.float64)
        alpha = 1.0 / np.sqrt(1.0 + s * s)
        sigma = s * alpha
    elif hasattr(scheduler, "final_alpha_cumprod"):
        abar_all = np.asarray(scheduler.alphas_cumprod.double().cpu().numpy(), np.float64)
        abar = np.append(abar_all[[int(round(t)) for t in timesteps]], float(scheduler.final_alpha_cumprod))
        alpha, sigma = np.sqrt(abar), np.sqrt(1.0 - abar)
    else:
        raise ValueError(f"{type(scheduler).__name__}: no per-step sigmas and no alphas_cumprod to record")
    rows = list(recorded)
    return NoiseSchedule(timesteps=timesteps, recorded_steps=rows, alphas=[float(alpha[i]) for i in rows],
                         sigmas=[float(sigma[i]) for i in rows], final_alpha=float(alpha[-1]),
                         final_sigma=float(sigma[-1]))


def draw_feature_steps(cfg: SamplerConfig, seed: int) -> list[int]:
    """``num_feature_steps`` distinct recorded steps drawn from the sample's seed, ascending."""
    if cfg.feature_layers == () or cfg.num_feature_steps == 0:  # None: the teacher's default layers
        return []
    rng = np.random.default_rng(_sub_seed(seed, "feature_steps"))
    return sorted(int(s) for s in rng.choice(cfg.recorded_steps, size=cfg.num_feature_steps, replace=False))


def scheduler_class(name: str):
    """The scheduler class a dump or config names: diffusers' own, or this project's
    ``OffsetDDIMScheduler`` (the exported scheduler of a step-distilled student; teachers/offset_scheduler.py)."""
    import diffusers

    if name == "OffsetDDIMScheduler":
        from teachers.offset_scheduler import OffsetDDIMScheduler

        return OffsetDDIMScheduler
    return getattr(diffusers, name)


def flow_feature_layers(num_blocks: int) -> tuple[str, ...]:
    """A flow teacher's default feature layers: its middle and last joint transformer blocks."""
    return tuple(dict.fromkeys((f"transformer_blocks.{num_blocks // 2}", f"transformer_blocks.{num_blocks - 1}")))


def default_scheduler(teacher) -> str:
    return "flow-euler" if teacher.is_flow else "ddim"


def resolve_config(teacher, cfg: SamplerConfig) -> SamplerConfig:
    """``cfg`` with its ``None`` scheduler and feature layers replaced by the teacher family's defaults;
    a scheduler of the other family is a ``UserError``."""
    scheduler = cfg.scheduler or default_scheduler(teacher)
    if (scheduler in FLOW_SCHEDULERS) != teacher.is_flow:
        allowed = FLOW_SCHEDULERS if teacher.is_flow else tuple(n for n in SCHEDULERS if n not in FLOW_SCHEDULERS)
        kind = "a flow-matching" if teacher.is_flow else "a diffusion (epsilon/v)"
        raise UserError(f"scheduler {scheduler!r} does not sample teacher {teacher.spec!r}, {kind} teacher: "
                        f"use {' or '.join(allowed)}")
    layers = cfg.feature_layers
    if layers is None:
        layers = flow_feature_layers(teacher.denoiser.config.num_layers) if teacher.is_flow else DEFAULT_FEATURE_LAYERS
    if layers == cfg.feature_layers and scheduler == cfg.scheduler:
        return cfg
    return dataclasses.replace(cfg, scheduler=scheduler, feature_layers=layers)


def make_scheduler(teacher, name: str | None):
    """A fresh scheduler of family ``name`` with the teacher's noise schedule (schedulers are stateful).
    A teacher whose own scheduler subclasses that family (an exported student's ``OffsetDDIMScheduler``)
    keeps its class, so its own timesteps. A flow teacher's is its ``FlowMatchEulerDiscreteScheduler``
    config as it is (its ``shift``, dynamic shifting and terminal stretch). ``None``: the family's default."""
    import diffusers

    name = name or default_scheduler(teacher)
    cls = getattr(diffusers, SCHEDULERS[name])
    own = type(teacher.pipe.scheduler)
    if own is not cls and issubclass(own, cls):
        cls = own
    extra = {"algorithm_type": "dpmsolver++"} if name == "dpm++" else {}
    return cls.from_config(teacher.pipe.scheduler.config, **extra)


def resolve_size(teacher, cfg: SamplerConfig) -> tuple[int, int]:
    height = cfg.height or teacher.default_resolution
    width = cfg.width or teacher.default_resolution
    teacher.check_resolution(height, width)
    return height, width


def resolve_modules(unet, names) -> dict[str, object]:
    """Map block names (``down_blocks.N``, ``mid_block``, ``up_blocks.N``; a transformer's
    ``transformer_blocks.N``) to module objects.

    Hooks go on the objects, not on name strings, so a DDP/compile wrapper's prefix cannot break them.
    """
    unet = getattr(unet, "module", unet)  # DistributedDataParallel
    unet = getattr(unet, "_orig_mod", unet)  # torch.compile
    transformer = hasattr(unet, "transformer_blocks")
    modules = {}
    for name in names:
        kind, _, num = name.partition(".")
        try:
            if transformer and not (kind == "transformer_blocks" and num.isdigit()):
                raise AttributeError(name)
            modules[name] = unet.get_submodule(name)
        except AttributeError:
            expected = "transformer_blocks.N" if transformer else "down_blocks.N, mid_block or up_blocks.N"
            raise ValueError(f"feature layer {name!r} is not a module of the teacher "
                             f"{'transformer' if transformer else 'UNet'} (expected {expected})") from None
    return modules


def tokens_to_maps(tokens, height: int, width: int):
    """Image tokens ``(B, N, C)`` of a patch transformer -> maps ``(B, C, height, width)``.

    ``N = height * width`` in row-major order: diffusers' ``PatchEmbed`` flattens the patch grid
    (``flatten(2).transpose(1, 2)``), so token ``r * width + c`` is the patch at row r, column c."""
    b, n, c = tokens.shape
    if n != height * width:
        raise ValueError(f"{n} image tokens do not form a {height} x {width} patch grid")
    return tokens.reshape(b, height, width, c).permute(0, 3, 1, 2)


class FeatureCapture:
    """Forward hooks that keep the cond-branch output of chosen blocks while ``active``.

    UNet blocks: the output (a down block's ``(hidden, res_samples)``: its hidden states). SD3 joint
    transformer blocks return ``(context tokens, image tokens)``: the image tokens, reshaped to
    ``(C, H/p, W/p)`` maps over the patch grid (``grid``; ``tokens_to_maps``)."""

    def __init__(self, modules: dict[str, object], batch_size: int, grid: tuple[int, int] | None = None):
        self.batch_size = batch_size
        self.grid = grid
        self.active = False
        self.captured: dict[str, object] = {}
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name):
        def hook(module, inputs, output):
            if self.active:
                if self.grid is not None:  # joint block: (encoder_hidden_states, hidden_states)
                    out = tokens_to_maps(output[1], *self.grid)
                else:
                    out = output[0] if isinstance(output, tuple) else output  # down blocks: (hidden, res_samples)
                self.captured[name] = out[self.batch_size :].detach()  # second half = cond branch
        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _encode(teacher, prompts, device, height, width):
    """Prompt encoding exactly as the diffusers pipeline does it (its own ``encode_prompt``)."""
    pipe = teacher.pipe
    if teacher.is_flow:  # CLIP-L and bigG penultimate states, padded, then T5's (zeros without T5)
        cond, uncond, pooled, neg_pooled = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None,
                                                              device=device, num_images_per_prompt=1,
                                                              do_classifier_free_guidance=True)
        return cond, uncond, pooled, neg_pooled, None
    if not teacher.is_xl:
        cond, uncond = pipe.encode_prompt(prompts, device, 1, True, negative_prompt=None)
        return cond, uncond, None, None, None
    cond, uncond, pooled, neg_pooled = pipe.encode_prompt(prompt=prompts, device=device, num_images_per_prompt=1,
                                                          do_classifier_free_guidance=True)
    time_ids = pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=cond.dtype,
                                      text_encoder_projection_dim=int(pooled.shape[-1]))
    return cond, uncond, pooled, neg_pooled, time_ids.to(device).repeat(len(prompts), 1)


def _num_tokens(tokenizer, prompts) -> list[int]:
    return [len(ids) for ids in tokenizer(list(prompts), truncation=False)["input_ids"]]


def _set_timesteps(teacher, scheduler, num_steps: int, device, latent_shape) -> None:
    """``set_timesteps`` as the teacher's pipeline calls it: an SD3 scheduler with dynamic shifting
    gets the pipeline's ``mu`` for the image's token count (``calculate_shift``)."""
    if teacher.is_flow and scheduler.config.get("use_dynamic_shifting", False):
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        patch = teacher.denoiser.config.patch_size
        seq_len = (latent_shape[-2] // patch) * (latent_shape[-1] // patch)
        c = scheduler.config
        mu = calculate_shift(seq_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                             c.get("base_shift", 0.5), c.get("max_shift", 1.16))
        scheduler.set_timesteps(num_steps, device=device, mu=mu)
    else:
        scheduler.set_timesteps(num_steps, device=device)


def _check_flow_scheduler(scheduler) -> None:
    """The flow states this sampler records: the deterministic Euler ODE on sigmas falling to 0."""
    for flag in ("stochastic_sampling", "invert_sigmas"):
        if scheduler.config.get(flag, False):
            raise UserError(f"{type(scheduler).__name__} with {flag}=True: its states are not the deterministic "
                            "rectified-flow trajectory z = (1 - sigma) x0 + sigma eps this sampler records")


def sample_trajectories(teacher, requests: list[SampleRequest], cfg: SamplerConfig) -> tuple[list[SampleResult], BatchInfo]:
    """Run CFG sampling for ``requests`` as one batch and record trajectories and features.

    A flow teacher (``teacher.is_flow``: StableDiffusion3Pipeline) runs as that pipeline's
    ``__call__`` does: the transformer on ``cat([latents] * 2)`` with the timestep expanded to the
    batch, ``encoder_hidden_states`` and ``pooled_projections``, CFG on the velocities, and the
    flow-matching Euler step ``z <- z + (sigma_next - sigma) v``. Its record: ``prediction_type``
    ``flow`` (the outputs are velocities v = eps - x0), latents = the states the transformer received
    (alpha = 1 - sigma), pooled embeddings, and image-token feature maps of ``transformer_blocks.N``.
    """
    import torch
    from diffusers.utils.torch_utils import randn_tensor

    cfg = resolve_config(teacher, cfg)
    pipe, device, batch = teacher.pipe, pipe_device(teacher), len(requests)
    denoiser, flow = teacher.denoiser, teacher.is_flow
    height, width = resolve_size(teacher, cfg)
    prompts = [r.prompt for r in requests]
    requested = [r.guidance_scale if r.guidance_scale is not None else draw_guidance(cfg, r.seed) for r in requests]
    guidance = [applied_guidance(w) for w in requested]
    feature_steps = [draw_feature_steps(cfg, r.seed) for r in requests]
    recorded = cfg.recorded_steps
    # One forward at a time per teacher: feature hooks live on the shared UNet's modules, and a
    # Beam worker may run several DoFn threads over the one teacher that Shared hands out.
    with teacher.lock, torch.inference_mode():
        cond, uncond, pooled, neg_pooled, time_ids = _encode(teacher, prompts, device, height, width)
        shape = (batch, denoiser.config.in_channels, height // teacher.vae_scale_factor, width // teacher.vae_scale_factor)
        scheduler = make_scheduler(teacher, cfg.scheduler)
        if flow:
            _check_flow_scheduler(scheduler)
        _set_timesteps(teacher, scheduler, cfg.num_inference_steps, device, shape)
        timesteps = scheduler.timesteps
        levels = noise_schedule_of(scheduler, recorded)
        # Noise: one CPU generator per sample, as the pipeline does with a list of generators.
        generators = [torch.Generator("cpu").manual_seed(r.seed) for r in requests]
        noise = randn_tensor(shape, generator=generators, device=torch.device(device), dtype=cond.dtype)
        # SD3's prepare_latents starts from the noise itself (sigma_0 = 1 at shift's fixed point).
        latents = noise if flow else noise * scheduler.init_noise_sigma
        extra_step_kwargs = {} if flow else _extra_step_kwargs(scheduler, generators, cfg.eta)
        embeds = torch.cat([uncond, cond])
        added = None
        if teacher.is_xl:
            added = {"text_embeds": torch.cat([neg_pooled, pooled]), "time_ids": torch.cat([time_ids, time_ids])}
        pooled_both = torch.cat([neg_pooled, pooled]) if flow else None
        # CFG in float32 whatever the UNet's dtype, so the weight applied is the float32 weight recorded.
        w = torch.tensor(guidance, dtype=torch.float32, device=device).view(batch, 1, 1, 1)
        cfg_on = torch.tensor([not g <= 1 for g in requested], device=device).view(batch, 1, 1, 1)  # NaN: on
        want_feats = {s for fs in feature_steps for s in fs}
        grid = (shape[-2] // denoiser.config.patch_size, shape[-1] // denoiser.config.patch_size) if flow else None
        capture = FeatureCapture(resolve_modules(denoiser, cfg.feature_layers), batch, grid)
        rec_latents, rec_cond, rec_uncond, feats = [], [], [], {}
        try:
            for i, t in enumerate(timesteps):
                capture.active, capture.captured = i in want_feats, {}
                if flow:  # StableDiffusion3Pipeline: the state itself, the timestep expanded to the batch
                    model_input = torch.cat([latents] * 2)
                    out = denoiser(hidden_states=model_input, timestep=t.expand(model_input.shape[0]),
                                   encoder_hidden_states=embeds, pooled_projections=pooled_both, return_dict=False)[0]
                else:
                    model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
                    out = denoiser(model_input, t, encoder_hidden_states=embeds, added_cond_kwargs=added,
                                   return_dict=False)[0]
                pred_uncond, pred_cond = out.chunk(2)
                if i in recorded:  # the denoiser's input (VP z_t, or the flow state); both halves are equal
                    rec_latents.append(model_input[:batch].float().cpu())
                    rec_cond.append(pred_cond.float().cpu())
                    rec_uncond.append(pred_uncond.float().cpu())
                if capture.active:
                    feats[i] = {k: v.float().cpu() for k, v in capture.captured.items()}
                pu, pc = pred_uncond.float(), pred_cond.float()
                guided = torch.where(cfg_on, pu + w * (pc - pu), pc).to(out.dtype)
                latents = scheduler.step(guided, t, latents, **extra_step_kwargs, return_dict=False)[0]
        finally:
            capture.remove()
        rec_latents.append(latents.float().cpu())
        images = _decode(teacher, latents) if cfg.save_images else [None] * batch
        real_latents, real_errors = _real_latents(teacher, requests, height, width) if cfg.real_images else (
            [None] * batch, [None] * batch)
    num_tokens = _num_tokens(pipe.tokenizer, prompts)
    results = []
    for b, r in enumerate(requests):
        results.append(SampleResult(
            key=r.key, prompt=r.prompt, seed=r.seed, guidance_scale=guidance[b], num_tokens=num_tokens[b],
            prompt_embeds=cond[b].float().cpu().numpy(),
            noise=noise[b].float().cpu().numpy(),
            latents=torch.stack([x[b] for x in rec_latents]).numpy(),
            pred_cond=torch.stack([x[b] for x in rec_cond]).numpy(),
            pred_uncond=torch.stack([x[b] for x in rec_uncond]).numpy(),
            feature_steps=feature_steps[b],
            feats={name: torch.stack([feats[s][name][b] for s in feature_steps[b]]).numpy()
                   for name in cfg.feature_layers} if feature_steps[b] else {},
            pooled_prompt_embeds=pooled[b].float().cpu().numpy() if pooled is not None else None,
            add_time_ids=time_ids[b].float().cpu().numpy() if time_ids is not None else None,
            image=_finite_or_blank(images[b]),
            image_error="non_finite_image" if images[b] is not None and not np.isfinite(images[b]).all() else None,
            noise_schedule=levels,
            image_latents=real_latents[b], real_image_error=real_errors[b],
        ))
    info = BatchInfo(
        timesteps=levels.timesteps, recorded_steps=list(recorded),
        negative_prompt_embeds=uncond[0].float().cpu().numpy(),
        negative_pooled_prompt_embeds=neg_pooled[0].float().cpu().numpy() if neg_pooled is not None else None,
        scheduler_class=type(scheduler).__name__,
        # Private keys ("_use_default_values") come from a set: their order changes run to run.
        scheduler_config={k: v for k, v in scheduler.config.items() if not k.startswith("_")},
        prediction_type=teacher.prediction_type if flow else scheduler.config.get("prediction_type", "epsilon"),
        noise_schedule=levels,
    )
    return results, info


def _real_latents(teacher, requests, height, width) -> tuple[list, list]:
    """Per request: the VAE latents of its real image (or None) and the reason it has none (or None)."""
    from teachers.real_image import encode_images, real_image

    found = [real_image(teacher.spec, r.prompt, r.seed, r.image, height, width) for r in requests]
    ok = [i for i, (image, _) in enumerate(found) if image is not None]
    encoded = encode_images(teacher, [found[i][0] for i in ok]) if ok else []
    latents = [None] * len(requests)
    for i, z in zip(ok, encoded):
        latents[i] = z
    return latents, [error for _, error in found]


def _extra_step_kwargs(scheduler, generators, eta: float) -> dict:
    """``eta`` and ``generator`` where the scheduler's ``step`` takes them (the pipeline's own rule)."""
    import inspect

    params = inspect.signature(scheduler.step).parameters
    kwargs = {"eta": eta} if "eta" in params else {}
    if "generator" in params:
        kwargs["generator"] = generators
    return kwargs


def pipe_device(teacher) -> str:
    return str(teacher.denoiser.device)


def _finite_or_blank(image):
    """A uint8 image as it is; a non-finite float image -> zeros of its shape, so per-batch consumers
    (the image scorer) get a uint8 array; ``image_error`` marks the sample, which ``encode_sample``
    rejects, so the blank is never stored."""
    if image is None or image.dtype == np.uint8:
        return image
    return np.zeros(image.shape, np.uint8)


def _decode(teacher, latents) -> list:
    """Final latents -> per sample a uint8 image (H, W, 3), as the pipeline's ``output_type="np"``
    does, or the float image where it holds NaN/Inf (never cast: NaN would become a plausible
    uint8 value; the sample is then rejected as ``non_finite_image``)."""
    import torch

    vae = teacher.pipe.vae
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    dec = vae.to(torch.float32) if upcast else vae
    x = latents.to(dec.dtype) / dec.config.scaling_factor
    if getattr(dec.config, "shift_factor", None) is not None:  # SD3's VAE: latents = (mean - shift) * scale
        x = x + dec.config.shift_factor
    image = dec.decode(x, return_dict=False)[0]
    if upcast:
        vae.to(torch.float16)
    image = (image.float() / 2 + 0.5).clamp(0, 1)  # clamp keeps NaN: checked below
    arrays = image.permute(0, 2, 3, 1).cpu().numpy() * 255
    return [a.round().astype(np.uint8) if np.isfinite(a).all() else a for a in arrays]
