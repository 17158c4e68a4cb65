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

pytestmark = pytest.mark.numerics  # float32 tolerances: rerun on AVX2 kernels (CI)

REQS = [SampleRequest("a-s0", "a red cube on a table", 11), SampleRequest("b-s0", "two blue birds", 22)]


def _variant(teacher, scheduler_cls=None, **config):
    """``teacher`` with a new pipeline object whose scheduler config is changed (the fixture stays as it is)."""
    import diffusers

    pipe = teacher.pipe
    cls = getattr(diffusers, scheduler_cls) if scheduler_cls else type(pipe.scheduler)
    extra = {} if teacher.is_xl else {"requires_safety_checker": False}
    new = type(pipe)(**{**pipe.components, "scheduler": cls.from_config(pipe.scheduler.config, **config)}, **extra)
    return dataclasses.replace(teacher, pipe=new)


def _pipeline_trajectory(teacher, cfg, reqs, guidance):
    """diffusers' own pipeline: (latents after each step, the output latents). Does not touch ``teacher``."""
    scheduler = make_scheduler(teacher, cfg.scheduler)
    pipe = type(teacher.pipe)(**{**teacher.pipe.components, "scheduler": scheduler},
                              **({} if teacher.is_xl else {"requires_safety_checker": False}))
    gens = [torch.Generator("cpu").manual_seed(r.seed) for r in reqs]
    after = []

    def keep(pipe, i, t, kwargs):
        after.append(kwargs["latents"].float().clone())
        return kwargs

    out = pipe([r.prompt for r in reqs], num_inference_steps=cfg.num_inference_steps, guidance_scale=guidance,
               generator=gens, output_type="latent", eta=cfg.eta, callback_on_step_end=keep)
    return after, out.images.float()


def _pipeline_latents(teacher, cfg, reqs, guidance):
    return _pipeline_trajectory(teacher, cfg, reqs, guidance)[1].numpy()


def _model_input(teacher, cfg, x, i):
    """diffusers' ``scale_model_input`` of state ``x`` at step ``i``, from a fresh scheduler (the
    pipeline's Euler latents are the unscaled state; the record holds the UNet's input)."""
    sch = make_scheduler(teacher, cfg.scheduler)
    sch.set_timesteps(cfg.num_inference_steps)
    return sch.scale_model_input(x, sch.timesteps[i]), float(sch.init_noise_sigma)


def _assert_every_latent_equals_pipeline(teacher, cfg, guidance, tol_scale=1e-6):
    """Every recorded latent against the pipeline's trajectory, scaled as the UNet saw it.

    Same batch, same shapes, same ops on the same machine: the kernels are the same, so only a
    last-bit difference is allowed (1e-6 of the latents' scale), except where ``tol_scale`` says why.
    """
    results, info = sample_trajectories(teacher, REQS, cfg)
    after, final = _pipeline_trajectory(teacher, cfg, REQS, guidance)
    S = cfg.num_inference_steps
    noise = torch.from_numpy(np.stack([r.noise for r in results]))
    init_sigma = _model_input(teacher, cfg, noise, 0)[1]
    ref = [_model_input(teacher, cfg, noise * init_sigma, 0)[0]]
    ref += [_model_input(teacher, cfg, after[i - 1], i)[0] for i in range(1, S)] + [final]
    ours = np.stack([r.latents for r in results], axis=1)  # (S + 1, batch, 4, h, w)
    assert ours.shape[0] == S + 1 == len(ref)
    for i, (o, r) in enumerate(zip(ours, ref)):
        scale = max(1.0, float(np.abs(r.numpy()).max()))
        np.testing.assert_allclose(o, r.numpy(), rtol=0, atol=tol_scale * scale, err_msg=f"latent {i}")
    return results, info


SCHEDULER_CASES = {  # name -> (sampler scheduler, scheduler class to swap in, its config overrides, steps)
    "ddim": ("ddim", None, {}, 4),
    "euler": ("euler", None, {}, 4),
    "euler-linspace": ("euler", "EulerDiscreteScheduler", {"timestep_spacing": "linspace"}, 6),  # 999, 799.2, ...
    "euler-karras": ("euler", "EulerDiscreteScheduler", {"use_karras_sigmas": True}, 4),
    "dpm++": ("dpm++", None, {}, 4),
}


@pytest.mark.parametrize("case", list(SCHEDULER_CASES))
def test_every_latent_equals_stable_diffusion_pipeline(tiny_teacher, case):
    name, cls, overrides, steps = SCHEDULER_CASES[case]
    teacher = _variant(tiny_teacher, cls, **overrides) if cls else tiny_teacher
    cfg = SamplerConfig(num_inference_steps=steps, scheduler=name, guidance_scale=6.0, feature_layers=())
    results, info = _assert_every_latent_equals_pipeline(teacher, cfg, 6.0)
    assert info.scheduler_class == {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler",
                                    "dpm++": "DPMSolverMultistepScheduler"}[name]
    assert len(info.timesteps) == steps and results[0].latents.shape[0] == steps + 1
    # The record's latents are VP z_t: unit variance at the first step whatever the scheduler
    # (Euler's unscaled state has std ~ sigma_max: 4 to 15 here).
    assert 0.9 < float(np.std(results[0].latents[0])) < 1.1
    sched = make_scheduler(teacher, name)
    sched.set_timesteps(steps)
    assert info.timesteps == [float(t) for t in sched.timesteps]  # exact, not int()
    if case == "euler-linspace":
        assert info.timesteps[1] == pytest.approx(799.2, abs=1e-3)
    if case == "euler-karras":
        assert info.timesteps[1] != int(info.timesteps[1])


@pytest.mark.parametrize("name", ["ddim", "euler", "dpm++"])
def test_every_latent_equals_pipeline_for_v_prediction_teacher(tiny_teacher, name):
    v_teacher = _variant(tiny_teacher, prediction_type="v_prediction")
    assert v_teacher.prediction_type == "v_prediction"
    cfg = SamplerConfig(num_inference_steps=3, scheduler=name, feature_layers=())
    _, info = _assert_every_latent_equals_pipeline(v_teacher, cfg, 7.5)
    assert info.prediction_type == "v_prediction"


@pytest.mark.parametrize("name", ["ddim", "euler", "dpm++"])
def test_every_latent_equals_sdxl_pipeline(tiny_xl_teacher, name):
    cfg = SamplerConfig(num_inference_steps=3, scheduler=name, guidance_scale=5.0, feature_layers=())
    results, info = _assert_every_latent_equals_pipeline(tiny_xl_teacher, cfg, 5.0)
    r = results[0]
    assert r.pooled_prompt_embeds.shape == (32,)
    np.testing.assert_array_equal(r.add_time_ids, [128, 128, 0, 0, 128, 128])  # (orig h, w, crop top, left, target h, w)
    assert r.prompt_embeds.shape == (77, 64)  # both encoders' penultimate states, concatenated
    assert not info.negative_prompt_embeds.any()  # SDXL: zeros for the empty prompt (force_zeros_for_empty_prompt)


@pytest.mark.parametrize("w", [0.5, 1.0])
def test_guidance_at_most_one_runs_without_cfg_as_diffusers(tiny_teacher, w):
    # The pipeline then runs the conditional branch alone (batch 2, ours 4): float32 kernels differ
    # with the batch by a few ulps per op, ~1e-6 relative per UNet call here; 1e-4 of the scale
    # leaves room for that, three orders below what the CFG formula at w = 0.5 would change (0.15).
    cfg = SamplerConfig(num_inference_steps=3, guidance_scale=w, feature_layers=())
    results, _ = _assert_every_latent_equals_pipeline(tiny_teacher, cfg, w, tol_scale=1e-4)
    assert all(r.guidance_scale == 1.0 for r in results)  # recorded: the weight applied


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
    assert info.noise_schedule.recorded_steps == [0, 2, 4]
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: seen.__setitem__(n, o[0] if isinstance(o, tuple) else o))
             for n, m in resolve_modules(unet, layers).items()]
    with torch.no_grad():
        pred = unet(torch.from_numpy(r.latents[row])[None], t, encoder_hidden_states=torch.from_numpy(r.prompt_embeds)[None]).sample
    for h in hooks:
        h.remove()
    # Batch 1 here, 4 in the sampler: float32 kernels may block differently (a few ulps per op), so
    # 1e-5 of each tensor's scale (about 100 float32 ulps through the tiny UNet's ~20 layers).
    np.testing.assert_allclose(r.pred_cond[row], pred[0].numpy(), atol=1e-5 * max(1.0, np.abs(pred).max().item()))
    for name in layers:
        assert r.feats[name].shape == (2,) + tuple(seen[name].shape[1:])
        scale = max(1.0, seen[name].abs().max().item())
        np.testing.assert_allclose(r.feats[name][1], seen[name][0].numpy(), atol=1e-5 * scale)
    assert r.feats["down_blocks.0"].shape[1:] == (32, 8, 8) and r.feats["up_blocks.1"].shape[1:] == (32, 16, 16)


def test_same_inputs_twice_are_bitwise_identical(tiny_teacher):
    cfg = SamplerConfig(num_inference_steps=3, guidance_range=(2.0, 14.0), num_feature_steps=1, save_images=True)
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
    # Batch 1 against batch 5: the float32 kernels block (and on AVX2 vs AVX-512, vectorise) the
    # sums differently, so each UNet call may differ by ~1e-5 of its scale (about 100 ulps through
    # ~20 layers); CFG multiplies a prediction error by up to 1 + 2w, and it accumulates over the
    # steps. Tolerance: steps * (1 + 2w) * 1e-5 of the latents' scale (8e-4 of it at w = 14,
    # measured 1.8e-5 absolute on an AVX2 machine); a wrong noise, weight or row is O(1).
    w, steps = a.guidance_scale, cfg.num_inference_steps
    tol = steps * (1 + 2 * w) * 1e-5
    np.testing.assert_allclose(a.latents, b.latents, rtol=0, atol=tol * max(1.0, np.abs(a.latents).max()))
    feats = a.feats["mid_block"]
    np.testing.assert_allclose(feats, b.feats["mid_block"], rtol=0, atol=tol * max(1.0, np.abs(feats).max()))


def test_per_sample_guidance_range_matches_pipeline_at_that_scale(tiny_teacher):
    cfg = SamplerConfig(num_inference_steps=3, guidance_range=(2.0, 14.0), feature_layers=())
    results, _ = sample_trajectories(tiny_teacher, REQS, cfg)
    scales = [r.guidance_scale for r in results]
    assert all(2.0 <= s <= 14.0 for s in scales) and scales[0] != scales[1]
    assert scales == [draw_guidance(cfg, r.seed) for r in REQS]
    for req, res in zip(REQS, results):
        ref = _pipeline_latents(tiny_teacher, cfg, [req], res.guidance_scale)
        # batch of 2 (ours) vs batch of 1 (pipeline): float32 kernels block the sums differently;
        # the same bound as test_sample_does_not_depend_on_its_batch (steps * (1 + 2w) * 1e-5 of the scale)
        tol = cfg.num_inference_steps * (1 + 2 * res.guidance_scale) * 1e-5 * max(1.0, np.abs(ref[0]).max())
        np.testing.assert_allclose(res.latents[-1], ref[0], rtol=0, atol=tol)


def test_decoded_image_matches_pipeline_output(tiny_teacher):
    cfg = SamplerConfig(num_inference_steps=2, feature_layers=(), save_images=True)
    results, _ = sample_trajectories(tiny_teacher, REQS[:1], cfg)
    pipe = tiny_teacher.pipe
    pipe.scheduler = make_scheduler(tiny_teacher, "ddim")
    ref = pipe(REQS[0].prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(REQS[0].seed),
               output_type="np").images[0]
    assert results[0].image.shape == (128, 128, 3) and results[0].image.dtype == np.uint8
    assert np.abs(results[0].image.astype(int) - np.round(ref * 255).astype(int)).max() <= 1


def test_bad_sampler_settings_fail_naming_the_value(tiny_teacher):
    from core.errors import UserError

    with pytest.raises(UserError, match="scheduler 'heun'"):
        SamplerConfig(scheduler="heun")
    with pytest.raises(UserError, match="guidance_range=.-1.0, 3.0."):
        SamplerConfig(guidance_range=(-1.0, 3.0))
    with pytest.raises(UserError, match="guidance_scale=-2"):
        SamplerConfig(guidance_scale=-2.0)
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


def test_non_finite_decoded_image_is_flagged_not_cast(tiny_teacher):
    import warnings

    from shards import record

    cfg = SamplerConfig(num_inference_steps=1, feature_layers=(), save_images=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # numpy warns when it casts NaN to uint8
        results, _ = sample_trajectories(tiny_teacher, [SampleRequest("n-s0", "a dog", 1, 1e38), REQS[0]], cfg)
    bad, good = results
    assert bad.image_error == "non_finite_image" and bad.image.dtype == np.uint8 and not bad.image.any()
    assert good.image_error is None and good.image.any()
    # One step at w = 1e38: the final latent is huge (~1e35) but finite, its decoded image is NaN.
    assert np.isfinite(bad.latents).all()
    with pytest.raises(record.BadRecord) as err:
        record.encode_sample(bad, {})
    assert err.value.reason == "non_finite_image"
    nan = bad.latents.copy()
    nan[-1, 0, 0, 0] = np.nan
    with pytest.raises(record.BadRecord) as err:  # a non-finite trajectory is reported as the cause
        record.encode_sample(dataclasses.replace(bad, latents=nan), {})
    assert err.value.reason == "non_finite"


def test_nan_or_overflowing_guidance_gives_a_non_finite_trajectory_not_an_unguided_one(tiny_teacher):
    from teachers.sampler import applied_guidance

    assert applied_guidance(0.5) == applied_guidance(1.0) == 1.0 and applied_guidance(7.3) == float(np.float32(7.3))
    assert np.isnan(applied_guidance(float("nan"))) and applied_guidance(1e39) == float("inf")
    cfg = SamplerConfig(num_inference_steps=2, feature_layers=())
    results, _ = sample_trajectories(tiny_teacher, [SampleRequest("n-s0", "a dog", 1, float("nan"))], cfg)
    assert not np.isfinite(results[0].latents[-1]).all()
