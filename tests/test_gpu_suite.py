"""``benchmarks/gpu_suite.py --cpu_smoke``: every path of the GPU suite runs on tiny shapes, so the
suite cannot rot while no GPU is at hand. Its figures mean nothing; their structure and signs do."""

import math


def test_gpu_suite_cpu_smoke(tmp_path, load_benchmark):
    suite = load_benchmark("gpu_suite")
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
    # the dump rows shared one teacher, each variant undoing its change: SDPA and contiguous weights again
    (teacher,) = suite._TEACHER.values()
    assert {type(p).__name__ for p in teacher.pipe.unet.attn_processors.values()} == {"AttnProcessor2_0"}
    assert all(w.is_contiguous() for w in teacher.pipe.unet.parameters())
    written = __import__("json").loads((tmp_path / "gpu.json").read_text())  # rewritten after every section
    assert [r["variant"] for r in written["dump"]] == ["default", "no_sdpa", "channels_last"]
    assert written["trainer"][0]["batch"] == 2 and len(written["latency"]) == 1


def test_a_failing_section_is_recorded_and_the_next_one_runs(tmp_path, load_benchmark):
    """A GPU run (not strict) records a section's error, runs the next, and rewrites its JSON after
    each; the smoke (strict) raises. Real sections: an unknown student preset, then the tiny one."""
    import json

    import pytest

    suite = load_benchmark("gpu_suite")
    args = suite.settings(["--cpu_smoke"])
    sections = [("trainer", "nope", lambda: suite.trainer_step(args, "nope"), suite._print_trainer),
                ("trainer", "tiny", lambda: suite.trainer_step(args, "tiny"), suite._print_trainer)]
    fresh = lambda: {"device": "CPU", "dump": [], "trainer": [], "latency": [], "errors": []}  # noqa: E731
    out = suite.run_sections(sections, fresh(), strict=False, output=str(tmp_path / "gpu.json"))
    assert [e["name"] for e in out["errors"]] == ["nope"] and "nope" in out["errors"][0]["error"]
    assert [r["preset"] for r in out["trainer"]] == ["tiny"]
    assert json.loads((tmp_path / "gpu.json").read_text()) == json.loads(json.dumps(out))
    with pytest.raises(Exception, match="nope"):
        suite.run_sections(sections, fresh(), strict=True, output=None)


def test_trainer_step_halves_its_batch_while_out_of_memory(monkeypatch, load_benchmark):
    """No GPU here: an allocation failure is raised for batches over 2 (as CUDA raises it, and as
    cuBLAS reports it); the real step then runs at 2. Any other error is not retried."""
    import pytest
    import torch

    suite = load_benchmark("gpu_suite")
    args = suite.settings(["--cpu_smoke"])
    args.train_batches = {"tiny": 8}
    real, tried = suite._trainer_step, []

    def step(args, preset, batch, error):
        tried.append(batch)
        if batch > 2:
            raise error
        return real(args, preset, batch)

    for error in (torch.cuda.OutOfMemoryError("CUDA out of memory"), RuntimeError("CUBLAS_STATUS_ALLOC_FAILED: out of memory")):
        tried.clear()
        monkeypatch.setattr(suite, "_trainer_step", lambda a, p, b, e=error: step(a, p, b, e))
        assert suite.trainer_step(args, "tiny")["batch"] == 2 and tried == [8, 4, 2]
    monkeypatch.setattr(suite, "_trainer_step", lambda a, p, b: step(a, p, b, RuntimeError("shape mismatch")))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        suite.trainer_step(args, "tiny")
