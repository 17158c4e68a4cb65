"""Adversarial distillation in the trainer: the teacher-feature discriminator, its optimiser, and the
glue between the generator (the student) and the losses at the end of ``students/distill/losses.py``.

Four recipes (``students/distill/recipes.py``) use it. All start from the student's x0 prediction at the
recorded trajectory point z_t (guided at the sample's recorded guidance, like the step term):

- ``snapgen_adv`` (SnapGen, Hu et al. 2024, sec. 4.3, after LADD, Sauer et al. 2024, sec. 3):
  the predicted x0 (fake) and the real x0 are noised again to z_t' = alpha_t' x + sigma_t' eps with
  t' drawn per sample from the training schedule (the same t' and eps for the pair), and the
  discriminator judges z_t' at t' with the prompt; hinge losses. The KD terms stay as they are.
- ``ufogen`` (UFOGen, Xu et al. 2023, sec. 4, eq. 6-8; MobileDiffusion's one-step fine-tune): a
  posterior sample z_s ~ q(z_s | z_t, x0_pred) (fake) against z_s ~ q(z_s | z_t, x0) (real), the same
  noise for the pair, s = the student's next step (the final latent's level for a one-step student),
  judged at s; non-saturating losses; plus the reconstruction term ||x0_pred - x0||^2.

- ``flow_ladd`` and ``flow_step_adv`` (LADD, Sauer et al. 2024, on its own setting: a rectified-flow SD3
  teacher): the student's x0 = z - sigma v (its velocity guided at the recorded w, as ``flow_step``'s) and
  the real x0 are re-noised on the rectified-flow path z_s = (1 - s) x0 + s eps (``losses.flow_interpolate``),
  the same s and eps for the pair, s drawn per sample from the logit-normal density pi_ln(s; m, s_ln) of
  SD3 (Esser et al. 2024, sec. 3.1; ``losses.logit_normal_timesteps``) shifted toward high noise as LADD
  does for its discriminator's noise (LADD's "teacher noise distribution": m = 1, s_ln = 1, the
  recipe's ``adv_logit_normal``), and judged at the transformer's time input s * 1000 by heads on the
  frozen flow teacher's joint blocks (``TransformerFeatureDiscriminator``; default every block, LADD's
  heads after each block); hinge losses, no R1 (LADD's choices, as ``snapgen_adv``'s).

Offline (a teacher dump), the "real" samples are by default (``--adv_real teacher``) the dump's recorded
final latents x0, the teacher's own samples: the discriminator learns the teacher's output distribution
(the shape of AMD's LADD re-implementation: teacher images offline, only the discriminator online).
With ``--adv_real image`` they are real images of the captions, VAE-encoded in a ``--real_images`` dump
(``image_latents``; LADD sec. 3.3 and DMD2 sec. 4.3 train on real data so that the student can exceed its
teacher): ``snapgen_adv`` re-noises them like the teacher's x0; ``ufogen`` noises them to the next level,
z_s = alpha_s x0_real + sigma_s eps, the marginal q(z_s | x0_real) (the posterior q(z_s | z_t, x0) needs a
z_t of the same x0, which the dump has only for the teacher's own samples). The "fake" samples are the
student's predictions. The backbone is the frozen teacher UNet: ``--online_teacher``'s, or the dump's
teacher (``dataset.json``'s recipe) loaded here (a flow dump's: its transformer, ``Teacher.denoiser``);
only the heads train, with their own AdamW.

Per optimizer step: the generator's terms (``generator_terms``, inside each micro-batch's forward,
off for the first ``--adv_warmup`` steps) and then one discriminator update (``discriminator_step``)
on the same micro-batches' real and (detached) fake inputs, with lazy R1 (StyleGAN2, Karras et al.
2020, sec. 3.1) on the real inputs every ``--r1_every`` steps at ``--r1_gamma`` (DDGAN and UFOGen
use R1; LADD does not). Logged: ``loss/adv_g``, ``loss/recon`` (unweighted; weighted as
``loss_scaled/...``), ``loss/adv_d``, ``loss/r1``, ``disc/acc_real``, ``disc/acc_fake`` (the fraction of
logits on the right side of 0, over heads).
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from core.errors import UserError
from shards.schema import DatasetInfo
from students.distill import losses as D
from students.models.discriminator import TeacherFeatureDiscriminator, TransformerFeatureDiscriminator

R1_GAMMA = {"ladd": 0.0, "ufogen": 0.1}  # --r1_gamma -1: the source's (LADD: none; UFOGen/DDGAN: R1)
LOSSES = {"ladd": (D.hinge_generator_loss, D.hinge_discriminator_loss),
          "ufogen": (D.nonsaturating_generator_loss, D.nonsaturating_discriminator_loss)}


def default_layers(teacher) -> tuple[str, ...]:
    """A UNet's deepest down block and mid block (LADD reads the teacher's low-resolution features); a flow
    transformer's every joint block (LADD's heads follow each transformer block)."""
    if hasattr(teacher, "transformer_blocks"):
        return tuple(f"transformer_blocks.{i}" for i in range(len(teacher.transformer_blocks)))
    return (f"down_blocks.{len(teacher.config.block_out_channels) - 1}", "mid_block")


def timestep_of(alphas_cumprod: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """The schedule's timestep whose alpha is nearest each ``alpha`` (batch,) -> float (batch,)."""
    return (alphas_cumprod.to(alpha)[None, :] - alpha.float()[:, None] ** 2).abs().argmin(dim=1).to(alpha.dtype)


def renoise(x0: torch.Tensor, noise: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """LADD's re-noising z_t' = alpha_t' x0 + sigma_t' eps; (batch, 4, h, w), scalars (batch,)."""
    return alpha.view(-1, 1, 1, 1).to(x0) * x0 + sigma.view(-1, 1, 1, 1).to(x0) * noise


def disc_accuracy(real_logits: list[torch.Tensor], fake_logits: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Fractions of real logits > 0 and fake logits < 0, averaged over heads: a collapse shows here."""
    real = torch.stack([(r > 0).float().mean() for r in real_logits]).mean()
    fake = torch.stack([(f < 0).float().mean() for f in fake_logits]).mean()
    return real, fake


@dataclasses.dataclass
class Pending:
    """One micro-batch's discriminator inputs, kept from the generator pass for the discriminator update."""

    real: torch.Tensor
    fake: torch.Tensor  # detached
    timesteps: torch.Tensor
    cond: torch.Tensor
    added: dict | None


class Adversary:
    """The discriminator (frozen teacher backbone + heads), its AdamW, and the per-step glue."""

    def __init__(self, recipe, disc: TeacherFeatureDiscriminator, optimizer, alphas_cumprod: torch.Tensor | None, *,
                 r1_gamma: float, r1_every: int, warmup: int, mixed_precision: str = "no", real: str = "teacher",
                 num_train_timesteps: float = 1000.0):
        self.recipe, self.disc, self.optimizer, self.alphas_cumprod = recipe, disc, optimizer, alphas_cumprod
        self.num_train_timesteps = float(num_train_timesteps)  # a flow teacher's time input is sigma * this
        self.real = real  # "teacher": the dump's final latents; "image": its real images' latents
        self.r1_gamma = R1_GAMMA[recipe.adversarial] if r1_gamma < 0 else r1_gamma
        self.r1_every, self.warmup, self.mixed_precision = r1_every, warmup, mixed_precision
        self.g_loss, self.d_loss = LOSSES[recipe.adversarial]
        self.pending: list[Pending] = []

    def state(self) -> dict:
        """The stateful objects for the trainer's checkpoint (the backbone is the teacher's, not saved)."""
        return {"disc_heads": self.disc.heads, "disc_optimizer": self.optimizer}

    def discriminator_inputs(self, x0_pred, batch, generator):
        """(fake, real, timesteps) the discriminator judges, per ``recipe.adversarial`` and ``real``."""
        x0 = batch["image_latents" if self.real == "image" else "x0"].to(x0_pred)
        noise = torch.randn(x0.shape, generator=generator).to(x0)
        if self.recipe.is_flow:  # LADD on the rectified-flow path (module docstring)
            m, s = self.recipe.adv_logit_normal
            sigma = D.logit_normal_timesteps(x0.shape[0], m=m, s=s, generator=generator).to(x0)
            t = sigma * self.num_train_timesteps
            return D.flow_interpolate(x0_pred, noise, sigma), D.flow_interpolate(x0, noise, sigma), t
        if self.recipe.adversarial == "ladd":
            t = torch.randint(0, len(self.alphas_cumprod), (x0.shape[0],), generator=generator).to(x0.device)
            alpha, sigma = D.alpha_sigma(self.alphas_cumprod, t)
            return renoise(x0_pred, noise, alpha, sigma), renoise(x0, noise, alpha, sigma), t.to(x0.dtype)
        levels = [batch[k].to(x0) for k in ("alpha", "sigma", "alpha_next", "sigma_next")]
        fake = D.posterior_sample(x0_pred, batch["z"], noise, *levels)
        if self.real == "image":  # no z_t of this x0 in the dump: the marginal q(z_s | x0) (module docstring)
            real = renoise(x0, noise, levels[2], levels[3])
        else:
            real = D.posterior_sample(x0, batch["z"], noise, *levels)
        return fake, real, timestep_of(self.alphas_cumprod, levels[2])

    def generator_terms(self, terms: dict, x0_pred: torch.Tensor, batch: dict, generator: torch.Generator,
                        step: int, raw: dict | None = None) -> dict:
        """``terms`` (from ``compute_losses``) plus recon and the generator's adversarial term (weighted),
        ``loss`` updated; ``raw`` receives them unweighted, as ``compute_losses``'s does. Keeps this
        micro-batch's discriminator inputs. ``step``: the optimizer step, from 1."""
        terms, raw = dict(terms), raw if raw is not None else {}
        if self.recipe.recon_weight > 0:
            raw["recon"] = D.per_sample_mse(x0_pred, batch["x0"]).mean()
            terms["recon"] = self.recipe.recon_weight * raw["recon"]
            terms["loss"] = terms["loss"] + terms["recon"]
            raw["recon"] = raw["recon"].detach()
        fake, real, t = self.discriminator_inputs(x0_pred, batch, generator)
        if step > self.warmup and self.recipe.adv_weight > 0:
            self.disc.heads.requires_grad_(False)  # the generator's backward needs no head gradients
            try:
                logits = self.disc(fake, t, batch["cond"], batch.get("added"))
            finally:
                self.disc.heads.requires_grad_(True)
            adv_g = self.g_loss(logits)
            raw["adv_g"] = adv_g.detach()
            terms["adv_g"] = self.recipe.adv_weight * adv_g
            terms["loss"] = terms["loss"] + terms["adv_g"]
        self.pending.append(Pending(real.detach(), fake.detach(), t, batch["cond"], batch.get("added")))
        return terms

    def discriminator_step(self, step: int, world: int = 1) -> dict[str, torch.Tensor]:
        """One AdamW step of the heads on the kept micro-batches (lazy R1 every ``r1_every`` steps)."""
        self.optimizer.zero_grad(set_to_none=True)
        r1_now = self.r1_gamma > 0 and step % self.r1_every == 0
        logged: dict[str, torch.Tensor] = {}
        device = self.pending[0].real.device
        bf16 = self.mixed_precision == "bf16"
        # R1 differentiates through the backbone twice: only the math attention kernel has a double backward
        math_attention = (lambda: sdpa_kernel([SDPBackend.MATH])) if r1_now else contextlib.nullcontext
        for p in self.pending:
            real = p.real.clone().requires_grad_(r1_now)
            with torch.autocast(device.type, torch.bfloat16, enabled=bf16), math_attention():
                real_logits = self.disc(real, p.timesteps, p.cond, p.added)
                fake_logits = self.disc(p.fake, p.timesteps, p.cond, p.added)
                loss = self.d_loss(real_logits, fake_logits)
            logged["loss/adv_d"] = loss.detach()
            if r1_now:  # lazy regularisation: gamma * r1_every, so the average strength is gamma
                with math_attention():
                    r1 = D.r1_penalty(real_logits, real)
                logged["loss/r1"] = r1.detach()
                loss = loss + self.r1_gamma * self.r1_every * r1
            logged["disc/acc_real"], logged["disc/acc_fake"] = disc_accuracy(real_logits, fake_logits)
            (loss / len(self.pending)).backward()
        if world > 1:  # the heads are not wrapped in DDP: average their gradients by hand
            for param in self.disc.heads.parameters():
                if param.grad is not None:
                    torch.distributed.all_reduce(param.grad)
                    param.grad /= world
        self.optimizer.step()
        self.pending = []
        return logged


def build(cfg, recipe, dataset: DatasetInfo, teacher_unet, device) -> Adversary:
    """The adversary of a training run: the backbone is ``teacher_unet`` (online) or the dump's teacher
    (for a flow recipe its transformer: flow teachers are never online, ``distill train`` refuses them)."""
    if teacher_unet is None:
        from teachers.load import TeacherError, load_teacher

        spec = dataset.dump_recipe.teacher
        try:
            teacher = load_teacher(spec, device=str(device))
        except TeacherError as err:
            raise UserError(f"recipe {recipe.name!r} needs the dump's teacher {spec!r} as its discriminator's "
                            f"backbone{'' if recipe.is_flow else ' (or --online_teacher)'}: {err}") from None
        if teacher.is_flow != recipe.is_flow:
            raise UserError(f"recipe {recipe.name!r}: the dump's teacher {spec!r} is "
                            f"{'a flow transformer' if teacher.is_flow else 'a UNet'}, not the backbone this recipe judges with")
        teacher_unet = teacher.denoiser
    layers = tuple(l for l in cfg.disc_layers.split(",") if l) or default_layers(teacher_unet)
    kind = TransformerFeatureDiscriminator if recipe.is_flow else TeacherFeatureDiscriminator
    try:
        disc = kind(teacher_unet, layers=layers).to(device)
    except (ValueError, IndexError) as err:
        raise UserError(f"--disc_layers {cfg.disc_layers!r}: {err}") from None
    optimizer = torch.optim.AdamW(disc.heads.parameters(), lr=cfg.disc_lr, betas=(0.0, 0.99), weight_decay=0.0)
    schedule = None if recipe.is_flow else training_schedule(dataset, device)  # a flow dump has no DDPM schedule
    return Adversary(recipe, disc, optimizer, schedule, r1_gamma=cfg.r1_gamma, r1_every=cfg.r1_every,
                     warmup=cfg.adv_warmup, mixed_precision=cfg.mixed_precision, real=cfg.adv_real,
                     num_train_timesteps=float(dataset.scheduler_config.get("num_train_timesteps", 1000)))


def training_schedule(dataset: DatasetInfo, device) -> torch.Tensor:
    """The teacher's training schedule (alphas_cumprod) for t' and the posterior's timestep."""
    from shards.loader import alphas_cumprod

    return torch.tensor(alphas_cumprod(dataset.scheduler_config), dtype=torch.float32, device=device)
