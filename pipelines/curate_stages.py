"""Per-record stages of the curate job: caption normalisation, rules, exact dedup, images, scores.

Every stage takes and returns record dicts (``pipelines.curate_sources.new_record``). A record a
rule drops keeps flowing with ``drop_stage``/``drop_reason`` set and is skipped by later stages
(``ActiveOnly``); a record that cannot be judged leaves through the ``rejects`` output of the
stage that found the problem. Each stage counts what it did in the ``curate`` metrics namespace.
"""

from __future__ import annotations

import io
import math

import apache_beam as beam
from apache_beam.metrics import Metrics

from filters import captions, reasons
from filters.config import CurateConfig
from pipelines.curate_schema import dropped, effective_aesthetic, effective_clip_score, is_active, reject_row
from pipelines.curate_sources import read_image_bytes, read_split


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


class ReadRecords(beam.DoFn):
    """Split -> records; counts every record read, per format."""

    def process(self, split):
        for record in read_split(split):
            _count("input")
            _count(f"input_{split.format}")
            yield record


class NormaliseCaption(beam.DoFn):
    """Reader errors and undecodable captions to ``rejects``; the rest NFKC + whitespace."""

    def process(self, record):
        if record.get("error"):
            reason, _, detail = record["error"].partition(": ")
            _count(f"rejected_{reason}")
            yield beam.pvalue.TaggedOutput("rejects", reject_row(record, "read", reason, detail or None))
            return
        text, reject = captions.decode_caption(record["caption"])
        if reject is not None:
            _count(f"rejected_{reject}")
            yield beam.pvalue.TaggedOutput("rejects", reject_row(record, "normalise", reject))
            return
        yield {**record, "caption": captions.normalize_caption(text), "drop_stage": None, "drop_reason": None}


class ApplyRules(beam.DoFn):
    """Length (words, CLIP tokens), punsafe/pwatermark, and size where the source gives it."""

    def __init__(self, cfg: CurateConfig):
        self.cfg = cfg

    def setup(self):
        captions.clip_token_count("warm up")  # loads the BPE vocabulary once per worker

    def process(self, record):
        caption = record["caption"]
        n_tokens = captions.clip_token_count(caption)
        record = {**record, "n_words": captions.word_count(caption), "n_clip_tokens": n_tokens}
        reason = (captions.check_length(caption, n_tokens, self.cfg)
                  or captions.check_safety(record["punsafe"], record["pwatermark"], self.cfg)
                  or captions.check_size(record["width"], record["height"], self.cfg))
        if reason is not None:
            _count(f"filtered_{reason}")
            record = dropped(record, "rules", reason)
        yield record


def _caption_key(record: dict) -> tuple[str, dict]:
    return record["caption"], record


def resolve_exact_duplicates(keyed) -> list[dict]:
    """(caption, records) -> the same records, all but the priority winner marked duplicates."""
    _, group = keyed
    group = sorted(group, key=lambda r: captions.keep_priority(effective_aesthetic(r), r["id"]))
    out = [group[0]]
    for record in group[1:]:
        _count(f"filtered_{reasons.EXACT_DUPLICATE}")
        out.append(dropped(record, "exact_dedup", reasons.EXACT_DUPLICATE, duplicate_of=group[0]["id"]))
    if len(group) > 1:
        out[0] = {**group[0], "n_duplicates": len(group) - 1}
    return out


class DropExactDuplicates(beam.PTransform):
    """GroupByKey on the normalised caption; one record kept per caption."""

    def expand(self, records):
        return (records
                | "KeyByCaption" >> beam.Map(_caption_key)
                | "GroupByCaption" >> beam.GroupByKey()
                | "KeepOnePerCaption" >> beam.FlatMap(resolve_exact_duplicates))


class LoadImage(beam.DoFn):
    """Read and decode the image a record points at; broken ones are rejects, size rules apply.

    Records without an image pass through. The bytes ride along (fused, no shuffle) to the CLIP
    stage, which drops them after embedding.
    """

    def __init__(self, cfg: CurateConfig):
        self.cfg = cfg

    def process(self, record):
        if record.get("image_ref") is None or not is_active(record):
            yield record
            return
        from PIL import Image

        try:
            data = read_image_bytes(record["image_ref"])
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                size = im.size
        # PIL raises many types for bad bytes (OSError, SyntaxError, ValueError, DecompressionBombError);
        # every one means this record's image is unusable, which is a reject, not a job failure.
        except Exception as err:  # noqa: BLE001
            _count(f"rejected_{reasons.BROKEN_IMAGE}")
            yield beam.pvalue.TaggedOutput("rejects", reject_row(record, "images", reasons.BROKEN_IMAGE,
                                                                 f"{type(err).__name__}: {err}"))
            return
        width, height = record["width"] or size[0], record["height"] or size[1]
        record = {**record, "width": width, "height": height, "image_bytes": data}
        reason = captions.check_size(width, height, self.cfg)
        if reason is not None:
            _count(f"filtered_{reason}")
            record = dropped({**record, "image_bytes": None}, "images", reason)
        yield record


def _effective_clip(record: dict):
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

    Output: (records, cutoff) where cutoff is a singleton PCollection (None without a top fraction).
    """

    N_QUANTILES = 1001

    def __init__(self, cfg: CurateConfig):
        super().__init__()
        self.cfg = cfg

    def expand(self, records):
        fraction = self.cfg.clip_score_top_fraction
        if fraction is None:
            cutoff = records.pipeline | "NoCutoff" >> beam.Create([None])
        else:
            scores = records | "ClipScores" >> beam.FlatMap(_effective_clip)
            n_scores = scores | "CountScores" >> beam.combiners.Count.Globally()
            cutoff = (scores
                      | "ClipScoreQuantiles" >> beam.ApproximateQuantiles.Globally(self.N_QUANTILES)
                      | "TopFractionCutoff" >> beam.Map(top_fraction_cutoff, fraction, beam.pvalue.AsSingleton(n_scores)))
        filtered = records | "ApplyThresholds" >> beam.Map(apply_score_rules, self.cfg,
                                                           beam.pvalue.AsSingleton(cutoff))
        return filtered, cutoff
