"""Caption rules on planted cases: decoding, NFKC/whitespace, word and CLIP-token bounds, safety,
size, and the dedup keep rule."""

import math

import pytest

from filters import reasons
from filters.captions import (check_batch, check_length, check_safety, check_size, clip_token_count, clip_token_counts,
                              decode_caption,
                              keep_priority, normalize_caption, word_count)
from filters.config import CurateConfig, preset, validate, with_overrides


@pytest.mark.parametrize("raw, expected", [
    (None, (None, reasons.NULL_CAPTION)),
    (float("nan"), (None, reasons.NULL_CAPTION)),
    (b"\xff\xfe not utf8", (None, reasons.NON_UTF8_CAPTION)),
    ("bad \udcff surrogate", (None, reasons.NON_UTF8_CAPTION)),
    (42, (None, reasons.CAPTION_NOT_TEXT)),
    (["a", "list"], (None, reasons.CAPTION_NOT_TEXT)),
    ("caf\u00e9".encode("utf-8"), ("caf\u00e9", None)),
    ("plain text", ("plain text", None)),
])
def test_decode_caption(raw, expected):
    assert decode_caption(raw) == expected


def test_normalize_caption_nfkc_and_whitespace():
    # full-width letters, ligature, no-break space, tabs/newlines, a control character, ideographic space
    raw = "  \uff21\uff22\uff23\u00a0\ufb01ne\tday\n\x07end\u3000 "
    assert normalize_caption(raw) == "ABC fine day end"
    assert normalize_caption("e\u0301") == "\u00e9"  # composed form
    assert normalize_caption(" \t\n ") == ""


def test_word_and_token_counts():
    assert word_count("a red  bicycle") == 3
    # CLIP BPE: common words are one token each; punctuation is its own token
    assert clip_token_count("a red bicycle") == 3
    assert clip_token_count("a red bicycle.") == 4
    assert clip_token_count("") == 0


def test_batch_token_counts_equal_the_per_caption_count():
    """Word by word for printable ASCII captions without '&', whole otherwise: the same count as
    open_clip's encode of the whole caption, on fuzzed ASCII (every printable character, so
    apostrophes, digits, punctuation, '<...>' and case meet inside words), HTML entities, non-ASCII
    text, and captions no normalisation has seen (escape sequences, tabs, one of 120,000 characters)."""
    import random
    import string

    import pyarrow as pa

    rng = random.Random(0)
    alphabet = string.printable.replace("&", "") + "&"  # '&' rarely: those captions are counted whole
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(3000)]
    texts += ["", "a red bicycle.", "dog's ball 3.5kg!!", "I'LL  go", "<start_of_text>hi", "a &amp; b", "a&b",
              "caf\u00e9 au lait", "\u00a0nbsp", "x" * 200, "1234567", "don't'll'sx", "a red bicycle."]
    raw = ["red \x1b[31mcar", "tab\there  two", "a " * 60_000 + "\x1b[31m"]  # not normalised: counted whole
    caps = [normalize_caption(t) for t in texts] + raw
    want = [clip_token_count(c) for c in caps]
    assert clip_token_counts(pa.array(caps)).to_pylist() == want
    assert clip_token_counts(pa.array(caps)).to_pylist() == want  # again, from the word cache
    assert clip_token_counts(pa.chunked_array([caps[:10], caps[10:]])).to_pylist() == want
    assert clip_token_counts(pa.array([], pa.string())).to_pylist() == []
    with pytest.raises(ValueError, match="null"):
        clip_token_counts(pa.array(["a", None]))


CFG = CurateConfig(min_words=2, max_words=5, min_clip_tokens=2, max_clip_tokens=6)


@pytest.mark.parametrize("caption, expected", [
    ("cat", reasons.TOO_FEW_WORDS),
    ("one two three four five six", reasons.TOO_MANY_WORDS),
    ("a b", None),
    ("supercalifragilisticexpialidocious antidisestablishmentarianism", reasons.TOO_MANY_TOKENS),
    ("a red bicycle", None),
])
def test_check_length(caption, expected):
    assert check_length(caption, clip_token_count(caption), CFG) == expected


def test_check_length_min_tokens():
    cfg = CurateConfig(min_words=0, min_clip_tokens=1)
    assert check_length("", 0, cfg) == reasons.TOO_FEW_TOKENS


def test_check_safety_thresholds_are_strict_and_unknown_passes():
    cfg = CurateConfig(max_punsafe=0.5, max_pwatermark=0.8)
    assert check_safety(0.51, 0.0, cfg) == reasons.UNSAFE
    assert check_safety(0.5, 0.0, cfg) is None  # equal to the threshold passes
    assert check_safety(0.1, 0.81, cfg) == reasons.WATERMARK
    assert check_safety(None, float("nan"), cfg) is None
    assert check_safety(0.99, 0.99, CurateConfig(max_punsafe=None, max_pwatermark=None)) is None


@pytest.mark.parametrize("policy,dropped", [("drop-nsfw", {"NSFW"}), ("drop-unsure", {"NSFW", "UNSURE"}), ("keep", set())])
def test_laion_nsfw_tag_follows_the_policy(policy, dropped):
    cfg = CurateConfig(nsfw=policy)
    for tag in ("NSFW", "UNSURE", "UNLIKELY", "nsfw", None):
        want = reasons.NSFW_TAG if tag is not None and tag.upper() in dropped else None
        assert check_safety(0.0, 0.0, cfg, tag) == want, (policy, tag)
    assert CurateConfig().nsfw == "drop-nsfw"  # the default drops NSFW and keeps UNSURE and UNLIKELY


def test_check_size():
    cfg = CurateConfig(min_image_side=256, max_aspect_ratio=2.0)
    assert check_size(200, 800, cfg) == reasons.IMAGE_TOO_SMALL
    assert check_size(300, 900, cfg) == reasons.ASPECT_RATIO
    assert check_size(300, 600, cfg) is None  # ratio exactly 2 passes
    assert check_size(None, 100, cfg) is None  # unknown size is not judged
    assert check_size(0, 0, cfg) is None


def test_keep_priority_highest_aesthetic_then_smallest_id():
    members = [("b", 5.0), ("a", 5.0), ("c", 7.0), ("d", None), ("e", math.nan)]
    order = sorted(members, key=lambda m: keep_priority(m[1], m[0]))
    assert [m[0] for m in order] == ["c", "a", "b", "d", "e"]


def test_config_validation_names_the_bad_value():
    with pytest.raises(ValueError, match="max_punsafe.*1.5"):
        validate(CurateConfig(max_punsafe=1.5))
    with pytest.raises(ValueError, match="not both"):
        validate(CurateConfig(clip_model="dd-tiny-clip", clip_weights="random", clip_score_threshold=0.2,
                              clip_score_top_fraction=0.3))
    with pytest.raises(ValueError, match="needs clip_weights"):
        validate(CurateConfig(clip_model="ViT-L-14"))
    with pytest.raises(ValueError, match="aesthetic_threshold=6.0 needs a CLIP model"):
        validate(CurateConfig(aesthetic_threshold=6.0))
    with pytest.raises(ValueError, match=r"unknown curate config key\(s\) \['min_wordz'\]"):
        with_overrides(CurateConfig(), {"min_wordz": 3})
    with pytest.raises(ValueError, match="unknown curate preset 'laion'"):
        preset("laion")
    assert validate(preset("tiny")).clip_model == "dd-tiny-clip"


def test_check_batch_matches_the_per_record_rules():
    """Every combination of edge values, as a pyarrow table, gives each record's per-record reason."""
    import itertools

    import pyarrow as pa

    cfg = CurateConfig(min_words=2, max_words=5, min_clip_tokens=2, max_clip_tokens=8, min_image_side=20,
                       max_aspect_ratio=3.0, nsfw="drop-unsure")
    captions_ = ["", "one", "two words", "a b c d e", "a b c d e f", "full\u3000width words"]
    rows = list(itertools.product(captions_, [0, 2, 9], [None, float("nan"), 0.5, 0.9], [None, 0.95],
                                  [None, "nsfw ", "UNSURE", "UNLIKELY"], [None, 0, 10, 100], [None, 40, 400]))
    caps = [" ".join(c.split()) for c, *_ in rows]
    table = pa.table({"caption": caps, "n_clip_tokens": [r[1] for r in rows], "punsafe": [r[2] for r in rows],
                      "pwatermark": [r[3] for r in rows], "nsfw": [r[4] for r in rows],
                      "width": pa.array([r[5] for r in rows], pa.int64()), "height": pa.array([r[6] for r in rows], pa.int64())})
    want = [check_length(c, r[1], cfg) or check_safety(r[2], r[3], cfg, r[4]) or check_size(r[5], r[6], cfg)
            for c, r in zip(caps, rows)]
    assert check_batch(table, cfg).to_pylist() == want
    assert set(want) == {None, reasons.TOO_FEW_WORDS, reasons.TOO_MANY_WORDS, reasons.TOO_FEW_TOKENS,
                         reasons.TOO_MANY_TOKENS, reasons.NSFW_TAG, reasons.UNSAFE, reasons.WATERMARK,
                         reasons.IMAGE_TOO_SMALL, reasons.ASPECT_RATIO}  # every rule fired somewhere, some pass
