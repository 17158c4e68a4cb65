"""The trajectory sampler against diffusers' own pipelines, feature capture, determinism."""

import dataclasses

import numpy as np
import pytest
import torch

from teachers.sampler import (
    SampleRequest,
    SamplerConfig,
    draw_guidance,
    make_scheduler,
    resolve_modules,
    sample_trajectories,
)

REQS = [SampleRequest("a-s0", "a red cube on a table", 11), SampleRequest("b-s0", "two blue birds", 22)]


def _pipeline_latents(teacher, cfg, reqs, guidance):
    pipe = teacher.pipe
    pipe.scheduler = make_scheduler(teacher, cfg.scheduler)
    gens = [torch.Generator("cpu").manual_seed(r.seed) for r in reqs]
    out = pipe([r.prompt for r in reqs], num_inference_steps=cfg.num_inference_steps, guidance_scale=guidance,
               generator=gens, output_type="latent", eta=cfg.eta)
    return out.images.float().numpy()


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpm++"])
def test_final_latent_equals_stable_diffusion_pipeline(tiny_teacher, scheduler):
    cfg = SamplerConfig(num_inference_steps=4, scheduler=scheduler, guidance_scale=6.0, feature_layers=())
    results, info = sample_trajectories(tiny_teacher, REQS, cfg)
    ref = _pipeline_latents(tiny_teacher, cfg, REQS, 6.0)
    ours = np.stack([r.latents[-1] for r in results])
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)
    assert info.scheduler_class == {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler",
                                    "dpm++": "DPMSolverMultistepScheduler"}[scheduler]
    assert len(info.timesteps) == 4 and results[0].latents.shape[0] == 5


def test_final_latent_equals_pipeline_for_v_prediction_teacher(tiny_teacher):
    from teachers.load import Teacher

    pipe = tiny_teacher.pipe
    v_pipe = type(pipe)(**{**pipe.components, "scheduler": pipe.scheduler.__class__.from_config(
        pipe.scheduler.config, prediction_type="v_prediction")}, requires_safety_checker=False)
    v_teacher = dataclasses.replace(tiny_teacher, pipe=v_pipe)
    assert isinstance(v_teacher, Teacher) and v_teacher.prediction_type == "v_prediction"
    cfg = SamplerConfig(num_inference_steps=3, feature_layers=())
    results, info = sample_trajectories(v_teacher, REQS, cfg)
    assert info.prediction_type == "v_prediction"
    np.testing.assert_allclose(np.stack([r.latents[-1] for r in results]),
                               _pipeline_latents(v_teacher, cfg, REQS, 7.5), rtol=0, atol=1e-6)


def test_final_latent_equals_sdxl_pipeline(tiny_xl_teacher):
    cfg = SamplerConfig(num_inference_steps=3, guidance_scale=5.0, feature_layers=())
    results, info = sample_trajectories(tiny_xl_teacher, REQS, cfg)
    ref = _pipeline_latents(tiny_xl_teacher, cfg, REQS, 5.0)
    np.testing.assert_allclose(np.stack([r.latents[-1] for r in results]), ref, rtol=0, atol=1e-6)
    r = results[0]
    assert r.pooled_prompt_embeds.shape == (32,)
    np.testing.assert_array_equal(r.add_time_ids, [128, 128, 0, 0, 128, 128])  # (orig h, w, crop top, left, target h, w)
    assert r.prompt_embeds.shape == (77, 64)  # both encoders' penultimate states, concatenated
    assert not info.negative_prompt_embeds.any()  # SDXL: zeros for the empty prompt (force_zeros_for_empty_prompt)


def test_recorded_predictions_and_features_equal_a_direct_unet_call(tiny_teacher):
    layers = ("down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1")
    cfg = SamplerConfig(num_inference_steps=5, record_steps=(0, 2, 4), feature_layers=layers, num_feature_steps=2)
    results, info = sample_trajectories(tiny_teacher, REQS, cfg)
    unet, r = tiny_teacher.unet, results[1]
    assert all(not m._forward_hooks for m in unet.modules()), "sampler left a hook behind"
    assert set(r.feature_steps) <= {0, 2, 4} and len(r.feature_steps) == 2
    # Re-run the conditional branch of one feature step alone, capturing block outputs ourselves.
    step = r.feature_steps[-1]
    row = info.recorded_steps.index(step)
    t = info.timesteps[step]
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: seen.__setitem__(n, o[0] if isinstance(o, tuple) else o))
             for n, m in resolve_modules(unet, layers).items()]
    with torch.no_grad():
        pred = unet(torch.from_numpy(r.latents[row])[None], t, encoder_hidden_states=torch.from_numpy(r.prompt_embeds)[None]).sample
    for h in hooks:
        h.remove()
    np.testing.assert_allclose(r.pred_cond[row], pred[0].numpy(), atol=1e-5)
    for name in layers:
        assert r.feats[name].shape == (2,) + tuple(seen[name].shape[1:])
        np.testing.assert_allclose(r.feats[name][1], seen[name][0].numpy(), atol=1e-5)
    assert r.feats["down_blocks.0"].shape[1:] == (32, 8, 8) and r.feats["up_blocks.1"].shape[1:] == (32, 16, 16)


def test_same_inputs_twice_are_bitwise_identical(tiny_teacher):
    cfg = SamplerConfig(num_inference_steps=3, guidance_range=(2.0, 14.0), num_feature_steps=1, save_image=True)
    a, _ = sample_trajectories(tiny_teacher, REQS, cfg)
    b, _ = sample_trajectories(tiny_teacher, REQS, cfg)
    for x, y in zip(a, b):
        for f in ("noise", "latents", "pred_cond", "pred_uncond", "prompt_embeds", "image"):
            assert np.array_equal(getattr(x, f), getattr(y, f)), f
        assert x.guidance_scale == y.guidance_scale and x.feature_steps == y.feature_steps
        assert all(np.array_equal(x.feats[k], y.feats[k]) for k in x.feats)


def test_sample_does_not_depend_on_its_batch(tiny_teacher):
    cfg = SamplerConfig(num_inference_steps=3, guidance_range=(2.0, 14.0), num_feature_steps=1)
    alone, _ = sample_trajectories(tiny_teacher, [REQS[1]], cfg)
    others = [SampleRequest(f"x{i}-s0", f"filler prompt number {i}", 100 + i) for i in range(3)]
    batched, _ = sample_trajectories(tiny_teacher, others[:2] + [REQS[1]] + others[2:], cfg)
    a, b = alone[0], batched[2]
    assert a.guidance_scale == b.guidance_scale and a.feature_steps == b.feature_steps
    np.testing.assert_array_equal(a.noise, b.noise)  # noise comes from the sample's own generator
    np.testing.assert_allclose(a.latents, b.latents, atol=1e-5)
    np.testing.assert_allclose(a.feats["mid_block"], b.feats["mid_block"], atol=1e-5)


def test_per_sample_guidance_range_matches_pipeline_at_that_scale(tiny_teacher):
    cfg = SamplerConfig(num_inference_steps=3, guidance_range=(2.0, 14.0), feature_layers=())
    results, _ = sample_trajectories(tiny_teacher, REQS, cfg)
    scales = [r.guidance_scale for r in results]
    assert all(2.0 <= s <= 14.0 for s in scales) and scales[0] != scales[1]
    assert scales == [draw_guidance(cfg, r.seed) for r in REQS]
    for req, res in zip(REQS, results):
        ref = _pipeline_latents(tiny_teacher, cfg, [req], res.guidance_scale)
        # batch of 2 (ours) vs batch of 1 (pipeline): BLAS blocking differs, so float tolerance
        np.testing.assert_allclose(res.latents[-1], ref[0], rtol=1e-5, atol=1e-4)


def test_decoded_image_matches_pipeline_output(tiny_teacher):
    cfg = SamplerConfig(num_inference_steps=2, feature_layers=(), save_image=True)
    results, _ = sample_trajectories(tiny_teacher, REQS[:1], cfg)
    pipe = tiny_teacher.pipe
    pipe.scheduler = make_scheduler(tiny_teacher, "ddim")
    ref = pipe(REQS[0].prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(REQS[0].seed),
               output_type="np").images[0]
    assert results[0].image.shape == (128, 128, 3) and results[0].image.dtype == np.uint8
    assert np.abs(results[0].image.astype(int) - np.round(ref * 255).astype(int)).max() <= 1


def test_bad_sampler_settings_fail_naming_the_value(tiny_teacher):
    with pytest.raises(ValueError, match="scheduler 'heun'"):
        SamplerConfig(scheduler="heun")
    with pytest.raises(ValueError, match=r"record_steps=\(7,\)"):
        SamplerConfig(num_inference_steps=4, record_steps=(7,))
    with pytest.raises(ValueError, match="height=100"):
        sample_trajectories(tiny_teacher, REQS, SamplerConfig(num_inference_steps=1, height=100, feature_layers=()))
    with pytest.raises(ValueError, match="'down_blocks.9'"):
        sample_trajectories(tiny_teacher, REQS, SamplerConfig(num_inference_steps=2, feature_layers=("down_blocks.9",), num_feature_steps=1))


def test_long_prompt_reports_token_count(tiny_teacher):
    long = SampleRequest("l-s0", " ".join(["word"] * 100), 1)
    results, _ = sample_trajectories(tiny_teacher, [long], SamplerConfig(num_inference_steps=1, feature_layers=()))
    assert results[0].num_tokens == 102  # BOS + 100 + EOS: over 77, truncated by the pipeline's encoder
