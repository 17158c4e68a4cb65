"""SemDeDup on Beam (shared by the curate and filter jobs): k-means on a sample, nearest-centroid assignment, GroupByKey per cluster.

    sample (Top.Of by hash of key) --TrainKMeans--> centroids (side input)
    records --AssignClusters--> (cluster, record) --GroupByCluster--> DedupEachCluster

Only the k-means sample is ever gathered in one place (``kmeans_sample_size`` embeddings); each
cluster is deduplicated by the worker that receives it (``filters.semdedup.find_duplicates``).
The sample is the ``kmeans_sample_size`` records with the smallest ``sha1(seed, key)``: a uniform
sample that is the same on every run and runner, so clusters, and hence results, are reproducible.

Choosing the knobs (``filters.config.CurateConfig``):

- k = ceil(records / ``target_cluster_size``) (default 1,000), so each cluster costs about
  1,000^2 cosines; faiss wants >= 39 sample points per centroid, so k <= sample / 40. The default
  sample of 50,000 (about 150 MB of 768-d float32 in one worker) allows k <= 1,250, which keeps
  the target size up to about 1.25M records; above that, raise ``kmeans_sample_size`` or set
  ``kmeans_clusters`` (SemDeDup clustered LAION-440M into 50,000 clusters).
- ``semdedup_eps`` (duplicates: cosine >= 1 - eps) defaults to 0.05. The right value depends on
  the embedding model and on how much the dataset may shrink; the manifest's
  ``duplicate_similarity`` column and the report's group-size plot show what a given eps removed.
"""

from __future__ import annotations

import hashlib

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from filters import reasons, semdedup
from filters.config import CurateConfig
from pipelines.records import EMBEDDING_FIELDS, dropped, effective_aesthetic


def _sample_rank(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha1(f"{seed}:{key}".encode("utf-8")).digest()[:8], "big")


def _rank_and_vector(record: dict, field: str, seed: int) -> tuple[int, str, np.ndarray]:
    return _sample_rank(seed, record["key"]), record["key"], record[field]


def _rank(item: tuple) -> int:
    return item[0]


def train_centroids(sample: list, n_total: int, cfg: CurateConfig) -> np.ndarray | None:
    """k-means centroids from the sample (sorted by rank for a stable order); None if empty."""
    if not sample:
        return None
    vectors = np.stack([v for _, _, v in sorted(sample, key=_rank)])
    k = cfg.kmeans_clusters or semdedup.choose_n_clusters(n_total, len(vectors), cfg.target_cluster_size)
    Metrics.distribution("curate", "kmeans_clusters").update(min(k, len(vectors)))
    return semdedup.train_kmeans(vectors, k, niter=cfg.kmeans_iterations, seed=cfg.kmeans_seed)


class AssignClusterFn(beam.DoFn):
    """record -> (nearest centroid, record), with the faiss index built once per centroids value.

    One record per call rather than ``BatchElements`` batches: ``BatchElements`` emits its last batch
    from ``finish_bundle``, whose output Beam's Dask runner drops (records went missing there). One
    search of a (1, d) query against k centroids is k * d multiply-adds: small beside embedding it.
    """

    def __init__(self, field: str):
        self.field = field

    def setup(self):
        self._centroids = self._index = None

    def process(self, record: dict, centroids: np.ndarray):
        if centroids is not self._centroids:  # a side input is one object for a whole bundle
            self._centroids, self._index = centroids, semdedup.centroid_index(centroids)
        cluster = semdedup.assign_clusters(record[self.field][None], centroids, self._index)[0]
        yield int(cluster), record


def dedup_cluster(keyed, field: str, modality: str, eps: float):
    """(cluster id, records) -> records annotated with cluster, duplicate_of, n_duplicates."""
    cluster, group = keyed
    group = list(group)
    found = semdedup.find_duplicates([r["key"] for r in group], np.stack([r[field] for r in group]),
                                     [effective_aesthetic(r) for r in group], eps)
    n_dups = np.bincount(found.duplicate_of[found.duplicate_of >= 0], minlength=len(group))
    Metrics.distribution("curate", f"cluster_size_{modality}").update(len(group))
    for i, record in enumerate(group):
        record = {**record, "dedup_on": modality, "cluster_id": cluster}
        if found.keep[i]:
            if n_dups[i]:
                record["n_duplicates"] = int(n_dups[i]) + (record.get("n_duplicates") or 0)
            yield record
        else:
            Metrics.counter("curate", f"filtered_{reasons.SEMANTIC_DUPLICATE}").inc()
            yield dropped(record, "semdedup", reasons.SEMANTIC_DUPLICATE,
                          duplicate_of=group[int(found.duplicate_of[i])]["key"],
                          duplicate_similarity=float(found.similarity[i]))


class SemanticDedup(beam.PTransform):
    """SemDeDup over the ``modality`` ("text" or "image") embedding of every input record.

    Duplicates: cosine similarity >= 1 - ``cfg.semdedup_eps``. Kept per duplicate group: highest
    aesthetic score, then smallest id.
    """

    def __init__(self, modality: str, cfg: CurateConfig):
        super().__init__()
        self.modality = modality
        self.field = EMBEDDING_FIELDS[modality]
        self.cfg = cfg

    def expand(self, records):
        cfg = self.cfg
        sample = (records
                  | "RankForSample" >> beam.Map(_rank_and_vector, self.field, cfg.kmeans_seed)
                  # CombineGlobally(TopCombineFn), not Top.Of: Top.Of emits from finish_bundle, which
                  # Beam's Dask runner drops (the sample came out empty there); the result is the same.
                  | "SampleForKMeans" >> beam.CombineGlobally(
                      beam.combiners.TopCombineFn(cfg.kmeans_sample_size, key=_rank, reverse=True)))
        count = records | "CountRecords" >> beam.combiners.Count.Globally()
        centroids = sample | "TrainKMeans" >> beam.Map(train_centroids, beam.pvalue.AsSingleton(count), cfg)
        return (records
                | "AssignClusters" >> beam.ParDo(AssignClusterFn(self.field), beam.pvalue.AsSingleton(centroids))
                | "GroupByCluster" >> beam.GroupByKey()
                | "DedupEachCluster" >> beam.FlatMap(dedup_cluster, self.field, self.modality, cfg.semdedup_eps))
