"""A flow-matching UNet student in the transformer's seat of ``StableDiffusion3Pipeline``.

SD3's pipeline calls ``transformer(hidden_states=, timestep=, encoder_hidden_states=, pooled_projections=,
joint_attention_kwargs=, return_dict=False)[0]`` and reads ``transformer.config``'s ``sample_size``,
``patch_size``, ``in_channels`` and ``joint_attention_dim`` (the width it zero-pads the text states to).
``FlowUNetTransformer`` holds the student UNet (``EfficientUNet2DConditionModel`` with
``addition_embed_type="pooled"``) as ``unet`` and answers that call: the pooled projections go to the
UNet as ``added_cond_kwargs["text_embeds"]``, the timestep (sigma * 1000, as the trainer fed it) as the
UNet's timestep, and the velocity comes back as the transformer's would. ``patch_size`` is the teacher's
(the pipeline's size checks and its dynamic-shift token count use it; the UNet has no patches).

``distill export`` writes it as the folder's ``transformer`` with this file, ``unet.py`` and ``blocks.py``
copied beside it (torch and diffusers only), loaded with ``trust_remote_code=True``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput

from students.models.unet import EfficientUNet2DConditionModel


@dataclass
class FlowUNetOutput(BaseOutput):
    sample: torch.Tensor  # the velocity (batch, C, h, w)


class FlowUNetTransformer(ModelMixin, ConfigMixin):
    """The student UNet behind SD3Transformer2DModel's call signature (module docstring)."""

    @register_to_config
    def __init__(self, unet_config: dict | None = None, sample_size: int = 64, patch_size: int = 2, in_channels: int = 16,
                 out_channels: int = 16, joint_attention_dim: int = 4096, pooled_projection_dim: int = 2048):
        super().__init__()
        self.unet = EfficientUNet2DConditionModel(**(unet_config or {}))
        c = self.unet.config
        if (c.in_channels, c.out_channels, c.cross_attention_dim) != (in_channels, out_channels, joint_attention_dim):
            raise ValueError(f"unet_config (in {c.in_channels}, out {c.out_channels}, cross_attention_dim "
                             f"{c.cross_attention_dim}) does not match in_channels={in_channels}, "
                             f"out_channels={out_channels}, joint_attention_dim={joint_attention_dim}")

    @classmethod
    def wrap(cls, unet: EfficientUNet2DConditionModel, patch_size: int = 2) -> "FlowUNetTransformer":
        """The transformer-shaped wrapper around ``unet`` itself (shared, not copied)."""
        c = unet.config
        wrapper = cls(unet_config={k: v for k, v in c.items() if not k.startswith("_")}, sample_size=c.sample_size, patch_size=patch_size, in_channels=c.in_channels,
                      out_channels=c.out_channels, joint_attention_dim=c.cross_attention_dim,
                      pooled_projection_dim=c.projection_class_embeddings_input_dim or 0)
        wrapper.unet = unet
        return wrapper

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                pooled_projections: torch.Tensor | None = None, joint_attention_kwargs: dict | None = None,
                return_dict: bool = True, skip_layers=None, **unused):
        if skip_layers is not None:
            raise ValueError(f"{type(self).__name__} has no transformer layers to skip (skip_guidance_layers)")
        added = {"text_embeds": pooled_projections} if pooled_projections is not None else None
        out = self.unet(hidden_states, timestep, encoder_hidden_states=encoder_hidden_states,
                        added_cond_kwargs=added).sample
        return FlowUNetOutput(sample=out) if return_dict else (out,)
