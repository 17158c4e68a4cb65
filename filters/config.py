"""Curation thresholds as one frozen dataclass, with named presets.

    cfg = laion_aesthetics(threshold=6.0)
    cfg = with_overrides(cfg, {"min_image_side": 512})      # unknown keys are an error
    validate(cfg)                                            # ValueError naming the bad value

The curate job (``pipelines/curate/``) builds one from ``--preset``, ``--config file.json`` and
per-field flags, validates it before any work starts, and writes it into ``summary.json`` and the
report. Every stage that a field feeds can be switched off by setting it to ``None`` (or ``""`` for
``clip_model``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from core.options import option

DEDUP_ON = ("auto", "text", "image")
NSFW_POLICIES = ("drop-nsfw", "drop-unsure", "keep")  # the LAION NSFW tags each policy drops: see NSFW_DROPS
NSFW_DROPS = {"drop-nsfw": ("NSFW",), "drop-unsure": ("NSFW", "UNSURE"), "keep": ()}


_S_RULES = "caption rules"
_S_CLIP = "CLIP embeddings (open_clip)"
_S_AESTHETIC = "aesthetic predictor (LAION aesthetic predictor v2)"
_S_CLIP_SCORE = "CLIP score (image-text cosine)"
_S_SEMDEDUP = "semantic dedup (SemDeDup)"
_S_IMAGES = "images"
_S_REPORT = "report"


@dataclass(frozen=True, kw_only=True)
class CurateConfig:
    min_words: int = option(2, section=_S_RULES,
                            help="words (whitespace-separated) a caption needs, inclusive; DataComp's basic filter drops < 2")
    max_words: int | None = option(60, section=_S_RULES, help="most words allowed, inclusive; None = no bound")
    min_clip_tokens: int = option(1, section=_S_RULES, help="CLIP BPE tokens needed, not counting start/end tokens")
    max_clip_tokens: int | None = option(75, section=_S_RULES,
                                         help="most CLIP BPE tokens, not counting start/end (77 positions - 2)")
    max_punsafe: float | None = option(0.5, section=_S_RULES,
                                       help="drop when the source's punsafe (probability unsafe) > this")
    max_pwatermark: float | None = option(0.5, section=_S_RULES,
                                          help="drop when the source's pwatermark (probability watermark) > this")
    nsfw: str = option("drop-nsfw", choices=NSFW_POLICIES, section=_S_RULES,
                       help="LAION's NSFW tag: drop-nsfw drops NSFW (keeps UNSURE, UNLIKELY); drop-unsure drops "
                            "NSFW and UNSURE; keep drops none")
    min_image_side: int = option(0, section=_S_RULES,
                                 help="pixels; drop when the shorter known side is smaller; 0 = off")
    max_aspect_ratio: float | None = option(3.0, section=_S_RULES,
                                            help="long side / short side, where sizes are known; None = off")
    exact_dedup: bool = option(True, section=_S_RULES,
                               help="drop repeats of the same normalised caption (one kept per caption)")
    clip_model: str = option("", section=_S_CLIP,
                             help="open_clip architecture name ('ViT-L-14', 'ViT-B-32', 'dd-tiny-clip'); '' = no CLIP stages")
    clip_weights: str | None = option(None, section=_S_CLIP,
                                      help="local checkpoint path, or 'random' for random weights (tests, timing)")
    clip_batch_size: int = option(32, section=_S_CLIP, help="records per RunInference batch")
    clip_device: str = option("cpu", section=_S_CLIP, help="torch device for CLIP and the aesthetic MLP")
    aesthetic_weights: str | None = option(None, section=_S_AESTHETIC,
                                           help="local .safetensors / .pth state dict; None = no aesthetic score")
    aesthetic_threshold: float | None = option(None, section=_S_AESTHETIC,
                                               help="keep score >= this (LAION-Aesthetics used 5, 6, 6.5)")
    clip_score_threshold: float | None = option(None, section=_S_CLIP_SCORE,
                                                help="keep cosine >= this (DataComp: 0.28 with ViT-B/32)")
    clip_score_top_fraction: float | None = option(None, section=_S_CLIP_SCORE,
                                                   help="keep the top fraction by cosine (DataComp: 0.3 with ViT-L/14)")
    semdedup_eps: float | None = option(0.05, section=_S_SEMDEDUP,
                                        help="duplicates: cosine similarity >= 1 - eps; None = off")
    semdedup_margin: float = option(
        0.01, section=_S_SEMDEDUP,
        help="also assign an embedding to its second-nearest k-means centroid when that centroid's cosine is "
             "within this of the nearest's, so near-duplicates on a cluster border meet (0 = nearest only)")
    semdedup_on: str = option("auto", choices=DEDUP_ON, section=_S_SEMDEDUP,
                              help="'auto': image embeddings where images exist, text otherwise; 'text'; 'image'")
    kmeans_sample_size: int = option(50_000, section=_S_SEMDEDUP,
                                     help="embeddings sampled (deterministically) to train k-means")
    kmeans_clusters: int = option(0, section=_S_SEMDEDUP,
                                  help="k; 0 = ceil(records / target_cluster_size), capped by sample / 40 (a "
                                       "second level splits what that leaves too big)")
    target_cluster_size: int = option(1_000, section=_S_SEMDEDUP,
                                      help="records per cluster aimed at; a cluster above 4 x this gets a second "
                                           "k-means level (and row blocks above 8 x), whatever k is")
    kmeans_iterations: int = option(20, section=_S_SEMDEDUP, help="Lloyd iterations (faiss)")
    kmeans_seed: int = option(0, section=_S_SEMDEDUP, help="seed of the k-means init and of the sample")
    download_images: bool = option(False, section=_S_IMAGES,
                                   help="fetch URLs with img2dataset (webdataset shards under OUTPUT/images)")
    download_image_size: int = option(256, section=_S_IMAGES,
                                      help="pixels, img2dataset resize (keep_ratio: shorter side)")
    download_batch_size: int = option(10_000, section=_S_IMAGES, help="URLs per img2dataset call")
    download_threads: int = option(16, section=_S_IMAGES, help="img2dataset thread_count per call")
    download_timeout: float = option(10.0, section=_S_IMAGES, help="seconds per URL")
    report_examples: int = option(4, section=_S_REPORT, help="examples shown per reason in report.html")


def default() -> CurateConfig:
    """Caption rules and exact dedup only: no model weights needed."""
    return CurateConfig()


def laion_aesthetics(threshold: float = 6.0, weights: str | None = None, clip_weights: str | None = None) -> CurateConfig:
    """LAION-Aesthetics v2 style: ViT-L/14 image embeddings -> aesthetic MLP >= threshold (5, 6 or 6.5)."""
    return CurateConfig(clip_model="ViT-L-14", clip_weights=clip_weights, aesthetic_weights=weights,
                        aesthetic_threshold=threshold)


def datacomp_clip_b32(clip_weights: str | None = None) -> CurateConfig:
    """DataComp's CLIP-score baseline: ViT-B/32 image-text cosine >= 0.28."""
    return CurateConfig(clip_model="ViT-B-32", clip_weights=clip_weights, clip_score_threshold=0.28)


def datacomp_clip_l14_top30(clip_weights: str | None = None) -> CurateConfig:
    """DataComp's CLIP-score baseline: keep the top 30% by ViT-L/14 image-text cosine."""
    return CurateConfig(clip_model="ViT-L-14", clip_weights=clip_weights, clip_score_top_fraction=0.3)


def tiny() -> CurateConfig:
    """Every stage on, with a tiny random-weight CLIP: for tests and smoke runs, not for real data."""
    return CurateConfig(clip_model="dd-tiny-clip", clip_weights="random", kmeans_sample_size=1_000,
                        target_cluster_size=64)


PRESETS = {
    "default": default,
    "laion-aesthetics": laion_aesthetics,
    "datacomp-clip-b32": datacomp_clip_b32,
    "datacomp-clip-l14-top30": datacomp_clip_l14_top30,
    "tiny": tiny,
}


def preset(name: str) -> CurateConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown curate preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]()


def with_overrides(cfg: CurateConfig, overrides: dict[str, Any]) -> CurateConfig:
    """``dataclasses.replace`` that names unknown keys instead of raising a bare TypeError."""
    names = {f.name for f in dataclasses.fields(CurateConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown curate config key(s) {unknown}; known: {sorted(names)}")
    return dataclasses.replace(cfg, **overrides)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def validate(cfg: CurateConfig) -> CurateConfig:
    """Raise ``ValueError`` naming the first bad value; return ``cfg`` unchanged otherwise."""
    _check(cfg.min_words >= 0, f"min_words must be >= 0, got {cfg.min_words}")
    _check(cfg.max_words is None or cfg.max_words >= cfg.min_words,
           f"max_words ({cfg.max_words}) must be >= min_words ({cfg.min_words})")
    _check(cfg.min_clip_tokens >= 0, f"min_clip_tokens must be >= 0, got {cfg.min_clip_tokens}")
    _check(cfg.max_clip_tokens is None or cfg.max_clip_tokens >= cfg.min_clip_tokens,
           f"max_clip_tokens ({cfg.max_clip_tokens}) must be >= min_clip_tokens ({cfg.min_clip_tokens})")
    for name in ("max_punsafe", "max_pwatermark"):
        value = getattr(cfg, name)
        _check(value is None or 0.0 <= value <= 1.0, f"{name} is a probability in [0, 1], got {value}")
    _check(cfg.min_image_side >= 0, f"min_image_side must be >= 0, got {cfg.min_image_side}")
    _check(cfg.max_aspect_ratio is None or cfg.max_aspect_ratio >= 1.0,
           f"max_aspect_ratio is long/short side, so >= 1; got {cfg.max_aspect_ratio}")
    _check(cfg.clip_batch_size >= 1, f"clip_batch_size must be >= 1, got {cfg.clip_batch_size}")
    needs_clip = {
        "aesthetic_weights": cfg.aesthetic_weights, "aesthetic_threshold": cfg.aesthetic_threshold,
        "clip_score_threshold": cfg.clip_score_threshold, "clip_score_top_fraction": cfg.clip_score_top_fraction,
    }
    for name, value in needs_clip.items():
        _check(value is None or bool(cfg.clip_model), f"{name}={value!r} needs a CLIP model (clip_model is empty)")
    _check(not cfg.clip_model or cfg.clip_weights is not None,
           f"clip_model={cfg.clip_model!r} needs clip_weights: a local checkpoint path (nothing is downloaded) "
           "or 'random' for random weights")
    _check(cfg.aesthetic_threshold is None or cfg.aesthetic_weights is not None,
           f"aesthetic_threshold={cfg.aesthetic_threshold} needs aesthetic_weights (a local weights file)")
    _check(cfg.clip_score_threshold is None or cfg.clip_score_top_fraction is None,
           "give clip_score_threshold or clip_score_top_fraction, not both "
           f"(got {cfg.clip_score_threshold} and {cfg.clip_score_top_fraction})")
    _check(cfg.clip_score_threshold is None or -1.0 <= cfg.clip_score_threshold <= 1.0,
           f"clip_score_threshold is a cosine in [-1, 1], got {cfg.clip_score_threshold}")
    _check(cfg.clip_score_top_fraction is None or 0.0 < cfg.clip_score_top_fraction <= 1.0,
           f"clip_score_top_fraction must be in (0, 1], got {cfg.clip_score_top_fraction}")
    _check(cfg.semdedup_eps is None or 0.0 <= cfg.semdedup_eps < 2.0,
           f"semdedup_eps must be in [0, 2) (duplicates have cosine >= 1 - eps), got {cfg.semdedup_eps}")
    _check(0.0 <= cfg.semdedup_margin < 2.0, f"semdedup_margin must be in [0, 2), got {cfg.semdedup_margin}")
    _check(cfg.nsfw in NSFW_POLICIES, f"nsfw must be one of {NSFW_POLICIES}, got {cfg.nsfw!r}")
    _check(cfg.semdedup_on in DEDUP_ON, f"semdedup_on must be one of {DEDUP_ON}, got {cfg.semdedup_on!r}")
    _check(cfg.kmeans_sample_size >= 1, f"kmeans_sample_size must be >= 1, got {cfg.kmeans_sample_size}")
    _check(cfg.kmeans_clusters >= 0, f"kmeans_clusters must be >= 0 (0 = auto), got {cfg.kmeans_clusters}")
    _check(cfg.kmeans_clusters <= cfg.kmeans_sample_size,
           f"kmeans_clusters ({cfg.kmeans_clusters}) cannot exceed kmeans_sample_size ({cfg.kmeans_sample_size})")
    _check(cfg.target_cluster_size >= 1, f"target_cluster_size must be >= 1, got {cfg.target_cluster_size}")
    _check(cfg.kmeans_iterations >= 1, f"kmeans_iterations must be >= 1, got {cfg.kmeans_iterations}")
    _check(cfg.download_image_size >= 8, f"download_image_size must be >= 8 px, got {cfg.download_image_size}")
    _check(cfg.download_batch_size >= 1, f"download_batch_size must be >= 1, got {cfg.download_batch_size}")
    _check(cfg.download_threads >= 1, f"download_threads must be >= 1, got {cfg.download_threads}")
    _check(cfg.download_timeout > 0 and math.isfinite(cfg.download_timeout),
           f"download_timeout must be a positive number of seconds, got {cfg.download_timeout}")
    _check(cfg.report_examples >= 0, f"report_examples must be >= 0, got {cfg.report_examples}")
    return cfg
