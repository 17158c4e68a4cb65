"""Candidate students of a shapes teacher: parameters, MACs and CPU latency in PyTorch eager and in ONNX
Runtime (the runtime students ship to) against the teacher UNet, side by side in one process (one thread,
batch 2 as CFG runs it, interleaved rounds, medians).

    python benchmarks/student_candidates.py [--teacher_arch sd15|shapes] [--rounds 25]

Candidates: the teacher's own BK-SDM and SnapFusion cuts (``students.models.teacher_init``), ``full``
(the project's own copy of the teacher architecture, the second baseline: it differs from diffusers' in
eager), and the ``shapes`` and ``shapes_small`` presets. Ratios are printed against diffusers' teacher
(``x``) and against the project's copy (``x copy``). Weights are random (cost does not depend on them).
ONNX models are exported as ``distill export --format onnx`` exports a UNet (fp32, opset 17, batch axis
symbolic).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
import warnings


def macs(model, args) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*args)
    return counter.get_total_flops() // 2


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher_arch", default="sd15", choices=("sd15", "shapes"))
    p.add_argument("--rounds", type=int, default=25)
    p.add_argument("--presets", default="shapes,shapes_small", help="comma-separated student presets")
    args = p.parse_args(argv)
    import torch
    from diffusers import UNet2DConditionModel

    from students.export import onnx_convert
    from students.export.deploy import wrappers
    from students.models.teacher_init import cut, family_config, init_from_teacher
    from students.models.unet import EfficientUNet2DConditionModel, build_unet
    from teachers.shapes import model as shapes_model

    warnings.filterwarnings("ignore")  # diffusers' and the exporter's deprecation notices
    torch.set_num_threads(1)
    torch.manual_seed(0)
    teacher = UNet2DConditionModel(**shapes_model.unet_config(args.teacher_arch)).eval()
    models = {"teacher": teacher}
    for name in ("full", "bk_base", "bk_small", "bk_tiny", "snapfusion", "mid_only"):  # full: the project's copy
        try:
            cfg, block_map = cut(family_config(teacher), name)
        except ValueError as err:
            print(f"{name}: not applicable ({err})")
            continue
        student = EfficientUNet2DConditionModel.from_student_config(cfg).eval()
        init_from_teacher(student, teacher, block_map)
        models[name] = student
    for name in args.presets.split(","):
        torch.manual_seed(0)
        models[name] = build_unet(name).eval()
    size = teacher.config.sample_size
    x, t = torch.randn(2, 4, size, size), torch.tensor([500.0, 500.0])
    ctx = torch.randn(2, 77, teacher.config.cross_attention_dim)
    cost = {n: (sum(q.numel() for q in m.parameters()), macs(m, (x, t, ctx))) for n, m in models.items()}
    folder = tempfile.mkdtemp(prefix="candidates-")
    sessions = {}
    for i, (n, m) in enumerate(models.items()):
        component = onnx_convert.Component("unet", wrappers()[0](m).eval(), (x[:1], t[:1], ctx[:1]),
                                           ("sample", "timestep", "encoder_hidden_states"), ("noise_pred",), dynamic_batch=True)
        path = os.path.join(folder, f"{i}.onnx")
        onnx_convert.export_model(component, path)
        sessions[n] = onnx_convert.session(path, threads=1)
    feeds = {"sample": x.numpy(), "timestep": t.numpy(), "encoder_hidden_states": ctx.numpy()}
    eager, ort = {n: [] for n in models}, {n: [] for n in models}
    with torch.inference_mode():
        for n, m in models.items():  # warm-up
            m(x, t, ctx)
            sessions[n].run(None, feeds)
        for _ in range(args.rounds):  # interleaved: load on the machine hits every model alike
            for n, m in models.items():
                t0 = time.perf_counter()
                m(x, t, ctx)
                eager[n].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                sessions[n].run(None, feeds)
                ort[n].append(time.perf_counter() - t0)
    shutil.rmtree(folder, ignore_errors=True)
    med = {n: (statistics.median(eager[n]), statistics.median(ort[n])) for n in models}
    print(f"\nshapes-{args.teacher_arch} teacher UNet, batch 2, {size}x{size} latents, 1 thread, median of {args.rounds} "
          "interleaved rounds; x: against diffusers' teacher, x copy: against the project's copy (full)")
    print(f"{'model':<14}{'params':>10}{'x':>6}{'MACs':>12}{'x':>6}{'eager ms':>10}{'x':>6}{'x copy':>8}"
          f"{'ORT ms':>8}{'x':>6}{'x copy':>8}")
    (bp, bm), (be, bo), (ce, co) = cost["teacher"], med["teacher"], med.get("full", med["teacher"])
    for n in models:
        e, o = med[n]
        print(f"{n:<14}{cost[n][0]:>10,}{cost[n][0] / bp:>6.2f}{cost[n][1]:>12,}{cost[n][1] / bm:>6.2f}"
              f"{e * 1e3:>10.2f}{e / be:>6.2f}{e / ce:>8.2f}{o * 1e3:>8.2f}{o / bo:>6.2f}{o / co:>8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
