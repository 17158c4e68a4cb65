"""``benchmarks/curate_throughput.py``'s cached hand loop is a fair baseline only if it decides what
the curate job decides: the same kept captions and the same drops per reason, on captions that take
both token-count paths (per word, and whole for non-ASCII, ``&`` and control characters) and every
length rule."""


def test_cached_loop_keeps_what_the_job_keeps(load_benchmark):
    bench = load_benchmark("curate_throughput")
    captions = bench.synthetic_captions(600, vocabulary=300)
    captions[1:9] = ["hi", "café au lait on a table", "fish &amp; chips on a plate", "tom & jerry cartoon still",
                     "a  photo\tof   a cat", " ".join(["word"] * 80), "Ｆｕｌｌ width letters here", "a photo of a cat"]
    t, kept, dropped = bench.cached_outcome(captions)
    assert t > 0 and dropped  # some rules and duplicates apply
    for batch in ("4096", "7"):
        _, job_kept, job_dropped = bench.job_outcome(captions, "default", ["--record_batch", batch])
        assert job_kept == kept and job_dropped == dropped
