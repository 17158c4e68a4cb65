"""The filter job on a scored tiny dump with planted duplicates and low scores: exactly the planned keys
kept, every input key in the manifest once, member bytes unchanged, byte-identical re-runs, lineage,
the trainer reading the output, bad input counted or refused before work, and the Dask runner."""

import json
import os
import re
import shutil
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from filters.aesthetic import AestheticMLP
from conftest import dump_argv
from pipelines import filter_shards, teacher_dump
from shards import inspect as inspect_cli
from shards import reader as shard_reader
from shards import schema as shard_schema
from shards import verify as shard_verify

DUMP = dict(resolution=64, num_inference_steps=2, samples_per_shard=3, batch_size=3, feature_layers="mid_block",
            num_feature_steps=1)  # the rest: conftest's DUMP_DEFAULTS
BOAT, CAT, TREE = "a red boat at sea", "a cat on a mat", "a green tree on a hill"
ROWS = [  # 3 samples per shard, one batch each
    *({"key": f"{x}0", "caption": c, "seed": seed} for x, c, seed in (("a", BOAT, 1), ("b", CAT, 2), ("c", TREE, 3))),
    *({"key": f"u{i}", "caption": f"a photo of thing number {i}"} for i in range(3)),
    # shard 2 replays shard 0 under other ids: identical images and embeddings, across shards
    *({"key": f"{x}1", "caption": c, "seed": seed} for x, c, seed in (("a", BOAT, 1), ("b", CAT, 2), ("c", TREE, 3))),
    {"key": "u3", "caption": "a photo of thing number 3"}, {"key": "nan", "caption": "a dog", "guidance_scale": 1e38},
    {"key": "null", "caption": None},  # rejected by the dump before planning
    {"key": "u4", "caption": "a photo of thing number 4"},
    {"key": "u5", "caption": "a photo of thing number 5"}, {"key": "u6", "caption": "a photo of thing number 6"},
    {"key": "u7", "caption": "a photo of thing number 7"},
]
EPS = 0.002  # distinct tiny-teacher images are > 0.005 apart in 1 - cosine; planted ones are identical


@pytest.fixture(scope="module")
def dump(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scored")
    (tmp / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    torch.manual_seed(0)
    torch.save(AestheticMLP(32).state_dict(), tmp / "aes.pth")
    teacher_dump.run(dump_argv(tmp / "p.jsonl", tmp / "dump", **DUMP, save_images=True, score_images="tiny",
                               aesthetic_weights=tmp / "aes.pth"))
    return str(tmp / "dump")


def parent_samples(data_dir):
    """key -> dict(aesthetic, clip, embedding, shard, position) from the indexes and sidecars."""
    out = {}
    for shard in shard_reader.list_indexes(data_dir):
        index = shard_reader.read_index(data_dir, shard)
        embeds = shard_reader.read_embeddings(data_dir, shard, index)
        for i, key in enumerate(index["keys"]):
            out[key] = dict(aesthetic=index["scores"]["aesthetic_score"][i], clip=index["scores"]["clip_score"][i],
                            embedding=embeds[i], shard=shard, position=i)
    return out


def reference_fates(samples, aesthetic_min, clip_min, eps):
    """The expected fate of every generated key, computed independently of the job with numpy."""
    fates = {}
    for key, s in samples.items():
        if aesthetic_min is not None and s["aesthetic"] < aesthetic_min:
            fates[key] = ("filtered", "aesthetic_below_threshold", None)
        elif clip_min is not None and s["clip"] < clip_min:
            fates[key] = ("filtered", "clip_score_below_threshold", None)
    kept = []
    for key in sorted(set(samples) - set(fates), key=lambda k: (-samples[k]["aesthetic"], k)):
        e = samples[key]["embedding"] / np.linalg.norm(samples[key]["embedding"])
        sims = [float(e @ (samples[k]["embedding"] / np.linalg.norm(samples[k]["embedding"]))) for k in kept]
        if sims and max(sims) >= 1 - eps - 1e-6:
            fates[key] = ("duplicate", "semantic_duplicate", kept[int(np.argmax(sims))])
        else:
            kept.append(key)
            fates[key] = ("kept", None, None)
    return fates


def midpoint_above(values, lowest):
    """A threshold between ``lowest`` and the next larger value: exactly the keys at or below it fall."""
    return (lowest + min(v for v in values if v > lowest)) / 2


@pytest.fixture(scope="module")
def filtered(dump, tmp_path_factory):
    samples = parent_samples(dump)
    unique = [k for k in samples if k.startswith("u")]
    lowest = min(unique, key=lambda k: samples[k]["aesthetic"])
    aesthetic_min = midpoint_above([s["aesthetic"] for s in samples.values()], samples[lowest]["aesthetic"])
    survivors = [k for k in unique if samples[k]["aesthetic"] >= aesthetic_min]
    low_clip = min(survivors, key=lambda k: samples[k]["clip"])
    clip_min = midpoint_above([s["clip"] for s in samples.values()], samples[low_clip]["clip"])
    out = str(tmp_path_factory.mktemp("filtered") / "final")
    args = ["--input", dump, "--output", out, "--aesthetic_threshold", repr(aesthetic_min), "--clip_score_threshold",
            repr(clip_min), "--semdedup_eps", str(EPS), "--samples_per_shard", "4", "--progress", "off"]
    dataset = filter_shards.run(args)
    expected = reference_fates(samples, aesthetic_min, clip_min, EPS)
    return dict(out=out, args=args, dataset=dataset, expected=expected, samples=samples, planted=(lowest, low_clip))


def manifest(out):
    return pq.read_table(os.path.join(out, "manifest.parquet")).to_pylist()


def tree_bytes(root):
    return {os.path.relpath(os.path.join(d, n), root): open(os.path.join(d, n), "rb").read()
            for d, _, names in os.walk(root) for n in names}


def tar_members(path):
    with tarfile.open(path) as tar:
        return [(m.name, m.size, tar.extractfile(m).read()) for m in tar]


def test_filter_keeps_exactly_the_planned_keys_and_every_input_key_has_one_fate(filtered):
    out, expected, dataset = filtered["out"], filtered["expected"], filtered["dataset"]
    lowest, low_clip = filtered["planted"]
    rows = manifest(out)
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)) == 16  # 15 planned samples (14 written, 1 NaN) + the null-caption row
    got = {r["key"]: (r["fate"], r["reason"], r["duplicate_of"]) for r in rows}
    assert got["nan-s0"] == ("rejected", "non_finite", None) and got["null"] == ("rejected", "null_caption", None)
    assert {k: v for k, v in got.items() if k not in ("nan-s0", "null")} == expected
    # the planted cases are all exercised: low aesthetic, low CLIP score, duplicates across shards
    assert expected[lowest][1] == "aesthetic_below_threshold" and expected[low_clip][1] == "clip_score_below_threshold"
    dups = {k: of for k, (fate, _, of) in expected.items() if fate == "duplicate"}
    # each duplicate is a replay of a shard-0 sample (equal scores: the smaller key is kept)
    assert len(dups) >= 2 and all(k[0] in "abc" and of == k[0] + "0-s0" for k, of in dups.items())
    totals = dataset["totals"]
    assert totals["input"] == totals["kept"] + totals["filtered"] + totals["duplicate"] + totals["rejected"] == 16
    kept = [r for r in rows if r["fate"] == "kept"]
    assert totals["kept"] == len(kept) == sum(s["count"] for s in dataset["shards"])


def test_scores_and_embeddings_are_read_without_the_tars(dump, tmp_path):
    from pipelines.filter import plan as filter_plan

    light = tmp_path / "light"  # the parent without any tar: the first half of the job reads only this
    light.mkdir()
    for name in os.listdir(dump):
        if name.endswith((".json", ".emb.npy")):
            shutil.copy(os.path.join(dump, name), light / name)
    records = filter_plan.score_records(str(light), 2)
    index = shard_reader.read_index(dump, 2)
    assert [r["key"] for r in records] == index["keys"] and all(r["stage"] is None for r in records)
    assert [r["offset"] for r in records] == index["offsets"]
    assert np.array_equal(np.stack([r["image_embedding"] for r in records]), shard_reader.read_embeddings(dump, 2, index))


def test_output_shards_are_balanced_in_parent_order_and_hold_the_input_bytes(filtered, dump):
    out, samples = filtered["out"], filtered["samples"]
    kept = sorted((k for k, f in filtered["expected"].items() if f[0] == "kept"),
                  key=lambda k: (samples[k]["shard"], samples[k]["position"]))
    indexes = [shard_reader.read_index(out, i) for i in shard_reader.list_indexes(out)]
    assert [k for ix in indexes for k in ix["keys"]] == kept
    counts = [ix["count"] for ix in indexes]
    assert len(counts) == -(-len(kept) // 4) and max(counts) - min(counts) <= 1
    parent = {}
    for shard in shard_reader.list_indexes(dump):
        for name, size, data in tar_members(os.path.join(dump, shard_schema.shard_name(shard))):
            parent[name] = (size, data)
    for ix in indexes:
        members = tar_members(os.path.join(out, ix["shard"]))
        assert {n.split(".")[0] for n, _, _ in members} == set(ix["keys"])
        for name, size, data in members:
            assert parent[name] == (size, data)  # copied unchanged, never re-encoded
        embeds = shard_reader.read_embeddings(out, int(ix["shard"][:6]), ix)
        for i, key in enumerate(ix["keys"]):
            assert np.array_equal(embeds[i], samples[key]["embedding"])
            assert ix["scores"]["aesthetic_score"][i] == samples[key]["aesthetic"]
        assert shard_verify.verify_shard(out, int(ix["shard"][:6])) == []


def test_sidecar_dedup_path_gives_the_records_paths_outputs(filtered, tmp_path):
    """The default path (one element per input shard, its records without embeddings, through the
    thresholds and ``SemanticDedupShards``: one ``EmbeddingRows`` block per shard of the rows the
    thresholds kept, fates joined back by shard) against the earlier one (one element per record,
    each carrying its embedding through ``SemanticDedup``): the same kept keys, the same
    duplicate_of, and byte-identical shards, manifest and report."""
    out = str(tmp_path / "records")
    dataset = filter_shards.run([out if a == filtered["out"] else a for a in filtered["args"]], dedup="records")
    old, new = manifest(out), manifest(filtered["out"])
    pick = lambda rows, fate: {r["key"]: r["duplicate_of"] for r in rows if r["fate"] == fate}  # noqa: E731
    assert pick(new, "kept") == pick(old, "kept") and len(pick(new, "kept")) >= 5
    assert pick(new, "duplicate") == pick(old, "duplicate") and len(pick(new, "duplicate")) >= 2
    filtered_keys = [[r["key"] for r in rows if r["fate"] == "filtered"] for rows in (new, old)]
    assert filtered_keys[0] == filtered_keys[1] != []
    assert dataset["totals"] == filtered["dataset"]["totals"]
    t = dataset["totals"]
    assert t["input"] == t["kept"] + t["filtered"] + t["duplicate"] + t["rejected"] == 16
    assert tree_bytes(out) == tree_bytes(filtered["out"])


def test_rerun_redoes_a_partial_shard_byte_identically_and_skips_complete_ones(filtered, tmp_path):
    out = str(tmp_path / "out")
    shutil.copytree(filtered["out"], out)
    before = tree_bytes(out)
    mtime = os.stat(os.path.join(out, "000000.tar")).st_mtime_ns
    os.remove(os.path.join(out, "000001.json"))  # index gone: shard 1 counts as incomplete
    with open(os.path.join(out, "000002.tar"), "r+b") as f:  # a torn shard
        f.truncate(2048)
    filter_shards.run([out if a == filtered["out"] else a for a in filtered["args"]])
    assert os.stat(os.path.join(out, "000000.tar")).st_mtime_ns == mtime  # verified and skipped
    assert tree_bytes(out) == before  # shards 1 and 2 rewritten to the same bytes


def test_dataset_json_keeps_what_the_trainer_needs_and_records_the_lineage(filtered, dump):
    import hashlib

    dataset, out = filtered["dataset"], filtered["out"]
    parent = json.load(open(os.path.join(dump, "dataset.json")))
    for key in ("recipe", "recipe_hash", "shared", "timesteps", "scheduler_config", "prediction_type"):
        assert dataset[key] == parent[key]
    assert open(os.path.join(out, "negative_prompt_embeds.npy"), "rb").read() == \
        open(os.path.join(dump, "negative_prompt_embeds.npy"), "rb").read()
    lineage = dataset["lineage"]
    parent_sha = hashlib.sha256(open(os.path.join(dump, "dataset.json"), "rb").read()).hexdigest()
    assert lineage["parent"] == {"path": dump, "recipe_hash": parent["recipe_hash"], "lineage": None,
                                 "dataset_sha256": parent_sha}
    assert lineage["filter_recipe"]["semdedup_eps"] == EPS and lineage["filter_recipe"]["samples_per_shard"] == 4
    report = open(os.path.join(out, "report.html")).read()
    from core.report_html import MARKER
    from test_report_html import tiles

    assert MARKER in report
    # a plot for each thing with values (every step ran here: thresholds and semantic dedup), then the examples
    assert re.findall(r'<figure class="plot"><img alt="([^"]+)"', report) == ["funnel", "aesthetic_score", "clip_score",
                                                                             "groups"]
    shown = tiles(report)  # each example image with its prompt, key and scores under it, upscaled when small
    examples = {r["key"]: r for r in manifest(out)}
    assert len(shown) >= 6 and report.count("data:image/png;base64,") == 4 + len(shown)
    for caption, image in shown:
        prompt, line = caption.rsplit("\n", 1)
        key = line.split(" · ")[0]
        assert prompt and any(k.startswith(key) for k in examples) and min(image.size) >= 128
    for group in ("kept", "duplicate: semantic_duplicate", "filtered: aesthetic_below_threshold",
                  "filtered: clip_score_below_threshold", "rejected: non_finite", "rejected: null_caption"):
        assert f"<tr><td>{group}</td>" in report


def test_trainer_reads_a_filtered_dataset_like_a_dump(filtered, tmp_path):
    from students.training.train import TrainConfig, train

    losses = train(TrainConfig(data=filtered["out"], output=str(tmp_path / "run"), preset="tiny", recipe="output_kd",
                               batch_size=2, max_steps=2, warmup_steps=1, checkpoint_every=2, shuffle_buffer=0))
    assert len(losses) == 2 and all(np.isfinite(losses))


def test_a_filtered_dataset_filters_again_and_inspect_shows_the_chain(filtered, dump, tmp_path, capsys):
    out2 = str(tmp_path / "top")
    second = filter_shards.run(["--input", filtered["out"], "--output", out2, "--clip_score_top_fraction", "0.5",
                                "--semdedup_eps", "none", "--progress", "off"])
    kept = filtered["dataset"]["totals"]["kept"]
    assert second["totals"]["input"] == kept and second["totals"]["kept"] == -(-kept // 2)
    assert inspect_cli.main([out2, "--verify"]) == 0
    text = capsys.readouterr().out
    assert text.index(f"of {filtered['out']} ") < text.index(f"of {dump} ")  # newest first, back to the dump
    chain = inspect_cli.summarise(out2)["lineage"]
    assert [step["parent"] for step in chain] == [filtered["out"], dump]
    assert chain[0]["filter"]["clip_score_top_fraction"] == 0.5


def test_a_truncated_sidecar_rejects_its_shard_and_the_job_finishes(filtered, dump, tmp_path):
    """A shard whose ``.emb.npy`` is cut short: its samples are rejected at stage ``scores``
    (``corrupt_embeddings``), the k-means sample skips the file, and the other shards are filtered."""
    bad = str(tmp_path / "bad")
    shutil.copytree(dump, bad)
    with open(os.path.join(bad, shard_schema.embeds_name(1)), "r+b") as f:
        f.truncate(100)
    out = str(tmp_path / "out")
    dataset = filter_shards.run([bad if a == dump else out if a == filtered["out"] else a for a in filtered["args"]])
    in_shard_1 = shard_reader.read_index(bad, 1)["keys"]
    rows = {r["key"]: r for r in manifest(out)}
    assert {(rows[k]["fate"], rows[k]["stage"], rows[k]["reason"]) for k in in_shard_1} == \
        {("rejected", "scores", "corrupt_embeddings")}
    t = dataset["totals"]
    assert t["input"] == t["kept"] + t["filtered"] + t["duplicate"] + t["rejected"] == 16 and t["duplicate"] >= 2


def test_a_corrupt_member_is_rejected_with_its_reason_and_counted(filtered, dump, tmp_path):
    bad = str(tmp_path / "bad")
    shutil.copytree(dump, bad)
    victim = next(k for k, f in sorted(filtered["expected"].items()) if f[0] == "kept")
    s = filtered["samples"][victim]
    start = shard_reader.read_index(bad, s["shard"])["offsets"][s["position"]][0]
    with open(os.path.join(bad, shard_schema.shard_name(s["shard"])), "r+b") as f:  # same size, garbled header
        f.seek(start)
        f.write(b"\xff" * 100)
    out = str(tmp_path / "out")
    dataset = filter_shards.run([bad if a == dump else out if a == filtered["out"] else a for a in filtered["args"]])
    row = next(r for r in manifest(out) if r["key"] == victim)
    assert (row["fate"], row["stage"], row["reason"]) == ("rejected", "copy", "corrupt_member")
    t = dataset["totals"]
    assert t["kept"] == filtered["dataset"]["totals"]["kept"] - 1 == sum(s["count"] for s in dataset["shards"])
    assert t["input"] == t["kept"] + t["filtered"] + t["duplicate"] + t["rejected"] == 16


def plant_nan_row(data_dir, shard, row):
    """Row ``row`` of the shard's ``.emb.npy`` set to NaN, the index's sha256 of the sidecar updated to
    match (so only a finiteness check can tell)."""
    import hashlib
    import io

    path = os.path.join(data_dir, shard_schema.embeds_name(shard))
    x = np.load(path)
    x[row] = np.nan
    buf = io.BytesIO()
    np.save(buf, x)
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    index_path = os.path.join(data_dir, shard_schema.index_name(shard))
    with open(index_path) as f:
        index = json.load(f)
    index["embeddings"]["sha256"] = hashlib.sha256(buf.getvalue()).hexdigest()
    with open(index_path, "w") as f:
        json.dump(index, f)
    return index["keys"][row]


def test_a_nan_sidecar_row_is_a_counted_rejection_and_inspect_flags_it(filtered, dump, tmp_path, capsys):
    """SemDeDup's k-means and search would meet NaN (an IndexError in DedupBlocks/AssignBlocks): the
    sample is rejected at stage ``scores`` with ``non_finite_score``, the k-means sample skips the row,
    the shard's other samples go on; ``inspect --verify`` reports the shard bad."""
    bad = str(tmp_path / "bad")
    shutil.copytree(dump, bad)
    victim = plant_nan_row(bad, 1, 1)
    out = str(tmp_path / "out")
    dataset = filter_shards.run([bad if a == dump else out if a == filtered["out"] else a for a in filtered["args"]])
    rows = {r["key"]: r for r in manifest(out)}
    assert (rows[victim]["fate"], rows[victim]["stage"], rows[victim]["reason"]) == \
        ("rejected", "scores", "non_finite_score")
    assert "image embedding" in rows[victim]["detail"] and "row 1 of 000001.emb.npy" in rows[victim]["detail"]
    others = {k: f for k, f in filtered["expected"].items() if k != victim}
    assert {k: rows[k]["fate"] for k in others} == {k: f[0] for k, f in others.items()}  # the rest as before
    t = dataset["totals"]
    assert t["input"] == t["kept"] + t["filtered"] + t["duplicate"] + t["rejected"] == 16
    assert t["by_reason"]["rejected"]["non_finite_score"] == 1
    capsys.readouterr()
    assert inspect_cli.main([bad, "--verify"]) == 1
    out_text, err = capsys.readouterr()
    assert f"BAD 000001.tar: non_finite: 000001.emb.npy row(s) [1] (sample(s) [{victim!r}]) hold NaN or Inf" in err
    assert "verify: 4 ok, 1 bad" in out_text


def test_a_listed_shard_without_its_tar_is_a_counted_rejection(filtered, dump, tmp_path):
    """The index and sidecar are there, the tar is not: its samples are rejected at stage ``scores``
    (``unreadable_shard``) before any output shard is written; the other shards are filtered."""
    bad = str(tmp_path / "bad")
    shutil.copytree(dump, bad)
    os.remove(os.path.join(bad, shard_schema.shard_name(3)))
    out = str(tmp_path / "out")
    dataset = filter_shards.run([bad if a == dump else out if a == filtered["out"] else a for a in filtered["args"]])
    gone = shard_reader.read_index(bad, 3)["keys"]
    rows = {r["key"]: r for r in manifest(out)}
    assert {(rows[k]["fate"], rows[k]["stage"], rows[k]["reason"], rows[k]["detail"]) for k in gone} == \
        {("rejected", "scores", "unreadable_shard", "000003.tar is missing (its index 000003.json is there)")}
    kept_before = {k for k, f in filtered["expected"].items() if f[0] == "kept"}
    assert {k for k, r in rows.items() if r["fate"] == "kept"} == kept_before - set(gone)
    t = dataset["totals"]
    assert t["input"] == t["kept"] + t["filtered"] + t["duplicate"] + t["rejected"] == 16
    assert t["kept"] == sum(s["count"] for s in dataset["shards"]) and t["by_reason"]["rejected"]["unreadable_shard"] == len(gone)


def rewrite_shard(data_dir, shard, change):
    """Shard ``shard`` rebuilt member by member through ``change(name, data, tar, index)`` (returning the
    bytes to store, or None to leave the member out; it may add members), its index's size and sha256
    updated to match."""
    import hashlib
    import io

    tar_path = os.path.join(data_dir, shard_schema.shard_name(shard))
    index_path = os.path.join(data_dir, shard_schema.index_name(shard))
    with open(index_path) as f:
        index = json.load(f)
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in members:
            data = change(member.name, data, tar, index)
            if data is not None:
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    with open(tar_path, "wb") as f:
        f.write(buf.getvalue())
    index.update(bytes=len(buf.getvalue()), sha256=hashlib.sha256(buf.getvalue()).hexdigest())
    with open(index_path, "w") as f:
        json.dump(index, f)
    return index


def test_inspect_verify_checks_array_shapes_against_the_json(dump, tmp_path, capsys):
    """A latents member of another shape, its checksum updated (so it reads as intact): the trainer
    would skip it as ``corrupt_member``; ``inspect --verify`` names it."""
    import io

    from shards.record import load_npy, member_checksum

    bad = str(tmp_path / "bad")
    shutil.copytree(dump, bad)

    def halve_latents(name, data, tar, index):
        if name == f"{index['keys'][0]}.latents.npy":
            buf = io.BytesIO()
            np.save(buf, load_npy(data).reshape(-1)[:10])
            data = buf.getvalue()
            index["checksums"][0]["latents.npy"] = member_checksum(data)
        return data

    index = rewrite_shard(bad, 0, halve_latents)
    assert inspect_cli.main([bad, "--verify"]) == 1
    err = capsys.readouterr().err
    assert f"corrupt_member: sample {index['keys'][0]!r} member latents.npy has shape [10], its json lists [" in err
    assert err.count("BAD ") == 1


def test_inspect_verify_reports_an_absolute_path_and_a_symlink_member_as_bad(dump, tmp_path, capsys):
    """Members no writer of this project makes (it died with EOFError on such a tar): each reported,
    never read or followed."""
    import io

    bad = str(tmp_path / "bad")
    shutil.copytree(dump, bad)

    def add_strangers(name, data, tar, index):
        if name == f"{index['keys'][-1]}.txt":
            info = tarfile.TarInfo("/etc/evil.txt")
            info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))
            link = tarfile.TarInfo(f"{index['keys'][-1]}.link")
            link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(link)
        return data

    last = rewrite_shard(bad, 0, add_strangers)["keys"][-1]
    assert inspect_cli.main([bad, "--verify"]) == 1
    out, err = capsys.readouterr()
    assert "bad member '/etc/evil.txt': an absolute path" in err
    assert f"bad member '{last}.link': a symlink to '/etc/passwd'" in err
    assert "verify: 4 ok, 1 bad" in out


@pytest.fixture(scope="module")
def unscored(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("unscored")
    (tmp / "p.txt").write_text("a cat\n")
    teacher_dump.run(dump_argv(tmp / "p.txt", tmp / "dump", **DUMP))
    return str(tmp / "dump")


def test_bad_arguments_fail_before_any_work(dump, unscored, tmp_path):
    def fails(args, message):
        out = str(tmp_path / "o")
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            filter_shards.run(["--output", out, *args])
        assert not os.path.exists(out)

    fails(["--input", "/no/dump"], "--input '/no/dump' does not exist")
    fails(["--input", unscored], "holds no image scores: make the dump with --save_images --score_images PRESET")
    fails(["--input", dump, "--clip_score_top_fraction", "2"], r"clip_score_top_fraction must be in \(0, 1\]")
    fails(["--input", dump, "--clip_score_threshold", "0.2", "--clip_score_top_fraction", "0.5"],
          "give clip_score_threshold or clip_score_top_fraction, not both")
    fails(["--input", dump, "--semdedup_eps", "x"], "argument --semdedup_eps")
    with pytest.raises(ValueError, match="is the --input folder"):
        filter_shards.run(["--input", dump, "--output", dump])
    assert filter_shards.main(["--input", unscored, "--output", str(tmp_path / "o")]) == 2


@pytest.mark.slow  # a Dask cluster of two worker processes: about 20 s here
def test_dask_runner_gives_the_same_bytes_as_direct(filtered, tmp_path):
    """A fresh run on another engine: the same bytes, report and manifest included."""
    from distributed import LocalCluster

    from diffusion_distill.beam_cli import main as beam_main

    out = str(tmp_path / "dask")
    with LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=None,
                      processes=True) as cluster:
        beam_main(["run", "pipelines/filter_shards.py", "--runner=Dask",
                   f"--dask_client_address={cluster.scheduler_address}",
                   *[out if a == filtered["out"] else a for a in filtered["args"]]])
    assert tree_bytes(out) == tree_bytes(filtered["out"])
