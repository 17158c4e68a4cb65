"""The image-scoring models a job names: checked on the launcher, recorded in the recipe.

The curate job scores source images, the teacher dump (``--score_images PRESET``) the images it
decodes, and the filter job reads those scores back; all three name the models the same way: a
``filters.config`` preset's CLIP model plus weight paths (``ImageScoring``), checked by
``check_models`` before any worker starts.
"""

from __future__ import annotations

import dataclasses

from core.errors import UserError


def check_models(cfg) -> None:
    """Weights exist and fit together (the aesthetic MLP takes this CLIP's embedding width).

    Runs on the launcher, before any worker starts; ``UserError`` naming the bad value.
    """
    if not cfg.clip_model:
        return
    from apache_beam.io.filesystems import FileSystems

    from filters.clip_embed import RANDOM_WEIGHTS, model_embed_dim

    dim = model_embed_dim(cfg.clip_model)
    if cfg.clip_weights != RANDOM_WEIGHTS and not FileSystems.exists(cfg.clip_weights):
        raise UserError(f"clip_weights {cfg.clip_weights!r} not found")
    if cfg.aesthetic_weights is not None:
        if not FileSystems.exists(cfg.aesthetic_weights):
            raise UserError(f"aesthetic_weights {cfg.aesthetic_weights!r} not found")
        from filters.aesthetic import aesthetic_input_size

        want = aesthetic_input_size(cfg.aesthetic_weights)
        if want != dim:
            raise UserError(f"aesthetic_weights {cfg.aesthetic_weights!r} take {want}-d embeddings but "
                             f"clip_model {cfg.clip_model!r} gives {dim}-d (the LAION predictor needs ViT-L-14)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ImageScoring:
    """How a dump scores the images it decodes (``--score_images``): the curate job's models."""

    preset: str  # filters.config preset the CLIP model comes from ("tiny", "laion-aesthetics", ...)
    clip_model: str  # open_clip architecture
    clip_weights: str  # local checkpoint, or "random"
    aesthetic_weights: str | None  # LAION aesthetic predictor state dict; None = no aesthetic score
    embed_dim: int  # width of the stored image embeddings

    def curate_config(self):
        """The ``CurateConfig`` whose models these are (the filter job adds its thresholds to it)."""
        from filters import config as config_lib

        return config_lib.with_overrides(config_lib.preset(self.preset), {
            "clip_model": self.clip_model, "clip_weights": self.clip_weights,
            "aesthetic_weights": self.aesthetic_weights})


def image_scoring(preset: str, clip_weights: str | None, aesthetic_weights: str | None) -> ImageScoring:
    """``--score_images PRESET [--clip_weights P] [--aesthetic_weights P]`` -> checked ``ImageScoring``.

    The preset names a ``filters.config`` preset with a CLIP model; the weight flags override its
    (presets of real models leave weights unset: nothing is downloaded). ``UserError`` naming the value.
    """
    from filters import config as config_lib
    from filters.clip_embed import model_embed_dim

    cfg = config_lib.preset(preset)
    if not cfg.clip_model:
        raise UserError(f"--score_images {preset!r}: that preset has no CLIP model; use one of "
                         + ", ".join(n for n in config_lib.PRESETS if config_lib.preset(n).clip_model))
    overrides = {k: v for k, v in (("clip_weights", clip_weights), ("aesthetic_weights", aesthetic_weights)) if v}
    cfg = config_lib.with_overrides(cfg, overrides)
    if cfg.clip_weights is None:
        raise UserError(f"--score_images {preset!r} needs --clip_weights: a local open_clip checkpoint for "
                         f"{cfg.clip_model} (nothing is downloaded)")
    check_models(cfg)
    return ImageScoring(preset=preset, clip_model=cfg.clip_model, clip_weights=cfg.clip_weights,
                        aesthetic_weights=cfg.aesthetic_weights, embed_dim=model_embed_dim(cfg.clip_model))


