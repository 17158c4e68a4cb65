"""Architecture edits of ``distill evolve`` (``students.search.evolve``): which blocks can go or be copied, a
model with blocks removed or copied (weights carried over block by block), and a training checkpoint
rewritten in place with them (EMA, AdamW state dropped or duplicated with its parameters), so that the
trainer resumes from it exactly.

    new_cfg, source = apply_actions(cfg, [Action("remove", "mid_block.attentions.0", 0.0, 0.7)])
    new_model, source = evolve_model(model, actions)          # new block name -> old block name
    evolve_checkpoint(run + "/checkpoints/step-0000200", run, actions, record)

A block is *evolvable* when removing it is exactly skipping it (``skip_blocks``; ``students.distill.recipes.robust_skip``
skips the same blocks in training): transformers anywhere, and mid-stage ResNets (channel-preserving,
no skip connection reads them; a mid layout may start with a transformer but not be empty).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os

from students.cost.lookup import Block, unet_blocks


# ------------------------------------------------------------------------------------------
# architecture edits: which blocks can go or be copied, and the map from new blocks to old ones
# ------------------------------------------------------------------------------------------


def has_cross_attention(block: Block) -> bool:
    return block.token[0] in ("T", "C")


def evolvable(cfg) -> list[Block]:
    """Blocks whose removal equals skipping them: transformers, and mid-stage ResNets (channel-preserving,
    and no skip connection reads them); the planner never empties the mid stage."""
    return [b for b in unet_blocks(cfg) if not b.is_resnet or b.stage == "mid_block"]


def copyable(cfg) -> list[Block]:
    """Blocks a copy can follow (input channels = output channels): the evolvable ones, transformers and
    mid-stage ResNets."""
    return evolvable(cfg)


@dataclasses.dataclass(frozen=True)
class Action:
    kind: str  # "remove" | "copy"
    module: str  # the block in the architecture before this evolution, e.g. "mid_block.attentions.0"
    delta_metric: float  # M(full) - M(block skipped)
    latency_ms: float  # lookup latency the action saves (remove) or adds (copy)

    @property
    def value(self) -> float:
        """Score per latency (SnapFusion's delta-CLIP / delta-latency)."""
        return self.delta_metric / max(self.latency_ms, 1e-9)


def _stages(cfg) -> dict[str, list]:
    """stage -> [[token, source module], ...] of every stage, in layout order."""
    out = {}
    for b in unet_blocks(cfg):
        out.setdefault(b.stage, []).append([b.token, b.module])
    return out


def apply_actions(cfg, actions: list[Action]):
    """(new config, {new module: old module}) after removing/copying blocks. A copy is inserted right
    after its source, with the source's weights; modules not in the map are unchanged by name."""
    from students.models.unet import override

    stages = _stages(cfg)
    where = {module: stage for stage, items in stages.items() for _, module in items}
    for action in actions:
        if action.module not in where:
            raise ValueError(f"no block {action.module!r} in this UNet")
        items = stages[where[action.module]]
        index = next(i for i, (_, src) in enumerate(items) if src == action.module)
        if action.kind == "remove":
            items.pop(index)
        elif action.kind == "copy":
            items.insert(index + 1, [items[index][0], action.module])
        else:
            raise ValueError(f"action kind {action.kind!r} is not 'remove' or 'copy'")
    layout = {stage: " ".join(token for token, _ in items) for stage, items in stages.items()}
    levels = len(cfg.block_out_channels)
    new = override(cfg, down_layouts=tuple(layout[f"down_blocks.{i}"] for i in range(levels)), mid_layout=layout["mid_block"],
                   up_layouts=tuple(layout[f"up_blocks.{j}"] for j in range(levels)))
    source = {}
    for stage, items in stages.items():
        counts = {"resnets": 0, "attentions": 0}
        for token, src in items:
            group = "resnets" if token == "R" else "attentions"
            source[f"{stage}.{group}.{counts[group]}"] = src
            counts[group] += 1
    return new, source


def source_name(name: str, source: dict[str, str]) -> str:
    """The old parameter name a new one comes from (``mid_block.attentions.1.norm.weight`` -> ``...0...``)."""
    parts = name.split(".")
    if parts[0] == "mid_block":
        prefix = ".".join(parts[:3])  # mid_block.attentions.0
    elif parts[0] in ("down_blocks", "up_blocks"):
        prefix = ".".join(parts[:4])  # down_blocks.1.attentions.0
    else:
        return name
    return source[prefix] + name[len(prefix):] if prefix in source else name


def evolve_model(model, actions: list[Action]):
    """A new model with the actions applied and every weight carried over from ``model``."""
    from students.models.unet import EfficientUNet2DConditionModel

    new_cfg, source = apply_actions(model.student_config, actions)
    new = EfficientUNet2DConditionModel.from_student_config(new_cfg)
    old_state = model.state_dict()
    new.load_state_dict({k: old_state[source_name(k, source)].clone() for k in new.state_dict()})
    return new.to(next(model.parameters()).device).train(model.training), source


def evolve_optimizer_state(state: dict, old_names: list[str], new_names: list[str], source: dict[str, str]) -> dict:
    """AdamW (or any per-parameter) state of the old student -> the new one's.

    The trainer's parameter list is the student's parameters, in ``named_parameters`` order, then the
    other trained modules' (distillation heads, decoder): those keep their state and shift by the
    change in count. Removed parameters' state is dropped; a copy gets a copy of its source's."""
    import copy

    groups = state["param_groups"]
    if len(groups) != 1:
        raise ValueError(f"expected one optimizer parameter group, found {len(groups)}")
    n_old, total = len(old_names), len(groups[0]["params"])
    if total < n_old:
        raise ValueError(f"the optimizer has {total} parameters, fewer than the student's {n_old}")
    old_index = {name: i for i, name in enumerate(old_names)}
    per_param = state["state"]
    new_state = {}
    for i, name in enumerate(new_names):
        src = old_index[source_name(name, source)]
        if src in per_param:
            new_state[i] = copy.deepcopy(per_param[src])
    shift = len(new_names) - n_old
    for i in range(n_old, total):
        if i in per_param:
            new_state[i + shift] = per_param[i]
    new_groups = [dict(groups[0], params=list(range(total + shift)))]
    return {"state": new_state, "param_groups": new_groups}


@contextlib.contextmanager
def skip_blocks(model, modules):
    """Run ``model`` with the named blocks skipped: a forward hook returns the block's input, as
    ``students.distill.recipes.robust_skip`` does in training."""
    handles = [model.get_submodule(m).register_forward_hook(lambda mod, inputs, output: inputs[0]) for m in modules]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


# ------------------------------------------------------------------------------------------
# the checkpoint, evolved in place
# ------------------------------------------------------------------------------------------


class _Folder:
    """A saved diffusers folder carried into the new checkpoint as it is."""

    def __init__(self, path):
        self.path = path

    def save_pretrained(self, dst):
        import shutil

        shutil.copytree(self.path, dst)


class _Plain:
    def __init__(self, state):
        self.state = state

    def state_dict(self):
        return self.state


def _tensors_module(tensors: dict):
    import torch

    class Tensors(torch.nn.Module):
        def state_dict(self, *args, **kwargs):
            return tensors

    return Tensors()


def load_student(folder: str):
    from students.models.unet import EfficientUNet2DConditionModel

    return EfficientUNet2DConditionModel.from_pretrained(folder)


def evolve_checkpoint(path: str, output: str, actions: list[Action], record: dict, keep: int = 2) -> str:
    """Rewrite the checkpoint at ``path`` (of the run folder ``output``) with the actions applied; the
    same step, so the trainer resumes from it. ``record`` goes into its config.json as ``evolution``."""
    import torch
    from safetensors.torch import load_file

    from students.training import checkpoint as ckpt

    with ckpt.local_copy(path) as folder:
        plain = torch.load(os.path.join(folder, ckpt.TRAINER_STATE), weights_only=True)
        with open(os.path.join(folder, ckpt.CONFIG), encoding="utf-8") as f:
            config = json.load(f)
        state = {}
        student = load_student(os.path.join(folder, "student"))
        new_student, source = evolve_model(student, actions)
        state["student"] = new_student
        for name in sorted(os.listdir(folder)):
            full = os.path.join(folder, name)
            if name == "student" or not os.path.isdir(full):
                continue
            state[name] = evolve_model(load_student(full), actions)[0] if name == "ema" else _Folder(full)
        for name in sorted(os.listdir(folder)):
            if name.endswith(".safetensors"):
                state[name[: -len(".safetensors")]] = _tensors_module(load_file(os.path.join(folder, name)))
        old_names = [n for n, _ in student.named_parameters()]
        new_names = [n for n, _ in new_student.named_parameters()]
        for name, value in plain.items():
            if name == "step":
                continue
            if name == "optimizer":
                value = evolve_optimizer_state(value, old_names, new_names, source)
            state[name] = _Plain(value)
        step = int(plain["step"])
        config.pop("step", None)
        config["evolution"] = record
        return ckpt.save(output, state, step=step, config=config, keep=keep)


def student_at(run: str):
    """(student model, its config) at the newest checkpoint of ``run``; (None, None) if there is none."""
    from students.training import checkpoint as ckpt

    found = ckpt.checkpoints(run)
    if not found:
        return None, None
    with ckpt.local_copy(found[-1]) as folder:
        model = load_student(os.path.join(folder, "student"))
    return model, model.student_config
