"""``benchmarks/curate_throughput.py``'s cached hand loop is a fair baseline only if it decides what
the curate job decides: the same kept captions and the same drops per reason, on captions that take
both token-count paths (per word, and whole for non-ASCII, ``&`` and control characters) and every
length rule."""

import importlib.util
from pathlib import Path



def _bench():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "curate_throughput.py"
    spec = importlib.util.spec_from_file_location("curate_throughput", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_cached_loop_keeps_what_the_job_keeps():
    bench = _bench()
    captions = bench.synthetic_captions(600, vocabulary=300)
    captions[1:9] = ["hi", "café au lait on a table", "fish &amp; chips on a plate", "tom & jerry cartoon still",
                     "a  photo\tof   a cat", " ".join(["word"] * 80), "Ｆｕｌｌ width letters here", "a photo of a cat"]
    t, kept, dropped = bench.cached_outcome(captions)
    assert t > 0 and dropped  # some rules and duplicates apply
    for batch in ("4096", "7"):
        _, job_kept, job_dropped = bench.job_outcome(captions, "default", ["--record_batch", batch])
        assert job_kept == kept and job_dropped == dropped
