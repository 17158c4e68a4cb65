"""Stages the curate and filter jobs share: run a stage on active records only, and the score thresholds.

Both work on record dicts (``pipelines.records``) and count what they drop in the ``curate``
metrics namespace (the filter job reads its own counts from its manifest).
"""

from __future__ import annotations

import math

import apache_beam as beam
from apache_beam.metrics import Metrics

from filters import reasons
from filters.config import CurateConfig
from pipelines.records import dropped, effective_aesthetic, effective_clip_score, is_active


def _count(name: str) -> None:
    Metrics.counter("curate", name).inc()


def _is_inactive(record: dict) -> bool:
    return not is_active(record)


class ActiveOnly(beam.PTransform):
    """Apply ``inner`` to records no rule has dropped yet; pass the dropped ones around it.

    Two ``Filter``s rather than one ``Partition``: Beam's Dask runner gives every element to each
    output of a ``Partition`` (the filter job, which runs on Dask in its tests, counted records twice).
    """

    def __init__(self, inner: beam.PTransform):
        super().__init__()
        self.inner = inner

    def expand(self, records):
        active = records | "SelectActive" >> beam.Filter(is_active)
        inactive = records | "SelectInactive" >> beam.Filter(_is_inactive)
        return (active | "Stage" >> self.inner, inactive) | "Rejoin" >> beam.Flatten()


def clip_scores(record: dict):
    """The active record's effective CLIP score, as a float (none if dropped or unscored)."""
    score = effective_clip_score(record) if is_active(record) else None
    if score is not None:
        yield float(score)


def top_fraction_cutoff(quantiles: list[float], fraction: float, n_scores: int) -> float | None:
    """The score at descending rank ``ceil(fraction * n)``, read from ``ApproximateQuantiles``
    output (evenly spaced quantiles, min to max); exact while Beam's sketch holds every score,
    within one quantile step (0.1% of ranks) beyond. ``None`` if no score was seen."""
    if not quantiles or n_scores == 0:
        return None
    k = max(1, math.ceil(fraction * n_scores))
    step = round((n_scores - k) / max(1, n_scores - 1) * (len(quantiles) - 1))
    return float(quantiles[step])


def apply_score_rules(record: dict, cfg: CurateConfig, clip_cutoff: float | None) -> dict:
    """Aesthetic threshold, then CLIP-score threshold (fixed, or the top-fraction cutoff).

    A score the record lacks (no image, no source score) is not judged, nor is a dropped record.
    """
    if not is_active(record):
        return record
    aesthetic = effective_aesthetic(record)
    if cfg.aesthetic_threshold is not None and aesthetic is not None and aesthetic < cfg.aesthetic_threshold:
        _count(f"filtered_{reasons.LOW_AESTHETIC}")
        return dropped(record, "aesthetic", reasons.LOW_AESTHETIC)
    threshold = cfg.clip_score_threshold if cfg.clip_score_threshold is not None else clip_cutoff
    score = effective_clip_score(record)
    if threshold is not None and score is not None and score < threshold:
        _count(f"filtered_{reasons.LOW_CLIP_SCORE}")
        return dropped(record, "clip_score", reasons.LOW_CLIP_SCORE)
    return record


class FilterScores(beam.PTransform):
    """Aesthetic and CLIP-score thresholds; the top-fraction cutoff comes from Beam's
    ``ApproximateQuantiles`` (1,001 quantiles: 0.1% rank resolution) so no worker holds all scores.

    Output: (elements, cutoff) where cutoff is a singleton PCollection (None without a top fraction).
    The elements are records; another element type (the filter job's (shard, records)) names how to
    read its CLIP scores (``scores_of``) and how to apply the rules to it (``apply(element, cfg, cutoff)``).
    """

    N_QUANTILES = 1001

    def __init__(self, cfg: CurateConfig, *, scores_of=clip_scores, apply=apply_score_rules):
        super().__init__()
        self.cfg, self.scores_of, self.apply = cfg, scores_of, apply

    def expand(self, elements):
        fraction = self.cfg.clip_score_top_fraction
        if fraction is None:
            cutoff = elements.pipeline | "NoCutoff" >> beam.Create([None])
        else:
            scores = elements | "ClipScores" >> beam.FlatMap(self.scores_of)
            n_scores = scores | "CountScores" >> beam.combiners.Count.Globally()
            cutoff = (scores
                      | "ClipScoreQuantiles" >> beam.ApproximateQuantiles.Globally(self.N_QUANTILES)
                      | "TopFractionCutoff" >> beam.Map(top_fraction_cutoff, fraction, beam.pvalue.AsSingleton(n_scores)))
        filtered = elements | "ApplyThresholds" >> beam.Map(self.apply, self.cfg, beam.pvalue.AsSingleton(cutoff))
        return filtered, cutoff
