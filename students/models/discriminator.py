"""A discriminator on the frozen teacher's features (LADD, SDXL-Lightning, SANA-Sprint style).

LADD (Sauer et al., arXiv 2403.12015, Sec. 3) and its successors judge a sample in the latent
space of the frozen teacher: the sample is noised to a z_t (t drawn per sample), the teacher UNet
runs on it with the prompt, and small trainable heads read the teacher's block outputs. Only the
heads train; the backbone's weights never change, but gradients flow through it to the generator
(the student), which is what makes the adversarial signal reach the student's weights.

    disc = TeacherFeatureDiscriminator(teacher_unet, layers=("down_blocks.1", "mid_block"))
    logits = disc(noisy_latents, timesteps, encoder_hidden_states)   # one (B,) logit per level
    d_loss = distill.hinge_discriminator_loss(disc(real_z, t, c), disc(fake_z.detach(), t, c))
    g_loss = distill.hinge_generator_loss(disc(fake_z, t, c))

Each head (SDXL-Lightning's and LADD's shape, simplified): 3x3 conv -> GroupNorm -> SiLU, scaled
and shifted by a projection of the condition (FiLM: the timestep's sinusoid and the pooled prompt
embedding), then a 1x1 conv to one logit per position, averaged over positions, plus the
projection-discriminator term <pool(h), W c> (Miyato & Koyama, 2018) so the text condition enters
the logit directly. The teacher runs only as far as the deepest chosen layer: its forward stops
there (the up path is never computed).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class _StopForward(Exception):
    """Raised by the last hook to end the teacher's forward once every chosen layer has run."""


def timestep_features(timesteps: torch.Tensor, dim: int = 128, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of (float) timesteps: (B,) -> (B, dim), as diffusers' ``Timesteps``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class DiscriminatorHead(nn.Module):
    """Features (B, C, H, W) and a condition (B, cond_dim) -> a logit (B,)."""

    def __init__(self, channels: int, cond_dim: int, hidden: int = 64, groups: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(channels, hidden, 3, padding=1)
        self.norm = nn.GroupNorm(min(groups, hidden), hidden)
        self.film = nn.Linear(cond_dim, 2 * hidden)
        self.out = nn.Conv2d(hidden, 1, 1)
        self.project = nn.Linear(cond_dim, hidden, bias=False)
        nn.init.zeros_(self.film.weight), nn.init.zeros_(self.film.bias)  # start as an unconditioned head

    def forward(self, features: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.conv(features.float()))
        scale, shift = self.film(cond).chunk(2, dim=-1)
        h = torch.nn.functional.silu(h * (1 + scale[:, :, None, None]) + shift[:, :, None, None])
        pooled = h.mean(dim=(2, 3))
        return self.out(h).mean(dim=(1, 2, 3)) + (pooled * self.project(cond)).sum(dim=-1)


class TeacherFeatureDiscriminator(nn.Module):
    """Frozen teacher UNet (any diffusers-style UNet with ``down_blocks``/``mid_block``) + trainable heads.

    ``layers``: block names whose outputs the heads read (``down_blocks.N``, ``mid_block``).
    ``forward(noisy_latents (B, 4, h, w), timesteps (B,), encoder_hidden_states (B, L, D),
    added_cond_kwargs=None)`` -> list of (B,) logits, one per layer, in ``layers`` order.
    """

    def __init__(self, teacher_unet: nn.Module, layers: tuple[str, ...] = ("down_blocks.1", "mid_block"),
                 head_channels: int = 64, time_dim: int = 128):
        super().__init__()
        self.backbone = teacher_unet
        self.backbone.requires_grad_(False)
        self.backbone.eval()
        self.layers = tuple(layers)
        cond_dim = time_dim + int(teacher_unet.config.cross_attention_dim)
        self.time_dim = time_dim
        channels = self._layer_channels()
        self.heads = nn.ModuleDict({name.replace(".", "_"): DiscriminatorHead(channels[name], cond_dim, head_channels)
                                    for name in self.layers})
        self._captured: dict[str, torch.Tensor] = {}

    def _layer_channels(self) -> dict[str, int]:
        chans = list(self.backbone.config.block_out_channels)
        out = {}
        for name in self.layers:
            if name == "mid_block":
                out[name] = chans[-1]
            elif name.startswith("down_blocks."):
                out[name] = chans[int(name.split(".")[1])]
            else:
                raise ValueError(f"discriminator layer {name!r}: use down_blocks.N or mid_block (the up path is not run)")
        return out

    def _hook(self, name: str):
        def hook(module, inputs, output):
            self._captured[name] = output[0] if isinstance(output, tuple) else output
            if len(self._captured) == len(self.layers):
                raise _StopForward
        return hook

    def train(self, mode: bool = True):  # the backbone stays in eval mode (no dropout, fixed norms)
        super().train(mode)
        self.backbone.eval()
        return self

    def features(self, noisy_latents, timesteps, encoder_hidden_states, added_cond_kwargs=None) -> dict[str, torch.Tensor]:
        """Block name -> the teacher's output there; hooks live only for this call (the backbone may be
        shared with a teacher that runs elsewhere)."""
        self._captured = {}
        hooks = [self.backbone.get_submodule(name).register_forward_hook(self._hook(name)) for name in self.layers]
        try:
            self.backbone(noisy_latents, timesteps, encoder_hidden_states, added_cond_kwargs=added_cond_kwargs)
        except _StopForward:
            pass
        finally:
            for h in hooks:
                h.remove()
        captured, self._captured = self._captured, {}
        return captured

    def forward(self, noisy_latents, timesteps, encoder_hidden_states, added_cond_kwargs=None) -> list[torch.Tensor]:
        feats = self.features(noisy_latents, timesteps, encoder_hidden_states, added_cond_kwargs)
        t = timesteps if torch.is_tensor(timesteps) else torch.tensor([timesteps], device=noisy_latents.device)
        t = t.expand(noisy_latents.shape[0]) if t.ndim == 1 and t.shape[0] == 1 else t
        pooled = encoder_hidden_states.float().mean(dim=1)  # SD-1.5 has no pooled embedding: mean over tokens
        cond = torch.cat([timestep_features(t, self.time_dim), pooled], dim=-1)
        return [self.heads[name.replace(".", "_")](feats[name], cond) for name in self.layers]
