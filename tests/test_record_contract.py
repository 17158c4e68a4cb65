"""The record means the same for every scheduler: offline targets equal online ones, and the
recorded latents sit where ``shards.record.noise_levels`` says."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from core.errors import UserError
from shards import record
from teachers.sampler import SampleRequest, SamplerConfig, sample_trajectories

pytestmark = pytest.mark.numerics  # float32 tolerances: rerun on AVX2 kernels (CI)

REQS = [SampleRequest("a-s0", "a red cube on a table", 11), SampleRequest("b-s0", "two blue birds", 22)]

CASES = {  # id -> (sampler scheduler, scheduler class swapped into the teacher, config overrides)
    "ddim": ("ddim", None, {}),
    "euler-linspace": ("euler", "EulerDiscreteScheduler", {"timestep_spacing": "linspace"}),
    "euler-karras": ("euler", "EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    "dpm++": ("dpm++", None, {}),
}


def _variant(teacher, scheduler_cls=None, **config):
    import diffusers

    pipe = teacher.pipe
    cls = getattr(diffusers, scheduler_cls) if scheduler_cls else type(pipe.scheduler)
    new = type(pipe)(**{**pipe.components, "scheduler": cls.from_config(pipe.scheduler.config, **config)},
                     requires_safety_checker=False)
    return dataclasses.replace(teacher, pipe=new)


def _teacher(tiny_teacher, case, prediction_type):
    _, cls, overrides = CASES[case]
    import diffusers

    base = type(tiny_teacher.pipe.scheduler) if cls is None else getattr(diffusers, cls)
    return _variant(tiny_teacher, base.__name__, prediction_type=prediction_type, **overrides)


def _unet(teacher, z, t, embeds):
    with torch.no_grad():
        return teacher.unet(torch.from_numpy(np.asarray(z, np.float32)), torch.tensor(t, dtype=torch.float32),
                            encoder_hidden_states=torch.from_numpy(np.array(embeds, np.float32))).sample.numpy()


def _x0_eps(pred, z, alpha, sigma, prediction_type):
    """The clean latent and the noise a prediction implies at z = alpha x0 + sigma eps (float64)."""
    if prediction_type == "epsilon":
        return (z - sigma * pred) / alpha, pred
    return alpha * z - sigma * pred, sigma * z + alpha * pred  # v = alpha eps - sigma x0


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("case", list(CASES))
def test_offline_targets_equal_online_targets(tiny_teacher, case, prediction_type):
    """Re-run the teacher on each recorded latent at its recorded float timestep with the record's
    embeddings, as a trainer's online teacher does, and compare with the recorded predictions; and
    check that each recorded latent sits at the recorded (alpha, sigma) of the trajectory."""
    teacher = _teacher(tiny_teacher, case, prediction_type)
    cfg = SamplerConfig(num_inference_steps=3, scheduler=CASES[case][0], guidance_scale=6.0, feature_layers=())
    results, info = sample_trajectories(teacher, REQS[:1], cfg)
    res, negative = results[0], info.negative_prompt_embeds[None]
    exact = {}  # step -> online prediction on the float32 latent (the float16 check's reference)
    for storage in ("float32", "float16"):
        rec = record.decode_sample(record.encode_sample(res, {"scheduler_class": info.scheduler_class},
                                                        storage_dtype=storage)[0])
        timesteps, alphas, sigmas = record.noise_levels(rec.meta)
        assert timesteps.dtype == alphas.dtype == sigmas.dtype == np.float64 and timesteps.shape == (3,)
        np.testing.assert_allclose(alphas ** 2 + sigmas ** 2, 1.0, rtol=1e-12)  # variance-preserving
        cond = rec.prompt_embeds[None].astype(np.float32)
        for i, t in enumerate(timesteps):
            z = rec.latents[i][None].astype(np.float32)
            got_c, got_u = _unet(teacher, z, t, cond), _unet(teacher, z, t, negative)
            want_c, want_u = rec.pred_cond[i][None].astype(np.float32), rec.pred_uncond[i][None].astype(np.float32)
            scale = max(1.0, float(np.abs(want_c).max()), float(np.abs(want_u).max()))
            if storage == "float32":
                # Exact record: the online call differs from the sampler's only in batch size
                # (1 vs 2): float32 kernels, ~1e-6 of the scale per call here; 1e-5 bounds it.
                # A timestep truncated to an integer moves these by > 1e-4, unscaled latents by ~1.
                exact[i] = got_c
                tol = 1e-5 * scale
            else:
                # float16 storage rounds each input by <= 2^-11 of its value; that moves the output
                # by what re-running on the float32 latent shows (twice it, for either branch),
                # and the stored prediction is rounded by <= 2^-11 of its own value.
                tol = 2 * np.abs(got_c - exact[i]).max() + 2 ** -11 * scale + 1e-5 * scale
            np.testing.assert_allclose(got_c, want_c, rtol=0, atol=tol, err_msg=f"{storage} cond step {i}")
            np.testing.assert_allclose(got_u, want_u, rtol=0, atol=tol, err_msg=f"{storage} uncond step {i}")
    _assert_steps_are_alpha_x0_plus_sigma_eps(res, CASES[case][0], prediction_type)


def _assert_steps_are_alpha_x0_plus_sigma_eps(res, scheduler, prediction_type):
    """DDIM (eta 0), Euler and first-order DPM-Solver++ steps all map z_i to
    z_{i+1} = alpha_{i+1} x0_i + sigma_{i+1} eps_i, with (x0_i, eps_i) implied by the guided
    prediction at step i (Song et al. 2021, DDIM eq. 12; Karras et al. 2022, EDM eq. 5 after the VP
    scaling; Lu et al. 2022, DPM-Solver++(1) = DDIM). The recorded latents, alphas and sigmas must
    satisfy it, in float64 from the float32 record."""
    meta = json.loads(record.encode_sample(res, {}, storage_dtype="float32")[0]["json"])
    _, alphas, sigmas = record.noise_levels(meta)
    fa, fs = record.final_noise_level(meta)
    alphas, sigmas = np.append(alphas, fa), np.append(sigmas, fs)
    z = res.latents.astype(np.float64)
    # The first input is the noise times a factor between sigma_0 and 1 (x0 = 0 at the start: the
    # state is init_noise_sigma * noise, which diffusers sets to sigma_max or sqrt(sigma_max^2 + 1)).
    c = float((z[0] * res.noise).sum() / (res.noise.astype(np.float64) ** 2).sum())
    assert sigmas[0] - 1e-6 <= c <= 1 + 1e-6
    np.testing.assert_allclose(z[0], c * res.noise, rtol=0, atol=1e-5)
    w = meta["guidance_scale"]
    # DPM-Solver++(2M) takes second-order steps in the middle; its first and last are first order.
    steps = [0, len(z) - 2] if scheduler == "dpm++" else range(len(z) - 1)
    for i in steps:
        guided = res.pred_uncond[i] + w * (res.pred_cond[i].astype(np.float64) - res.pred_uncond[i])
        x0, eps = _x0_eps(guided, z[i], alphas[i], sigmas[i], prediction_type)
        want = alphas[i + 1] * x0 + sigmas[i + 1] * eps
        # float32 sampler arithmetic over one step: ~1e-6 of the scale; 1e-5 bounds it
        np.testing.assert_allclose(z[i + 1], want, rtol=0, atol=1e-5 * max(1.0, np.abs(want).max()),
                                   err_msg=f"step {i}")


def _schema1_meta(cls="DDIMScheduler", **config):
    base = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "set_alpha_to_one": False, "steps_offset": 1, "prediction_type": "epsilon", "timestep_spacing": "leading"}
    return {"schema_version": 1, "key": "old-s0", "scheduler_class": cls, "scheduler_config": {**base, **config},
            "timesteps": [751, 501, 251, 1], "recorded_steps": [0, 2, 3]}


def test_schema1_ddim_and_dpm_records_convert_from_their_scheduler_config(tiny_teacher):
    import diffusers

    for cls in ("DDIMScheduler", "DPMSolverMultistepScheduler"):
        meta = _schema1_meta(cls)
        t, a, s = record.noise_levels(meta)
        abar = diffusers.DDIMScheduler.from_config(meta["scheduler_config"]).alphas_cumprod.double().numpy()
        np.testing.assert_array_equal(t, [751.0, 251.0, 1.0])
        np.testing.assert_allclose(a, np.sqrt(abar[[751, 251, 1]]), rtol=1e-12)
        np.testing.assert_allclose(s, np.sqrt(1 - abar[[751, 251, 1]]), rtol=1e-12)
    fa, fs = record.final_noise_level(_schema1_meta())
    assert fa == pytest.approx(np.sqrt(abar[0])) and fs == pytest.approx(np.sqrt(1 - abar[0]))
    # The sampler's schema-2 values for the same DDIM schedule agree with the schema-1 conversion.
    cfg = SamplerConfig(num_inference_steps=4, record_steps=(0, 2, 3), feature_layers=())
    results, info = sample_trajectories(tiny_teacher, REQS[:1], cfg)
    meta2 = json.loads(record.encode_sample(results[0], {})[0]["json"])
    for x, y in zip(record.noise_levels(meta2), record.noise_levels(_schema1_meta())):
        np.testing.assert_allclose(x, y, rtol=1e-12)
    assert record.final_noise_level(meta2) == pytest.approx(record.final_noise_level(_schema1_meta()))


def test_schema1_euler_and_unknown_schemas_are_refused_in_one_line():
    with pytest.raises(UserError, match="EulerDiscreteScheduler.*re-dump") as err:
        record.noise_levels(_schema1_meta("EulerDiscreteScheduler"))
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="re-dump"):
        record.noise_levels(_schema1_meta("DPMSolverMultistepScheduler", use_karras_sigmas=True))
    with pytest.raises(UserError, match="schema_version 99; supported: 1, 2"):
        record.noise_levels(dict(_schema1_meta(), schema_version=99))
    with pytest.raises(UserError, match="2 alphas and 2 sigmas for 3 recorded steps"):
        record.noise_levels(dict(_schema1_meta(), schema_version=2, alphas=[0.1, 0.2], sigmas=[0.9, 0.9]))


def test_recorded_guidance_is_the_weight_applied_in_bfloat16(tiny_teacher):
    """bfloat16 would round 7.3 to 7.3125; CFG runs in float32 and records float32(7.3)."""
    from teachers.load import load_teacher

    bf16 = load_teacher("tiny", dtype="bfloat16")
    cfg = SamplerConfig(num_inference_steps=2, feature_layers=())
    results, _ = sample_trajectories(bf16, [SampleRequest("a-s0", "a cat", 3, 7.3)], cfg)
    res = results[0]
    assert res.guidance_scale == float(np.float32(7.3))
    # Re-applying the recorded weight in float32 to the recorded (bf16-exact) predictions gives the
    # step the sampler took: DDIM from z_0 with that guided epsilon lands on z_1.
    meta = json.loads(record.encode_sample(res, {}, storage_dtype="float32")[0]["json"])
    _, a, s = record.noise_levels(meta)
    w = np.float32(meta["guidance_scale"])
    guided = res.pred_uncond[0] + w * (res.pred_cond[0] - res.pred_uncond[0])
    guided = torch.from_numpy(guided).to(torch.bfloat16).double().numpy()  # the sampler hands bf16 to step()
    x0 = (res.latents[0] - s[0] * guided) / a[0]
    want = a[1] * x0 + s[1] * guided
    # bfloat16 state: the step's result is rounded to 2^-8 of its value
    np.testing.assert_allclose(res.latents[1], want, rtol=0, atol=2 ** -7 * np.abs(want).max())


def test_a_euler_dump_through_the_job_reads_back_as_vp_latents_with_exact_targets(tiny_teacher, tmp_path):
    """The real writer path (the Beam dump job): an Euler dump's records, read as the trainer reads
    them and converted with noise_levels, give the online teacher's predictions; its dataset.json
    and indexes validate against shards.schema."""
    from conftest import run_dump
    from shards.loader import dataset_shards, read_dataset, record_pipeline
    from shards import schema
    from shards import verify as shard_verify

    out = run_dump(tmp_path, ["a photo of a cat", "a red cube"], scheduler="euler", num_inference_steps=3,
                   samples_per_shard=2, batch_size=2, feature_layers="mid_block", num_feature_steps=1,
                   storage_dtype="float32")
    info = schema.read_dataset_info(str(out))
    assert info.schema_version == record.SCHEMA_VERSION == 3 and info.scheduler_class == "EulerDiscreteScheduler"
    assert record.noise_process(info.to_dict()) == record.VARIANCE_PRESERVING  # an epsilon teacher's dump
    index = schema.ShardIndex.read(str(out), 0)
    assert index.checksum_algorithm == "crc32" and len(index.checksums) == index.count == 2
    assert shard_verify.verify_shard(str(out), 0, recipe_hash=info.recipe_hash) == []
    _, shared = read_dataset(str(out))
    negative = shared["negative_prompt_embeds"][None]
    for rec in record_pipeline(dataset_shards(str(out))):
        timesteps, alphas, sigmas = record.noise_levels(rec.meta)
        assert 0.9 < float(np.std(rec.latents[0])) < 1.1  # VP z_t, not Euler's state (std ~ 4 here)
        for i, t in enumerate(timesteps):
            z = rec.latents[i][None]
            for embeds, want in ((rec.prompt_embeds[None], rec.pred_cond[i]), (negative, rec.pred_uncond[i])):
                got = _unet(tiny_teacher, z, t, embeds)[0]
                # batch 1 here, 2 x 2 in the dump: float32 kernels, 1e-5 of the scale (see above)
                np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * max(1.0, np.abs(want).max()))


@pytest.mark.parametrize("scheduler", ["euler", "ddim"])
def test_euler_and_ddim_dumps_train_to_the_same_offline_online_agreement(tiny_teacher, tmp_path, scheduler):
    """Issue 19's must-show: the same prompts dumped with Euler and with DDIM (float16 storage, as
    shipped). The trainer's offline targets (``training_batch``: the recorded pred_cond/pred_uncond at
    the recorded z_t, t) equal its online-teacher targets (``students.distill.recipes.online_targets`` at
    that batch's z, t) within 1e-3 of their scale, for both. The bound: float16 storage rounds each
    target and each z_t by at most 2**-11 ~ 4.9e-4 relative; float32 UNet arithmetic adds ~1e-6."""
    from conftest import run_dump
    from shards.loader import dataset_shards, read_dataset, record_pipeline
    from students.distill.batches import training_batch
    from students.distill.recipes import get_recipe, online_targets

    out = run_dump(tmp_path, ["a photo of a cat", "a red cube on a table"], scheduler=scheduler, samples_per_shard=2,
                   batch_size=2, feature_layers="")
    dataset, shared = read_dataset(str(out))
    records = list(record_pipeline(dataset_shards(str(out))))
    assert len(records) == 2 and records[0].meta["scheduler_class"] == dataset.scheduler_class
    recipe = get_recipe("output_kd")
    seen = set()
    for epoch in range(4):  # rows drawn per (key, epoch): cover several recorded steps
        data = training_batch(records, shared["negative_prompt_embeds"], recipe, seed=0, epoch=epoch,
                              scheduler_config=dataset.scheduler_config)
        batch, offline = data["batch"], data["targets"]
        seen |= {float(t) for t in batch["t"]}
        with torch.no_grad():
            online = online_targets(tiny_teacher.unet, batch["z"], batch["t"], batch["cond"], batch["uncond"], [])
        for name in ("pred_cond", "pred_uncond"):
            scale = float(online[name].abs().max())
            err = float((offline[name].float() - online[name]).abs().max())
            assert err <= 1e-3 * scale, (scheduler, epoch, name, err, scale)
    assert len(seen) >= 2
