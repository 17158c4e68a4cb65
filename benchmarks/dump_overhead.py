"""Cost of the teacher dump job against a bare loop over diffusers' own pipeline, in one invocation.

    python benchmarks/dump_overhead.py [--teacher sd15-random] [--resolution 128] [--steps 4] \\
        [--batch_size 4] [--samples 16] [--device cpu] [--dtype float32]

Both sides use the same teacher, steps, batch size, resolution and scheduler (DDIM, CFG 7.5).
The bare side calls ``StableDiffusionPipeline.__call__(..., output_type="latent")`` per batch and
keeps nothing. The job side runs ``pipelines/teacher_dump.py`` on DirectRunner with the default
recipe (every step recorded, cond and uncond predictions, ``mid_block`` and ``up_blocks.0`` at two
feature steps, float16 shards with index and sha256). The job loads its own teacher in
``DoFn.setup``; that one-off load is timed separately here and reported apart from the steady
ratio (it is paid once per worker process, not per sample). Order: bare, job, bare again (the two
bare timings bracket the job, so drift on a noisy machine shows).
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", default="sd15-random")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args(argv)

    from pipelines import teacher_dump
    from teachers.load import load_teacher

    prompts = [f"a photograph of object number {i} on a table, studio light" for i in range(args.samples)]
    tmp = tempfile.mkdtemp(prefix="dump-overhead-")
    prompt_file = os.path.join(tmp, "prompts.txt")
    Path(prompt_file).write_text("\n".join(prompts) + "\n")

    start = time.perf_counter()
    teacher = load_teacher(args.teacher, dtype=args.dtype, device=args.device)
    load_s = time.perf_counter() - start
    bare_loop(teacher, prompts[: args.batch_size], args)  # warm-up (allocator, kernels)
    bare_1 = bare_loop(teacher, prompts, args)
    del teacher

    start = time.perf_counter()
    teacher_dump.run(["--prompts", prompt_file, "--output", os.path.join(tmp, "out"), "--teacher", args.teacher,
                      "--num_inference_steps", str(args.steps), "--resolution", str(args.resolution),
                      "--batch_size", str(args.batch_size), "--samples_per_shard", str(args.samples),
                      "--device", args.device, "--dtype", args.dtype, "--progress", "off"])
    job_s = time.perf_counter() - start

    teacher = load_teacher(args.teacher, dtype=args.dtype, device=args.device)
    bare_2 = bare_loop(teacher, prompts, args)
    out_bytes = sum(f.stat().st_size for f in Path(tmp, "out").glob("*.tar"))
    shutil.rmtree(tmp)

    bare = (bare_1 + bare_2) / 2
    steady = job_s - load_s
    print(f"teacher {args.teacher} {args.dtype} on {args.device}, {args.resolution}px, {args.steps} steps, "
          f"batch {args.batch_size}, {args.samples} samples")
    print(f"bare diffusers pipeline : {args.samples / bare:8.3f} samples/s  ({bare_1:.1f} s, {bare_2:.1f} s)")
    print(f"dump job (DirectRunner) : {args.samples / job_s:8.3f} samples/s  ({job_s:.1f} s wall, "
          f"of which teacher load ~{load_s:.1f} s, {out_bytes / args.samples / 2**20:.2f} MiB/sample written)")
    print(f"ratio job/bare, steady (wall - one teacher load): {steady / bare:.3f}")
    print(f"ratio job/bare, wall incl. teacher load:          {job_s / bare:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
