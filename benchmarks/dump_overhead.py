"""Cost of the teacher dump job against a bare loop over diffusers' own pipeline, in one invocation.

    python benchmarks/dump_overhead.py [--teacher sd15-random] [--resolution 128] [--steps 4] \\
        [--batch_size 4] [--samples 16] [--device cpu] [--dtype float32]

Both sides use the same teacher, steps, batch size, resolution and scheduler (DDIM, CFG 7.5).
The bare side calls ``StableDiffusionPipeline.__call__(..., output_type="latent")`` per batch and
keeps nothing. The job side runs ``pipelines/teacher_dump.py`` on DirectRunner with the default
recipe (every step recorded, cond and uncond predictions, ``mid_block`` and ``up_blocks.0`` at two
feature steps, float16 shards with index and sha256). Each side runs twice, over a small and a large
prompt set; the ratio of the per-sample slopes (marginal cost) cancels the fixed costs a long run
amortises (the job's teacher load in ``DoFn.setup``, Beam start-up, planning). The wall ratio of
the large run is printed too.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def bare_loop(teacher, prompts, args) -> float:
    import torch

    from teachers.sampler import make_scheduler

    pipe = teacher.pipe
    pipe.scheduler = make_scheduler(teacher, "ddim")
    start = time.perf_counter()
    for i in range(0, len(prompts), args.batch_size):
        batch = prompts[i : i + args.batch_size]
        gens = [torch.Generator("cpu").manual_seed(1000 + i + j) for j in range(len(batch))]
        pipe(batch, num_inference_steps=args.steps, guidance_scale=7.5, height=args.resolution, width=args.resolution,
             generator=gens, output_type="latent")
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run_job(args, prompt_file: str, out: str) -> float:
    from pipelines import teacher_dump

    start = time.perf_counter()
    teacher_dump.run(["--prompts", prompt_file, "--output", out, "--teacher", args.teacher,
                      "--num_inference_steps", str(args.steps), "--resolution", str(args.resolution),
                      "--batch_size", str(args.batch_size), "--samples_per_shard", "1000000",
                      "--device", args.device, "--dtype", args.dtype, "--progress", "off"])
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", default="sd15-random")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--samples", type=int, default=16, help="the larger run; the smaller has a third of it")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args(argv)

    from teachers.load import load_teacher

    small = max(args.batch_size, (args.samples // 3) // args.batch_size * args.batch_size)
    large = args.samples
    tmp = tempfile.mkdtemp(prefix="dump-overhead-")
    prompts = [f"a photograph of object number {i} on a table, studio light" for i in range(large)]
    files = {}
    for n in (small, large):
        files[n] = os.path.join(tmp, f"prompts-{n}.txt")
        Path(files[n]).write_text("\n".join(prompts[:n]) + "\n")

    # Bare: one teacher, the pipeline over `small` then `large` samples (after a warm-up batch).
    teacher = load_teacher(args.teacher, dtype=args.dtype, device=args.device)
    bare_loop(teacher, prompts[: args.batch_size], args)
    bare = {n: bare_loop(teacher, prompts[:n], args) for n in (small, large)}
    del teacher
    # Job: two whole runs (each loads its own teacher in DoFn.setup), small then large.
    job = {n: run_job(args, files[n], os.path.join(tmp, f"out-{n}")) for n in (small, large)}
    out_bytes = sum(f.stat().st_size for f in Path(tmp, f"out-{large}").glob("*.tar"))
    shutil.rmtree(tmp)

    # Marginal cost per sample (slope between the two sizes) cancels fixed costs: the teacher load,
    # Beam start-up, the plan. It is what a long run pays per sample.
    bare_per = (bare[large] - bare[small]) / (large - small)
    job_per = (job[large] - job[small]) / (large - small)
    print(f"teacher {args.teacher} {args.dtype} on {args.device}, {args.resolution}px, {args.steps} steps, "
          f"CFG 7.5, batch {args.batch_size}; runs of {small} and {large} samples")
    print(f"bare diffusers pipeline : {bare[small]:7.1f} s / {bare[large]:7.1f} s -> {bare_per:6.2f} s per sample")
    print(f"dump job (DirectRunner) : {job[small]:7.1f} s / {job[large]:7.1f} s -> {job_per:6.2f} s per sample "
          f"(wall incl. teacher load and Beam start-up; {out_bytes / large / 2**20:.2f} MiB/sample written)")
    print(f"ratio job/bare per sample (marginal): {job_per / bare_per:.3f}")
    print(f"ratio job/bare wall, {large} samples:   {job[large] / bare[large]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
