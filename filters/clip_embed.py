"""CLIP text and image embeddings with open_clip, and the CLIP score.

    clip = load_clip("ViT-L-14", "/models/open_clip_vit_l14.bin")   # or weights="random"
    text_emb = embed_texts(clip, ["a red bicycle"])                  # (n, embed_dim), L2-normalised
    image_emb = embed_images(clip, [pil_image])
    scores = clip_score(image_emb, text_emb)                         # row-wise cosine

Nothing is downloaded: weights are a local checkpoint that open_clip's ``create_model`` reads, or
``"random"`` (``pretrained=None``). ``dd-tiny-clip`` is a tiny ViT registered here for tests
(embed_dim 32; about 1,000x cheaper than ViT-B/32 on a CPU).
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np

RANDOM_WEIGHTS = "random"
TINY_MODEL = "dd-tiny-clip"


def tiny_model_config() -> dict:
    """A CLIP with the real BPE vocabulary and 77-token context but 2-layer, 64-wide towers."""
    return {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    }


_EXTRA_CONFIGS = {TINY_MODEL: tiny_model_config}


@functools.lru_cache(maxsize=None)
def register_model_config(name: str) -> None:
    """Make one of ``_EXTRA_CONFIGS`` known to open_clip (once per process).

    open_clip's public hook is ``add_model_config(path)``, which reads ``<name>.json`` files, so the
    config is written to a private temporary folder that the registry then scans.
    """
    import open_clip

    folder = tempfile.mkdtemp(prefix="dd-open-clip-cfg-")
    with open(os.path.join(folder, f"{name}.json"), "w", encoding="utf-8") as f:
        json.dump(_EXTRA_CONFIGS[name](), f)
    open_clip.add_model_config(folder)


def _ensure_known(model_name: str) -> None:
    if model_name in _EXTRA_CONFIGS:
        register_model_config(model_name)


def model_embed_dim(model_name: str) -> int:
    """The embedding width of an open_clip architecture; ``ValueError`` naming an unknown one."""
    import open_clip

    _ensure_known(model_name)
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise ValueError(f"unknown open_clip model {model_name!r} (see open_clip.list_models())")
    return int(cfg["embed_dim"])


@dataclass
class ClipModel:
    model: Any  # open_clip CLIP module, eval mode
    preprocess: Any  # PIL image -> (3, H, W) tensor
    tokenizer: Any  # list[str] -> (n, context_length) token ids
    device: str
    embed_dim: int


def load_clip(model_name: str, weights: str, device: str = "cpu") -> ClipModel:
    """Build ``model_name`` with local ``weights`` (a checkpoint path) or ``"random"`` weights."""
    import open_clip
    import torch

    _ensure_known(model_name)
    if weights != RANDOM_WEIGHTS and not os.path.exists(weights):
        raise FileNotFoundError(f"CLIP weights {weights!r} not found (nothing is downloaded here)")
    pretrained = None if weights == RANDOM_WEIGHTS else weights
    torch.manual_seed(0)  # random weights are the same in every worker
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, device=device)
    model.eval()
    return ClipModel(model, preprocess, open_clip.get_tokenizer(model_name), device, model_embed_dim(model_name))


def embed_texts(clip: ClipModel, texts: list[str]) -> np.ndarray:
    """(n, embed_dim) float32, L2-normalised; texts longer than the context are truncated."""
    import torch

    if not texts:
        return np.zeros((0, clip.embed_dim), np.float32)
    with torch.inference_mode():
        tokens = clip.tokenizer(list(texts)).to(clip.device)
        emb = clip.model.encode_text(tokens, normalize=True)
    return emb.float().cpu().numpy()


def embed_images(clip: ClipModel, images: list) -> np.ndarray:
    """(n, embed_dim) float32, L2-normalised, from PIL images (any mode; converted to RGB)."""
    import torch

    if not images:
        return np.zeros((0, clip.embed_dim), np.float32)
    with torch.inference_mode():
        pixels = torch.stack([clip.preprocess(im.convert("RGB")) for im in images]).to(clip.device)
        emb = clip.model.encode_image(pixels, normalize=True)
    return emb.float().cpu().numpy()


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm (float32); zero rows stay zero."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norms == 0, 1.0, norms)


def clip_score(image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of paired image and text embeddings: (n, d), (n, d) -> (n,).

    This is DataComp's "CLIP score" before any scaling (CLIPScore's 2.5 * max(cos, 0) is not used).
    """
    return np.sum(l2_normalize(image_emb) * l2_normalize(text_emb), axis=-1)


def top_fraction_threshold(scores: np.ndarray, fraction: float) -> float:
    """The score at or above which ``ceil(fraction * n)`` of ``scores`` lie (ties may keep more).

    The curate job gets the same number from Beam's ``ApproximateQuantiles`` without gathering
    all scores; this exact form is the reference it is tested against.
    """
    scores = np.sort(np.asarray(scores, dtype=np.float64))[::-1]
    if scores.size == 0:
        return float("-inf")
    k = max(1, int(np.ceil(fraction * scores.size)))
    return float(scores[k - 1])
