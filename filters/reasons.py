"""Why a record left the data: every reason code the jobs write, defined once.

Each record that does not reach the output gets one *fate* and one *reason* (the manifests of the
curate and filter jobs share the columns ``fate``, ``stage``, ``reason``):

- ``filtered``: a valid record a rule decided against (a caption rule, a score threshold);
- ``duplicate``: a valid record dropped in favour of another (exact or semantic dedup);
- ``rejected``: a record that could not be read or checked (null caption, bytes that are not
  UTF-8, broken image, failed download, a damaged shard member); it goes to the rejects with
  its reason.

``input = kept + filtered + duplicate + rejected`` always holds. ``ALL`` lists every code, and
a test checks that every code the jobs emit is in it.
"""

from __future__ import annotations

# -- fates --------------------------------------------------------------------------------------
KEPT, FILTERED, DUPLICATE, REJECTED = "kept", "filtered", "duplicate", "rejected"
FATES = (KEPT, FILTERED, DUPLICATE, REJECTED)

# -- rejects: input rows and records that cannot be read ----------------------------------------
NULL_CAPTION = "null_caption"  # caption missing or null
NON_UTF8_CAPTION = "non_utf8_caption"  # caption bytes are not valid UTF-8
CAPTION_NOT_TEXT = "caption_not_text"  # caption is a number, list, ... instead of text
EMPTY_CAPTION = "empty_caption"  # caption holds only whitespace (dump input)
BAD_JSON = "bad_json"  # a .jsonl line (or a sample's json member) that is not a JSON object
BAD_KEY = "bad_key"  # key not ASCII letters, digits, '-' or '_' (webdataset splits on dots)
DUPLICATE_KEY = "duplicate_key"  # the same key twice in one input (dump input)
BAD_SEED = "bad_seed"  # an explicit seed that is not an integer in [0, 2**63 - 2**16) (dump input)
CORRUPT_TAR = "corrupt_tar"  # a webdataset shard that cannot be read past some point
DOWNLOAD_FAILED = "download_failed"  # img2dataset status other than "success" (detail: its error)
BROKEN_IMAGE = "broken_image"  # image bytes that PIL cannot decode
IMAGE_NOT_FOUND = "image_not_found"  # a COCO annotation whose image_id is not in "images"
BAD_NSFW_TAG = "bad_nsfw_tag"  # LAION's NSFW column holds a value other than NSFW, UNSURE, UNLIKELY (or null)

# -- rejects: generated samples and shards (teacher dump, filter) -------------------------------
NON_FINITE = "non_finite"  # the teacher produced NaN/Inf (shards.record)
NON_FINITE_SCORE = "non_finite_score"  # a CLIP image embedding or score is NaN/Inf
SCHEMA_VERSION = "schema_version"  # a sample json of an unsupported schema (shards.record)
CORRUPT_MEMBER = "corrupt_member"  # a sample's tar members cannot be read (shards.record, filter copy)
CHECKSUM_MISMATCH = "checksum_mismatch"  # a member's bytes differ from the index's CRC-32 (shards.record)
MISSING_MEMBER = "missing_member"  # a member the index or the json lists is absent (shards.record)
NON_FINITE_IMAGE = "non_finite_image"  # the decoded image holds NaN/Inf (shards.record, dump)
NO_REAL_IMAGE = "no_real_image"  # dump --real_images: no image in the row and no rendered truth (shards.record)
UNREADABLE_SHARD = "unreadable_shard"  # a shard the trainer's loader cannot open (shards.loader)
NO_SCORES = "no_scores"  # a shard of a scored dump whose index has no scores (filter)
CORRUPT_EMBEDDINGS = "corrupt_embeddings"  # embedding sidecar missing, or its sha256/shape wrong (filter)

# -- filtered: rules ----------------------------------------------------------------------------
TOO_FEW_WORDS = "too_few_words"
TOO_MANY_WORDS = "too_many_words"
TOO_FEW_TOKENS = "too_few_clip_tokens"
TOO_MANY_TOKENS = "too_many_clip_tokens"
UNSAFE = "punsafe_above_threshold"
WATERMARK = "pwatermark_above_threshold"
NSFW_TAG = "nsfw_tag"  # LAION's NSFW column is a tag the --nsfw policy drops (NSFW, UNSURE)
IMAGE_TOO_SMALL = "image_too_small"
ASPECT_RATIO = "aspect_ratio_too_large"
LOW_AESTHETIC = "aesthetic_below_threshold"
LOW_CLIP_SCORE = "clip_score_below_threshold"

# -- duplicate ----------------------------------------------------------------------------------
EXACT_DUPLICATE = "exact_duplicate"
SEMANTIC_DUPLICATE = "semantic_duplicate"

REJECT_REASONS = (NULL_CAPTION, NON_UTF8_CAPTION, CAPTION_NOT_TEXT, EMPTY_CAPTION, BAD_JSON, BAD_KEY, DUPLICATE_KEY,
                  BAD_SEED, CORRUPT_TAR, DOWNLOAD_FAILED, BROKEN_IMAGE, IMAGE_NOT_FOUND, BAD_NSFW_TAG, NON_FINITE,
                  NON_FINITE_SCORE, SCHEMA_VERSION, CORRUPT_MEMBER, CHECKSUM_MISMATCH, MISSING_MEMBER,
                  NON_FINITE_IMAGE, NO_REAL_IMAGE, UNREADABLE_SHARD, NO_SCORES, CORRUPT_EMBEDDINGS)
FILTER_REASONS = (TOO_FEW_WORDS, TOO_MANY_WORDS, TOO_FEW_TOKENS, TOO_MANY_TOKENS, UNSAFE, WATERMARK, NSFW_TAG,
                  IMAGE_TOO_SMALL, ASPECT_RATIO, LOW_AESTHETIC, LOW_CLIP_SCORE)
DUPLICATE_REASONS = (EXACT_DUPLICATE, SEMANTIC_DUPLICATE)
ALL = REJECT_REASONS + FILTER_REASONS + DUPLICATE_REASONS


def fate_of(reason: str) -> str:
    """The fate a reason gives (``filtered``, ``duplicate`` or ``rejected``)."""
    if reason in DUPLICATE_REASONS:
        return DUPLICATE
    if reason in FILTER_REASONS:
        return FILTERED
    if reason in REJECT_REASONS:
        return REJECTED
    raise KeyError(f"unknown reason code {reason!r}: define it in filters/reasons.py")
