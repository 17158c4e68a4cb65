"""Per-record stages of the curate job: caption normalisation, rules, exact dedup, images, scores.

Every stage takes and returns record dicts (``pipelines.curate.sources.new_record``). A record a
rule drops keeps flowing with ``stage``/``reason`` set and is skipped by later stages
(``pipelines.stages.ActiveOnly``); a record that cannot be judged leaves through the ``rejects`` output of the
stage that found the problem. Each stage counts what it did in the ``curate`` metrics namespace.
"""

from __future__ import annotations

import io

import apache_beam as beam
from apache_beam.metrics import Metrics

from core.allocator import set_allocator
from filters import captions, reasons
from filters.config import CurateConfig
from pipelines.curate.schema import reject_row
from pipelines.curate.sources import read_image_bytes, read_split
from pipelines.records import dropped, effective_aesthetic, is_active


NAMESPACE = "curate"


def _count(name: str) -> None:
    Metrics.counter(NAMESPACE, name).inc()


class ReadRecords(beam.DoFn):
    """Split -> records; counts every record read, per format. ``allocator``: the worker's
    ``core.allocator`` state, set once per worker."""

    def __init__(self, allocator: str = "default"):
        self.allocator = allocator

    def setup(self):
        set_allocator(self.allocator)

    def process(self, split):
        for record in read_split(split):
            _count("input")
            _count(f"input_{split.format}")
            yield record


def decode_or_reject(record: dict) -> tuple[str | None, dict | None]:
    """(the caption as text, None), or (None, its reject row, counted) for a reader error or an
    undecodable caption. The per-record and the batched paths share it."""
    if record.get("error"):
        reason, _, detail = record["error"].partition(": ")
        _count(f"rejected_{reason}")
        return None, reject_row(record, "read", reason, detail or None)
    text, reject = captions.decode_caption(record["caption"])
    if reject is not None:
        _count(f"rejected_{reject}")
        return None, reject_row(record, "normalise", reject)
    bad_tag = captions.nsfw_tag_problem(record.get("nsfw"))
    if bad_tag is not None:  # an unknown tag is not "safe": the --nsfw policy cannot judge it
        _count(f"rejected_{reasons.BAD_NSFW_TAG}")
        return None, reject_row(record, "normalise", reasons.BAD_NSFW_TAG, bad_tag)
    return text, None


def normalise_or_reject(record: dict) -> tuple[str | None, dict | None]:
    """``decode_or_reject``, then the caption NFKC'd with whitespace collapsed."""
    text, rejected = decode_or_reject(record)
    return (None, rejected) if rejected is not None else (captions.normalize_caption(text), None)


class NormaliseCaption(beam.DoFn):
    """Reader errors and undecodable captions to ``rejects``; the rest NFKC + whitespace."""

    def process(self, record):
        caption, rejected = normalise_or_reject(record)
        if rejected is not None:
            yield beam.pvalue.TaggedOutput("rejects", rejected)
            return
        yield {**record, "caption": caption, "stage": None, "reason": None}


class ApplyRules(beam.DoFn):
    """Length (words, CLIP tokens), NSFW tag, punsafe/pwatermark, and size where the source gives it."""

    def __init__(self, cfg: CurateConfig):
        self.cfg = cfg

    def setup(self):
        captions.clip_token_count("warm up")  # loads the BPE vocabulary once per worker

    def process(self, record):
        caption = record["caption"]
        n_tokens = captions.clip_token_count(caption)
        record = {**record, "n_words": captions.word_count(caption), "n_clip_tokens": n_tokens}
        reason = (captions.check_length(caption, n_tokens, self.cfg)
                  or captions.check_safety(record["punsafe"], record["pwatermark"], self.cfg, record.get("nsfw"))
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
    group = sorted(group, key=lambda r: captions.keep_priority(effective_aesthetic(r), r["key"]))
    out = [group[0]]
    for record in group[1:]:
        _count(f"filtered_{reasons.EXACT_DUPLICATE}")
        out.append(dropped(record, "exact_dedup", reasons.EXACT_DUPLICATE, duplicate_of=group[0]["key"]))
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
