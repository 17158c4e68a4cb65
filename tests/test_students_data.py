"""The trainer's view of the record: ``check_sample`` (one sample), ``noise_levels`` (the recorded
latents' noise), the step-distillation rows, and ``training_batch`` built from them."""

import dataclasses
import zlib

import numpy as np
import pytest
import torch

from shards import loader as SD
from students.distill import batches
from shards import record, schema
from test_record_and_shards import fake_result

DDIM = {"beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
        "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": False, "steps_offset": 1,
        "timestep_spacing": "leading"}


def abar64():
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2  # SD's scaled_linear
    return np.cumprod(1 - betas)


def sample(key="k-s0", **meta):
    # schema 2: the record carries the VP noise levels of its recorded rows (here DDIM's at 751, 251, 1)
    a = np.sqrt(abar64()[[751, 251, 1]])
    levels = {"alphas": a.tolist(), "sigmas": np.sqrt(1 - a**2).tolist(), "final_alpha": float(np.sqrt(abar64()[0])),
              "final_sigma": float(np.sqrt(1 - abar64()[0]))}
    raw, _ = record.encode_sample(fake_result(key), {"timesteps": [751, 501, 251, 1], "recorded_steps": [0, 2, 3],
                                                     "num_inference_steps": 4, **levels, **meta})
    return raw


def test_noise_levels_are_the_schedule_at_the_recorded_timesteps():
    meta = {"timesteps": [751, 501, 251, 1], "recorded_steps": [0, 2, 3]}
    t, a, s = SD.noise_levels(meta, DDIM)
    assert t.dtype == a.dtype == s.dtype == np.float64 and t.shape == a.shape == s.shape == (3,)
    assert t.tolist() == [751.0, 251.0, 1.0]
    # diffusers builds the schedule in float32: equal to the float64 formula to float32 rounding
    np.testing.assert_allclose(a**2, abar64()[[751, 251, 1]], rtol=1e-6)
    np.testing.assert_allclose(a**2 + s**2, 1.0, rtol=1e-12)
    fa, fs = SD.final_noise_level(DDIM)
    assert fa**2 == pytest.approx(abar64()[0], rel=1e-6) and fa**2 + fs**2 == pytest.approx(1.0)
    assert SD.final_noise_level(dict(DDIM, set_alpha_to_one=True)) == (1.0, 0.0)


def test_training_batch_takes_noise_levels_and_rows_from_one_place():
    from students.distill.recipes import get_recipe

    recs = [SD.check_sample(sample(f"k{i}-s0")) for i in range(4)]
    recipe = get_recipe("output_kd")
    data = batches.training_batch(recs, np.zeros((77, 32), np.float32), recipe, seed=0, epoch=0, scheduler_config=DDIM)
    batch = data["batch"]
    for i, rec in enumerate(recs):
        row, _ = batches.rows_for(rec.meta, recipe, 0, 0, rec.key)
        t, a, s = SD.noise_levels(rec.meta, DDIM)
        assert float(batch["t"][i]) == t[row] and float(batch["alpha"][i]) == pytest.approx(a[row], rel=1e-7)
        assert float(batch["sigma"][i]) == pytest.approx(s[row], rel=1e-7)
        assert torch.equal(batch["z"][i], torch.from_numpy(rec.latents[row].astype(np.float32)))


@pytest.mark.parametrize("teacher_steps,student_steps", [(8, 8), (16, 8), (50, 8), (4, 8), (40, 8)])
def test_step_rows_are_the_rows_the_trainer_draws(teacher_steps, student_steps):
    from students.distill.recipes import get_recipe

    recipe = get_recipe("snapfusion_step", student_steps=student_steps)
    meta = {"recorded_steps": list(range(teacher_steps)), "num_inference_steps": teacher_steps}
    drawn = {batches.rows_for(meta, recipe, 0, 0, f"k{i}") for i in range(400)}
    k = batches.step_stride(teacher_steps, student_steps)
    assert drawn == {(r, r + k) for r in batches.step_rows(teacher_steps, student_steps)}
    assert max(r + k for r, _ in drawn) <= teacher_steps and min(r for r, _ in drawn) == 0


def test_check_sample_accepts_a_good_sample_and_names_each_fault():
    good = sample()
    rec = SD.check_sample(good)
    assert rec.key == "k-s0" and rec.latents.shape == (4, 4, 8, 8)

    def fails(raw, reason, index=None):
        with pytest.raises(record.BadRecord) as err:
            SD.check_sample(raw, index)
        assert err.value.reason == reason and "k-s0" in str(err.value)

    fails({k: v for k, v in good.items() if k != "pred_cond.npy"}, "missing_member")  # a truncated shard's last sample
    fails({k: v for k, v in good.items() if k != "feats.mid_block.npy"}, "missing_member")
    nan = record.load_npy(good["latents.npy"]).copy()
    nan[0, 0, 0, 0] = np.inf
    fails(dict(good, **{"latents.npy": record.npy_bytes(nan)}), "non_finite")
    fails(dict(good, **{"noise.npy": record.npy_bytes(np.zeros((4, 8, 9), np.float16))}), "corrupt_member")
    # the shard index's per-member CRC-32 (shards.schema.ShardIndex), checked before the decode
    sums = {ext: record.member_checksum(b) for ext, b in good.items() if not ext.startswith("__")}
    index = schema.ShardIndex(shard="000000.tar", count=1, keys=["k-s0"], bytes=0, sha256="", recipe_hash="r",
                              **schema.new_index_fields(), checksums=[sums])
    assert SD.check_sample(good, index).key == "k-s0" and SD.check_sample(good, index.to_dict()).key == "k-s0"
    flipped = bytearray(good["pred_uncond.npy"])
    flipped[-1] ^= 1
    fails(dict(good, **{"pred_uncond.npy": bytes(flipped)}), "checksum_mismatch", index)
    fails({k: v for k, v in good.items() if k != "pred_cond.npy"}, "missing_member", index)
    assert zlib.crc32(bytes(flipped)) != zlib.crc32(good["pred_uncond.npy"])
    # a NaN written with a consistent index: the checksum passes, the decode's finiteness check catches it
    planted = dict(good, **{"latents.npy": record.npy_bytes(nan)})
    consistent = dataclasses.replace(index, checksums=[{**sums, "latents.npy": record.member_checksum(planted["latents.npy"])}])
    fails(planted, "non_finite", consistent)


def test_read_stats_keep_keys_and_hand_pending_skips_over_once():
    stats = SD.ReadStats()
    stats.skip("non_finite", "x", key="a")
    stats.skip("checksum_mismatch", "y", key="b")
    assert [(s.key, s.reason) for s in stats.drain()] == [("a", "non_finite"), ("b", "checksum_mismatch")]
    assert stats.drain() == [] and stats.skipped == 2 and stats.reasons == {"non_finite": 1, "checksum_mismatch": 1}
    assert "a: non_finite" in stats.summary() and "b: checksum_mismatch" in stats.summary()
