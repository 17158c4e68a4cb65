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


# --------------------------------------------------------------------------------------------
# the shapes-sd15 teacher's architecture (teachers/shapes/model.py unet_config("sd15")): SD-1.5's
# layout in three levels, so every BK-SDM cut removes real blocks from it
# --------------------------------------------------------------------------------------------


def _shapes_sd15_teacher():
    from teachers.shapes import model as shapes_model

    torch.manual_seed(0)  # random weights: the cuts and copies depend on the architecture, not on training
    return UNet2DConditionModel(**shapes_model.unet_config("sd15")).eval()


# Teacher blocks each cut removes from the 3-level layout (down "R T R T" | "R T R T" | "R R",
# mid "R T R", up "R R R" | "R T R T R T" | "R T R T R T"), written out from the cut definitions in
# students/models/teacher_init.py; a prefix removes every parameter under it.
_BK_BASE_REMOVED = ["down_blocks.0.resnets.1", "down_blocks.0.attentions.1", "down_blocks.1.resnets.1",
                    "down_blocks.1.attentions.1", "down_blocks.2.resnets.1", "up_blocks.0.resnets.1",
                    "up_blocks.1.resnets.1", "up_blocks.1.attentions.1", "up_blocks.2.resnets.1",
                    "up_blocks.2.attentions.1"]
_BK_SMALL_REMOVED = _BK_BASE_REMOVED + ["mid_block.attentions.0", "mid_block.resnets.1"]
_SD15_REMOVED = {
    "bk_base": _BK_BASE_REMOVED,
    "bk_small": _BK_SMALL_REMOVED,
    "bk_tiny": _BK_SMALL_REMOVED + ["down_blocks.2", "up_blocks.0", "down_blocks.1.downsamplers"],
    "snapfusion": ["down_blocks.0.attentions", "up_blocks.2.attentions"],
}


def _numel_under(module, prefixes):
    return sum(p.numel() for n, p in module.named_parameters() if any(n == q or n.startswith(q + ".") for q in prefixes))


def test_the_shapes_sd15_architecture_has_sd15s_block_layout():
    fam = family_config(_shapes_sd15_teacher())
    assert fam.down_layouts == ("R T R T", "R T R T", "R R") and fam.mid_layout == "R T R"
    assert fam.up_layouts == ("R R R", "R T R T R T", "R T R T R T")
    # SD-1.5 (4 levels) has these same stage layouts in its last three levels
    sd15 = family_config(_teacher_4_levels())
    assert sd15.down_layouts[1:] == fam.down_layouts and sd15.up_layouts[:3] == fam.up_layouts


@pytest.mark.parametrize("name", ["bk_base", "bk_small", "bk_tiny", "snapfusion"])
def test_bk_cuts_of_the_shapes_sd15_teacher_copy_its_blocks_exactly(name):
    teacher = _shapes_sd15_teacher()
    student_cfg, block_map = cut(family_config(teacher), name)
    student = EfficientUNet2DConditionModel.from_student_config(student_cfg).eval()
    report = init_from_teacher(student, teacher, block_map)
    assert report["fresh"] == [] and len(report["copied"]) == len(list(student.parameters()))

    # fewer parameters, by exactly the removed blocks
    n_teacher, n_student = (sum(p.numel() for p in m.parameters()) for m in (teacher, student))
    removed = _numel_under(teacher, _SD15_REMOVED[name])
    assert removed > 0 and n_student == n_teacher - removed < n_teacher

    torch.manual_seed(1)
    temb_dim = teacher.time_embedding.linear_2.out_features
    ctx_dim = teacher.config.cross_attention_dim
    kinds = set()
    for s_path, t_path in block_map.items():
        if "resnets" not in s_path and "attentions" not in s_path and "samplers" not in s_path:
            continue  # conv_in, time_embedding, ...: copied whole, checked by the whole-student run below
        s_mod, t_mod = student.get_submodule(s_path), teacher.get_submodule(t_path)
        if "resnets" in s_path:
            channels = s_mod.norm1.num_channels
        elif "attentions" in s_path:
            channels = s_mod.norm.num_channels
        else:
            channels = next(iter(s_mod.parameters())).shape[1]
        x = torch.randn(2, channels, 4, 4)
        temb, context = torch.randn(2, temb_dim), torch.randn(2, 77, ctx_dim)
        with torch.no_grad():
            a, b = _block_output(s_mod, x, temb, context), _block_output(t_mod, x, temb, context)
        if "attentions" in s_path:
            # diffusers runs SD-1.5's proj_in/proj_out as 1x1 convolutions, the family as linear layers:
            # another summation order over <= 64 channels (and SDPA over 77 keys), ulps of O(1) values
            torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-5)
        else:
            # ResNets and resamplers: the same ops on the same weights in the same order, bit for bit
            assert torch.equal(a, b), f"{s_path} <- {t_path}"
        kinds.add(s_path.split(".")[-2] if "samplers" not in s_path else "samplers")
    assert kinds == {"resnets", "attentions", "samplers"}

    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10, 700]), torch.randn(2, 77, ctx_dim)
    with torch.no_grad():  # the cut student runs whole at the teacher's latent size
        assert student(x, t, ctx).sample.shape == teacher(x, t, ctx).sample.shape


def test_identity_cut_of_the_shapes_sd15_teacher_is_the_teacher():
    teacher = _shapes_sd15_teacher()
    cfg, block_map = cut(family_config(teacher), "full")
    student = EfficientUNet2DConditionModel.from_student_config(cfg).eval()
    init_from_teacher(student, teacher, block_map)
    assert sum(p.numel() for p in student.parameters()) == sum(p.numel() for p in teacher.parameters())
    torch.manual_seed(2)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10, 700]), torch.randn(2, 77, teacher.config.cross_attention_dim)
    with torch.no_grad():
        torch.testing.assert_close(student(x, t, ctx).sample, teacher(x, t, ctx).sample, atol=ATOL, rtol=1e-5)
