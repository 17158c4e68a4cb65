"""Student building blocks against plain float64 references, and the layout grammar."""

import math

import pytest
import torch
import torch.nn.functional as F

from students.models import blocks
from students.models.unet import StudentUNetConfig, override, sd15_reference

pytestmark = pytest.mark.numerics  # float32 tolerances: rerun on AVX2 kernels (CI)


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(0)


def _randomize(module, rng):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=rng, dtype=p.dtype))
    return module


@pytest.mark.parametrize("stride", [1, 2])
def test_separable_conv_equals_dense_conv_of_composed_weight(rng, stride):
    conv = _randomize(blocks.SeparableConv2d(6, 10, stride=stride).double(), rng)
    x = torch.randn(2, 6, 9, 9, generator=rng, dtype=torch.float64)
    depthwise = conv.depthwise.weight[:, 0]  # (C_in, 3, 3)
    pointwise = conv.pointwise.weight[:, :, 0, 0]  # (C_out, C_in)
    dense = torch.einsum("oi,ikl->oikl", pointwise, depthwise)
    expected = F.conv2d(x, dense, conv.pointwise.bias, stride=stride, padding=1)
    assert torch.allclose(conv(x), expected, atol=1e-10)
    assert sum(p.numel() for p in conv.parameters()) == 9 * 6 + 6 * 10 + 10  # vs 9*6*10 + 10 dense


@pytest.mark.parametrize("stride", [1, 2])
def test_expanded_separable_conv_equals_dense_conv_of_composed_weight(rng, stride):
    conv = _randomize(blocks.ExpandedSeparableConv2d(4, 5, stride=stride, expansion=2).double(), rng)
    assert conv.expand.out_channels == 10  # expansion x output width
    x = torch.randn(2, 4, 8, 8, generator=rng, dtype=torch.float64)
    expand = conv.expand.weight[:, :, 0, 0]  # (H, C_in); no bias, so zero padding commutes with it
    depthwise = conv.depthwise.weight[:, 0]  # (H, 3, 3)
    project = conv.project.weight[:, :, 0, 0]  # (C_out, H)
    dense = torch.einsum("oh,hkl,hi->oikl", project, depthwise, expand)
    expected = F.conv2d(x, dense, conv.project.bias, stride=stride, padding=1)
    assert torch.allclose(conv(x), expected, atol=1e-9)


def test_relu_attention_matches_einsum_formula(rng):
    q = torch.randn(2, 4, 7, 8, generator=rng, dtype=torch.float64)
    k = torch.randn(2, 1, 5, 8, generator=rng, dtype=torch.float64)  # one key/value head (MQA)
    v = torch.randn(2, 1, 5, 8, generator=rng, dtype=torch.float64)
    scores = torch.einsum("bhid,bjd->bhij", q, k[:, 0]) / math.sqrt(8)
    expected = torch.einsum("bhij,bjd->bhid", scores.clamp(min=0), v[:, 0]) / 5
    assert torch.allclose(blocks.relu_attention(q, k, v), expected, atol=1e-12)
    # not softmax: weights are unnormalised per query, and negative scores contribute exactly 0
    weights = scores.clamp(min=0) / 5
    assert not torch.allclose(weights.sum(-1), torch.ones_like(weights.sum(-1)))


@pytest.mark.parametrize("kernel", ["softmax", "relu"])
def test_attention_with_shared_kv_and_multi_query_matches_explicit_formula(rng, kernel):
    attn = _randomize(blocks.EfficientAttention(16, heads=4, context_dim=6, kv_heads=1, shared_kv=True, kernel=kernel).double(), rng)
    assert attn.to_kv.out_features == 4  # one head of width 16 / 4, used as keys and values
    x = torch.randn(2, 9, 16, generator=rng, dtype=torch.float64)
    ctx = torch.randn(2, 3, 6, generator=rng, dtype=torch.float64)
    q = (x @ attn.to_q.weight.T).view(2, 9, 4, 4)
    kv = ctx @ attn.to_kv.weight.T  # (2, 3, 4)
    scores = torch.einsum("bihd,bjd->bhij", q, kv) / 2.0  # sqrt(head_dim 4)
    weights = scores.softmax(-1) if kernel == "softmax" else scores.clamp(min=0) / 3
    heads = torch.einsum("bhij,bjd->bihd", weights, kv).reshape(2, 9, 16)
    expected = heads @ attn.to_out[0].weight.T + attn.to_out[0].bias
    assert torch.allclose(attn(x, ctx), expected, atol=1e-10)


def test_multi_head_attention_matches_torch_multihead_attention(rng):
    attn = _randomize(blocks.EfficientAttention(12, heads=3).double(), rng)
    ref = torch.nn.MultiheadAttention(12, 3, bias=False, batch_first=True).double()
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight]))
        ref.out_proj.weight.copy_(attn.to_out[0].weight)
    x = torch.randn(2, 5, 12, generator=rng, dtype=torch.float64)
    expected = ref(x, x, x, need_weights=False)[0] + attn.to_out[0].bias
    assert torch.allclose(attn(x), expected, atol=1e-10)


@pytest.mark.parametrize("activation,act", [("geglu", F.gelu), ("swiglu", F.silu)])
def test_gated_feed_forward_formula(rng, activation, act):
    ff = _randomize(blocks.GatedFeedForward(8, mult=3, activation=activation).double(), rng)
    x = torch.randn(3, 8, generator=rng, dtype=torch.float64)
    value, gate = (x @ ff.net[0].proj.weight.T + ff.net[0].proj.bias).split(24, dim=-1)
    expected = (value * act(gate)) @ ff.net[2].weight.T + ff.net[2].bias
    assert torch.allclose(ff(x), expected, atol=1e-12)


def test_decoupled_transformer_blocks_hold_only_their_attention():
    kw = dict(dim=64, heads=4, cross_attention_dim=32)
    cross_only = blocks.TransformerBlock(**kw, self_attention=False)
    self_only = blocks.TransformerBlock(**kw, cross_attention=False)
    assert cross_only.attn1 is None and cross_only.attn2 is not None
    assert self_only.attn2 is None and self_only.attn1 is not None
    x, ctx = torch.randn(2, 10, 64), torch.randn(2, 7, 32)
    # self-only ignores the text; cross-only depends on it
    assert torch.equal(self_only(x, ctx), self_only(x, torch.randn(2, 7, 32)))
    assert not torch.allclose(cross_only(x, ctx), cross_only(x, torch.randn(2, 7, 32)))
    with pytest.raises(ValueError, match="self-attention, cross-attention or both"):
        blocks.TransformerBlock(**kw, self_attention=False, cross_attention=False)


def test_sd15_layout_reproduces_diffusers_unet_exactly():
    """The dense blocks are diffusers' SD blocks: same parameter names and sizes as UNet2DConditionModel."""
    from diffusers import UNet2DConditionModel

    from students.models.unet import EfficientUNet2DConditionModel
    from teachers.configs import sd15_unet

    with torch.device("meta"):
        teacher = UNet2DConditionModel(**sd15_unet())
        student = EfficientUNet2DConditionModel.from_student_config(sd15_reference())
    t = {k: v.numel() for k, v in teacher.state_dict().items()}
    s = {k: v.numel() for k, v in student.state_dict().items()}
    assert s == t
    assert sum(s.values()) == 859_520_964


def test_layout_grammar():
    assert blocks.parse_layout("R T2 R C S") == [("R", 1), ("T", 2), ("R", 1), ("C", 1), ("S", 1)]
    for bad in ("T R", "R X", "R2", "R T0", ""):
        with pytest.raises(ValueError, match="layout|block"):
            blocks.parse_layout(bad)
    # the mid stage (first_resnet=False) may start with a transformer, never be empty
    assert blocks.parse_layout("T R", first_resnet=False) == [("T", 1), ("R", 1)]
    with pytest.raises(ValueError, match="no blocks"):
        blocks.parse_layout("", first_resnet=False)
    with pytest.raises(ValueError, match=r"down_layouts\[0\].*must start with a ResNet"):
        override(StudentUNetConfig(), down_layouts=("T R T", "R T R T", "R T R T", "R R"))
    assert override(StudentUNetConfig(), mid_layout="T").mid_layout == "T"


def test_config_validation_names_the_bad_value():
    cfg = StudentUNetConfig()
    with pytest.raises(ValueError, match=r"up_layouts\[1\].*3 ResNet blocks but level 2 provides 4"):
        override(cfg, down_layouts=("R T R T", "R T R T", "R T R T R", "R R"))
    with pytest.raises(ValueError, match="conv_types\\[0\\]='sparse'"):
        override(cfg, conv_types=("sparse", "dense", "dense", "dense"))
    with pytest.raises(ValueError, match="kv_heads=3"):
        override(cfg, kv_heads=3)
    with pytest.raises(ValueError, match="attention_kernel='linear'"):
        override(cfg, attention_kernel="linear")
    with pytest.raises(ValueError, match="unknown StudentUNetConfig field.*'channels'"):
        override(cfg, channels=(1, 2))
    with pytest.raises(ValueError, match="text_time"):
        override(cfg, addition_embed_type="text_time")
