"""SemDeDup on planted near-duplicates with known cosine: exactly the planted groups are found,
the member the rule says is kept, and the eps direction is cosine >= 1 - eps."""

import numpy as np
import pytest

from filters.semdedup import (Pairs, assign_clusters, choose_n_clusters, cluster_pairs, deduplicate, find_duplicates,
                              resolve_pairs, train_kmeans)


def planted(dim=64, n_groups=4, group_size=3, n_singles=5, cos=0.99, seed=0):
    """Groups of unit vectors at cosine `cos` to a shared base (pairwise about cos**2 = 0.98);
    bases and singles mutually near-orthogonal (random directions in 64-d: |cos| < 0.5)."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))  # orthonormal columns
    vectors, ids, groups, col = [], [], [], 0
    for g in range(n_groups):
        base = q[:, col]
        col += 1
        members = []
        for m in range(group_size):
            u = q[:, col]  # orthogonal to base and to every other u
            col += 1
            vectors.append(cos * base + np.sqrt(1 - cos**2) * u)
            ids.append(f"g{g}-m{m}")
            members.append(len(ids) - 1)
        groups.append(members)
    for s in range(n_singles):
        vectors.append(q[:, col])
        col += 1
        ids.append(f"single-{s}")
    return ids, np.asarray(vectors, np.float32), groups


def test_planted_groups_found_and_highest_aesthetic_kept():
    ids, x, groups = planted()
    scores = [None] * len(ids)
    # group 0: member 2 has the highest score; group 1: tie on score -> smallest id (m0 vs m1: m0);
    # group 2: no scores -> smallest id; group 3: one member scored -> it ranks above unknown ones
    scores[groups[0][2]], scores[groups[0][0]] = 7.5, 6.0
    scores[groups[1][1]], scores[groups[1][0]] = 5.0, 5.0
    scores[groups[3][1]] = 4.0
    found = find_duplicates(ids, x, scores, eps=0.05)
    expected_keep = {groups[0][2], groups[1][0], groups[2][0], groups[3][1]} | set(range(12, 17))
    assert set(np.flatnonzero(found.keep)) == expected_keep
    for members in groups:
        kept = [m for m in members if found.keep[m]]
        assert len(kept) == 1
        for m in members:
            if m != kept[0]:
                assert found.duplicate_of[m] == kept[0]
                assert found.similarity[m] == pytest.approx(0.99**2, abs=1e-4)


def test_eps_direction_cosine_at_least_one_minus_eps():
    ids, x, _ = planted(n_groups=1, group_size=2, n_singles=0, cos=0.99)  # pair cosine 0.9801
    assert find_duplicates(ids, x, [None, None], eps=0.02).keep.tolist() == [True, False]  # 0.9801 >= 0.98
    assert find_duplicates(ids, x, [None, None], eps=0.019).keep.tolist() == [True, True]  # 0.9801 < 0.981
    assert find_duplicates(ids, x, [None, None], eps=0.0).keep.tolist() == [True, True]
    same = np.stack([x[0], x[0]])
    assert find_duplicates(ids, same, [None, None], eps=0.0).keep.tolist() == [True, False]  # identical


def test_blocks_give_the_same_answer():
    ids, x, _ = planted(n_groups=6, group_size=4)
    scores = list(np.random.default_rng(3).uniform(0, 10, len(ids)))
    whole = find_duplicates(ids, x, scores, eps=0.05)
    blocked = find_duplicates(ids, x, scores, eps=0.05, block=3)
    assert whole.keep.tolist() == blocked.keep.tolist()
    assert whole.duplicate_of.tolist() == blocked.duplicate_of.tolist()


def test_kmeans_keeps_planted_groups_together():
    ids, x, groups = planted(n_groups=4, group_size=3, n_singles=0)
    centroids = train_kmeans(x, 4, niter=20, seed=0)
    assert centroids.shape == (4, 64)
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-5)
    clusters = assign_clusters(x, centroids)
    assert len({clusters[m] for m in groups[0]}) == 1
    assert sorted(len({clusters[m] for m in g}) for g in groups) == [1, 1, 1, 1]
    assert len({clusters[g[0]] for g in groups}) == 4  # one cluster per planted group
    assert train_kmeans(x, 4, seed=0).tolist() == centroids.tolist()  # deterministic


def test_choose_n_clusters():
    assert choose_n_clusters(10, 10, 1000) == 1
    assert choose_n_clusters(1_000_000, 50_000, 1000) == 1000
    assert choose_n_clusters(100_000_000, 50_000, 1000) == 1250  # capped: 40 sample points per centroid


def test_pairs_match_brute_force_and_blocks():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(300, 16)).astype(np.float32)
    x[100:150] = x[:50] + 0.05 * rng.normal(size=(50, 16)).astype(np.float32)  # 50 planted near copies
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = xn.astype(np.float64) @ xn.T.astype(np.float64)
    want = {(i, j) for i in range(300) for j in range(i + 1, 300) if sims[i, j] >= 0.95 + 1e-4}
    for block in (7, 2048):
        p = cluster_pairs(x, 0.05, block=block)
        got = set(zip(p.i.tolist(), p.j.tolist()))
        assert want <= got  # every clear pair found ...
        assert all(sims[i, j] >= 0.95 - 1e-4 for i, j in got)  # ... and nothing far below the threshold
        np.testing.assert_allclose(p.similarity, sims[p.i, p.j], atol=1e-5)


def test_resolve_counts_a_pair_seen_twice_once_and_matches_the_rule():
    ids = ["a", "b", "c", "d"]
    scores = [1.0, 9.0, 5.0, None]  # rank: b, c, a, d
    pairs = Pairs(np.array([0, 0, 1, 2]), np.array([1, 1, 2, 3]), np.array([0.97, 0.97, 0.96, 0.99], np.float32))
    found = resolve_pairs(ids, scores, pairs)
    # b kept; c ~ b -> duplicate of b; a ~ b -> duplicate of b; d ~ c only, and c was dropped -> kept
    assert found.keep.tolist() == [False, True, False, True]
    assert found.duplicate_of.tolist() == [1, -1, 1, -1]


def test_second_nearest_centroid_finds_a_pair_split_across_clusters():
    """A planted pair straddling the border between two centroids: nearest-only assignment puts its
    members in different clusters (so the pair is never compared); the margin puts them together."""
    c0, c1 = np.eye(8, dtype=np.float32)[0], np.eye(8, dtype=np.float32)[1]
    mid = (c0 + c1) / np.sqrt(2)
    off = np.eye(8, dtype=np.float32)[2]
    a = mid + 0.02 * (c0 - c1) + 0.01 * off  # a little closer to c0
    b = mid - 0.02 * (c0 - c1) - 0.01 * off  # a little closer to c1
    x = np.stack([a, b]).astype(np.float32)
    centroids = np.stack([c0, c1])
    nearest = assign_clusters(x, centroids)
    assert nearest.tolist() == [0, 1]  # split
    both = assign_clusters(x, centroids, margin=0.1)
    assert both.tolist() == [[0, 1], [1, 0]]
    found = deduplicate(x, ["a", "b"], [None, None], eps=0.05, n_clusters=2, margin=0.1)
    assert found.keep.tolist() == [True, False]  # found, and one kept


def test_deduplicate_keeps_exactly_one_per_planted_group():
    ids, x, groups = planted(dim=64, n_groups=8, group_size=3, n_singles=20)
    found = deduplicate(x, ids, [None] * len(ids), eps=0.05, n_clusters=4, margin=0.05)
    for members in groups:
        assert sum(found.keep[m] for m in members) == 1
    assert found.keep[24:].all()  # singles


def test_a_group_whose_pair_no_cluster_compared_keeps_one():
    """A ~ B ~ C all within the threshold, but A-C was never compared (A and C share no cluster; B
    was in both): with the embeddings the rule compares C with A, the member its neighbour B was
    dropped for, so the group keeps one. A true chain (A !~ C) still keeps both ends."""
    e = np.eye(8, dtype=np.float32)
    clique = np.stack([e[0], 0.99 * e[0] + np.sqrt(1 - 0.99**2) * e[1], 0.99 * e[0] + np.sqrt(1 - 0.99**2) * e[2]])
    t = np.arccos(0.97)
    chain = np.stack([e[0], np.cos(t) * e[0] + np.sin(t) * e[1], np.cos(2 * t) * e[0] + np.sin(2 * t) * e[1]])
    ids, scores = ["a", "b", "c"], [9.0, 8.0, 7.0]  # rank a, b, c
    for x, kept in ((clique, [True, False, False]), (chain, [True, False, True])):
        sims = x @ x.T
        assert sims[0, 1] >= 0.95 and sims[1, 2] >= 0.95 and (sims[0, 2] >= 0.95) == (x is clique)
        pairs = Pairs(np.array([0, 1]), np.array([1, 2]), np.array([sims[0, 1], sims[1, 2]], np.float32))  # no a-c
        assert resolve_pairs(ids, scores, pairs).keep.tolist() == [True, False, True]  # pairs alone: two kept
        found = resolve_pairs(ids, scores, pairs, embeddings=x, eps=0.05)
        assert found.keep.tolist() == kept
        assert found.duplicate_of.tolist() == [-1, 0, 0 if x is clique else -1]
        if x is clique:
            assert found.similarity[2] == pytest.approx(sims[0, 2], abs=1e-6)


def test_margin_reaches_the_third_nearest_centroid():
    """A pair whose clusters are not each other's second nearest: x is nearest A, then C, then B;
    y is nearest B, then D. With the second nearest only they never meet (x: A, C; y: B, D); with
    the next two nearest within the margin, x is also in B, where y is."""
    e = np.eye(8, dtype=np.float32)
    a, b, c, d = e[0], e[1], e[2], e[3]
    x = 0.500 * a + 0.494 * b + 0.497 * c + 3.0 * e[4]
    y = 0.400 * a + 0.500 * b + 0.497 * d + 3.0 * e[4]
    x, y = x / np.linalg.norm(x), y / np.linalg.norm(y)
    assert x @ y >= 0.95
    centroids = np.stack([a, b, c, d])
    assert assign_clusters(np.stack([x, y]), centroids, margin=0.01, neighbours=2).tolist() == [[0, 2], [1, 3]]
    assert assign_clusters(np.stack([x, y]), centroids, margin=0.01).tolist() == [[0, 2, 1], [1, 3, -1]]
