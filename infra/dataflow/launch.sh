#!/usr/bin/env bash
# Launch the teacher dump on Dataflow with L4 GPU workers.
#
#   PROJECT=my-proj REGION=us-central1 BUCKET=gs://my-bucket IMAGE=us-central1-docker.pkg.dev/my-proj/dd/worker:v1 \
#   PROMPTS=gs://my-bucket/curated/manifest.parquet OUTPUT=gs://my-bucket/dumps/sd15-v1 TEACHER=gs-mounted-or-hub-id \
#   infra/dataflow/launch.sh [extra job flags...]
#
# DRY_RUN=1 prints the command (one argument per line after the first) instead of running it.
# Every flag is explained in infra/dataflow/RUNBOOK.md.
set -euo pipefail
: "${PROJECT:?set PROJECT}" "${REGION:?set REGION}" "${BUCKET:?set BUCKET}" "${IMAGE:?set IMAGE}"
: "${PROMPTS:?set PROMPTS}" "${OUTPUT:?set OUTPUT}"
TEACHER="${TEACHER:-stable-diffusion-v1-5/stable-diffusion-v1-5}"
GPU_TYPE="${GPU_TYPE:-nvidia-l4}"
GPU_COUNT="${GPU_COUNT:-1}"
MACHINE_TYPE="${MACHINE_TYPE:-g2-standard-8}"   # g2 = L4 machines; 1 GPU, 8 vCPU, 32 GB
MAX_WORKERS="${MAX_WORKERS:-16}"
JOB_NAME="${JOB_NAME:-teacher-dump-$(date +%Y%m%d-%H%M%S)}"

cmd=(beam run pipelines/teacher_dump.py
  --runner=Dataflow
  --project="$PROJECT"
  --region="$REGION"
  --job_name="$JOB_NAME"
  --temp_location="$BUCKET/tmp"
  --staging_location="$BUCKET/staging"
  --sdk_container_image="$IMAGE"
  --sdk_location=container
  --machine_type="$MACHINE_TYPE"
  --dataflow_service_options="worker_accelerator=type:${GPU_TYPE};count:${GPU_COUNT};install-nvidia-driver"
  --experiments=no_use_multiple_sdk_containers
  --number_of_worker_harness_threads=1
  --max_num_workers="$MAX_WORKERS"
  --disk_size_gb=100
  --prompts="$PROMPTS"
  --output="$OUTPUT"
  --teacher="$TEACHER"
  --device=cuda
  --dtype=bfloat16
  --batch_size="${BATCH_SIZE:-16}"
  --samples_per_shard="${SAMPLES_PER_SHARD:-512}"
  --progress=off
  "$@")

if [[ "${DRY_RUN:-0}" == "1" ]]; then
  printf '%s\n' "${cmd[@]}"
else
  exec "${cmd[@]}"
fi
