"""Cost of the teacher dump job against a bare loop over diffusers' own pipeline, in one invocation.

    python benchmarks/dump_overhead.py [--teacher sd15-random] [--resolution 128] [--steps 4] \\
        [--batch_size 4] [--samples 16] [--device cpu] [--dtype float32]

Both sides use the same teacher, steps, batch size, resolution and scheduler (DDIM, CFG 7.5).
The bare side calls ``StableDiffusionPipeline.__call__(..., output_type="latent")`` per batch and
keeps nothing. The job side runs ``pipelines/teacher_dump.py`` on DirectRunner with the default
recipe (every step recorded, cond and uncond predictions, ``mid_block`` and ``up_blocks.0`` at two
feature steps, float16 shards with index and sha256). Each side runs over a small and a large prompt set.
Printed: the steady-state ratio (seconds per sample inside the job's shard work units, which is what
a long run pays per sample once its workers hold the teacher), the marginal wall ratio (slope between
the two sizes; it cancels fixed costs but carries the variance of the teacher load), and the plain
wall ratio of the large run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path



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


def run_job(args, prompt_file: str, out: str) -> tuple[float, float]:
    """(wall seconds of the whole job, seconds inside its shard work units).

    The work-unit time is taken by wrapping ``pipelines.dump.shard.generate_shard`` (DirectRunner runs
    it in this process): sampling, feature capture, encoding, hashing and writing the shard, without
    the one-off teacher load in ``DoFn.setup`` and Beam's start-up.
    """
    from pipelines import teacher_dump
    from pipelines.dump import shard as dump_shard

    inside = []
    original = dump_shard.generate_shard

    def timed(*a, **kw):
        t0 = time.perf_counter()
        try:
            return original(*a, **kw)
        finally:
            inside.append(time.perf_counter() - t0)

    dump_shard.generate_shard = timed
    start = time.perf_counter()
    teacher_dump.run(["--prompts", prompt_file, "--output", out, "--teacher", args.teacher,
                      "--num_inference_steps", str(args.steps), "--resolution", str(args.resolution),
                      "--batch_size", str(args.batch_size), "--samples_per_shard", "1000000",
                      "--device", args.device, "--dtype", args.dtype, "--progress", "off"])
    wall = time.perf_counter() - start
    dump_shard.generate_shard = original
    return wall, sum(inside)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
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

    # Steady state: seconds per sample inside the job's work units against the bare pipeline, both
    # measured over the large run. Marginal (slope between the two sizes) cancels fixed costs too, but
    # carries the run-to-run variance of the teacher load (tens of seconds for sd15-random on CPU).
    bare_per = bare[large] / large
    unit_per = job[large][1] / large
    slope_bare = (bare[large] - bare[small]) / (large - small)
    slope_job = (job[large][0] - job[small][0]) / (large - small)
    print(f"teacher {args.teacher} {args.dtype} on {args.device}, {args.resolution}px, {args.steps} steps, "
          f"CFG 7.5, batch {args.batch_size}; runs of {small} and {large} samples")
    print(f"bare diffusers pipeline : {bare[small]:7.1f} s / {bare[large]:7.1f} s  ({bare_per:.2f} s per sample)")
    print(f"dump job (DirectRunner) : {job[small][0]:7.1f} s / {job[large][0]:7.1f} s wall; work units "
          f"{job[small][1]:.1f} s / {job[large][1]:.1f} s ({unit_per:.2f} s per sample, "
          f"{out_bytes / large / 2**20:.2f} MiB/sample written)")
    print(f"ratio job/bare per sample, steady state (work units): {unit_per / bare_per:.3f}")
    print(f"ratio job/bare per sample, marginal wall (slope):     {slope_job / slope_bare:.3f}")
    print(f"ratio job/bare wall, {large} samples (incl. teacher load, Beam start-up): {job[large][0] / bare[large]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
