"""Building blocks of the efficient student UNets: convolutions, attention, transformer and ResNet blocks.

Each block is a plain ``nn.Module`` in the vocabulary of diffusers' UNet blocks (``ResnetBlock2D``,
``Transformer2DModel``, ``BasicTransformerBlock``, ``Downsample2D``, ``Upsample2D``), with the
efficiency options the papers use:

- depthwise-separable 3x3 convolution (MobileNet, Howard et al. arXiv 1704.04861; MobileDiffusion
  arXiv 2311.16567 uses it everywhere but the outermost conv blocks) and SnapGen's *expanded*
  separable convolution (arXiv 2412.09619: pointwise expand, depthwise 3x3, pointwise project);
- ReLU attention: softmax replaced by ``relu(q k^T / sqrt(d)) / L`` (MobileDiffusion, after
  Wortsman et al. arXiv 2309.08586, who normalise by the key length L);
- decoupled self- and cross-attention: a transformer block may hold either or both (MobileDiffusion
  drops self-attention at 32x32, SnapGen keeps it only at the lowest resolution);
- multi-query attention (one key/value head shared by all query heads, Shazeer arXiv 1911.02150;
  SnapGen) and a shared key-value projection (MobileDiffusion: k = v = W x);
- a gated feed-forward with configurable expansion: GEGLU (SD) or SwiGLU (MobileDiffusion swaps GELU
  for Swish in the GLU).

Dense options reproduce diffusers' SD blocks parameter for parameter (``tests/test_students_blocks.py``
checks an SD-1.5 layout against ``UNet2DConditionModel``).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

CONV_TYPES = ("dense", "separable", "expanded")
ATTENTION_KERNELS = ("softmax", "relu")
FF_ACTIVATIONS = ("geglu", "swiglu")
_TOKEN = re.compile(r"^([RTCS])(\d*)$")
_ATTENTION = {"T": (True, True), "C": (False, True), "S": (True, False)}  # layout token -> (self, cross)


# ------------------------------------------------------------------------------------------
# convolutions
# ------------------------------------------------------------------------------------------


class SeparableConv2d(nn.Module):
    """Depthwise 3x3 then pointwise 1x1 (MobileNet). ``(B, C_in, H, W) -> (B, C_out, H/s, W/s)``.

    Parameters ``9 C_in + C_in C_out`` against a dense conv's ``9 C_in C_out``. Linear: no norm or
    activation inside, so it is a factorised drop-in for ``nn.Conv2d(C_in, C_out, 3)``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.depthwise = nn.Conv2d(in_channels, in_channels, 3, stride=stride, padding=1, groups=in_channels, bias=False)
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


class ExpandedSeparableConv2d(nn.Module):
    """SnapGen's expanded separable conv: pointwise expand to ``expansion * C_out``, depthwise 3x3,
    pointwise project to ``C_out`` (arXiv 2412.09619, Sec. 3.1: expansion 2 recovers the quality a plain
    separable conv loses; there -15% parameters against dense convs, here -14% on the same UNet).
    Linear like :class:`SeparableConv2d` (the ResNet block around it supplies GroupNorm and SiLU);
    whether SnapGen puts an activation between the three, and whether the hidden width follows the
    input or the output width, is not stated. The expand conv has no bias, so zero padding commutes
    with it and the whole is exactly a (rank-limited) dense 3x3 conv.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, expansion: int = 2):
        super().__init__()
        hidden = out_channels * expansion
        self.expand = nn.Conv2d(in_channels, hidden, 1, bias=False)
        self.depthwise = nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False)
        self.project = nn.Conv2d(hidden, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.depthwise(self.expand(x)))


def make_conv3x3(conv_type: str, in_channels: int, out_channels: int, stride: int = 1, expansion: int = 2) -> nn.Module:
    """A 3x3 convolution of the given kind (``dense``, ``separable`` or ``expanded``)."""
    if conv_type == "dense":
        return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)
    if conv_type == "separable":
        return SeparableConv2d(in_channels, out_channels, stride)
    if conv_type == "expanded":
        return ExpandedSeparableConv2d(in_channels, out_channels, stride, expansion)
    raise ValueError(f"conv type {conv_type!r} is not one of {CONV_TYPES}")


# ------------------------------------------------------------------------------------------
# attention
# ------------------------------------------------------------------------------------------


def relu_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """ReLU attention ``relu(q k^T / sqrt(d)) v / L`` (Wortsman et al. arXiv 2309.08586, Eq. 2;
    MobileDiffusion Sec. 3.2 fine-tunes softmax into it).

    query ``(B, h, Lq, d)``, key/value ``(B, h_kv, Lk, d)`` with ``h_kv`` dividing ``h`` -> ``(B, h, Lq, d)``.
    Dividing by the key length L keeps the output on the scale softmax gives at initialisation.
    """
    key, value = _repeat_kv(key, query.shape[1]), _repeat_kv(value, query.shape[1])
    scores = torch.matmul(query, key.transpose(-1, -2)) * query.shape[-1] ** -0.5
    return torch.matmul(F.relu(scores), value) / key.shape[-2]


def _repeat_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Broadcast ``(B, h_kv, L, d)`` to ``(B, heads, L, d)`` without copying (MQA / GQA)."""
    if x.shape[1] == heads:
        return x
    b, h_kv, length, d = x.shape
    return x[:, :, None].expand(b, h_kv, heads // h_kv, length, d).reshape(b, heads, length, d)


class EfficientAttention(nn.Module):
    """Multi-head attention with optional multi-query heads, a shared key-value projection and a
    softmax or ReLU kernel. ``(B, Lq, dim), context (B, Lk, context_dim) -> (B, Lq, dim)``.

    Module names follow diffusers' ``Attention`` (``to_q``, ``to_k``, ``to_v``, ``to_out.0``) so a
    dense configuration has the same parameters as SD's attention; ``to_kv`` replaces ``to_k`` and
    ``to_v`` when they are shared.
    """

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, kv_heads: int | None = None,
                 shared_kv: bool = False, kernel: str = "softmax"):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by {heads} heads")
        kv_heads = heads if kv_heads is None else kv_heads
        if kv_heads < 1 or heads % kv_heads:
            raise ValueError(f"kv_heads={kv_heads} must divide heads={heads}")
        if kernel not in ATTENTION_KERNELS:
            raise ValueError(f"attention kernel {kernel!r} is not one of {ATTENTION_KERNELS}")
        self.heads, self.kv_heads, self.kernel = heads, kv_heads, kernel
        self.head_dim = dim // heads
        context_dim = context_dim or dim
        kv_width = kv_heads * self.head_dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        if shared_kv:
            self.to_kv = nn.Linear(context_dim, kv_width, bias=False)
        else:
            self.to_k = nn.Linear(context_dim, kv_width, bias=False)
            self.to_v = nn.Linear(context_dim, kv_width, bias=False)
        self.shared_kv = shared_kv
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])

    def _split(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        b, length, _ = x.shape
        return x.view(b, length, heads, self.head_dim).transpose(1, 2)

    def forward(self, hidden_states: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = hidden_states if context is None else context
        q = self._split(self.to_q(hidden_states), self.heads)
        if self.shared_kv:
            k = v = self._split(self.to_kv(context), self.kv_heads)
        else:
            k, v = self._split(self.to_k(context), self.kv_heads), self._split(self.to_v(context), self.kv_heads)
        if self.kernel == "relu":
            out = relu_attention(q, k, v)
        else:
            out = F.scaled_dot_product_attention(q, _repeat_kv(k, self.heads), _repeat_kv(v, self.heads))
        out = out.transpose(1, 2).reshape(hidden_states.shape[0], -1, self.heads * self.head_dim)
        return self.to_out[1](self.to_out[0](out))


class GatedFeedForward(nn.Module):
    """``x -> W_out (act(W_g x) * W_v x)``: GEGLU (SD's feed-forward) or SwiGLU (MobileDiffusion).

    ``mult`` is the inner width over ``dim`` (diffusers' ``FeedForward(mult=4)`` for SD); the gated
    input projection is twice that wide, which is what MobileDiffusion counts as "expansion 8".
    Names mirror diffusers (``net.0.proj``, ``net.2``).
    """

    def __init__(self, dim: int, mult: float = 4.0, activation: str = "geglu"):
        super().__init__()
        if activation not in FF_ACTIVATIONS:
            raise ValueError(f"feed-forward activation {activation!r} is not one of {FF_ACTIVATIONS}")
        inner = int(dim * mult)
        self.activation = activation
        self.net = nn.ModuleList([_GatedProj(dim, inner, activation), nn.Dropout(0.0), nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class _GatedProj(nn.Module):
    def __init__(self, dim: int, inner: int, activation: str):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)
        self.act = F.gelu if activation == "geglu" else F.silu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)  # diffusers' GEGLU order: value first, gate second
        return value * self.act(gate)


# ------------------------------------------------------------------------------------------
# transformer
# ------------------------------------------------------------------------------------------


class TransformerBlock(nn.Module):
    """diffusers' ``BasicTransformerBlock`` with self- and cross-attention each optional
    (MobileDiffusion Sec. 3.2 "decoupling self-attention from cross-attention"). ``(B, L, dim) -> same``."""

    def __init__(self, dim: int, heads: int, cross_attention_dim: int, *, self_attention: bool = True,
                 cross_attention: bool = True, kv_heads: int | None = None, shared_kv: bool = False,
                 kernel: str = "softmax", ff_mult: float = 4.0, ff_activation: str = "geglu"):
        super().__init__()
        if not (self_attention or cross_attention):
            raise ValueError("a transformer block needs self-attention, cross-attention or both")
        attn = dict(heads=heads, kv_heads=kv_heads, shared_kv=shared_kv, kernel=kernel)
        self.norm1 = nn.LayerNorm(dim) if self_attention else None
        self.attn1 = EfficientAttention(dim, **attn) if self_attention else None
        self.norm2 = nn.LayerNorm(dim) if cross_attention else None
        self.attn2 = EfficientAttention(dim, context_dim=cross_attention_dim, **attn) if cross_attention else None
        self.norm3 = nn.LayerNorm(dim)
        self.ff = GatedFeedForward(dim, ff_mult, ff_activation)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None) -> torch.Tensor:
        if self.attn1 is not None:
            hidden_states = hidden_states + self.attn1(self.norm1(hidden_states))
        if self.attn2 is not None:
            hidden_states = hidden_states + self.attn2(self.norm2(hidden_states), encoder_hidden_states)
        return hidden_states + self.ff(self.norm3(hidden_states))


class Transformer2D(nn.Module):
    """diffusers' ``Transformer2DModel`` (linear projection variant): GroupNorm, ``proj_in``, ``depth``
    transformer blocks over the ``H*W`` tokens, ``proj_out``, residual. ``(B, C, H, W) -> same``."""

    def __init__(self, channels: int, depth: int, norm_num_groups: int, norm_eps: float, **block_kwargs):
        super().__init__()
        self.norm = nn.GroupNorm(norm_num_groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(channels, **block_kwargs) for _ in range(depth)])
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None) -> torch.Tensor:
        b, c, h, w = hidden_states.shape
        residual = hidden_states
        x = self.norm(hidden_states).permute(0, 2, 3, 1).reshape(b, h * w, c)
        x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, encoder_hidden_states)
        x = self.proj_out(x)
        return x.reshape(b, h, w, c).permute(0, 3, 1, 2) + residual


# ------------------------------------------------------------------------------------------
# convolution blocks
# ------------------------------------------------------------------------------------------


class ResnetBlock(nn.Module):
    """diffusers' ``ResnetBlock2D`` with its two 3x3 convs of a chosen kind.
    ``(B, C_in, H, W), temb (B, T) -> (B, C_out, H, W)``."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, norm_num_groups: int,
                 norm_eps: float, conv_type: str = "dense", conv_expansion: int = 2):
        super().__init__()
        self.norm1 = nn.GroupNorm(norm_num_groups, in_channels, eps=norm_eps)
        self.conv1 = make_conv3x3(conv_type, in_channels, out_channels, expansion=conv_expansion)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = nn.GroupNorm(norm_num_groups, out_channels, eps=norm_eps)
        self.conv2 = make_conv3x3(conv_type, out_channels, out_channels, expansion=conv_expansion)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (x if self.conv_shortcut is None else self.conv_shortcut(x))


class Downsample(nn.Module):
    """Strided 3x3 conv (diffusers' ``Downsample2D``). ``(B, C, H, W) -> (B, C, H/2, W/2)``."""

    def __init__(self, channels: int, conv_type: str = "dense", conv_expansion: int = 2):
        super().__init__()
        self.conv = make_conv3x3(conv_type, channels, channels, stride=2, expansion=conv_expansion)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest 2x then 3x3 conv (diffusers' ``Upsample2D``). ``(B, C, H, W) -> (B, C, 2H, 2W)``."""

    def __init__(self, channels: int, conv_type: str = "dense", conv_expansion: int = 2):
        super().__init__()
        self.conv = make_conv3x3(conv_type, channels, channels, expansion=conv_expansion)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bfloat16:  # nearest upsampling has no bf16 kernel on some backends
            return self.conv(F.interpolate(x.float(), scale_factor=2.0, mode="nearest").to(x.dtype))
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


# ------------------------------------------------------------------------------------------
# UNet stages: a layout string of blocks (see students/models/unet.py)
# ------------------------------------------------------------------------------------------


class _Stage(nn.Module):
    """Blocks of one layout; ``resnets`` and ``attentions`` keep diffusers' module names. With
    ``enable_gradient_checkpointing()`` each block is recomputed in the backward pass."""

    first_resnet = True  # the layout must start with R (not the mid stage: see parse_layout)

    def __init__(self, layout, in_channels, channels, cfg, level, temb_channels, skip_channels=None):
        super().__init__()
        conv = dict(conv_type=cfg.conv_types[level], conv_expansion=cfg.conv_expansion)
        attn = dict(heads=cfg.num_attention_heads[level], cross_attention_dim=cfg.cross_attention_dim, kv_heads=cfg.kv_heads,
                    shared_kv=cfg.shared_kv, kernel=cfg.attention_kernel, ff_mult=cfg.ff_mult, ff_activation=cfg.ff_activation)
        self.resnets, self.attentions, self.order = nn.ModuleList(), nn.ModuleList(), []
        for kind, depth in parse_layout(layout, first_resnet=self.first_resnet):
            if kind == "R":
                skip = skip_channels.pop() if skip_channels is not None else 0
                self.resnets.append(ResnetBlock(in_channels + skip, channels, temb_channels, cfg.norm_num_groups, cfg.norm_eps, **conv))
                in_channels = channels
            else:
                sa, ca = _ATTENTION[kind]
                self.attentions.append(Transformer2D(channels, depth, cfg.norm_num_groups, cfg.norm_eps,
                                                     self_attention=sa, cross_attention=ca, **attn))
            self.order.append(kind == "R")
        self.gradient_checkpointing = False

    def _run(self, block, *args):
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(block, *args)
        return block(*args)

    def _blocks(self):
        resnets, attentions = iter(self.resnets), iter(self.attentions)
        for is_resnet in self.order:
            yield is_resnet, next(resnets) if is_resnet else next(attentions)


class DownStage(_Stage):
    """Returns ``(hidden_states, skips)`` like diffusers' down blocks: one skip after each ResNet and
    the transformers that follow it, and one after the downsampler."""

    def __init__(self, layout, in_channels, channels, cfg, level, temb_channels, add_downsample):
        super().__init__(layout, in_channels, channels, cfg, level, temb_channels)
        self.downsamplers = nn.ModuleList([Downsample(channels, cfg.conv_types[level], cfg.conv_expansion)]) if add_downsample else None

    def skip_count(self) -> int:
        return sum(self.order) + (self.downsamplers is not None)

    def forward(self, hidden_states, temb, encoder_hidden_states):
        skips = []
        for i, (is_resnet, block) in enumerate(self._blocks()):
            if is_resnet and i > 0:
                skips.append(hidden_states)
            hidden_states = self._run(block, hidden_states, temb if is_resnet else encoder_hidden_states)
        skips.append(hidden_states)
        if self.downsamplers is not None:
            hidden_states = self.downsamplers[0](hidden_states)
            skips.append(hidden_states)
        return hidden_states, tuple(skips)


class MidStage(_Stage):
    first_resnet = False  # at the lowest level's width already: may start with a transformer

    def forward(self, hidden_states, temb, encoder_hidden_states):
        for is_resnet, block in self._blocks():
            hidden_states = self._run(block, hidden_states, temb if is_resnet else encoder_hidden_states)
        return hidden_states


class UpStage(_Stage):
    """Each ResNet first concatenates the most recent unused skip: ``cat([hidden, skip], dim=1)``."""

    def __init__(self, layout, in_channels, channels, cfg, level, temb_channels, skip_channels, add_upsample):
        super().__init__(layout, in_channels, channels, cfg, level, temb_channels, skip_channels)
        self.upsamplers = nn.ModuleList([Upsample(channels, cfg.conv_types[level], cfg.conv_expansion)]) if add_upsample else None

    def forward(self, hidden_states, skips: list, temb, encoder_hidden_states):
        for is_resnet, block in self._blocks():
            if is_resnet:
                hidden_states = self._run(block, torch.cat([hidden_states, skips.pop()], dim=1), temb)
            else:
                hidden_states = self._run(block, hidden_states, encoder_hidden_states)
        if self.upsamplers is not None:
            hidden_states = self.upsamplers[0](hidden_states)
        return hidden_states


def parse_layout(layout: str, where: str = "layout", *, first_resnet: bool = True) -> list[tuple[str, int]]:
    """``"R T2 R C"`` -> ``[("R", 1), ("T", 2), ("R", 1), ("C", 1)]``.

    A down or up stage must start with a ResNet (its first one maps the incoming channels to the
    level's); the mid stage (``first_resnet=False``) runs at the width it receives, so any non-empty
    layout will do (architecture evolution may remove its first ResNet)."""
    blocks = []
    for token in str(layout).split():
        match = _TOKEN.match(token)
        if not match or (match.group(1) == "R" and match.group(2)) or int(match.group(2) or 1) < 1:
            raise ValueError(f"{where}: block {token!r} in {layout!r} is not R, T, C or S with an optional depth >= 1")
        blocks.append((match.group(1), int(match.group(2) or 1)))
    if not blocks:
        raise ValueError(f"{where}: layout {layout!r} has no blocks")
    if first_resnet and blocks[0][0] != "R":
        raise ValueError(f"{where}: layout {layout!r} must start with a ResNet block 'R'")
    return blocks
