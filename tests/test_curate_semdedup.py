"""The Beam SemDeDup path (``pipelines.dedup.SemanticDedup``) against the bare
``filters.semdedup.deduplicate`` on the same data and the same k-means sample: the same records
kept, each dropped one naming the same kept record, and batched assignment in buckets."""

import json
import math
from functools import partial

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.util import assert_that

from filters.config import CurateConfig
from filters import semdedup
from filters.semdedup import deduplicate, find_duplicates
from pipelines import dedup

EPS = 0.05


def planted_rows(n=600, dim=32, n_groups=60, seed=0):
    """Unit rows with cosines ~0.2-0.5 between unrelated ones, and planted pairs/triples whose
    cosine to their base is 0.002 to 0.01 below ``1 - EPS`` or 0.002 and more above it: no pair
    within float16's rounding (about 1e-4 in 32-d) of the threshold, so both wire dtypes agree."""
    rng = np.random.default_rng(seed)
    unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)  # noqa: E731
    topics = unit(rng.normal(size=(6, dim)))
    x = unit(0.6 * topics[rng.integers(6, size=n)] + 0.4 * unit(rng.normal(size=dim)) + 0.8 * unit(rng.normal(size=(n, dim))))
    members = rng.permutation(n)[: 3 * n_groups].reshape(n_groups, 3)
    for g in members:
        for m in g[1: 2 + int(rng.random() < 0.5)]:
            c = rng.choice([rng.uniform(1 - EPS + 0.002, 1.0), rng.uniform(1 - EPS - 0.01, 1 - EPS - 0.002)], p=[0.8, 0.2])
            u = unit(rng.normal(size=dim))
            u = unit(u - (u @ x[g[0]]) * x[g[0]])
            x[m] = c * x[g[0]] + math.sqrt(1 - c * c) * u
    keys = [f"k{i:05d}" for i in range(n)]
    scores = [None if i % 7 == 0 else float(s) for i, s in enumerate(rng.uniform(3, 8, n))]
    return x.astype(np.float32), keys, scores


FIELDS = ("key", "duplicate_of", "duplicate_similarity", "n_duplicates", "cluster_id", "dedup_on", "reason")


def save_rows(rows, path):
    """An ``assert_that`` matcher that hands the output back: the pipeline runs on pickled copies."""
    with open(path, "w") as f:
        json.dump([{k: r.get(k) for k in FIELDS} for r in rows], f)


def run_job(x, keys, scores, cfg, path, **kwargs):
    records = [{"key": k, "text_embedding": x[i], "aesthetic_score": scores[i], "stage": None, "reason": None}
               for i, k in enumerate(keys)]
    p = BeamTestPipeline()
    out = p | beam.Create(records) | dedup.SemanticDedup("text", cfg, **kwargs)
    assert_that(out, partial(save_rows, path=str(path)))
    result = p.run()
    result.wait_until_finish()
    counters = {}
    for c in result.metrics().query(MetricsFilter())["counters"]:  # a name counted in several steps: summed
        counters[c.key.metric.name] = counters.get(c.key.metric.name, 0) + c.committed
    with open(path) as f:
        return {r["key"]: r for r in json.load(f)}, counters


def bare_on_the_jobs_sample(x, keys, scores, cfg):
    """``deduplicate`` on every row, rows in the job's sample order (sha1 rank): the same k-means input."""
    order = sorted(range(len(keys)), key=lambda i: dedup.sample_rank(cfg.kmeans_seed, keys[i]))
    found = deduplicate(x[order], [keys[i] for i in order], [scores[i] for i in order], EPS,
                        sample_size=len(keys), n_clusters=cfg.kmeans_clusters, niter=cfg.kmeans_iterations,
                        margin=dedup.MARGIN, seed=cfg.kmeans_seed, target_cluster_size=cfg.target_cluster_size)
    ordered = [keys[i] for i in order]
    return {ordered[m]: (None if found.keep[m] else ordered[int(found.duplicate_of[m])]) for m in range(len(order))}


@pytest.mark.parametrize("wire_dtype", ["float32", "float16"])
def test_job_keeps_what_deduplicate_keeps(wire_dtype, tmp_path):
    x, keys, scores = planted_rows()
    cfg = CurateConfig(semdedup_eps=EPS, kmeans_clusters=6, kmeans_sample_size=len(keys))
    want = bare_on_the_jobs_sample(x, keys, scores, cfg)
    # batch 64: 10 buckets of about 60 rows, so assignment runs in several batches
    got, counters = run_job(x, keys, scores, cfg, tmp_path / "out.json", wire_dtype=wire_dtype, batch=64)
    # both kinds of decision were made: groups whole in one cluster, and groups across a border
    assert counters["semdedup_pairs_local"] > 0 and counters["semdedup_pairs_border"] > 0
    assert counters["semdedup_margin_copies"] > 0
    assert counters["semdedup_border_groups"] >= 1
    assert sorted(got) == sorted(keys)  # every record once
    assert {k: r.get("duplicate_of") for k, r in got.items()} == want
    assert 40 <= sum(v is not None for v in want.values()) <= 120  # the planted groups were found
    for k, r in got.items():
        assert r["dedup_on"] == "text" and 0 <= r["cluster_id"] < 6
        if r.get("duplicate_of"):
            assert r["reason"] == "semantic_duplicate" and r["duplicate_similarity"] >= 1 - EPS - 1e-3
    n_dropped_for = {}
    for v in want.values():
        if v is not None:
            n_dropped_for[v] = n_dropped_for.get(v, 0) + 1
    assert {k: r["n_duplicates"] for k, r in got.items() if r.get("n_duplicates")} == n_dropped_for


def test_assignment_is_one_search_per_batch(monkeypatch, tmp_path):
    x, keys, scores = planted_rows(n=200, n_groups=10)
    calls = []
    real = dedup.semdedup.assign_clusters

    def counting(embeddings, *args, **kwargs):
        calls.append(len(embeddings))
        return real(embeddings, *args, **kwargs)

    monkeypatch.setattr(dedup.semdedup, "assign_clusters", counting)
    cfg = CurateConfig(semdedup_eps=EPS, kmeans_clusters=3, kmeans_sample_size=200)
    got, _ = run_job(x, keys, scores, cfg, tmp_path / "out.json", batch=50, margin=0.0)  # nearest only
    assert sum(calls) == 200 and len(calls) <= 8  # 4 buckets of about 50 rows, not 200 searches
    assert sorted(got) == sorted(keys)
    order = sorted(range(len(keys)), key=lambda i: dedup.sample_rank(cfg.kmeans_seed, keys[i]))
    found = deduplicate(x[order], [keys[i] for i in order], [scores[i] for i in order], EPS, sample_size=200,
                        n_clusters=3, margin=0.0)
    assert {keys[i] for i, k in zip(order, found.keep) if k} == {k for k, r in got.items() if not r["duplicate_of"]}


def test_two_levels_keep_clusters_near_the_target_and_find_every_pair(monkeypatch):
    """One coarse cluster of 600 rows (k forced to 1, as when n outgrows sample / 40 x target): the
    second level splits it into clusters of about 40 rows, and with the margin the result is the
    exact one (every pair compared at once)."""
    x, keys, scores = planted_rows()
    sizes = []
    real = semdedup.cluster_pairs
    monkeypatch.setattr(semdedup, "cluster_pairs", lambda e, *a, **k: sizes.append(len(e)) or real(e, *a, **k))
    found = deduplicate(x, keys, scores, EPS, n_clusters=1, target_cluster_size=10, sample_size=600, margin=0.05)
    assert len(sizes) >= 12 and max(sizes) <= 150 and sum(sizes) < 2 * 600  # 15 fine clusters, margin copies
    sizes.clear()
    exact = find_duplicates(keys, x, scores, EPS)
    assert sizes == [600]
    assert found.keep.tolist() == exact.keep.tolist() and found.duplicate_of.tolist() == exact.duplicate_of.tolist()
    assert 40 <= (~exact.keep).sum() <= 120


@pytest.mark.parametrize("spread_factor", [1, 1000])
def test_job_splits_oversized_clusters_and_keeps_what_deduplicate_keeps(spread_factor, tmp_path):
    """Two coarse clusters of about 300 rows, target 5: each is split by a second k-means level
    (k capped at 300 / 40: fine clusters of about 40) into work units, and fine clusters still above
    8 x 5 rows are compared in row blocks of 20; the units spread over workers (spread factor 1) or
    run where the cluster was grouped (1000)."""
    x, keys, scores = planted_rows()
    cfg = CurateConfig(semdedup_eps=EPS, kmeans_clusters=2, kmeans_sample_size=len(keys), target_cluster_size=5)
    want = bare_on_the_jobs_sample(x, keys, scores, cfg)
    got, counters = run_job(x, keys, scores, cfg, tmp_path / "out.json", wire_dtype="float32", batch=256,
                            spread_factor=spread_factor)
    assert counters["semdedup_split_clusters"] == 2 and counters["semdedup_block_split_clusters"] > 0
    assert counters["semdedup_spread_clusters"] == (2 if spread_factor == 1 else 0)
    assert counters["semdedup_border_groups"] > 10  # border pairs resolved group by group, not all at once
    assert sorted(got) == sorted(keys)
    assert {k: r.get("duplicate_of") for k, r in got.items()} == want
    assert 40 <= sum(v is not None for v in want.values()) <= 120


def test_kmeans_sample_from_emb_npy_sidecars(tmp_path):
    """The sample read from ``.emb.npy`` sidecars (three files of the same embeddings, one for every
    200 records): a sample of 250 rows of 600 trains the centroids, and the job gives the exact answer."""
    x, keys, scores = planted_rows()
    paths = []
    for s in range(3):
        paths.append(str(tmp_path / f"{s:06d}.emb.npy"))
        np.save(paths[-1], x[200 * s: 200 * (s + 1)].astype(np.float16))
    cfg = CurateConfig(semdedup_eps=EPS, kmeans_clusters=3, kmeans_sample_size=250)
    # margin 2: every row in each of its 3 clusters, so every pair is compared whatever the clusters
    # (faiss's threaded k-means may move a border between runs): the exact answer, deterministically
    got, counters = run_job(x, keys, scores, cfg, tmp_path / "out.json", sidecars=tuple(paths), margin=2.0)
    assert 300 <= counters["kmeans_sample_sidecar_rows"] <= 700  # about 2 x 250 candidates, then the top 250
    assert counters["semdedup_margin_copies"] == 2 * len(keys)
    exact = find_duplicates(keys, x, scores, EPS)  # every pair compared at once
    want = {k: None if exact.keep[m] else keys[int(exact.duplicate_of[m])] for m, k in enumerate(keys)}
    assert {k: r.get("duplicate_of") for k, r in got.items()} == want


def save_fates(items, path):
    """An ``assert_that`` matcher that hands ``(block id, Fates)`` back as plain lists."""
    with open(path, "w") as f:
        json.dump([[block, list(fates.keys), fates.cluster.tolist(), list(fates.duplicate_of),
                    [None if math.isnan(s) else s for s in fates.similarity.tolist()], fates.n_duplicates.tolist()]
                   for block, fates in items], f)


def test_block_path_keeps_what_deduplicate_keeps(tmp_path):
    """``SemanticDedupBlocks`` fed six blocks of 100 rows, three ``Rows`` (float16 in memory) and
    three ``EmbeddingRows`` (rows of a saved ``.npy``, read when needed) -> one ``Fates`` per block,
    in the block's row order, with the bare functions' keep set on the same k-means sample."""
    x, keys, scores = planted_rows()
    cfg = CurateConfig(semdedup_eps=EPS, kmeans_clusters=6, kmeans_sample_size=len(keys))
    want = bare_on_the_jobs_sample(x, keys, scores, cfg)
    np.save(tmp_path / "x.npy", x)
    blocks = []
    for b in range(6):
        rows = slice(100 * b, 100 * (b + 1))
        block_scores = np.asarray([math.nan if s is None else s for s in scores[rows]])
        if b < 3:  # packed in memory
            blocks.append(dedup.Rows(b, tuple(keys[rows]), x[rows].astype(np.float16), block_scores))
        else:  # read from the .npy file by the steps that need the vectors
            blocks.append(dedup.EmbeddingRows(b, str(tmp_path / "x.npy"), rows.start, rows.stop, tuple(keys[rows]),
                                              block_scores))
    p = BeamTestPipeline()
    out = p | beam.Create(blocks) | dedup.SemanticDedupBlocks("text", cfg, batch=64)
    assert_that(out, partial(save_fates, path=str(tmp_path / "fates.json")))
    p.run().wait_until_finish()
    with open(tmp_path / "fates.json") as f:
        fates = sorted(json.load(f))
    assert [b for b, *_ in fates] == list(range(6))
    got, n_dups = {}, {}
    for block, fkeys, cluster, duplicate_of, similarity, n_duplicates in fates:
        assert fkeys == keys[100 * block: 100 * (block + 1)]  # the block's own row order
        assert all(0 <= c < 6 for c in cluster)
        for k, d, s, m in zip(fkeys, duplicate_of, similarity, n_duplicates):
            got[k] = d
            assert (d is None) == (s is None) and (s is None or s >= 1 - EPS - 1e-3)
            if m:
                n_dups[k] = m
    assert got == want
    assert 40 <= sum(v is not None for v in want.values()) <= 120
    dropped_for = {}
    for v in want.values():
        if v is not None:
            dropped_for[v] = dropped_for.get(v, 0) + 1
    assert n_dups == dropped_for


def test_records_come_out_as_they_went_in_but_for_the_annotations(tmp_path):
    """The records travel with their arrays as bytes (no pickle); what comes out equals what went
    in (the float32 embedding, a float64 array, nested values), plus the dedup fields."""
    x, keys, scores = planted_rows(n=120, n_groups=10)
    records = [{"key": k, "text_embedding": x[i], "aesthetic_score": scores[i], "stage": None, "reason": None,
                "extra": np.arange(3, dtype=np.float64) * i, "tags": ["a", i], "n_duplicates": None}
               for i, k in enumerate(keys)]
    cfg = CurateConfig(semdedup_eps=EPS, kmeans_clusters=2, kmeans_sample_size=120)

    def check(rows):
        assert len(rows) == len(records)
        by_key = {r["key"]: r for r in records}
        for r in rows:
            original = by_key[r["key"]]
            assert list(r)[:len(original)] == list(original)  # field order kept
            assert r["text_embedding"].dtype == np.float32 and np.array_equal(r["text_embedding"], original["text_embedding"])
            assert r["extra"].dtype == np.float64 and np.array_equal(r["extra"], original["extra"])
            assert r["tags"] == original["tags"] and r["dedup_on"] == "text"
            assert r["text_embedding"].flags.writeable

    p = BeamTestPipeline()
    out = p | beam.Create(records) | dedup.SemanticDedup("text", cfg)
    assert_that(out, check)
    p.run().wait_until_finish()


def test_shard_path_annotates_records_as_the_records_path_does(tmp_path):
    """``SemanticDedupShards`` ((shard, records) in and out; no record carries its embedding; one
    ``EmbeddingRows`` block per shard of the rows still active; fates joined back by shard) against
    ``SemanticDedup`` on the active records each carrying its embedding (``ActiveOnly``, as the
    filter job ran it), a fifth of each shard's rows already dropped by an earlier stage and the
    k-means sample from the same sidecars: every record the same, the dropped ones unchanged."""
    from pipelines.stages import ActiveOnly

    x, keys, scores = planted_rows(n=300, n_groups=30)
    cfg = CurateConfig(semdedup_eps=EPS, kmeans_clusters=3, kmeans_sample_size=len(keys))
    sidecars = {}
    for shard in range(4):
        sidecars[shard] = str(tmp_path / f"{shard:06d}.emb.npy")
        np.save(sidecars[shard], x[75 * shard: 75 * (shard + 1)])
    light = [{"key": keys[i], "aesthetic_score": scores[i], "input_shard": i // 75, "input_position": i % 75,
              "offset": [i, i + 1], "stage": None, "reason": None} for i in range(len(keys))]
    for r in light[3::5]:  # what the thresholds dropped: no fate from dedup, passed through as is
        r.update(stage="aesthetic", reason="aesthetic_below_threshold")
    heavy = [{**r, "text_embedding": x[i]} for i, r in enumerate(light)]
    shards = [(shard, light[75 * shard: 75 * (shard + 1)]) for shard in range(4)]
    fields = (*FIELDS, "input_shard", "input_position", "offset", "stage")

    def run(elements, stage, path):
        p = BeamTestPipeline()
        out = p | beam.Create(elements) | stage
        if isinstance(elements[0], tuple):
            out = out | beam.FlatMap(lambda kv: kv[1])
        assert_that(out, partial(save_all, path=str(path), fields=fields))
        p.run().wait_until_finish()
        with open(path) as f:
            return {r["key"]: r for r in json.load(f)}

    old = run(heavy, ActiveOnly(dedup.SemanticDedup("text", cfg, sidecars=tuple(sidecars.values()))),
              tmp_path / "old.json")
    new = run(shards, dedup.SemanticDedupShards("text", cfg, sidecars, batch=64), tmp_path / "new.json")
    assert all(r.pop("has_embedding") for r in old.values()) and not any(r.pop("has_embedding") for r in new.values())
    assert new == old and len(new) == len(keys)
    assert all(new[k] == {f: light[i].get(f) for f in fields} for i, k in enumerate(keys) if i % 5 == 3)
    dropped = {k: r["duplicate_of"] for k, r in new.items() if r["reason"] == "semantic_duplicate"}
    assert 15 <= len(dropped) and all(new[k]["stage"] == "semdedup" for k in dropped)
    assert all(new[of]["reason"] is None and new[of]["n_duplicates"] for of in dropped.values())


def save_all(rows, path, fields):
    with open(path, "w") as f:
        json.dump([{**{k: r.get(k) for k in fields}, "has_embedding": "text_embedding" in r} for r in rows], f)


def test_embedding_rows_read_only_the_rows_asked_for(tmp_path):
    x = np.arange(40, dtype=np.float32).reshape(10, 4)
    np.save(tmp_path / "x.npy", x)
    rows = np.array([2, 3, 7])
    got = dedup.EmbeddingRows(5, str(tmp_path / "x.npy"), 2, 8, ("a", "b", "c"), np.zeros(3), "float32", rows).load()
    assert got.block == 5 and got.keys == ("a", "b", "c") and np.array_equal(got.vectors, x[rows])
    with pytest.raises(ValueError, match="rows 2 to 12 asked for"):
        dedup.EmbeddingRows(0, str(tmp_path / "x.npy"), 2, 13, ("a", "b"), np.zeros(2), "float32",
                            np.array([2, 12])).load()


def test_packed_shard_records_come_back_equal():
    """``pack_records`` / ``unpack_records`` (the shard join's encoding): records with different
    field sets, arrays, nested values and None come back equal, fields in their order."""
    records = [{"key": "a", "input_position": 0, "offset": [0, 5], "stage": None, "score": 1.5},
               {"key": "b", "input_position": 1, "offset": [5, 9], "stage": "aesthetic", "reason": "low",
                "detail": "x"},
               {"key": "c", "input_position": 2, "offset": [9, 12], "stage": None, "score": 2.0,
                "e": np.arange(3, dtype=np.float16)}]
    shard, (kind, data) = dedup.pack_records((7, records))
    back = dedup.unpack_records(data)
    assert (shard, kind, isinstance(data, bytes)) == (7, "records", True)
    assert [list(r) for r in back] == [list(r) for r in records]
    assert [{k: v for k, v in r.items() if k != "e"} for r in back] == [{k: v for k, v in r.items() if k != "e"}
                                                                         for r in records]
    assert back[2]["e"].dtype == np.float16 and np.array_equal(back[2]["e"], records[2]["e"])
