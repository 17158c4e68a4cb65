"""The Dataflow launch flags and worker image: checked by parsing what the launcher produces."""

import os
import re
import subprocess
from pathlib import Path

import apache_beam
import pytest
from apache_beam.options.pipeline_options import (
    DebugOptions, GoogleCloudOptions, PipelineOptions, StandardOptions, WorkerOptions)

from diffusion_distill.beam_cli import normalise_argv, normalise_runner
from pipelines.teacher_dump import TeacherDumpOptions

ROOT = Path(__file__).resolve().parents[1]


def launcher_argv(**env):
    base = dict(PROJECT="proj", REGION="us-central1", BUCKET="gs://b", IMAGE="us-docker.pkg.dev/proj/r/w:1",
                PROMPTS="gs://b/m.parquet", OUTPUT="gs://b/dump", DRY_RUN="1", PATH=os.environ["PATH"])
    out = subprocess.run(["bash", str(ROOT / "infra/dataflow/launch.sh"), "--num_inference_steps=30"],
                         env={**base, **env}, capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[:3] == ["beam", "run", "pipelines/teacher_dump.py"]
    return out[3:]


def test_dataflow_flags_parse_into_the_intended_options(monkeypatch):
    argv = normalise_argv(launcher_argv())
    options = PipelineOptions(argv)
    assert options.view_as(StandardOptions).runner == "DataflowRunner"
    gcp = options.view_as(GoogleCloudOptions)
    assert (gcp.project, gcp.region, gcp.temp_location) == ("proj", "us-central1", "gs://b/tmp")
    assert gcp.dataflow_service_options == ["worker_accelerator=type:nvidia-l4;count:1;install-nvidia-driver"]
    worker = options.view_as(WorkerOptions)
    assert worker.sdk_container_image == "us-docker.pkg.dev/proj/r/w:1" and worker.machine_type == "g2-standard-8"
    debug = options.view_as(DebugOptions)
    assert debug.number_of_worker_harness_threads == 1
    assert "no_use_multiple_sdk_containers" in debug.experiments
    job = options.view_as(TeacherDumpOptions)
    assert (job.prompts, job.output, job.device, job.dtype, job.num_inference_steps) == (
        "gs://b/m.parquet", "gs://b/dump", "cuda", "bfloat16", 30)
    # and the job hands every flag it does not declare to Beam: each is one of Beam's, none refused
    from core.options import parse
    from pipelines import common
    from pipelines.dump.job import DumpConfig

    # The runner check ends in the Dataflow extra's check (tests/test_extras.py: one line when it is
    # missing, as in CI): recorded here, so this test means the same with the extra and without it.
    extra_checked = []
    monkeypatch.setattr(common, "check_dataflow_extra", lambda: extra_checked.append(True))
    cfg, rest = parse(DumpConfig, argv, prog="beam run", known_only=True, check_unknown=common.check_beam_args)
    assert cfg.num_inference_steps == 30 and "--runner=DataflowRunner" in rest and "--prompts" not in rest
    assert extra_checked == [True]


def test_accelerator_type_and_count_follow_the_environment():
    argv = launcher_argv(GPU_TYPE="nvidia-tesla-a100", GPU_COUNT="2", MACHINE_TYPE="a2-highgpu-2g")
    options = PipelineOptions(argv)
    assert options.view_as(GoogleCloudOptions).dataflow_service_options == [
        "worker_accelerator=type:nvidia-tesla-a100;count:2;install-nvidia-driver"]
    assert options.view_as(WorkerOptions).machine_type == "a2-highgpu-2g"


def test_worker_image_matches_the_launcher_sdk():
    dockerfile = (ROOT / "infra/dataflow/Dockerfile").read_text()
    version = re.search(r"ARG BEAM_VERSION=(\S+)", dockerfile).group(1)
    assert version == apache_beam.__version__  # Dataflow refuses a launcher/worker SDK mismatch
    assert f"apache/beam_python3.11_sdk:{version}" in dockerfile
    assert 'ENTRYPOINT ["/opt/apache/beam/boot"]' in dockerfile
    assert re.search(r"^FROM nvidia/cuda:\S+", dockerfile, re.M)
    pin = re.search(r'"apache-beam\[dask\]>=([\d.]+),<([\d.]+)"', (ROOT / "pyproject.toml").read_text())
    assert pin and pin.group(1) <= version < pin.group(2)


def test_short_runner_names_map_to_beam_classes():
    assert normalise_runner("Dask") == "apache_beam.runners.dask.dask_runner.DaskRunner"
    assert normalise_runner("dataflow") == "DataflowRunner" and normalise_runner("DirectRunner") == "DirectRunner"
    assert normalise_runner("Flink") == "FlinkRunner" and normalise_runner("Spark") == "SparkRunner"
    assert normalise_runner("Prism") == "PrismRunner"
    assert normalise_runner("my.pkg.CustomRunner") == "my.pkg.CustomRunner"
    assert normalise_argv(["--runner", "Direct", "--x=1"]) == ["--runner=DirectRunner", "--x=1"]


def _flags(argv):
    """``--name=value`` / ``--name value`` pairs of a command line -> {name: value} (every flag given once)."""
    out, i = {}, 0
    while i < len(argv):
        name, eq, value = argv[i].partition("=")
        if not eq:
            value, i = argv[i + 1], i + 1
        assert name.startswith("--") and name[2:] not in out, argv[i]
        out[name[2:]] = value
        i += 1
    return out


def test_pytorchjob_passes_every_flag_the_trainer_understands():
    import yaml  # PyYAML comes with the dependencies (transformers, dask)

    from students.training.cli import parse_args

    job = yaml.safe_load((ROOT / "infra/train/pytorchjob.yaml").read_text())
    worker = job["spec"]["pytorchReplicaSpecs"]["Worker"]
    container = worker["template"]["spec"]["containers"][0]
    args = container["args"]
    assert container["command"] == ["torchrun"] and args[0] == "--nproc_per_node=8" and args[1:3] == ["-m", "students.training"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8  # one process per GPU
    assert job["spec"]["elasticPolicy"]["rdzvBackend"] == "c10d" and worker["replicas"] == 2
    flags = _flags(args[3:])
    assert flags == {"data": "gs://BUCKET/dump", "output": "/runs/snapgen-1", "preset": "snapgen", "recipe": "snapgen_kd",
                     "device": "cuda", "mixed_precision": "bf16", "num_workers": "8", "batch_size": "16",
                     "max_steps": "100000", "checkpoint_every": "1000"}
    cfg = parse_args(args[3:])  # every flag accepted, and each lands in the field of its name
    assert (cfg.data, cfg.output, cfg.preset, cfg.recipe, cfg.device, cfg.mixed_precision) == (
        "gs://BUCKET/dump", "/runs/snapgen-1", "snapgen", "snapgen_kd", "cuda", "bf16")
    assert (cfg.num_workers, cfg.batch_size, cfg.max_steps, cfg.checkpoint_every) == (8, 16, 100000, 1000)
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/dev/shm", "/runs"}  # OUTPUT on the shared volume


def test_slurm_script_runs_torchrun_with_every_flag(tmp_path):
    """The script run with stand-ins for srun and scontrol that record what they are given."""
    import json
    import shlex

    from students.training.cli import parse_args

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\npython3 -c \'import json, sys; print(json.dumps(sys.argv[1:]))\' "$@"\n')
    (bin_dir / "scontrol").write_text("#!/bin/bash\nprintf 'node-a\\nnode-b\\n'\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "DATA": "gs://b/dump", "OUTPUT": "/shared/runs/s1",
           "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_ID": "42", "MAX_STEPS": "500"}
    out = subprocess.run(["bash", str(ROOT / "infra/train/slurm.sbatch"), "--lr", "3e-4"], env=env, capture_output=True,
                         text=True, check=True).stdout
    argv = json.loads(out.strip().splitlines()[-1])
    assert argv[0] == "torchrun"
    cut = argv.index("-m")
    assert argv[cut + 1] == "students.training"
    assert _flags(argv[1:cut]) == {"nnodes": "2", "nproc_per_node": "8", "rdzv_id": "42", "rdzv_backend": "c10d",
                                   "rdzv_endpoint": "node-a:29500"}
    trainer = argv[cut + 2:]
    assert _flags(trainer) == {"data": "gs://b/dump", "output": "/shared/runs/s1", "preset": "snapgen", "recipe": "snapgen_kd",
                               "device": "cuda", "mixed_precision": "bf16", "num_workers": "8", "batch_size": "16",
                               "max_steps": "500", "checkpoint_every": "1000", "lr": "3e-4"}
    cfg = parse_args(trainer)
    assert (cfg.data, cfg.output, cfg.max_steps, cfg.lr, cfg.batch_size, cfg.num_workers) == (
        "gs://b/dump", "/shared/runs/s1", 500, 3e-4, 16, 8)
    script = (ROOT / "infra/train/slurm.sbatch").read_text()
    assert "export OMP_NUM_THREADS=8" in script and shlex.split("--requeue")[0] in script  # resubmission resumes


@pytest.mark.slow
def test_dataflow_dry_run_builds_the_gpu_dump_job(tmp_path, monkeypatch):
    """With the ``gcp`` extra: the dump launched as ``launch.sh`` launches it, plus ``--dry_run=True
    --no_auth``. The launcher plans into an in-memory stand-in for the bucket (no network here) and
    Beam's Dataflow runner builds the job without submitting it; the job is read back: its stages,
    worker image, and the GPU worker options as Dataflow would receive them."""
    pytest.importorskip("gcsfs")
    apiclient = pytest.importorskip("apache_beam.runners.dataflow.internal.apiclient")
    import importlib
    import json

    from fsspec.implementations.memory import MemoryFileSystem

    from pipelines.teacher_dump import run

    class Bucket(MemoryFileSystem):  # gs:// kept in memory: what the launcher writes lands here
        protocol = ("gs", "gcs")
        root_marker, store, pseudo_dirs = "", {}, [""]

    monkeypatch.setitem(importlib.import_module("fsspec.registry")._registry, "gs", Bucket)
    (tmp_path / "p.txt").write_text("a red boat at sea\na blue car\n")
    # Beam checks the names: a bucket of 3-63 characters, a project id of 6-30 (else it looks up a default bucket)
    argv = normalise_argv(launcher_argv(PROJECT="dd-project", REGION="us-central1", BUCKET="gs://dd-bucket",
                                        PROMPTS=str(tmp_path / "p.txt"), OUTPUT="gs://dd-bucket/out")
                          + ["--teacher", "tiny", "--dry_run=True", "--no_auth"])
    result = run(argv)
    assert result["dry_run"] is True and result["shards_planned"] == 1
    assert {"gs://dd-bucket/out/recipe.json", "gs://dd-bucket/out/_plan/plan.parquet"} <= set(Bucket.store)
    job = result["job"]
    assert job.proto.name.startswith("teacher-dump-")
    stages = {t.unique_name for t in job.proto_pipeline.components.transforms.values() if "/" not in t.unique_name}
    assert {"CreateShards", "Reshuffle", "GenerateShards", "CollectIndexes", "WriteDataset", "CreateInputRejects",
            "CountInputRejects", "TotalInputRejects"} <= stages
    images = [env.payload for env in job.proto_pipeline.components.environments.values()]
    assert any(b"us-docker.pkg.dev/proj/r/w:1" in payload for payload in images)  # the worker image
    # what create_job would send: the Environment built from the job's options (offline)
    env = apiclient.Environment(packages=[], options=job.options, environment_version="8",
                                proto_pipeline_staged_url="gs://dd-bucket/staging/pipeline.pb",
                                proto_pipeline=job.proto_pipeline)
    sent = json.loads(type(env.proto).to_json(env.proto))
    pool = sent["workerPools"][0]
    assert (pool["machineType"], pool["diskSizeGb"], pool["numThreadsPerWorker"]) == ("g2-standard-8", 100, 1)
    assert pool["workerHarnessContainerImage"] == "us-docker.pkg.dev/proj/r/w:1"
    assert "no_use_multiple_sdk_containers" in sent["experiments"]
    options = sent["sdkPipelineOptions"]["options"]
    assert options["dataflow_service_options"] == ["worker_accelerator=type:nvidia-l4;count:1;install-nvidia-driver"]
    assert options["sdk_container_image"] == "us-docker.pkg.dev/proj/r/w:1" and options["max_num_workers"] == 16
