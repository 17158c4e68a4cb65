"""The batched caption stages (Arrow tables) against the per-record ones: the same manifest, rejects
and counts on an input with exact-duplicate groups, every caption rule and unreadable rows (the
acceptance inputs of ``test_curate_job`` are compared there, reusing its job)."""

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline

from pipelines import curate
from pipelines.curate import batched



def outputs(out):
    manifest = pq.read_table(out / "manifest.parquet")
    rejects = pq.read_table(out / "rejects.parquet")
    summary = json.loads((out / "summary.json").read_text())
    return manifest, rejects, {k: v for k, v in summary.items() if k != "config"}


def run_both(args, out_a, out_b, *extra):
    curate.run(args(out_a) + ["--record_batch", "0", *extra], test_pipeline=BeamTestPipeline())
    curate.run(args(out_b) + ["--record_batch", "3", *extra], test_pipeline=BeamTestPipeline())
    return outputs(out_a), outputs(out_b)


# CLIP's outputs depend on how RunInference batched the records (float32 sums in another order):
# equal within a few float32 roundings of a unit-norm cosine, not bit for bit.
MODEL_COLUMNS = ("clip_score", "aesthetic_score", "duplicate_similarity")


def _stable(reject: dict) -> dict:
    """PIL's message names the address of its BytesIO object, which differs from run to run."""
    return {**reject, "detail": reject["detail"] and re.sub(r"0x[0-9a-f]+", "0x...", reject["detail"])}


def assert_same(a, b):
    (ma, ra, sa), (mb, rb, sb) = a, b
    assert mb.schema == ma.schema
    exact = [c for c in ma.column_names if c not in MODEL_COLUMNS]
    assert mb.select(exact).to_pylist() == ma.select(exact).to_pylist()
    for name in MODEL_COLUMNS:
        assert mb.column(name).to_pylist() == pytest.approx(ma.column(name).to_pylist(), abs=1e-5, nan_ok=True)
    assert [_stable(r) for r in rb.to_pylist()] == [_stable(r) for r in ra.to_pylist()]
    assert sb == sa
    assert sa["input"] == sa["kept"] + sa["filtered"] + sa["duplicate"] + sa["rejected"]


def laion_rows(tmp_path, n=40):
    """Every caption rule, exact-duplicate groups of 1 to 4 with score ties and unknown scores."""
    caps = [f"a photo of house number {i % 13}" for i in range(n)]
    caps[3], caps[4], caps[5] = "hi", " ".join(["w"] * 70), None
    caps[6] = b"\xff\xfe not utf-8"
    caps = [c.encode() if isinstance(c, str) else c for c in caps]
    aesthetic = [None if i % 5 == 0 else float(i % 3) for i in range(n)]
    ruled = lambda options, i, j: options[j % len(options)] if i % 2 == 0 else options[0]  # noqa: E731 (odd rows pass)
    table = pa.table({"SAMPLE_ID": list(range(n)), "URL": [f"http://x/{i}.jpg" for i in range(n)],
                      "TEXT": pa.array(caps, pa.binary()),
                      "WIDTH": [ruled([640, 100, None, 640.5, 100], i, i // 2) for i in range(n)],
                      "HEIGHT": [ruled([480, 1000, 480, 20, 1000], i, i // 2) for i in range(n)],
                      "punsafe": [ruled([0.1, 0.9, None, float("nan"), 0.2], i, i // 2) for i in range(n)],
                      "pwatermark": [ruled([0.1, 0.1, 0.95, 0.2], i, i // 2 % 7) for i in range(n)],
                      "NSFW": [ruled(["UNLIKELY", "NSFW", None, "unsure"], i, i // 2 % 6) for i in range(n)],
                      "AESTHETIC_SCORE": aesthetic, "similarity": [0.3] * n})
    pq.write_table(table, tmp_path / "laion.parquet", row_group_size=16)
    (tmp_path / "p.txt").write_text("a photo of house number 1\nA Photo  of house number 1\n\nshort\n")
    return [str(tmp_path / "laion.parquet"), str(tmp_path / "p.txt")]


def test_batched_caption_stages_match_the_per_record_ones(tmp_path, monkeypatch):
    """No stage after exact dedup: the manifest and report come from tables too."""
    inputs = laion_rows(tmp_path)
    monkeypatch.setattr(batched, "EXACT_BUCKET_ROWS", 4)  # several exact-dedup buckets
    args = lambda out: [a for i in inputs for a in ("--input", i)] + ["--output", str(out)]  # noqa: E731
    a, b = run_both(args, tmp_path / "a", tmp_path / "b", "--min_image_side", "30")
    assert_same(a, b)
    found = {r["reason"] for r in a[0].to_pylist()}
    assert {"exact_duplicate", "too_few_words", "too_many_words", "punsafe_above_threshold", "pwatermark_above_threshold",
            "aspect_ratio_too_large", "image_too_small", "nsfw_tag", None} == found
    assert (a[2]["rejected"], a[2]["duplicate"]) == (2, 10)


def test_exact_dedup_table_keeps_the_priority_winner():
    """Highest aesthetic first, unknown last, then smallest key: as ``keep_priority``."""
    rows = [("k3", "cat", 5.0), ("k1", "cat", 5.0), ("k2", "cat", None), ("k0", "dog", None), ("k4", "cat", 6.0),
            ("k5", "dog", None)]
    table = pa.table({name: [None] * len(rows) for name in batched.RECORD_SCHEMA.names}, schema=batched.RECORD_SCHEMA)
    for name, values in (("key", [r[0] for r in rows]), ("caption", [r[1] for r in rows]),
                         ("laion_aesthetic", [r[2] for r in rows])):
        table = table.set_column(table.schema.get_field_index(name), name, pa.array(values, table.schema.field(name).type))
    out = {r["key"]: (r["reason"], r["duplicate_of"], r["n_duplicates"])
           for r in batched.resolve_exact_table((0, [table.slice(0, 3), table.slice(3)])).to_pylist()}
    assert out == {"k4": (None, None, 3), "k1": ("exact_duplicate", "k4", None), "k3": ("exact_duplicate", "k4", None),
                   "k2": ("exact_duplicate", "k4", None), "k0": (None, None, 1), "k5": ("exact_duplicate", "k0", None)}


TRICKY = ["", " ", "a b", "  hello \t  world  ", "tab\there", "nul\x00byte", "del\x7fchar", "fs\x1csep", "nel\x85line",
          "nbsp\u00a0space", "line\u2028sep", "ogham\u1680mark", "ideo\u3000space", "\ufb01ligature", "\uff21wide",
          "e\u0301combining", "zero\u200bwidth", "bom\ufeffinside", "emoji \U0001f600 face", "&amp; html", "\r\n crlf \r"]


def test_normalise_texts_is_normalize_caption_on_every_caption():
    """The batch normaliser (pyarrow for ASCII captions) against the per-caption function, on
    controls, Unicode spaces, compatibility forms and random mixes of them."""
    import random

    from filters.captions import normalize_caption

    rng = random.Random(0)
    texts = TRICKY + ["".join(rng.choice(TRICKY + ["ab", "c"]) for _ in range(rng.randint(0, 6))) for _ in range(3000)]
    got = batched.normalise_texts(texts)
    assert got.to_pylist() == [normalize_caption(t) for t in texts]
    assert batched.word_counts(got).to_pylist() == [len(normalize_caption(t).split()) for t in texts]


def test_txt_read_straight_into_columns_matches_the_per_record_path(tmp_path):
    """A .txt file with a byte order mark, CRLF and blank lines, a line that is not UTF-8, control
    characters, Unicode spaces and compatibility forms, repeats, more lines than a batch holds:
    the batched path (columns built from the file) writes what the per-record path writes."""
    lines = [t.encode("utf-8") for t in TRICKY if t.strip()] + [b"\xff\xfe not utf-8", b"", b"   "]
    lines += [f"a photo of house number {i % 5}".encode() for i in range(12)]
    (tmp_path / "p.txt").write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(lines) + b"\n")
    args = lambda out: ["--input", str(tmp_path / "p.txt"), "--output", str(out), "--min_words", "1"]  # noqa: E731
    a, b = run_both(args, tmp_path / "a", tmp_path / "b")
    assert_same(a, b)
    assert a[2]["rejected"] == 1 and a[2]["duplicate"] >= 7


def test_report_stats_from_tables_equal_the_per_row_stats():
    """``CurateStats.add_table`` (the batched path) gives the report the per-row ``add_input`` gives:
    the same counts, score samples, cluster and group sizes and examples, on planted manifest rows
    with several reasons, ties and scores, split into tables at an odd size."""
    import random

    from filters import reasons
    from pipelines.curate.report import CurateStats, table_stats
    from pipelines.curate.schema import MANIFEST_SCHEMA

    rng = random.Random(0)
    fates = [(reasons.KEPT, None, None), ("filtered", "rules", reasons.TOO_FEW_WORDS),
             ("duplicate", "exact_dedup", reasons.EXACT_DUPLICATE), ("duplicate", "semdedup", reasons.SEMANTIC_DUPLICATE)]
    rows = []
    for i in range(500):
        fate, stage, reason = rng.choice(fates)
        row = {f.name: None for f in MANIFEST_SCHEMA}
        row.update(key=f"txt-k-{rng.randrange(10**6):06d}-{i}", caption=f"caption {i}", fate=fate, stage=stage,
                   reason=reason, source="txt", has_image=False,
                   laion_aesthetic=rng.choice([None, rng.uniform(3, 8)]),
                   clip_score=rng.choice([None, float(np.float32(rng.uniform(0.1, 0.4)))]),  # a float32 column
                   dedup_on=rng.choice([None, "text"]), n_duplicates=rng.choice([None, 0, 1, 3]) if fate == "kept" else None)
        row["cluster_id"] = None if row["dedup_on"] is None else rng.randrange(7)
        rows.append(row)
    stats = CurateStats(n_examples=3)
    per_row = stats.create_accumulator()
    for row in rows:
        per_row = stats.add_input(per_row, ("manifest", row))
    tables = stats.create_accumulator()
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    for start in range(0, len(rows), 77):
        tables = stats.add_input(tables, ("manifest_table", table.slice(start, 77)))
    assert stats.extract_output(tables) == stats.extract_output(per_row)
    whole = stats.add_input(stats.create_accumulator(), ("manifest_table", table))
    assert stats.extract_output(whole) == stats.extract_output(per_row)
    # the job's way: one accumulator per table where it is made (``table_stats``), folded in as "stats"
    folded = stats.create_accumulator()
    for start in range(0, len(rows), 77):
        folded = stats.add_input(folded, table_stats(table.slice(start, 77), 3))
    assert stats.extract_output(folded) == stats.extract_output(per_row)


def test_table_coder_round_trips_tables():
    """``ArrowTableCoder`` (tables across stage boundaries): the same schema and values back, for a
    table with all-null, one-valued and varying columns, one row, and none; the size estimate is the
    table's buffer size (no encoding)."""
    table = pa.table({"key": ["a", "b", None], "source": ["txt"] * 3, "x": pa.nulls(3, pa.float64()),
                      "n": pa.array([1, 1, 1], pa.int32()), "s": pa.array([None] * 3, pa.string())},
                     schema=pa.schema([("key", pa.string()), ("source", pa.string()), ("x", pa.float64()),
                                       ("n", pa.int32()), ("s", pa.string())]))
    coder = batched.ArrowTableCoder()
    for t in (table, table.slice(1, 1), table.slice(0, 0), pa.concat_tables([table, table])):
        back = coder.decode(coder.encode(t))
        assert back.schema == t.schema and back.to_pylist() == t.to_pylist()
    assert coder.estimate_size(table) == table.nbytes


def test_manifest_parts_merge_to_the_sorted_file(tmp_path):
    """``WriteSortedParquet(tables=True)``: each table as a part beside the file, merged sorted by key,
    the parts removed; a part named twice (a retried bundle) counts once; no table, an empty file."""
    from pipelines.curate.schema import MANIFEST_SCHEMA
    from pipelines.curate.sinks import merge_parts, write_part

    path = str(tmp_path / "manifest.parquet")
    rows = [{**{f.name: None for f in MANIFEST_SCHEMA}, "key": k, "fate": "kept", "has_image": False} for k in "dbca"]
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    parts = [p for t in (table.slice(0, 2), table.slice(2), table.slice(0, 0)) for p in write_part(t, path, MANIFEST_SCHEMA)]
    assert len(parts) == 2
    assert merge_parts(parts + parts[:1], path, MANIFEST_SCHEMA) == 4
    assert pq.read_table(path).column("key").to_pylist() == ["a", "b", "c", "d"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.parquet"]
    assert merge_parts([], path, MANIFEST_SCHEMA) == 0 and pq.read_table(path).num_rows == 0
