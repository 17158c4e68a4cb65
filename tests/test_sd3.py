"""SD3-shaped flow-matching teachers: loading through diffusers' StableDiffusion3Pipeline, the sampler
against that pipeline step for step, the flow record (schema 3), and the dump end to end."""

import dataclasses
import json
import os

import numpy as np
import pytest
import torch

from core.errors import UserError
from shards import record
from teachers.load import TeacherError, build_sd3, load_teacher, resolve_teacher, teacher_geometry
from teachers.sampler import SampleRequest, SamplerConfig, make_scheduler, sample_trajectories

pytestmark = pytest.mark.numerics  # float32 tolerances: rerun on AVX2 kernels (CI)

REQS = [SampleRequest("a-s0", "a red cube on a table", 11), SampleRequest("b-s0", "two blue birds", 22)]
FP16_REL = 2.0 ** -11  # float16 rounds to nearest: relative error <= 2^-11 for normal values
FP16_SUB = 2.0 ** -25  # half the spacing of float16's subnormals: the absolute error below 2^-14


@pytest.fixture(scope="module")
def sd3():
    return load_teacher("tiny-sd3")


def _variant(teacher, **scheduler_config):
    """``teacher`` with a new pipeline whose scheduler config is changed (the fixture stays as it is)."""
    pipe = teacher.pipe
    new = type(pipe)(**{**pipe.components, "scheduler": type(pipe.scheduler).from_config(pipe.scheduler.config,
                                                                                        **scheduler_config)})
    return dataclasses.replace(teacher, pipe=new)


def _pipeline_trajectory(teacher, reqs, steps, guidance):
    """diffusers' own StableDiffusion3Pipeline: (its initial noise, the latents after each step, the output)."""
    pipe = type(teacher.pipe)(**{**teacher.pipe.components, "scheduler": make_scheduler(teacher, None)})
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator("cpu").manual_seed(r.seed) for r in reqs]
    after = []

    def keep(pipe, i, t, kwargs):
        after.append(kwargs["latents"].float().clone())
        return kwargs

    out = pipe([r.prompt for r in reqs], num_inference_steps=steps, guidance_scale=guidance, generator=gens,
               output_type="latent", callback_on_step_end=keep)
    return after, out.images.float()


def _fp16_tol(reference: np.ndarray) -> np.ndarray:
    """What float16 storage may move each value by (elementwise), plus the 1e-6 of the scale below."""
    return FP16_REL * np.abs(reference) + FP16_SUB


def test_tiny_sd3_is_diffusers_own_sd3_pipeline(sd3):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    pipe = sd3.pipe
    assert type(pipe) is StableDiffusion3Pipeline and sd3.is_flow and not sd3.is_xl
    assert type(pipe.transformer) is SD3Transformer2DModel and sd3.denoiser is pipe.transformer
    assert type(pipe.scheduler) is FlowMatchEulerDiscreteScheduler and pipe.scheduler.config.shift == 3.0
    assert type(pipe.text_encoder) is type(pipe.text_encoder_2) is CLIPTextModelWithProjection
    assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None
    assert sd3.prediction_type == "flow" and sd3.default_resolution == 128 and sd3.vae_scale_factor == 8
    # the real CLIP BPE offline: "a photo of a cat" is OpenAI CLIP's ids 320 1125 539 320 2368
    assert pipe.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer.pad_token == "<|endoftext|>"
    state = torch.random.get_rng_state()
    again = load_teacher("tiny-sd3")
    assert torch.equal(state, torch.random.get_rng_state())  # building does not move the caller's RNG
    for (n, a), (_, b) in zip(pipe.transformer.state_dict().items(), again.pipe.transformer.state_dict().items()):
        assert torch.equal(a, b), n
    assert teacher_geometry("tiny-sd3") == dict(levels=None, resolution=128, multiple=16, is_xl=False, is_flow=True,
                                                blocks=4, max_resolution=256)


def test_sd3_random_has_sd3_mediums_architecture_on_the_meta_device():
    pipe = build_sd3("sd3-random", device="meta")  # no memory, no init: the 2B model in about a second
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # SD3-Medium: "2B" parameters (Esser et al. 2024, depth 24; the released MMDiT has 2,028,328,000),
    # CLIP ViT-L/14 text tower with projection 123.7M, OpenCLIP bigG/14 text tower with projection 694.7M.
    assert count(pipe.transformer) == 2_028_328_000
    assert count(pipe.text_encoder) == 123_650_304 and count(pipe.text_encoder_2) == 694_659_840
    cfg = pipe.transformer.config
    assert (cfg.num_layers, cfg.num_attention_heads * cfg.attention_head_dim, cfg.patch_size, cfg.in_channels) == (24, 1536, 2, 16)
    assert pipe.vae.config.latent_channels == 16 and pipe.vae.config.shift_factor == 0.0609
    assert next(pipe.transformer.parameters()).device.type == "meta"
    assert teacher_geometry("sd3-random")["resolution"] == 1024


@pytest.mark.parametrize("case", ["shift3", "dynamic-shift", "no-cfg"])
def test_every_latent_equals_sd3_pipeline(sd3, case):
    """Every recorded latent against StableDiffusion3Pipeline's own (``callback_on_step_end``) for the
    same seeds: same ops in the same order on the same machine, so 1e-6 of the scale bounds it (a
    last-bit difference); also through float16 storage, which moves each value by <= 2^-11 of it."""
    teacher = _variant(sd3, use_dynamic_shifting=True) if case == "dynamic-shift" else sd3
    guidance, steps = (1.0, 3) if case == "no-cfg" else (5.0, 4)
    # no CFG: the pipeline runs the cond branch alone (batch 2, ours 4); float32 kernels may block
    # differently with the batch, a few ulps per op: 1e-4 of the scale, as for the UNet teachers.
    atol_scale = 1e-4 if case == "no-cfg" else 1e-6
    cfg = SamplerConfig(num_inference_steps=steps, guidance_scale=guidance, feature_layers=())
    results, info = sample_trajectories(teacher, REQS, cfg)
    after, final = _pipeline_trajectory(teacher, REQS, steps, guidance)
    noise = np.stack([r.noise for r in results])
    ref = [noise] + [a.numpy() for a in after[:-1]] + [final.numpy()]
    ours = np.stack([r.latents for r in results], axis=1)  # (S + 1, batch, 16, h, w)
    assert ours.shape == (steps + 1, 2, 16, 16, 16) and info.scheduler_class == "FlowMatchEulerDiscreteScheduler"
    np.testing.assert_array_equal(after[-1].numpy(), final.numpy())
    stored = np.stack([record.decode_sample(record.encode_sample(r, {})[0]).latents for r in results], axis=1)
    assert stored.dtype == np.float16
    for i, (o, s, r) in enumerate(zip(ours, stored, ref)):
        scale = max(1.0, float(np.abs(r).max()))
        np.testing.assert_allclose(o, r, rtol=0, atol=atol_scale * scale, err_msg=f"latent {i}")
        assert (np.abs(s.astype(np.float64) - r) <= _fp16_tol(r) + atol_scale * scale).all(), f"stored latent {i}"
    assert info.prediction_type == "flow" and all(r.guidance_scale == guidance for r in results)
    if case == "dynamic-shift":  # mu from the 64 image tokens moves the schedule off shift 3's
        assert info.timesteps != sample_trajectories(sd3, REQS[:1], cfg)[1].timesteps


def test_flow_record_is_rectified_flow_with_the_shifted_sigmas(sd3):
    """The record's sigmas are SD3's shifted schedule (float64 reference), alpha = 1 - sigma, the
    first latent is the noise, and each Euler step lands at z_{i+1} = (1 - s_{i+1}) x0_i + s_{i+1} eps_i
    with (x0_i, eps_i) = (z_i - s_i v_i, z_i + (1 - s_i) v_i) from the guided velocity v_i."""
    steps, shift = 5, 3.0
    cfg = SamplerConfig(num_inference_steps=steps, guidance_scale=4.0, feature_layers=())
    res = sample_trajectories(sd3, REQS[:1], cfg)[0][0]
    meta = json.loads(record.encode_sample(res, {"prediction_type": "flow"}, storage_dtype="float32")[0]["json"])
    assert meta["schema_version"] == 3 and record.noise_process(meta) == record.RECTIFIED_FLOW
    timesteps, alphas, sigmas = record.noise_levels(meta)
    u_min = 1.0 / 1000  # the scheduler's training sigmas are t/1000 for t = 1..1000, shifted
    shifted = lambda u: shift * u / (1 + (shift - 1) * u)  # noqa: E731
    u = np.linspace(1000 * shifted(1.0), 1000 * shifted(u_min), steps) / 1000  # between the shifted ends, shifted again
    want = shifted(u)
    np.testing.assert_allclose(sigmas, want, rtol=0, atol=1e-6)  # float32 schedule vs float64
    np.testing.assert_allclose(timesteps, 1000 * sigmas, rtol=1e-6)
    np.testing.assert_array_equal(alphas, 1.0 - sigmas)
    assert record.final_noise_level(meta) == (1.0, 0.0)
    z = res.latents.astype(np.float64)
    np.testing.assert_array_equal(z[0], res.noise)  # sigma_0 = 1: the state starts at the noise
    s = np.append(sigmas, 0.0)
    w = meta["guidance_scale"]
    for i in range(steps):
        v = res.pred_uncond[i] + w * (res.pred_cond[i].astype(np.float64) - res.pred_uncond[i])
        x0, eps = z[i] - s[i] * v, z[i] + (1 - s[i]) * v
        # float32 sampler arithmetic over one step: ~1e-6 of the scale; 1e-5 bounds it
        scale = max(1.0, float(np.abs(z[i + 1]).max()))
        np.testing.assert_allclose(z[i + 1], (1 - s[i + 1]) * x0 + s[i + 1] * eps, rtol=0, atol=1e-5 * scale)


def test_flow_predictions_embeddings_and_feature_maps_equal_a_direct_transformer_call(sd3):
    layers = ("transformer_blocks.0", "transformer_blocks.3")
    cfg = SamplerConfig(num_inference_steps=4, record_steps=(0, 2, 3), feature_layers=layers, num_feature_steps=2)
    results, info = sample_trajectories(sd3, REQS, cfg)
    r, transformer = results[1], sd3.pipe.transformer
    assert all(not m._forward_hooks for m in transformer.modules()), "sampler left a hook behind"
    assert r.prompt_embeds.shape == (77 + 256, 96)  # CLIP-L + bigG (32 + 32, zero-padded to 96), then T5's zeros
    assert not r.prompt_embeds[77:].any() and not r.prompt_embeds[:, 64:].any()
    assert r.pooled_prompt_embeds.shape == (64,) and info.negative_pooled_prompt_embeds.shape == (64,)
    step = r.feature_steps[-1]
    row = info.recorded_steps.index(step)
    seen = {}
    hooks = [transformer.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o[1]))
             for n in layers]
    with torch.no_grad():
        pred = transformer(hidden_states=torch.from_numpy(r.latents[row])[None],
                           timestep=torch.tensor([info.timesteps[step]], dtype=torch.float32),
                           encoder_hidden_states=torch.from_numpy(r.prompt_embeds)[None],
                           pooled_projections=torch.from_numpy(r.pooled_prompt_embeds)[None]).sample
    for h in hooks:
        h.remove()
    # batch 1 here, 4 in the sampler: float32 kernels may block differently (a few ulps per op), so
    # 1e-5 of each tensor's scale (about 100 float32 ulps through 4 blocks), as for the UNet teachers.
    np.testing.assert_allclose(r.pred_cond[row], pred[0].numpy(), atol=1e-5 * max(1.0, pred.abs().max().item()))
    for name in layers:
        tokens = seen[name][0].numpy()  # (64, 32): 8 x 8 patches in row-major order
        fmap = r.feats[name][1]
        assert r.feats[name].shape == (2, 32, 8, 8)
        scale = max(1.0, float(np.abs(tokens).max()))
        for row_, col in ((0, 0), (0, 7), (5, 2), (7, 7)):  # token row * 8 + col is patch (row, col)
            np.testing.assert_allclose(fmap[:, row_, col], tokens[row_ * 8 + col], atol=1e-5 * scale)


def test_flow_and_diffusion_schedulers_and_layers_are_not_mixed(sd3, tiny_teacher):
    with pytest.raises(UserError, match="scheduler 'ddim' does not sample teacher 'tiny-sd3'.*flow-euler"):
        sample_trajectories(sd3, REQS, SamplerConfig(num_inference_steps=2, scheduler="ddim", feature_layers=()))
    with pytest.raises(UserError, match="scheduler 'flow-euler' does not sample teacher 'tiny'"):
        sample_trajectories(tiny_teacher, REQS, SamplerConfig(num_inference_steps=2, scheduler="flow-euler"))
    with pytest.raises(ValueError, match="'mid_block' is not a module of the teacher transformer"):
        sample_trajectories(sd3, REQS, SamplerConfig(num_inference_steps=2, feature_layers=("mid_block",)))
    with pytest.raises(UserError, match="stochastic_sampling"):
        sample_trajectories(_variant(sd3, stochastic_sampling=True), REQS, SamplerConfig(num_inference_steps=2))
    with pytest.raises(ValueError, match="height=272.*position table covers image sides up to 256"):
        sample_trajectories(sd3, REQS, SamplerConfig(num_inference_steps=1, height=272, width=272, feature_layers=()))


def test_local_sd3_folder_loads_through_its_model_index(sd3, tmp_path):
    sd3.pipe.save_pretrained(tmp_path / "sd3", safe_serialization=True)
    index = json.loads((tmp_path / "sd3" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline" and not any(index.get("text_encoder_3") or [None])
    assert resolve_teacher(str(tmp_path / "sd3")) == str(tmp_path / "sd3")
    assert teacher_geometry(str(tmp_path / "sd3")) == teacher_geometry("tiny-sd3")
    loaded = load_teacher(str(tmp_path / "sd3"))
    assert loaded.is_flow and loaded.pipe.text_encoder_3 is None and loaded.pipe.scheduler.config.shift == 3.0
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        ref, got = getattr(sd3.pipe, name).state_dict(), getattr(loaded.pipe, name).state_dict()
        assert all(torch.equal(ref[k], got[k]) for k in ref), name
    cfg = SamplerConfig(num_inference_steps=2, feature_layers=())
    a, b = sample_trajectories(sd3, REQS[:1], cfg)[0][0], sample_trajectories(loaded, REQS[:1], cfg)[0][0]
    # same weights and inputs; a loaded model may take another attention kernel (a few ulps per op)
    w = a.guidance_scale
    scale = max(1.0, float(np.abs(a.latents).max()))
    np.testing.assert_allclose(a.latents, b.latents, rtol=0, atol=2 * (1 + 2 * w) * 1e-5 * scale)
    (tmp_path / "flux").mkdir()
    (tmp_path / "flux" / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    with pytest.raises(TeacherError, match="Flux teachers are not supported"):
        resolve_teacher(str(tmp_path / "flux"))


def test_noise_process_reads_older_records_as_variance_preserving():
    assert record.noise_process({"schema_version": 2, "prediction_type": "v_prediction"}) == record.VARIANCE_PRESERVING
    assert record.noise_process({"schema_version": 1}) == record.VARIANCE_PRESERVING
    assert record.noise_process({"schema_version": 3, "prediction_type": "epsilon"}) == record.VARIANCE_PRESERVING
    assert record.noise_process({"schema_version": 3, "prediction_type": "flow"}) == record.RECTIFIED_FLOW
    with pytest.raises(UserError, match="prediction_type 'sample'"):
        record.noise_process({"schema_version": 3, "prediction_type": "sample", "key": "k"})


def test_dump_of_tiny_sd3_verifies_and_holds_the_pipelines_latents(tmp_path, capsys):
    """``distill dump --teacher tiny-sd3`` on DirectRunner (the scheduler and feature layers its
    family's defaults), ``distill inspect --verify``, every stored latent against the pipeline's own
    for the sample's seed (float16 storage), and the trainer's one-line refusal."""
    from conftest import run_dump
    from diffusion_distill.cli import main
    from shards.loader import dataset_shards, record_pipeline

    out = run_dump(tmp_path, captions=["a red cube on a table", "two blue birds", "a green tree"], teacher="tiny-sd3",
                   feature_layers=None, num_inference_steps=3, guidance_scale=5.0, batch_size=4)
    info = json.load(open(os.path.join(out, "dataset.json")))
    assert info["schema_version"] == 3 and info["prediction_type"] == "flow"
    assert info["recipe"]["scheduler"] == "flow-euler" and info["scheduler_class"] == "FlowMatchEulerDiscreteScheduler"
    assert info["recipe"]["feature_layers"] == ["transformer_blocks.2", "transformer_blocks.3"]
    assert sorted(info["shared"]) == ["negative_pooled_prompt_embeds", "negative_prompt_embeds"]
    capsys.readouterr()
    assert main(["inspect", out, "--verify"]) == 0
    assert "verify: 1 ok, 0 bad" in capsys.readouterr().out
    records = sorted(record_pipeline(dataset_shards(out)), key=lambda r: r.key)
    assert len(records) == 3
    reqs = [SampleRequest(r.key, r.caption, r.meta["seed"]) for r in records]
    teacher = load_teacher("tiny-sd3")
    after, final = _pipeline_trajectory(teacher, reqs, 3, 5.0)
    for b, rec in enumerate(records):
        assert rec.meta["prediction_type"] == "flow" and rec.feats["transformer_blocks.2"].shape == (2, 32, 8, 8)
        noise = torch.randn((1, 16, 16, 16), generator=torch.Generator("cpu").manual_seed(rec.meta["seed"]))[0]
        ref = [noise.numpy()] + [a[b].numpy() for a in after[:-1]] + [final[b].numpy()]
        # The dump's batch (3) is the pipeline's: last-bit differences at most (1e-6 of the scale), then
        # float16 storage.
        for i, r in enumerate(ref):
            scale = max(1.0, float(np.abs(r).max()))
            assert (np.abs(rec.latents[i].astype(np.float64) - r) <= _fp16_tol(r) + 1e-6 * scale).all(), (rec.key, i)
    capsys.readouterr()
    assert main(["train", "--data", out, "--output", str(tmp_path / "run"), "--preset", "tiny"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "flow dumps need a flow recipe" in err[0], err
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("flags, words", [
    (["--teacher", "tiny-sd3", "--scheduler", "ddim"], "--scheduler 'ddim' does not sample teacher 'tiny-sd3'"),
    (["--teacher", "tiny", "--scheduler", "flow-euler"], "--scheduler 'flow-euler' does not sample teacher 'tiny'"),
    (["--teacher", "tiny-sd3", "--feature_layers", "mid_block"], "'mid_block' is not a block of teacher 'tiny-sd3' (transformer_blocks.N, N < 4)"),
    (["--teacher", "tiny-sd3", "--feature_layers", "transformer_blocks.4"], "'transformer_blocks.4' is not a block"),
    (["--teacher", "tiny-sd3", "--resolution", "272"], "covers sides up to 256"),
])
def test_dump_refuses_flags_the_flow_or_unet_teacher_cannot_take(tmp_path, flags, words):
    from pipelines import teacher_dump

    (tmp_path / "p.txt").write_text("a cat\n")
    with pytest.raises(UserError) as err:
        teacher_dump.run(["--prompts", str(tmp_path / "p.txt"), "--output", str(tmp_path / "out"), *flags])
    assert words in str(err.value)
    assert not os.path.exists(tmp_path / "out")
