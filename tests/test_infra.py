"""The Dataflow launch flags and worker image: checked by parsing what the launcher produces."""

import os
import re
import subprocess
from pathlib import Path

import apache_beam
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


def test_dataflow_flags_parse_into_the_intended_options():
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


def test_training_launchers_call_the_trainer_with_flags_it_accepts():
    import yaml  # PyYAML comes with the dependencies (transformers, dask)

    from students.train import parse_args

    job = yaml.safe_load((ROOT / "infra/train/pytorchjob.yaml").read_text())
    container = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert container["command"] == ["torchrun"] and args[1:3] == ["-m", "students.train"]
    cfg = parse_args(args[3:])
    assert (cfg.data, cfg.device, cfg.mixed_precision) == ("gs://BUCKET/dump", "cuda", "bf16")
    slurm = (ROOT / "infra/train/slurm.sbatch").read_text()
    assert "-m students.train" in slurm and "--rdzv_backend=c10d" in slurm
    flags = re.findall(r"(--[a-z_]+)", slurm.split("-m students.train", 1)[1])
    parse_args([x for f in dict.fromkeys(flags) for x in (f, "1" if f not in ("--data", "--output") else "x")
                if f not in ("--device", "--mixed_precision", "--preset", "--recipe")] )
