"""The per-block steps of SemDeDup on Beam (``pipelines.dedup``): every element is a block of rows.

An element holds a block of rows as a few numpy arrays (pickled once per block: one copy of each
array, not one pickle per record), so the cost Beam adds per record is a share of one element:

    Rows (an input block: keys, wire-dtype vectors, scores) --AssignBlocksFn--> one faiss search per
      ``batch`` rows --> ("cluster", (cluster, Block)) per cluster met + ("homes", (block id, keys, nearest))
    (cluster, Blocks) --pairs_in_cluster--> ("decision", (block id, (key, decision))) for duplicate groups
      seen whole in the cluster, ("pairs", pair block) for groups with a member in another cluster, or
      ("unit", work unit) for an oversized cluster (second k-means level, row blocks) --pairs_of_unit-->
    border pair blocks --border_edges/label_groups--> each member's connected group
      --border_members/route_to_group--> (group, members and pairs) --resolve_group--> decisions
    (block id, homes + decisions) --collect_fates--> (block id, Fates): each input row's nearest cluster
      and fate, in the input block's row order

Rows carry the id of the input block they came from (``Block.source``), so decisions go back to
their block by a GroupByKey on block ids, not by a join over every record's key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from filters import semdedup


@dataclass(frozen=True)
class Rows:
    """An input block: ``block`` its id (its fates come back under it), ``keys`` (n,), ``vectors``
    (n, d) wire dtype, ``scores`` (n,) float64 (NaN: unknown)."""

    block: int
    keys: tuple
    vectors: np.ndarray
    scores: np.ndarray

    def load(self) -> "Rows":
        return self


def read_npy_rows(path: str, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a saved (n, ...) ``.npy`` array, read without the rest of the file
    (no memory map, no pickle): a seek past the header and one read."""
    from core.fs import url_to_fs

    fs, p = url_to_fs(path)
    with fs.open(p, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        if fortran or dtype.hasobject:
            raise ValueError(f"{path}: a C-ordered numeric array is needed, got {dtype} (fortran order {fortran})")
        stop = min(stop, shape[0])
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        f.seek(f.tell() + start * row_bytes)
        data = f.read(max(0, stop - start) * row_bytes)
    return np.frombuffer(data, dtype).reshape((max(0, stop - start),) + tuple(shape[1:]))


@dataclass(frozen=True)
class EmbeddingRows:
    """An input block that stays in storage until a step needs its vectors: rows [``start``,
    ``stop``) of the ``.npy`` embeddings at ``path`` (one row per key), read in the wire dtype by
    ``load``; with ``rows`` (int64 row numbers of the file, ascending, within [``start``,
    ``stop``)), only those rows, one per key (the rows of a shard that earlier stages kept). Only
    keys, scores and row numbers travel, so no step holds every vector between stages."""

    block: int
    path: str
    start: int
    stop: int
    keys: tuple
    scores: np.ndarray
    wire_dtype: str = "float16"
    rows: np.ndarray | None = None

    def load(self) -> Rows:
        vectors = read_npy_rows(self.path, self.start, self.stop)
        if self.rows is not None:
            if len(self.rows) and (self.rows[0] < self.start or self.rows[-1] - self.start >= len(vectors)):
                raise ValueError(f"{self.path}: rows {int(self.rows[0])} to {int(self.rows[-1])} asked for, "
                                 f"rows {self.start} to {self.start + len(vectors)} there")
            vectors = vectors[np.asarray(self.rows, np.int64) - self.start]
        vectors = vectors.astype(self.wire_dtype)
        if len(vectors) != len(self.keys):
            raise ValueError(f"{self.path}: rows {self.start} to {self.stop} hold {len(vectors)} vectors for "
                             f"{len(self.keys)} keys")
        return Rows(self.block, self.keys, vectors, self.scores)


@dataclass(frozen=True)
class Block:
    """Rows of one cluster, packed: ``keys`` (n,), ``vectors`` (n, d) wire dtype, ``scores`` (n,)
    float64 (NaN: unknown), ``home`` (n,) int64: each row's nearest cluster (the one it is
    reported under; a margin copy has a different one), ``shared`` (n,) bool: the row is in two
    clusters, ``source`` (n,) int64: the input block (``Rows.block``) the row came from."""

    keys: tuple
    vectors: np.ndarray
    scores: np.ndarray
    home: np.ndarray
    shared: np.ndarray
    source: np.ndarray


@dataclass(frozen=True)
class Fates:
    """What dedup decided for the rows of one input block, in its row order: ``keys`` (n,),
    ``cluster`` (n,) int64 the nearest cluster, ``duplicate_of`` (n,) the key of the kept row a
    dropped row duplicates (None: kept), ``similarity`` (n,) float64 its cosine to that row (NaN:
    kept), ``n_duplicates`` (n,) int64 rows dropped as duplicates of a kept one."""

    keys: tuple
    cluster: np.ndarray
    duplicate_of: tuple
    similarity: np.ndarray
    n_duplicates: np.ndarray


class AssignBlocksFn(beam.DoFn):
    """Rows -> ("cluster", (cluster, Block)) per cluster met and one ("homes", (block id, keys,
    nearest cluster)), one faiss search per ``batch`` rows."""

    def __init__(self, margin: float, batch: int):
        self.margin, self.batch = margin, batch

    def setup(self):
        self._centroids = self._index = None

    def process(self, rows: Rows | EmbeddingRows, centroids: np.ndarray):
        rows = rows.load()
        if centroids is not self._centroids:  # a side input is one object for a whole bundle
            self._centroids, self._index = centroids, semdedup.centroid_index(centroids)
        n = len(rows.keys)
        keys = np.asarray(rows.keys, object)
        source = np.full(n, rows.block, np.int64)
        homes = []
        for st in range(0, n, self.batch):
            r = slice(st, min(st + self.batch, n))
            vectors = rows.vectors[r]
            assigned = semdedup.assign_clusters(vectors.astype(np.float32), self._centroids, self._index,
                                                margin=self.margin).reshape(len(vectors), -1)
            home = assigned[:, 0]
            shared = (assigned[:, 1:] >= 0).any(axis=1)  # margin copies in other clusters (none with margin 0)
            Metrics.counter("curate", "semdedup_margin_copies").inc(int((assigned[:, 1:] >= 0).sum()))
            for cluster, m in semdedup.members_by_cluster(assigned):
                yield "cluster", (cluster, Block(tuple(keys[r][m]), vectors[m], rows.scores[r][m], home[m], shared[m],
                                                 source[r][m]))
            homes.append(home)
        yield "homes", (rows.block, (rows.keys, np.concatenate(homes) if homes else np.zeros(0, np.int64)))


def _concat(blocks) -> Block:
    blocks = list(blocks)
    return Block(sum((b.keys for b in blocks), ()), *(np.concatenate([getattr(b, f) for b in blocks])
                                                      for f in ("vectors", "scores", "home", "shared", "source")))


def _take(block: Block, rows: np.ndarray) -> Block:
    return Block(tuple(np.asarray(block.keys, object)[rows]), block.vectors[rows], block.scores[rows],
                 block.home[rows], block.shared[rows], block.source[rows])


def pairs_in_cluster(keyed, modality: str, cfg, margin: float, spread_factor: int):
    """(cluster, Blocks) -> decisions and border pairs (``pairs_of_block``); a cluster of more than
    ``SPLIT_FACTOR`` x ``target_cluster_size`` rows -> work units instead: a second k-means level
    inside it (``filters.semdedup.fine_centroids``, assignment with the same margin), one unit per
    fine cluster, and a fine cluster still above ``MAX_UNIT_ROWS_FACTOR`` x target (rows k-means
    cannot part, such as thousands of copies of one image) cut into row blocks, one unit per pair of
    blocks. A cluster of more than ``spread_factor`` x target rows sends its units on ("unit", to be
    spread over workers by a Reshuffle, so no cluster is one hot key: at 1B a coarse cluster holds
    800k rows); a smaller one runs them here (``pairs_of_unit``), as its work fits one element and
    shipping its vectors again would cost more than it spreads."""
    block = _concat(keyed[1])
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
    block = Block(block.keys, block.vectors, block.scores, block.home, block.shared | fine_shared,
                  block.source)  # a row in another fine or coarse cluster too is shared
    spread = len(block.keys) > spread_factor * target
    Metrics.counter("curate", "semdedup_spread_clusters").inc(int(spread))
    for unit in _units(block, assigned, target):
        if spread:
            yield "unit", unit
        else:
            yield from pairs_of_unit(unit, cfg.semdedup_eps)


def _units(block: Block, assigned: np.ndarray, target: int):
    """The work units of a split cluster: ("whole", fine cluster, None), or ("blocks", a, b) for
    each pair of row blocks of a fine cluster above ``MAX_UNIT_ROWS_FACTOR`` x target."""
    for _, rows in semdedup.members_by_cluster(assigned):
        sub = _take(block, rows)
        if len(rows) <= semdedup.MAX_UNIT_ROWS_FACTOR * target:
            yield "whole", sub, None
            continue
        Metrics.counter("curate", "semdedup_block_split_clusters").inc()
        size = semdedup.SPLIT_FACTOR * target
        parts = [_take(sub, np.arange(st, min(st + size, len(rows)))) for st in range(0, len(rows), size)]
        for a in range(len(parts)):
            for b in range(a, len(parts)):
                yield "blocks", parts[a], parts[b] if b != a else None


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
    ``ResolveBorderPairs`` as (keys, scores, sources, i, j, similarity, vectors) over the members in
    them, so only the border's pairs ever meet in one place.
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
            yield from out(keys[members], block.scores[members], block.source[members], inverse[:len(p.i)],
                           inverse[len(p.i):], p.similarity, block.vectors[members], eps)


def _pair_block(keys, scores, sources, i, j, similarity, vectors, eps):
    yield "pairs", (keys, scores, sources, i, j, similarity, vectors)


def _decide(keys, scores, sources, i, j, similarity, vectors, eps):
    """The keep rule over these members' pairs -> ("decision", (block id, (key, decision))) per member
    it changes. ``vectors`` (wire dtype) let it compare a member with the kept member its dropped
    neighbours name (``filters.semdedup.resolve_pairs``): pairs across clusters may be missing."""
    ids = [str(k) for k in keys]
    found = semdedup.resolve_pairs(ids, [None if math.isnan(s) else float(s) for s in scores],
                                   semdedup.Pairs(i.astype(np.int64), j.astype(np.int64), similarity),
                                   embeddings=vectors, eps=eps)
    n_dups = np.bincount(found.duplicate_of[found.duplicate_of >= 0], minlength=len(ids))
    for m, key in enumerate(ids):
        if not found.keep[m]:
            decision = ("duplicate", ids[int(found.duplicate_of[m])], float(found.similarity[m]))
        elif n_dups[m]:
            decision = ("kept", int(n_dups[m]))
        else:
            continue
        yield "decision", (int(sources[m]), (key, decision))


def is_pair_block(item) -> bool:
    return item[0] == "pairs"


def is_decision(item) -> bool:
    return item[0] == "decision"


def is_unit(item) -> bool:
    return item[0] == "unit"


def is_cluster_part(item, part: int, parts: int) -> bool:
    return item[0] == "cluster" and item[1][0] % parts == part


def is_homes(item) -> bool:
    return item[0] == "homes"


def untag(item):
    return item[1]


def resolve(keyed, eps: float):
    """(any key, border pair blocks) -> (block id, (key, decision)) per row whose fate they change:
    the keep rule over all their pairs at once (``filters.semdedup.resolve_pairs``), a pair met in
    two clusters once. Resolving each connected group of pairs apart gives the same decisions: a
    member's fate depends only on members it is joined to by pairs."""
    blocks = list(keyed[1])
    if not blocks:
        return
    keys, scores, sources = (np.concatenate([b[f] for b in blocks]) for f in range(3))
    offsets = np.cumsum([0] + [len(b[0]) for b in blocks[:-1]])
    i = np.concatenate([b[3] + o for b, o in zip(blocks, offsets)])
    j = np.concatenate([b[4] + o for b, o in zip(blocks, offsets)])
    sim = np.concatenate([b[5] for b in blocks])
    vectors = np.concatenate([b[6] for b in blocks])
    ids, first, inverse = np.unique(keys.astype(str), return_index=True, return_inverse=True)
    i, j = inverse[i], inverse[j]
    lo, hi = np.minimum(i, j), np.maximum(i, j)
    _, once = np.unique(lo * len(ids) + hi, return_index=True)
    for _, decision in _decide(ids, scores[first], sources[first], lo[once], hi[once], sim[once].astype(np.float32),
                               vectors[first], eps):
        yield decision


def collect_fates(keyed) -> tuple[int, Fates]:
    """(block id, [("homes", (keys, nearest)), ("decision", (key, decision)), ...]) -> (block id, Fates)."""
    block, items = keyed
    keys, homes, decisions = (), np.zeros(0, np.int64), {}
    for kind, value in items:
        if kind == "homes":
            keys, homes = value
        else:
            decisions[value[0]] = value[1]
    n = len(keys)
    duplicate_of, similarity, n_dups = [None] * n, np.full(n, np.nan), np.zeros(n, np.int64)
    if decisions:
        for m, key in enumerate(keys):
            decision = decisions.get(key)
            if decision is None:
                continue
            if decision[0] == "kept":
                n_dups[m] = decision[1]
            else:
                duplicate_of[m], similarity[m] = decision[1], decision[2]
    return block, Fates(tuple(keys), np.asarray(homes, np.int64), tuple(duplicate_of), similarity, n_dups)


def tag_homes(item):
    block, value = item
    return block, ("homes", value)


def tag_decision(item):
    block, value = item
    return block, ("decision", value)


# ---- border pairs, resolved per connected group of pairs (spread by group, not in one worker) ----

def key_hashes(keys) -> np.ndarray:
    """A stable 64-bit hash per key (sha1, as ``sample_rank``): the same in every worker. Two keys
    sharing one only merge their groups, which are then resolved together: the same decisions."""
    return np.fromiter((semdedup.sample_rank(0, str(k)) for k in keys), np.uint64, len(keys))


def border_edges(item):
    """A border pair block -> (None, (hash of i, hash of j)): the pair graph as 16 bytes per pair."""
    keys, _, _, i, j, _, _ = item
    h = key_hashes(keys)
    return None, (h[i], h[j])


def label_groups(keyed):
    """(None, edge arrays) -> (key hash, ("group", group id)) per member: the connected groups of
    the border pair graph (the only step that sees every border pair; it holds 16 bytes per pair)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    parts = list(keyed[1])
    if not parts:
        return
    a, b = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    nodes, inverse = np.unique(np.r_[a, b], return_inverse=True)
    n = len(nodes)
    _, group = connected_components(coo_matrix((np.ones(len(a)), (inverse[:len(a)], inverse[len(a):])), shape=(n, n)),
                                    directed=False)
    Metrics.counter("curate", "semdedup_border_groups").inc(int(group.max()) + 1)
    for h, g in zip(nodes.tolist(), group.tolist()):
        yield h, ("group", g)


def border_members(item):
    """A border pair block -> (key hash, ("member", key, score, source, vector)) per member and
    (key hash of i, ("edge", key i, key j, similarity)) per pair."""
    keys, scores, sources, i, j, sim, vectors = item
    h = key_hashes(keys).tolist()
    for m, key in enumerate(keys):
        yield h[m], ("member", str(key), float(scores[m]), int(sources[m]), vectors[m])
    for p in range(len(i)):
        yield h[int(i[p])], ("edge", str(keys[int(i[p])]), str(keys[int(j[p])]), float(sim[p]))


def route_to_group(keyed):
    """(key hash, [group label, member, edges]) -> (group id, item) for the member (once) and its edges."""
    _, items = keyed
    group = next(item[1] for item in items if item[0] == "group")
    member = next((item for item in items if item[0] == "member"), None)
    if member is not None:
        yield group, member
    for item in items:
        if item[0] == "edge":
            yield group, item


def resolve_group(keyed, eps: float):
    """(group id, members and edges) -> (block id, (key, decision)): ``resolve`` over one connected
    group of border pairs (a pair met in two clusters once)."""
    _, items = keyed
    members, edges = {}, []
    for item in items:
        if item[0] == "member":
            members.setdefault(item[1], item[2:])
        else:
            edges.append(item[1:])
    keys = sorted(members)
    index = {k: m for m, k in enumerate(keys)}
    block = (np.asarray(keys, object), np.asarray([members[k][0] for k in keys], np.float64),
             np.asarray([members[k][1] for k in keys], np.int64),
             np.asarray([index[e[0]] for e in edges], np.int64), np.asarray([index[e[1]] for e in edges], np.int64),
             np.asarray([e[2] for e in edges], np.float32), np.stack([members[k][2] for k in keys]))
    yield from resolve((None, [block]), eps)
