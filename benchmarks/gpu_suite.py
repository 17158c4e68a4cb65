"""The GPU suite: the numbers a user asks first, in one command, as ratios and fractions of peak.

    python benchmarks/gpu_suite.py                       # one H100/H200-class GPU, about 5 minutes
    python benchmarks/gpu_suite.py --cpu_smoke           # the same code paths on tiny shapes, seconds

It prints, each measured in this invocation:
1. the teacher dump's sampler (``teachers.sampler.sample_trajectories``: CFG in one batched call,
   every latent and prediction recorded, features captured) against the bare diffusers pipeline
   call on the same teacher, prompts, steps and guidance: images/s of each, the ratio, and the MFU
   of both (FLOPs of one UNet call counted by ``torch.utils.flop_counter`` times the calls made,
   over the wall time and the stated peak);
2. the same sampler with SDPA attention, ``channels_last`` and ``torch.compile`` switched on one at
   a time (SDPA is diffusers' default; "off" means the classic attention processor). The compile
   variant runs last, after everything else has printed: its warm-up compiles the UNet (minutes
   on a first run), and a budget overrun then costs only that row;
3. the trainer's step kernel for the ``mobilediffusion`` and ``snapgen`` students under bf16
   autocast: forward, output-distillation loss, backward and AdamW step on a synthetic batch at the
   students' native latent size, in samples/s (the data path is measured by
   ``benchmarks/train_overhead.py``); snapgen's 128-px latent takes batch 8 (32 would hold about
   125 GiB of activations), and a batch that runs out of memory is halved and retried;
4. each student's and decoder's latency against its teacher's (``students.cost.profile``'s models).

Defaults are the GPU settings (``sd15-random`` at 512 px, 50 steps, CFG 7.5, bf16, batch 4). Peak
FLOP/s defaults to the H100 SXM's dense bf16 989 TFLOP/s (the H200 has the same compute); pass
``--peak_tflops`` for another device. ``--cpu_smoke`` runs every path on the ``tiny`` teacher and
the ``tiny`` student in float32 on the CPU, so the suite cannot rot while no GPU is at hand (the
default test suite runs it); its figures mean nothing.

On a GPU a section that fails is recorded (``errors``) and the suite goes on to the next; the JSON
(``--output``) is rewritten after every section, and the exit status is 1 if any section failed.
With ``--cpu_smoke`` the first failure is raised, so the test suite sees it. cuDNN's autotuner is on
(``torch.backends.cudnn.benchmark``) for every variant, so ``channels_last`` is compared with the
convolution algorithms cuDNN picks for each layout.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time


PROMPTS = ["a red bicycle leaning on a brick wall", "a lighthouse at dusk, oil painting",
           "a bowl of ramen, studio photo", "a fox in the snow, watercolour"]


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device: str, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def unet_flops(unet, batch: int, latent: int, device: str, dtype) -> float:
    """FLOPs of one UNet forward at ``batch`` (flop_counter counts a multiply-add as 2)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    cfg = unet.config
    x = torch.zeros(batch, cfg.in_channels, latent, latent, device=device, dtype=dtype)
    ctx = torch.zeros(batch, 77, cfg.cross_attention_dim, device=device, dtype=dtype)
    kwargs = {}
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.zeros(batch, pooled, device=device, dtype=dtype),
                                       "time_ids": torch.zeros(batch, 6, device=device, dtype=dtype)}
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(x, torch.full((batch,), 500, device=device), ctx, **kwargs)
    return float(counter.get_total_flops())


_TEACHER: dict = {}  # the one teacher the dump rows share: (spec, dtype, device) -> Teacher


def _teacher(args):
    """The teacher, built once per suite (a random SD-1.5 is about a billion parameters to
    initialise on the CPU and copy to the device; each variant undoes its change after its row)."""
    from teachers.load import load_teacher

    key = (args.teacher, args.dtype, args.device)
    if key not in _TEACHER:
        _TEACHER.clear()
        _TEACHER[key] = load_teacher(*key)
    return _TEACHER[key]


@contextlib.contextmanager
def _variant(pipe, variant: str):
    """The pipeline's UNet with one switch changed, restored on exit."""
    import torch

    unet, processors = pipe.unet, pipe.unet.attn_processors
    try:
        if variant == "no_sdpa":
            from diffusers.models.attention_processor import AttnProcessor

            unet.set_attn_processor(AttnProcessor())
        elif variant == "channels_last":
            unet.to(memory_format=torch.channels_last)
        elif variant == "compile":
            # mode "default": max-autotune would tune every matmul and conv shape of the UNet (many
            # minutes); both calls run under inference_mode, so one grad mode is compiled
            pipe.unet = torch.compile(unet, mode="default")
        elif variant != "default":
            raise ValueError(f"unknown variant {variant!r}")
        yield
    finally:
        pipe.unet = unet
        unet.set_attn_processor(processors)
        unet.to(memory_format=torch.contiguous_format)


def dump_vs_pipeline(args, variant: str = "default") -> dict:
    """Images/s and MFU of the dump's sampler and of the bare pipeline call."""
    with _variant(_teacher(args).pipe, variant):
        return {"variant": variant, **_dump_vs_pipeline(args, _teacher(args))}


def _dump_vs_pipeline(args, teacher) -> dict:
    import torch

    from teachers.sampler import SampleRequest, SamplerConfig, sample_trajectories

    pipe = teacher.pipe
    pipe.set_progress_bar_config(disable=True)
    side = args.resolution or teacher.default_resolution
    prompts = (PROMPTS * args.batch)[: args.batch]
    cfg = SamplerConfig(num_inference_steps=args.steps, guidance_scale=args.guidance, height=side, width=side,
                        feature_layers=("mid_block",), num_feature_steps=1)
    requests = [SampleRequest(key=f"k{i}", prompt=p, seed=i) for i, p in enumerate(prompts)]

    def run_sampler():
        with torch.inference_mode():
            sample_trajectories(teacher, requests, cfg)

    def run_pipeline():  # CPU generators, one per sample, as the sampler draws its noise
        gens = [torch.Generator("cpu").manual_seed(i) for i in range(len(prompts))]
        with torch.inference_mode():
            pipe(prompts, num_inference_steps=args.steps, guidance_scale=args.guidance, height=side, width=side,
                 generator=gens, output_type="latent")

    t_sampler = _timed(run_sampler, args.device, args.repeats)
    t_pipe = _timed(run_pipeline, args.device, args.repeats)
    base_unet = getattr(pipe.unet, "_orig_mod", pipe.unet)
    flops = unet_flops(base_unet, 2 * args.batch, side // teacher.vae_scale_factor, args.device,
                       getattr(torch, args.dtype)) * args.steps  # CFG: cond + uncond in one call per step
    peak = args.peak_tflops * 1e12
    return {"images_per_s_sampler": args.batch / t_sampler,
            "images_per_s_pipeline": args.batch / t_pipe, "sampler_over_pipeline": t_pipe / t_sampler,
            "mfu_sampler": flops / t_sampler / peak, "mfu_pipeline": flops / t_pipe / peak,
            "unet_tflops_per_image": flops / args.batch / 1e12}


def trainer_step(args, preset: str) -> dict:
    """Samples/s of the trainer's step kernel (student forward, output KD, backward, AdamW) under
    autocast, at the preset's batch (``args.train_batches``), halved while it runs out of memory."""
    import torch

    batch = args.train_batches.get(preset, args.train_batch)
    while True:
        try:
            return _trainer_step(args, preset, batch)
        except (torch.cuda.OutOfMemoryError, RuntimeError) as err:
            # cuBLAS and cuDNN report a failed workspace allocation as a RuntimeError
            if batch == 1 or not (isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()):
                raise
            print(f"trainer step [{preset}]: batch {batch} ran out of memory; trying {batch // 2}", flush=True)
            batch //= 2


def _trainer_step(args, preset: str, batch: int) -> dict:
    import torch

    from students.distill import losses as distill
    from students.models.unet import build_unet

    student = build_unet(preset).to(args.device).train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
    cfg = student.config
    latent = args.train_latent or cfg.sample_size
    g = torch.Generator().manual_seed(0)
    z = torch.randn(batch, cfg.in_channels, latent, latent, generator=g).to(args.device)
    ctx = torch.randn(batch, 77, cfg.cross_attention_dim, generator=g).to(args.device)
    target = torch.randn_like(z)
    t = torch.randint(0, 1000, (batch,), generator=g).to(args.device)
    kwargs = {}
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled).to(args.device),
                                       "time_ids": torch.zeros(batch, 6).to(args.device)}
    autocast = torch.autocast(args.device.split(":")[0], dtype=getattr(torch, args.train_dtype),
                              enabled=args.train_dtype != "float32")

    def step():
        with autocast:
            pred = student(z, t, ctx, **kwargs).sample
        loss = distill.per_sample_mse(pred.float(), target).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    seconds = _timed(step, args.device, args.repeats)
    return {"preset": preset, "samples_per_s": batch / seconds, "batch": batch,
            "latent": latent, "dtype": args.train_dtype}


def latencies(args) -> list[dict]:
    """Forward latency of each student and decoder against its teacher's, same batch and device."""
    import torch

    from students.cost import profile

    rows = []
    for student, teacher, pixels in args.latency_pairs:
        times = {}
        for name in (teacher, student):
            model = profile.build_model(name, args.device, args.dtype)
            a, kw = profile.make_inputs(name, model, 1, pixels, args.device, args.dtype)
            with torch.no_grad():
                times[name] = _timed(lambda m=model: profile.forward(name, m, a, kw), args.device, args.repeats)
            del model
        rows.append({"student": student, "teacher": teacher, "pixels": pixels, "student_ms": times[student] * 1e3,
                     "teacher_ms": times[teacher] * 1e3, "student_over_teacher": times[student] / times[teacher]})
    return rows


def settings(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu_smoke", action="store_true", help="tiny shapes on the CPU: checks the code paths")
    parser.add_argument("--peak_tflops", type=float, default=989.0, help="device peak (dense, the dtype used)")
    parser.add_argument("--output", default=None, help="also write the results as JSON here")
    parser.add_argument("--skip_compile", action="store_true", help="leave out the torch.compile variant")
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        args.__dict__.update(teacher="tiny", device="cpu", dtype="float32", steps=2, guidance=7.5, batch=1,
                             resolution=None, repeats=1, train_batch=2, train_batches={}, train_latent=8, train_dtype="float32",
                             presets=("tiny",), variants=("default", "no_sdpa", "channels_last"),
                             latency_pairs=(("tiny", "tiny_teacher", 64),), peak_tflops=1.0)
    else:
        args.__dict__.update(teacher="sd15-random", device="cuda", dtype="bfloat16", steps=50, guidance=7.5, batch=4,
                             resolution=512, repeats=3, train_batch=32, train_batches={"snapgen": 8}, train_latent=None,
                             train_dtype="bfloat16",
                             presets=("mobilediffusion", "snapgen"),
                             variants=("default", "no_sdpa", "channels_last") + (() if args.skip_compile else ("compile",)),
                             latency_pairs=(("snapfusion", "sd15", 512), ("mobilediffusion", "sd15", 512),
                                            ("snapgen", "sdxl", 1024), ("vae_tiny", "sd_vae_decoder", 512)))
    return args


def _print_dump(row: dict) -> None:
    print(f"dump [{row['variant']}]: sampler {row['images_per_s_sampler']:.3f} img/s, pipeline "
          f"{row['images_per_s_pipeline']:.3f} img/s, ratio {row['sampler_over_pipeline']:.2f}, "
          f"MFU {row['mfu_sampler']:.1%} (pipeline {row['mfu_pipeline']:.1%})", flush=True)


def _print_trainer(row: dict) -> None:
    print(f"trainer step [{row['preset']}, {row['dtype']}, batch {row['batch']}]: {row['samples_per_s']:.1f} samples/s",
          flush=True)


def _print_latencies(rows: list[dict]) -> None:
    for row in rows:
        print(f"latency {row['student']} vs {row['teacher']} @ {row['pixels']} px: {row['student_ms']:.1f} ms vs "
              f"{row['teacher_ms']:.1f} ms ({row['student_over_teacher']:.2f}x)", flush=True)


def main(argv=None) -> dict:
    args = settings(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("gpu_suite: no CUDA device here; run with --cpu_smoke to check the code paths")
    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"device: {device_name}; peak {args.peak_tflops} TFLOP/s; teacher {args.teacher} {args.dtype}", flush=True)
    results = {"device": device_name, "dump": [], "trainer": [], "latency": [], "errors": []}
    sections = [("dump", v, lambda v=v: dump_vs_pipeline(args, v), _print_dump) for v in args.variants if v != "compile"]
    sections += [("trainer", p, lambda p=p: trainer_step(args, p), _print_trainer) for p in args.presets]
    sections.append(("latency", "pairs", lambda: latencies(args), _print_latencies))
    if "compile" in args.variants:  # last: its first warm-up compiles the UNet
        sections.append(("dump", "compile", lambda: dump_vs_pipeline(args, "compile"), _print_dump))
    return run_sections(sections, results, strict=args.cpu_smoke, output=args.output)


def run_sections(sections, results: dict, *, strict: bool, output: str | None) -> dict:
    """Run (kind, name, run, show) sections in order into ``results[kind]``. Not ``strict`` (a GPU
    run): a failure goes to ``results["errors"]`` and the next section runs; the JSON at ``output``
    is rewritten after every section, so a run cut short keeps what it measured."""
    import torch

    for kind, name, run, show in sections:
        try:
            out = run()
        except Exception as err:  # a GPU run records the failure and goes on; the smoke test must see it
            if strict:
                raise
            results["errors"].append({"section": kind, "name": name, "error": f"{type(err).__name__}: {err}"})
            print(f"{kind} [{name}] failed: {type(err).__name__}: {err}", flush=True)
        else:
            results[kind] += out if isinstance(out, list) else [out]
            show(out)
        if torch.cuda.is_initialized():
            try:
                torch.cuda.empty_cache()
            except RuntimeError:  # after a fatal CUDA error; the next section will say so
                pass
        if output:
            from core.fs import atomic_write_json

            atomic_write_json(output, results)
    return results


if __name__ == "__main__":
    sys.exit(1 if main()["errors"] else 0)
