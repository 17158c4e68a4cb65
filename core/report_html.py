"""The one template of the project's HTML reports (``distill eval``, ``distill evolve``, ``distill demo``,
the curate and filter jobs): a Jinja2 page, autoescaped, that every report writer fills with data.

A writer builds a list of ``section(title, *blocks)`` from the block helpers below (``text``, ``note``,
``figure``, ``table``, ``kv_table``, ``image_grid``, ``links``) and calls ``render(title, sections, ...)``;
no writer assembles HTML itself. The layout: a title that wraps, a max-width container, tables that
scroll sideways inside it rather than overflowing the page, figures with their captions, and image
grids with each image's caption under it.

Small images are upscaled in the PNG itself (PIL ``NEAREST``, x``UPSCALE``) when their longer side is
under ``SMALL`` px, so a 32 px image is 128 px in the page and in any viewer the PNG is saved from;
the page also sets ``image-rendering: pixelated`` so a browser zoom keeps the pixels sharp.
"""

from __future__ import annotations

import base64
import io

MARKER = "diffusion-distill report template"  # in every page's <meta name="generator">: tests find it there
UPSCALE = 4  # nearest-neighbour factor for small images
SMALL = 128  # px: images whose longer side is under this are upscaled

_BASE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="{{ marker }}">
<title>{{ title }}</title>
<style>
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1d1d1f;background:#fff;line-height:1.45}
main{max-width:1200px;margin:0 auto;padding:1.2em 2em 3em;box-sizing:border-box}
h1{font-size:1.7em;line-height:1.25;margin:.4em 0 .5em;overflow-wrap:anywhere}
h2{font-size:1.3em;margin:1.6em 0 .5em;border-bottom:1px solid #e3e3e3;padding-bottom:.2em}
h3{font-size:1.05em;margin:1.2em 0 .4em}
p{margin:.4em 0;max-width:60em}
.verdict{font-size:1.15em;font-weight:600;padding:.5em .8em;border-radius:4px;display:inline-block}
.verdict.met{background:#e6f4ea;color:#1e6b34}
.verdict.missed{background:#fde8e8;color:#a61b1b}
.note{color:#666;font-style:italic}
.scroll{overflow-x:auto;max-width:100%;margin:.4em 0 1em}
table{border-collapse:collapse;font-size:.9em}
td,th{border:1px solid #d4d4d4;padding:3px 8px;vertical-align:top;text-align:left}
th{background:#f4f4f4;white-space:nowrap}
td{max-width:32em;overflow-wrap:anywhere}
td.num{text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums}
figure{margin:.5em 0 1.5em}
figure.plot{display:inline-block;vertical-align:top;margin:.5em 1.5em 1.5em 0;max-width:100%}
figure.plot img{max-width:100%;height:auto;display:block;outline:1px solid #eee}
figcaption{font-size:.9em;color:#444;margin-top:.25em;overflow-wrap:anywhere}
img{image-rendering:pixelated}
.gridrow{margin:0 0 16px}
.rowlabel{font-weight:600;margin:0 0 .3em;overflow-wrap:anywhere}
.tiles{display:flex;flex-wrap:wrap;gap:10px}
figure.tile{margin:0;display:flex;flex-direction:column}
figure.tile img{outline:1px solid #ddd}
figure.tile figcaption{font-size:.8em;white-space:pre-line}
ul.links{padding-left:1.2em}
</style></head>
<body><main>
<h1>{{ title }}</h1>
{% if verdict %}<p class="verdict {{ 'met' if verdict.ok else 'missed' }}">{{ verdict.text }}</p>{% endif %}
{% for line in lead %}<p>{{ line }}</p>
{% endfor %}
{% for s in sections %}<section>{% if s.title %}<h2>{{ s.title }}</h2>{% endif %}
{% for b in s.blocks %}{{ block(b) }}{% endfor %}
</section>
{% endfor %}
</main></body></html>
"""

_BLOCKS = r"""
{% macro block(b) -%}
{% if b.kind == "text" %}<p>{{ b.text }}</p>
{% elif b.kind == "note" %}<p class="note">{{ b.text }}</p>
{% elif b.kind == "heading" %}<h3>{{ b.text }}</h3>
{% elif b.kind == "figure" %}<figure class="plot"><img alt="{{ b.alt }}" src="data:image/png;base64,{{ b.png }}"{% if b.width %} width="{{ b.width }}" height="{{ b.height }}"{% endif %}>
{% if b.caption %}<figcaption>{{ b.caption }}</figcaption>{% endif %}</figure>
{% elif b.kind == "table" %}<div class="scroll"><table>
<thead><tr>{% for h in b.headers %}<th>{{ h }}</th>{% endfor %}</tr></thead>
<tbody>{% for row in b.rows %}<tr>{% for c in row %}<td{% if c.num %} class="num"{% endif %}>{{ c.text }}</td>{% endfor %}</tr>
{% endfor %}</tbody></table></div>
{% elif b.kind == "grid" %}<div class="grid">{% for row in b.rows %}<div class="gridrow">{% if row.label %}<div class="rowlabel">{{ row.label }}</div>{% endif %}
<div class="tiles">{% for t in row.tiles %}<figure class="tile" style="width:{{ t.width }}px"><img alt="{{ t.caption }}" src="data:image/png;base64,{{ t.png }}" width="{{ t.width }}" height="{{ t.height }}"><figcaption>{{ t.caption }}</figcaption></figure>{% endfor %}</div></div>
{% endfor %}</div>
{% elif b.kind == "links" %}<ul class="links">{% for href, label in b.entries %}<li><a href="{{ href }}">{{ label }}</a></li>{% endfor %}</ul>
{% endif %}
{%- endmacro %}
"""

_ENV = None


def _env():
    global _ENV
    if _ENV is None:
        from jinja2 import DictLoader, Environment, StrictUndefined

        _ENV = Environment(loader=DictLoader({"base.html": "{% from 'blocks.html' import block %}" + _BASE,
                                              "blocks.html": _BLOCKS}),
                           autoescape=True, undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return _ENV


# ----------------------------------------------------------------------------------------------
# blocks
# ----------------------------------------------------------------------------------------------


def section(title: str | None, *blocks) -> dict:
    """A titled part of the page; ``None`` blocks are skipped, so a writer can pass ``x if cond else None``."""
    return {"title": title, "blocks": [b for b in blocks if b is not None]}


def text(words: str) -> dict:
    return {"kind": "text", "text": words}


def note(words: str) -> dict:
    """One muted line: what is not there and why (a stage that did not run, no images)."""
    return {"kind": "note", "text": words}


def heading(words: str) -> dict:
    return {"kind": "heading", "text": words}


def links(items: list[tuple[str, str]]) -> dict:
    """(href, label) pairs as a list of links (relative paths: files beside the report)."""
    return {"kind": "links", "entries": list(items)}


def figure(png, caption: str | None = None, alt: str | None = None) -> dict:
    """A plot: ``png`` as base64 text or PNG bytes (a matplotlib ``savefig``), shown at most the page's width."""
    b64 = png if isinstance(png, str) else base64.b64encode(png).decode("ascii")
    return {"kind": "figure", "png": b64, "caption": caption, "alt": alt or caption or "figure", "width": None,
            "height": None}


def num(value: float, fmt: str) -> dict:
    """A table cell of ``value`` formatted with ``fmt`` (e.g. ".3f"), right-aligned as a number."""
    return {"text": format(value, fmt), "num": True}


def _cell(value) -> dict:
    if isinstance(value, dict):  # num()
        return value
    if isinstance(value, bool) or value is None:
        return {"text": "-" if value is None else str(value), "num": False}
    if isinstance(value, int):
        return {"text": str(value), "num": True}
    if isinstance(value, float):
        return {"text": "-" if value != value else f"{value:.4g}", "num": True}
    return {"text": str(value), "num": False}


def table(headers: list[str], rows: list[list]) -> dict:
    """A table in a sideways-scrolling box; numbers right-aligned (floats to 4 significant digits),
    None as "-", anything else as its text (escaped)."""
    return {"kind": "table", "headers": list(headers), "rows": [[_cell(c) for c in row] for row in rows]}


def flatten(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    """Nested dicts as (dotted key, value) pairs; lists of scalars joined with ", "."""
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out += flatten(v, key + ".")
        elif isinstance(v, (list, tuple)) and all(not isinstance(x, (dict, list, tuple)) for x in v):
            out.append((key, ", ".join(str(x) for x in v) if v else "-"))
        else:
            out.append((key, v if not isinstance(v, (dict, list, tuple)) else str(v)))
    return out


def kv_table(d: dict, headers: tuple[str, str] = ("setting", "value")) -> dict:
    """A (possibly nested) dict as a two-column table: a configuration, a protocol; never a JSON dump."""
    return table(list(headers), [[k, v] for k, v in flatten(d)])


def png_of(image) -> tuple[bytes, int, int]:
    """PNG bytes and size of ``image`` (PIL image, (H, W, 3) uint8 array or PNG bytes), upscaled x``UPSCALE``
    with ``NEAREST`` when its longer side is under ``SMALL`` px."""
    import numpy as np
    from PIL import Image

    if isinstance(image, (bytes, bytearray)):
        image = Image.open(io.BytesIO(image))
    elif isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image = image.convert("RGB")
    if max(image.size) < SMALL:
        image = image.resize((image.width * UPSCALE, image.height * UPSCALE), Image.NEAREST)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue(), image.width, image.height


def tile(image, caption: str) -> dict:
    data, width, height = png_of(image)
    return {"png": base64.b64encode(data).decode("ascii"), "width": width, "height": height, "caption": caption}


def image_grid(rows: list[tuple[str | None, list[tuple[object, str]]]]) -> dict:
    """Rows of (label, [(image, caption), ...]): each image with its caption under it, rows labelled."""
    return {"kind": "grid", "rows": [{"label": label, "tiles": [tile(im, cap) for im, cap in items]}
                                     for label, items in rows]}


# ----------------------------------------------------------------------------------------------
# the page
# ----------------------------------------------------------------------------------------------


def render(title: str, sections: list[dict], lead: list[str] = (), verdict: tuple[bool, str] | None = None) -> str:
    """The page: ``title``, an optional verdict line (``(ok, words)``: green or red), lead paragraphs, sections."""
    return _env().get_template("base.html").render(
        marker=MARKER, title=title, lead=list(lead), sections=[s for s in sections if s is not None],
        verdict=None if verdict is None else {"ok": bool(verdict[0]), "text": verdict[1]})
