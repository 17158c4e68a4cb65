"""``benchmarks/gpu_suite.py --cpu_smoke``: every path of the GPU suite runs on tiny shapes, so the
suite cannot rot while no GPU is at hand. Its figures mean nothing; their structure and signs do."""

import importlib.util
import math
from pathlib import Path


def test_gpu_suite_cpu_smoke(tmp_path):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.py"
    spec = importlib.util.spec_from_file_location("gpu_suite", path)
    suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suite)
    out = suite.main(["--cpu_smoke", "--output", str(tmp_path / "gpu.json")])
    assert [r["variant"] for r in out["dump"]] == ["default", "no_sdpa", "channels_last"]
    for row in out["dump"]:
        for key in ("images_per_s_sampler", "images_per_s_pipeline", "mfu_sampler", "mfu_pipeline"):
            assert math.isfinite(row[key]) and row[key] > 0
        # the sampler and the pipeline ran the same UNet calls: the same FLOPs per image
        assert row["mfu_sampler"] / row["mfu_pipeline"] == \
            __import__("pytest").approx(row["images_per_s_sampler"] / row["images_per_s_pipeline"], rel=1e-9)
    assert out["trainer"][0]["preset"] == "tiny" and out["trainer"][0]["samples_per_s"] > 0
    assert out["latency"][0]["student_ms"] > 0 and out["latency"][0]["teacher_ms"] > 0
    assert out["errors"] == []
    written = __import__("json").loads((tmp_path / "gpu.json").read_text())  # rewritten after every section
    assert [r["variant"] for r in written["dump"]] == ["default", "no_sdpa", "channels_last"]
    assert written["trainer"][0]["batch"] == 2 and len(written["latency"]) == 1
