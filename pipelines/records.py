"""The record dicts that flow through the scoring and dedup stages, shared by the curate and filter jobs.

A record is a plain dict keyed by field name: ``key`` (its identifier), its scores and embeddings,
and ``stage``/``reason``, which stay ``None`` while no stage has set it aside. A record a
stage drops keeps flowing with both set (``dropped``), and later stages skip it (``is_active``).
"""

from __future__ import annotations

EMBEDDING_FIELDS = {"text": "text_embedding", "image": "image_embedding"}


def is_active(record: dict) -> bool:
    return record.get("reason") is None


def has_image(record: dict) -> bool:
    """An image was read and embedded: its ``image_embedding``, or what a record shipped
    ``without_vectors`` (``pipelines.dedup``) kept of it."""
    return record["has_image"] if "has_image" in record else record.get("image_embedding") is not None


def dropped(record: dict, stage: str, reason: str, **fields) -> dict:
    """A copy of ``record`` set aside by ``stage`` for ``reason`` (it stays in the manifest)."""
    return {**record, **fields, "stage": stage, "reason": reason}


def effective_aesthetic(record: dict) -> float | None:
    """This job's aesthetic score where an image was scored, else the source's (LAION-Aesthetics)."""
    own = record.get("aesthetic_score")
    return own if own is not None else record.get("laion_aesthetic")


def effective_clip_score(record: dict) -> float | None:
    """This job's image-text cosine where an image was embedded, else the source's (LAION similarity)."""
    own = record.get("clip_score")
    return own if own is not None else record.get("laion_similarity")
