"""``report.html`` of ``distill eval``: metric-vs-steps plots (teacher and student curves), the table, the grid.

One self-contained file: the plots are matplotlib PNGs and the grid is ``grid.png``, both embedded
as base64, so the report can be mailed or attached to a run without its folder.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os

# result keys that are not plotted against steps (bookkeeping, or plotted on their own)
NOT_PLOTTED = {"num_images"}
LABELS = {"fid": "FID (lower is better)", "clip_score": "CLIP score (higher is better)",
          "latency_s": "seconds per image, end to end", "unet_latency_s": "seconds per UNet forward (CFG pair)",
          "images_per_s": "images / s"}


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def plot_metric(results: dict, key: str) -> str | None:
    """Base64 PNG of ``key`` vs step count, one curve per model; None when no model has the value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {}
    for model, by_steps in results.items():
        points = sorted((int(s), row[key]) for s, row in by_steps.items() if isinstance(row.get(key), (int, float)))
        if points:
            curves[model] = points
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for model, points in curves.items():
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", label=model)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({x for pts in curves.values() for x, _ in pts}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("sampling steps")
    ax.set_ylabel(LABELS.get(key, key))
    ax.grid(alpha=0.3)
    ax.legend()
    encoded = _png(fig)
    plt.close(fig)
    return encoded


def _table(results: dict) -> str:
    keys = []
    for by_steps in results.values():
        for row in by_steps.values():
            keys += [k for k in row if k not in keys]
    head = "".join(f"<th>{html.escape(k)}</th>" for k in ["model", "steps", *keys])
    body = []
    for model, by_steps in results.items():
        for steps, row in sorted(by_steps.items(), key=lambda kv: -int(kv[0])):
            cells = [model, steps] + [row.get(k) for k in keys]
            body.append("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape("-" if value is None else str(value))


def write_report(payload: dict, path: str, grid_path: str | None = None) -> str:
    """Write the HTML report for a ``students.evaluation.evaluate`` payload; returns ``path``."""
    results = payload["results"]
    keys = []
    for by_steps in results.values():
        for row in by_steps.values():
            keys += [k for k in row if k not in keys and k not in NOT_PLOTTED]
    plots = []
    for key in keys:  # FID and CLIP score first (the papers' figures), then extra metrics, then speed
        encoded = plot_metric(results, key)
        if encoded:
            plots.append(f'<figure><img alt="{html.escape(key)} vs steps" src="data:image/png;base64,{encoded}">'
                         f"<figcaption>{html.escape(LABELS.get(key, key))} vs steps</figcaption></figure>")
    grid = ""
    if grid_path and os.path.isfile(grid_path):
        with open(grid_path, "rb") as f:
            grid = (f'<h2>Samples</h2><p>Same captions and seeds in every row.</p>'
                    f'<img alt="grid" src="data:image/png;base64,{base64.b64encode(f.read()).decode("ascii")}">')
    protocol = html.escape(json.dumps(payload.get("protocol", {}), indent=1))
    student = html.escape(json.dumps(payload.get("student", {}), indent=1))
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>distill eval</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}} figure{{display:inline-block;margin:0 1em 1em 0}}
pre{{background:#f6f6f6;padding:1em;overflow:auto}}</style></head><body>
<h1>Student vs teacher</h1>
{''.join(plots)}
<h2>Metrics</h2>
{_table(results)}
{grid}
<h2>Protocol</h2><pre>{protocol}</pre>
<h2>Student</h2><pre>{student}</pre>
</body></html>
"""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(page)
    os.replace(tmp, path)
    return path
