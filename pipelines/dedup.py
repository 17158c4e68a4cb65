"""SemDeDup on Beam (shared by the curate and filter jobs), in two shuffles of packed blocks and a keyed join.

    records --RankRows--> (rank, key, vector, score) --SampleForKMeans/TrainKMeans--> centroids (side input)
      --BucketRows--> (bucket, row) --GroupIntoBuckets--> AssignBlocks: one faiss search per batch of rows,
        nearest centroid and, within ``margin``, the second nearest --> (cluster, Block)
      --GroupByCluster--> PairsInCluster: ``filters.semdedup.cluster_pairs``; duplicate groups seen whole
        in the cluster are decided there (``resolve_pairs``) --> (key, decision); the rest --> border pairs;
        an oversized cluster --> work units (second k-means level, row blocks) --SpreadWorkUnits-->
        PairsInWorkUnit: the same per unit
      --GroupBorderPairs--> ResolveBorderPairs: ``resolve_pairs`` over every border pair --> (key, decision)
    records + home clusters + decisions --JoinByKey--> AnnotateRecords

The same four steps as ``filters.semdedup.deduplicate``, and the same result on the same sample
(``tests/test_filters_semdedup.py`` checks that). What one worker holds at a time:

- the k-means sample (``kmeans_sample_size`` vectors) and the centroids;
- one bucket of about ``ASSIGN_BATCH`` rows (buckets = ceil(records / ``ASSIGN_BATCH``), keyed by
  the row's sample rank, so they are even): assignment is one (batch, d) x (d, k) search, not one
  search per record;
- one cluster's block (about ``target_cluster_size`` rows, times 1.1 for the margin copies);
- the border pairs: those of duplicate groups with a member in two clusters (the margin's copies,
  about a tenth of the rows). A group none of whose members is shared is whole in its cluster and
  decided there. Border pairs grow with N, but slowly: 24 bytes each plus their members' keys and
  wire-dtype vectors (the keep rule compares a member with the kept member its dropped neighbours
  name, a pair two clusters may both have missed): about 1.2 GB at 1B rows with 6% of rows in a
  duplicate pair and 3% of pairs on a border (BENCHMARKS.md, "Cost model for 1B embeddings").

Embeddings travel as ``WIRE_DTYPE`` (float16) rows inside blocks, not per-record dicts: 2 bytes
per dimension. float16 moves a cosine by about 2e-5 in 512-d (a rounding of 2^-11 per component,
averaged over 512 of them), so a pair within that of ``1 - eps`` may flip; ``wire_dtype="float32"``
ships exact vectors.

The sample is the ``kmeans_sample_size`` records with the smallest ``sha1(seed, key)``: a uniform
sample that is the same on every run and runner, so clusters, and hence results, are reproducible.
With ``sidecars`` (the ``.emb.npy`` files the filter job's records come from) it is drawn from
those files instead (``sidecar_sample``: a hash of (seed, file, row) ranks the rows; each file
yields the rows below a quantile, then the global top picks the sample), so the k-means input is
read straight from storage, once, and the records carry no rank for it.
No step emits from ``finish_bundle`` (Beam's Dask runner drops that output: ``BatchElements`` and
``Top.Of`` lost records there) and none has tagged outputs (Dask gives every element to each).

Choosing the knobs (``filters.config.CurateConfig``):

- k = ceil(records / ``target_cluster_size``) (default 1,000), so each cluster costs about
  1,000^2 cosines; faiss wants >= 39 sample points per centroid, so k <= sample / 40. The default
  sample of 50,000 (about 150 MB of 768-d float32 in one worker) allows k <= 1,250, which keeps
  the target size up to about 1.25M records; above that a cluster of more than
  ``SPLIT_FACTOR`` (4) x the target is split in its worker by a second k-means level trained on
  its own rows (``filters.semdedup.fine_centroids``: at 1B, 1,250 coarse clusters of 800k rows,
  each into about 800), and the fine clusters go on as work units through a Reshuffle; a fine
  cluster still above ``MAX_UNIT_ROWS_FACTOR`` (8) x the target is compared in row blocks, one
  unit per pair of blocks, its pairs all resolved as border pairs.
- ``semdedup_eps`` (duplicates: cosine >= 1 - eps) defaults to 0.05. The right value depends on
  the embedding model and on how much the dataset may shrink; the manifest's
  ``duplicate_similarity`` column and the report's group-size plot show what a given eps removed.
- ``margin`` (a ``SemanticDedup`` argument, 0.01 as in ``deduplicate``): a row also goes to its
  second-nearest centroid when that one's cosine is within ``margin`` of the nearest's.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from filters import reasons, semdedup
from filters.config import CurateConfig
from filters.semdedup import sample_rank
from pipelines.records import EMBEDDING_FIELDS, dropped, effective_aesthetic

ASSIGN_BATCH = 8192  # rows per bucket, and per faiss search: 8192 x 768 float16 = 12 MB
WIRE_DTYPE = "float16"
MARGIN = 0.01  # second-nearest-centroid margin, as filters.semdedup.deduplicate's default


def _rank_row(record: dict, field: str, seed: int, wire_dtype: str) -> tuple[int, str, np.ndarray, float]:
    score = effective_aesthetic(record)
    return (sample_rank(seed, record["key"]), record["key"], np.asarray(record[field]).astype(wire_dtype),
            math.nan if score is None else float(score))


class SmallestRanks(beam.CombineFn):
    """The ``size`` rows of smallest rank (``TopCombineFn``'s result) with a packed accumulator: rows
    gather in lists and are compacted into (ranks, keys, vectors, scores) arrays, so an accumulator
    pickles as a few arrays, not as one pickled vector per row (the sample is 50,000 rows)."""

    def __init__(self, size: int):
        self.size = size

    def create_accumulator(self):
        return [None, []]  # packed (ranks uint64, keys object, vectors, scores), rows not yet packed

    def add_input(self, acc, row):
        acc[1].append(row)
        if len(acc[1]) >= 2 * self.size:
            acc = self._compact(acc)
        return acc

    def _compact(self, acc):
        packed, rows = acc
        parts = [packed] if packed is not None else []
        if rows:
            parts.append((np.fromiter((r[0] for r in rows), np.uint64, len(rows)), np.asarray([r[1] for r in rows], object),
                          np.stack([r[2] for r in rows]), np.asarray([r[3] for r in rows], np.float64)))
        if not parts:
            return [None, []]
        ranks, keys, vectors, scores = (np.concatenate([p[i] for p in parts]) for i in range(4))
        if len(ranks) > self.size:
            keep = np.argpartition(ranks, self.size - 1)[:self.size]
            ranks, keys, vectors, scores = ranks[keep], keys[keep], vectors[keep], scores[keep]
        return [(ranks, keys, vectors, scores), []]

    def merge_accumulators(self, accumulators):
        rows, packed = [], []
        for acc in accumulators:
            rows += acc[1]
            if acc[0] is not None:
                packed.append(acc[0])
        merged = tuple(np.concatenate([p[i] for p in packed]) for i in range(4)) if packed else None
        return self._compact([merged, rows])

    def extract_output(self, acc):
        packed, _ = self._compact(acc)
        if packed is None:
            return []
        order = np.argsort(packed[0], kind="stable")
        return [(int(packed[0][i]), packed[1][i], packed[2][i], float(packed[3][i])) for i in order.tolist()]


def _rank(item: tuple) -> int:
    return item[0]


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 (wrapping arithmetic): a fast, well-spread hash of row numbers."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def sidecar_sample(path: str, n_total: int, size: int, seed: int):
    """Rows of one ``.emb.npy`` sidecar for the k-means sample: those whose rank, a hash of (seed,
    file, row), falls below the quantile that leaves about 2 x ``size`` rows of ``n_total`` (the
    global top ``size`` then picks exactly ``size``). -> (rank, "file:row", vector, NaN) rows, as
    ``RankRows`` makes them. Only the sidecar is read, none of the records."""
    from teachers.fs import read_bytes

    x = np.load(io.BytesIO(read_bytes(path)), allow_pickle=False)
    salt = np.uint64(sample_rank(seed, path))
    ranks = _mix64(np.arange(len(x), dtype=np.uint64) ^ salt)
    cut = np.uint64(min(2**64 - 1, int(2 * size / max(1, n_total) * 2**64)))
    picked = np.flatnonzero(ranks < cut) if 2 * size < n_total else np.arange(len(x))
    Metrics.counter("curate", "kmeans_sample_sidecar_rows").inc(len(picked))
    for r in picked.tolist():
        yield int(ranks[r]), f"{path}:{r}", np.asarray(x[r], np.float32), math.nan


def train_centroids(sample: list, n_total: int, cfg: CurateConfig) -> np.ndarray | None:
    """k-means centroids from the sample (sorted by rank for a stable order); None if empty."""
    if not sample:
        return None
    vectors = np.stack([row[2] for row in sorted(sample, key=_rank)]).astype(np.float32)
    k = cfg.kmeans_clusters or semdedup.choose_n_clusters(n_total, len(vectors), cfg.target_cluster_size)
    Metrics.distribution("curate", "kmeans_clusters").update(min(k, len(vectors)))
    return semdedup.train_kmeans(vectors, k, niter=cfg.kmeans_iterations, seed=cfg.kmeans_seed)


def _bucket_row(row: tuple, n_total: int, batch: int):
    rank, key, vector, score = row  # vector: already the wire dtype (RankRows)
    return rank % max(1, math.ceil(n_total / batch)), (key, vector, score)


@dataclass(frozen=True)
class Block:
    """Rows of one cluster, packed: ``keys`` (n,), ``vectors`` (n, d) wire dtype, ``scores`` (n,)
    float64 (NaN: unknown), ``home`` (n,) int64: each row's nearest cluster (the one it is
    reported under; a margin copy has a different one), ``shared`` (n,) bool: the row is in two
    clusters."""

    keys: tuple
    vectors: np.ndarray
    scores: np.ndarray
    home: np.ndarray
    shared: np.ndarray


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
        shared = (assigned[:, 1:] >= 0).any(axis=1)  # margin copies in other clusters (none with margin 0)
        Metrics.counter("curate", "semdedup_margin_copies").inc(int((assigned[:, 1:] >= 0).sum()))
        for cluster, r in semdedup.members_by_cluster(assigned):
            yield cluster, Block(tuple(keys[r]), vectors[r], scores[r], home[r], shared[r])


def _concat(blocks) -> Block:
    blocks = list(blocks)
    return Block(sum((b.keys for b in blocks), ()), np.concatenate([b.vectors for b in blocks]),
                 np.concatenate([b.scores for b in blocks]), np.concatenate([b.home for b in blocks]),
                 np.concatenate([b.shared for b in blocks]))


def pairs_in_cluster(keyed, modality: str, cfg: CurateConfig, margin: float):
    """(cluster, Blocks) -> decisions and border pairs (``pairs_of_block``); a cluster of more than
    ``SPLIT_FACTOR`` x ``target_cluster_size`` rows -> work units instead: a second k-means level
    inside it (``filters.semdedup.fine_centroids``, assignment with the same margin), one unit per
    fine cluster, and a fine cluster still above ``MAX_UNIT_ROWS_FACTOR`` x target (rows k-means
    cannot part, such as thousands of copies of one image) cut into row blocks, one unit per pair of
    blocks. Units are spread over workers by a Reshuffle, so no cluster is one hot key."""
    cluster, block = keyed[0], _concat(keyed[1])
    Metrics.distribution("curate", f"cluster_size_{modality}").update(len(block.keys))
    target = cfg.target_cluster_size
    if len(block.keys) <= semdedup.SPLIT_FACTOR * target:
        yield from pairs_of_block(block, cfg.semdedup_eps)
        return
    Metrics.counter("curate", "semdedup_split_clusters").inc()
    x = block.vectors.astype(np.float32)
    fine = semdedup.fine_centroids(x, block.keys, target, sample_size=cfg.kmeans_sample_size,
                                   niter=cfg.kmeans_iterations, seed=cfg.kmeans_seed)
    assigned = semdedup.assign_clusters(x, fine, margin=margin).reshape(len(x), -1)
    fine_shared = (assigned[:, 1:] >= 0).any(axis=1)
    keys = np.asarray(block.keys, object)
    for _, rows in semdedup.members_by_cluster(assigned):
        sub = Block(tuple(keys[rows]), block.vectors[rows], block.scores[rows], block.home[rows],
                    block.shared[rows] | fine_shared[rows])  # in another fine or coarse cluster too
        if len(rows) <= semdedup.MAX_UNIT_ROWS_FACTOR * target:
            yield "unit", ("whole", sub, None)
            continue
        Metrics.counter("curate", "semdedup_block_split_clusters").inc()
        size = semdedup.SPLIT_FACTOR * target
        parts = [_take(sub, np.arange(st, min(st + size, len(rows)))) for st in range(0, len(rows), size)]
        for a in range(len(parts)):
            for b in range(a, len(parts)):
                yield "unit", ("blocks", parts[a], parts[b] if b != a else None)


def _take(block: Block, rows: np.ndarray) -> Block:
    return Block(tuple(np.asarray(block.keys, object)[rows]), block.vectors[rows], block.scores[rows],
                 block.home[rows], block.shared[rows])


def pairs_of_unit(unit, eps: float):
    """A work unit of a split cluster -> decisions and border pairs. A fine cluster is treated as a
    cluster; the pairs of a pair of row blocks all go on as border pairs (their groups may span blocks)."""
    kind, a, b = unit
    if kind == "whole":
        yield from pairs_of_block(a, eps)
        return
    if b is None:
        pairs = semdedup.cluster_pairs(a.vectors.astype(np.float32), eps)
        both = a
    else:
        p = semdedup.cross_pairs(a.vectors.astype(np.float32), b.vectors.astype(np.float32), eps)
        pairs = semdedup.Pairs(p.i, p.j + len(a.keys), p.similarity)
        both = _concat([a, b])
    if len(pairs.i):
        Metrics.counter("curate", "semdedup_pairs_border").inc(len(pairs.i))
        yield from _members_out(both, pairs, np.ones(len(pairs.i), bool), eps)


def pairs_of_block(block: Block, eps: float):
    """One cluster's rows -> decisions for the duplicate groups it sees whole, and one pair block for
    the rest.

    A connected group of pairs none of whose members is in a second cluster is whole here: each of
    its members meets others only in this cluster. The keep rule looks only at a member's
    neighbours, so resolving that group here gives what resolving every pair at once would. A
    group with a member shared with another cluster may continue there: its pairs go on to
    ``ResolveBorderPairs`` as (keys, scores, i, j, similarity, vectors) over the members in them, so
    only the border's pairs ever meet in one place.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if len(block.keys) < 2:
        return
    pairs = semdedup.cluster_pairs(block.vectors.astype(np.float32), eps)
    if len(pairs.i) == 0:
        return
    n = len(block.keys)
    _, group = connected_components(coo_matrix((np.ones(len(pairs.i)), (pairs.i, pairs.j)), shape=(n, n)),
                                    directed=False)
    border_group = np.zeros(group.max() + 1, bool)
    border_group[group[block.shared]] = True
    border = border_group[group[pairs.i]]  # a pair's two members are in one group
    Metrics.counter("curate", "semdedup_pairs_border").inc(int(border.sum()))
    Metrics.counter("curate", "semdedup_pairs_local").inc(int(len(border) - border.sum()))
    yield from _members_out(block, pairs, border, eps)


def _members_out(block: Block, pairs, border: np.ndarray, eps: float):
    keys = np.asarray(block.keys, object)
    for part, out in ((~border, _decide), (border, _pair_block)):
        if part.any():
            p = semdedup.Pairs(pairs.i[part], pairs.j[part], pairs.similarity[part])
            members, inverse = np.unique(np.r_[p.i, p.j], return_inverse=True)
            yield from out(keys[members], block.scores[members], inverse[:len(p.i)], inverse[len(p.i):], p.similarity,
                           block.vectors[members], eps)


def _pair_block(keys, scores, i, j, similarity, vectors, eps):
    yield "pairs", (keys, scores, i, j, similarity, vectors)


def _decide(keys, scores, i, j, similarity, vectors, eps):
    """The keep rule over these members' pairs -> ("decision", (key, decision)) per member it changes.
    ``vectors`` (wire dtype) let it compare a member with the kept member its dropped neighbours name
    (``filters.semdedup.resolve_pairs``): pairs across clusters may be missing from the list."""
    ids = [str(k) for k in keys]
    found = semdedup.resolve_pairs(ids, [None if math.isnan(s) else float(s) for s in scores],
                                   semdedup.Pairs(i.astype(np.int64), j.astype(np.int64), similarity),
                                   embeddings=vectors, eps=eps)
    n_dups = np.bincount(found.duplicate_of[found.duplicate_of >= 0], minlength=len(ids))
    for m, key in enumerate(ids):
        if not found.keep[m]:
            yield "decision", (key, ("duplicate", ids[int(found.duplicate_of[m])], float(found.similarity[m])))
        elif n_dups[m]:
            yield "decision", (key, ("kept", int(n_dups[m])))


def is_pair_block(item) -> bool:
    return item[0] == "pairs"


def is_decision(item) -> bool:
    return item[0] == "decision"


def is_unit(item) -> bool:
    return item[0] == "unit"


def home_clusters(keyed):
    """(cluster, Blocks) -> (key, cluster) for every row whose nearest cluster this is."""
    cluster = keyed[0]
    for block in keyed[1]:
        for key, home in zip(block.keys, block.home.tolist()):
            if home == cluster:
                yield key, cluster


def _to_one_key(item):
    return None, item[1]


def _untag(item):
    return item[1]


def resolve(keyed, eps: float):
    """(None, border pair blocks) -> (key, ("duplicate", kept key, cosine)) per dropped record and
    (key, ("kept", n dropped as its duplicates)) per kept record that has any: the keep rule over
    every border pair at once (``filters.semdedup.resolve_pairs``), a pair met in two clusters once."""
    blocks = list(keyed[1])
    if not blocks:
        return
    keys = np.concatenate([b[0] for b in blocks])
    scores = np.concatenate([b[1] for b in blocks])
    offsets = np.cumsum([0] + [len(b[0]) for b in blocks[:-1]])
    i = np.concatenate([b[2] + o for b, o in zip(blocks, offsets)])
    j = np.concatenate([b[3] + o for b, o in zip(blocks, offsets)])
    sim = np.concatenate([b[4] for b in blocks])
    vectors = np.concatenate([b[5] for b in blocks])
    ids, first, inverse = np.unique(keys.astype(str), return_index=True, return_inverse=True)
    i, j = inverse[i], inverse[j]
    lo, hi = np.minimum(i, j), np.maximum(i, j)
    _, once = np.unique(lo * len(ids) + hi, return_index=True)
    for _, decision in _decide(ids, scores[first], lo[once], hi[once], sim[once].astype(np.float32), vectors[first], eps):
        yield decision


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
    only; default ``cfg.semdedup_margin``); ``wire_dtype``: how embeddings travel between stages; ``batch``: rows per assignment.
    """

    def __init__(self, modality: str, cfg: CurateConfig, *, margin: float | None = None, wire_dtype: str = WIRE_DTYPE,
                 batch: int = ASSIGN_BATCH, sidecars: tuple[str, ...] = ()):
        super().__init__()
        self.sidecars = tuple(sidecars)  # .emb.npy files holding the same embeddings: the k-means sample comes from them
        self.modality = modality
        self.field = EMBEDDING_FIELDS[modality]
        self.cfg = cfg
        margin = getattr(cfg, "semdedup_margin", MARGIN) if margin is None else margin
        self.margin, self.wire_dtype, self.batch = margin, wire_dtype, batch

    def expand(self, records):
        cfg = self.cfg
        rows = records | "RankRows" >> beam.Map(_rank_row, self.field, cfg.kmeans_seed, self.wire_dtype)
        # A CombineFn (SmallestRanks), not Top.Of: Top.Of emits from finish_bundle, which Beam's
        # Dask runner drops (the sample came out empty there); the result is the same.
        count = records | "CountRecords" >> beam.combiners.Count.Globally()
        candidates = rows
        if self.sidecars:  # read the sidecars for the sample, not the records (which may still be arriving)
            candidates = (records.pipeline
                          | "ListSidecars" >> beam.Create(list(self.sidecars))
                          | "SpreadSidecars" >> beam.Reshuffle()
                          | "SampleSidecars" >> beam.FlatMap(sidecar_sample, beam.pvalue.AsSingleton(count),
                                                             cfg.kmeans_sample_size, cfg.kmeans_seed))
        sample = candidates | "SampleForKMeans" >> beam.CombineGlobally(SmallestRanks(cfg.kmeans_sample_size))
        centroids = sample | "TrainKMeans" >> beam.Map(train_centroids, beam.pvalue.AsSingleton(count), cfg)
        clusters = (rows
                    | "BucketRows" >> beam.Map(_bucket_row, beam.pvalue.AsSingleton(count), self.batch)
                    | "GroupIntoBuckets" >> beam.GroupByKey()
                    | "AssignBlocks" >> beam.ParDo(AssignBlocksFn(self.margin, self.batch),
                                                   beam.pvalue.AsSingleton(centroids))
                    | "GroupByCluster" >> beam.GroupByKey())
        # two Filters, not tagged outputs or a Partition: Beam's Dask runner gives every element to each
        found = clusters | "PairsInCluster" >> beam.FlatMap(pairs_in_cluster, self.modality, cfg, self.margin)
        in_units = (found
                    | "SelectWorkUnits" >> beam.Filter(is_unit)
                    | "UntagWorkUnits" >> beam.Map(_untag)
                    | "SpreadWorkUnits" >> beam.Reshuffle()
                    | "PairsInWorkUnit" >> beam.FlatMap(pairs_of_unit, cfg.semdedup_eps))
        found = (found, in_units) | "GatherFound" >> beam.Flatten()
        local = (found
                 | "SelectLocalDecisions" >> beam.Filter(is_decision)
                 | "UntagDecisions" >> beam.Map(_untag))
        border = (found
                  | "SelectBorderPairs" >> beam.Filter(is_pair_block)
                  | "GatherBorderPairs" >> beam.Map(_to_one_key)
                  | "GroupBorderPairs" >> beam.GroupByKey()
                  | "ResolveBorderPairs" >> beam.FlatMap(resolve, cfg.semdedup_eps))
        decisions = (local, border) | "GatherDecisions" >> beam.Flatten()
        homes = clusters | "HomeClusters" >> beam.FlatMap(home_clusters)
        keyed = records | "KeyRecords" >> beam.Map(_by_key)
        return ({"records": keyed, "clusters": homes, "decisions": decisions}
                | "JoinByKey" >> beam.CoGroupByKey()
                | "AnnotateRecords" >> beam.FlatMap(annotate, self.modality))
