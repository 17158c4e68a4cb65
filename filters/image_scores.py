"""Scores of generated images: CLIP image embedding, aesthetic score, CLIP score against the prompt.

    scorer = load_image_scorer(config.tiny(), device="cpu")      # the curate job's models
    scores = score_images(scorer, images, prompts)               # images: (H, W, 3) uint8 arrays

The same models and functions as the curate job (``filters.clip_embed``, ``filters.aesthetic``), so a
threshold means the same thing on curated source images and on the teacher's own outputs. The
teacher dump calls this on the images it has just decoded (``--score_images``), so the filter job
never decodes images again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from filters.clip_embed import ClipModel


@dataclass
class ImageScorer:
    clip: ClipModel  # open_clip model, preprocess and tokenizer
    aesthetic: Any  # filters.aesthetic.AestheticMLP, or None: no aesthetic score
    clip_model: str  # open_clip architecture name, recorded with every score


def load_image_scorer(cfg, device: str = "cpu") -> ImageScorer:
    """CLIP and (where ``cfg.aesthetic_weights`` is set) the aesthetic MLP of a ``CurateConfig``."""
    from filters.aesthetic import load_aesthetic_mlp
    from filters.clip_embed import load_clip

    if not cfg.clip_model:
        raise ValueError("image scoring needs a CLIP model (the config's clip_model is empty)")
    clip = load_clip(cfg.clip_model, cfg.clip_weights, device)
    mlp = load_aesthetic_mlp(cfg.aesthetic_weights, device) if cfg.aesthetic_weights else None
    return ImageScorer(clip, mlp, cfg.clip_model)


@dataclass
class ImageScores:
    image_embeds: np.ndarray  # (n, embed_dim) float32, L2-normalised CLIP image embeddings
    clip_score: np.ndarray  # (n,) float32 image-text cosine against each image's own prompt
    aesthetic_score: np.ndarray | None  # (n,) float32, None without an aesthetic predictor

    def row(self, i: int, clip_model: str) -> dict:
        """Scores of image ``i`` as the json/index values (Python floats; aesthetic None if unscored)."""
        aesthetic = None if self.aesthetic_score is None else float(self.aesthetic_score[i])
        return {"clip_model": clip_model, "clip_score": float(self.clip_score[i]), "aesthetic_score": aesthetic}


def score_images(scorer: ImageScorer, images: list[np.ndarray], prompts: list[str]) -> ImageScores:
    """(H, W, 3) uint8 images and their prompts -> embeddings and scores (rows in input order).

    The image goes to CLIP exactly as the PNG stores it (PNG is lossless), so re-scoring the stored
    PNG gives the same embedding.
    """
    from PIL import Image

    from filters.aesthetic import aesthetic_scores
    from filters.clip_embed import clip_score, embed_images, embed_texts

    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    pil = [Image.fromarray(np.asarray(im, dtype=np.uint8)) for im in images]
    image_embeds = embed_images(scorer.clip, pil)
    text_embeds = embed_texts(scorer.clip, list(prompts))
    aesthetic = aesthetic_scores(scorer.aesthetic, image_embeds) if scorer.aesthetic is not None else None
    return ImageScores(image_embeds.astype(np.float32), clip_score(image_embeds, text_embeds).astype(np.float32),
                       None if aesthetic is None else aesthetic.astype(np.float32))
