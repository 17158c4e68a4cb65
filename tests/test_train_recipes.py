"""Every recipe's losses log reads back (an integer step on every line), and a student cut from its
teacher starts from the teacher's weights (``distill train --init_from_teacher``)."""

import json
import os

import pytest
import torch

from core.errors import UserError
from students.distill.recipes import FLOW_RECIPES, RECIPES
from students.training.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(data, out, **kw):
    base = dict(data=data, output=str(out), batch_size=2, max_steps=2, warmup_steps=2, checkpoint_every=1,
                shuffle_buffer=4, lr=1e-3, ema_decay=0.0)
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("recipe_name", sorted(set(RECIPES) - set(FLOW_RECIPES)))  # flow recipes: test_flow_training.py
def test_losses_log_has_an_integer_step_on_every_line_for_every_recipe(recipe_name, tiny_dump, tmp_path):
    import dataclasses

    from students.distill.recipes import get_recipe

    recipe = get_recipe(recipe_name)
    if recipe_name == "bk_sdm":  # the tiny teacher has two stages: distil the blocks the dump recorded
        recipe = dataclasses.replace(recipe, feature_weights=(("mid_block", 1.0), ("up_blocks.0", 1.0)))
    if recipe.step_weight > 0 and 4 % recipe.student_steps:  # the tiny dump has 4 teacher steps: 8 is refused
        recipe = dataclasses.replace(recipe, student_steps=2)
    losses = train(_cfg(tiny_dump, tmp_path, recipe=recipe_name, preset="tiny"), recipe=recipe)
    rows = [json.loads(line) for line in (tmp_path / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(type(r["step"]) is int for r in rows)
    assert [r["loss"] for r in rows] == pytest.approx(losses, rel=1e-6)
    disc_only = ("loss/adv_d", "loss/r1")  # the discriminator's own losses: logged, not part of the student's total
    for r in rows:  # every term raw under loss/... and as added to the total under loss_scaled/... (discriminator
        # stats under disc/...), none shadowing the log's own keys
        scaled = {k.split("/", 1)[1]: v for k, v in r.items() if k.startswith("loss_scaled/")}
        raw = {k.split("/", 1)[1]: v for k, v in r.items() if k.startswith("loss/") and k not in disc_only}
        stats = {k for k in r if k.startswith("disc/") or k in disc_only}
        assert set(raw) == set(scaled) and scaled
        assert set(r) == {"step", "loss", "lr", "grad_norm", *stats} | {f"loss/{k}" for k in raw} | \
            {f"loss_scaled/{k}" for k in scaled}
        assert sum(scaled.values()) == pytest.approx(r["loss"], rel=1e-5)  # the student's terms add up to its total
    if recipe.step_weight > 0:
        assert all("loss/step" in r for r in rows)


def test_snapgen_kd_logs_raw_terms_that_differ_and_scaled_ones_that_add_up_to_the_total(tiny_dump, tmp_path):
    """Timestep-aware scaling makes each distillation term equal the raw task loss per sample:
    s_k,b = raw_k,b * stopgrad(task_b / (raw_k,b + 1e-8)), so mean_b s_k,b = mean_b task_b up to
    1e-8 / raw (raw here ~1e-2 or more: 1e-6 relative at most). Hence, with task weight 1 and the
    terms output and feature,
        loss = s_output + s_feature + 1 * task = 3 * loss/task,
    while the raw output and feature terms are the loss functions' own values, all different."""
    train(_cfg(tiny_dump, tmp_path / "kd", recipe="snapgen_kd", preset="tiny"))
    rows = [json.loads(line) for line in (tmp_path / "kd" / "losses.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for r in rows:
        raw = [r["loss/output"], r["loss/feature"], r["loss/task"]]
        assert min(abs(a - b) / max(a, b) for i, a in enumerate(raw) for b in raw[i + 1:]) > 1e-3  # they differ
        for term in ("output", "feature", "task"):  # what each adds to the total: the raw task loss
            assert r[f"loss_scaled/{term}"] == pytest.approx(r["loss/task"], rel=1e-5)
        assert r["loss"] == pytest.approx(3 * r["loss/task"], rel=1e-5)
        assert r["loss"] == pytest.approx(sum(r[f"loss_scaled/{t}"] for t in ("output", "feature", "task")), rel=1e-6)
    # without the scaling (output_kd: output weight 1, task weight 0.1) the total is the weighted raw sum
    train(_cfg(tiny_dump, tmp_path / "out", recipe="output_kd", preset="tiny"))
    for line in (tmp_path / "out" / "losses.jsonl").read_text().splitlines():
        r = json.loads(line)
        assert r["loss"] == pytest.approx(1.0 * r["loss/output"] + 0.1 * r["loss/task"], rel=1e-6)
        assert r["loss_scaled/task"] == pytest.approx(0.1 * r["loss/task"], rel=1e-6)


def test_a_preset_student_cannot_start_from_the_teacher(tiny_dump, tmp_path):
    with pytest.raises(UserError, match="no teacher counterpart"):
        _cfg(tiny_dump, tmp_path, preset="tiny", init_from_teacher="mid_only")
    with pytest.raises(UserError, match="unknown cut"):
        _cfg(tiny_dump, tmp_path, init_from_teacher="bk_huge")


def test_init_from_teacher_starts_from_the_teachers_weights_and_exports(tiny_dump, tmp_path, tiny_teacher):
    from students.export import folder as export
    from students.training.checkpoint import checkpoints
    from students.models.teacher_init import cut, family_config, init_from_teacher
    from students.models.unet import EfficientUNet2DConditionModel

    cfg = _cfg(tiny_dump, tmp_path / "run", recipe="output_kd", init_from_teacher="mid_only")
    train(cfg)
    first = EfficientUNet2DConditionModel.from_pretrained(os.path.join(checkpoints(cfg.output)[0], "student"))
    rand = EfficientUNet2DConditionModel.from_config(first.config)
    copy = EfficientUNet2DConditionModel.from_config(first.config)
    report = init_from_teacher(copy, tiny_teacher.unet, cut(family_config(tiny_teacher.unet), "mid_only")[1])
    assert not report["fresh"] and "mid_block.resnets.0.conv1.weight" in report["copied"]
    student, teacher, fresh = dict(first.named_parameters()), dict(copy.named_parameters()), dict(rand.named_parameters())
    # One AdamW step moves a weight by at most lr_1 (|m/sqrt(v)| <= 1 at step 1) plus decay lr_1 wd |w|,
    # with lr_1 = lr / warmup_steps the first step's learning rate.
    lr_1 = cfg.lr / cfg.warmup_steps
    for name in report["copied"]:
        bound = lr_1 * (1 + cfg.weight_decay * teacher[name].abs()) * (1 + 1e-3)
        assert ((student[name] - teacher[name]).abs() <= bound).all(), name
    # a fresh initialisation is far from the teacher's weights: the check above could fail
    assert (fresh["conv_in.weight"] - teacher["conv_in.weight"]).abs().max() > 10 * lr_1
    assert len(first.mid_block.resnets) == 1  # the mid_only cut
    folder = export.export(cfg.output, str(tmp_path / "export"), weights="raw")
    assert export.read_inference(folder)["step"] == 2


def test_a_v_prediction_student_of_an_epsilon_teacher_exports_a_v_prediction_sampler(tiny_dump, tmp_path):
    """The exported scheduler follows the student's parameterisation, not the teacher's: sampling a
    v-prediction student as epsilon would read its v as noise."""
    from students.export import folder as export
    from students.distill.recipes import get_recipe

    cfg = _cfg(tiny_dump, tmp_path / "run", recipe="snapfusion_step", preset="tiny", student_steps=2,
               prediction_type="v_prediction")
    recipe = cfg.resolved_recipe()  # --prediction_type turns the output KD term (the teacher's epsilon) off
    assert recipe.prediction_type == "v_prediction" and recipe.output_weight == 0 and recipe.step_weight == 1
    assert get_recipe("snapfusion_step").output_weight == 1
    train(cfg)
    folder = export.export(cfg.output, str(tmp_path / "export"), weights="raw")
    scheduler_config = json.loads((tmp_path / "export" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler_config["prediction_type"] == "v_prediction"
    assert json.loads(open(os.path.join(tiny_dump, "dataset.json")).read())["prediction_type"] == "epsilon"
    assert export.read_inference(folder)["prediction_type"] == "v_prediction"
