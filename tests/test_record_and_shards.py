"""The record schema round trip, the shard writer's atomicity and determinism, the reader."""

import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from teachers import record, shards
from teachers.sampler import SampleResult
from students.data import ReadStats, dataset_shards, decode_records, record_pipeline


def fake_result(key="k-s0", seed=0, *, image=False, scale=1.0) -> SampleResult:
    rng = np.random.default_rng(seed)
    f16 = lambda *s: (rng.standard_normal(s) * scale).astype(np.float16)  # noqa: E731
    return SampleResult(
        key=key, prompt=f"prompt for {key} ü", seed=seed, guidance_scale=7.5, num_tokens=9,
        prompt_embeds=f16(77, 32), noise=f16(4, 8, 8), latents=f16(4, 4, 8, 8), pred_cond=f16(3, 4, 8, 8),
        pred_uncond=f16(3, 4, 8, 8), feature_steps=[0, 2], feats={"mid_block": f16(2, 64, 4, 4), "up_blocks.1": f16(2, 32, 8, 8)},
        image=rng.integers(0, 255, (16, 16, 3), dtype=np.uint8) if image else None,
    )


def test_round_trip_is_exact_for_float16(tmp_path):
    res = fake_result(image=True)
    sample, stats = record.encode_sample(res, {"teacher": "tiny"})
    assert stats == {"fp32_fallback": []}
    rec = record.decode_sample(sample)
    for name in ("prompt_embeds", "noise", "latents", "pred_cond", "pred_uncond"):
        assert getattr(rec, name).dtype == np.float16
        assert np.array_equal(getattr(rec, name), getattr(res, name))
    assert all(np.array_equal(rec.feats[k], res.feats[k]) for k in res.feats)
    assert rec.caption == res.prompt and rec.meta["teacher"] == "tiny" and rec.meta["feature_steps"] == [0, 2]
    assert rec.meta["array_shapes"]["latents"] == [4, 4, 8, 8]
    from PIL import Image
    import io
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(rec.image_png))), res.image)
    for data in sample.values():  # no member may need pickle
        if isinstance(data, bytes) and data[:6] == b"\x93NUMPY":
            np.load(__import__("io").BytesIO(data), allow_pickle=False)


def test_float16_overflow_is_stored_as_float32_and_counted():
    res = fake_result()
    big = res.pred_cond.astype(np.float32)
    big[0, 0, 0, 0] = 1e6  # beyond float16's 65504: would be inf
    res = dataclasses.replace(res, pred_cond=big)
    sample, stats = record.encode_sample(res, {})
    assert stats["fp32_fallback"] == ["pred_cond"]
    rec = record.decode_sample(sample)
    assert rec.pred_cond.dtype == np.float32 and rec.pred_cond[0, 0, 0, 0] == 1e6
    assert np.isfinite(rec.pred_cond).all() and rec.latents.dtype == np.float16


def test_non_finite_outputs_and_bad_keys_are_bad_records():
    res = fake_result()
    nan = res.latents.astype(np.float32)
    nan[1, 2, 3, 4] = np.nan
    with pytest.raises(record.BadRecord) as err:
        record.encode_sample(dataclasses.replace(res, latents=nan), {})
    assert err.value.reason == "non_finite"
    with pytest.raises(record.BadRecord, match="no dots"):
        record.encode_sample(dataclasses.replace(res, key="a.b"), {})
    sample, _ = record.encode_sample(res, {})
    meta = json.loads(sample["json"])
    meta["schema_version"] = 99
    with pytest.raises(record.BadRecord, match="schema 99"):
        record.decode_sample(dict(sample, json=json.dumps(meta).encode()))


def _write(out, index, keys, **kw):
    with shards.ShardWriter(str(out), index, recipe_hash="r1") as w:
        for i, key in enumerate(keys):
            w.write(record.encode_sample(fake_result(key, seed=hash(key) % 1000, **kw), {})[0])
    return w.index


def test_shards_are_deterministic_and_readable_by_stock_tools(tmp_path):
    a = _write(tmp_path / "a", 0, ["x-s0", "y-s0"])
    b = _write(tmp_path / "b", 0, ["x-s0", "y-s0"])
    data = (tmp_path / "a" / "000000.tar").read_bytes()
    assert data == (tmp_path / "b" / "000000.tar").read_bytes()
    assert a["sha256"] == hashlib.sha256(data).hexdigest() == b["sha256"] and a["bytes"] == len(data)
    assert a["keys"] == ["x-s0", "y-s0"] and a["count"] == 2
    listing = subprocess.run(["tar", "tvf", str(tmp_path / "a" / "000000.tar")], capture_output=True, text=True, check=True).stdout
    assert "x-s0.latents.npy" in listing and "0/0" in listing
    import webdataset as wds  # stock webdataset, none of our code
    got = [(s["__key__"], sorted(k for k in s if not k.startswith("__"))) for s in wds.WebDataset(str(tmp_path / "a" / "000000.tar"), shardshuffle=False)]
    assert [k for k, _ in got] == ["x-s0", "y-s0"]
    assert "feats.mid_block.npy" in got[0][1] and "latents.npy" in got[0][1]
    assert shards.verify_shard(str(tmp_path / "a"), 0) == []


def test_writer_killed_mid_shard_leaves_nothing_under_the_final_name(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {os.getcwd()!r}); sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_record_and_shards import fake_result
        from teachers import record, shards
        w = shards.ShardWriter({str(tmp_path)!r}, 3, recipe_hash="r")
        for i in range(5):
            w.write(record.encode_sample(fake_result(f"k{{i}}-s0", i), {{}})[0])
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    names = os.listdir(tmp_path)
    assert "000003.tar" not in names and "000003.json" not in names
    assert any(n.startswith(".000003.tar.tmp-") for n in names)  # the partial write, under a temporary name
    assert shards.list_indexes(str(tmp_path)) == []
    assert shards.verify_shard(str(tmp_path), 3) == ["000003.json missing"]


def test_exception_inside_writer_removes_the_temporary(tmp_path):
    with pytest.raises(RuntimeError):
        with shards.ShardWriter(str(tmp_path), 0, recipe_hash="r") as w:
            w.write(record.encode_sample(fake_result(), {})[0])
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_verify_names_a_corrupt_shard(tmp_path):
    from teachers.inspect import main

    _write(tmp_path, 0, ["a-s0"])
    _write(tmp_path, 1, ["b-s0"])
    assert main([str(tmp_path), "--verify"]) == 0
    path = tmp_path / "000001.tar"
    data = bytearray(path.read_bytes())
    data[2000] ^= 0xFF
    path.write_bytes(bytes(data))
    assert shards.verify_shard(str(tmp_path), 0) == []
    assert "sha256" in shards.verify_shard(str(tmp_path), 1)[0]
    assert main([str(tmp_path), "--verify"]) == 1


def test_reader_in_dataloader_with_two_workers_yields_every_key_once(tmp_path):
    keys = [f"p{i}-s{j}" for i in range(6) for j in range(2)]
    for s in range(3):
        _write(tmp_path, s, keys[s * 4 : (s + 1) * 4])
    urls = dataset_shards(str(tmp_path))
    assert len(urls) == 3
    loader = torch.utils.data.DataLoader(record_pipeline(urls), batch_size=None, num_workers=2)
    got = [rec.key for rec in loader]
    assert sorted(got) == sorted(keys) and len(got) == len(set(got)) == 12
    rec = next(iter(record_pipeline(urls[:1])))
    assert np.array_equal(rec.latents, fake_result(rec.key, seed=hash(rec.key) % 1000).latents)


def test_corrupt_sample_is_skipped_and_counted():
    good, _ = record.encode_sample(fake_result("g-s0"), {})
    bad = dict(good, __key__="b-s0", **{"latents.npy": b"\x93NUMPY garbage"})
    stats = ReadStats()
    out = list(decode_records([bad, good], stats))
    assert [r.key for r in out] == ["g-s0"] and stats.skipped == 1 and stats.reasons == {"corrupt_member": 1}
