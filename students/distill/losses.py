"""Distillation objectives as small pure functions (tensors in, tensors out; no I/O, no models).

Notation (Ho et al. 2020; Salimans & Ho 2022): ``z_t = alpha_t x + sigma_t eps`` with
``alpha_t = sqrt(abar_t)``, ``sigma_t = sqrt(1 - abar_t)``; ``v = alpha_t eps - sigma_t x``.
Shapes: latents ``(batch, 4, h, w)``; per-sample scalars ``(batch,)``.

Sources:
- task loss: DDPM eq. 14 (epsilon) / progressive distillation sec. 4 (v).
- output and feature distillation: BK-SDM (Kim et al. 2023, eq. 2-4); SnapGen (Hu et al. 2024,
  sec. 4.1) multi-level KD with timestep-aware scaling.
- step distillation x-target and weight: SnapFusion (Li et al. 2023, sec. 5, eq. 5-6), after
  progressive distillation (Salimans & Ho 2022, Algorithm 2).
- CFG-aware distillation: SnapFusion sec. 5.2 (eq. 7-8).
- decoder distillation: SnapFusion sec. 4.3 (data distillation of the pruned decoder).
- flow matching (the ``flow_*`` functions below, for rectified-flow teachers such as SD3): Esser et
  al. 2024, "Scaling Rectified Flow Transformers" (SD3): the path z_t = (1 - t) x0 + t eps (sec. 2-3,
  "RF"), the conditional flow-matching regression of the velocity eps - x0 (Lipman et al. 2023), its
  logit-normal timestep density (sec. 3.1, m = 0, s = 1 in SD3) and the resolution shift (sec. 5.3.2).
  There ``t`` is the record's ``sigma`` (alpha = 1 - sigma) and v = eps - x0 what ``prediction_type``
  ``flow`` names; shapes as above, any channel count.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _bcast(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def alpha_sigma(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t), each (batch,), for integer ``timesteps`` (batch,) of a 1000-step schedule.

    Used for the task loss's freshly drawn training timesteps only; the noise levels of recorded
    latents come from ``shards.loader.noise_levels``."""
    abar = alphas_cumprod.to(timesteps.device)[timesteps.long()]
    return abar.sqrt(), (1 - abar).sqrt()


def denoising_target(x0: torch.Tensor, noise: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
                     prediction_type: str) -> torch.Tensor:
    """The regression target of a diffusion model: epsilon, or v = alpha eps - sigma x0."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return _bcast(alpha, x0) * noise - _bcast(sigma, x0) * x0
    raise ValueError(f"prediction_type {prediction_type!r} is not 'epsilon' or 'v_prediction'")


def pred_to_x0(pred: torch.Tensor, z_t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
               prediction_type: str) -> torch.Tensor:
    """The model's clean-latent estimate: x = (z - sigma eps)/alpha, or x = alpha z - sigma v."""
    a, s = _bcast(alpha, z_t), _bcast(sigma, z_t)
    if prediction_type == "epsilon":
        return (z_t - s * pred) / a
    if prediction_type == "v_prediction":
        return a * z_t - s * pred
    raise ValueError(f"prediction_type {prediction_type!r} is not 'epsilon' or 'v_prediction'")


def per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample: (batch, ...) x2 -> (batch,)."""
    return (a.float() - b.float()).pow(2).flatten(1).mean(1)


def task_loss(pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, alpha, sigma, prediction_type: str) -> torch.Tensor:
    """L_task (DDPM eq. 14): student prediction at z_t = alpha x0 + sigma noise against its target. -> (batch,)"""
    return per_sample_mse(pred, denoising_target(x0, noise, alpha, sigma, prediction_type))


def output_distill_loss(student_pred: torch.Tensor, teacher_pred: torch.Tensor) -> torch.Tensor:
    """L_outKD (BK-SDM eq. 3): student output against the teacher's at the same z_t, t, c. -> (batch,)"""
    return per_sample_mse(student_pred, teacher_pred)


def feature_distill_loss(student_feats: dict, teacher_feats: dict, projections, weights: dict) -> torch.Tensor:
    """L_featKD (BK-SDM eq. 4, SnapGen sec. 4.1): sum_l w_l MSE(P_l(s_l), t_l). -> (batch,)

    ``projections[l]`` is a learned 1x1 conv from the student's to the teacher's channels; a student
    map at another resolution is resized (bilinear) to the teacher's before the comparison.
    """
    if not weights:
        raise ValueError("feature_distill_loss needs at least one layer weight")
    # the same stage names on both sides: the mapped loss with the identity mapping
    return mapped_feature_distill_loss(student_feats, teacher_feats, projections,
                                       [(name, name, weight) for name, weight in weights.items()])


def timestep_aware_scale(distill: torch.Tensor, task: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """SnapGen's timestep-aware scaling: bring a distillation term to the task loss's magnitude per sample.

    Returns ``distill * stopgrad(task / distill)``: gradients flow through ``distill`` only, and its value
    equals the task loss at that timestep, so a term whose raw size varies by orders of magnitude over t
    neither dominates at high noise nor vanishes at low noise. Inputs and output (batch,).
    """
    return distill * (task.detach() / (distill.detach() + eps))


def guidance_combine(pred_cond: torch.Tensor, pred_uncond: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
    """Classifier-free guided output w v(c) - (w - 1) v(empty) = v(empty) + w (v(c) - v(empty)); w (batch,)."""
    w = _bcast(guidance, pred_cond)
    return pred_uncond + w * (pred_cond - pred_uncond)


def guided_distill_loss(student_cond, student_uncond, teacher_cond, teacher_uncond, guidance) -> torch.Tensor:
    """CFG-aware output distillation (SnapFusion eq. 7-8): guided student vs guided teacher at the same w.

    At w = 1 this is the plain output distillation on the conditional branch. -> (batch,)
    """
    return per_sample_mse(guidance_combine(student_cond, student_uncond, guidance),
                          guidance_combine(teacher_cond, teacher_uncond, guidance))


def step_distill_target(z_t, z_s, alpha_t, sigma_t, alpha_s, sigma_s) -> torch.Tensor:
    """SnapFusion eq. 5 / progressive distillation: the x that takes z_t to z_s in ONE DDIM step.

    x_target = (z_s - (sigma_s/sigma_t) z_t) / (alpha_s - (sigma_s/sigma_t) alpha_t), where z_s is the
    teacher's (recorded) latent at the later time s < t. (batch, 4, h, w)
    """
    ratio = _bcast(sigma_s / sigma_t, z_t)
    return (z_s - ratio * z_t) / (_bcast(alpha_s, z_t) - ratio * _bcast(alpha_t, z_t))


def step_distill_loss(student_pred, z_t, z_s, alpha_t, sigma_t, alpha_s, sigma_s, prediction_type: str) -> torch.Tensor:
    """SnapFusion eq. 6: max(alpha_t^2/sigma_t^2, 1) ||x_student(z_t) - x_target||^2. -> (batch,)"""
    x_student = pred_to_x0(student_pred, z_t, alpha_t, sigma_t, prediction_type)
    x_target = step_distill_target(z_t, z_s, alpha_t, sigma_t, alpha_s, sigma_s)
    weight = torch.clamp(alpha_t.float() ** 2 / sigma_t.float() ** 2, min=1.0)
    return weight * per_sample_mse(x_student, x_target)


def dynamic_gamma(distill: torch.Tensor, task: torch.Tensor, gamma: float, eps: float = 1e-8) -> torch.Tensor:
    """SnapFusion's dynamic gamma: the weight on L_ori that keeps gamma L_ori at gamma times L_dstl's scale.

    Returns stopgrad(gamma * mean(distill) / mean(task)), a scalar.
    """
    return (gamma * distill.detach().mean() / (task.detach().mean() + eps)).detach()


def decoder_distill_loss(student_image: torch.Tensor, teacher_image: torch.Tensor) -> torch.Tensor:
    """SnapFusion data distillation of the decoder: MSE between the small and the teacher decoder's
    images from the same latent, both in [-1, 1], (batch, 3, H, W) -> (batch,)."""
    return per_sample_mse(student_image, teacher_image)


# -- adversarial distillation (LADD, SDXL-Lightning, UFOGen; students/models/discriminator.py) -----------

def hinge_discriminator_loss(real_logits: list[torch.Tensor], fake_logits: list[torch.Tensor]) -> torch.Tensor:
    """Hinge loss of the discriminator (Lim & Ye 2017; LADD sec. 3, summed over its heads):
    sum_heads mean(relu(1 - D(real))) + mean(relu(1 + D(fake))). Lists of (batch,) -> scalar."""
    return sum(F.relu(1 - r).mean() + F.relu(1 + f).mean() for r, f in zip(real_logits, fake_logits))


def hinge_generator_loss(fake_logits: list[torch.Tensor]) -> torch.Tensor:
    """Hinge loss of the generator (LADD): -sum_heads mean(D(fake)). List of (batch,) -> scalar."""
    return -sum(f.mean() for f in fake_logits)


def nonsaturating_discriminator_loss(real_logits: list[torch.Tensor], fake_logits: list[torch.Tensor]) -> torch.Tensor:
    """Non-saturating GAN loss of the discriminator (Goodfellow et al. 2014; UFOGen eq. 4,
    SDXL-Lightning): sum_heads mean(softplus(-D(real))) + mean(softplus(D(fake)))."""
    return sum(F.softplus(-r).mean() + F.softplus(f).mean() for r, f in zip(real_logits, fake_logits))


def nonsaturating_generator_loss(fake_logits: list[torch.Tensor]) -> torch.Tensor:
    """Non-saturating generator loss: sum_heads mean(softplus(-D(fake)))."""
    return sum(F.softplus(-f).mean() for f in fake_logits)


def r1_penalty(real_logits: list[torch.Tensor], real_inputs: torch.Tensor) -> torch.Tensor:
    """R1 (Mescheder et al. 2018, eq. 9): 1/2 E ||grad_x D(x_real)||^2, summed over heads -> scalar.

    ``real_inputs`` must have ``requires_grad=True`` when the logits were computed; the graph is
    kept (``create_graph``) so the penalty trains the discriminator. Multiply by gamma outside.
    """
    (grad,) = torch.autograd.grad(sum(r.sum() for r in real_logits), real_inputs, create_graph=True)
    return 0.5 * grad.float().pow(2).flatten(1).sum(dim=1).mean()


def posterior_sample(x0: torch.Tensor, z_t: torch.Tensor, noise: torch.Tensor, alpha_t, sigma_t, alpha_s, sigma_s) -> torch.Tensor:
    """A draw of q(z_s | z_t, x0) for s < t (DDPM eq. 6-7 in alpha/sigma form; UFOGen sec. 4 uses it
    for both the real and the generated x0): mean = (alpha_{t|s} sigma_s^2 / sigma_t^2) z_t +
    (alpha_s sigma_{t|s}^2 / sigma_t^2) x0, variance = sigma_{t|s}^2 sigma_s^2 / sigma_t^2, with
    alpha_{t|s} = alpha_t / alpha_s and sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2. Per-sample
    scalars (batch,); tensors (batch, 4, h, w)."""
    a_ts = alpha_t / alpha_s
    s2_ts = sigma_t ** 2 - a_ts ** 2 * sigma_s ** 2
    mean = _bcast(a_ts * sigma_s ** 2 / sigma_t ** 2, z_t) * z_t + _bcast(alpha_s * s2_ts / sigma_t ** 2, z_t) * x0
    std = _bcast((s2_ts * sigma_s ** 2 / sigma_t ** 2).clamp(min=0).sqrt(), z_t)
    return mean + std * noise


# -- progressive distillation (Salimans & Ho 2022, Algorithm 2) ----------------------------------

def ddim_step(x0: torch.Tensor, z_t: torch.Tensor, alpha_t, sigma_t, alpha_s, sigma_s) -> torch.Tensor:
    """One deterministic DDIM step t -> s given the clean estimate x0 (Song et al. 2021 eq. 12 at eta = 0;
    Salimans & Ho 2022, Algorithm 2): z_s = alpha_s x0 + (sigma_s / sigma_t)(z_t - alpha_t x0).
    Tensors (batch, 4, h, w); alpha/sigma (batch,)."""
    return _bcast(alpha_s, z_t) * x0 + _bcast(sigma_s / sigma_t, z_t) * (z_t - _bcast(alpha_t, z_t) * x0)


def two_step_landing(teacher_x0, z_t, t, alpha_t, sigma_t, t_mid, alpha_mid, sigma_mid, alpha_s, sigma_s) -> torch.Tensor:
    """Where two DDIM steps of the teacher take z_t: t -> t' -> t'' (Salimans & Ho 2022, Algorithm 2,
    the teacher's z_t' and z_t''). ``teacher_x0(z, t, alpha, sigma)`` is the teacher's clean estimate (guided, if the
    student is). Here (t', t'') = (t_mid, s). -> z_s (batch, 4, h, w)"""
    z_mid = ddim_step(teacher_x0(z_t, t, alpha_t, sigma_t), z_t, alpha_t, sigma_t, alpha_mid, sigma_mid)
    return ddim_step(teacher_x0(z_mid, t_mid, alpha_mid, sigma_mid), z_mid, alpha_mid, sigma_mid, alpha_s, sigma_s)


def progressive_target(teacher_x0, z_t, t, alpha_t, sigma_t, t_mid, alpha_mid, sigma_mid, alpha_s, sigma_s) -> torch.Tensor:
    """Salimans & Ho 2022, Algorithm 2: x~ = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t),
    the x whose ONE student DDIM step t -> t'' lands where the teacher's two steps land. (batch, 4, h, w)"""
    z_s = two_step_landing(teacher_x0, z_t, t, alpha_t, sigma_t, t_mid, alpha_mid, sigma_mid, alpha_s, sigma_s)
    return step_distill_target(z_t, z_s, alpha_t, sigma_t, alpha_s, sigma_s)


# -- flow matching (Esser et al. 2024, "Scaling Rectified Flow Transformers"; rectified flow) ----------

def logit_normal_density(t: torch.Tensor, m: float = 0.0, s: float = 1.0) -> torch.Tensor:
    """SD3's timestep density (Esser et al. 2024, sec. 3.1, "Logit-Normal Sampling"):
    pi_ln(t; m, s) = 1 / (s sqrt(2 pi)) * 1 / (t (1 - t)) * exp(-(logit(t) - m)^2 / (2 s^2)), t in (0, 1).
    SD3 trains with m = 0, s = 1. ``t`` any shape -> the same shape."""
    logit = torch.log(t) - torch.log1p(-t)
    return torch.exp(-((logit - m) ** 2) / (2 * s * s)) / (s * math.sqrt(2 * math.pi) * t * (1 - t))


def logit_normal_timesteps(batch: int, *, m: float = 0.0, s: float = 1.0, generator: torch.Generator | None = None,
                           device=None, dtype=torch.float32) -> torch.Tensor:
    """Draws of the logit-normal density above (Esser et al. 2024, sec. 3.1): u ~ N(m, s^2),
    t = sigmoid(u). -> (batch,) in (0, 1): the training sigma of each sample (z = (1 - t) x0 + t eps)."""
    u = torch.randn(batch, generator=generator, device=device, dtype=dtype)
    return torch.sigmoid(m + s * u)


def flow_shift(t: torch.Tensor, shift: float) -> torch.Tensor:
    """The timestep shift of Esser et al. 2024 (sec. 5.3.2): t_m = shift t / (1 + (shift - 1) t), the
    ``shift`` of diffusers' FlowMatchEulerDiscreteScheduler (3.0 for SD3). Any shape."""
    return shift * t / (1 + (shift - 1) * t)


def flow_interpolate(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The rectified-flow forward path (Esser et al. 2024, sec. 2-3): z = (1 - sigma) x0 + sigma eps.
    ``x0``, ``noise`` (batch, C, h, w); ``sigma`` (batch,) -> (batch, C, h, w)."""
    s = _bcast(sigma, x0)
    return (1 - s) * x0 + s * noise


def flow_velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The flow-matching target along that path: v = dz/dsigma = eps - x0 (batch, C, h, w)."""
    return noise - x0


def flow_pred_to_x0(velocity: torch.Tensor, z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The clean estimate a velocity implies at z = (1 - sigma) x0 + sigma eps: x0 = z - sigma v
    (what the scheduler's stochastic step and SD3's x0 use). (batch, C, h, w); sigma (batch,)."""
    return z - _bcast(sigma, z) * velocity


def flow_pred_to_noise(velocity: torch.Tensor, z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The noise a velocity implies: eps = z + (1 - sigma) v. (batch, C, h, w); sigma (batch,)."""
    return z + (1 - _bcast(sigma, z)) * velocity


def flow_matching_loss(pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """L_FM, the conditional flow-matching task loss of SD3 (Esser et al. 2024, sec. 2; Lipman et al.
    2023): the student's velocity at z = (1 - sigma) x0 + sigma eps against eps - x0, unweighted (the
    timestep weighting is the density sigma is drawn from: ``logit_normal_timesteps``).
    (batch, C, h, w) x3 -> (batch,)"""
    return per_sample_mse(pred, flow_velocity_target(x0, noise))


def velocity_distill_loss(student_velocity: torch.Tensor, teacher_velocity: torch.Tensor) -> torch.Tensor:
    """Velocity output distillation (BK-SDM's output KD, eq. 3, on a flow teacher's output): the
    student's velocity against the teacher's at the same z, sigma and prompt (the guided teacher
    velocity, ``guidance_combine(pred_cond, pred_uncond, w)``, for a CFG-free student).
    (batch, C, h, w) x2 -> (batch,)"""
    return per_sample_mse(student_velocity, teacher_velocity)


def flow_step_target(z_t: torch.Tensor, z_s: torch.Tensor, sigma_t: torch.Tensor, sigma_s: torch.Tensor) -> torch.Tensor:
    """Step distillation from a flow teacher's trajectory (the flow form of SnapFusion's x-target, eq. 5):
    the velocity whose ONE Euler step sigma_t -> sigma_s lands on the teacher's recorded latent,
    v* = (z_s - z_t) / (sigma_s - sigma_t), since the Euler step is z_s = z_t + (sigma_s - sigma_t) v
    (FlowMatchEulerDiscreteScheduler.step). Its clean estimate z_t - sigma_t v* is the x that takes z_t
    to z_s along the straight path, SnapFusion's x-target on the rectified-flow path. z_s is the recorded
    latent k teacher steps later (sigma_s < sigma_t; 0 at the final latent). (batch, C, h, w); sigmas (batch,)."""
    return (z_s - z_t) / _bcast(sigma_s - sigma_t, z_t)


def flow_step_distill_loss(student_velocity: torch.Tensor, z_t: torch.Tensor, z_s: torch.Tensor, sigma_t: torch.Tensor,
                           sigma_s: torch.Tensor) -> torch.Tensor:
    """MSE between the student's (guided) velocity at z_t and ``flow_step_target``: in velocity space,
    the flow-matching loss's own, unweighted (in x space it is sigma_t^2 ||x_student - x*||^2, SD3's
    velocity weighting of an x-loss). Zero exactly when the student's Euler step lands on z_s. -> (batch,)"""
    return per_sample_mse(student_velocity, flow_step_target(z_t, z_s, sigma_t, sigma_s))


def mapped_feature_distill_loss(student_feats: dict, teacher_feats: dict, projections, pairs) -> torch.Tensor:
    """Cross-architecture multi-level feature distillation (SnapGen, Hu et al. 2024, sec. 4.1: a UNet
    student distilled from a transformer teacher): sum over ``pairs`` (student stage, teacher block,
    weight) of w MSE(P(s), t), with ``projections[student stage with '.' -> '_']`` a learned 1x1 conv from
    the student stage's channels to the teacher block's. Teacher maps are a transformer's image tokens
    reshaped to its patch grid (C_t, h/p, w/p); a student map at another resolution is resized (bilinear)
    to that grid first. Student maps (batch, C_s, H, W) -> (batch,)."""
    total = None
    for student_name, teacher_name, weight in pairs:
        s = projections[student_name.replace(".", "_")](student_feats[student_name])
        t = teacher_feats[teacher_name]
        if s.shape[-2:] != t.shape[-2:]:
            s = F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)
        term = weight * per_sample_mse(s, t)
        total = term if total is None else total + term
    if total is None:
        raise ValueError("mapped_feature_distill_loss needs at least one (student, teacher, weight) pair")
    return total
