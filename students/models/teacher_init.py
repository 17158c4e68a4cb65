"""Students cut from their teacher: block removal and weight copying (BK-SDM, SnapFusion).

BK-SDM (Kim et al., arXiv 2305.15798, Sec. 3.1) and SnapFusion (arXiv 2306.00980, Sec. 3.2) start
the student from the teacher's own weights: the student is the teacher's UNet with blocks removed,
and every kept block is copied from the teacher block it came from. A student of another family
(separable convs, ReLU or shared-key-value attention, SwiGLU, other widths) has no teacher block to
copy and cannot start this way: ``init_from_teacher`` says so and names the first such block.

    teacher_cfg = family_config(teacher.unet)            # the teacher in this package's UNet family
    cfg, block_map = cut(teacher_cfg, "bk_small")        # fewer blocks + which teacher block feeds which
    student = EfficientUNet2DConditionModel.from_student_config(cfg)
    report = init_from_teacher(student, teacher.unet, block_map)

Cuts (``CUTS``), applied to the teacher's layouts; a stage's blocks are counted in execution order,
ResNets (R) and transformers (T) separately:

- ``full``: the teacher's whole UNet (a check that the mapping is exact; SnapFusion's start). It was
  called ``none``, which the command line reads as "no cut" (``core.options``: from the ``--preset``);
- ``bk_base``: in each down stage with two or more ResNets keep only the first ResNet and its
  transformer; in each up stage with three or more, drop the second ResNet and its transformer
  (kept up ResNets then meet the same skip widths as in the teacher: BK-SDM's "fewer blocks in the
  outer stages"); the mid stage stays;
- ``bk_small``: ``bk_base`` and the mid stage cut to its first ResNet (BK-SDM-Small removes the mid
  stage; this family's stages start with a ResNet, so its first one stays);
- ``bk_tiny``: ``bk_small`` without the lowest level (its down stage and the first up stage; the
  level above loses its downsampler, whose output only that up stage read), BK-SDM-Tiny;
- ``mid_only``: the mid stage cut to its first ResNet, nothing else (for teachers whose stages
  hold one ResNet pair, such as ``shapes`` and ``tiny``);
- ``snapfusion``: SnapFusion's per-stage finding (Sec. 3.2, its robust-training analysis): the
  cross-attention transformers of the highest-resolution stage (down-1 and up-3 in SD-1.5's naming:
  ``down_blocks.0`` and the last up block) cost the most latency for the least quality, so they go;
  every ResNet and every other stage stays.

Every block not in the map (none, for these cuts) keeps its fresh initialisation.
"""

from __future__ import annotations

import dataclasses

import torch

from students.models.blocks import parse_layout
from students.models.unet import StudentUNetConfig

CUTS = ("full", "bk_base", "bk_small", "bk_tiny", "mid_only", "snapfusion")
RENAMED = {"none": "full"}  # old cut names -> new, named in the unknown-cut error
_TOP = ("conv_in", "time_embedding", "add_embedding", "conv_norm_out", "conv_out")  # copied one to one


def family_config(unet) -> StudentUNetConfig:
    """A diffusers ``UNet2DConditionModel`` described in this family (same module names and shapes).

    Raises ``ValueError`` naming the first feature the family does not have.
    """
    c = unet.config
    unsupported = {"class_embed_type": None, "time_embedding_type": "positional", "only_cross_attention": False,
                   "dual_cross_attention": False, "upcast_attention": False, "resnet_time_scale_shift": "default",
                   "encoder_hid_dim": None, "mid_block_type": "UNetMidBlock2DCrossAttn"}
    for key, ok in unsupported.items():
        value = c.get(key, ok)
        if isinstance(value, (list, tuple)):
            value = any(value) if ok is False else value
        if value != ok:
            raise ValueError(f"teacher UNet {key}={value!r} has no counterpart in the student family")
    levels = len(c.block_out_channels)
    per = lambda v: tuple(v) if isinstance(v, (list, tuple)) else (v,) * levels  # noqa: E731
    layers, depth = per(c.layers_per_block), per(c.transformer_layers_per_block)
    heads = per(c.num_attention_heads or c.attention_head_dim)  # SD-1.5's "attention_head_dim" counts heads

    def tok(d):
        return "T" if d == 1 else f"T{d}"

    down = tuple(" ".join(["R", tok(depth[i])] * layers[i] if "CrossAttn" in c.down_block_types[i] else ["R"] * layers[i])
                 for i in range(levels))
    up = []
    for j, kind in enumerate(c.up_block_types):
        level = levels - 1 - j
        up.append(" ".join(["R", tok(depth[level])] * (layers[level] + 1) if "CrossAttn" in kind else ["R"] * (layers[level] + 1)))
    mid = f"R {tok(depth[-1])} R"
    return StudentUNetConfig(
        sample_size=c.sample_size, in_channels=c.in_channels, out_channels=c.out_channels,
        block_out_channels=tuple(c.block_out_channels), down_layouts=down, mid_layout=mid, up_layouts=tuple(up),
        conv_types=("dense",) * levels, num_attention_heads=heads, cross_attention_dim=c.cross_attention_dim,
        norm_num_groups=c.norm_num_groups, norm_eps=c.norm_eps, flip_sin_to_cos=c.flip_sin_to_cos, freq_shift=c.freq_shift,
        time_cond_proj_dim=c.time_cond_proj_dim, addition_embed_type=c.addition_embed_type,
        addition_time_embed_dim=c.addition_time_embed_dim,
        projection_class_embeddings_input_dim=c.projection_class_embeddings_input_dim)


def unknown_cut(name: str) -> str:
    """The unknown-cut message: the known cuts, and the new name of a renamed one."""
    renamed = f" (the cut {name!r} is now {RENAMED[name]!r})" if name in RENAMED else ""
    return f"unknown cut {name!r}{renamed}; known: {', '.join(CUTS)}"


def _tokens(layout: str) -> list[str]:
    return [kind if depth == 1 else f"{kind}{depth}" for kind, depth in parse_layout(layout)]


def _pairs(tokens: list[str]) -> list[list[int]]:
    """Positions grouped as [R, following non-R blocks...] units."""
    units: list[list[int]] = []
    for i, t in enumerate(tokens):
        if t == "R":
            units.append([i])
        else:
            units[-1].append(i)
    return units


def _stage_keep(stage: str, tokens: list[str], name: str, n_resnets: int, highest_res: bool = False) -> list[int]:
    """Positions (into ``tokens``) a cut keeps in one stage (``highest_res``: the stage at full resolution)."""
    units = _pairs(tokens)
    keep = list(units)
    if name == "snapfusion" and highest_res and stage in ("down", "up"):
        keep = [[u[0]] for u in units]  # the ResNets, without their transformers
    if name in ("bk_base", "bk_small", "bk_tiny"):
        if stage == "down" and n_resnets >= 2:
            keep = units[:1]
        elif stage == "up" and n_resnets >= 3:
            keep = [units[0]] + units[2:]
    if stage == "mid" and name in ("bk_small", "bk_tiny", "mid_only"):
        keep = [[units[0][0]]]
    return [i for u in keep for i in u]


def cut(teacher_cfg: StudentUNetConfig, name: str) -> tuple[StudentUNetConfig, dict[str, str]]:
    """The student config of cut ``name`` and its block map (student module path -> teacher module path)."""
    if name not in CUTS:
        raise ValueError(unknown_cut(name))
    levels = len(teacher_cfg.block_out_channels)
    drop_lowest = name == "bk_tiny"
    if drop_lowest and levels < 3:
        raise ValueError(f"cut 'bk_tiny' removes the lowest level; a {levels}-level teacher would keep too little")
    block_map = {m: m for m in _TOP}
    new_down, new_up = [], []

    def stage(kind, teacher_path, student_path, layout, highest_res=False):
        tokens = _tokens(layout)
        n_r = tokens.count("R")
        kept = _stage_keep(kind, tokens, name, n_r, highest_res)
        r_idx = [sum(t == "R" for t in tokens[:i]) for i in kept if tokens[i] == "R"]
        a_idx = [sum(t != "R" for t in tokens[:i]) for i in kept if tokens[i] != "R"]
        for s, t in enumerate(r_idx):
            block_map[f"{student_path}.resnets.{s}"] = f"{teacher_path}.resnets.{t}"
        for s, t in enumerate(a_idx):
            block_map[f"{student_path}.attentions.{s}"] = f"{teacher_path}.attentions.{t}"
        return " ".join(tokens[i] for i in kept)

    kept_levels = levels - 1 if drop_lowest else levels
    for i in range(kept_levels):
        new_down.append(stage("down", f"down_blocks.{i}", f"down_blocks.{i}", teacher_cfg.down_layouts[i], i == 0))
        if i < kept_levels - 1:
            block_map[f"down_blocks.{i}.downsamplers"] = f"down_blocks.{i}.downsamplers"
    mid = stage("mid", "mid_block", "mid_block", teacher_cfg.mid_layout)
    first_up = 1 if drop_lowest else 0
    for j in range(first_up, levels):
        s = j - first_up
        new_up.append(stage("up", f"up_blocks.{j}", f"up_blocks.{s}", teacher_cfg.up_layouts[j], j == levels - 1))
        if levels - 1 - j > 0:
            block_map[f"up_blocks.{s}.upsamplers"] = f"up_blocks.{j}.upsamplers"
    per_level = lambda v: tuple(v)[:kept_levels]  # noqa: E731
    cfg = dataclasses.replace(teacher_cfg, block_out_channels=per_level(teacher_cfg.block_out_channels),
                              down_layouts=tuple(new_down), mid_layout=mid, up_layouts=tuple(new_up),
                              conv_types=per_level(teacher_cfg.conv_types),
                              num_attention_heads=per_level(teacher_cfg.num_attention_heads))
    return cfg, block_map


def _teacher_name(student_name: str, block_map: dict[str, str]) -> str | None:
    parts = student_name.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in block_map:
            return ".".join([block_map[prefix]] + parts[n:])
    return None


def init_from_teacher(student: torch.nn.Module, teacher_unet: torch.nn.Module, block_map: dict[str, str]) -> dict:
    """Copy every mapped parameter from ``teacher_unet`` into ``student`` (in place).

    Returns ``{"copied": [student names], "fresh": [student names]}``. A mapped parameter whose
    teacher counterpart is missing or of another shape means the student is not of the teacher's
    family: ``ValueError`` naming it. 1x1 convolutions (SD-1.5's ``proj_in``/``proj_out``) load
    into the family's linear projections.
    """
    teacher = dict(teacher_unet.named_parameters())
    copied, fresh = [], []
    with torch.no_grad():
        for name, param in student.named_parameters():
            tname = _teacher_name(name, block_map)
            if tname is None:
                fresh.append(name)
                continue
            if tname not in teacher:
                raise ValueError(f"student parameter {name} maps to {tname}, which the teacher does not have: "
                                 "this student is not of the teacher's family and cannot start from its weights")
            src = teacher[tname]
            if src.shape != param.shape and src.dim() == 4 and src.shape[2:] == (1, 1) and src.shape[:2] == param.shape:
                src = src[:, :, 0, 0]
            if src.shape != param.shape:
                raise ValueError(f"student parameter {name} {tuple(param.shape)} cannot take teacher {tname} "
                                 f"{tuple(src.shape)}: this student is not of the teacher's family")
            param.copy_(src.to(param.dtype))
            copied.append(name)
    return {"copied": copied, "fresh": fresh}
