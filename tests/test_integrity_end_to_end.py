"""Issue 17's integrity must-shows on one tiny scored dump: a shard with 8 bytes flipped inside a
latent member and a shard cut short mid-file are counted rejections with their keys and reasons in
``distill filter`` (manifest) and in ``distill train`` (skips; the run completes on the rest); the
filtered output verifies clean; a NaN planted with a consistent index is caught by the loader; a
``dataset.json`` of schema_version 99 is one line in inspect, train and filter."""

import json
import os
import shutil
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import run_dump
from pipelines import filter_shards
from shards import loader as SD
from students.training import cli as train_cli
from shards import inspect as inspect_cli
from shards import record
from shards.schema import ShardIndex

DUMP = dict(resolution=64, num_inference_steps=2, samples_per_shard=2, batch_size=2, feature_layers="", save_images=True,
            score_images="tiny")  # the rest: conftest's DUMP_DEFAULTS
PROMPTS = [f"a {c} {s}" for c in ("red", "blue") for s in ("circle", "square", "star", "moon")]  # 8: 4 shards of 2


@pytest.fixture(scope="module")
def dump(tmp_path_factory):
    return run_dump(tmp_path_factory.mktemp("integrity"), PROMPTS, **DUMP)


def member_span(tar_path, key: str, ext: str) -> tuple[int, int]:
    """(offset, size) of a member's data in the tar."""
    with tarfile.open(tar_path) as tar:
        m = tar.getmember(f"{key}.{ext}")
        return m.offset_data, m.size


def keys_of(root, shard: int) -> list[str]:
    return ShardIndex.read(str(root), shard).keys


@pytest.fixture(scope="module")
def damaged(dump, tmp_path_factory):
    """A copy with 8 bytes flipped in place inside a latent member (shard 1) and shard 2 cut mid-file."""
    bad = tmp_path_factory.mktemp("damaged") / "dump"
    shutil.copytree(dump, bad)
    flipped = keys_of(bad, 1)[0]
    offset, size = member_span(bad / "000001.tar", flipped, record.LATENTS)
    with open(bad / "000001.tar", "r+b") as f:  # the array data, past the .npy header: same size, new bytes
        f.seek(offset + size - 64)
        data = bytearray(f.read(8))
        f.seek(offset + size - 64)
        f.write(bytes(b ^ 0x5A for b in data))
    cut_key = keys_of(bad, 2)[1]
    offset, _ = member_span(bad / "000002.tar", cut_key, record.LATENTS)
    with open(bad / "000002.tar", "r+b") as f:  # truncated inside the second sample's latents
        f.truncate(offset + 100)
    return dict(path=str(bad), flipped=flipped, cut=cut_key, intact=[k for i in (0, 1, 3) for k in keys_of(bad, i)
                                                                      if k != flipped] + [keys_of(bad, 2)[0]])


def test_filter_rejects_the_damaged_samples_with_their_reasons_and_its_output_verifies_clean(damaged, tmp_path, capsys):
    out = str(tmp_path / "final")
    dataset = filter_shards.run(["--input", damaged["path"], "--output", out, "--semdedup_eps", "none",
                                 "--progress", "off"])
    rows = {r["key"]: r for r in pq.read_table(os.path.join(out, "manifest.parquet")).to_pylist()}
    assert (rows[damaged["flipped"]]["fate"], rows[damaged["flipped"]]["reason"]) == ("rejected", "checksum_mismatch")
    assert rows[damaged["cut"]]["fate"] == "rejected" and rows[damaged["cut"]]["reason"] in (
        "corrupt_member", "missing_member", "checksum_mismatch")
    t = dataset["totals"]
    assert t["rejected"] == 2 and t["kept"] == len(damaged["intact"]) == 6
    assert t["input"] == t["kept"] + t["filtered"] + t["duplicate"] + t["rejected"] == 8
    kept = {k for i in range(len(dataset["shards"])) for k in keys_of(out, i)}
    assert kept == set(damaged["intact"])  # never a copy of a damaged sample
    capsys.readouterr()
    assert inspect_cli.main([out, "--verify"]) == 0
    assert "0 bad" in capsys.readouterr().out


def test_training_skips_the_damaged_samples_with_their_keys_and_completes(damaged, tmp_path, capsys):
    argv = ["--data", damaged["path"], "--output", str(tmp_path / "run"), "--preset", "tiny", "--recipe", "output_kd",
            "--batch_size", "2", "--max_steps", "4", "--checkpoint_every", "4", "--shuffle_buffer", "0",
            "--num_workers", "0"]
    SD.STATS.__init__()  # this process's loader counters (num_workers 0 reads here)
    assert train_cli.main(argv) == 0
    out = capsys.readouterr().out
    summary = next(line for line in out.splitlines() if "skipped" in line and "corrupt sample" in line)
    assert f"{damaged['flipped']}: checksum_mismatch" in summary
    assert f"{damaged['cut']}: missing_member" in summary or f"{damaged['cut']}: corrupt_member" in summary
    assert os.path.isdir(tmp_path / "run" / "checkpoints" / "step-0000004")  # the run completed on the rest


def test_a_nan_planted_with_a_consistent_index_is_caught_by_the_loader(dump, tmp_path):
    bad = tmp_path / "nan"
    shutil.copytree(dump, bad)
    key = keys_of(bad, 0)[1]
    offset, size = member_span(bad / "000000.tar", key, record.LATENTS)
    with open(bad / "000000.tar", "r+b") as f:
        f.seek(offset)
        member = f.read(size)
        array = record.load_npy(member)
        assert array.dtype == np.float16
        header = size - array.nbytes
        f.seek(offset + header + 2 * 5)  # element 5 of the array data
        f.write(np.array([np.nan], np.float16).tobytes())
        f.seek(offset)
        member = f.read(size)
    index = ShardIndex.read(str(bad), 0)
    sums = [dict(c) for c in index.checksums]
    sums[1][record.LATENTS] = record.member_checksum(member)  # the checksum agrees: only finiteness can tell
    ShardIndex.from_dict({**index.to_dict(), "checksums": sums}).write(str(bad), 0)
    stats = SD.ReadStats()
    raw = SD.record_pipeline(SD.dataset_shards(str(bad))[:1], decode=False)
    read = [r.key for r in SD.decode_records(raw, stats)]
    assert [(s.key, s.reason) for s in stats.skips] == [(key, "non_finite")]
    assert read == [keys_of(bad, 0)[0]]


@pytest.mark.parametrize("command", ["inspect", "train", "filter"])
def test_a_dataset_json_of_schema_99_is_one_line(dump, tmp_path, capsys, command):
    future = tmp_path / "future"
    future.mkdir()
    info = json.load(open(os.path.join(dump, "dataset.json")))
    (future / "dataset.json").write_text(json.dumps({**info, "schema_version": 99}))
    main, argv = {
        "inspect": (inspect_cli.main, [str(future), "--verify"]),
        "train": (train_cli.main, ["--data", str(future), "--output", str(tmp_path / "run"), "--preset", "tiny"]),
        "filter": (filter_shards.main, ["--input", str(future), "--output", str(tmp_path / "out")]),
    }[command]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "schema_version 99" in err[0] and "dataset.json" in err[0], err
    assert not os.path.exists(tmp_path / "run") and not os.path.exists(tmp_path / "out")
