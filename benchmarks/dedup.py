"""Semantic dedup at scale: planted near-duplicates in CLIP-like embeddings, timed and scored.

    python benchmarks/dedup.py [--n 1000000] [--dim 512] [--groups 50000] [--eps 0.05] [--paths bare,ivf]
    python benchmarks/dedup.py --n 100000 --groups 5000          # a quick run

The data: ``n`` unit vectors with a realistic non-duplicate similarity distribution (topics plus a
shared direction, so that unrelated pairs have cosines around 0.2 to 0.5, as CLIP embeddings do),
and ``groups`` planted near-duplicate groups (pairs and triples) whose member cosines are drawn
around the threshold ``1 - eps``: most well inside, a fifth within 0.01 of it on either side.

The truth: the planted pairs whose float64 cosine is >= 1 - eps. That no unplanted pair is that
close is checked with an exact brute-force faiss range search on a random subset (``--check_subset``
rows, all pairs inside it): the full 1M x 1M search is 5e14 multiply-adds, hours on 2 cores.

Each path is timed (wall, and peak RSS: the Beam paths' own, measured in the child process they
run in; for ``bare`` and ``ivf`` this process's so far, which includes the data) and scored:
- pair recall: true pairs that do not end with both members kept; at the boundary too (true pairs
  within 0.01 of the threshold);
- precision: reported (duplicate, kept) pairs whose float64 cosine is >= 1 - eps - 1e-6;
- groups: planted groups all of whose pairs are true duplicates that keep exactly one member.

Paths, all in this invocation and on the same data:
- ``bare``: ``filters.semdedup.deduplicate`` (k-means on a sample, nearest-centroid assignment with
  a border margin, per-cluster pairs, one global keep decision), the functions the jobs run;
- ``ivf``: a faiss IVF range search over the whole set (the autofaiss / clip-retrieval approach),
  then the same keep rule on its pairs;
- ``beam``: ``pipelines.dedup.SemanticDedup`` (records in, records out; the filter job's path before) on
  DirectRunner in a spawned child process, fed the same embeddings as one record per row, read in
  chunks of 10,000 from a saved ``.npy`` (``--paths bare,ivf,beam``); ``beam_light``: the same, the
  records leaving without their vectors (``keep_vectors=False``, what the curate job calls);
- ``beam_blocks``: ``pipelines.dedup.SemanticDedupBlocks`` the same way, fed one ``EmbeddingRows``
  block per chunk of 10,000 rows (keys as one tuple, the vectors read from the file in float16 by
  the steps that need them), as a source over ``.emb.npy`` files makes them; its output is one
  ``Fates`` block per input block;
- ``job``: what the filter job calls, ``pipelines.dedup.SemanticDedupShards``, the same way: the
  embeddings saved as one ``NNNNNN.emb.npy`` sidecar per shard of 10,000 rows, and one element per
  shard, its records as the filter job's ``ReadScores`` yields them (key, shard, row, scores, byte
  range; no embedding); out comes each shard's records, annotated (``--paths bare,job``).
One run, one machine: compare ratios between paths, not absolute times across machines.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np

BOUNDARY = 0.01  # a true pair within this cosine of the threshold counts as a boundary pair


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_data(n: int, dim: int, n_groups: int, eps: float, seed: int = 0):
    """(embeddings (n, dim) float32 unit rows, groups: list of index arrays, scores (n,) float)."""
    rng = np.random.default_rng(seed)
    n_topics = max(1, n // 500)
    topics = _unit(rng.standard_normal((n_topics, dim)).astype(np.float32))
    shared = _unit(rng.standard_normal(dim).astype(np.float32))
    x = np.empty((n, dim), np.float32)
    chunk = 65536
    for s in range(0, n, chunk):  # topic + shared direction + noise: unrelated cosines ~0.2-0.5
        m = min(chunk, n - s)
        t = topics[rng.integers(n_topics, size=m)]
        x[s:s + m] = _unit(0.55 * t + 0.45 * shared + 0.75 * _unit(rng.standard_normal((m, dim)).astype(np.float32)))
    threshold = 1.0 - eps
    # group members: the base row and 1 or 2 others replaced by near copies of it
    sizes = np.where(rng.random(n_groups) < 0.8, 2, 3)
    rows = rng.permutation(n)[: int(sizes.sum())]
    groups, pos = [], 0
    for size in sizes:
        members = rows[pos:pos + size]
        pos += size
        base = x[members[0]]
        for m in members[1:]:
            # cosine to the base: 80% inside (up to 1), 20% within BOUNDARY of the threshold
            if rng.random() < 0.8:
                c = rng.uniform(threshold + BOUNDARY, 1.0)
            else:
                c = rng.uniform(threshold - BOUNDARY, threshold + BOUNDARY)
            u = rng.standard_normal(dim).astype(np.float32)
            u = _unit(u - (u @ base) * base)
            x[m] = _unit(c * base + np.sqrt(max(0.0, 1 - c * c)) * u)
        groups.append(members)
    scores = rng.uniform(3.0, 8.0, n)
    return x, groups, scores


def true_pairs(x: np.ndarray, groups, eps: float):
    """{(i, j): cosine} for planted pairs with float64 cosine >= 1 - eps (i < j)."""
    out = {}
    for members in groups:
        for a in range(len(members)):
            for b in range(a + 1, len(members)):
                i, j = sorted((int(members[a]), int(members[b])))
                c = float(np.dot(x[i].astype(np.float64), x[j].astype(np.float64)))
                if c >= 1.0 - eps:
                    out[(i, j)] = c
    return out


def check_background(x: np.ndarray, groups, eps: float, subset: int, seed: int = 1) -> tuple[int, int]:
    """Exact range search on a random subset: (pairs found, of which not planted)."""
    import faiss

    planted = {int(m) for g in groups for m in g}
    idx = np.sort(np.random.default_rng(seed).choice(x.shape[0], size=min(subset, x.shape[0]), replace=False))
    sub = np.ascontiguousarray(x[idx])
    index = faiss.IndexFlatIP(sub.shape[1])
    index.add(sub)
    lims, _, labels = index.range_search(sub, 1.0 - eps - 1e-6)
    found = unplanted = 0
    for q in range(len(idx)):
        for t in labels[lims[q]:lims[q + 1]]:
            if t > q:
                found += 1
                unplanted += not (int(idx[q]) in planted and int(idx[t]) in planted)
    return found, unplanted


def score(keep: np.ndarray, duplicate_of: np.ndarray, x: np.ndarray, truth: dict, groups, eps: float) -> dict:
    threshold = 1.0 - eps
    found = [p for p in truth if not (keep[p[0]] and keep[p[1]])]
    boundary = [p for p, c in truth.items() if c < threshold + BOUNDARY]
    boundary_found = [p for p in boundary if not (keep[p[0]] and keep[p[1]])]
    dropped = np.flatnonzero(~keep)
    good = 0
    for d in dropped:
        k = int(duplicate_of[d])
        good += k >= 0 and float(np.dot(x[d].astype(np.float64), x[k].astype(np.float64))) >= threshold - 1e-6
    exact = [g for g in groups if all((min(a, b), max(a, b)) in truth for i, a in enumerate(g) for b in g[i + 1:])]
    one_kept = sum(int(keep[list(g)].sum()) == 1 for g in exact)
    return {"pair_recall": len(found) / max(1, len(truth)),
            "boundary_recall": len(boundary_found) / max(1, len(boundary)),
            "precision": good / max(1, len(dropped)),
            "groups_one_kept": one_kept / max(1, len(exact)),
            "dropped": int(len(dropped)), "true_pairs": len(truth)}


def run_bare(x, keys, scores, eps, args):
    from filters import semdedup

    result = semdedup.deduplicate(x, keys, list(scores), eps, sample_size=args.sample, target_cluster_size=args.cluster,
                                  margin=args.margin, seed=0)
    return result.keep, result.duplicate_of


def run_ivf(x, keys, scores, eps, args):
    """faiss IVF (inner product) range search over every row, then the same keep rule on its pairs."""
    import faiss

    from filters import semdedup

    nlist = max(1, x.shape[0] // args.cluster)
    quantizer = faiss.IndexFlatIP(x.shape[1])
    index = faiss.IndexIVFFlat(quantizer, x.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
    sample = x[np.random.default_rng(0).choice(x.shape[0], size=min(x.shape[0], args.sample), replace=False)]
    index.train(np.ascontiguousarray(sample))
    index.add(x)
    index.nprobe = args.nprobe
    ii, jj, ss = [], [], []
    for s in range(0, x.shape[0], 65536):
        q = x[s:s + 65536]
        lims, sims, labels = index.range_search(q, 1.0 - eps - semdedup.SIM_TOLERANCE)
        rows = np.repeat(np.arange(s, s + len(q)), np.diff(lims.astype(np.int64)))
        keep = labels > rows
        ii.append(rows[keep]), jj.append(labels[keep]), ss.append(sims[keep])
    pairs = semdedup.Pairs(np.concatenate(ii), np.concatenate(jj), np.concatenate(ss).astype(np.float32))
    result = semdedup.resolve_pairs(keys, list(scores), pairs, embeddings=x, eps=eps)
    return result.keep, result.duplicate_of


def records_from(start: int, path: str, step: int, scores_path: str):
    """Records ``start`` to ``start + step`` of the saved embeddings (one chunk read at a time, as a
    job reads ``.emb.npy`` sidecars), so the pipeline graph does not carry the data."""
    x, scores = _chunk(path, start, step), _chunk(scores_path, start, step)
    for i in range(len(x)):
        yield {"key": f"{start + i:09d}", "text_embedding": x[i], "aesthetic_score": float(scores[i]),
               "stage": None, "reason": None}


def _chunk(path: str, start: int, step: int) -> np.ndarray:
    """Rows ``start`` to ``start + step`` of a saved array, copied out of a short-lived memory map."""
    x = np.load(path, mmap_mode="r")
    out = np.array(x[start:start + step])
    del x
    return out


def rows_from(start: int, path: str, step: int, scores_path: str, wire_dtype: str):
    """The block source: rows ``start`` to ``start + step`` as one ``EmbeddingRows`` block (keys and
    scores; the vectors stay in the file until a step reads them in the wire dtype), not one record each."""
    from pipelines.dedup import EmbeddingRows

    scores = np.asarray(_chunk(scores_path, start, step), np.float64)
    return EmbeddingRows(start, path, start, start + len(scores), tuple(f"{start + i:09d}" for i in range(len(scores))),
                         scores, wire_dtype)


def job_shard_from(start: int, step: int, scores_path: str) -> tuple[int, list]:
    """The filter job's element for one shard (rows ``start`` to ``start + step``): (shard, its
    records) as its ``ReadScores`` yields them, everything but the embedding."""
    scores = _chunk(scores_path, start, step)
    return start // step, [{"key": f"{start + i:09d}", "input_shard": start // step, "input_position": i,
                            "offset": [i, i + 1], "stage": None, "reason": None, "aesthetic_score": float(scores[i]),
                            "clip_score": 0.3} for i in range(len(scores))]


def sidecar_name(tmp: str, shard: int) -> str:
    return f"{tmp}/{shard:06d}.emb.npy"


def outcome_line(record: dict) -> str:
    return f"{record['key']}\t{record.get('duplicate_of') or ''}"


def shard_outcome_lines(keyed) -> str:
    return "\n".join(outcome_line(r) for r in keyed[1])


def outcome_lines(keyed) -> str:
    _, fates = keyed
    return "\n".join(f"{k}\t{d or ''}" for k, d in zip(fates.keys, fates.duplicate_of))


def beam_child(kind: str, tmp: str, eps: float, args: dict) -> None:
    """One Beam path on DirectRunner in this (child) process: ``beam`` = the jobs' records-in
    ``SemanticDedup``, ``beam_blocks`` = ``SemanticDedupBlocks`` fed one ``Rows`` block per chunk.
    Writes the outcome lines, the counters and this process's peak RSS under ``tmp``."""
    import json

    import apache_beam as beam
    from apache_beam.metrics.metric import MetricsFilter
    from apache_beam.options.pipeline_options import PipelineOptions

    from filters.config import CurateConfig
    from pipelines.dedup import SemanticDedup, SemanticDedupBlocks, SemanticDedupShards

    cfg = CurateConfig(semdedup_eps=eps, kmeans_sample_size=args["sample"], target_cluster_size=args["cluster"])
    n, step = args["n"], 10_000
    opts = PipelineOptions(["--direct_num_workers=1", "--direct_running_mode=in_memory"])
    p = beam.Pipeline(options=opts)
    starts = p | beam.Create(list(range(0, n, step)))
    if kind in ("beam", "beam_light"):  # beam_light: the records leave without their vectors (the curate job)
        lines = (starts | beam.FlatMap(records_from, f"{tmp}/x.npy", step, f"{tmp}/scores.npy")
                 | SemanticDedup("text", cfg, margin=args["margin"], wire_dtype=args["wire_dtype"],
                                 keep_vectors=kind == "beam")
                 | beam.Map(outcome_line))
    elif kind == "job":
        sidecars = {s // step: sidecar_name(tmp, s // step) for s in range(0, n, step)}
        lines = (starts | beam.Map(job_shard_from, step, f"{tmp}/scores.npy")
                 | SemanticDedupShards("text", cfg, sidecars, margin=args["margin"], wire_dtype=args["wire_dtype"])
                 | beam.Map(shard_outcome_lines))
    else:
        lines = (starts | beam.Map(rows_from, f"{tmp}/x.npy", step, f"{tmp}/scores.npy", args["wire_dtype"])
                 | SemanticDedupBlocks("text", cfg, margin=args["margin"])
                 | beam.Map(outcome_lines))
    _ = lines | beam.io.WriteToText(f"{tmp}/out_{kind}")
    result = p.run()
    result.wait_until_finish()
    counters = {}
    for c in result.metrics().query(MetricsFilter())["counters"]:  # a name counted in several steps: summed
        counters[c.key.metric.name] = counters.get(c.key.metric.name, 0) + (c.committed or 0)
    with open(f"{tmp}/child_{kind}.json", "w") as f:
        json.dump({"counters": counters, "peak_rss_gb": own_peak_rss_gb()}, f)


def run_beam_path(kind: str, x, keys, scores, eps, args):
    """A Beam path in a child process (spawned: its peak RSS is the path's own, without this
    process's copy of the data), the embeddings handed over as ``.npy`` files."""
    import glob
    import json
    import multiprocessing
    import tempfile

    keep = np.ones(len(keys), bool)
    dup = np.full(len(keys), -1, np.int64)
    with tempfile.TemporaryDirectory() as tmp:
        if kind != "job":
            np.save(f"{tmp}/x.npy", x)
        np.save(f"{tmp}/scores.npy", np.asarray(scores, np.float64))
        if kind == "job":  # one sidecar per shard of 10,000 rows, as the dump writes them
            for s in range(0, len(keys), 10_000):
                np.save(sidecar_name(tmp, s // 10_000), x[s:s + 10_000])
        child = multiprocessing.get_context("spawn").Process(
            target=beam_child, args=(kind, tmp, eps, {**vars(args), "n": len(keys)}))
        child.start()
        child.join()
        if child.exitcode != 0:
            raise SystemExit(f"{kind}: the child process failed (exit code {child.exitcode})")
        with open(f"{tmp}/child_{kind}.json") as f:
            report = json.load(f)
        print(f"{kind} counters:", {k: v for k, v in sorted(report["counters"].items()) if k.startswith("semdedup")},
              f"child peak RSS {report['peak_rss_gb']:.2f} GB", flush=True)
        for name in glob.glob(f"{tmp}/out_{kind}*"):
            with open(name) as f:
                for line in f:
                    key, of = line.rstrip("\n").split("\t")
                    if of:
                        keep[int(key)], dup[int(key)] = False, int(of)
    CHILD_RSS[kind] = report["peak_rss_gb"]
    return keep, dup


CHILD_RSS: dict = {}


def run_beam(x, keys, scores, eps, args):
    return run_beam_path("beam", x, keys, scores, eps, args)


def run_beam_light(x, keys, scores, eps, args):
    return run_beam_path("beam_light", x, keys, scores, eps, args)


def run_beam_blocks(x, keys, scores, eps, args):
    return run_beam_path("beam_blocks", x, keys, scores, eps, args)


def run_job(x, keys, scores, eps, args):
    return run_beam_path("job", x, keys, scores, eps, args)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def own_peak_rss_gb() -> float:
    """This process's own peak RSS (``VmHWM``, reset when a new program is exec'd). ``ru_maxrss``
    is not: a spawned child starts from its forked parent's resident size."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return peak_rss_gb()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--groups", type=int, default=50_000)
    parser.add_argument("--eps", type=float, default=0.05)
    parser.add_argument("--sample", type=int, default=50_000, help="k-means sample size")
    parser.add_argument("--cluster", type=int, default=1000, help="target cluster size")
    parser.add_argument("--margin", type=float, default=0.01, help="second-nearest-centroid margin (bare and beam)")
    parser.add_argument("--nprobe", type=int, default=4, help="IVF lists searched per query")
    parser.add_argument("--check_subset", type=int, default=40_000)
    parser.add_argument("--paths", default="bare,ivf", help="comma-separated: bare, ivf, beam, beam_blocks, job")
    parser.add_argument("--wire_dtype", default="float16", help="beam path: embeddings between stages")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    x, groups, scores = make_data(args.n, args.dim, args.groups, args.eps)
    truth = true_pairs(x, groups, args.eps)
    keys = [f"{i:09d}" for i in range(args.n)]
    print(f"data: {args.n} x {args.dim}, {len(groups)} planted groups, {len(truth)} true pairs, "
          f"built in {time.perf_counter() - t0:.0f} s; peak RSS {peak_rss_gb():.2f} GB", flush=True)
    found, unplanted = check_background(x, groups, args.eps, args.check_subset)
    print(f"background check (exact range search, {args.check_subset} rows): {found} pairs >= 1-eps, "
          f"{unplanted} of them unplanted", flush=True)

    runners = {"bare": run_bare, "ivf": run_ivf, "beam": run_beam, "beam_light": run_beam_light, "beam_blocks": run_beam_blocks, "job": run_job}
    rows, base = [], None
    for name in args.paths.split(","):
        start = time.perf_counter()
        keep, dup = runners[name](x, keys, scores, args.eps, args)
        wall = time.perf_counter() - start
        base = base or wall
        s = score(keep, dup, x, truth, groups, args.eps)
        rss = CHILD_RSS.get(name, peak_rss_gb())
        rows.append((name, wall, wall / base, rss, s))
        print(f"{name}: {wall:.1f} s ({wall / base:.2f}x the first path), peak RSS {rss:.2f} GB, {s}", flush=True)
    print("\n| path | wall s | x first path | peak RSS GB | pair recall | boundary recall | precision | groups with one kept |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, wall, ratio, rss, s in rows:
        print(f"| {name} | {wall:.1f} | {ratio:.2f} | {rss:.2f} | {s['pair_recall']:.4f} | {s['boundary_recall']:.4f} "
              f"| {s['precision']:.4f} | {s['groups_one_kept']:.4f} |")


if __name__ == "__main__":
    main()
