"""Captions per second: the curate job on DirectRunner vs hand-written loops over the same captions.

    python benchmarks/curate_throughput.py [--n 20000] [--preset default|tiny] [--paths batched,per_record]
        [--fixed_n 1000] [--direct_running_mode multi_processing] [--allocator steady|default]
        [--vocabulary 400000]

Both sides do the same caption work on the same synthetic prompts (about 10% exact repeats):
decode, NFKC/whitespace normalisation, word and CLIP-token counts, length/safety rules, exact
dedup. Two loops: the "cached hand loop" (``cached_outcome``, the fairest baseline: the job's
per-word CLIP-token cache, each distinct word counted once and remembered across captions, whole
captions where the job counts them whole; the benchmark asserts that it keeps and drops exactly
what the job does) and the "per-record loop" (``bare_loop``: one whole-caption token count per
caption, the baseline of the passes before issue 27). With ``--preset tiny`` the job also embeds every caption with the tiny CLIP and runs
SemDeDup, and the loop does the same through ``filters``. The job's time includes pipeline
construction, runner start-up and the report's plots (the fixed cost a user pays); a second run on
``--fixed_n`` captions measures that fixed cost, and the "marginal" ratio leaves it out (the rate
a large input runs at). ``--paths`` times the batched caption stages (``--record_batch 4096``) and
the per-record ones (``--record_batch 0``) in one invocation. With the default preset the job's own
batched caption functions also run in a plain loop without Beam ("bare batched functions"): the job
over that is what Beam and the job's outputs (Parquet, report) cost. One run, one machine: compare
ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time


WORDS = ("a photo of the red blue green small large old new cat dog bicycle car house tree river mountain "
         "city street beach painting drawing portrait sunset morning night snow rain with on in under near "
         "beside wooden glass metal happy quiet busy").split()


def synthetic_captions(n: int, seed: int = 0, vocabulary: int = 0) -> list[str]:
    """``n`` captions of 3 to 14 words, every tenth a repeat of an earlier one. ``vocabulary`` 0: the
    ``WORDS`` list (about 50 common words); N > 0: N random lower-case words drawn with Zipf's law
    (exponent 1.1), a long tail like LAION's, where a per-word token cache hits far less often."""
    rng = random.Random(seed)
    if vocabulary:
        import numpy as np

        gen = np.random.default_rng(seed)
        letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
        vocab = ["".join(gen.choice(letters, gen.integers(2, 12))) for _ in range(vocabulary)]
        p = 1.0 / np.arange(1, vocabulary + 1) ** 1.1
        lens = gen.integers(3, 15, n)
        ids = gen.choice(vocabulary, int(lens.sum()), p=p / p.sum()).tolist()
        ends = np.cumsum(lens).tolist()
        caps = [" ".join(vocab[i] for i in ids[e - k:e]) for e, k in zip(ends, lens.tolist())]
    else:
        caps = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14))) for _ in range(n)]
    for i in range(0, n, 10):  # every tenth caption repeats an earlier one
        caps[i] = caps[rng.randrange(max(1, i))] if i else caps[i]
    return caps


def prompts_file(folder: str, captions: list[str]) -> str:
    """The captions as ``folder``/prompts.txt, one per line (what both the job and the batched loop read)."""
    path = os.path.join(folder, "prompts.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(captions) + "\n")
    return path


def bare_loop(captions: list[str], preset: str) -> float:
    """The filter functions in a plain loop, one ``clip_token_count`` (open_clip's whole cleaning and
    BPE) per caption: the per-record baseline; returns seconds."""
    import numpy as np

    from filters import captions as rules
    from filters.config import preset as get_preset

    cfg = get_preset(preset)
    rules.reset_token_caches()  # every timed side starts from a fresh worker's caches
    rules.clip_token_count("warm up")
    clip = None
    if cfg.clip_model:
        from filters.clip_embed import embed_texts, load_clip

        clip = load_clip(cfg.clip_model, cfg.clip_weights)
    start = time.perf_counter()
    seen, kept = set(), []
    for raw in captions:
        text, reject = rules.decode_caption(raw.encode("utf-8"))
        if reject:
            continue
        caption = rules.normalize_caption(text)
        if rules.check_length(caption, rules.clip_token_count(caption), cfg) or rules.check_safety(None, None, cfg):
            continue
        if caption in seen:
            continue
        seen.add(caption)
        kept.append(caption)
    if clip is not None:
        from filters import semdedup

        emb = np.concatenate([embed_texts(clip, kept[i:i + cfg.clip_batch_size])
                              for i in range(0, len(kept), cfg.clip_batch_size)])
        k = semdedup.choose_n_clusters(len(kept), min(len(kept), cfg.kmeans_sample_size), cfg.target_cluster_size)
        clusters = semdedup.assign_clusters(emb, semdedup.train_kmeans(emb[:cfg.kmeans_sample_size], k))
        for c in np.unique(clusters):
            idx = np.flatnonzero(clusters == c)
            semdedup.find_duplicates([str(i) for i in idx], emb[idx], [None] * len(idx), cfg.semdedup_eps)
    return time.perf_counter() - start


def cached_outcome(captions: list[str], preset: str = "default") -> tuple[float, set[str], dict[str, int]]:
    """The fairest hand loop: per caption, the job's rules in plain Python over the records (not the
    job's table functions), with the job's per-word token cache: an ASCII caption without ``&`` (after
    ``normalize_caption`` it has no control characters) of at most ``WHOLE_OVER`` characters is the
    sum of its space-separated words' counts, each distinct word counted once and remembered across
    captions (``filters.captions._word_token_count``, the cache ``clip_token_counts`` fills); any other
    caption is counted whole, once per distinct caption. Caption rules only (the default preset).
    -> (seconds, kept captions, dropped records per reason)."""
    from collections import Counter

    from filters import captions as rules
    from filters import reasons
    from filters.config import preset as get_preset

    cfg = get_preset(preset)
    if cfg.clip_model:
        raise ValueError("cached_outcome: caption rules only (a preset without CLIP)")
    rules.reset_token_caches()  # every timed side starts from a fresh worker's caches
    rules.clip_token_count("warm up")
    word_tokens, whole_over = rules._word_token_count, rules.WHOLE_OVER
    decode, normalize, check_length = rules.decode_caption, rules.normalize_caption, rules.check_length
    start = time.perf_counter()
    seen, kept, dropped, whole = set(), [], Counter(), {}
    for raw in captions:
        text, reject = decode(raw.encode("utf-8"))
        if reject:
            dropped[reject] += 1
            continue
        caption = normalize(text)
        if caption.isascii() and "&" not in caption and len(caption) <= whole_over:
            n_tokens = sum(map(word_tokens, caption.split(" ")))
        else:
            n_tokens = whole.get(caption)
            if n_tokens is None:
                n_tokens = whole[caption] = rules.clip_token_count(caption)
        reason = check_length(caption, n_tokens, cfg) or rules.check_safety(None, None, cfg)
        if reason:
            dropped[reason] += 1
        elif caption in seen:
            dropped[reasons.EXACT_DUPLICATE] += 1
        else:
            seen.add(caption)
            kept.append(caption)
    return time.perf_counter() - start, set(kept), dict(dropped)


def cached_loop(captions: list[str], preset: str) -> float:
    """``cached_outcome``'s seconds."""
    return cached_outcome(captions, preset)[0]


def bare_batched(captions: list[str], preset: str, batch: int = 4096) -> float:
    """The job's batched caption functions (``pipelines.curate.batched``) in a plain loop, no Beam:
    read the .txt into tables, rules, exact dedup over all rows at once, manifest columns; returns
    seconds. The job's time over this one is what Beam and the job's outputs cost."""
    import pyarrow as pa

    from filters import captions as rules
    from filters.config import preset as get_preset
    from pipelines.curate import batched
    from pipelines.curate.sources import plan_inputs

    cfg = get_preset(preset)
    rules.reset_token_caches()  # every timed side starts from a fresh worker's caches
    rules.clip_token_count("warm up")
    with tempfile.TemporaryDirectory(prefix="dd-curate-bench-") as tmp:
        path = prompts_file(tmp, captions)
        start = time.perf_counter()
        tables = [batched.apply_rules(value, cfg) for split in plan_inputs([path])
                  for kind, value in batched.txt_tables(split, batch) if kind == "table"]
        table = pa.concat_tables(tables)
        active = table.filter(batched.is_active_rows(table))
        resolved = batched.resolve_exact_table((0, [active]))
        inactive = table.filter(pa.compute.invert(batched.is_active_rows(table)))
        manifest = batched.manifest_table(pa.concat_tables([resolved, inactive]))
        assert manifest.num_rows == len(captions) - captions.count("")
        return time.perf_counter() - start


def job_outcome(captions: list[str], preset: str, beam_flags: list[str]) -> tuple[float, set[str], dict[str, int]]:
    """The curate job over the same captions written as a .txt -> (seconds of ``run``, kept captions,
    dropped records per reason), the last two read from its manifest and summary after the timing."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from filters import reasons
    from filters.captions import reset_token_caches
    from pipelines import curate

    reset_token_caches()  # a fresh worker's: the job builds the tokenizer in its ReadBatches.setup
    with tempfile.TemporaryDirectory(prefix="dd-curate-bench-") as tmp:
        path = prompts_file(tmp, captions)
        start = time.perf_counter()
        summary = curate.run(["--input", path, "--output", os.path.join(tmp, "out"), "--preset", preset, *beam_flags])
        seconds = time.perf_counter() - start
        manifest = pq.read_table(os.path.join(tmp, "out", "manifest.parquet"), columns=["caption", "fate"])
        kept = set(manifest.filter(pc.equal(manifest.column("fate"), reasons.KEPT)).column("caption").to_pylist())
    dropped = {reason: n for by in summary["by_reason"].values() for reason, n in by.items()}
    return seconds, kept, dropped


def job(captions: list[str], preset: str, beam_flags: list[str]) -> float:
    """``job_outcome``'s seconds."""
    return job_outcome(captions, preset, beam_flags)[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20_000, help="captions")
    parser.add_argument("--preset", default="default", help="curate preset: default (rules only) or tiny (+CLIP)")
    parser.add_argument("--direct_running_mode", default="in_memory", help="in_memory | multi_processing")
    parser.add_argument("--paths", default="batched,per_record",
                        help="job paths to time: batched (--record_batch 4096, the default) and/or per_record (0)")
    parser.add_argument("--vocabulary", type=int, default=0,
                        help="0: captions from about 50 common words; N: from N random words, Zipf-distributed")
    parser.add_argument("--allocator", default="steady",
                        help="allocator state (core/allocator.py) set before anything is timed, so the "
                             "loops and the jobs run in the same one; the jobs get --allocator with it")
    parser.add_argument("--fixed_n", type=int, default=1_000,
                        help="captions of a second, small job run that measures the fixed cost (0 = skip)")
    args = parser.parse_args(argv)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from core.allocator import set_allocator

    allocator = set_allocator(args.allocator)
    captions = synthetic_captions(args.n, vocabulary=args.vocabulary)
    flags = [f"--direct_running_mode={args.direct_running_mode}", "--allocator", args.allocator]
    if args.direct_running_mode == "multi_processing":
        flags.append(f"--direct_num_workers={os.cpu_count() or 1}")
    # Loops first, in this process: the ratios compare sides timed minutes apart on a noisy machine.
    cached = args.preset == "default"  # the cached hand loop does the caption rules only (no CLIP)
    if cached:
        t_cached, loop_kept, loop_dropped = cached_outcome(captions, args.preset)
    t_loop = bare_loop(captions, args.preset)
    t_batched = bare_batched(captions, args.preset) if cached else None
    lines = []
    for path in args.paths.split(","):
        batch = {"batched": "4096", "per_record": "0"}[path]
        path_flags = flags + ["--record_batch", batch]
        t_job, job_kept, job_dropped = job_outcome(captions, args.preset, path_flags)
        if cached:  # the hand loop is only a baseline if it decides what the job decides
            assert job_kept == loop_kept, f"{path}: the job and the cached loop keep different captions"
            assert job_dropped == loop_dropped, f"{path}: dropped per reason differ: {job_dropped} != {loop_dropped}"
        line = f"job, {path:<10}     : {args.n / t_job:10.0f} captions/s ({t_job:.2f} s, incl. start-up)"
        if cached:
            line += f"; job / cached loop {t_cached / t_job:.3f}"
        line += f"; job / per-record loop {t_loop / t_job:.3f}"
        if args.fixed_n:
            # The same job on a few captions: start-up, graph, report plots. What is left of the
            # large run after it is the cost that grows with the data.
            t_fixed = job(captions[:args.fixed_n], args.preset, path_flags)
            base = t_cached if cached else t_loop
            t_fixed -= base * args.fixed_n / args.n  # its own per-caption work, at the (cached) loop's rate
            line += (f"; fixed {t_fixed:.2f} s, marginal job / {'cached' if cached else 'per-record'} loop "
                     f"{base / max(1e-9, t_job - t_fixed):.3f}")
        if t_batched is not None and path == "batched":
            line += f"; job / batched functions {t_batched / t_job:.3f}"
        lines.append(line)
    # The loops again after the jobs, so that a change in the machine's load shows: the ratios use the first.
    t_cached_after = cached_loop(captions, args.preset) if cached else None
    t_after = bare_loop(captions, args.preset)
    print(f"captions {args.n} (vocabulary {args.vocabulary or len(WORDS)}), preset {args.preset}, DirectRunner {args.direct_running_mode}, allocator {allocator}"
          f"; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} at the end")
    if cached:
        print(f"cached hand loop      : {args.n / t_cached:10.0f} captions/s ({t_cached:.2f} s before the jobs, "
              f"{t_cached_after:.2f} s after; mean ratio x {(t_cached + t_cached_after) / 2 / t_cached:.3f}; "
              f"keeps {len(loop_kept)} captions, as the job does)")
    print(f"per-record loop       : {args.n / t_loop:10.0f} captions/s ({t_loop:.2f} s before the jobs, "
          f"{t_after:.2f} s after; ratios below use the first, mean ratio x {(t_loop + t_after) / 2 / t_loop:.3f})")
    if t_batched is not None:
        print(f"bare batched functions: {args.n / t_batched:10.0f} captions/s ({t_batched:.2f} s: the job's caption "
              f"functions without Beam or outputs; x {t_cached / t_batched:.2f} the cached loop)")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
