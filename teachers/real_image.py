"""Real images of a dump's captions, encoded by the teacher's VAE (``--real_images``; ``image_latents``).

LADD (Sauer et al. 2024, sec. 3.3) and DMD2 (Yin et al. 2024, sec. 4.3) let an adversarial student
exceed its teacher by giving the discriminator real data, not the teacher's samples, as "real". An
offline dump stores that side per sample: the real image of the caption, encoded the way the teacher's
training data were (the VAE posterior's mean times ``scaling_factor``), so the trainer never loads a
VAE or an image.

Where the image comes from, per sample:
- the input row's ``image`` (a path or fsspec URL of a PNG/JPEG), centre-cropped to the dump's aspect
  and resized to its resolution;
- else, for the built-in ``shapes``, ``shapes-sd15`` and ``shapes-sd3`` teachers, the ground-truth render of
  the caption (``teachers.shapes.world.render``), drawn from the sample's seed: the data the teacher was
  trained on;
- else none: the sample is rejected (``no_real_image``); an unreadable image is ``broken_image``.
"""

from __future__ import annotations

import io

import numpy as np

from shards.record import BROKEN_IMAGE, NO_REAL_IMAGE

RENDERS_TRUTH = ("shapes", "shapes-sd15", "shapes-sd3")  # built-in teachers whose captions have a ground-truth render


def real_image(teacher_spec: str, prompt: str, seed: int, image: str | None, height: int,
               width: int) -> tuple[np.ndarray | None, str | None]:
    """(uint8 (height, width, 3) image, None) or (None, "reason: detail") for one sample."""
    if image:
        return _read_image(image, height, width)
    if teacher_spec in RENDERS_TRUTH:
        from teachers.shapes import world

        scene = world.parse_caption(prompt)
        if scene is None:
            return None, f"{NO_REAL_IMAGE}: caption {prompt[:60]!r} is not in the shapes world's grammar"
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x7265616C]))  # "real": apart from the noise
        rendered = world.render(scene, rng, size=height)
        return (rendered, None) if height == width else _fit(rendered, height, width)
    return None, f"{NO_REAL_IMAGE}: the row has no image and teacher {teacher_spec!r} renders no ground truth"


def _read_image(url: str, height: int, width: int):
    from PIL import Image

    from core.fs import read_bytes

    try:
        data = read_bytes(url)
    except (OSError, ValueError) as err:
        return None, f"{NO_REAL_IMAGE}: image {url!r} cannot be read ({err})"
    try:
        with Image.open(io.BytesIO(data)) as img:
            rgb = np.asarray(img.convert("RGB"))
    # PIL raises many types for bad bytes (OSError, SyntaxError, ValueError, DecompressionBombError), as in
    # the curate job's image stage: every one means this sample's image is unusable, a reject, not a crash.
    except Exception as err:  # noqa: BLE001
        return None, f"{BROKEN_IMAGE}: image {url!r} does not decode ({type(err).__name__}: {err})"
    return _fit(rgb, height, width)


def _fit(rgb: np.ndarray, height: int, width: int):
    """Centre crop to the target aspect, then a bicubic resize: (uint8 image, None)."""
    from PIL import Image

    h, w = rgb.shape[:2]
    scale = min(h / height, w / width)
    ch, cw = round(height * scale), round(width * scale)
    top, left = (h - ch) // 2, (w - cw) // 2
    img = Image.fromarray(rgb[top : top + ch, left : left + cw])
    return np.asarray(img.resize((width, height), Image.BICUBIC), dtype=np.uint8), None


def encode_images(teacher, images: list[np.ndarray]):
    """uint8 (H, W, 3) images -> float32 latents (B, 4, h, w): the VAE posterior's mean times
    ``scaling_factor`` (minus ``shift_factor`` first where the VAE has one), as the teacher was trained."""
    import torch

    vae = teacher.pipe.vae
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    enc = vae.to(torch.float32) if upcast else vae
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.inference_mode():
        mean = enc.encode(x.to(enc.device, enc.dtype)).latent_dist.mean
    if upcast:
        vae.to(torch.float16)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((mean.float() - shift) * vae.config.scaling_factor).cpu().numpy()
