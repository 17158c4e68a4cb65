"""Candidate students of a shapes teacher: parameters, MACs and eager CPU latency against the teacher UNet,
side by side in one process (one thread, batch 2 as CFG runs it, interleaved rounds, medians).

    python benchmarks/student_candidates.py [--teacher_arch sd15] [--rounds 15]

Candidates: the teacher's own BK-SDM and SnapFusion cuts (``students.models.teacher_init``) and the
``shapes`` preset. Weights are random (cost does not depend on them). ONNX Runtime latency, the runtime
students ship to, is ``benchmarks/deploy_latency.py``'s; it is not repeated here.
"""

from __future__ import annotations

import argparse
import statistics
import time


def macs(model, args) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*args)
    return counter.get_total_flops() // 2


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher_arch", default="sd15", choices=("sd15", "shapes"))
    p.add_argument("--rounds", type=int, default=15)
    args = p.parse_args(argv)
    import torch
    from diffusers import UNet2DConditionModel

    from students.models.teacher_init import cut, family_config, init_from_teacher
    from students.models.unet import EfficientUNet2DConditionModel, build_unet
    from teachers.shapes import model as shapes_model

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
    models["shapes preset"] = build_unet("shapes").eval()
    size = teacher.config.sample_size
    x, t = torch.randn(2, 4, size, size), torch.tensor([500, 500])
    ctx = torch.randn(2, 77, teacher.config.cross_attention_dim)
    cost = {n: (sum(q.numel() for q in m.parameters()), macs(m, (x, t, ctx))) for n, m in models.items()}
    times = {n: [] for n in models}
    with torch.no_grad():
        for m in models.values():
            m(x, t, ctx)  # warm-up
        for _ in range(args.rounds):  # interleaved: load on the machine hits every model alike
            for n, m in models.items():
                t0 = time.perf_counter()
                m(x, t, ctx)
                times[n].append(time.perf_counter() - t0)
    base_p, base_m = cost["teacher"]
    base_t = statistics.median(times["teacher"])
    print(f"\nshapes-{args.teacher_arch} teacher UNet, batch 2, {size}x{size} latents, 1 thread, median of {args.rounds}")
    print(f"{'model':<16}{'params':>10}{'x':>7}{'MACs':>12}{'x':>7}{'eager ms':>10}{'x':>7}")
    for n in models:
        ms = statistics.median(times[n]) * 1e3
        print(f"{n:<16}{cost[n][0]:>10,}{cost[n][0] / base_p:>7.2f}{cost[n][1]:>12,}{cost[n][1] / base_m:>7.2f}"
              f"{ms:>10.2f}{ms / 1e3 / base_t:>7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
