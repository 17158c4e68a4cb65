"""Students cut from the teacher (BK-SDM block removal): every copied block computes what its
teacher block computes on the same input, and the identity cut is the teacher."""

import pytest
import torch
from diffusers import UNet2DConditionModel

from students.models.teacher_init import CUTS, cut, family_config, init_from_teacher
from students.models.unet import EfficientUNet2DConditionModel, build_unet
from teachers import configs

pytestmark = pytest.mark.numerics  # float32 tolerances: rerun on AVX2 kernels (CI)

# Float32 tolerance: the same weights and inputs through two implementations of one block differ
# only in summation order (attention via SDPA vs einsum, conv via the same kernel); with O(1)
# activations over <= a few hundred terms per output that is a few ulps of 1, i.e. ~1e-6.
ATOL = 2e-5


def _teacher_4_levels():
    torch.manual_seed(0)
    cfg = dict(configs.sd15_unet(), block_out_channels=(32, 64, 64, 64), cross_attention_dim=32,
               norm_num_groups=8, sample_size=16)
    return UNet2DConditionModel(**cfg).eval()


def _block_output(module, x, temb, context):
    name = type(module).__name__
    if "Resnet" in name:
        return module(x, temb)
    if "Transformer" in name:
        out = module(x, encoder_hidden_states=context) if "Model" in name else module(x, context)
        return out.sample if hasattr(out, "sample") else out
    return module[0](x)  # down/upsamplers: a ModuleList of one


@pytest.mark.parametrize("name", ["bk_base", "bk_small", "bk_tiny", "snapfusion"])
def test_copied_blocks_compute_what_their_teacher_blocks_compute(name):
    teacher = _teacher_4_levels()
    student_cfg, block_map = cut(family_config(teacher), name)
    student = EfficientUNet2DConditionModel.from_student_config(student_cfg).eval()
    report = init_from_teacher(student, teacher, block_map)
    assert report["fresh"] == [] and len(report["copied"]) == len(list(student.parameters()))
    torch.manual_seed(1)
    checked = 0
    for s_path, t_path in block_map.items():
        if s_path in ("conv_in", "time_embedding", "add_embedding", "conv_norm_out", "conv_out"):
            continue
        s_mod, t_mod = student.get_submodule(s_path), teacher.get_submodule(t_path)
        first = next(iter(s_mod.parameters()))
        channels = first.shape[1] if first.dim() == 4 else first.shape[0]
        if "resnets" in s_path:
            channels = s_mod.norm1.num_channels
        x = torch.randn(2, channels, 8, 8)
        temb, context = torch.randn(2, 128), torch.randn(2, 7, 32)
        with torch.no_grad():
            a, b = _block_output(s_mod, x, temb, context), _block_output(t_mod, x, temb, context)
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-5), s_path
        checked += 1
    assert checked >= 10
    x, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([10, 700]), torch.randn(2, 77, 32)
    with torch.no_grad():  # the cut student runs whole: its skips meet the widths they expect
        assert student(x, t, ctx).sample.shape == teacher(x, t, ctx).sample.shape


def test_identity_cut_is_the_teacher():
    teacher = _teacher_4_levels()
    cfg, block_map = cut(family_config(teacher), "full")
    student = EfficientUNet2DConditionModel.from_student_config(cfg).eval()
    init_from_teacher(student, teacher, block_map)
    torch.manual_seed(2)
    x, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([10, 700]), torch.randn(2, 77, 32)
    with torch.no_grad():
        torch.testing.assert_close(student(x, t, ctx).sample, teacher(x, t, ctx).sample, atol=ATOL, rtol=1e-5)


def test_cuts_remove_the_stated_blocks():
    fam = family_config(_teacher_4_levels())
    assert fam.down_layouts == ("R T R T",) * 3 + ("R R",) and fam.mid_layout == "R T R"
    base, m = cut(fam, "bk_base")
    assert base.down_layouts == ("R T",) * 3 + ("R",)
    assert base.up_layouts == ("R R", "R T R T", "R T R T", "R T R T")
    assert m["up_blocks.1.resnets.1"] == "up_blocks.1.resnets.2"  # the second ResNet pair is the one removed
    small, _ = cut(fam, "bk_small")
    assert small.mid_layout == "R"
    tiny, m = cut(fam, "bk_tiny")
    assert len(tiny.block_out_channels) == 3 and tiny.up_layouts[0] == "R T R T"
    assert m["up_blocks.0.resnets.1"] == "up_blocks.1.resnets.2" and "down_blocks.2.downsamplers" not in m
    snap, m = cut(fam, "snapfusion")  # no cross-attention at the highest resolution, nothing else removed
    assert snap.down_layouts == ("R R",) + ("R T R T",) * 2 + ("R R",) and snap.mid_layout == "R T R"
    assert snap.up_layouts == fam.up_layouts[:3] + ("R R R",) and fam.up_layouts[3] == "R T R T R T"
    assert not any(k.startswith(("down_blocks.0.attentions", "up_blocks.3.attentions")) for k in m)
    assert m["down_blocks.0.resnets.1"] == "down_blocks.0.resnets.1" and m["up_blocks.2.attentions.2"] == "up_blocks.2.attentions.2"
    with pytest.raises(ValueError, match="unknown cut"):
        cut(fam, "bk_huge")
    with pytest.raises(ValueError, match="the cut 'none' is now 'full'"):  # the command line reads none as unset
        cut(fam, "none")
    assert set(CUTS) >= {"full", "bk_base", "bk_small", "bk_tiny", "mid_only", "snapfusion"}


def test_a_student_of_another_family_is_refused_by_name():
    torch.manual_seed(0)
    teacher = UNet2DConditionModel(**configs.tiny_unet()).eval()
    _, block_map = cut(family_config(teacher), "full")
    other = build_unet("tiny")  # separable convs, ReLU shared-KV attention, SwiGLU
    with pytest.raises(ValueError, match="not of the teacher's family"):
        init_from_teacher(other, teacher, block_map)


def test_the_whole_teacher_cut_is_reachable_from_the_command_line(tmp_path):
    """``core.options`` reads ``none`` as "unset" for optional flags: the whole-UNet cut is ``full``, so
    ``--init_from_teacher full`` reaches it on both commands, and ``none`` starts from the preset."""
    from core.errors import UserError
    from students.search import evolve
    from students.training import cli
    from students.training.train import TrainConfig

    common = ["--data", str(tmp_path / "d"), "--output", str(tmp_path / "o")]
    train = cli.parse_args(common + ["--init_from_teacher", "full"])
    assert (train.init_from_teacher, train.preset) == ("full", None)
    assert (cli.parse_args(common + ["--init_from_teacher", "none"]).init_from_teacher,
            cli.parse_args(common + ["--init_from_teacher", "none"]).preset) == (None, "tiny")
    evo = evolve.parse_args(common + ["--init_from_teacher", "full", "--latency_target_ratio", "0.7",
                                      "--val_captions", str(tmp_path / "v.txt")])
    assert (evo.init_from_teacher, evo.train_config().init_from_teacher, evo.preset) == ("full", "full", None)
    with pytest.raises(UserError, match="unknown cut 'none' \\(the cut 'none' is now 'full'\\)"):
        TrainConfig(data="d", output="o", init_from_teacher="none")  # the old name, from Python
