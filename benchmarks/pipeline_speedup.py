"""The whole text-to-image pipeline, teacher against student, end to end: text encoder, every UNet call
under classifier-free guidance, decoder; in PyTorch eager (diffusers' pipelines) and in ONNX Runtime (the
exported deploy loop, ``students.export.ondevice``), side by side in one process.

    python benchmarks/pipeline_speedup.py --student runs/small-s4-seed0 [--teacher_steps 50] [--rounds 15]
    python benchmarks/pipeline_speedup.py --student diffusion_distill/data/students/shapes_small_s4 --weights raw

Rows: the teacher at ``--teacher_steps`` (the baseline), the teacher at the student's own step count (what
the step count alone buys) and the student (its UNet, its decoder if it trained one, the teacher's text
encoder), all at the student's guidance (the dump's), image size and caption, one image per call (CFG
batch of 2 inside), ``--threads`` torch and onnxruntime threads. Rounds are interleaved (teacher, teacher
at n, student, ...) and medians reported, so a load change on the machine hits every row alike. Latency
does not depend on the weights, so any checkpoint of the run gives the same figures. The student's ONNX
folder is what ``distill export --format onnx`` writes (fp32); the teacher's is the same converter on the
teacher's pipeline. ``--output`` also writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

CAPTION = "a small red circle at the top left on a white background"


def eager_call(pipe, steps: int, guidance: float, size: int):
    import torch

    def call(seed: int):
        with torch.inference_mode():
            pipe(CAPTION, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
                 generator=torch.Generator("cpu").manual_seed(seed), output_type="np")
    return call


def onnx_components(onnx_pipe, rounds: int) -> dict:
    """Median seconds of one text-encoder call (the prompt's row), one UNet call (CFG batch) and one decoder call."""
    import numpy as np

    m = onnx_pipe.manifest
    ids = onnx_pipe.token_ids(CAPTION)  # the prompt's row (the negative row is encoded once, at load)
    embeds = onnx_pipe.encode(CAPTION)
    latents = np.random.default_rng(0).standard_normal(m.latent_shape, dtype=np.float32)
    sample = np.concatenate([latents] * m.cfg_batch)
    t = np.full((m.cfg_batch,), m.scheduler.timesteps[0], dtype=np.float32)
    calls = {"text_encoder": lambda: onnx_pipe.run("text_encoder", ids),
             "unet": lambda: onnx_pipe.run("unet", sample, t, embeds),
             "decoder": lambda: onnx_pipe.run("decoder", latents)}
    times = {k: [] for k in calls}
    for _ in range(rounds + 1):
        for k, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v[1:]) for k, v in times.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    p.add_argument("--student", required=True, help="a distill train run folder or checkpoint")
    p.add_argument("--teacher_steps", type=int, default=50)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--onnx", default="true", choices=("true", "false"), help="also time the ONNX Runtime loops")
    p.add_argument("--output", default=None, help="write the figures as JSON here")
    p.add_argument("--weights", default="ema", choices=("ema", "raw"),
                   help="which of the checkpoint's weights (the bundled student keeps raw only; latency is the same)")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.teacher_steps < 1 or args.threads < 1:
        p.error("--rounds, --teacher_steps and --threads must be positive")
    if not os.path.exists(args.student):
        p.error(f"--student {args.student!r} does not exist")

    import torch

    torch.set_num_threads(args.threads)
    from students.export import deploy, folder as export
    from students.export.ondevice import OnnxPipeline
    from students.training.runs import read_run
    from teachers.load import load_teacher

    run = read_run(args.student)
    teacher = load_teacher(run.teacher, dtype="float32", device="cpu")
    student_pipe, info = export.assemble_pipeline(run, teacher=teacher, weights=args.weights)
    for pipe in (teacher.pipe, student_pipe):
        pipe.set_progress_bar_config(disable=True)
    guidance, size, n = float(info["guidance_scale"]), int(info["height"]), int(info["num_inference_steps"])
    rows = [(f"teacher, {args.teacher_steps} steps", "teacher", args.teacher_steps),
            (f"teacher, {n} steps", "teacher", n), (f"student, {n} steps", "student", n)]
    pipes = {"teacher": teacher.pipe, "student": student_pipe}
    eager = {label: eager_call(pipes[who], steps, guidance, size) for label, who, steps in rows}

    onnx = {}
    tmp_dir = tempfile.TemporaryDirectory(prefix="pipeline-speedup-")  # removed when the run ends
    tmp = tmp_dir.name
    if args.onnx == "true":
        print("exporting the ONNX folders (fp32) ...", flush=True)
        for label, who, steps in rows:
            pipe = pipes[who]
            if who == "student":
                pinfo = info
            else:
                pipe.scheduler.set_timesteps(steps)
                pinfo = dict(guidance_scale=guidance, num_inference_steps=steps, height=size, width=size,
                             timesteps=[int(t) for t in pipe.scheduler.timesteps])
            folder = os.path.join(tmp, f"{who}-{steps}")
            if not os.path.exists(folder):
                deploy.write_deploy_folder(pipe, pinfo, folder, precisions=("fp32",))
            onnx[label] = OnnxPipeline(folder, threads=args.threads)

    times = {label: {"eager": [], "onnx": []} for label, _, _ in rows}
    for r in range(args.rounds + 1):  # round 0 warms up
        for label, _, _ in rows:
            t0 = time.perf_counter()
            eager[label](r)
            t1 = time.perf_counter()
            if label in onnx:
                onnx[label](CAPTION, seed=r)
            t2 = time.perf_counter()
            if r:
                times[label]["eager"].append(t1 - t0)
                if label in onnx:
                    times[label]["onnx"].append(t2 - t1)
        print(f"round {r}/{args.rounds}", flush=True)

    base = rows[0][0]
    med = {label: {k: statistics.median(v) if v else None for k, v in t.items()} for label, t in times.items()}
    print(f"\nend to end, one {size} px image, guidance {guidance}, {args.threads} thread(s), median of {args.rounds} "
          "interleaved rounds")
    print(f"| pipeline | eager s | eager speed-up | ONNX Runtime s | ONNX Runtime speed-up |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for label, _, _ in rows:
        e, o = med[label]["eager"], med[label]["onnx"]
        es = med[base]["eager"] / e
        onnx_cells = f"{o:.4f} | {med[base]['onnx'] / o:.1f}x" if o else "- | -"
        print(f"| {label} | {e:.4f} | {es:.1f}x | {onnx_cells} |")
    first = {}  # per model its first row: the teacher's rows at two step counts call the same three models
    for label, who, _ in rows:
        first.setdefault(who, label)
    components = {label: onnx_components(onnx[label], args.rounds) for label in first.values() if label in onnx}
    if components:
        print("\nONNX Runtime per call (median s): text encoder | UNet (CFG batch of 2) | decoder")
        for label, c in components.items():
            print(f"  {label}: {c['text_encoder']:.5f} | {c['unet']:.5f} | {c['decoder']:.5f}")
    if args.output:
        payload = {"student": args.student, "checkpoint": run.checkpoint, "preset": run.train.get("preset"),
                   "guidance_scale": guidance, "size": size, "threads": args.threads, "rounds": args.rounds,
                   "median_s": med, "onnx_components_s": components,
                   "speedup": {label: {k: (med[base][k] / v if v else None) for k, v in m.items()} for label, m in med.items()}}
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        tmp_out = args.output + ".tmp"
        with open(tmp_out, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=1)
        os.replace(tmp_out, args.output)
    tmp_dir.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
