"""The curate job's outputs: manifest and rejects schemas, stage names.

``OUTPUT/manifest.parquet`` (``MANIFEST_SCHEMA``): one row per valid input record, with its
``fate`` (``kept``, ``filtered`` or ``duplicate``), and for the others the ``stage`` and ``reason``
(``filters.reasons``) that set it aside: the same three columns as the filter job's manifest.
The teacher dump job reads ``key``, ``caption`` and ``fate`` and generates the ``kept`` rows only;
the other columns say where a row came from and every score it got.
``OUTPUT/rejects.parquet`` (``REJECTS_SCHEMA``): one row per record that could not be judged
(``fate`` ``rejected``). Both are sorted by ``key``. ``len(manifest) + len(rejects)`` equals the
number of input records.
"""

from __future__ import annotations

import math

import pyarrow as pa

from filters import reasons
from pipelines.records import has_image

# Stages in pipeline order; a dropped or rejected record names the stage that set it aside.
STAGES = ("read", "normalise", "rules", "exact_dedup", "download", "images", "aesthetic", "clip_score", "semdedup")

MANIFEST_SCHEMA = pa.schema([
    ("key", pa.string()),  # unique, ASCII, no dots: <format>-<file tag>-<row or native key>
    ("caption", pa.string()),  # NFKC-normalised, whitespace collapsed
    ("fate", pa.string()),  # kept | filtered | duplicate (filters.reasons.FATES); the dump generates "kept"
    ("stage", pa.string()),  # one of STAGES, null when kept
    ("reason", pa.string()),  # one of filters.reasons.FILTER_REASONS or DUPLICATE_REASONS, null when kept
    ("source", pa.string()),  # laion | coco | txt | jsonl | wds
    ("input", pa.string()),  # the file the record came from
    ("source_id", pa.string()),  # the source's own id (SAMPLE_ID, COCO annotation id, line, key)
    ("url", pa.string()),
    ("width", pa.int64()),  # pixels, of the original image where known
    ("height", pa.int64()),
    ("has_image", pa.bool_()),  # an image was read and embedded
    ("n_words", pa.int32()),
    ("n_clip_tokens", pa.int32()),  # CLIP BPE tokens, without start/end
    ("punsafe", pa.float64()),  # from the source (LAION), null if absent
    ("pwatermark", pa.float64()),
    ("nsfw", pa.string()),  # LAION's NSFW tag
    ("laion_similarity", pa.float64()),  # LAION's CLIP ViT-B/32 image-text cosine
    ("laion_aesthetic", pa.float64()),  # LAION-Aesthetics' AESTHETIC_SCORE
    ("clip_score", pa.float32()),  # image-text cosine from this job's CLIP model
    ("aesthetic_score", pa.float32()),  # aesthetic predictor on this job's image embedding
    ("dedup_on", pa.string()),  # "image" | "text": the embedding SemDeDup compared
    ("cluster_id", pa.int64()),  # k-means cluster (SemDeDup)
    ("duplicate_of", pa.string()),  # key of the kept record this one duplicates (exact or semantic)
    ("duplicate_similarity", pa.float32()),  # cosine to that record (semantic dedup)
    ("n_duplicates", pa.int64()),  # on a kept record: how many records were dropped as its duplicates
])

REJECTS_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("fate", pa.string()),  # always "rejected"
    ("stage", pa.string()),
    ("reason", pa.string()),  # one of filters.reasons.REJECT_REASONS
    ("detail", pa.string()),  # e.g. img2dataset's status and error_message
    ("source", pa.string()),
    ("input", pa.string()),
    ("source_id", pa.string()),
    ("url", pa.string()),
    ("raw_caption", pa.string()),  # repr() of what the source held, truncated
])


def reject_row(record: dict, stage: str, reason: str, detail: str | None = None) -> dict:
    raw = record.get("caption")
    return {"key": record.get("key"), "fate": reasons.REJECTED, "stage": stage, "reason": reason, "detail": detail,
            "source": record.get("source"), "input": record.get("input"), "source_id": record.get("source_id"),
            "url": record.get("url"), "raw_caption": None if raw is None else repr(raw)[:300]}


def _clean(value, kind):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return kind(value)


_KINDS = {f.name: (int if pa.types.is_integer(f.type) else float if pa.types.is_floating(f.type)
                  else bool if pa.types.is_boolean(f.type) else str) for f in MANIFEST_SCHEMA}


def manifest_row(record: dict) -> dict:
    """The manifest columns of a record (embeddings and image bytes left out)."""
    row = {name: _clean(record.get(name), kind) for name, kind in _KINDS.items()}
    row["fate"] = reasons.KEPT if record.get("reason") is None else reasons.fate_of(record["reason"])
    row["has_image"] = has_image(record)
    return row
