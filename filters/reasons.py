"""Why a record left the curated set: the reason vocabulary shared by filters, job and report.

Two kinds (ARCHITECTURE.md, "Bad input"):

- a *drop* (``filtered``): a valid record a rule decided against; it stays in the manifest with
  ``kept = False`` and ``drop_reason`` set;
- a *reject*: a record that could not be read or checked (null caption, bytes that are not UTF-8,
  broken image, failed download); it goes to ``rejects.parquet`` with its reason.

``input = kept + filtered + rejected`` always holds.
"""

from __future__ import annotations

# -- rejects: bad records ---------------------------------------------------------------------
NULL_CAPTION = "null_caption"  # caption missing or null
NON_UTF8_CAPTION = "non_utf8_caption"  # caption bytes are not valid UTF-8
CAPTION_NOT_TEXT = "caption_not_text"  # caption is a number, list, ... instead of text
BAD_JSON = "bad_json"  # a .jsonl line that is not a JSON object
CORRUPT_TAR = "corrupt_tar"  # a webdataset shard that cannot be read past some point
DOWNLOAD_FAILED = "download_failed"  # img2dataset status other than "success" (detail: its error)
BROKEN_IMAGE = "broken_image"  # image bytes that PIL cannot decode

# -- drops: rules -----------------------------------------------------------------------------
TOO_FEW_WORDS = "too_few_words"
TOO_MANY_WORDS = "too_many_words"
TOO_FEW_TOKENS = "too_few_clip_tokens"
TOO_MANY_TOKENS = "too_many_clip_tokens"
UNSAFE = "punsafe_above_threshold"
WATERMARK = "pwatermark_above_threshold"
IMAGE_TOO_SMALL = "image_too_small"
ASPECT_RATIO = "aspect_ratio_too_large"
EXACT_DUPLICATE = "exact_duplicate"
LOW_AESTHETIC = "aesthetic_below_threshold"
LOW_CLIP_SCORE = "clip_score_below_threshold"
SEMANTIC_DUPLICATE = "semantic_duplicate"

REJECT_REASONS = (NULL_CAPTION, NON_UTF8_CAPTION, CAPTION_NOT_TEXT, BAD_JSON, CORRUPT_TAR,
                  DOWNLOAD_FAILED, BROKEN_IMAGE)
DROP_REASONS = (TOO_FEW_WORDS, TOO_MANY_WORDS, TOO_FEW_TOKENS, TOO_MANY_TOKENS, UNSAFE, WATERMARK,
                IMAGE_TOO_SMALL, ASPECT_RATIO, EXACT_DUPLICATE, LOW_AESTHETIC, LOW_CLIP_SCORE,
                SEMANTIC_DUPLICATE)
