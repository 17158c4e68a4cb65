"""SemDeDup on Beam (shared by the curate and filter jobs), in two shuffles of packed blocks and a keyed join.

    records --RankRows--> (rank, key, vector, score) --SampleForKMeans/TrainKMeans--> centroids (side input)
      --BucketRows--> (bucket, row) --GroupIntoBuckets--> AssignBlocks: one faiss search per batch of rows,
        nearest centroid and, within ``margin``, the second nearest --> (cluster, Block)
      --GroupByCluster--> PairsInCluster: ``filters.semdedup.cluster_pairs`` --> pair blocks
      --GatherPairs--> ResolvePairs: ``filters.semdedup.resolve_pairs`` over every pair --> (key, decision)
    records + home clusters + decisions --JoinByKey--> AnnotateRecords

The same four steps as ``filters.semdedup.deduplicate``, and the same result on the same sample
(``tests/test_filters_semdedup.py`` checks that). What one worker holds at a time:

- the k-means sample (``kmeans_sample_size`` vectors) and the centroids;
- one bucket of about ``ASSIGN_BATCH`` rows (buckets = ceil(records / ``ASSIGN_BATCH``), keyed by
  the row's sample rank, so they are even): assignment is one (batch, d) x (d, k) search, not one
  search per record;
- one cluster's block (about ``target_cluster_size`` rows, times 1.1 for the margin copies);
- the pairs, and only the pairs: records in no pair never reach the keep decision (they are kept).
  Pairs are what dedup removes (a 1M set with 5% duplicates has about 60k), 24 bytes each plus
  their keys; at 1B rows with 10% duplicates that is about 5 GB in the one ``ResolvePairs``
  worker (BENCHMARKS.md, "Semantic dedup at 1B").

Embeddings travel as ``WIRE_DTYPE`` (float16) rows inside blocks, not per-record dicts: 2 bytes
per dimension. float16 moves a cosine by about 2e-5 in 512-d (a rounding of 2^-11 per component,
averaged over 512 of them), so a pair within that of ``1 - eps`` may flip; ``wire_dtype="float32"``
ships exact vectors.

The sample is the ``kmeans_sample_size`` records with the smallest ``sha1(seed, key)``: a uniform
sample that is the same on every run and runner, so clusters, and hence results, are reproducible.
No step emits from ``finish_bundle`` (Beam's Dask runner drops that output: ``BatchElements`` and
``Top.Of`` lost records there) and none has tagged outputs (Dask gives every element to each).

Choosing the knobs (``filters.config.CurateConfig``):

- k = ceil(records / ``target_cluster_size``) (default 1,000), so each cluster costs about
  1,000^2 cosines; faiss wants >= 39 sample points per centroid, so k <= sample / 40. The default
  sample of 50,000 (about 150 MB of 768-d float32 in one worker) allows k <= 1,250, which keeps
  the target size up to about 1.25M records; above that, raise ``kmeans_sample_size`` or set
  ``kmeans_clusters`` (SemDeDup clustered LAION-440M into 50,000 clusters).
- ``semdedup_eps`` (duplicates: cosine >= 1 - eps) defaults to 0.05. The right value depends on
  the embedding model and on how much the dataset may shrink; the manifest's
  ``duplicate_similarity`` column and the report's group-size plot show what a given eps removed.
- ``margin`` (a ``SemanticDedup`` argument, 0.01 as in ``deduplicate``): a row also goes to its
  second-nearest centroid when that one's cosine is within ``margin`` of the nearest's.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from filters import reasons, semdedup
from filters.config import CurateConfig
from pipelines.records import EMBEDDING_FIELDS, dropped, effective_aesthetic

ASSIGN_BATCH = 8192  # rows per bucket, and per faiss search: 8192 x 768 float16 = 12 MB
WIRE_DTYPE = "float16"
MARGIN = 0.01  # second-nearest-centroid margin, as filters.semdedup.deduplicate's default


def sample_rank(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha1(f"{seed}:{key}".encode("utf-8")).digest()[:8], "big")


def _rank_row(record: dict, field: str, seed: int) -> tuple[int, str, np.ndarray, float]:
    score = effective_aesthetic(record)
    return (sample_rank(seed, record["key"]), record["key"], np.asarray(record[field], np.float32),
            math.nan if score is None else float(score))


def _rank(item: tuple) -> int:
    return item[0]


def train_centroids(sample: list, n_total: int, cfg: CurateConfig) -> np.ndarray | None:
    """k-means centroids from the sample (sorted by rank for a stable order); None if empty."""
    if not sample:
        return None
    vectors = np.stack([row[2] for row in sorted(sample, key=_rank)])
    k = cfg.kmeans_clusters or semdedup.choose_n_clusters(n_total, len(vectors), cfg.target_cluster_size)
    Metrics.distribution("curate", "kmeans_clusters").update(min(k, len(vectors)))
    return semdedup.train_kmeans(vectors, k, niter=cfg.kmeans_iterations, seed=cfg.kmeans_seed)


def _bucket_row(row: tuple, n_total: int, batch: int, wire_dtype: str):
    rank, key, vector, score = row
    return rank % max(1, math.ceil(n_total / batch)), (key, vector.astype(wire_dtype), score)


@dataclass(frozen=True)
class Block:
    """Rows of one cluster, packed: ``keys`` (n,), ``vectors`` (n, d) wire dtype, ``scores`` (n,)
    float64 (NaN: unknown), ``home`` (n,) int64: each row's nearest cluster (the one it is
    reported under; a margin copy has a different one)."""

    keys: tuple
    vectors: np.ndarray
    scores: np.ndarray
    home: np.ndarray


class AssignBlocksFn(beam.DoFn):
    """(bucket, rows) -> (cluster, Block) per cluster met, one faiss search per ``batch`` rows."""

    def __init__(self, margin: float, batch: int):
        self.margin, self.batch = margin, batch

    def setup(self):
        self._centroids = self._index = None

    def process(self, keyed, centroids: np.ndarray):
        if centroids is not self._centroids:  # a side input is one object for a whole bundle
            self._centroids, self._index = centroids, semdedup.centroid_index(centroids)
        chunk = []
        for row in keyed[1]:  # the grouped iterable may be lazy: hold one batch at a time
            chunk.append(row)
            if len(chunk) == self.batch:
                yield from self._blocks(chunk)
                chunk = []
        if chunk:
            yield from self._blocks(chunk)

    def _blocks(self, chunk: list):
        keys = np.asarray([k for k, _, _ in chunk], object)
        vectors = np.stack([v for _, v, _ in chunk])
        scores = np.asarray([s for _, _, s in chunk], np.float64)
        assigned = semdedup.assign_clusters(vectors.astype(np.float32), self._centroids, self._index,
                                            margin=self.margin).reshape(len(chunk), -1)
        home = assigned[:, 0]
        rows = np.concatenate([np.arange(len(chunk))] + [np.flatnonzero(assigned[:, 1] >= 0)] * (assigned.shape[1] > 1))
        labels = np.concatenate([home] + [assigned[assigned[:, 1] >= 0, 1]] * (assigned.shape[1] > 1))
        Metrics.counter("curate", "semdedup_margin_copies").inc(int(len(rows) - len(chunk)))
        order = np.argsort(labels, kind="stable")
        rows, labels = rows[order], labels[order]
        bounds = np.flatnonzero(np.r_[True, labels[1:] != labels[:-1], True])
        for st, en in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            r = rows[st:en]
            yield int(labels[st]), Block(tuple(keys[r]), vectors[r], scores[r], home[r])


def _concat(blocks) -> Block:
    blocks = list(blocks)
    return Block(sum((b.keys for b in blocks), ()), np.concatenate([b.vectors for b in blocks]),
                 np.concatenate([b.scores for b in blocks]), np.concatenate([b.home for b in blocks]))


def pairs_in_cluster(keyed, modality: str, eps: float):
    """(cluster, Blocks) -> one pair block (keys, scores, i, j, similarity) over the members in a pair."""
    cluster, block = keyed[0], _concat(keyed[1])
    Metrics.distribution("curate", f"cluster_size_{modality}").update(len(block.keys))
    if len(block.keys) < 2:
        return
    pairs = semdedup.cluster_pairs(block.vectors.astype(np.float32), eps)
    if len(pairs.i) == 0:
        return
    members, inverse = np.unique(np.r_[pairs.i, pairs.j], return_inverse=True)
    keys = np.asarray(block.keys, object)
    yield (keys[members], block.scores[members], inverse[:len(pairs.i)], inverse[len(pairs.i):], pairs.similarity)


def home_clusters(keyed):
    """(cluster, Blocks) -> (key, cluster) for every row whose nearest cluster this is."""
    cluster = keyed[0]
    for block in keyed[1]:
        for key, home in zip(block.keys, block.home.tolist()):
            if home == cluster:
                yield key, cluster


def _to_one_key(pair_block):
    return None, pair_block


def resolve(keyed):
    """(None, pair blocks) -> (key, ("duplicate", kept key, cosine)) per dropped record and
    (key, ("kept", n dropped as its duplicates)) per kept record that has any: the keep rule over
    every pair at once (``filters.semdedup.resolve_pairs``), a pair met in two clusters once."""
    blocks = list(keyed[1])
    if not blocks:
        return
    keys = np.concatenate([b[0] for b in blocks])
    scores = np.concatenate([b[1] for b in blocks])
    offsets = np.cumsum([0] + [len(b[0]) for b in blocks[:-1]])
    i = np.concatenate([b[2] + o for b, o in zip(blocks, offsets)])
    j = np.concatenate([b[3] + o for b, o in zip(blocks, offsets)])
    sim = np.concatenate([b[4] for b in blocks])
    ids, first, inverse = np.unique(keys.astype(str), return_index=True, return_inverse=True)
    i, j = inverse[i], inverse[j]
    lo, hi = np.minimum(i, j), np.maximum(i, j)
    _, once = np.unique(lo * len(ids) + hi, return_index=True)
    pairs = semdedup.Pairs(lo[once].astype(np.int64), hi[once].astype(np.int64), sim[once].astype(np.float32))
    id_list = ids.tolist()
    found = semdedup.resolve_pairs(id_list, [None if math.isnan(s) else float(s) for s in scores[first]], pairs)
    n_dups = np.bincount(found.duplicate_of[found.duplicate_of >= 0], minlength=len(id_list))
    for m, key in enumerate(id_list):
        if not found.keep[m]:
            yield key, ("duplicate", id_list[int(found.duplicate_of[m])], float(found.similarity[m]))
        elif n_dups[m]:
            yield key, ("kept", int(n_dups[m]))


def _by_key(record: dict):
    return record["key"], record


def annotate(keyed, modality: str):
    """(key, {records, clusters, decisions}) -> the records, annotated as the manifest needs."""
    _, joined = keyed
    cluster = next(iter(joined["clusters"]), None)
    decision = next(iter(joined["decisions"]), None)
    for record in joined["records"]:
        record = {**record, "dedup_on": modality, "cluster_id": cluster}
        if decision is None:
            yield record
        elif decision[0] == "kept":
            record["n_duplicates"] = decision[1] + (record.get("n_duplicates") or 0)
            yield record
        else:
            Metrics.counter("curate", f"filtered_{reasons.SEMANTIC_DUPLICATE}").inc()
            yield dropped(record, "semdedup", reasons.SEMANTIC_DUPLICATE,
                          duplicate_of=decision[1], duplicate_similarity=decision[2])


class SemanticDedup(beam.PTransform):
    """SemDeDup over the ``modality`` ("text" or "image") embedding of every input record.

    Duplicates: cosine similarity >= 1 - ``cfg.semdedup_eps``. Kept per duplicate group: highest
    aesthetic score, then smallest id. ``margin``: second-nearest-centroid margin (0: nearest
    only); ``wire_dtype``: how embeddings travel between stages; ``batch``: rows per assignment.
    """

    def __init__(self, modality: str, cfg: CurateConfig, *, margin: float = MARGIN, wire_dtype: str = WIRE_DTYPE,
                 batch: int = ASSIGN_BATCH):
        super().__init__()
        self.modality = modality
        self.field = EMBEDDING_FIELDS[modality]
        self.cfg = cfg
        self.margin, self.wire_dtype, self.batch = margin, wire_dtype, batch

    def expand(self, records):
        cfg = self.cfg
        rows = records | "RankRows" >> beam.Map(_rank_row, self.field, cfg.kmeans_seed)
        # CombineGlobally(TopCombineFn), not Top.Of: Top.Of emits from finish_bundle, which Beam's
        # Dask runner drops (the sample came out empty there); the result is the same.
        sample = rows | "SampleForKMeans" >> beam.CombineGlobally(
            beam.combiners.TopCombineFn(cfg.kmeans_sample_size, key=_rank, reverse=True))
        count = records | "CountRecords" >> beam.combiners.Count.Globally()
        centroids = sample | "TrainKMeans" >> beam.Map(train_centroids, beam.pvalue.AsSingleton(count), cfg)
        clusters = (rows
                    | "BucketRows" >> beam.Map(_bucket_row, beam.pvalue.AsSingleton(count), self.batch, self.wire_dtype)
                    | "GroupIntoBuckets" >> beam.GroupByKey()
                    | "AssignBlocks" >> beam.ParDo(AssignBlocksFn(self.margin, self.batch),
                                                   beam.pvalue.AsSingleton(centroids))
                    | "GroupByCluster" >> beam.GroupByKey())
        decisions = (clusters
                     | "PairsInCluster" >> beam.FlatMap(pairs_in_cluster, self.modality, cfg.semdedup_eps)
                     | "GatherPairs" >> beam.Map(_to_one_key)
                     | "GroupPairs" >> beam.GroupByKey()
                     | "ResolvePairs" >> beam.FlatMap(resolve))
        homes = clusters | "HomeClusters" >> beam.FlatMap(home_clusters)
        keyed = records | "KeyRecords" >> beam.Map(_by_key)
        return ({"records": keyed, "clusters": homes, "decisions": decisions}
                | "JoinByKey" >> beam.CoGroupByKey()
                | "AnnotateRecords" >> beam.FlatMap(annotate, self.modality))
