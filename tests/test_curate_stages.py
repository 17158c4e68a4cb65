"""Beam stages of the curate job on planted inputs: SemDeDup over a GroupByKey per cluster, the
CLIP-score cutoff from ApproximateQuantiles, and the same job in multi-processing mode."""

import sys

import pyarrow.parquet as pq
import pytest

import apache_beam as beam
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from filters.config import CurateConfig
from pipelines import curate
from pipelines.dedup import SemanticDedup
from pipelines.stages import FilterScores

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from test_filters_semdedup import planted  # noqa: E402


def _summary(record):
    return record["key"], record["reason"], record.get("duplicate_of"), record.get("n_duplicates")


def test_semantic_dedup_transform_finds_planted_groups():
    ids, x, groups = planted(n_groups=4, group_size=3, n_singles=5)
    scores = {ids[groups[0][1]]: 9.0, ids[groups[2][2]]: 8.0}  # these win their groups; others: smallest id
    records = [{"key": i, "text_embedding": v, "aesthetic_score": scores.get(i), "reason": None}
               for i, v in zip(ids, x)]
    winners = {0: groups[0][1], 1: groups[1][0], 2: groups[2][2], 3: groups[3][0]}
    expected = [(i, None, None, None) for i in ids if i.startswith("single")]
    for g, members in enumerate(groups):
        win = ids[winners[g]]
        expected.append((win, None, None, 2))
        expected += [(ids[m], "semantic_duplicate", win, None) for m in members if ids[m] != win]
    cfg = CurateConfig(kmeans_clusters=4, semdedup_eps=0.05, kmeans_sample_size=100)
    with BeamTestPipeline() as p:
        out = p | beam.Create(records) | SemanticDedup("text", cfg) | beam.Map(_summary)
        assert_that(out, equal_to(expected))


def test_semantic_dedup_without_vectors_gives_the_same_records_less_their_embeddings():
    ids, x, _ = planted(n_groups=4, group_size=3, n_singles=5)
    records = [{"key": i, "image_embedding": v, "text_embedding": v[::-1].copy(), "aesthetic_score": float(n % 3),
                "reason": None} for n, (i, v) in enumerate(zip(ids, x))]
    cfg = CurateConfig(kmeans_clusters=4, semdedup_eps=0.05, kmeans_sample_size=100)

    def light(record):  # what keep_vectors=False must give: the record less both embeddings, has_image set
        return record["key"], sorted([(k, repr(v)) for k, v in record.items() if not k.endswith("_embedding")]
                                     + [("has_image", "True")])

    def shape(record):
        return record["key"], sorted((k, repr(v)) for k, v in record.items())

    def same(keyed):
        key, (full, stripped) = keyed
        return key, len(full) == len(stripped) == 1 and full[0] == stripped[0], any("duplicate_of" in f for f, _ in full[0])

    with BeamTestPipeline() as p:
        source = p | beam.Create(records)
        full = source | "Full" >> SemanticDedup("image", cfg) | "Light" >> beam.Map(light)
        stripped = source | "Stripped" >> SemanticDedup("image", cfg, keep_vectors=False) | "Shape" >> beam.Map(shape)
        out = (full, stripped) | beam.CoGroupByKey() | beam.Map(same)
        # every record the same, the 8 planted duplicates among them
        assert_that(out | "Equal" >> beam.Map(lambda r: r[1]) | "CountEqual" >> beam.combiners.Count.PerElement(),
                    equal_to([(True, len(ids))]), label="all_equal")
        assert_that(out | "Dup" >> beam.Map(lambda r: r[2]) | "CountDup" >> beam.combiners.Count.PerElement(),
                    equal_to([(True, 8), (False, len(ids) - 8)]), label="duplicates")


def test_semantic_dedup_sample_smaller_than_input():
    """k-means trains on a 12-record sample of 17; assignment and dedup still cover every record."""
    ids, x, groups = planted(n_groups=4, group_size=3, n_singles=5)
    records = [{"key": i, "image_embedding": v, "reason": None} for i, v in zip(ids, x)]
    cfg = CurateConfig(kmeans_clusters=3, semdedup_eps=0.05, kmeans_sample_size=12)
    with BeamTestPipeline() as p:
        out = (p | beam.Create(records) | SemanticDedup("image", cfg)
               | beam.Map(lambda r: (r["reason"] is None, r["dedup_on"])) | beam.combiners.Count.PerElement())
        # every planted group keeps one member (all 4 groups and 5 singles => 9 kept, 8 dropped),
        # unless k-means split a group, which three clusters over 9 directions must not do here
        assert_that(out, equal_to([((True, "image"), 9), ((False, "image"), 8)]))


def _row(record):
    return record["key"], record["reason"]


def test_clip_score_top_fraction_and_fixed_threshold():
    # ten scores 0.0..0.9: five from this job's CLIP, five from LAION's similarity column
    records = [{"key": f"r{i}", "reason": None, "clip_score": i / 10 if i % 2 else None,
                "laion_similarity": None if i % 2 else i / 10} for i in range(10)]
    records.append({"key": "dropped", "reason": "too_few_words", "clip_score": 1.0})  # not counted
    records.append({"key": "unscored", "reason": None})  # no score: not judged
    top = CurateConfig(clip_model="dd-tiny-clip", clip_weights="random", clip_score_top_fraction=0.3)
    with BeamTestPipeline() as p:
        filtered, cutoff = p | beam.Create(records) | FilterScores(top)
        expected = [(f"r{i}", None if i >= 7 else "clip_score_below_threshold") for i in range(10)]
        assert_that(filtered | beam.Map(_row), equal_to(expected + [("dropped", "too_few_words"), ("unscored", None)]))
        assert_that(cutoff, equal_to([0.7]), label="Cutoff")
    fixed = CurateConfig(clip_model="dd-tiny-clip", clip_weights="random", clip_score_threshold=0.45)
    with BeamTestPipeline() as p:
        filtered, _ = p | beam.Create(records[:10]) | FilterScores(fixed)
        expected = [(f"r{i}", None if i >= 5 else "clip_score_below_threshold") for i in range(10)]
        assert_that(filtered | beam.Map(_row), equal_to(expected))


@pytest.mark.slow
def test_multi_processing_mode_gives_the_same_manifest(tmp_path):
    (tmp_path / "p.txt").write_text("a red bicycle\nA Red Bicycle\nhi\na blue car on a road\na blue car on a road\n")
    args = ["--input", str(tmp_path / "p.txt"), "--preset", "tiny"]
    a = curate.run(args + ["--output", str(tmp_path / "a")])
    b = curate.run(args + ["--output", str(tmp_path / "b"), "--direct_running_mode=multi_processing",
                           "--direct_num_workers=2"])
    assert (a["kept"], a["filtered"] + a["duplicate"], a["rejected"]) == (b["kept"], b["filtered"] + b["duplicate"], b["rejected"]) == (2, 3, 0)
    cols = ["key", "caption", "fate", "reason", "duplicate_of"]
    assert pq.read_table(tmp_path / "a" / "manifest.parquet", columns=cols).to_pylist() == \
        pq.read_table(tmp_path / "b" / "manifest.parquet", columns=cols).to_pylist()
