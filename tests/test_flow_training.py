"""Flow students: the flow recipes on a tiny-sd3 dump (each trains, one batch against a hand computation,
stop-and-resume), the cross-architecture feature mapping, the refusals, and the export into SD3's
pipeline whose latents equal the trainer's own sampler."""

import dataclasses
import json
import os

import numpy as np
import pytest
import torch

from shards.loader import dataset_shards, read_dataset, record_pipeline
from shards.schema import DatasetInfo
from students.distill import losses as D
from students.distill.batches import training_batch
from students.distill.recipes import compute_losses, default_feature_map, get_recipe, make_projections
from students.training.train import TrainConfig, resolve_features, train

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.numerics]

CAPTIONS = ["a red cube on a table", "two blue birds", "a green tree", "a cat on a mat"]


@pytest.fixture(scope="module")
def flow_dump(tmp_path_factory):
    """tiny-sd3's dump of 4 captions: 4 Euler steps, all recorded, blocks 2 and 3 at every step."""
    from conftest import run_dump

    return run_dump(tmp_path_factory.mktemp("flow"), captions=CAPTIONS, teacher="tiny-sd3", feature_layers=None,
                    num_inference_steps=4, guidance_scale=5.0, batch_size=4, record_steps="all", num_feature_steps=4)


def _cfg(data, out, **kw):
    base = dict(data=data, output=str(out), preset="tiny_sd3", recipe="flow_kd", batch_size=4, max_steps=3,
                warmup_steps=1, checkpoint_every=1, keep_checkpoints=3, shuffle_buffer=0, lr=1e-3, ema_decay=0.0)
    return TrainConfig(**{**base, **kw})


def _logged(run):
    return [json.loads(line) for line in open(os.path.join(run, "losses.jsonl"))]


# -- the pure pieces ---------------------------------------------------------------------------

def test_flow_step_target_is_the_velocity_whose_euler_step_lands_on_the_recorded_latent():
    g = torch.Generator().manual_seed(0)
    z_t, z_s = torch.randn(3, 16, 4, 4, generator=g, dtype=torch.float64), torch.randn(3, 16, 4, 4, generator=g, dtype=torch.float64)
    s_t, s_s = torch.tensor([1.0, 0.86, 0.6], dtype=torch.float64), torch.tensor([0.6, 0.4, 0.0], dtype=torch.float64)
    v = D.flow_step_target(z_t, z_s, s_t, s_s)
    # FlowMatchEulerDiscreteScheduler.step: z_s = z_t + (s_s - s_t) v
    torch.testing.assert_close(z_t + (s_s - s_t).view(-1, 1, 1, 1) * v, z_s, rtol=0, atol=1e-14)
    assert D.flow_step_distill_loss(v, z_t, z_s, s_t, s_s).abs().max() < 1e-28
    # one sample by hand: the loss is mean((v - v*)^2) with v* = (z_s - z_t) / (s_s - s_t) (float32, per_sample_mse's)
    w = torch.zeros_like(v)
    want = ((z_s[1] - z_t[1]) / (0.4 - 0.86)).pow(2).mean().float()
    torch.testing.assert_close(D.flow_step_distill_loss(w, z_t, z_s, s_t, s_s)[1], want, rtol=1e-6, atol=0)


def test_tiny_sd3_student_takes_16_channel_latents_the_text_width_and_the_pooled_embedding():
    from students.models.unet import build_unet, preset

    cfg = preset("tiny_sd3")
    assert (cfg.in_channels, cfg.out_channels, cfg.cross_attention_dim) == (16, 16, 96)
    assert (cfg.addition_embed_type, cfg.projection_class_embeddings_input_dim) == ("pooled", 64)
    torch.manual_seed(0)
    student = build_unet("tiny_sd3").eval()
    g = torch.Generator().manual_seed(0)
    z, text = torch.randn(1, 16, 16, 16, generator=g), torch.randn(1, 333, 96, generator=g)
    a, b = torch.randn(1, 64, generator=g), torch.randn(1, 64, generator=g)
    with torch.no_grad():
        out_a = student(z, torch.tensor([500.0]), encoder_hidden_states=text, added_cond_kwargs={"text_embeds": a}).sample
        out_b = student(z, torch.tensor([500.0]), encoder_hidden_states=text, added_cond_kwargs={"text_embeds": b}).sample
    assert out_a.shape == (1, 16, 16, 16) and not torch.allclose(out_a, out_b)  # the pooled embedding conditions it
    with pytest.raises(ValueError, match="addition_embed_type='pooled' needs added_cond_kwargs"):
        student(z, torch.tensor([500.0]), encoder_hidden_states=text)


def _dataset(recipe: dict) -> DatasetInfo:
    """A hand-made flow dataset.json holding ``recipe`` (what ``resolve_features`` reads)."""
    return DatasetInfo(schema_version=3, recipe=recipe, recipe_hash="0" * 16, shards=[], prediction_type="flow")


def test_default_feature_map_pairs_stages_with_the_last_recorded_blocks_in_depth_order():
    stages = ["mid_block", "up_blocks.0"]
    assert default_feature_map(stages, ["transformer_blocks.3", "transformer_blocks.2"]) == (
        ("mid_block", "transformer_blocks.2"), ("up_blocks.0", "transformer_blocks.3"))
    # depth by block index, not by the string: 10 is deeper than 9
    assert default_feature_map(stages, ["transformer_blocks.10", "transformer_blocks.2", "transformer_blocks.9"]) == (
        ("mid_block", "transformer_blocks.9"), ("up_blocks.0", "transformer_blocks.10"))
    with pytest.raises(ValueError, match="recorded 1 teacher block"):
        default_feature_map(stages, ["transformer_blocks.3"])
    recipe = resolve_features(get_recipe("flow_snapgen_kd"), _dataset({"feature_layers": ["transformer_blocks.2",
                                                                                        "transformer_blocks.3"]}))
    assert recipe.feature_pairs() == [("mid_block", "transformer_blocks.2", 1.0), ("up_blocks.0", "transformer_blocks.3", 1.0)]
    assert resolve_features(get_recipe("snapgen_kd"), _dataset({})) == get_recipe("snapgen_kd")  # UNet recipes as they were


def test_cross_architecture_projections_have_the_mapped_shapes_and_learn_a_planted_map():
    """tiny_sd3's mid_block (64 ch, 8 x 8 on 16 x 16 latents) and up_blocks.0 (64 ch, 16 x 16) against
    transformer maps (32 ch, 8 x 8 patch grid): 1x1 convs 64 -> 32 keyed by the student stage; the
    teacher maps planted as a fixed 1x1 map of the (resized) student maps, so the loss can reach 0."""
    from students.models.unet import build_unet

    student = build_unet("tiny_sd3")
    info = student.feature_info()
    assert info["mid_block"] == (64, 2) and info["up_blocks.0"] == (64, 1)
    pairs = [("mid_block", "transformer_blocks.2", 1.0), ("up_blocks.0", "transformer_blocks.3", 0.5)]
    heads = make_projections({k: c for k, (c, _) in info.items()}, {"transformer_blocks.2": 32, "transformer_blocks.3": 32},
                             ["mid_block", "up_blocks.0"], {"mid_block": "transformer_blocks.2", "up_blocks.0": "transformer_blocks.3"})
    assert sorted(heads) == ["mid_block", "up_blocks_0"]
    assert tuple(heads["mid_block"].weight.shape) == (32, 64, 1, 1)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        out = student(torch.randn(2, 16, 16, 16, generator=g), torch.tensor([1000.0, 500.0]),
                      encoder_hidden_states=torch.randn(2, 333, 96, generator=g),
                      added_cond_kwargs={"text_embeds": torch.randn(2, 64, generator=g)}, return_features=True)
    feats = {k: out.features[k] for k in ("mid_block", "up_blocks.0")}
    assert feats["mid_block"].shape == (2, 64, 8, 8) and feats["up_blocks.0"].shape == (2, 64, 16, 16)
    planted = torch.nn.Conv2d(64, 32, 1)
    torch.nn.init.normal_(planted.weight, generator=g)
    with torch.no_grad():
        teacher = {"transformer_blocks.2": planted(feats["mid_block"]),
                   "transformer_blocks.3": planted(torch.nn.functional.interpolate(feats["up_blocks.0"], size=(8, 8),
                                                                                  mode="bilinear", align_corners=False))}
    loss = D.mapped_feature_distill_loss(feats, teacher, heads, pairs)
    assert loss.shape == (2,)
    first = float(loss.detach().mean())
    opt = torch.optim.LBFGS(heads.parameters(), max_iter=100, line_search_fn="strong_wolfe")  # a least-squares fit

    def closure():
        opt.zero_grad()
        value = D.mapped_feature_distill_loss(feats, teacher, heads, pairs).mean()
        value.backward()
        return value

    for _ in range(3):
        opt.step(closure)
    last = float(D.mapped_feature_distill_loss(feats, teacher, heads, pairs).detach().mean())
    assert last < 1e-3 * first, (first, last)


# -- training on the dump ----------------------------------------------------------------------

@pytest.mark.parametrize("recipe, extra, term", [
    ("flow_kd", [], "output"),
    ("flow_snapgen_kd", [], "feature"),
    ("flow_step", ["--student_steps", "2"], "step"),
])
def test_distill_train_runs_each_flow_recipe_on_a_tiny_sd3_dump(flow_dump, tmp_path, recipe, extra, term):
    from diffusion_distill.cli import main

    out = tmp_path / "run"
    assert main(["train", "--data", flow_dump, "--output", str(out), "--preset", "tiny_sd3", "--recipe", recipe,
                 "--max_steps", "6", "--batch_size", "4", "--warmup_steps", "1", "--lr", "2e-3", "--ema_decay", "0",
                 "--checkpoint_every", "6", *extra]) == 0
    rows = _logged(out)
    assert len(rows) == 6 and all(np.isfinite(r["loss"]) for r in rows)
    # the distillation targets are the dump's (no fresh noise): the term falls on these 4 samples
    first, last = rows[0][f"loss/{term}"], rows[-1][f"loss/{term}"]
    assert last < 0.85 * first, (term, first, last)
    assert {"loss/task", "loss/output"} <= set(rows[0])
    saved = json.load(open(out / "checkpoints" / "step-0000006" / "config.json"))
    assert saved["recipe"]["prediction_type"] == "flow" and saved["student"]["prediction_type"] == "flow"
    if recipe == "flow_snapgen_kd":  # the mapping the run used, stated in its checkpoint
        assert saved["recipe"]["feature_map"] == [["mid_block", "transformer_blocks.2"], ["up_blocks.0", "transformer_blocks.3"]]
    if recipe == "flow_step":  # 2 student steps on 4 teacher steps: the teacher's rows 0 and 2
        sigmas = next(iter(record_pipeline(dataset_shards(flow_dump)))).meta["sigmas"]
        assert saved["student"]["num_inference_steps"] == 2
        np.testing.assert_allclose(saved["student"]["trained_sigmas"], [sigmas[0], sigmas[2]], rtol=1e-6)


def test_one_flow_batch_equals_a_hand_computation(flow_dump):
    """Every term of a flow recipe with all four (output, feature, step, task) on one batch, against the
    same quantities computed here from the student's outputs and the record."""
    from students.models.unet import build_unet

    recipe = dataclasses.replace(get_recipe("flow_snapgen_kd"), step_weight=0.5, student_steps=2, timestep_aware=False,
                                 task_weight=0.3)
    dataset, negative = read_dataset(flow_dump)
    recipe = resolve_features(recipe, dataset)
    records = sorted(record_pipeline(dataset_shards(flow_dump)), key=lambda r: r.key)
    data = training_batch(records, negative, recipe, seed=0, epoch=0, scheduler_config={})
    batch, targets = data["batch"], data["targets"]
    torch.manual_seed(0)
    student = build_unet("tiny_sd3").eval()
    heads = make_projections({k: c for k, (c, _) in student.feature_info().items()},
                             {"transformer_blocks.2": 32, "transformer_blocks.3": 32}, ["mid_block", "up_blocks.0"],
                             dict(recipe.feature_map))
    g = torch.Generator().manual_seed(1)
    point = {"noise": torch.randn(batch["x0"].shape, generator=g), "sigma": torch.tensor([0.9, 0.5, 0.2, 0.05])}
    raw = {}
    with torch.no_grad():
        got = compute_losses(student, heads, batch, targets, recipe, None, torch.Generator(), task_point=point, raw=raw)
        z, s, cond = batch["z"], batch["sigma"], batch["cond"]
        assert torch.equal(batch["alpha"], 1 - s) and batch["num_train_timesteps"] == 1000.0
        assert torch.allclose(batch["t"], 1000 * s, rtol=1e-6)
        out = student(z, batch["t"], encoder_hidden_states=cond, added_cond_kwargs=batch["added"], return_features=True)
        v_u = student(z, batch["t"], encoder_hidden_states=batch["uncond"], added_cond_kwargs=batch["added_uncond"]).sample
        v = out.sample
        mse = lambda a, b: (a - b).pow(2).flatten(1).mean(1)  # noqa: E731
        w = batch["guidance"].view(-1, 1, 1, 1)
        guided = v_u + w * (v - v_u)
        step_target = (batch["z_next"] - z) / (batch["sigma_next"] - s).view(-1, 1, 1, 1)
        maps = {"mid_block": heads["mid_block"](out.features["mid_block"]),
                "up_blocks.0": torch.nn.functional.interpolate(heads["up_blocks_0"](out.features["up_blocks.0"]), size=(8, 8),
                                                                mode="bilinear", align_corners=False)}
        feature = mse(maps["mid_block"], targets["feats"]["transformer_blocks.2"]) + mse(
            maps["up_blocks.0"], targets["feats"]["transformer_blocks.3"])
        sv = point["sigma"].view(-1, 1, 1, 1)
        x0, noise = batch["x0"], point["noise"]
        v_task = student((1 - sv) * x0 + sv * noise, 1000 * point["sigma"], encoder_hidden_states=cond,
                         added_cond_kwargs=batch["added"]).sample
        want = {"output": mse(v, targets["pred_cond"]).mean(), "feature": feature.mean(),
                "step": 0.5 * mse(guided, step_target).mean(), "task": 0.3 * mse(v_task, noise - x0).mean()}
    for k, value in want.items():
        torch.testing.assert_close(got[k], value, rtol=1e-5, atol=1e-7, msg=k)
    torch.testing.assert_close(got["loss"], sum(want.values()), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(raw["step"], want["step"] / 0.5, rtol=1e-5, atol=1e-7)
    # the rows: the step term jumps k = 2 recorded steps from row 0 or 2 (row 4 is the final latent, sigma 0)
    assert set(batch["sigma_next"].tolist()) <= {float(np.float32(records[0].meta["sigmas"][2])), 0.0}


@pytest.mark.parametrize("recipe_name", ["flow_snapgen_kd", "flow_step"])
def test_flow_stop_and_resume_equals_the_uninterrupted_run(flow_dump, tmp_path, recipe_name):
    kw = dict(recipe=recipe_name, **({"student_steps": 2} if recipe_name == "flow_step" else {}))
    ref = train(_cfg(flow_dump, tmp_path / "ref", **kw))
    first = train(_cfg(flow_dump, tmp_path / "run", **kw), stop_after=1)
    assert len(first) == 1 and sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["step-0000001"]
    rest = train(_cfg(flow_dump, tmp_path / "run", **kw))
    assert first + rest == ref and len(ref) == 3
    assert _logged(tmp_path / "run") == _logged(tmp_path / "ref")


def test_flow_and_diffusion_recipes_and_students_are_refused_on_the_other_dump_in_one_line(flow_dump, tiny_dump, tmp_path,
                                                                                           capsys):
    from diffusion_distill.cli import main

    cases = [
        (["--data", flow_dump, "--preset", "tiny_sd3", "--recipe", "output_kd"], "flow dumps need a flow recipe"),
        (["--data", tiny_dump, "--preset", "tiny", "--recipe", "flow_kd"], "flow recipes need a flow dump"),
        (["--data", flow_dump, "--preset", "tiny", "--recipe", "flow_kd"], "presets that fit: tiny_sd3"),
        (["--data", flow_dump, "--recipe", "flow_kd", "--feature_map", "mid_block=transformer_blocks.2"],
         "recipe 'flow_kd' has no feature term"),
    ]
    for i, (flags, words) in enumerate(cases):
        capsys.readouterr()
        out = tmp_path / f"run{i}"
        assert main(["train", *flags, "--output", str(out), "--max_steps", "1"]) == 2, flags
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], (flags, err)
        assert not os.path.exists(out)


# -- export ---------------------------------------------------------------------------------------

def test_exported_flow_student_samples_like_the_trainers_own_sampler(flow_dump, tmp_path):
    """``distill export`` of a flow_step student (2 steps on 4): SD3's pipeline from the folder, given
    prompts and seeds, gives the latents of ``flow_sample`` (the trainer's loop) on the same noise and text."""
    from diffusers import DiffusionPipeline

    from students.distill.inference import flow_sample, student_scheduler
    from students.export import folder as export
    from students.training.runs import load_student_unet, read_run
    from teachers.load import load_teacher

    run = tmp_path / "run"
    train(_cfg(flow_dump, run, recipe="flow_step", student_steps=2, max_steps=2, checkpoint_every=2))
    path = export.export(str(run), str(tmp_path / "exported"), weights="raw")
    info = export.read_inference(path)
    assert info["pipeline"] == "StableDiffusion3Pipeline" and info["num_inference_steps"] == 2
    assert info["scheduler"] == "TrainedSigmasFlowScheduler" and "text_encoder_3=None" in info["load"]
    index = json.load(open(os.path.join(path, "model_index.json")))
    assert index["transformer"] == ["student_transformer", "FlowUNetTransformer"]
    assert index["scheduler"] == ["student_scheduler", "TrainedSigmasFlowScheduler"]
    pipe = DiffusionPipeline.from_pretrained(path, trust_remote_code=True, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler.set_timesteps(2)
    sigmas = next(iter(record_pipeline(dataset_shards(flow_dump)))).meta["sigmas"]
    np.testing.assert_allclose(pipe.scheduler.sigmas.numpy(), [sigmas[0], sigmas[2], 0.0], rtol=1e-6)
    seeds, prompts = [5, 6], CAPTIONS[:2]
    got = pipe(prompts, num_inference_steps=2, guidance_scale=5.0, output_type="latent",
               generator=[torch.Generator().manual_seed(s) for s in seeds]).images
    # the trainer's side: its own scheduler and loop, the teacher's text encoders, the seeds' noise
    r = read_run(str(run))
    unet = load_student_unet(r.files, "raw")
    scheduler, _ = student_scheduler(r.dataset, r.recipe)
    teacher = load_teacher("tiny-sd3")
    with torch.no_grad():
        cond, uncond, pooled, pooled_uncond = teacher.pipe.encode_prompt(prompts, prompts, prompts, device="cpu",
                                                                        do_classifier_free_guidance=True)
    noise = torch.cat([torch.randn((1, 16, 16, 16), generator=torch.Generator().manual_seed(s)) for s in seeds])
    want = flow_sample(unet, scheduler, noise, cond, uncond, pooled, pooled_uncond, guidance=5.0)
    scale = float(want.abs().max())
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * max(1.0, scale))
    # the ONNX export of a flow student and its torch-free generator: tests/test_deploy_flow.py
