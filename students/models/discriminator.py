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

``TransformerFeatureDiscriminator`` is the same on a flow teacher's SD3 transformer
(``SD3Transformer2DModel``; LADD's own setting, SD3): the heads read joint blocks ``transformer_blocks.N``,
whose image tokens are reshaped to maps over the patch grid (``teachers.sampler.tokens_to_maps``, as the
flow dump records them), and the condition is the timestep's sinusoid with SD3's pooled text embedding.
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

    A subclass for another backbone overrides ``_text_dim``, ``_layer_channels``, ``_run_backbone``,
    ``_feature`` and ``_pooled`` (``TransformerFeatureDiscriminator``).
    """

    def __init__(self, teacher_unet: nn.Module, layers: tuple[str, ...] = ("down_blocks.1", "mid_block"),
                 head_channels: int = 64, time_dim: int = 128):
        super().__init__()
        self.backbone = teacher_unet
        self.backbone.requires_grad_(False)
        self.backbone.eval()
        self.layers = tuple(layers)
        cond_dim = time_dim + self._text_dim()
        self.time_dim = time_dim
        channels = self._layer_channels()
        self.heads = nn.ModuleDict({name.replace(".", "_"): DiscriminatorHead(channels[name], cond_dim, head_channels)
                                    for name in self.layers})
        self._captured: dict[str, torch.Tensor] = {}

    def _text_dim(self) -> int:
        """Width of the text condition the heads take (``_pooled``)."""
        return int(self.backbone.config.cross_attention_dim)

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

    def _feature(self, output) -> torch.Tensor:
        """A hooked block's output -> its feature map (a down block's ``(hidden, res_samples)``: hidden)."""
        return output[0] if isinstance(output, tuple) else output

    def _run_backbone(self, noisy_latents, timesteps, encoder_hidden_states, added_cond_kwargs) -> None:
        self.backbone(noisy_latents, timesteps, encoder_hidden_states, added_cond_kwargs=added_cond_kwargs)

    def _pooled(self, encoder_hidden_states, added_cond_kwargs) -> torch.Tensor:
        """The text condition of the heads: SD-1.5 has no pooled embedding, so the mean over tokens."""
        return encoder_hidden_states.float().mean(dim=1)

    def _hook(self, name: str):
        def hook(module, inputs, output):
            self._captured[name] = self._feature(output)
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
            self._run_backbone(noisy_latents, timesteps, encoder_hidden_states, added_cond_kwargs)
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
        pooled = self._pooled(encoder_hidden_states, added_cond_kwargs).float()
        cond = torch.cat([timestep_features(t, self.time_dim), pooled], dim=-1)
        return [self.heads[name.replace(".", "_")](feats[name], cond) for name in self.layers]


class TransformerFeatureDiscriminator(TeacherFeatureDiscriminator):
    """Frozen flow teacher transformer (diffusers' ``SD3Transformer2DModel``) + trainable heads (LADD, sec. 3).

    ``layers``: joint blocks ``transformer_blocks.N``; each head reads the block's image tokens (B, N, C) as
    a map (B, C, h/p, w/p) over the patch grid (``tokens_to_maps``), C the transformer's inner width.
    ``forward(noisy_latents (B, C_lat, h, w), timesteps (B,) = sigma * 1000, encoder_hidden_states (B, L, D),
    added_cond_kwargs={"text_embeds": pooled (B, P)})`` -> list of (B,) logits, one per layer: the
    ``added_cond_kwargs`` of a flow batch (``students.distill.batches.training_batch``) carry the pooled
    embedding the transformer takes as ``pooled_projections`` and the heads as their text condition.
    """

    def __init__(self, teacher_transformer: nn.Module, layers: tuple[str, ...] = ("transformer_blocks.0",),
                 head_channels: int = 64, time_dim: int = 128):
        super().__init__(teacher_transformer, layers=layers, head_channels=head_channels, time_dim=time_dim)
        self._grid: tuple[int, int] | None = None  # the patch grid of the latents in the running forward

    def _text_dim(self) -> int:
        return int(self.backbone.config.pooled_projection_dim)

    def _layer_channels(self) -> dict[str, int]:
        from teachers.sampler import resolve_modules

        resolve_modules(self.backbone, self.layers)  # ValueError naming a layer that is not transformer_blocks.N
        width = int(self.backbone.config.num_attention_heads) * int(self.backbone.config.attention_head_dim)
        return {name: width for name in self.layers}

    def _feature(self, output) -> torch.Tensor:
        from teachers.sampler import tokens_to_maps

        return tokens_to_maps(output[1], *self._grid)  # a joint block returns (context tokens, image tokens)

    def _run_backbone(self, noisy_latents, timesteps, encoder_hidden_states, added_cond_kwargs) -> None:
        patch = int(self.backbone.config.patch_size)
        self._grid = (noisy_latents.shape[-2] // patch, noisy_latents.shape[-1] // patch)
        t = timesteps if torch.is_tensor(timesteps) else torch.tensor([timesteps], device=noisy_latents.device)
        self.backbone(hidden_states=noisy_latents, encoder_hidden_states=encoder_hidden_states,
                      pooled_projections=self._pooled(encoder_hidden_states, added_cond_kwargs).to(noisy_latents.dtype),
                      timestep=t.expand(noisy_latents.shape[0]), return_dict=False)

    def _pooled(self, encoder_hidden_states, added_cond_kwargs) -> torch.Tensor:
        if not added_cond_kwargs or "text_embeds" not in added_cond_kwargs:
            raise ValueError("a flow transformer's discriminator needs the pooled text embeddings "
                             "(added_cond_kwargs={'text_embeds': ...})")
        return added_cond_kwargs["text_embeds"]
