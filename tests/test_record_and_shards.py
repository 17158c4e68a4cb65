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

from shards import reader as shard_reader
from shards import record, schema
from shards import verify as shard_verify
from shards import writer as shard_writer
from teachers.sampler import SampleResult
from shards.loader import ReadStats, dataset_shards, decode_records, record_pipeline


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
    with shard_writer.ShardWriter(str(out), index, recipe_hash="r1") as w:
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
    assert shard_verify.verify_shard(str(tmp_path / "a"), 0) == []


def test_writer_killed_mid_shard_leaves_nothing_under_the_final_name(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {os.getcwd()!r}); sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_record_and_shards import fake_result
        from shards import record
        from shards import writer as shard_writer
        w = shard_writer.ShardWriter({str(tmp_path)!r}, 3, recipe_hash="r")
        for i in range(5):
            w.write(record.encode_sample(fake_result(f"k{{i}}-s0", i), {{}})[0])
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    names = os.listdir(tmp_path)
    assert "000003.tar" not in names and "000003.json" not in names
    assert any(n.startswith("000003.tar.tmp-") for n in names)  # the partial write, under a temporary name
    assert shard_reader.list_indexes(str(tmp_path)) == []
    assert shard_verify.verify_shard(str(tmp_path), 3) == ["000003.json missing"]


def test_exception_inside_writer_removes_the_temporary(tmp_path):
    with pytest.raises(RuntimeError):
        with shard_writer.ShardWriter(str(tmp_path), 0, recipe_hash="r") as w:
            w.write(record.encode_sample(fake_result(), {})[0])
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_verify_names_a_corrupt_shard(tmp_path):
    from shards.inspect import main

    _write(tmp_path, 0, ["a-s0"])
    _write(tmp_path, 1, ["b-s0"])
    assert main([str(tmp_path), "--verify"]) == 0
    path = tmp_path / "000001.tar"
    data = bytearray(path.read_bytes())
    data[2000] ^= 0xFF
    path.write_bytes(bytes(data))
    assert shard_verify.verify_shard(str(tmp_path), 0) == []
    assert "sha256" in shard_verify.verify_shard(str(tmp_path), 1)[0]
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


def test_cleanup_removes_every_kind_of_temporary(tmp_path):
    _write(tmp_path, 3, ["a-s0"])
    planted = ["000003.tar.tmp-1a", "000003.json.tmp-2b", "000003.emb.npy.tmp-3c", ".000003.tar.tmp-4d"]
    others = ["000004.json.tmp-5e", "dataset.json.tmp-6f", "negative_prompt_embeds.npy.tmp-7a"]
    for name in planted + others:
        (tmp_path / name).write_bytes(b"partial")
    removed = shard_writer.remove_stale_temporaries(str(tmp_path), 3)
    assert sorted(removed) == sorted(planted)
    names = set(os.listdir(tmp_path))
    assert {"000003.tar", "000003.json"} <= names and set(others) <= names  # shard 4 may be live: untouched
    from core.fs import remove_temporaries

    assert sorted(remove_temporaries(str(tmp_path))) == sorted(others)  # the launcher, before workers start
    assert sorted(os.listdir(tmp_path)) == ["000003.json", "000003.tar"]
    assert shard_verify.verify_shard(str(tmp_path), 3) == []


def test_launcher_cleanup_walks_the_whole_output_and_puts_back_a_swapped_out_checkpoint(tmp_path):
    """A kill leaves temporaries in _plan/, rejects/ and checkpoints/ too, and ``publish_folder``'s
    ``<dest>.old-<uuid>``: stale beside its ``<dest>``, the only copy without it."""
    from core.fs import remove_temporaries
    from students.training.checkpoint import remove_stale

    hex_a, hex_b = "a" * 32, "b" * 32
    for rel in ("_plan/plan.parquet.tmp-1a", "rejects/input.jsonl.tmp-2b", "checkpoints/step-0000002.tmp-3c/config.json",
                "deep/er/x.npy.tmp-4d", f"checkpoints/step-0000004.old-{hex_a}/config.json", "checkpoints/step-0000004/config.json",
                f"checkpoints/step-0000006.old-{hex_b}/config.json", "_plan/plan.parquet", "rejects/input.jsonl",
                "checkpoints/step-0000008.old-notauuid/keep", "top.json.tmp-5e"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    assert remove_temporaries(str(tmp_path)) == ["top.json.tmp-5e"]  # the top level only, as before
    removed = remove_stale(str(tmp_path))  # the trainer's rank 0, and the launchers with recursive=True
    assert sorted(removed) == ["_plan/plan.parquet.tmp-1a", "checkpoints/step-0000002.tmp-3c",
                               f"checkpoints/step-0000004.old-{hex_a}", "deep/er/x.npy.tmp-4d", "rejects/input.jsonl.tmp-2b"]
    left = sorted(os.path.relpath(os.path.join(d, f), tmp_path) for d, _, names in os.walk(tmp_path) for f in names)
    assert left == ["_plan/plan.parquet", "checkpoints/step-0000004/config.json", "checkpoints/step-0000006/config.json",
                    "checkpoints/step-0000008.old-notauuid/keep", "rejects/input.jsonl"]  # step 6 renamed back


def test_index_holds_a_checksum_per_member_and_readers_refuse_a_flipped_byte(tmp_path):
    index = _write(tmp_path, 0, ["a-s0", "b-s0"])
    assert index["schema_version"] == record.SCHEMA_VERSION and index["checksum_algorithm"] == "crc32"
    sample = record.encode_sample(fake_result("b-s0", seed=hash("b-s0") % 1000), {})[0]
    assert index["checksums"][1] == {ext: record.member_checksum(data) for ext, data in sample.items() if ext != "__key__"}
    # Flip 8 bytes inside b-s0's latents member (the data, not a header): the tar still parses.
    path = tmp_path / "000000.tar"
    with open(path, "rb") as f:
        members = shard_reader.sample_members(f, "b-s0", *index["offsets"][1])
    ext, offset, size = next(m for m in members if m[0] == "latents.npy")
    data = bytearray(path.read_bytes())
    data[offset + size - 16 : offset + size - 8] = bytes(b ^ 0xFF for b in data[offset + size - 16 : offset + size - 8])
    path.write_bytes(bytes(data))
    got = {k: (s is not None, p) for k, s, p in shard_reader.read_samples(str(tmp_path), 0, [(k, o) for k, o in zip(index["keys"], index["offsets"])])}
    assert got["a-s0"] == (True, None)
    assert not got["b-s0"][0] and "checksum_mismatch" in got["b-s0"][1] and "'b-s0'" in got["b-s0"][1] and "latents.npy" in got["b-s0"][1]
    # The filter's streaming copy, given the index's checksums, refuses before writing anything.
    ix = schema.ShardIndex.read(str(tmp_path), 0)
    with open(path, "rb") as f, shard_writer.ShardWriter(str(tmp_path / "out"), 0, recipe_hash="r1") as w:
        for key, rng in zip(ix.keys, ix.offsets):
            try:
                w.copy_members(f, key, shard_reader.sample_members(f, key, *rng), checksums=ix.member_checksums(key))
            except record.BadRecord as err:
                assert err.reason == "checksum_mismatch" and key == "b-s0"
    assert w.index["keys"] == ["a-s0"] and shard_verify.verify_shard(str(tmp_path / "out"), 0) == []
    problems = shard_verify.verify_shard(str(tmp_path), 0)
    assert any("checksum_mismatch: sample 'b-s0' member latents.npy" in p for p in problems), problems
    assert record.check_sample(ix.member_checksums("a-s0"), dict(sample, __key__="a-s0")) == "checksum_mismatch"
    assert record.check_sample(ix.member_checksums("b-s0"), sample) is None
    assert record.check_sample(ix.member_checksums("b-s0"), {k: v for k, v in sample.items() if k != "txt"}) == "missing_member"


def test_non_finite_arrays_are_refused_by_the_reader_and_verify(tmp_path):
    sample = record.encode_sample(fake_result("n-s0"), {})[0]
    latents = record.load_npy(sample["latents.npy"]).copy()
    latents[0, 0, 0, 0] = np.nan
    sample["latents.npy"] = record.npy_bytes(latents)  # as a corrupted writer might have stored it
    with shard_writer.ShardWriter(str(tmp_path), 0, recipe_hash="r1") as w:  # checksums agree: only finiteness catches it
        w.write(sample)
    assert record.nonfinite_members(sample) == ["latents.npy"]
    with pytest.raises(record.BadRecord) as err:
        record.decode_sample(sample)
    assert err.value.reason == "non_finite" and "latents" in str(err.value)
    assert any("non_finite: sample 'n-s0' member latents.npy" in p for p in shard_verify.verify_shard(str(tmp_path), 0))
    stats = ReadStats()
    assert list(decode_records([sample], stats)) == [] and stats.reasons == {"non_finite": 1}


def test_non_finite_image_is_a_rejection_not_a_png():
    res = dataclasses.replace(fake_result(), image_error="non_finite_image")
    with pytest.raises(record.BadRecord) as err:
        record.encode_sample(res, {})
    assert err.value.reason == "non_finite_image"
    with pytest.raises(record.BadRecord, match="non_finite_image"):
        record.png_bytes(np.full((4, 4, 3), np.nan, np.float32))


def test_inspect_verify_reports_each_shard_once(tmp_path, capsys):
    from shards.inspect import main

    _write(tmp_path, 0, ["a-s0"])
    _write(tmp_path, 1, ["b-s0"])
    os.remove(tmp_path / "000001.json")
    assert main([str(tmp_path), "--verify"]) == 1
    out, err = capsys.readouterr()
    assert "verify: 1 ok, 1 bad" in out and "BAD 000001.tar: no index" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty), "--verify"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("distill inspect: error:") and "holds no shards" in err
    assert main([]) == 2 and "a dataset folder is required" in capsys.readouterr().err


def test_unsupported_schema_versions_are_one_line_naming_file_and_versions(tmp_path, capsys):
    from core.errors import UserError
    from shards import schema
    from shards.inspect import main

    index = _write(tmp_path, 0, ["a-s0"])
    info = schema.DatasetInfo(schema_version=2, recipe={"teacher": "tiny"}, recipe_hash="r1",
                              shards=[{k: index[k] for k in ("shard", "count", "bytes", "sha256")}],
                              extra={"future_field": [1, 2]})
    schema.write_dataset_info(str(tmp_path), info)
    again = schema.read_dataset_info(str(tmp_path))
    assert again == info and again.to_dict()["future_field"] == [1, 2]  # unknown fields round-trip
    assert main([str(tmp_path), "--verify"]) == 0
    schema.write_dataset_info(str(tmp_path), dataclasses.replace(info, recipe_hash="r9"))
    assert main([str(tmp_path), "--verify"]) == 1
    assert "made with recipe r1, expected r9" in capsys.readouterr().err
    schema.write_dataset_info(str(tmp_path), dataclasses.replace(info, recipe_hash="r9", lineage={"filter_recipe_hash": "r1"}))
    assert main([str(tmp_path), "--verify"]) == 0
    schema.write_dataset_info(str(tmp_path), info)
    d = json.loads((tmp_path / "dataset.json").read_text())
    (tmp_path / "dataset.json").write_text(json.dumps(dict(d, schema_version=99)))
    with pytest.raises(UserError, match=r"dataset.json has schema_version 99; .* reads 1, 2"):
        schema.read_dataset_info(str(tmp_path))
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "schema_version 99" in err and "dataset.json" in err
    (tmp_path / "dataset.json").write_text(json.dumps(dict(d, shards="000000.tar")))
    with pytest.raises(UserError, match="field 'shards' is str"):
        schema.read_dataset_info(str(tmp_path))
    ix = json.loads((tmp_path / "000000.json").read_text())
    (tmp_path / "000000.json").write_text(json.dumps(dict(ix, schema_version=7)))
    with pytest.raises(UserError, match=r"000000.json has schema_version 7"):
        shard_reader.read_index(str(tmp_path), 0)
    (tmp_path / "000000.json").write_text(json.dumps(dict(ix, count=5)))
    with pytest.raises(UserError, match="000000.json: field 'count' is 5 but 'keys' lists 1"):
        schema.ShardIndex.read(str(tmp_path), 0)
    assert "unreadable" in shard_verify.verify_shard(str(tmp_path), 0)[0]
    with pytest.raises(UserError, match="made with recipe 'r1', expected 'r2'"):
        schema.check_recipe_hash(ix["recipe_hash"], "r2", "000000.json")


def test_key_pattern_is_public():
    assert record.KEY_PATTERN.match("p0001-s2") and not record.KEY_PATTERN.match("a.b")
    assert record.check_key("p0001-s2") == "p0001-s2"


def test_a_schema1_index_without_checksums_still_reads(tmp_path):
    index = _write(tmp_path, 0, ["a-s0"])
    old = {k: v for k, v in index.items() if k not in ("checksums", "checksum_algorithm", "offsets")}
    (tmp_path / "000000.json").write_text(json.dumps(dict(old, schema_version=1)))
    ix = schema.ShardIndex.read(str(tmp_path), 0)
    assert ix.schema_version == 1 and ix.member_checksums("a-s0") is None and ix.offsets is None
    assert shard_reader.read_index(str(tmp_path), 0)["keys"] == ["a-s0"]
    got = list(shard_reader.read_samples(str(tmp_path), 0, [("a-s0", None)]))
    assert got[0][0] == "a-s0" and got[0][1] is not None and got[0][2] is None
    assert shard_verify.verify_shard(str(tmp_path), 0) == []


def test_a_sample_missing_or_reshaping_a_listed_member_is_a_bad_record():
    sample = record.encode_sample(fake_result("m-s0"), {})[0]
    with pytest.raises(record.BadRecord) as err:
        record.decode_sample({k: v for k, v in sample.items() if k != "latents.npy"})
    assert err.value.reason == "missing_member" and "latents" in str(err.value)
    short = dict(sample, **{"latents.npy": record.npy_bytes(record.load_npy(sample["latents.npy"])[:2])})
    with pytest.raises(record.BadRecord) as err:
        record.decode_sample(short)
    assert err.value.reason == "corrupt_member" and "latents" in str(err.value)


def test_every_dataset_gets_a_dataset_card_with_the_hubs_metadata(tiny_dump):
    text = open(os.path.join(tiny_dump, "README.md"), encoding="utf-8").read()
    assert text.startswith("---\nconfigs:\n- config_name: default\n  data_files:\n")
    header = text.split("---")[1]
    assert 'path: "*.tar"' in header and "- text-to-image" in header
    assert "16 samples in 4 WebDataset shards" in text and "teacher: `tiny`, 4 steps" in text
