"""The trajectory sampler: classifier-free-guided sampling that records what distillation needs.

For a batch of requests (prompt, seed, guidance scale) it runs the teacher's denoising loop, with
the conditional and unconditional branches in one batched UNet call, and records per sample:

- ``prompt_embeds`` (SDXL: ``pooled_prompt_embeds`` and ``add_time_ids`` too),
- ``noise``: the initial Gaussian noise, drawn from the sample's own seed on the CPU,
- ``latents``: the latent before each recorded step, and the final latent last,
- ``pred_cond`` / ``pred_uncond``: the teacher's raw outputs (epsilon or v) at the recorded steps,
- ``feats``: outputs of chosen UNet blocks (``down_blocks.N``, ``mid_block``, ``up_blocks.N``) from
  the conditional branch at a few feature steps drawn from the sample's seed,
- optionally the decoded image.

The loop is diffusers' ``StableDiffusionPipeline.__call__`` / ``StableDiffusionXLPipeline.__call__``
step for step (same prompt encoding, noise, scheduler calls and guidance arithmetic), so the final
latent equals the pipeline's ``output_type="latent"`` result; tests check that. It differs only in
what it records and in allowing a guidance scale per sample (SnapFusion's CFG range).
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

SCHEDULERS = {  # recipe name -> diffusers class name
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplerConfig:
    num_inference_steps: int = 50  # teacher denoising steps S
    scheduler: str = "ddim"  # one of SCHEDULERS (DPM-Solver++ = multistep, algorithm dpmsolver++)
    guidance_scale: float = 7.5  # CFG weight w, used when guidance_range is None
    guidance_range: tuple[float, float] | None = None  # per-sample w ~ U[lo, hi] from the seed (SnapFusion: [2, 14])
    height: int | None = None  # image px; None = the teacher's native resolution
    width: int | None = None  # image px; None = the teacher's native resolution
    record_steps: tuple[int, ...] | None = None  # step indices (0..S-1) whose latents/predictions are kept; None = all
    feature_layers: tuple[str, ...] = ("mid_block",)  # UNet blocks whose outputs are captured
    num_feature_steps: int = 2  # feature steps per sample, drawn from the recorded steps by seed
    save_image: bool = False  # decode the final latent with the teacher VAE
    eta: float = 0.0  # DDIM eta (0 = deterministic)

    def __post_init__(self) -> None:
        if self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps={self.num_inference_steps} must be >= 1")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler {self.scheduler!r} is not one of {', '.join(SCHEDULERS)}")
        if self.guidance_range is not None:
            lo, hi = self.guidance_range
            if not 0 <= lo <= hi:
                raise ValueError(f"guidance_range={self.guidance_range} must satisfy 0 <= lo <= hi")
        if self.record_steps is not None:
            bad = [s for s in self.record_steps if not 0 <= s < self.num_inference_steps]
            if bad or len(set(self.record_steps)) != len(self.record_steps) or not self.record_steps:
                raise ValueError(f"record_steps={self.record_steps} must be distinct indices in [0, {self.num_inference_steps})")
        if self.num_feature_steps < 0 or (self.feature_layers and self.num_feature_steps > len(self.recorded_steps)):
            raise ValueError(f"num_feature_steps={self.num_feature_steps} must be between 0 and the number of recorded steps")

    @property
    def recorded_steps(self) -> tuple[int, ...]:
        return tuple(sorted(self.record_steps)) if self.record_steps is not None else tuple(range(self.num_inference_steps))


@dataclasses.dataclass(frozen=True)
class SampleRequest:
    key: str  # the record's key
    prompt: str
    seed: int  # seeds the noise, the guidance draw and the feature steps
    guidance_scale: float | None = None  # overrides the config's fixed/range guidance


@dataclasses.dataclass
class SampleResult:
    """One generation. Arrays are numpy, float32 unless the teacher ran in a lower precision."""

    key: str
    prompt: str
    seed: int
    guidance_scale: float
    num_tokens: int  # prompt length in CLIP tokens incl. BOS/EOS; > 77 means truncated
    prompt_embeds: np.ndarray  # (77, D)
    noise: np.ndarray  # (4, h, w)
    latents: np.ndarray  # (S_rec + 1, 4, h, w): before each recorded step, then the final latent
    pred_cond: np.ndarray  # (S_rec, 4, h, w)
    pred_uncond: np.ndarray  # (S_rec, 4, h, w)
    feature_steps: list[int]  # step indices where features were captured
    feats: dict[str, np.ndarray]  # layer -> (F, C, H, W)
    pooled_prompt_embeds: np.ndarray | None = None  # SDXL (D2,)
    add_time_ids: np.ndarray | None = None  # SDXL (6,)
    image: np.ndarray | None = None  # (H, W, 3) uint8


@dataclasses.dataclass
class BatchInfo:
    """What is the same for every sample of a recipe (stored once per dataset)."""

    timesteps: list[int]  # all S timesteps of the schedule
    recorded_steps: list[int]
    negative_prompt_embeds: np.ndarray  # (77, D) the unconditional embedding
    negative_pooled_prompt_embeds: np.ndarray | None
    scheduler_class: str
    scheduler_config: dict
    prediction_type: str


def _sub_seed(seed: int, purpose: str) -> int:
    digest = hashlib.sha256(f"{seed}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def draw_guidance(cfg: SamplerConfig, seed: int) -> float:
    """The guidance scale for a sample: fixed, or U[lo, hi] drawn from its seed."""
    if cfg.guidance_range is None:
        return float(cfg.guidance_scale)
    lo, hi = cfg.guidance_range
    return float(np.random.default_rng(_sub_seed(seed, "guidance")).uniform(lo, hi))


def draw_feature_steps(cfg: SamplerConfig, seed: int) -> list[int]:
    """``num_feature_steps`` distinct recorded steps drawn from the sample's seed, ascending."""
    if not cfg.feature_layers or cfg.num_feature_steps == 0:
        return []
    rng = np.random.default_rng(_sub_seed(seed, "feature_steps"))
    return sorted(int(s) for s in rng.choice(cfg.recorded_steps, size=cfg.num_feature_steps, replace=False))


def make_scheduler(teacher, name: str):
    """A fresh scheduler of family ``name`` with the teacher's noise schedule (schedulers are stateful)."""
    import diffusers

    cls = getattr(diffusers, SCHEDULERS[name])
    extra = {"algorithm_type": "dpmsolver++"} if name == "dpm++" else {}
    return cls.from_config(teacher.pipe.scheduler.config, **extra)


def resolve_size(teacher, cfg: SamplerConfig) -> tuple[int, int]:
    height = cfg.height or teacher.default_resolution
    width = cfg.width or teacher.default_resolution
    teacher.check_resolution(height, width)
    return height, width


def resolve_modules(unet, names) -> dict[str, object]:
    """Map block names (``down_blocks.N``, ``mid_block``, ``up_blocks.N``) to module objects.

    Hooks go on the objects, not on name strings, so a DDP/compile wrapper's prefix cannot break them.
    """
    unet = getattr(unet, "module", unet)  # DistributedDataParallel
    unet = getattr(unet, "_orig_mod", unet)  # torch.compile
    modules = {}
    for name in names:
        try:
            modules[name] = unet.get_submodule(name)
        except AttributeError:
            raise ValueError(f"feature layer {name!r} is not a module of the teacher UNet "
                             "(expected down_blocks.N, mid_block or up_blocks.N)") from None
    return modules


class FeatureCapture:
    """Forward hooks that keep the cond-branch output of chosen blocks while ``active``."""

    def __init__(self, modules: dict[str, object], batch_size: int):
        self.batch_size = batch_size
        self.active = False
        self.captured: dict[str, object] = {}
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name):
        def hook(module, inputs, output):
            if self.active:
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


def sample_trajectories(teacher, requests: list[SampleRequest], cfg: SamplerConfig) -> tuple[list[SampleResult], BatchInfo]:
    """Run CFG sampling for ``requests`` as one batch and record trajectories and features."""
    import torch
    from diffusers.utils.torch_utils import randn_tensor

    pipe, device, batch = teacher.pipe, pipe_device(teacher), len(requests)
    height, width = resolve_size(teacher, cfg)
    prompts = [r.prompt for r in requests]
    guidance = [r.guidance_scale if r.guidance_scale is not None else draw_guidance(cfg, r.seed) for r in requests]
    feature_steps = [draw_feature_steps(cfg, r.seed) for r in requests]
    recorded = cfg.recorded_steps
    # One forward at a time per teacher: feature hooks live on the shared UNet's modules, and a
    # Beam worker may run several DoFn threads over the one teacher that Shared hands out.
    with teacher.lock, torch.inference_mode():
        cond, uncond, pooled, neg_pooled, time_ids = _encode(teacher, prompts, device, height, width)
        scheduler = make_scheduler(teacher, cfg.scheduler)
        scheduler.set_timesteps(cfg.num_inference_steps, device=device)
        timesteps = scheduler.timesteps
        # Noise: one CPU generator per sample, as the pipeline does with a list of generators.
        generators = [torch.Generator("cpu").manual_seed(r.seed) for r in requests]
        shape = (batch, pipe.unet.config.in_channels, height // teacher.vae_scale_factor, width // teacher.vae_scale_factor)
        noise = randn_tensor(shape, generator=generators, device=torch.device(device), dtype=cond.dtype)
        latents = noise * scheduler.init_noise_sigma
        extra_step_kwargs = _extra_step_kwargs(scheduler, generators, cfg.eta)
        embeds = torch.cat([uncond, cond])
        added = None
        if teacher.is_xl:
            added = {"text_embeds": torch.cat([neg_pooled, pooled]), "time_ids": torch.cat([time_ids, time_ids])}
        w = torch.tensor(guidance, dtype=cond.dtype, device=device).view(batch, 1, 1, 1)
        want_feats = {s for fs in feature_steps for s in fs}
        capture = FeatureCapture(resolve_modules(pipe.unet, cfg.feature_layers), batch)
        rec_latents, rec_cond, rec_uncond, feats = [], [], [], {}
        try:
            for i, t in enumerate(timesteps):
                model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
                capture.active, capture.captured = i in want_feats, {}
                out = pipe.unet(model_input, t, encoder_hidden_states=embeds, added_cond_kwargs=added, return_dict=False)[0]
                pred_uncond, pred_cond = out.chunk(2)
                if i in recorded:
                    rec_latents.append(latents.float().cpu())
                    rec_cond.append(pred_cond.float().cpu())
                    rec_uncond.append(pred_uncond.float().cpu())
                if capture.active:
                    feats[i] = {k: v.float().cpu() for k, v in capture.captured.items()}
                guided = pred_uncond + w * (pred_cond - pred_uncond)
                latents = scheduler.step(guided, t, latents, **extra_step_kwargs, return_dict=False)[0]
        finally:
            capture.remove()
        rec_latents.append(latents.float().cpu())
        images = _decode(teacher, latents) if cfg.save_image else None
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
            image=images[b] if images is not None else None,
        ))
    info = BatchInfo(
        timesteps=[int(t) for t in timesteps], recorded_steps=list(recorded),
        negative_prompt_embeds=uncond[0].float().cpu().numpy(),
        negative_pooled_prompt_embeds=neg_pooled[0].float().cpu().numpy() if neg_pooled is not None else None,
        scheduler_class=type(scheduler).__name__,
        # Private keys ("_use_default_values") come from a set: their order changes run to run.
        scheduler_config={k: v for k, v in scheduler.config.items() if not k.startswith("_")},
        prediction_type=scheduler.config.get("prediction_type", "epsilon"),
    )
    return results, info


def _extra_step_kwargs(scheduler, generators, eta: float) -> dict:
    """``eta`` and ``generator`` where the scheduler's ``step`` takes them (the pipeline's own rule)."""
    import inspect

    params = inspect.signature(scheduler.step).parameters
    kwargs = {"eta": eta} if "eta" in params else {}
    if "generator" in params:
        kwargs["generator"] = generators
    return kwargs


def pipe_device(teacher) -> str:
    return str(teacher.pipe.unet.device)


def _decode(teacher, latents) -> np.ndarray:
    """Final latents -> uint8 images (B, H, W, 3), as the pipeline's ``output_type="np"`` does."""
    import torch

    vae = teacher.pipe.vae
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    dec = vae.to(torch.float32) if upcast else vae
    x = latents.to(dec.dtype) / dec.config.scaling_factor
    image = dec.decode(x, return_dict=False)[0]
    if upcast:
        vae.to(torch.float16)
    image = (image.float() / 2 + 0.5).clamp(0, 1)
    return (image.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
