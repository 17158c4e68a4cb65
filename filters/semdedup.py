"""SemDeDup (Abbas et al., arXiv 2303.09540) as pure functions over embedding arrays.

1. ``train_kmeans`` on a sample of the (L2-normalised) embeddings: spherical k-means with faiss;
2. ``assign_clusters``: every embedding to its nearest centroid (faiss inner-product search);
3. ``find_duplicates`` inside one cluster: two members are duplicates when their cosine
   similarity is **>= 1 - eps** (eps = 0: only identical directions; larger eps: more duplicates),
   compared with a 1e-6 allowance for float32 rounding.

In a duplicate group one member is kept by a deterministic rule: highest aesthetic score, then
smallest id (``filters.captions.keep_priority``). Members are visited in that order and each is
compared with the members kept so far; one within the threshold of a kept member becomes its
duplicate, otherwise it is kept. So kept members are pairwise below the threshold and every
dropped member is within it of the member it names. (The paper's code instead drops a point
similar to *any* earlier point, kept or not; on chains A~B~C with A !~ C it drops C as well.)

Pairs split across clusters are not compared: the price of never holding all embeddings at once,
as in the paper. Cost is O(cluster size^2 * dim) per cluster, computed in blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from filters.captions import keep_priority
from filters.clip_embed import l2_normalize

MIN_POINTS_PER_CENTROID = 40  # faiss warns below 39 training points per centroid
SIM_TOLERANCE = 1e-6  # float32 rounding: a unit vector's cosine with itself can be 0.99999994


def choose_n_clusters(n_total: int, n_sample: int, target_cluster_size: int) -> int:
    """k = ceil(n_total / target_cluster_size), at most n_sample / 40 (faiss's minimum), at least 1."""
    wanted = math.ceil(n_total / max(1, target_cluster_size))
    return max(1, min(wanted, n_sample // MIN_POINTS_PER_CENTROID))


def kmeans_plus_plus(x: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Greedy k-means++ seeding (Arthur and Vassilvitskii, 2007; as in scikit-learn) on unit rows.

    Each step draws 2 + ln(k) candidates with probability proportional to their squared distance
    to the nearest seed so far and keeps the one that lowers the total most, so two seeds rarely
    start inside one tight group (faiss's default, k random points, splits well-separated groups
    whenever two seeds land in the same one). (n, d) -> (k, d); O(k log k n d).
    """
    rng = np.random.default_rng(seed)
    trials = 2 + int(np.log(k))
    seeds = [int(rng.integers(x.shape[0]))]
    dist = np.maximum(2.0 - 2.0 * (x @ x[seeds[0]]), 0.0)  # squared distance between unit vectors
    for _ in range(1, k):
        total = float(dist.sum())
        if total <= 0:  # fewer distinct points than k: any point will do
            cands = rng.integers(x.shape[0], size=1)
        else:
            cands = rng.choice(x.shape[0], size=trials, p=dist / total)
        new = np.minimum(dist[None, :], np.maximum(2.0 - 2.0 * (x[cands] @ x.T), 0.0))  # (trials, n)
        best = int(np.argmin(new.sum(axis=1)))
        seeds.append(int(cands[best]))
        dist = new[best]
    return x[seeds]


def train_kmeans(sample: np.ndarray, n_clusters: int, *, niter: int = 20, seed: int = 0) -> np.ndarray:
    """Spherical k-means (faiss) from k-means++ seeds on ``sample`` (n, d) -> centroids (k, d), unit norm.

    ``k`` is capped at the sample size. Deterministic for a given sample order and seed.
    """
    import faiss

    x = np.ascontiguousarray(l2_normalize(sample))
    k = max(1, min(int(n_clusters), x.shape[0]))
    if k == 1:
        return l2_normalize(x.mean(axis=0, keepdims=True))
    kmeans = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, spherical=True, verbose=False,
                          min_points_per_centroid=1, max_points_per_centroid=x.shape[0])
    kmeans.train(x, init_centroids=np.ascontiguousarray(kmeans_plus_plus(x, k, seed)))
    return np.ascontiguousarray(kmeans.centroids, dtype=np.float32)


def centroid_index(centroids: np.ndarray):
    """A faiss inner-product index over (k, d) centroids, for ``assign_clusters`` (build once, reuse)."""
    import faiss

    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    return index


def assign_clusters(embeddings: np.ndarray, centroids: np.ndarray, index=None) -> np.ndarray:
    """Index of the nearest centroid (highest inner product) per row: (n, d), (k, d) -> (n,) int64.

    ``index``: a ``centroid_index(centroids)`` to reuse across calls.
    """
    x = np.ascontiguousarray(l2_normalize(embeddings))
    _, nearest = (index or centroid_index(centroids)).search(x, 1)
    return nearest[:, 0].astype(np.int64)


@dataclass(frozen=True)
class Duplicates:
    keep: np.ndarray  # (n,) bool: member kept
    duplicate_of: np.ndarray  # (n,) int64: index of the kept member it duplicates, -1 if kept
    similarity: np.ndarray  # (n,) float32: cosine to that kept member, NaN if kept


def find_duplicates(ids: list[str], embeddings: np.ndarray, scores: list[float | None], eps: float,
                    block: int = 1024) -> Duplicates:
    """Duplicate groups within one cluster; duplicates have cosine similarity >= 1 - eps.

    ``ids`` (n,), ``embeddings`` (n, d), ``scores`` (n,) aesthetic scores or None. Indices in the
    result refer to the input order.
    """
    n = len(ids)
    order = sorted(range(n), key=lambda i: keep_priority(scores[i], ids[i]))
    x = l2_normalize(embeddings)[order]
    threshold = 1.0 - eps - SIM_TOLERANCE
    kept: list[int] = []  # positions in `order`
    dup_of = np.full(n, -1, np.int64)
    sim = np.full(n, np.nan, np.float32)
    for start in range(0, n, block):
        rows = x[start:start + block]
        to_kept = rows @ x[kept].T  # (b, kept so far)
        within = rows @ rows.T  # (b, b)
        kept_here: list[int] = []
        for i in range(rows.shape[0]):
            cand = np.concatenate([to_kept[i], within[i, kept_here]])
            j = int(np.argmax(cand)) if cand.size else -1
            if j >= 0 and cand[j] >= threshold:
                rep = kept[j] if j < len(kept) else start + kept_here[j - len(kept)]
                dup_of[order[start + i]] = order[rep]
                sim[order[start + i]] = cand[j]
            else:
                kept_here.append(i)
        kept.extend(start + i for i in kept_here)
    return Duplicates(keep=dup_of < 0, duplicate_of=dup_of, similarity=sim)
