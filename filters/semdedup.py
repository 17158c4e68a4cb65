"""SemDeDup (Abbas et al., arXiv 2303.09540) as pure functions over embedding arrays.

1. ``train_kmeans`` on a sample of the (L2-normalised) embeddings: spherical k-means with faiss;
   k is at most sample / 40, so where that leaves clusters above ``SPLIT_FACTOR`` x the target size,
   a second level (``fine_centroids``) splits each such cluster by its own k-means;
2. ``assign_clusters``: every embedding to its nearest centroid (faiss inner-product search), and,
   with ``margin > 0``, also to each of the next two nearest that is within ``margin`` of the
   nearest in cosine, so near-duplicates on either side of a cluster border still meet;
3. ``cluster_pairs`` inside one cluster: two members are duplicates when their cosine
   similarity is **>= 1 - eps** (eps = 0: only identical directions; larger eps: more duplicates),
   compared with a 1e-6 allowance for float32 rounding. One matrix product per block of rows, a
   threshold, and a sparse pair list;
4. ``resolve_pairs``: the keep rule over the pair graph of the whole set (pairs from every
   cluster, a pair seen in two clusters counted once), so a record in two clusters gets one fate.

In a duplicate group one member is kept by a deterministic rule: highest aesthetic score, then
smallest id (``filters.captions.keep_priority``). Members are visited in that order; one within the
threshold of a member kept before it becomes the duplicate of the most similar such member,
otherwise it is kept. So kept members are pairwise below the threshold and every dropped member is
within it of the member it names. (The paper's code instead drops a point similar to *any* earlier
point, kept or not; on chains A~B~C with A !~ C it drops C as well.)

``deduplicate`` runs the four steps over one array; ``find_duplicates`` is steps 3 and 4 for one
cluster. Pairs whose members share no cluster (neither nearest nor, within the margin, second
nearest) are not compared: the price of never holding all embeddings at once, as in the paper.
Cost is O(cluster size^2 * dim) per cluster.
"""

from __future__ import annotations

import hashlib
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


SPLIT_FACTOR = 4  # a cluster of more than SPLIT_FACTOR x target_cluster_size rows gets a second k-means level
MAX_UNIT_ROWS_FACTOR = 8  # a cluster the second level leaves above this x target is compared in row blocks


def sample_rank(seed: int, key: str) -> int:
    """The rank that picks k-means samples: sha1(seed, key), so the same rows on every run and runner."""
    return int.from_bytes(hashlib.sha1(f"{seed}:{key}".encode("utf-8")).digest()[:8], "big")


def fine_centroids(embeddings: np.ndarray, ids, target_cluster_size: int, *, sample_size: int, niter: int = 20,
                   seed: int = 0) -> np.ndarray:
    """The second k-means level inside one oversized cluster: k = ceil(m / target) centroids trained
    on up to ``sample_size`` of its m rows, those of smallest ``sample_rank``, in rank order (so the
    result does not depend on the order the rows arrive in). (m, d) -> (k, d)."""
    ranks = np.fromiter((sample_rank(seed, str(k)) for k in ids), np.uint64, len(ids))
    picked = np.argsort(ranks, kind="stable")[:sample_size]
    k = choose_n_clusters(len(ids), len(picked), target_cluster_size)
    return train_kmeans(np.asarray(embeddings[picked], np.float32), k, niter=niter, seed=seed)


def members_by_cluster(assigned: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(n,) or (n, m) assignment (``assign_clusters``; -1 = none) -> (cluster, row indices) per
    cluster met, in cluster order; a row with more than one cluster is in each."""
    assigned = assigned.reshape(assigned.shape[0], -1)
    rows = np.concatenate([np.flatnonzero(assigned[:, c] >= 0) for c in range(assigned.shape[1])])
    labels = np.concatenate([assigned[assigned[:, c] >= 0, c] for c in range(assigned.shape[1])])
    by_cluster = np.argsort(labels, kind="stable")
    rows, labels = rows[by_cluster], labels[by_cluster]
    bounds = np.flatnonzero(np.r_[True, labels[1:] != labels[:-1], True])
    return [(int(labels[st]), rows[st:en]) for st, en in zip(bounds[:-1].tolist(), bounds[1:].tolist())]


SEEDING_POINTS_PER_CENTROID = 16  # k-means++ seeds from at most this many points per centroid


def kmeans_plus_plus(x: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Greedy k-means++ seeding (Arthur and Vassilvitskii, 2007; as in scikit-learn) on unit rows.

    Each step draws 2 + ln(k) candidates with probability proportional to their squared distance
    to the nearest seed so far and keeps the one that lowers the total most, so two seeds rarely
    start inside one tight group (faiss's default, k random points, splits well-separated groups
    whenever two seeds land in the same one). (n, d) -> (k, d); O(k log k m d) for m =
    min(n, 16 k) rows drawn from ``x``: seeding is k sequential passes, so it runs on a subsample
    (the k-means iterations that follow use every row).
    """
    rng = np.random.default_rng(seed)
    if x.shape[0] > SEEDING_POINTS_PER_CENTROID * k:
        x = x[np.sort(rng.choice(x.shape[0], size=SEEDING_POINTS_PER_CENTROID * k, replace=False))]
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


MARGIN_NEIGHBOURS = 3  # centroids a row may be copied to with the margin: the nearest and 2 more


def assign_clusters(embeddings: np.ndarray, centroids: np.ndarray, index=None, *, margin: float = 0.0,
                    neighbours: int = MARGIN_NEIGHBOURS) -> np.ndarray:
    """Nearest centroid (highest inner product) per row: (n, d), (k, d) -> (n,) int64; with
    ``margin > 0``, (n, min(neighbours, k)): the nearest, then each of the next nearest whose cosine
    is within ``margin`` of the nearest's (else -1).

    Two near-duplicates x, y with cos(x, y) >= 1 - eps lie within a small angle of each other, so
    their cosines to any centroid differ little; when they straddle a border, each is close to it,
    and the margin test puts both in one cluster at least once. Not only the second nearest: with
    1,000 centroids in 512-d many are nearly as close, and the other member's cluster is often a
    row's third. Measured on the 1M benchmark data (k = 1,000, margin 0.01): 99 of 58,842 true
    pairs never shared a cluster with the second nearest only (11.6% of rows copied), 8 with up
    to two more (18.6% copied), 4 with three more (22.9%); a wider margin with the second nearest
    only barely helps (93 at 0.02). ``index``: a ``centroid_index(centroids)`` to reuse across calls.
    """
    x = np.ascontiguousarray(l2_normalize(embeddings))
    k = min(max(1, neighbours), centroids.shape[0]) if margin > 0 else 1
    sims, nearest = (index or centroid_index(centroids)).search(x, k)
    if margin <= 0:
        return nearest[:, 0].astype(np.int64)
    out = np.where(sims[:, :1] - sims <= margin, nearest, -1).astype(np.int64)
    out[:, 0] = nearest[:, 0]
    return out


@dataclass(frozen=True)
class Pairs:
    """Duplicate pairs as a sparse list: ``i[p] < j[p]`` index rows, ``similarity[p]`` their cosine."""

    i: np.ndarray  # (p,) int64
    j: np.ndarray  # (p,) int64
    similarity: np.ndarray  # (p,) float32


@dataclass(frozen=True)
class Duplicates:
    keep: np.ndarray  # (n,) bool: member kept
    duplicate_of: np.ndarray  # (n,) int64: index of the kept member it duplicates, -1 if kept
    similarity: np.ndarray  # (n,) float32: cosine to that kept member, NaN if kept


def cluster_pairs(embeddings: np.ndarray, eps: float, block: int = 2048) -> Pairs:
    """Every pair of rows with cosine >= 1 - eps: (n, d) -> ``Pairs`` with indices into the rows.

    One (block, n) matrix product per block of rows, upper triangle only, thresholded into a
    sparse list; memory O(block * n), no per-row Python loop.
    """
    x = l2_normalize(embeddings)
    threshold = np.float32(1.0 - eps - SIM_TOLERANCE)
    ii, jj, ss = [], [], []
    for start in range(0, x.shape[0], block):
        sims = x[start:start + block] @ x[start:].T  # (b, n - start): columns from this block on
        r, c = np.nonzero(sims >= threshold)
        upper = c > r  # column index start + c, row start + r: keep i < j
        r, c = r[upper], c[upper]
        ii.append(r + start), jj.append(c + start), ss.append(sims[r, c])
    cat = np.concatenate
    return Pairs(cat(ii).astype(np.int64), cat(jj).astype(np.int64), cat(ss).astype(np.float32))


def cross_pairs(a: np.ndarray, b: np.ndarray, eps: float) -> Pairs:
    """Pairs between two row blocks with cosine >= 1 - eps: (na, d), (nb, d) -> ``Pairs`` with ``i``
    indexing ``a`` and ``j`` indexing ``b`` (the blocks of one cluster too big to compare at once)."""
    sims = l2_normalize(a) @ l2_normalize(b).T
    r, c = np.nonzero(sims >= np.float32(1.0 - eps - SIM_TOLERANCE))
    return Pairs(r.astype(np.int64), c.astype(np.int64), sims[r, c].astype(np.float32))


def resolve_pairs(ids: list[str], scores: list[float | None], pairs: Pairs, *, embeddings: np.ndarray | None = None,
                  eps: float | None = None) -> Duplicates:
    """The keep rule (module docstring) over a pair graph: ``ids``/``scores`` (n,), pairs index them.

    A pair listed twice (seen in two clusters) counts once. Members without an earlier-ranked
    neighbour are kept without a visit; the rest are visited in priority order.

    With ``embeddings`` (n, d) and ``eps``: a member whose earlier-ranked neighbours were all dropped
    is compared with the members they were dropped for, and becomes the duplicate of the most similar
    one within the threshold. The pair lists come from clusters, and a pair whose members share no
    cluster is never listed: in a group A ~ B ~ C (A kept, B its duplicate) where A-C was not
    compared, C would otherwise be kept beside A (two kept in one exact group; 0.19% of the planted
    groups at 1M). Still only members within the threshold of a kept one are dropped.
    """
    n = len(ids)
    order = sorted(range(n), key=lambda i: keep_priority(scores[i], ids[i]))
    rank = np.empty(n, np.int64)
    rank[np.asarray(order, np.int64)] = np.arange(n)
    dup_of = np.full(n, -1, np.int64)
    sim = np.full(n, np.nan, np.float32)
    if len(pairs.i):
        if embeddings is not None:
            order_arr = np.asarray(order, np.int64)
            threshold = np.float32(1.0 - eps - SIM_TOLERANCE)
        a, b = rank[pairs.i], rank[pairs.j]
        lo, hi = np.minimum(a, b), np.maximum(a, b)  # by rank: hi may be a duplicate of lo
        by_hi = np.lexsort((lo, hi))  # visit later members in rank order, earlier neighbours in rank order
        lo, hi, s = lo[by_hi], hi[by_hi], pairs.similarity[by_hi]
        starts = np.flatnonzero(np.r_[True, hi[1:] != hi[:-1]])
        ends = np.r_[starts[1:], len(hi)]
        kept_rank = np.ones(n, bool)  # by rank
        dup_rank = np.full(n, -1, np.int64)  # by rank: the rank of the kept member a dropped one names
        for st, en in zip(starts.tolist(), ends.tolist()):
            nb, nbs = lo[st:en], s[st:en]
            ok = kept_rank[nb]
            if not ok.any():
                if embeddings is None:
                    continue
                # two hops: the kept members its dropped neighbours name (kept for good: ranked earlier)
                nb = np.unique(dup_rank[nb])
                vectors = l2_normalize(np.asarray(embeddings[order_arr[np.r_[nb, hi[st]]]], np.float32))
                nbs = vectors[:-1] @ vectors[-1]
                ok = nbs >= threshold
                if not ok.any():
                    continue
            best = int(np.argmax(np.where(ok, nbs, -np.inf)))  # first maximum: the highest-ranked
            kept_rank[hi[st]] = False
            dup_rank[hi[st]] = nb[best]
            member = order[int(hi[st])]
            dup_of[member], sim[member] = order[int(nb[best])], nbs[best]
    return Duplicates(keep=dup_of < 0, duplicate_of=dup_of, similarity=sim)


def find_duplicates(ids: list[str], embeddings: np.ndarray, scores: list[float | None], eps: float,
                    block: int = 2048) -> Duplicates:
    """Duplicate groups within one cluster; duplicates have cosine similarity >= 1 - eps.

    ``ids`` (n,), ``embeddings`` (n, d), ``scores`` (n,) aesthetic scores or None. Indices in the
    result refer to the input order.
    """
    return resolve_pairs(ids, scores, cluster_pairs(embeddings, eps, block), embeddings=embeddings, eps=eps)


def deduplicate(embeddings: np.ndarray, ids: list[str], scores: list[float | None], eps: float, *,
                sample_size: int = 50_000, target_cluster_size: int = 1000, n_clusters: int | None = None,
                niter: int = 20, margin: float = 0.01, seed: int = 0) -> Duplicates:
    """SemDeDup over one array of embeddings (n, d): k-means on a seeded sample of ``sample_size``
    rows, assignment with a border ``margin``, pairs per cluster, one keep decision over all pairs.

    Two levels where one is too coarse: k is at most ``sample_size`` / 40, so past about 40 x
    ``target_cluster_size`` rows per sample row clusters outgrow the target; a cluster of more than
    ``SPLIT_FACTOR`` x target rows is split by its own k-means (``fine_centroids``, assignment with
    the same margin), so clusters stay near the target whatever n is (1B rows: about 1,250 coarse
    clusters of 800k rows, each split into about 800)."""
    n = embeddings.shape[0]
    rng = np.random.default_rng(seed)
    sample = embeddings if n <= sample_size else embeddings[np.sort(rng.choice(n, size=sample_size, replace=False))]
    k = n_clusters or choose_n_clusters(n, sample.shape[0], target_cluster_size)
    centroids = train_kmeans(sample, k, niter=niter, seed=seed)
    ii, jj, ss = [], [], []
    for _, members in members_by_cluster(assign_clusters(embeddings, centroids, margin=margin)):
        if len(members) > SPLIT_FACTOR * target_cluster_size:
            x = embeddings[members]
            fine = fine_centroids(x, [ids[m] for m in members], target_cluster_size, sample_size=sample_size,
                                  niter=niter, seed=seed)
            parts = [members[f] for _, f in members_by_cluster(assign_clusters(x, fine, margin=margin))]
        else:
            parts = [members]
        for part in parts:
            if len(part) < 2:
                continue
            p = cluster_pairs(embeddings[part], eps)
            ii.append(part[p.i]), jj.append(part[p.j]), ss.append(p.similarity)
    if ii:
        i, j, s = np.concatenate(ii), np.concatenate(jj), np.concatenate(ss)
        lo, hi = np.minimum(i, j), np.maximum(i, j)
        _, first = np.unique(lo * n + hi, return_index=True)  # a pair met in two clusters, once
        pairs = Pairs(lo[first], hi[first], s[first])
    else:
        pairs = Pairs(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
    return resolve_pairs(ids, scores, pairs, embeddings=embeddings, eps=eps)
