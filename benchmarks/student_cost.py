"""Student presets beside their teachers: parameters, MACs, CPU latency and the ratios, in one run.

    python benchmarks/student_cost.py                              # all default presets, native resolutions
    python benchmarks/student_cost.py --json out/student_cost.json --repeats 3
    python benchmarks/student_cost.py --latency-resolution sdxl=512  # SDXL family timed at 512 px

Takes the flags of ``python -m students.cost.profile`` (``--presets``, ``--repeats``, ``--warmup``,
``--batch-size``, ``--resolution``, ``--latency-resolution``, ``--skip-latency``, ``--device``,
``--dtype``, ``--json``) and adds a verdict against the targets of issue 5. A target is a ceiling on
student / teacher measured in this run; a miss is printed as a miss, with the figure.
"""

from __future__ import annotations



from students.cost import profile

# (student, metric, ceiling of student / teacher, why)
TARGETS = (
    ("mobilediffusion", "macs", 0.45, "UNet MACs vs SD-1.5 at 512 px"),
    ("mobilediffusion", "latency", 0.50, "CPU latency vs SD-1.5"),
    ("snapgen", "params", 0.15, "UNet parameters vs SDXL"),
    ("snapgen", "macs", 0.35, "UNet MACs vs SDXL at 1024 px"),
    ("vae_tiny", "macs", 1 / 15, "decoder MACs vs SD VAE decoder"),
    ("vae_pruned", "macs", 1 / 3, "decoder MACs vs SD VAE decoder"),
)


def check_targets(results) -> list[dict]:
    measured = {r["student"]: r for r in profile.ratios(results)}
    rows = []
    for student, metric, ceiling, why in TARGETS:
        value = measured.get(student, {}).get(metric)
        verdict = "not measured" if value is None else ("met" if value <= ceiling else "MISSED")
        rows.append({"student": student, "metric": metric, "ratio": value, "ceiling": ceiling, "verdict": verdict, "what": why})
    return rows


def main(argv=None) -> int:
    cfg, json_path = profile.parse_args(argv)
    results = profile.profile(cfg)
    print(profile.format_report(results, cfg))
    targets = check_targets(results)
    print("\ntargets (student / teacher, this run)")
    for t in targets:
        ratio = "-" if t["ratio"] is None else f"{t['ratio']:.3f}"
        print(f"  {t['student']:<16} {t['metric']:<8} {ratio:>7} <= {t['ceiling']:.3f}  {t['verdict']:<12} {t['what']}")
    if json_path:
        payload = profile.report_json(results, cfg)
        payload["targets"] = targets
        profile.write_json(json_path, payload)
        print(f"\nwrote {json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
