"""Teacher/student image grids for fixed prompts and seeds (what people look at during training)."""

from __future__ import annotations

import copy
import os

import numpy as np


def sample_images(pipe, unet, prompts: list[str], seeds: list[int], steps: int) -> np.ndarray:
    """(N, H, W, 3) uint8 images from ``pipe`` with ``unet`` in place of its own, DDIM, CFG 7.5."""
    import torch

    student_pipe = copy.copy(pipe)  # shallow: shares the VAE and text encoder, swaps the UNet
    student_pipe.unet = unet
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    with torch.no_grad():
        out = student_pipe(prompts, num_inference_steps=steps, generator=gens, output_type="np")
    return (out.images * 255).round().astype(np.uint8)


def grid_png(rows: list[np.ndarray], path: str, labels: list[str]) -> None:
    """Rows of (N, H, W, 3) images -> one PNG with a label strip per row, written atomically."""
    from PIL import Image, ImageDraw

    n, h, w, _ = rows[0].shape
    label_w = 110
    canvas = Image.new("RGB", (label_w + n * w, len(rows) * h), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (images, label) in enumerate(zip(rows, labels)):
        draw.text((4, r * h + h // 2 - 6), label, fill="black")
        for i, image in enumerate(images):
            canvas.paste(Image.fromarray(image), (label_w + i * w, r * h))
    import io

    from teachers.fs import atomic_write_bytes, is_local, url_to_fs

    fs, fpath = url_to_fs(path)
    if is_local(fs):
        os.makedirs(os.path.dirname(fpath), exist_ok=True)
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
