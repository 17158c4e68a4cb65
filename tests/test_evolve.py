"""Architecture evolution: the latency lookup, skip == removal, the action order, exact resume of an evolved checkpoint."""

import dataclasses
import json
import os

import pytest
import torch

from core.errors import UserError
from students.search import evolve as E
from students.search import edit as A
from students.cost import lookup as L
from students.models.unet import EfficientUNet2DConditionModel, preset


pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.numerics]  # numerics: rerun on AVX2 kernels (CI)


@pytest.fixture(scope="module")
def evolve_dump(tmp_path_factory):
    """8 captions in one shard, no block outputs: evolution scores architectures, it distils no features."""
    from conftest import run_dump

    captions = [f"a {c} {s} on a {b} background" for c in ("red", "blue") for s in ("circle", "square")
                for b in ("white", "black")]
    return run_dump(tmp_path_factory.mktemp("dump"), captions, samples_per_shard=8, feature_layers="",
                    num_feature_steps=None, cpu_threads=1)


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    model = EfficientUNet2DConditionModel.from_student_config(cfg).eval()
    with torch.no_grad():  # zero-initialised projections would make some blocks identities already
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _inputs(cfg, batch=2):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(batch, 4, cfg.sample_size, cfg.sample_size, generator=g), torch.tensor([700, 30]),
            torch.randn(batch, 7, cfg.cross_attention_dim, generator=g))


# ------------------------------------------------------------------------------------------
# lookup
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny", "tiny_xl", "shapes"])
def test_block_list_matches_the_built_modules(name):
    cfg = preset(name)
    model = EfficientUNet2DConditionModel.from_student_config(cfg)
    blocks = L.unet_blocks(cfg)
    assert len(blocks) == len(model.student_config.down_layouts[0].split()) + sum(
        len(x.split()) for x in (*cfg.down_layouts[1:], cfg.mid_layout, *cfg.up_layouts))
    for b in blocks:
        module = model.get_submodule(b.module)
        if b.is_resnet:
            assert (module.norm1.num_channels, module.time_emb_proj.out_features) == (b.in_channels, b.out_channels)
        else:
            assert module.norm.num_channels == b.in_channels and len(module.transformer_blocks) == int(b.token[1:] or 1)


def test_lookup_round_trips_and_predicts_by_sum(tmp_path):
    cfg = preset("tiny")
    # allocator "default": the steady state is process-wide and would stay set in the test process
    table = L.measure_table(cfg, L.LookupSettings(batch_size=1, repeats=2, warmup=0, allocator="default"))
    path = str(tmp_path / "lookup.json")
    table.save(path)
    loaded = L.LookupTable.load(path)
    assert loaded == table and loaded.settings["side"] == cfg.sample_size and loaded.settings["runtime"] == "torch-cpu"
    blocks = L.unet_blocks(cfg)
    assert set(loaded.entries) == {b.key(cfg.sample_size) for b in blocks}
    # the prediction is the sum of the entries plus the rest; the rest closes the measured forward
    assert loaded.predict_ms(cfg) == pytest.approx(loaded.rest_ms + sum(loaded.entries[b.key(16)] for b in blocks))
    assert loaded.predict_ms(cfg) == pytest.approx(loaded.measured_ms)
    # an evolved UNet of the same family: one entry less, one more
    t_block = next(b for b in blocks if b.module == "up_blocks.0.attentions.0")
    removed, _ = E.apply_actions(cfg, [E.Action("remove", t_block.module, 0.0, 0.0)])
    copied, _ = E.apply_actions(cfg, [E.Action("copy", t_block.module, 0.0, 0.0)])
    entry = loaded.entries[t_block.key(16)]
    assert loaded.predict_ms(removed) == pytest.approx(loaded.predict_ms(cfg) - entry)
    assert loaded.predict_ms(copied) == pytest.approx(loaded.predict_ms(cfg) + entry)
    with pytest.raises(UserError, match="another UNet family"):
        loaded.predict_ms(preset("shapes"))
    (tmp_path / "bad.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(UserError, match="not a latency lookup table"):
        L.LookupTable.load(str(tmp_path / "bad.json"))


STEADY_PROBE = """
import resource, sys
import numpy as np
from core.allocator import set_allocator

def faults():  # minor page faults of 5 rounds of a fresh 64 MB array, after one untimed round
    np.ones(8 << 20).sum()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        np.ones(8 << 20).sum()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

print(set_allocator("default"), faults(), set_allocator("steady"), faults(), sep="|")
"""


def test_steady_allocator_reuses_freed_memory_and_is_recorded(tmp_path):
    import platform
    import subprocess
    import sys

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("the steady allocator state is glibc's mallopt")
    # in a child: the state is process-wide. 64 MB is above glibc's largest mmap threshold, so by default every
    # round maps fresh pages (16,384 faults of 4 KiB, fewer with transparent huge pages); steady reuses the heap.
    out = subprocess.run([sys.executable, "-c", STEADY_PROBE], capture_output=True, text=True, check=True).stdout
    default, default_faults, steady, steady_faults = out.strip().splitlines()[-1].split("|")
    assert default == "default" and steady.startswith("steady: glibc") and "M_MMAP_MAX=0" in steady
    assert int(default_faults) >= 5 * 32  # each default round faults in 64 MB afresh: at least 32 huge pages of 2 MiB
    assert int(steady_faults) <= 64, (default_faults, steady_faults)  # steady: the heap's pages again, nothing new
    table = L.measure_table(preset("tiny"), L.LookupSettings(batch_size=1, repeats=1, warmup=0, allocator="default"))
    assert table.settings["allocator"] == "default" and table.settings["allocator_detail"] in ("default", steady)
    assert L.settings_of(table).allocator == "default"
    with pytest.raises(UserError, match="allocator 'jemalloc' is not one of steady, default"):
        L.LookupSettings(allocator="jemalloc")


def test_profile_cli_writes_a_lookup(tmp_path, capsys):
    from students.cost import profile as P

    out = tmp_path / "lk.json"
    assert P.main(["--lookup", str(out), "--presets", "tiny", "--repeats", "2", "--warmup", "0", "--batch_size", "2",
                   "--lookup_allocator", "default"]) == 0
    table = L.LookupTable.load(str(out))
    assert table.settings["batch_size"] == 2 and "predicted" in capsys.readouterr().out
    assert P.main(["--lookup", str(out)]) == 2  # the default preset list is not one UNet: one-line error
    assert "--lookup measures one UNet" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# skip == removal; copies
# ------------------------------------------------------------------------------------------


def _shapes_teacher_family():
    """The shapes teacher's UNet in the student family (the ``full`` cut): mid ``R T R``, dense convs."""
    from diffusers import UNet2DConditionModel

    from students.models.teacher_init import family_config
    from teachers.shapes.model import unet_config

    return family_config(UNet2DConditionModel(**unet_config()))


def _start(name):
    if name == "shapes_teacher":
        return _shapes_teacher_family()
    return dataclasses.replace(preset(name), mid_layout=preset(name).mid_layout + " R")  # a second mid ResNet too


@pytest.mark.parametrize("name", ["tiny", "tiny_xl", "shapes_teacher"])
def test_skipping_a_block_equals_removing_it(name):
    cfg = _start(name)
    model = _model(cfg)
    args = _inputs(cfg)
    kwargs = {}
    if cfg.addition_embed_type:
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 32), "time_ids": torch.ones(2, 6)}
    candidates = E.evolvable(cfg)
    mid_resnets = [b.module for b in candidates if b.is_resnet]
    # every mid ResNet (the first too: the mid stage may start with a transformer), no other ResNet
    assert mid_resnets == [f"mid_block.resnets.{i}" for i in range(cfg.mid_layout.split().count("R"))]
    assert len(mid_resnets) >= 2
    full = model(*args, **kwargs).sample
    groups = [[b.module] for b in candidates] + [mid_resnets, [m for m in (b.module for b in candidates) if "attentions" in m][:1]
                                                 + mid_resnets[:1]]
    for group in groups:
        with torch.no_grad(), E.skip_blocks(model, group):
            skipped = model(*args, **kwargs).sample
        evolved, _ = A.evolve_model(model, [E.Action("remove", m, 0.0, 0.0) for m in group])
        with torch.no_grad():
            removed = evolved(*args, **kwargs).sample
        assert (skipped - full).abs().max() > 1e-4, group  # the blocks do something
        torch.testing.assert_close(removed, skipped, rtol=0, atol=1e-6)
    # the whole mid stage but one transformer: a mid layout that starts with a transformer builds and runs
    lean, _ = A.evolve_model(model, [E.Action("remove", m, 0.0, 0.0) for m in mid_resnets])
    assert lean.student_config.mid_layout.split()[0] != "R" and not len(lean.mid_block.resnets)


def test_a_copy_duplicates_its_source_and_follows_it():
    cfg = preset("tiny")
    model = _model(cfg)
    evolved, source = A.evolve_model(model, [E.Action("copy", "up_blocks.0.attentions.0", 1.0, 1.0)])
    assert evolved.student_config.up_layouts[0] == "R T T R C"
    assert source["up_blocks.0.attentions.1"] == "up_blocks.0.attentions.0"
    assert source["up_blocks.0.attentions.2"] == "up_blocks.0.attentions.1"
    old, new = model.state_dict(), evolved.state_dict()
    for key, value in new.items():
        torch.testing.assert_close(value, old[A.source_name(key, source)], rtol=0, atol=0)
    assert torch.equal(new["up_blocks.0.attentions.1.proj_in.weight"], old["up_blocks.0.attentions.0.proj_in.weight"])


# ------------------------------------------------------------------------------------------
# the plan
# ------------------------------------------------------------------------------------------


def _planted_table(cfg, ms: dict[str, float], rest: float = 1.0):
    side = cfg.sample_size
    entries = {b.key(side): ms.get(b.token, 1.0) for b in L.unet_blocks(cfg)}
    return L.LookupTable(entries=entries, rest_ms=rest, family=L.family_of(cfg), unet=cfg.to_dict(),
                         settings={"side": side}, measured_ms=0.0)


def test_an_architecture_is_final_when_under_the_target_and_no_copy_fits():
    cfg = preset("shapes")
    table = _planted_table(cfg, {"R": 1.0, "T": 2.0})  # 16 ms; the cheapest copy is a mid ResNet (1 ms)
    assert not E.is_final(cfg, table, 15.9)  # over: removals to come
    assert E.is_final(cfg, table, 16.5) and E.is_final(cfg, table, 16.0)  # under, a 1 ms copy would not fit
    assert not E.is_final(cfg, table, 17.0)  # a mid ResNet's copy fits exactly: it may still be copied
    dear_resnets = _planted_table(cfg, {"R": 3.0, "T": 2.0})  # 7 x 3 + 4 x 2 + 1 = 30 ms; the cheapest copy is a T
    assert dear_resnets.predict_ms(cfg) == 30.0
    assert E.is_final(cfg, dear_resnets, 31.5) and not E.is_final(cfg, dear_resnets, 32.0)
    # over a target nothing may reach: one cross-attention block and one mid block left, nothing removable
    bare = E.apply_actions(cfg, [E.Action("remove", m, 0, 0) for m in ("mid_block.attentions.0", "up_blocks.0.attentions.0",
                                                                         "up_blocks.0.attentions.1")])[0]
    assert table.predict_ms(bare) == 10.0 and E.is_final(bare, table, 5.0)
    assert not E.is_final(bare, table, 5.0, keep_cross_attention=0)  # unless the last cross-attention block may go


def test_action_order_on_planted_scores():
    # shapes: transformers down_blocks.1.attentions.0, mid_block.attentions.0, up_blocks.0.attentions.0/1 (all T, 2 ms)
    cfg = preset("shapes")
    table = _planted_table(cfg, {"R": 1.0, "T": 2.0})
    full = table.predict_ms(cfg)  # 7 R + 4 T + rest = 7 + 8 + 1
    assert full == 16.0
    scores = {"down_blocks.1.attentions.0": 0.10, "mid_block.attentions.0": -0.02, "up_blocks.0.attentions.0": 0.02,
              "up_blocks.0.attentions.1": 0.02, "mid_block.resnets.0": 0.5}
    scores = {m: {"delta_metric": d, "latency_ms": 1.0 if "resnets" in m else 2.0} for m, d in scores.items()}
    plan = lambda target, **kw: [(a.kind, a.module) for a in E.plan_actions(cfg, scores, table, target, **kw)]  # noqa: E731
    # over the target: ascending delta / latency; the tie (0.01 each) in execution order; stop once met
    assert plan(13.0, max_actions=4) == [("remove", "mid_block.attentions.0"), ("remove", "up_blocks.0.attentions.0")]
    assert plan(10.0, max_actions=4, keep_cross_attention=1) == [
        ("remove", "mid_block.attentions.0"), ("remove", "up_blocks.0.attentions.0"), ("remove", "up_blocks.0.attentions.1")]
    assert plan(1.0, max_actions=4, keep_cross_attention=0)[-1] == ("remove", "down_blocks.1.attentions.0")
    assert plan(13.0, max_actions=1) == [("remove", "mid_block.attentions.0")]
    # the mid ResNet is removable, but the mid stage keeps one block: its transformer went first here
    everything = plan(1.0, max_actions=9, keep_cross_attention=0)
    assert ("remove", "mid_block.attentions.0") in everything and ("remove", "mid_block.resnets.0") not in everything
    cheap_r = dict(scores, **{"mid_block.resnets.0": {"delta_metric": -1.0, "latency_ms": 1.0}})
    first = [(a.kind, a.module) for a in E.plan_actions(cfg, cheap_r, table, 1.0, max_actions=9, keep_cross_attention=0)]
    assert first[0] == ("remove", "mid_block.resnets.0") and ("remove", "mid_block.attentions.0") not in first
    assert len(first) == 4  # the mid ResNet and the three other transformers
    # at or under the target: copy the best value that fits (mid ResNet 0.5/ms, then down T 0.05/ms); negative never
    assert plan(17.0, max_actions=2) == [("copy", "mid_block.resnets.0")]
    assert plan(19.5, max_actions=3) == [("copy", "mid_block.resnets.0"), ("copy", "down_blocks.1.attentions.0")]
    assert plan(16.0) == []


# ------------------------------------------------------------------------------------------
# the checkpoint, evolved in place, and exact resume
# ------------------------------------------------------------------------------------------


def _train_cfg(data, out, **kw):
    from students.training.train import TrainConfig

    base = dict(data=data, output=str(out), preset="tiny", recipe="output_kd", batch_size=4, max_steps=8,
                warmup_steps=2, checkpoint_every=2, shuffle_buffer=8, lr=1e-3, ema_decay=0.9)
    return TrainConfig(**{**base, **kw})


def _losses(out):
    return [json.loads(x)["loss"] for x in open(os.path.join(out, "losses.jsonl"), encoding="utf-8")]


def test_removal_resumes_as_the_skipped_run_and_copies_resume_exactly(evolve_dump, tmp_path):
    import shutil

    from students.training import checkpoint as ckpt
    from students.training.runs import load_student_unet
    from students.training.train import train

    robust = dataclasses.replace(_train_cfg(evolve_dump, tmp_path).resolved_recipe(), robust_skip_prob=0.3)
    plain = dataclasses.replace(robust, robust_skip_prob=0.0)
    base = tmp_path / "base"
    train(_train_cfg(evolve_dump, base), recipe=robust, stop_after=4)  # robust training to step 4
    at4 = ckpt.checkpoints(str(base))[-1]
    gone = "mid_block.attentions.0"
    # reference: the old architecture trains on with the block skipped (an uninterrupted run of the evolved one)
    ref = tmp_path / "ref"
    shutil.copytree(base, ref)
    old = A.load_student(os.path.join(at4, "student"))
    # in the robust-trained model, skipping any evolvable block (the mid ResNets too) = the model without it
    args, mode = _inputs(old.student_config), old.training
    for block in E.evolvable(old.student_config):
        with torch.no_grad(), E.skip_blocks(old.eval(), [block.module]):
            skipped = old(*args).sample
        with torch.no_grad():
            removed = A.evolve_model(old, [E.Action("remove", block.module, 0.0, 0.0)])[0](*args).sample
        torch.testing.assert_close(removed, skipped, rtol=0, atol=1e-6)
    assert "mid_block.resnets.0" in {b.module for b in E.evolvable(old.student_config)}  # tiny's mid stage: R S
    old.train(mode)
    with E.skip_blocks(old, [gone]):
        train(_train_cfg(evolve_dump, ref), recipe=plain, student=old)
    # evolved: the block removed on the checkpoint, training resumed from it
    evo = tmp_path / "evo"
    shutil.copytree(base, evo)
    E.evolve_checkpoint(ckpt.checkpoints(str(evo))[-1], str(evo), [E.Action("remove", gone, 0.0, 1.0)], {"iteration": 1})
    student, cfg = E.student_at(str(evo))
    assert cfg.mid_layout == "R" and load_student_unet(ckpt.checkpoints(str(evo))[-1], "ema").student_config.mid_layout == "R"
    train(_train_cfg(evolve_dump, evo), recipe=plain, student=student)
    np_ref, np_evo = _losses(ref)[4:], _losses(evo)[4:]
    assert len(np_evo) == 4
    torch.testing.assert_close(torch.tensor(np_evo), torch.tensor(np_ref), rtol=1e-5, atol=1e-7)
    final_ref, final_evo = (A.load_student(os.path.join(ckpt.checkpoints(str(d))[-1], "student")).state_dict() for d in (ref, evo))
    for key, value in final_evo.items():
        torch.testing.assert_close(value, final_ref[key], rtol=1e-5, atol=1e-6)
    # a copy: the optimizer state is duplicated, and resuming in two pieces = in one
    cop = tmp_path / "copy"
    shutil.copytree(base, cop)
    E.evolve_checkpoint(ckpt.checkpoints(str(cop))[-1], str(cop), [E.Action("copy", "up_blocks.0.attentions.1", 1.0, 1.0)], {})
    opt = torch.load(os.path.join(ckpt.checkpoints(str(cop))[-1], ckpt.TRAINER_STATE), weights_only=True)["optimizer"]
    student, cfg = E.student_at(str(cop))
    names = [n for n, _ in student.named_parameters()]
    src, dup = names.index("up_blocks.0.attentions.1.proj_in.weight"), names.index("up_blocks.0.attentions.2.proj_in.weight")
    assert cfg.up_layouts[0] == "R T R C C"
    torch.testing.assert_close(opt["state"][dup]["exp_avg"], opt["state"][src]["exp_avg"], rtol=0, atol=0)
    assert len(opt["param_groups"][0]["params"]) == len(names)  # output_kd: no heads or decoder
    twice = tmp_path / "copy2"
    shutil.copytree(cop, twice)
    train(_train_cfg(evolve_dump, cop), recipe=robust, student=student)
    train(_train_cfg(evolve_dump, twice), recipe=robust, student=E.student_at(str(twice))[0], stop_after=6)
    train(_train_cfg(evolve_dump, twice), recipe=robust, student=E.student_at(str(twice))[0])
    assert _losses(twice)[4:] == _losses(cop)[4:]


class MeanPixel:
    """A planted metric: the mean pixel value of the generated images."""

    name = "mean_pixel"

    def reset(self):
        self.values = []

    def update(self, images, captions):
        self.values.append(images.double().mean(dim=(1, 2, 3)))

    def compute(self):
        return {"mean_pixel": float(torch.cat(self.values).mean())}


def test_scores_are_the_metric_drop_of_the_removed_architecture(evolve_dump, tmp_path):
    from students.training import checkpoint as ckpt
    from students.training.train import train

    run = tmp_path / "run"
    train(_train_cfg(evolve_dump, run, max_steps=2))
    (tmp_path / "val.txt").write_text("a red circle on a white background\na blue square on a black background\n")
    cfg = E.EvolveConfig(data=evolve_dump, output=str(tmp_path / "evo"), val_captions=str(tmp_path / "val.txt"), val_images=2,
                         latency_target_ratio=0.5)
    scorer = E.Scorer(cfg, MeanPixel())
    pipe, info = scorer.pipeline(ckpt.checkpoints(str(run))[-1])
    measure = scorer.measure_fn(pipe, info)
    table = _planted_table(preset("tiny"), {"R": 1.0, "T": 2.0, "S": 3.0, "C": 4.0})
    full, scores = E.score_blocks(pipe, preset("tiny"), table, measure)
    assert set(scores) == {"down_blocks.1.attentions.0", "mid_block.attentions.0", "up_blocks.0.attentions.0",
                           "up_blocks.0.attentions.1", "mid_block.resnets.0"}
    assert scores["mid_block.attentions.0"]["latency_ms"] == 3.0 and scores["up_blocks.0.attentions.1"]["latency_ms"] == 4.0
    unet = pipe.unet
    for module in ("mid_block.attentions.0", "up_blocks.0.attentions.1"):
        pipe.unet = A.evolve_model(unet, [E.Action("remove", module, 0.0, 0.0)])[0]
        removed = measure(())
        assert full - removed == pytest.approx(scores[module]["delta_metric"], abs=1e-6)
    pipe.unet = unet
    assert measure(()) == full


def test_evolve_runs_resumes_and_writes_its_outputs(evolve_dump, tmp_path):
    (tmp_path / "val.txt").write_text("a red circle on a white background\na blue square on a black background\n")
    lookup = str(tmp_path / "lk.json")
    table = _planted_table(preset("tiny"), {"R": 1.0, "T": 2.0, "S": 2.0, "C": 2.0})
    table.settings = {"side": 16, "batch_size": 1, "repeats": 1, "warmup": 0, "device": "cpu", "dtype": "float32", "text_tokens": 7,
                      "allocator": "default"}
    table.save(lookup)
    kw = dict(data=evolve_dump, val_captions=str(tmp_path / "val.txt"), val_images=2, lookup=lookup, latency_target_ms=14.5,
              iterations=2, steps_per_iteration=2, batch_size=4, lr=1e-3, warmup_steps=1, ema_decay=0.9, shuffle_buffer=8,
              robust_skip_prob=0.2, lookup_repeats=1)
    whole = E.evolve(E.EvolveConfig(output=str(tmp_path / "whole"), **kw), metric=MeanPixel())
    part = E.EvolveConfig(output=str(tmp_path / "part"), **kw)
    assert len(E.evolve(part, metric=MeanPixel(), stop_after_iteration=1)) == 1
    resumed = E.evolve(part, metric=MeanPixel())

    def strip(records):
        return [{k: v for k, v in r.items() if "measured" not in k and k != "after"} for r in records]

    assert strip(resumed) == strip(whole) and len(whole) == 2
    # 11 blocks: 7 R (7 ms) + 4 transformers (8 ms) + rest 1 = 16 ms; target 14.5: one removal, then the last segment
    assert [len(r["actions"]) for r in whole] == [1, 0] and whole[0]["predicted_ms"] == 16.0
    assert whole[1]["predicted_ms"] == 14.0 and whole[0]["actions"][0]["kind"] == "remove"
    # 14 ms: under the target and no copy fits (1 ms ResNet -> 15): final, so the second segment is plain fine-tuning
    # (no robust skips) and its record scores nothing; the resumed run above took the same switch
    assert [r["robust_skip_prob"] for r in whole] == [0.2, 0.0] and whole[0]["scores"] and whole[1]["scores"] == {}
    final = json.load(open(tmp_path / "whole" / "student_config.json"))
    assert final["down_layouts"] == whole[-1]["layouts"]["down_layouts"] and final["mid_layout"] == whole[-1]["layouts"]["mid_layout"]
    for name in ("report.html", "report.png", "evolution.jsonl"):
        assert (tmp_path / "whole" / name).is_file()
    assert "latency target met: 14.000 ms predicted &lt;= target 14.500 ms" in (tmp_path / "whole" / "report.html").read_text()
    losses = _losses(tmp_path / "whole" / "run")
    assert len(losses) == 4 and _losses(tmp_path / "part" / "run")[-2:] == losses[-2:]


def test_an_evolve_that_misses_its_target_says_so_in_its_last_line_and_its_report(tmp_path, monkeypatch, capsys):
    """Planted records: the last one's predicted 12.5 ms against a 10 ms target is a miss (2.5 ms over);
    at 9.75 ms the same run meets it."""
    from html import escape

    def record(it, predicted):
        return {"iteration": it, "step": 2 * it, "metric_name": "adherence", "metric": 0.5, "layouts": layouts,
                "predicted_ms": predicted, "measured_ms": predicted + 0.1, "target_ms": 10.0, "scores": {}, "actions": []}

    layouts = {"down_layouts": ["R"], "mid_layout": "R", "up_layouts": ["R R"]}
    (tmp_path / "val.txt").write_text("a red circle\n")
    argv = ["--data", "d", "--output", str(tmp_path / "evo"), "--latency_target_ms", "10", "--val_captions",
            str(tmp_path / "val.txt")]
    for last, words in ((12.5, "latency target MISSED: 12.500 ms predicted > target 10.000 ms (2.500 ms over"),
                        (9.75, "latency target met: 9.750 ms predicted <= target 10.000 ms")):
        records = [record(1, 15.0), record(2, last)]
        monkeypatch.setattr(E, "evolve", lambda cfg, records=records: records)
        assert E.main(argv) == 0
        assert capsys.readouterr().out.strip().splitlines()[-1] == f"evolve: {E.target_verdict(records[-1])[1]}"
        assert words in E.target_verdict(records[-1])[1]
        E.write_report(str(tmp_path), records, 10.0, "ckpt")
        html = (tmp_path / "report.html").read_text()
        assert escape(words) in html
        assert ("MISSED" in html) == (last > 10.0)


def test_bad_evolve_flags_are_one_line_before_work(evolve_dump, tmp_path, capsys):
    base = ["--data", evolve_dump, "--output", str(tmp_path / "e"), "--val_captions", str(tmp_path / "missing.txt")]
    assert E.main(base) == 2
    assert "exactly one of --latency_target_ms and --latency_target_ratio" in capsys.readouterr().err
    assert E.main(base + ["--latency_target_ratio", "0.7"]) == 2
    assert "--val_captions" in capsys.readouterr().err and not (tmp_path / "e").exists()
    assert E.main(base + ["--latency_target_ms", "5", "--preset", "nope"]) == 2
    assert "unknown student preset" in capsys.readouterr().err


def test_evolve_starts_from_a_teacher_cut_as_distill_train_does(evolve_dump, tmp_path, tiny_teacher):
    from students.training.train import INIT_LR
    from students.training import checkpoint as ckpt
    from students.models.teacher_init import cut, family_config

    (tmp_path / "val.txt").write_text("a red circle on a white background\na blue square on a black background\n")
    base = dict(data=evolve_dump, val_captions=str(tmp_path / "val.txt"), val_images=2, output=str(tmp_path / "e"))
    # --lr: distill train's default from a preset, INIT_LR (a fine-tune) from a teacher cut, or as given
    assert (E.EvolveConfig(latency_target_ratio=0.7, **base).lr, E.EvolveConfig(latency_target_ratio=0.7, **base).preset) == (1e-4, "tiny")
    assert E.EvolveConfig(latency_target_ratio=0.7, init_from_teacher="full", **base).lr == INIT_LR
    assert E.EvolveConfig(latency_target_ratio=0.7, init_from_teacher="full", lr=5e-4, **base).lr == 5e-4
    with pytest.raises(UserError, match="--init_from_teacher builds the student"):
        E.EvolveConfig(latency_target_ratio=0.7, init_from_teacher="full", preset="tiny", **base)
    start = cut(family_config(tiny_teacher.unet), "full")[0]
    lookup = str(tmp_path / "lk.json")
    table = _planted_table(start, {"R": 1.0, "T": 2.0})
    table.settings = {"side": start.sample_size, "batch_size": 1, "repeats": 1, "warmup": 0, "device": "cpu", "dtype": "float32",
                      "text_tokens": 7, "allocator": "default"}
    table.save(lookup)
    full = table.predict_ms(start)
    cfg = E.EvolveConfig(init_from_teacher="full", lookup=lookup, latency_target_ms=full - 0.5, iterations=2,
                         steps_per_iteration=1, batch_size=4, warmup_steps=1, ema_decay=0.9, shuffle_buffer=8,
                         lookup_repeats=1, **base)
    assert E.start_config(cfg) == start
    records = E.evolve(cfg, metric=MeanPixel())
    # the first segment trained the teacher's own UNet from its weights at INIT_LR
    assert records[0]["layouts"] == E.layouts(start) and records[0]["predicted_ms"] == full
    assert [len(r["actions"]) for r in records] == [1, 0]
    removed = records[0]["actions"][0]["module"]
    assert any(removed == b.module for b in E.evolvable(start))
    final = json.load(open(tmp_path / "e" / "student_config.json"))
    assert len(L.unet_blocks(E.apply_actions(start, [E.Action("remove", removed, 0, 0)])[0])) == len(L.unet_blocks(start)) - 1
    assert records[1]["layouts"] == {k: final[k] for k in ("down_layouts", "mid_layout", "up_layouts")}
    first = ckpt.checkpoints(str(tmp_path / "e" / "run"))[0]
    saved = json.load(open(os.path.join(first, "config.json")))["train"]
    assert (saved["init_from_teacher"], saved["lr"], saved["preset"]) == ("full", INIT_LR, None)
    # one AdamW step at lr_1 = INIT_LR / warmup moves a weight by at most lr_1 (1 + wd |w|)
    student = A.load_student(os.path.join(first, "student")).state_dict()
    teacher = tiny_teacher.unet.state_dict()
    w = teacher["conv_in.weight"]
    assert ((student["conv_in.weight"] - w).abs() <= INIT_LR * (1 + 0.01 * w.abs()) * (1 + 1e-3)).all()


def test_evolve_takes_the_trainers_flags_as_declared_there(capsys):
    from diffusion_distill import cli
    from core import options
    from students.training.train import TrainConfig

    train_fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    evolve_fields = {f.name: f for f in dataclasses.fields(E.EvolveConfig)}
    assert set(E.EvolveConfig.REUSED) == set(E.TRAIN_FLAGS) and "lr" not in E.TRAIN_FLAGS
    for name in E.TRAIN_FLAGS:  # one declaration: the same default and help
        assert (evolve_fields[name].default, evolve_fields[name].metadata) == (train_fields[name].default,
                                                                               train_fields[name].metadata), name
    for verb, expected in (("evolve", ["--init_from_teacher", "--batch_size", "--latency_target_ratio", "--warmup_steps"]),
                           ("train", ["--init_from_teacher", "--batch_size", "--max_steps"])):
        with pytest.raises(SystemExit) as exit_:
            cli.main([verb, "--help"])
        out = capsys.readouterr().out
        assert exit_.value.code == 0 and all(flag in out for flag in expected), verb
        assert "samples per rank per micro-batch (default: 8)" in " ".join(out.split())
    with pytest.raises(TypeError, match="declares \\['lr'\\] itself"):
        options.reuse(TrainConfig, "lr")(E.EvolveConfig)
    with pytest.raises(TypeError, match="no option field"):
        options.reuse(TrainConfig, "latency_target_ms")


def _weights_sha256(state: dict) -> str:
    """``students.training.checkpoint.write_audit``'s hash of a state dict (names and bytes, sorted by name)."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.slow  # two torchrun processes each import torch and load the shapes teacher: 28 to 45 s on 2 shared cores
def test_evolve_under_torchrun_two_gloo_ranks_end_with_one_architecture(tmp_path, torchrun):
    import subprocess

    from conftest import dump_argv
    from pipelines import teacher_dump
    from students.training import checkpoint as ckpt
    from students.models.teacher_init import cut
    from teachers.shapes import world

    world.write_captions(str(tmp_path / "p.txt"), 8, seed=3)
    world.write_captions(str(tmp_path / "val.txt"), 2, seed=4)
    teacher_dump.run(dump_argv(tmp_path / "p.txt", tmp_path / "dump", teacher="shapes", samples_per_shard=2,
                               feature_layers="", cpu_threads=1))
    start = cut(_shapes_teacher_family(), "mid_only")[0]
    table = _planted_table(start, {"R": 1.0, "T": 2.0})
    table.settings = {"side": 8, "batch_size": 1, "repeats": 1, "warmup": 0, "device": "cpu", "dtype": "float32", "text_tokens": 7}
    table.save(str(tmp_path / "lk.json"))
    launch, env = torchrun
    out = tmp_path / "evo"
    # 8 samples in 4 shards, 2 ranks x batch 2: every step reads new data on each rank; robust skips differ per rank
    proc = subprocess.run([*launch, "-m", "students.search.evolve", "--data", str(tmp_path / "dump"),
                           "--output", str(out), "--init_from_teacher", "mid_only", "--recipe", "output_kd",
                           "--lookup", str(tmp_path / "lk.json"), "--latency_target_ms", str(table.predict_ms(start) - 0.5),
                           "--iterations", "2", "--steps_per_iteration", "2", "--batch_size", "2", "--warmup_steps", "1",
                           "--shuffle_buffer", "0", "--robust_skip_prob", "0.3", "--val_captions", str(tmp_path / "val.txt"),
                           "--val_images", "2", "--eval_batch_size", "4", "--audit_keys", "1"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-6000:]
    records = E.read_records(str(out))
    assert [len(r["actions"]) for r in records] == [1, 0] and records[0]["layouts"] == E.layouts(start)
    final = json.load(open(out / "student_config.json"))
    assert records[1]["layouts"] == {k: final[k] for k in ("down_layouts", "mid_layout", "up_layouts")} != E.layouts(start)
    # both ranks trained on in the evolved architecture and ended with the checkpoint's weights
    r0, r1 = (json.load(open(out / "run" / "ranks" / f"rank-{r}.json")) for r in (0, 1))
    last = ckpt.checkpoints(str(out / "run"))[-1]
    assert last.endswith("step-0000004") and (r0["world"], r1["world"]) == (2, 2)
    assert r0["weights_sha256"] == r1["weights_sha256"] == _weights_sha256(A.load_student(os.path.join(last, "student")).state_dict())
