"""Caption rules as pure functions: decoding, normalisation, length, safety and size checks.

Each ``check_*`` returns ``None`` when the record passes, or the reason (``filters.reasons``) of
the first rule it fails, in a fixed order, so a record carries exactly one reason.

    text, reject = decode_caption(raw)            # None/bytes/str -> (str, None) or (None, reason)
    caption = normalize_caption(text)             # NFKC, controls removed, whitespace collapsed
    reason = (check_length(caption, clip_token_count(caption), cfg)
              or check_safety(punsafe, pwatermark, cfg, nsfw) or check_size(width, height, cfg))
"""

from __future__ import annotations

import functools
import math
import unicodedata

from filters import reasons
from filters.config import NSFW_DROPS, CurateConfig


def decode_caption(raw: object) -> tuple[str | None, str | None]:
    """Turn a source's caption value into text, or say why it cannot be one.

    Returns ``(text, None)`` or ``(None, reject_reason)``. Bytes must be strict UTF-8; a ``str``
    holding lone surrogates (what ``errors="surrogateescape"`` makes of bad bytes) is not text
    either. Float NaN is how pandas spells a null, so it counts as null.
    """
    if raw is None or (isinstance(raw, float) and math.isnan(raw)):
        return None, reasons.NULL_CAPTION
    if isinstance(raw, (bytes, bytearray, memoryview)):
        try:
            return bytes(raw).decode("utf-8"), None
        except UnicodeDecodeError:
            return None, reasons.NON_UTF8_CAPTION
    if isinstance(raw, str):
        try:
            raw.encode("utf-8")
        except UnicodeEncodeError:
            return None, reasons.NON_UTF8_CAPTION
        return raw, None
    return None, reasons.CAPTION_NOT_TEXT


def normalize_caption(text: str) -> str:
    """NFKC, control characters to spaces, runs of whitespace to one space, stripped.

    NFKC folds compatibility forms (full-width letters, ligatures, non-breaking spaces) so that
    visually equal captions compare equal for exact dedup; ``str.split()`` splits on every Unicode
    whitespace character.
    """
    text = unicodedata.normalize("NFKC", text)
    text = "".join(" " if unicodedata.category(ch) == "Cc" else ch for ch in text)
    return " ".join(text.split())


def word_count(caption: str) -> int:
    return len(caption.split())


@functools.lru_cache(maxsize=1)
def _clip_bpe():
    # open_clip's SimpleTokenizer is OpenAI CLIP's byte-level BPE (the one SD's text encoders use);
    # building it reads the bundled vocabulary once per process.
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def clip_token_count(caption: str) -> int:
    """CLIP BPE tokens in ``caption``, not counting the start/end tokens (SD's context holds 75)."""
    return len(_clip_bpe().encode(caption))


WORD_CACHE_SIZE = 1 << 18  # distinct words whose token counts ``clip_token_counts`` keeps (cleared when full)
WHOLE_OVER = 100_000  # characters: ``clip_token_counts`` counts a longer caption whole (ftfy cleans in 1M-character pieces)
_word_tokens: dict[str, int] = {}


def _word_token_count(word: str) -> int:
    n = _word_tokens.get(word)
    if n is None:
        n = clip_token_count(word)
        if len(word) <= 64:  # a longer word is rare: not worth its memory
            if len(_word_tokens) >= WORD_CACHE_SIZE:
                _word_tokens.clear()
            _word_tokens[word] = n
    return n


def reset_token_caches() -> None:
    """Forget the tokenizer (with open_clip's per-word BPE cache) and ``clip_token_counts``' word
    counts: what a fresh worker starts from (benchmarks start every timed side from it)."""
    _clip_bpe.cache_clear()
    _word_tokens.clear()


def clip_token_counts(caption):
    """``clip_token_count`` of every caption in a pyarrow string Array -> int32 Array.

    For a caption of printable ASCII without ``&`` (what ``normalize_caption`` makes of most
    captions) the count is the sum of its space-separated words' counts: open_clip's cleaning
    (ftfy, HTML unescape, whitespace, lower case) changes nothing in such text but its case, and no
    piece of its split pattern spans a space, so the BPE sees the same pieces word by word. The
    batch is split into words in ``pyarrow.compute``, each distinct word is counted once (and
    remembered across batches), and the counts are summed per caption. Other captions (non-ASCII,
    HTML entities, control characters, whose cleaning ftfy may do differently on a whole caption
    than on its words, and any over ``WHOLE_OVER`` characters) are counted whole, once per
    distinct caption.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    caption = pa.array(caption, pa.string()) if not isinstance(caption, (pa.Array, pa.ChunkedArray)) else caption
    if isinstance(caption, pa.ChunkedArray):
        caption = caption.combine_chunks()
    n = len(caption)
    if caption.null_count:
        raise ValueError("clip_token_counts: captions must not be null")
    whole = pc.or_(pc.or_(pc.invert(pc.string_is_ascii(caption)), pc.match_substring_regex(caption, r"[\x00-\x1f\x7f&]")),
                   pc.greater(pc.utf8_length(caption), WHOLE_OVER)).to_numpy(zero_copy_only=False)
    counts = np.zeros(n, np.int32)
    by_word = np.flatnonzero(~whole)
    if len(by_word):
        words = pc.split_pattern(caption if len(by_word) == n else pc.take(caption, pa.array(by_word)), " ")
        flat = pc.list_flatten(words).dictionary_encode()
        per_word = np.fromiter(map(_word_token_count, flat.dictionary.to_pylist()), np.int64, len(flat.dictionary))
        counts[by_word] = np.bincount(pc.list_parent_indices(words).to_numpy(), weights=per_word[flat.indices.to_numpy()],
                                      minlength=len(by_word))
    other = np.flatnonzero(whole)
    if len(other):
        found = {}
        for i, text in zip(other.tolist(), pc.take(caption, pa.array(other)).to_pylist()):
            if text not in found:
                found[text] = clip_token_count(text)
            counts[i] = found[text]
    return pa.array(counts, pa.int32())


def check_length(caption: str, n_tokens: int, cfg: CurateConfig) -> str | None:
    """Word bounds then CLIP-token bounds, all inclusive."""
    n_words = word_count(caption)
    if n_words < cfg.min_words:
        return reasons.TOO_FEW_WORDS
    if cfg.max_words is not None and n_words > cfg.max_words:
        return reasons.TOO_MANY_WORDS
    if n_tokens < cfg.min_clip_tokens:
        return reasons.TOO_FEW_TOKENS
    if cfg.max_clip_tokens is not None and n_tokens > cfg.max_clip_tokens:
        return reasons.TOO_MANY_TOKENS
    return None


def _known(value: float | None) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


NSFW_TAGS = ("NSFW", "UNSURE", "UNLIKELY")  # the values of LAION's NSFW column (null: unknown)


def nsfw_tag_problem(nsfw) -> str | None:
    """Why a LAION ``NSFW`` value is none of ``NSFW_TAGS`` (None when it is one, or null/empty): such
    a record is rejected, never kept as safe by a policy that only drops the tags it knows."""
    if nsfw is None or (isinstance(nsfw, float) and math.isnan(nsfw)):
        return None
    if isinstance(nsfw, str) and nsfw.strip().upper() in NSFW_TAGS + ("",):
        return None
    return f"NSFW {nsfw!r} is none of {', '.join(NSFW_TAGS)}"


def check_safety(punsafe: float | None, pwatermark: float | None, cfg: CurateConfig, nsfw: str | None = None) -> str | None:
    """LAION's per-sample probabilities (drop when strictly above the threshold) and its ``NSFW``
    tag (``NSFW`` / ``UNSURE`` / ``UNLIKELY``, dropped as ``cfg.nsfw`` says). Unknown passes."""
    if isinstance(nsfw, str) and nsfw.strip().upper() in NSFW_DROPS[cfg.nsfw]:
        return reasons.NSFW_TAG
    if cfg.max_punsafe is not None and _known(punsafe) and punsafe > cfg.max_punsafe:
        return reasons.UNSAFE
    if cfg.max_pwatermark is not None and _known(pwatermark) and pwatermark > cfg.max_pwatermark:
        return reasons.WATERMARK
    return None


def check_size(width: int | None, height: int | None, cfg: CurateConfig) -> str | None:
    """Minimum shorter side and maximum long/short ratio, where both sides are known and positive."""
    if not (_known(width) and _known(height)) or width <= 0 or height <= 0:
        return None
    short, long_ = min(width, height), max(width, height)
    if short < cfg.min_image_side:
        return reasons.IMAGE_TOO_SMALL
    if cfg.max_aspect_ratio is not None and long_ / short > cfg.max_aspect_ratio:
        return reasons.ASPECT_RATIO
    return None


def keep_priority(aesthetic: float | None, record_id: str) -> tuple[float, str]:
    """Sort key of the member a duplicate group keeps: highest aesthetic score, then smallest id.

    Unknown scores rank below every known one. Used by exact and semantic dedup alike.
    """
    score = aesthetic if _known(aesthetic) else -math.inf
    return (-score, record_id)


RULE_COLUMNS = ("caption", "n_clip_tokens", "punsafe", "pwatermark", "nsfw", "width", "height")


def check_batch(batch, cfg: CurateConfig):
    """``check_length``, ``check_safety`` and ``check_size`` over a pyarrow Table or RecordBatch of
    normalised captions (columns ``RULE_COLUMNS``; ``n_words`` too where counted already) -> a string
    Array: each row's first failing reason, in the per-record order, or null where every rule passes.
    Vectorised with ``pyarrow.compute``; token counts are an input (BPE runs per caption)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    col = batch.column
    caption = col("caption")
    if "n_words" in batch.schema.names:  # counted with str.split(), as word_count does
        n_words = col("n_words")
    else:
        n_words = pc.if_else(pc.equal(pc.utf8_length(caption), 0), 0,
                             pc.list_value_length(pc.utf8_split_whitespace(caption)))
    n_tokens = col("n_clip_tokens")

    def known(name):  # null and NaN are unknown: the rule passes
        values = pc.cast(col(name), pa.float64())
        return pc.and_(pc.is_valid(values), pc.invert(pc.is_nan(pc.fill_null(values, 0.0)))), values

    rules = [(pc.less(n_words, cfg.min_words), reasons.TOO_FEW_WORDS)]
    if cfg.max_words is not None:
        rules.append((pc.greater(n_words, cfg.max_words), reasons.TOO_MANY_WORDS))
    rules.append((pc.less(n_tokens, cfg.min_clip_tokens), reasons.TOO_FEW_TOKENS))
    if cfg.max_clip_tokens is not None:
        rules.append((pc.greater(n_tokens, cfg.max_clip_tokens), reasons.TOO_MANY_TOKENS))
    tag = pc.utf8_upper(pc.utf8_trim_whitespace(pc.cast(col("nsfw"), pa.string())))
    rules.append((pc.is_in(tag, pa.array(sorted(NSFW_DROPS[cfg.nsfw]), pa.string())), reasons.NSFW_TAG))
    for name, limit, reason in (("punsafe", cfg.max_punsafe, reasons.UNSAFE),
                                ("pwatermark", cfg.max_pwatermark, reasons.WATERMARK)):
        if limit is not None:
            ok, values = known(name)
            rules.append((pc.and_(ok, pc.greater(values, limit)), reason))
    (w_ok, w), (h_ok, h) = known("width"), known("height")
    sized = pc.and_(pc.and_(w_ok, h_ok), pc.and_(pc.greater(w, 0), pc.greater(h, 0)))
    short, long_ = pc.min_element_wise(w, h), pc.max_element_wise(w, h)
    rules.append((pc.and_(sized, pc.less(short, cfg.min_image_side)), reasons.IMAGE_TOO_SMALL))
    if cfg.max_aspect_ratio is not None:
        rules.append((pc.and_(sized, pc.greater(pc.divide(long_, short), cfg.max_aspect_ratio)), reasons.ASPECT_RATIO))
    out = pa.nulls(len(caption), pa.string())
    for mask, reason in reversed(rules):  # the first rule in order wins: apply it last
        out = pc.if_else(pc.fill_null(mask, False), pa.scalar(reason, pa.string()), out)
    return out
