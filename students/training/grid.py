"""Teacher/student image grids for fixed prompts and seeds (what people look at during training).

``sample_images`` runs a pipeline as built by ``students.distill.inference.student_pipeline`` (the
scheduler, steps and guidance are the caller's: the dump's for the teacher, the student's own for
the student), so a grid shows what ``distill export`` will give for the same caption and seed.
"""

from __future__ import annotations

import io
import os

import numpy as np

MIN_TILE = 128  # px: smaller images are upscaled (nearest, an integer factor) so a 32 px world stays legible


def sample_images(pipe, prompts: list[str], seeds: list[int], steps: int, guidance_scale: float) -> np.ndarray:
    """(N, H, W, 3) uint8 images of ``pipe`` for ``prompts``, one CPU generator seeded per image."""
    import torch

    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    with torch.no_grad():
        out = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance_scale, generator=gens, output_type="np")
    return (out.images * 255).round().astype(np.uint8)


def grid_png(rows: list[np.ndarray], path: str, labels: list[str], captions: list[str] | None = None) -> np.ndarray:
    """Rows of (N, H, W, 3) images -> one PNG (a label per row, a caption under each column), written
    atomically; returns the grid as an (H, W, 3) uint8 array (for TensorBoard)."""
    import textwrap

    from PIL import Image, ImageDraw

    from core.fs import atomic_write_bytes, is_local, url_to_fs

    n, h, w, _ = rows[0].shape
    scale = max(1, -(-MIN_TILE // max(h, w)))
    th, tw = h * scale, w * scale
    label_w, caption_h = 110, 44 if captions else 0
    canvas = Image.new("RGB", (label_w + n * tw, len(rows) * th + caption_h), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (images, label) in enumerate(zip(rows, labels)):
        draw.text((4, r * th + th // 2 - 6), label, fill="black")
        for i, image in enumerate(images):
            tile = Image.fromarray(image).resize((tw, th), Image.NEAREST)
            canvas.paste(tile, (label_w + i * tw, r * th))
    for i, caption in enumerate(captions or []):
        lines = textwrap.wrap(caption, width=max(8, tw // 6))[:4]
        draw.multiline_text((label_w + i * tw + 2, len(rows) * th + 2), "\n".join(lines), fill="black", spacing=1)
    fs, fpath = url_to_fs(path)
    if is_local(fs):
        os.makedirs(os.path.dirname(fpath), exist_ok=True)
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return np.asarray(canvas)
