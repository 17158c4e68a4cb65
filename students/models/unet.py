"""Efficient student UNets as a diffusers model, configured by a frozen dataclass.

``EfficientUNet2DConditionModel`` takes the call of ``UNet2DConditionModel`` (``sample, timestep,
encoder_hidden_states``, ``added_cond_kwargs`` with ``text_embeds``/``time_ids`` for SDXL, ``return_dict``)
and drops into ``StableDiffusionPipeline``/``StableDiffusionXLPipeline`` as ``unet``. Its stages are
named like the teacher's (``down_blocks.N``, ``mid_block``, ``up_blocks.N``), so feature taps and
forward hooks line up by name; ``return_features=True`` returns each stage's output and
``feature_info()`` its (channels, downsample factor).

A stage is a *layout* string of blocks, executed left to right::

    R      ResNet block (in an up stage it first concatenates the next skip connection)
    T      transformer with self- and cross-attention      (diffusers' Transformer2DModel)
    C      transformer with cross-attention only           (MobileDiffusion, SnapGen)
    S      transformer with self-attention only
    T4     a transformer holding 4 blocks under one proj_in/proj_out (SDXL's transformer_layers_per_block)

so SD-1.5's ``down_blocks.0`` is ``"R T R T"`` and its mid block ``"R T R"``. Presets (``snapfusion``,
``mobilediffusion``, ``snapgen``, ``tiny``, ``tiny_xl``) are the functions at the end of this module;
``python -m students.cost.profile`` prints their cost beside the teachers'.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from students.models.blocks import (ATTENTION_KERNELS, CONV_TYPES, FF_ACTIVATIONS, DownStage, MidStage, UpStage,
                                    parse_layout)


# None; "text_time": SDXL's pooled text embedding and size/crop ids added to the time embedding;
# "pooled": SD3's pooled text embedding alone added to it (SD3Transformer2DModel's time_text_embed does the same)
ADDITION_EMBED_TYPES = (None, "text_time", "pooled")


@dataclass(frozen=True, kw_only=True)
class StudentUNetConfig:
    """Architecture of an efficient UNet. Levels run from the highest resolution (level 0) down; up
    stages are listed in execution order (``up_layouts[0]`` is ``up_blocks.0``, the lowest level)."""

    sample_size: int = 64  # latent side the pipelines default to (pixels / 8)
    in_channels: int = 4  # latent channels in
    out_channels: int = 4  # latent channels out (epsilon / v prediction)
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)  # channels per level
    down_layouts: tuple[str, ...] = ("R T R T", "R T R T", "R T R T", "R R")  # per level, see module doc
    mid_layout: str = "R T R"  # at the lowest level
    up_layouts: tuple[str, ...] = ("R R R", "R T R T R T", "R T R T R T", "R T R T R T")  # lowest level first
    conv_types: tuple[str, ...] = ("dense",) * 4  # 3x3 conv kind per level: dense | separable | expanded
    conv_expansion: int = 2  # hidden width / output width of an expanded separable conv (SnapGen: 2)
    num_attention_heads: tuple[int, ...] = (8, 8, 8, 8)  # query heads per level
    kv_heads: int | None = None  # key/value heads; None = one per query head, 1 = multi-query attention
    shared_kv: bool = False  # one projection for keys and values (MobileDiffusion)
    attention_kernel: str = "softmax"  # softmax | relu (MobileDiffusion's ReLU attention)
    ff_mult: float = 4.0  # feed-forward inner width / channels (the gated projection is twice as wide)
    ff_activation: str = "geglu"  # geglu (SD) | swiglu (MobileDiffusion)
    cross_attention_dim: int = 768  # text encoder hidden size (SDXL: 2048, both encoders concatenated)
    norm_num_groups: int = 32  # GroupNorm groups
    norm_eps: float = 1e-5  # GroupNorm epsilon of the ResNet blocks
    flip_sin_to_cos: bool = True  # timestep embedding layout, as SD
    freq_shift: int = 0  # timestep embedding frequency shift, as SD
    time_cond_proj_dim: int | None = None  # guidance embedding width (LCM-style w-conditioning); None = off
    addition_embed_type: str | None = None  # None | "text_time" (SDXL pooled text + size/crop ids) | "pooled" (SD3)
    addition_time_embed_dim: int | None = None  # sinusoid width per time id (SDXL: 256)
    projection_class_embeddings_input_dim: int | None = None  # text_time: 6 * addition_time_embed_dim + pooled width; pooled: pooled width

    def __post_init__(self):
        levels = len(self.block_out_channels)
        for name in ("down_layouts", "up_layouts", "conv_types", "num_attention_heads"):
            if len(getattr(self, name)) != levels:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries, block_out_channels has {levels}")
        for name in ("in_channels", "out_channels", "sample_size", "cross_attention_dim", "conv_expansion"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be a positive integer")
        for level, (ch, heads) in enumerate(zip(self.block_out_channels, self.num_attention_heads)):
            if ch % self.norm_num_groups:
                raise ValueError(f"block_out_channels[{level}]={ch} is not divisible by norm_num_groups={self.norm_num_groups}")
            if ch % heads:
                raise ValueError(f"block_out_channels[{level}]={ch} is not divisible by num_attention_heads[{level}]={heads}")
            if self.kv_heads is not None and (self.kv_heads < 1 or heads % self.kv_heads):
                raise ValueError(f"kv_heads={self.kv_heads} does not divide num_attention_heads[{level}]={heads}")
        for level, kind in enumerate(self.conv_types):
            if kind not in CONV_TYPES:
                raise ValueError(f"conv_types[{level}]={kind!r} is not one of {CONV_TYPES}")
        if self.attention_kernel not in ATTENTION_KERNELS:
            raise ValueError(f"attention_kernel={self.attention_kernel!r} is not one of {ATTENTION_KERNELS}")
        if self.ff_activation not in FF_ACTIVATIONS:
            raise ValueError(f"ff_activation={self.ff_activation!r} is not one of {FF_ACTIVATIONS}")
        if self.ff_mult <= 0:
            raise ValueError(f"ff_mult={self.ff_mult!r} must be positive")
        if self.addition_embed_type not in ADDITION_EMBED_TYPES:
            raise ValueError(f"addition_embed_type={self.addition_embed_type!r} is not None, 'text_time' or 'pooled'")
        if self.addition_embed_type == "pooled" and not self.projection_class_embeddings_input_dim:
            raise ValueError("addition_embed_type='pooled' needs projection_class_embeddings_input_dim (the pooled width)")
        if self.addition_embed_type == "text_time" and not (self.addition_time_embed_dim and self.projection_class_embeddings_input_dim):
            raise ValueError("addition_embed_type='text_time' needs addition_time_embed_dim and projection_class_embeddings_input_dim")
        self._check_skips()

    def _check_skips(self) -> None:
        """Every ResNet of an up stage consumes one skip of its own resolution (as in diffusers' UNet)."""
        levels = len(self.block_out_channels)
        for level, layout in enumerate(self.down_layouts):
            parse_layout(layout, f"down_layouts[{level}]")
        parse_layout(self.mid_layout, "mid_layout", first_resnet=False)
        for level in range(levels):
            skips = 1 + parse_layout(self.down_layouts[level]).count(("R", 1))  # conv_in or the downsampler
            up_index = levels - 1 - level
            needed = parse_layout(self.up_layouts[up_index], f"up_layouts[{up_index}]").count(("R", 1))
            if needed != skips:
                raise ValueError(f"up_layouts[{up_index}]={self.up_layouts[up_index]!r} has {needed} ResNet blocks but level "
                                 f"{level} provides {skips} skip connections (conv_in or downsampler + {skips - 1} down ResNets)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def override(cfg: StudentUNetConfig, **changes) -> StudentUNetConfig:
    """``dataclasses.replace`` that names an unknown key instead of a bare TypeError."""
    known = {f.name for f in dataclasses.fields(cfg)}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise ValueError(f"unknown StudentUNetConfig field(s) {unknown}; known: {sorted(known)}")
    return dataclasses.replace(cfg, **changes)


# ------------------------------------------------------------------------------------------
# model
# ------------------------------------------------------------------------------------------


@dataclass
class EfficientUNetOutput(BaseOutput):
    """``sample``: ``(batch, out_channels, height, width)``; ``features``: stage name -> stage output
    (only with ``return_features=True``)."""

    sample: torch.Tensor
    features: dict[str, torch.Tensor] | None = None


class EfficientUNet2DConditionModel(ModelMixin, ConfigMixin):
    """A UNet2DConditionModel-compatible student built from a :class:`StudentUNetConfig`.

    Build with ``EfficientUNet2DConditionModel.from_student_config(snapgen())`` or with the
    config fields as keyword arguments (which is what ``from_pretrained`` does).
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        sample_size: int = 64,
        in_channels: int = 4,
        out_channels: int = 4,
        block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280),
        down_layouts: tuple[str, ...] = ("R T R T", "R T R T", "R T R T", "R R"),
        mid_layout: str = "R T R",
        up_layouts: tuple[str, ...] = ("R R R", "R T R T R T", "R T R T R T", "R T R T R T"),
        conv_types: tuple[str, ...] = ("dense",) * 4,
        conv_expansion: int = 2,
        num_attention_heads: tuple[int, ...] = (8, 8, 8, 8),
        kv_heads: int | None = None,
        shared_kv: bool = False,
        attention_kernel: str = "softmax",
        ff_mult: float = 4.0,
        ff_activation: str = "geglu",
        cross_attention_dim: int = 768,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-5,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        time_cond_proj_dim: int | None = None,
        addition_embed_type: str | None = None,
        addition_time_embed_dim: int | None = None,
        projection_class_embeddings_input_dim: int | None = None,
    ):
        super().__init__()
        # The arguments are StudentUNetConfig's fields (a test keeps the two in step); the dataclass
        # validates them. JSON turns tuples into lists on save_pretrained, so turn them back.
        kwargs = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        cfg = StudentUNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()})
        self.student_config = cfg
        chans, levels = cfg.block_out_channels, len(cfg.block_out_channels)
        temb = chans[0] * 4

        self.conv_in = nn.Conv2d(cfg.in_channels, chans[0], 3, padding=1)
        self.time_proj = Timesteps(chans[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        self.time_embedding = TimestepEmbedding(chans[0], temb, cond_proj_dim=cfg.time_cond_proj_dim)
        self.add_time_proj = self.add_embedding = None
        if cfg.addition_embed_type == "text_time":
            self.add_time_proj = Timesteps(cfg.addition_time_embed_dim, cfg.flip_sin_to_cos, cfg.freq_shift)
            self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, temb)
        elif cfg.addition_embed_type == "pooled":
            self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, temb)

        skip_channels, ch = [chans[0]], chans[0]  # conv_in's output is the first skip
        self.down_blocks = nn.ModuleList()
        for level in range(levels):
            block = DownStage(cfg.down_layouts[level], ch, chans[level], cfg, level, temb, add_downsample=level < levels - 1)
            self.down_blocks.append(block)
            ch = chans[level]
            skip_channels += [ch] * block.skip_count()
        self.mid_block = MidStage(cfg.mid_layout, ch, ch, cfg, levels - 1, temb)
        self.up_blocks = nn.ModuleList()
        for j in range(levels):
            level = levels - 1 - j
            self.up_blocks.append(UpStage(cfg.up_layouts[j], ch, chans[level], cfg, level, temb, skip_channels, add_upsample=level > 0))
            ch = chans[level]
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, chans[0], eps=cfg.norm_eps)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(chans[0], cfg.out_channels, 3, padding=1)

    @classmethod
    def from_student_config(cls, cfg: StudentUNetConfig) -> "EfficientUNet2DConditionModel":
        return cls(**cfg.to_dict())

    # -- feature taps ---------------------------------------------------------------------

    def feature_info(self) -> dict[str, tuple[int, int]]:
        """Stage name -> (channels, downsample factor vs the latent) of that stage's output."""
        chans, levels = self.student_config.block_out_channels, len(self.student_config.block_out_channels)
        info = {f"down_blocks.{i}": (chans[i], 2 ** min(i + 1, levels - 1)) for i in range(levels)}
        info["mid_block"] = (chans[-1], 2 ** (levels - 1))
        for j in range(levels):
            info[f"up_blocks.{j}"] = (chans[levels - 1 - j], 2 ** max(levels - 2 - j, 0))
        return info

    # -- forward --------------------------------------------------------------------------

    def _time_embedding(self, sample, timestep, timestep_cond, added_cond_kwargs):
        timesteps = timestep
        if not torch.is_tensor(timesteps):
            dtype = torch.float64 if isinstance(timestep, float) and sample.device.type not in ("mps", "npu") else torch.int64
            timesteps = torch.tensor([timesteps], dtype=dtype, device=sample.device)
        elif timesteps.ndim == 0:
            timesteps = timesteps[None].to(sample.device)
        t_emb = self.time_proj(timesteps.expand(sample.shape[0])).to(dtype=sample.dtype)
        emb = self.time_embedding(t_emb, timestep_cond)
        if self.add_embedding is not None and self.add_time_proj is None:  # "pooled" (SD3)
            if not added_cond_kwargs or "text_embeds" not in added_cond_kwargs:
                raise ValueError("addition_embed_type='pooled' needs added_cond_kwargs with 'text_embeds'")
            emb = emb + self.add_embedding(added_cond_kwargs["text_embeds"].to(emb.dtype))
        elif self.add_embedding is not None:
            if not added_cond_kwargs or "text_embeds" not in added_cond_kwargs or "time_ids" not in added_cond_kwargs:
                raise ValueError("addition_embed_type='text_time' needs added_cond_kwargs with 'text_embeds' and 'time_ids'")
            text_embeds, time_ids = added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"]
            time_embeds = self.add_time_proj(time_ids.flatten()).reshape(text_embeds.shape[0], -1)
            emb = emb + self.add_embedding(torch.cat([text_embeds, time_embeds], dim=-1).to(emb.dtype))
        return emb

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        down_block_additional_residuals: tuple | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
        down_intrinsic_block_additional_residuals: tuple | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
        return_features: bool = False,
    ) -> EfficientUNetOutput | tuple:
        """``sample (B, C, H, W)``, ``encoder_hidden_states (B, L, cross_attention_dim)`` -> prediction ``(B, C, H, W)``.

        The arguments after ``added_cond_kwargs`` exist so diffusers pipelines can pass them; class
        labels, masks and ControlNet/adapter residuals are not supported by the students.
        """
        unsupported = dict(class_labels=class_labels, attention_mask=attention_mask, encoder_attention_mask=encoder_attention_mask,
                           down_block_additional_residuals=down_block_additional_residuals,
                           mid_block_additional_residual=mid_block_additional_residual,
                           down_intrinsic_block_additional_residuals=down_intrinsic_block_additional_residuals)
        given = [k for k, v in unsupported.items() if v is not None]
        if given:
            raise ValueError(f"{type(self).__name__} does not support {given}")
        factor = 2 ** (len(self.down_blocks) - 1)
        if sample.shape[-1] % factor or sample.shape[-2] % factor:
            raise ValueError(f"sample side {tuple(sample.shape[-2:])} must be divisible by {factor} for this student")

        emb = self._time_embedding(sample, timestep, timestep_cond, added_cond_kwargs)
        features = {} if return_features else None
        hidden = self.conv_in(sample)
        skips = [hidden]
        for i, block in enumerate(self.down_blocks):
            hidden, res = block(hidden, emb, encoder_hidden_states)
            skips.extend(res)
            if features is not None:
                features[f"down_blocks.{i}"] = hidden
        hidden = self.mid_block(hidden, emb, encoder_hidden_states)
        if features is not None:
            features["mid_block"] = hidden
        for j, block in enumerate(self.up_blocks):
            hidden = block(hidden, skips, emb, encoder_hidden_states)
            if features is not None:
                features[f"up_blocks.{j}"] = hidden
        out = self.conv_out(self.conv_act(self.conv_norm_out(hidden)))
        if not return_dict:
            return (out, features) if return_features else (out,)
        return EfficientUNetOutput(sample=out, features=features)


# ------------------------------------------------------------------------------------------
# presets: named functions returning a StudentUNetConfig (vary with override(cfg, ...))
# ------------------------------------------------------------------------------------------


def sd15_reference() -> StudentUNetConfig:
    """SD-1.5's UNet (``teachers.configs.sd15_unet()``) in this family: 859.5M parameters, the same
    module names and shapes. The baseline the SnapFusion preset edits."""
    return StudentUNetConfig()


def sdxl_reference() -> StudentUNetConfig:
    """SDXL base's UNet (``teachers.configs.sdxl_unet()``) in this family: 2,567M parameters."""
    return StudentUNetConfig(
        sample_size=128,
        block_out_channels=(320, 640, 1280),
        down_layouts=("R R", "R T2 R T2", "R T10 R T10"),
        mid_layout="R T10 R",
        up_layouts=("R T10 R T10 R T10", "R T2 R T2 R T2", "R R R"),
        conv_types=("dense",) * 3,
        num_attention_heads=(5, 10, 20),
        cross_attention_dim=2048,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )


def snapfusion() -> StudentUNetConfig:
    """SnapFusion's efficient UNet (arXiv 2306.00980, Sec. 3.2 and Fig. 4): SD-1.5 with the blocks
    its architecture evolution kept. Per stage, SD-1.5 -> SnapFusion (CA = transformer, RN = ResNet):
    Down-1 CA 2->0; Down-2 unchanged; Down-3 RN 2->1; lowest resolution (down-4 + mid + up-0) RN 7->4,
    CA 1; Up-1 CA 3->6, RN 3->2; Up-2 unchanged; Up-3 CA 3->0. Cross-attention is gone at 64x64,
    the extra transformers sit at 16x16. Same stage count and names as SD-1.5, so feature taps match.

    These block counts give 759M parameters, not the paper's 848M: the three added 1280-channel
    transformers (+104M) do not offset five removed 1280-channel ResNets (-183M). See the report.
    """
    return StudentUNetConfig(
        down_layouts=("R R", "R T R T", "R T T", "R"),
        mid_layout="R T",  # one ResNet and the bottleneck's cross-attention transformer
        up_layouts=("R R", "R T T T R T T T", "R T R T R T", "R R R"),
    )


def mobilediffusion() -> StudentUNetConfig:
    """MobileDiffusion's UNet (arXiv 2311.16567, Sec. 3.2), SD-1.5 conditioning (CLIP-L, 768).

    Three levels (320, 640, 1024) at 64/32/16 latents; no transformer at 64x64; cross-attention-only
    transformers at 32x32 and in the outer 16x16 blocks, full transformers (self + cross) in the inner
    16x16 blocks and the bottleneck; 12 ResNets (SD: 22); separable 3x3 convs everywhere but the
    outermost (64x64) level; ReLU attention; shared key-value projections; SwiGLU; feed-forward
    expansion 6 counted on the gated projection (inner width 3x). Exact per-level block counts are
    not published in the text we could read: these give 394M against the reported 386M (unconfirmed).
    Taps: 3 down / mid / 3 up, so they align with SD-1.5's by resolution (feature_info), not index.
    """
    return StudentUNetConfig(
        sample_size=64,
        block_out_channels=(320, 640, 1024),
        down_layouts=("R", "R C2", "R C2 R T4"),
        mid_layout="R T6",
        up_layouts=("R T4 R T2 R C2", "R C2 R C2", "R R"),
        conv_types=("dense", "separable", "separable"),
        num_attention_heads=(5, 10, 16),  # 64 channels per head
        shared_kv=True,
        attention_kernel="relu",
        ff_mult=3.0,
        ff_activation="swiglu",
        cross_attention_dim=768,
    )


def snapgen() -> StudentUNetConfig:
    """SnapGen's UNet (arXiv 2412.09619, Sec. 3.1) from SDXL: channels (256, 512, 896), transformer
    blocks per stage (0, 2, 4) (SDXL: 0, 2, 10), self-attention only at the lowest resolution
    (cross-attention-only blocks at 64x64), multi-query attention (one key/value head), feed-forward
    expansion 3, expanded separable convs (expansion 2) everywhere, SDXL text_time conditioning so it
    runs in StableDiffusionXLPipeline. Same 3 stages as SDXL. 396M against the paper's 379M."""
    return StudentUNetConfig(
        sample_size=128,
        block_out_channels=(256, 512, 896),
        down_layouts=("R R", "R C2 R C2", "R T4 R T4"),
        mid_layout="R T4 R",
        up_layouts=("R T4 R T4 R T4", "R C2 R C2 R C2", "R R R"),
        conv_types=("expanded",) * 3,
        conv_expansion=2,
        num_attention_heads=(4, 8, 14),  # 64 channels per head
        kv_heads=1,
        ff_mult=3.0,
        cross_attention_dim=2048,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )


def snapgen_sd3() -> StudentUNetConfig:
    """``snapgen`` in the transformer's seat of SD3-Medium (``students/models/flow_student.py``): SnapGen
    distils its UNet from a transformer teacher across architectures (arXiv 2412.09619, Sec. 3.2), so the
    same UNet reads the SD3 teacher's 16-channel latents, its 4096-wide prompt states and its 2048-wide
    pooled embedding (``addition_embed_type="pooled"``) and predicts velocities (the flow recipes)."""
    return override(snapgen(), in_channels=16, out_channels=16, cross_attention_dim=4096, addition_embed_type="pooled",
                    addition_time_embed_dim=None, projection_class_embeddings_input_dim=2048)


def tiny() -> StudentUNetConfig:
    """Tests and the demo: the tiny teacher's shape (``teachers.configs.tiny_unet()``: 2 levels,
    32/64 channels, text width 32) with every efficient block in it: separable convs, ReLU attention,
    shared key-value, SwiGLU, cross-only (C) and self-only (S) transformers."""
    return StudentUNetConfig(
        sample_size=16,
        block_out_channels=(32, 64),
        down_layouts=("R", "R T"),
        mid_layout="R S",
        up_layouts=("R T R C", "R R"),
        conv_types=("dense", "separable"),
        num_attention_heads=(2, 4),
        shared_kv=True,
        attention_kernel="relu",
        ff_mult=2.0,
        ff_activation="swiglu",
        cross_attention_dim=32,
        norm_num_groups=8,
    )


def tiny_xl() -> StudentUNetConfig:
    """``tiny`` for the tiny SDXL teacher (``teachers.configs.tiny_xl_unet()``): text width 64 (two
    encoders of 32), pooled 32, time ids embedded at 8 each; multi-query attention, expanded
    separable convs, GEGLU, multi-block transformers."""
    return StudentUNetConfig(
        sample_size=16,
        block_out_channels=(32, 64),
        down_layouts=("R", "R C R T2"),
        mid_layout="R T R",
        up_layouts=("R T2 R T R C", "R R"),
        conv_types=("expanded", "expanded"),
        num_attention_heads=(2, 4),
        kv_heads=1,
        ff_mult=2.0,
        cross_attention_dim=64,
        norm_num_groups=8,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
    )


def shapes() -> StudentUNetConfig:
    """The mobile-class student of the ``shapes`` teacher (``teachers.shapes.model.unet_config()``:
    8x8 latents, 48/96 channels, text width 64): the same widths with fewer transformers, separable
    convs and ReLU shared-key-value attention at the low level, SwiGLU; under half the teacher's size."""
    return StudentUNetConfig(
        sample_size=8,
        block_out_channels=(48, 96),
        down_layouts=("R", "R T"),
        mid_layout="R T",
        up_layouts=("R T R T", "R R"),
        conv_types=("dense", "separable"),
        num_attention_heads=(2, 4),
        shared_kv=True,
        attention_kernel="relu",
        ff_mult=2.0,
        ff_activation="swiglu",
        cross_attention_dim=64,
        norm_num_groups=8,
    )


def shapes_small() -> StudentUNetConfig:
    """The cheapest student of both shapes teachers (``teachers.shapes.model.unet_config("shapes")`` and
    ``("sd15")``: 8x8 latents, text width 64) that keeps a UNet: two levels of 32/64 channels, one ResNet
    per down stage, text attention only at the lowest resolution and cross-attention only there
    (MobileDiffusion's and SnapGen's choices: self-attention and the high-resolution transformer go first),
    dense convolutions (at 8x8 latents a separable conv's extra operations cost more time than its MACs
    save, ``benchmarks/student_candidates.py``). Its cost against each teacher is in BENCHMARKS.md."""
    return StudentUNetConfig(
        sample_size=8,
        block_out_channels=(32, 64),
        down_layouts=("R", "R C"),
        mid_layout="C",
        up_layouts=("R C R", "R R"),
        conv_types=("dense", "dense"),
        num_attention_heads=(2, 4),
        ff_mult=2.0,
        ff_activation="swiglu",
        cross_attention_dim=64,
        norm_num_groups=8,
    )


def tiny_sd3() -> StudentUNetConfig:
    """``tiny`` for the tiny SD3 teacher (``teachers.configs.tiny_sd3_transformer()``): 16-channel latents,
    prompt embeddings of width 96 (CLIP-L + bigG zero-padded, then T5's zeros) for cross-attention and the
    64-wide pooled embedding added to the time embedding (``addition_embed_type="pooled"``, as SD3's
    ``time_text_embed``). A flow-matching student (``distill train --recipe flow_kd``): it predicts velocities."""
    return override(tiny(), in_channels=16, out_channels=16, cross_attention_dim=96, addition_embed_type="pooled",
                    projection_class_embeddings_input_dim=64)


PRESETS = {
    "snapfusion": snapfusion,
    "mobilediffusion": mobilediffusion,
    "snapgen": snapgen,
    "snapgen_sd3": snapgen_sd3,
    "tiny": tiny,
    "tiny_xl": tiny_xl,
    "tiny_sd3": tiny_sd3,
    "shapes": shapes,
    "shapes_small": shapes_small,
    "sd15_reference": sd15_reference,
    "sdxl_reference": sdxl_reference,
}


def preset(name: str, **overrides) -> StudentUNetConfig:
    """A preset by name (``snapfusion``, ``mobilediffusion``, ``snapgen``, ``tiny``, ``tiny_xl``), with overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown UNet preset {name!r}; known: {sorted(PRESETS)}")
    return override(PRESETS[name](), **overrides)


def build_unet(name_or_config: str | StudentUNetConfig, **overrides) -> EfficientUNet2DConditionModel:
    """``EfficientUNet2DConditionModel`` from a preset name or a config (random weights)."""
    cfg = preset(name_or_config, **overrides) if isinstance(name_or_config, str) else override(name_or_config, **overrides)
    return EfficientUNet2DConditionModel.from_student_config(cfg)
