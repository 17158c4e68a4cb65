"""``report.html`` of ``distill eval``: one quality-vs-steps figure, one latency figure, the table, the samples.

Rendered through the project's one report template (``core.report_html``). One self-contained file:
the figures and the sample images are embedded PNGs, so the report can be mailed or attached to a
run without its folder; every number is in ``metrics.json`` beside it (linked, not dumped).

The quality figure has one panel per metric, teacher and student on the same axes in each, the y
range from the data with a margin (every point labelled with its value, so a flat line reads as
flat, not as a trend); metrics where lower is better say so in their label.
"""

from __future__ import annotations

import io
import math
import os

from core import report_html as R

# result keys that are not plotted against steps (bookkeeping) and those on the latency figure (a flow teacher's
# or student's, SD3's pipeline: its transformer seat's forward, ``denoiser_latency_s``, in place of the UNet's)
NOT_PLOTTED = {"num_images"}
SPEED = ("latency_s", "unet_latency_s", "denoiser_latency_s", "images_per_s")
LATENCY_PANELS = (("latency_s", "ms per image, end to end (lower is better)"),
                  ("unet_latency_s", "ms per UNet forward, CFG pair (lower is better)"),
                  ("denoiser_latency_s", "ms per transformer-seat forward, CFG pair (lower is better)"))
LABELS = {"fid": "FID (lower is better)", "clip_score": "CLIP score (higher is better)",
          "adherence": "adherence (higher is better)", "exact": "exact match (higher is better)",
          "frechet_analyser": "Frechet, analyser features (lower is better)",
          "latency_s": "seconds per image, end to end", "unet_latency_s": "seconds per UNet forward (CFG pair)",
          "denoiser_latency_s": "seconds per transformer-seat forward (CFG pair)",
          "images_per_s": "images / s"}
HEADERS = {"latency_s": "ms / image", "unet_latency_s": "UNet ms / call", "denoiser_latency_s": "denoiser ms / call",
           "images_per_s": "images / s", "num_images": "images", "clip_score": "CLIP score"}


def lower_is_better(key: str) -> bool:
    return key in ("fid", "kid") or "frechet" in key or key.endswith("_fd") or "latency" in key


def label(key: str) -> str:
    if key in LABELS:
        return LABELS[key]
    return f"{key} (lower is better)" if lower_is_better(key) else key


def y_range(values: list[float]) -> tuple[float, float]:
    """The data's range with a margin: 15% of the spread each side; a flat series (spread under 0.1% of
    its size) gets 10% of its size, so it is drawn flat in the middle of a band that says how flat; never
    below 0 for values that are not."""
    lo, hi = min(values), max(values)
    size = max(abs(lo), abs(hi))
    spread = hi - lo
    pad = 0.15 * spread if spread > 1e-3 * size else 0.1 * size or 0.1
    return (lo - pad if lo - pad >= 0 or lo < 0 else 0.0), hi + pad


def _curves(results: dict, key: str, scale: float = 1.0) -> dict:
    curves = {}
    for model, by_steps in results.items():
        points = sorted((int(s), row[key] * scale) for s, row in by_steps.items()
                        if isinstance(row.get(key), (int, float)) and math.isfinite(row[key]))
        if points:
            curves[model] = points
    return curves


def _panels_png(results: dict, panels: list[tuple[str, str, float]]) -> bytes | None:
    """One figure, a panel per (key, y label, scale) that some model has; None when none has any."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = [(key, ylabel, _curves(results, key, scale)) for key, ylabel, scale in panels]
    drawn = [d for d in drawn if d[2]]
    if not drawn:
        return None
    cols = min(3, len(drawn))
    rows = -(-len(drawn) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.9 * cols, 3.0 * rows), squeeze=False)
    steps = sorted({x for _, _, curves in drawn for pts in curves.values() for x, _ in pts})
    colours = {"teacher": "#4878a8", "student": "#d0622c"}
    for ax, (key, ylabel, curves) in zip(axes.flat, drawn):
        for model, points in curves.items():
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", label=model, color=colours.get(model))
            for x, y in points:
                ax.annotate(f"{y:.3g}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
        ax.set_xscale("log", base=2)
        ax.set_xticks(steps)
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.get_xaxis().set_minor_formatter(matplotlib.ticker.NullFormatter())
        if len(steps) == 1:
            ax.set_xlim(steps[0] / 1.5, steps[0] * 1.5)
        ax.set_ylim(*y_range([y for pts in curves.values() for _, y in pts]))
        ax.set_xlabel("sampling steps")
        ax.set_title(ylabel, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(drawn):]:
        ax.axis("off")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def metric_keys(results: dict) -> list[str]:
    """Quality metrics in the order of the results (FID and CLIP score first, then the extra metrics)."""
    keys = []
    for by_steps in results.values():
        for row in by_steps.values():
            keys += [k for k in row if k not in keys and k not in NOT_PLOTTED and k not in SPEED
                     and not k.endswith("_se")]
    return keys


def quality_figure(results: dict) -> bytes | None:
    return _panels_png(results, [(k, label(k), 1.0) for k in metric_keys(results)])


def latency_figure(results: dict) -> bytes | None:
    return _panels_png(results, [(k, words, 1000.0) for k, words in LATENCY_PANELS])


def table_rows(results: dict) -> tuple[list[str], list[list]]:
    """Headers and rows: model, steps, each metric (± its standard error when there is one), speed in ms."""
    keys = metric_keys(results)
    speed = [k for k in SPEED if any(k in row for by in results.values() for row in by.values())]
    headers = ["model", "steps"] + [k + (" ↓" if lower_is_better(k) else "") for k in keys] + \
              [HEADERS.get(k, k) for k in speed] + ["images"]
    headers = [HEADERS.get(h, h) for h in headers]
    out = []
    for model, by_steps in results.items():
        for steps, row in sorted(by_steps.items(), key=lambda kv: -int(kv[0])):
            cells = [model, int(steps)]
            for k in keys:
                v, se = row.get(k), row.get(f"{k}_se")
                cells.append(f"{v:.4g} ± {se:.2g}" if isinstance(v, float) and isinstance(se, float) else v)
            for k in speed:
                v = row.get(k)
                cells.append(v * 1000 if isinstance(v, float) and k != "images_per_s" else v)
            cells.append(row.get("num_images"))
            out.append(cells)
    return headers, out


def _protocol(payload: dict) -> dict:
    p = payload.get("protocol", {})
    keep = ("teacher", "captions", "format", "num_images", "caption_choice", "references", "num_references",
            "image_size", "guidance_scale", "seeds", "metrics", "denoisers")
    return {k: p[k] for k in keep if k in p}


def write_report(payload: dict, path: str, grid_path: str | None = None, grid: tuple | None = None) -> str:
    """Write the HTML report for a ``students.evaluation.evaluate`` payload; returns ``path``.

    ``grid``: (rows of (K, H, W, 3) uint8 images, a label per row, the K captions) -- each image shown
    with its caption under it; without it, ``grid_path`` (``grid.png``) is shown as one figure."""
    results = payload["results"]
    quality, latency = quality_figure(results), latency_figure(results)
    headers, rows = table_rows(results)
    p = payload.get("protocol", {})
    models = ", ".join(f"{m} at {' / '.join(sorted(by, key=int))} steps" for m, by in results.items())
    lead = [f"{models}; {p.get('num_images', '?')} captions ({p.get('format', '?')}), the same captions and seeds "
            f"for every row, guidance {p.get('guidance_scale', '?')}, {p.get('image_size', '?')} px."]
    samples = None
    if grid is not None and len(grid[0]):
        images, labels, captions = grid
        samples = R.image_grid([(lab, [(im, cap) for im, cap in zip(row, captions)]) for row, lab in zip(images, labels)])
    elif grid_path and os.path.isfile(grid_path):
        with open(grid_path, "rb") as f:
            samples = R.figure(f.read(), "teacher and student rows: the same captions and seeds in every row",
                               alt="sample grid")
    page = R.render("distill eval: student against teacher", [
        R.section("Quality against sampling steps",
                  R.figure(quality, "each panel: teacher and student on the same axes; y range from the data, "
                                    "every point labelled", alt="quality vs steps") if quality else
                  R.note("no quality metric was computed")),
        R.section("Latency", R.figure(latency, "PyTorch, this machine; lower is better", alt="latency vs steps")
                  if latency else R.note("latency was not measured (--latency_repeats 0)")),
        R.section("Metrics", R.table(headers, rows),
                  R.note("↓: lower is better; ± one standard error over images where the metric has one")),
        R.section("Samples", samples) if samples else None,
        R.section("Protocol", R.kv_table(_protocol(payload)),
                  R.links([("metrics.json", "metrics.json: every number, the student, the configuration "
                                            "and the environment")])),
    ], lead=lead)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(page)
    os.replace(tmp, path)
    return path
