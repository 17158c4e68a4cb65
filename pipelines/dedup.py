"""SemDeDup on Beam (shared by the curate and filter jobs): every element past the first step is a block of rows.

Two entry points, one algorithm:

- ``SemanticDedupBlocks``: blocks in, ``(block id, Fates)`` out: each row's nearest cluster and
  fate, in its block's row order. A block is ``dedup_blocks.Rows`` (keys, wire-dtype vectors,
  scores) or ``dedup_blocks.EmbeddingRows`` (keys, scores and a row range of a ``.npy`` file, read
  by the steps that need the vectors; what a source over ``.emb.npy`` sidecars makes, one per file
  or chunk). No step handles a single record.
- ``SemanticDedupShards``: shards of records in, the same shards annotated out, for records whose
  embeddings are rows of ``.emb.npy`` sidecars (the filter job's): no record carries a vector and
  no step handles a single record. Each shard becomes one ``EmbeddingRows`` block of the rows of
  its active records, and each block's ``Fates`` join its shard's records (one element per shard).
- ``SemanticDedup``: records in, the same records annotated out (what the curate job uses).
  Records become rows of primitives (key, vector as bytes, score), are grouped into buckets of about
  ``ASSIGN_BATCH`` rows, packed into ``Rows`` and deduplicated as above; the fates come
  back to the records by a join on the key, the records shipped with their arrays as bytes.

    Rows --SampleCandidates/SampleForKMeans/TrainKMeans--> centroids (side input)
      --AssignBlocks: one faiss search per ``batch`` rows, nearest centroid and, within ``margin``,
        the next nearest --> (cluster, Block) + (block id, nearest clusters)
      --GroupByCluster (CLUSTER_SHUFFLES parts)--> PairsInCluster: ``filters.semdedup.cluster_pairs``;
        duplicate groups seen whole in the cluster are decided there (``resolve_pairs``) --> (block id,
        decision); the rest --> border pairs; an oversized cluster --> work units (second k-means
        level, row blocks), run there or, above ``SPREAD_FACTOR`` x target, --SpreadWorkUnits-->
        PairsInWorkUnit: the same per unit
      --LabelBorderGroups (connected groups of the border pair graph, 16 bytes per pair in one step)-->
        members, vectors and pairs routed to their group by key --GroupBorderGroups--> ResolveBorderGroups:
        ``resolve_pairs`` per group --> (block id, decision)
    nearest clusters + decisions --GroupFatesByBlock--> CollectFates --> (block id, Fates)

The same four steps as ``filters.semdedup.deduplicate``, and the same result on the same sample
(``tests/test_curate_semdedup.py`` checks that). What one worker holds at a time:
- the k-means sample (``kmeans_sample_size`` vectors) and the centroids;
- one input block (``SemanticDedup``: a bucket of about ``ASSIGN_BATCH`` rows, buckets =
  ceil(records / ``ASSIGN_BATCH``) keyed by a hash of the key, so they are even): assignment is one
  (batch, d) x (d, k) search per ``batch`` rows, not one search per record;
- one cluster's block (about ``target_cluster_size`` rows, times 1.1 for the margin copies);
- the border pairs: those of duplicate groups with a member in two clusters (the margin's copies,
  about a tenth of the rows). A group none of whose members is shared is whole in its cluster and
  decided there. Border pairs grow with N, but slowly: 24 bytes each plus their members' keys and
  wire-dtype vectors (the keep rule compares a member with the kept member its dropped neighbours
  name, a pair two clusters may both have missed): about 1.2 GB at 1B rows with 6% of rows in a
  duplicate pair and 3% of pairs on a border (BENCHMARKS.md, "Cost model for 1B embeddings").

Embeddings travel as ``WIRE_DTYPE`` (float16) rows inside blocks, not per-record dicts: 2 bytes
per dimension. A block pickles as a few arrays; what travels per record (``SemanticDedup``'s rows
and records) is made of Python primitives (str, float, bytes), which Beam's default coder writes
without pickle (a numpy array inside a record dict is pickled at every stage boundary).
float16 moves a cosine by about 2e-5 in 512-d (a rounding of 2^-11 per component, averaged over
512 of them), so a pair within that of ``1 - eps`` may flip; ``wire_dtype="float32"``
ships exact vectors.

The sample is the ``kmeans_sample_size`` records with the smallest ``sha1(seed, key)``: a uniform
sample that is the same on every run and runner, so clusters, and hence results, are reproducible.
With ``sidecars`` (the ``.emb.npy`` files the filter job's records come from) it is drawn from
those files instead (``sidecar_sample``: a hash of (seed, file, row) ranks the rows; each file
yields the rows below a quantile, then the global top picks the sample), so the k-means input is
read straight from storage, once.
No step emits from ``finish_bundle`` (Beam's Dask runner drops that output: ``BatchElements`` and
``Top.Of`` lost records there) and none has tagged outputs (Dask gives every element to each).

Choosing the knobs (``filters.config.CurateConfig``):

- k = ceil(records / ``target_cluster_size``) (default 1,000), so each cluster costs about
  1,000^2 cosines; faiss wants >= 39 sample points per centroid, so k <= sample / 40. The default
  sample of 50,000 (about 150 MB of 768-d float32 in one worker) allows k <= 1,250, which keeps
  the target size up to about 1.25M records; above that a cluster of more than
  ``SPLIT_FACTOR`` (4) x the target is split in its worker by a second k-means level trained on
  its own rows (``filters.semdedup.fine_centroids``: at 1B, 1,250 coarse clusters of 800k rows,
  each into about 800), and the fine clusters are work units, spread over workers by a Reshuffle
  when the coarse cluster holds more than ``SPREAD_FACTOR`` (64) x the target (below that its units
  run where it was grouped: shipping its vectors again costs more than it spreads); a fine
  cluster still above ``MAX_UNIT_ROWS_FACTOR`` (8) x the target is compared in row blocks, one
  unit per pair of blocks, its pairs all resolved as border pairs.
- ``semdedup_eps`` (duplicates: cosine >= 1 - eps) defaults to 0.05. The right value depends on
  the embedding model and on how much the dataset may shrink; the manifest's
  ``duplicate_similarity`` column and the report's group-size plot show what a given eps removed.
- ``margin`` (a ``SemanticDedup`` argument, 0.01 as in ``deduplicate``): a row also goes to its
  second-nearest centroid when that one's cosine is within ``margin`` of the nearest's.
"""

from __future__ import annotations

import math

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from filters import reasons, semdedup
from filters.config import CurateConfig
from filters.semdedup import sample_rank
from pipelines import dedup_blocks as blocks_
from pipelines.dedup_blocks import EmbeddingRows, Fates, Rows
from pipelines.records import EMBEDDING_FIELDS, dropped, effective_aesthetic, has_image, is_active

ASSIGN_BATCH = 8192  # rows per bucket, and per faiss search: 8192 x 768 float16 = 12 MB
WIRE_DTYPE = "float16"
MARGIN = 0.01  # second-nearest-centroid margin, as filters.semdedup.deduplicate's default
CLUSTER_SHUFFLES = 8  # GroupByKeys the cluster shuffle is split into (see SemanticDedupBlocks.expand)
SPREAD_FACTOR = 64  # a split cluster above this x target_cluster_size rows has its work units spread over workers

__all__ = ["SemanticDedup", "SemanticDedupBlocks", "SemanticDedupShards",
           "Rows", "EmbeddingRows", "Fates"]  # the block types, for callers



# ---- the k-means sample: packed (ranks uint64, keys object, vectors, scores float64) arrays ----

def _smallest(packed: tuple, size: int) -> tuple:
    if len(packed[0]) <= size:
        return packed
    keep = np.argpartition(packed[0], size - 1)[:size]
    return tuple(a[keep] for a in packed)


def _cat(parts: list) -> tuple | None:
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(4)) if parts else None


class SmallestRanks(beam.CombineFn):
    """The ``size`` rows of smallest rank over packed (ranks, keys, vectors, scores) parts, in rank
    order (None if there are none). An accumulator is a list of packed parts, compacted to ``size``
    rows when it holds twice that, so it pickles as a few arrays, never one object per row."""

    def __init__(self, size: int):
        self.size = size

    def create_accumulator(self):
        return []

    def add_input(self, acc, packed):
        acc.append(_smallest(packed, self.size))
        if sum(len(p[0]) for p in acc) >= 2 * self.size:
            acc = [_smallest(_cat(acc), self.size)]
        return acc

    def merge_accumulators(self, accumulators):
        parts = [p for acc in accumulators for p in acc]
        return [_smallest(_cat(parts), self.size)] if parts else []

    def extract_output(self, acc):
        if not acc:
            return None
        packed = _smallest(_cat(acc), self.size)
        order = np.argsort(packed[0], kind="stable")
        return tuple(a[order] for a in packed)


def sample_candidates(rows, seed: int, size: int) -> tuple:
    """A block's (``Rows`` or ``EmbeddingRows``) candidates for the k-means sample: its ``size`` rows
    of smallest ``sample_rank``."""
    rows = rows.load()
    ranks = np.fromiter((sample_rank(seed, k) for k in rows.keys), np.uint64, len(rows.keys))
    return _smallest((ranks, np.asarray(rows.keys, object), rows.vectors, rows.scores), size)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 (wrapping arithmetic): a fast, well-spread hash of row numbers."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def sidecar_sample(path: str, n_total: int, size: int, seed: int, dtype: str = WIRE_DTYPE):
    """Rows of one ``.emb.npy`` sidecar for the k-means sample: those whose rank, a hash of (seed,
    file, row), falls below the quantile that leaves about 2 x ``size`` rows of ``n_total`` (the
    global top ``size`` then picks exactly ``size``). -> one packed (ranks, "file:row" keys, vectors
    in ``dtype``, NaN scores). Only the sidecar is read, none of the records. The vectors travel in
    the wire dtype, as a block's own candidates do (``sample_candidates``): 2 x ``size`` rows of
    them are held between the sample's two steps, half the bytes of float32. A file that cannot be
    read as an array (missing, cut short) gives no rows and is counted
    (``kmeans_sample_sidecars_unreadable``), and a row holding NaN/Inf is left out: the job that reads
    its records rejects them itself (the filter job: stage ``scores``, ``corrupt_embeddings`` or
    ``non_finite_score``)."""
    from core.fs import read_bytes
    from shards.record import load_npy

    try:
        x = load_npy(read_bytes(path))
    except (OSError, ValueError):  # missing, cut short or not an array: its records are rejected by their reader
        Metrics.counter("curate", "kmeans_sample_sidecars_unreadable").inc()
        return
    salt = np.uint64(sample_rank(seed, path))
    ranks = _mix64(np.arange(len(x), dtype=np.uint64) ^ salt)
    cut = np.uint64(min(2**64 - 1, int(2 * size / max(1, n_total) * 2**64)))
    picked = np.flatnonzero(ranks < cut) if 2 * size < n_total else np.arange(len(x))
    if x.ndim == 2 and len(picked):  # a NaN/Inf row would make every centroid NaN: its record is rejected by its reader
        picked = picked[np.isfinite(x[picked]).all(axis=1)]
    Metrics.counter("curate", "kmeans_sample_sidecar_rows").inc(len(picked))
    yield (ranks[picked], np.asarray([f"{path}:{r}" for r in picked.tolist()], object),
           np.asarray(x[picked], dtype), np.full(len(picked), math.nan))


def train_centroids(sample: tuple | None, n_total: int, cfg: CurateConfig) -> np.ndarray | None:
    """k-means centroids from the packed sample (in rank order, so a stable input); None if empty."""
    if sample is None or not len(sample[0]):
        return None
    vectors = np.asarray(sample[2], np.float32)
    k = cfg.kmeans_clusters or semdedup.choose_n_clusters(n_total, len(vectors), cfg.target_cluster_size)
    Metrics.distribution("curate", "kmeans_clusters").update(min(k, len(vectors)))
    return semdedup.train_kmeans(vectors, k, niter=cfg.kmeans_iterations, seed=cfg.kmeans_seed)


def _n_rows(rows) -> int:
    return len(rows.keys)


class SemanticDedupBlocks(beam.PTransform):
    """SemDeDup over ``Rows`` or ``EmbeddingRows`` blocks -> ``(block id, Fates)`` per input block
    (see the module docstring). Duplicates: cosine similarity >= 1 - ``cfg.semdedup_eps``; kept per duplicate
    group: highest score, then smallest key. ``margin``: second-nearest-centroid margin (0: nearest
    only); ``batch``: rows per faiss search; ``sidecars``: ``.emb.npy`` files for the k-means sample;
    ``spread_factor``: a cluster split by the second k-means level spreads its work units over
    workers when it holds more than this x ``target_cluster_size`` rows."""

    def __init__(self, modality: str, cfg: CurateConfig, *, margin: float | None = None, batch: int = ASSIGN_BATCH,
                 sidecars: tuple[str, ...] = (), spread_factor: int = SPREAD_FACTOR):
        super().__init__()
        self.modality, self.cfg, self.batch, self.sidecars = modality, cfg, batch, tuple(sidecars)
        self.spread_factor = spread_factor
        self.margin = getattr(cfg, "semdedup_margin", MARGIN) if margin is None else margin

    def expand(self, rows):
        cfg = self.cfg
        count = rows | "CountRows" >> beam.Map(_n_rows) | "SumRows" >> beam.CombineGlobally(sum)
        if self.sidecars:  # read the sidecars for the sample, not the rows (which may still be arriving)
            candidates = (rows.pipeline
                          | "ListSidecars" >> beam.Create(list(self.sidecars))
                          | "SpreadSidecars" >> beam.Reshuffle()
                          | "SampleSidecars" >> beam.FlatMap(sidecar_sample, beam.pvalue.AsSingleton(count),
                                                             cfg.kmeans_sample_size, cfg.kmeans_seed))
        else:
            candidates = rows | "SampleCandidates" >> beam.Map(sample_candidates, cfg.kmeans_seed,
                                                               cfg.kmeans_sample_size)
        # A CombineFn (SmallestRanks), not Top.Of: Top.Of emits from finish_bundle, which Beam's
        # Dask runner drops (the sample came out empty there)
        sample = candidates | "SampleForKMeans" >> beam.CombineGlobally(SmallestRanks(cfg.kmeans_sample_size))
        centroids = sample | "TrainKMeans" >> beam.Map(train_centroids, beam.pvalue.AsSingleton(count), cfg)
        # The cluster shuffle in CLUSTER_SHUFFLES parts (clusters by id), all fed by one assignment
        # step: a runner that runs a shuffle in one process (DirectRunner decodes a GroupByKey's
        # input into a table as it arrives and encodes it again into one buffer when it is read)
        # then re-encodes one part at a time; a distributed runner is unaffected. The assignment is
        # not split too: parts of it would each feed every shuffle part through a Flatten, which
        # DirectRunner materialises as one more encoded copy of every cluster block (benchmarks/dedup.py
        # at 1M, the filter job's path: 4.36 GB peak with 8 assignment parts, 3.92 GB with one).
        # Filters, not tagged outputs or a Partition: Beam's Dask runner gives every element to each
        parts = range(CLUSTER_SHUFFLES)
        assigned = rows | "AssignBlocks" >> beam.ParDo(blocks_.AssignBlocksFn(self.margin, self.batch),
                                                       beam.pvalue.AsSingleton(centroids))
        homes = (assigned
                 | "SelectHomes" >> beam.Filter(blocks_.is_homes)
                 | "UntagHomes" >> beam.Map(blocks_.untag)
                 | "TagHomes" >> beam.Map(blocks_.tag_homes))
        found = [assigned
                 | f"SelectClusterBlocks{g}" >> beam.Filter(blocks_.is_cluster_part, g, CLUSTER_SHUFFLES)
                 | f"UntagClusterBlocks{g}" >> beam.Map(blocks_.untag)
                 | f"GroupByCluster{g}" >> beam.GroupByKey()
                 | f"PairsInCluster{g}" >> beam.FlatMap(blocks_.pairs_in_cluster, self.modality, cfg, self.margin,
                                                        self.spread_factor)
                 for g in parts]
        found = found | "GatherClusters" >> beam.Flatten()
        in_units = (found
                    | "SelectWorkUnits" >> beam.Filter(blocks_.is_unit)
                    | "UntagWorkUnits" >> beam.Map(blocks_.untag)
                    | "SpreadWorkUnits" >> beam.Reshuffle()
                    | "PairsInWorkUnit" >> beam.FlatMap(blocks_.pairs_of_unit, cfg.semdedup_eps))
        found = (found, in_units) | "GatherFound" >> beam.Flatten()
        local = (found
                 | "SelectLocalDecisions" >> beam.Filter(blocks_.is_decision)
                 | "UntagDecisions" >> beam.Map(blocks_.untag))
        pair_blocks = (found
                       | "SelectBorderPairs" >> beam.Filter(blocks_.is_pair_block)
                       | "UntagBorderPairs" >> beam.Map(blocks_.untag))
        # Border pairs are resolved per connected group: one step labels the groups from 16 bytes per
        # pair, then members, vectors and pairs go to their group by key, so no worker holds them all
        labels = (pair_blocks
                  | "BorderEdges" >> beam.Map(blocks_.border_edges)
                  | "GatherBorderEdges" >> beam.GroupByKey()
                  | "LabelBorderGroups" >> beam.FlatMap(blocks_.label_groups))
        members = pair_blocks | "BorderMembers" >> beam.FlatMap(blocks_.border_members)
        border = ((labels, members)
                  | "GatherBorderMembers" >> beam.Flatten()
                  | "GroupBorderMembers" >> beam.GroupByKey()
                  | "RouteToGroups" >> beam.FlatMap(blocks_.route_to_group)
                  | "GroupBorderGroups" >> beam.GroupByKey()
                  | "ResolveBorderGroups" >> beam.FlatMap(blocks_.resolve_group, cfg.semdedup_eps))
        decisions = ((local, border)
                     | "GatherDecisions" >> beam.Flatten()
                     | "TagDecisions" >> beam.Map(blocks_.tag_decision))
        return ((homes, decisions)
                | "GatherFates" >> beam.Flatten()
                | "GroupFatesByBlock" >> beam.GroupByKey()
                | "CollectFates" >> beam.Map(blocks_.collect_fates))


# ---- records in, records out ----

def _row_of(record: dict, field: str, seed: int, wire_dtype: str) -> tuple[int, str, bytes, float]:
    """A record -> (hash < 2^62, key, its embedding in the wire dtype as bytes, score): primitives only."""
    score = effective_aesthetic(record)
    vector = np.ascontiguousarray(np.asarray(record[field]).astype(wire_dtype).reshape(-1))
    return (sample_rank(seed, record["key"]) >> 2, record["key"], vector.tobytes(),
            math.nan if score is None else float(score))


def _bucket_row(row: tuple, n_total: int, batch: int):
    return row[0] % max(1, math.ceil(n_total / batch)), row[1:]


def _pack_bucket(keyed, wire_dtype: str) -> Rows:
    bucket, rows = keyed
    rows = list(rows)
    vectors = np.frombuffer(b"".join(r[1] for r in rows), wire_dtype).reshape(len(rows), -1)
    return Rows(int(bucket), tuple(r[0] for r in rows), vectors, np.fromiter((r[2] for r in rows), np.float64, len(rows)))


def pack_record(record: dict) -> tuple[dict, tuple]:
    """A record -> (the record with its numeric arrays set to None, ((field, dtype, shape, bytes), ...)):
    what Beam's default coder writes without pickle. ``unpack_record`` gives back an equal record."""
    arrays = tuple((name, v.dtype.str, v.shape, v.tobytes()) for name, v in record.items()
                   if isinstance(v, np.ndarray) and v.dtype.kind in "biufc")
    if not arrays:
        return record, ()
    names = {a[0] for a in arrays}
    return {k: (None if k in names else v) for k, v in record.items()}, arrays


def unpack_record(packed: tuple) -> dict:
    record, arrays = packed
    if arrays:
        record = dict(record)
        for name, dtype, shape, data in arrays:
            record[name] = np.frombuffer(data, dtype).reshape(shape).copy()
    return record


def _keyed_record(record: dict):
    return record["key"], ("record", pack_record(record))


def without_vectors(record: dict) -> dict:
    """The record without its embeddings, ``has_image`` saying whether it had an image embedding (what
    the manifest keeps of them): what a job that has already written the embeddings ships onwards."""
    if "has_image" in record and not any(f in record for f in EMBEDDING_FIELDS.values()):
        return record
    out = {k: v for k, v in record.items() if k not in EMBEDDING_FIELDS.values()}
    out["has_image"] = has_image(record)
    return out


def _keyed_light_record(record: dict):
    return _keyed_record(without_vectors(record))


def fate_at(fates, m: int) -> tuple:
    """Row ``m`` of a ``Fates`` block as ("fate", cluster, duplicate_of, similarity, n_duplicates)."""
    return "fate", int(fates.cluster[m]), fates.duplicate_of[m], float(fates.similarity[m]), int(fates.n_duplicates[m])


def _fates_by_key(keyed):
    _, fates = keyed
    for m, key in enumerate(fates.keys):
        yield key, fate_at(fates, m)


def annotate_record(record: dict, fate: tuple | None, modality: str) -> dict:
    """A record and its fate, ("fate", cluster, duplicate_of, similarity, n_duplicates) or None (not
    deduplicated) -> the record annotated as the manifest needs."""
    record = {**record, "dedup_on": modality, "cluster_id": None if fate is None else fate[1]}
    if fate is None or (fate[2] is None and not fate[4]):
        return record
    if fate[2] is None:
        record["n_duplicates"] = fate[4] + (record.get("n_duplicates") or 0)
        return record
    Metrics.counter("curate", f"filtered_{reasons.SEMANTIC_DUPLICATE}").inc()
    return dropped(record, "semdedup", reasons.SEMANTIC_DUPLICATE, duplicate_of=fate[2], duplicate_similarity=fate[3])


def annotate(keyed, modality: str):
    """(key, [("record", packed), ("fate", cluster, duplicate_of, similarity, n_duplicates)]) -> the
    records, annotated as the manifest needs."""
    _, items = keyed
    fate = next((item for item in items if item[0] == "fate"), None)
    for item in items:
        if item[0] == "record":
            yield annotate_record(unpack_record(item[1]), fate, modality)


class SemanticDedup(beam.PTransform):
    """SemDeDup over the ``modality`` ("text" or "image") embedding of every input record.

    Duplicates: cosine similarity >= 1 - ``cfg.semdedup_eps``. Kept per duplicate group: highest
    aesthetic score, then smallest id. ``margin``: second-nearest-centroid margin (0: nearest
    only; default ``cfg.semdedup_margin``); ``wire_dtype``: how embeddings travel between stages;
    ``batch``: rows per bucket and per assignment; ``sidecars``: ``.emb.npy`` files holding the same
    embeddings, for the k-means sample; ``spread_factor``: as ``SemanticDedupBlocks``;
    ``keep_vectors=False``: the records come out ``without_vectors`` (the join that brings them
    together with their fates then carries no embedding: for a job that wrote them before).
    """

    def __init__(self, modality: str, cfg: CurateConfig, *, margin: float | None = None, wire_dtype: str = WIRE_DTYPE,
                 batch: int = ASSIGN_BATCH, sidecars: tuple[str, ...] = (), spread_factor: int = SPREAD_FACTOR,
                 keep_vectors: bool = True):
        super().__init__()
        self.spread_factor, self.keep_vectors = spread_factor, keep_vectors
        self.modality, self.field, self.cfg = modality, EMBEDDING_FIELDS[modality], cfg
        self.margin, self.wire_dtype, self.batch, self.sidecars = margin, wire_dtype, batch, tuple(sidecars)

    def expand(self, records):
        cfg = self.cfg
        count = records | "CountRecords" >> beam.combiners.Count.Globally()
        fates = (records
                 | "RowsOfRecords" >> beam.Map(_row_of, self.field, cfg.kmeans_seed, self.wire_dtype)
                 | "BucketRows" >> beam.Map(_bucket_row, beam.pvalue.AsSingleton(count), self.batch)
                 | "GroupIntoBuckets" >> beam.GroupByKey()
                 | "PackBuckets" >> beam.Map(_pack_bucket, self.wire_dtype)
                 | "DedupBlocks" >> SemanticDedupBlocks(self.modality, cfg, margin=self.margin, batch=self.batch,
                                                        sidecars=self.sidecars, spread_factor=self.spread_factor))
        keyed = records | "KeyRecords" >> beam.Map(_keyed_record if self.keep_vectors else _keyed_light_record)
        by_key = fates | "FatesByKey" >> beam.FlatMap(_fates_by_key)
        return ((keyed, by_key)
                | "GatherRecordsAndFates" >> beam.Flatten()
                | "JoinByKey" >> beam.GroupByKey()
                | "AnnotateRecords" >> beam.FlatMap(annotate, self.modality))


# ---- shards of records in (embeddings in ``.emb.npy`` sidecars), shards out: only keys, scores and fates travel ----

def shard_block(keyed, sidecars: dict, position_field: str, wire_dtype: str):
    """(shard, its records) -> one ``EmbeddingRows`` block of its active records (none if none is
    active): their rows of the shard's sidecar (``sidecars[shard]``) in row order, with their keys
    and scores; no vector is read here."""
    shard, records = keyed
    active = sorted((r for r in records if is_active(r)), key=lambda r: r[position_field])
    if not active:
        return
    rows = np.fromiter((r[position_field] for r in active), np.int64, len(active))
    scores = np.fromiter((math.nan if (s := effective_aesthetic(r)) is None else float(s) for r in active),
                         np.float64, len(active))
    yield EmbeddingRows(int(shard), sidecars[shard], int(rows[0]), int(rows[-1]) + 1,
                        tuple(r["key"] for r in active), scores, wire_dtype, rows)


def _tag(item, kind: str):
    return item[0], (kind, item[1])


_RECORDS_CODER = beam.coders.FastPrimitivesCoder()


def pack_records(keyed) -> tuple:
    """(shard, records) -> (shard, ("records", bytes)): the shard's records, their numeric arrays as
    bytes (``pack_record``), encoded as one value with Beam's primitives coder, each record as its
    values and the index of its field names in a table of the shard's distinct name tuples (a
    field name is written once per shard, not once per record). A runner that holds a shuffle in
    one process (DirectRunner: the join waits for SemDeDup) then holds one bytes object per shard,
    not a dict per record. ``unpack_records`` gives back equal records, fields in the same order."""
    shard, records = keyed
    names, rows = {}, []
    for record in records:
        fields, arrays = pack_record(record)
        rows.append((names.setdefault(tuple(fields), len(names)), tuple(fields.values()), arrays))
    return shard, ("records", _RECORDS_CODER.encode((tuple(names), rows)))


def unpack_records(data: bytes) -> list[dict]:
    names, rows = _RECORDS_CODER.decode(data)
    return [unpack_record((dict(zip(names[n], values)), arrays)) for n, values, arrays in rows]


def annotate_shard(keyed, modality: str) -> tuple:
    """(shard, [("records", ``pack_records`` bytes), ("fates", Fates of its active ones)]) -> (shard,
    its records, the active ones annotated as ``SemanticDedup`` annotates them, the rest unchanged)."""
    shard, items = keyed
    records = unpack_records(next(v for kind, v in items if kind == "records"))
    fates = next((v for kind, v in items if kind == "fates"), None)
    row = {} if fates is None else {k: m for m, k in enumerate(fates.keys)}
    out, n_active = [], 0
    for record in records:
        if not is_active(record):
            out.append(record)
            continue
        n_active += 1
        m = row.get(record["key"])
        fate = None if m is None else fate_at(fates, m)
        out.append(annotate_record(record, fate, modality))
    if fates is not None and len(row) != n_active:
        raise RuntimeError(f"shard {shard}: {len(row)} fates for {n_active} active records")
    return shard, out


class SemanticDedupShards(beam.PTransform):
    """SemDeDup over shards of records whose embeddings are rows of ``.emb.npy`` sidecars (the filter
    job's): (shard, records) in, (shard, records) out, the active records (no stage dropped them)
    annotated as ``SemanticDedup`` annotates them, the others unchanged. No record carries a vector
    and no step handles a single record.

    A record names its row in its shard's sidecar (``position_field``); ``sidecars`` maps a shard
    number to its sidecar's path. Each shard becomes one ``EmbeddingRows`` block (the rows of its
    active records only, read by the steps that need vectors), ``SemanticDedupBlocks`` gives one
    ``Fates`` per block, and the fates join the shard's records by shard number: one join element per
    shard. The k-means sample is drawn from all the sidecars (``sidecar_sample``), as
    ``SemanticDedup`` with ``sidecars`` draws it.
    """

    def __init__(self, modality: str, cfg: CurateConfig, sidecars: dict, *, position_field: str = "input_position",
                 margin: float | None = None, wire_dtype: str = WIRE_DTYPE, batch: int = ASSIGN_BATCH,
                 spread_factor: int = SPREAD_FACTOR):
        super().__init__()
        self.modality, self.cfg, self.sidecars, self.position_field = modality, cfg, dict(sidecars), position_field
        self.margin, self.wire_dtype, self.batch, self.spread_factor = margin, wire_dtype, batch, spread_factor

    def expand(self, shards):
        fates = (shards
                 | "MakeShardBlocks" >> beam.FlatMap(shard_block, self.sidecars, self.position_field, self.wire_dtype)
                 | "DedupBlocks" >> SemanticDedupBlocks(self.modality, self.cfg, margin=self.margin, batch=self.batch,
                                                        sidecars=tuple(self.sidecars[s] for s in sorted(self.sidecars)),
                                                        spread_factor=self.spread_factor))
        return (((shards | "PackRecords" >> beam.Map(pack_records)), (fates | "TagFates" >> beam.Map(_tag, "fates")))
                | "GatherRecordsAndFates" >> beam.Flatten()
                | "JoinByShard" >> beam.GroupByKey()
                | "AnnotateShards" >> beam.Map(annotate_shard, self.modality))
