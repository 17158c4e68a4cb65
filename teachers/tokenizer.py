"""A real CLIP BPE tokenizer built offline from the vocabulary that open_clip ships.

Stable Diffusion's tokenizers are OpenAI CLIP's byte-level BPE (49,408 tokens, 77 positions).
open_clip bundles that BPE as ``bpe_simple_vocab_16e6.txt.gz``; this module turns it into the
``vocab.json`` + ``merges.txt`` pair that transformers' ``CLIPTokenizer`` reads, exactly as
OpenAI's ``SimpleTokenizer`` builds its encoder (bytes, bytes + ``</w>``, merges, then the two
special tokens), so ids equal the hub tokenizer's ids. No network is needed.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import tempfile
from importlib import resources

from teachers.configs import CLIP_MAX_LENGTH, CLIP_VOCAB_SIZE

_NUM_MERGES = CLIP_VOCAB_SIZE - 256 - 256 - 2  # 48894, as in OpenAI's simple_tokenizer.py


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map (OpenAI simple_tokenizer.py)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _bpe_path() -> str:
    return str(resources.files("open_clip").joinpath("bpe_simple_vocab_16e6.txt.gz"))


@functools.lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    with gzip.open(_bpe_path(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = lines[1 : _NUM_MERGES + 1]  # line 0 is a version header
    byte_tokens = list(_bytes_to_unicode().values())
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    if len(tokens) != CLIP_VOCAB_SIZE:
        raise RuntimeError(f"open_clip BPE file gave {len(tokens)} tokens, expected {CLIP_VOCAB_SIZE}")
    return {t: i for i, t in enumerate(tokens)}, merges


def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """transformers ``CLIPTokenizer`` with ``model_max_length=77``.

    ``pad_token``: SD-1.5 and SDXL's first tokenizer pad with ``<|endoftext|>``; SDXL's second
    tokenizer (OpenCLIP bigG) pads with ``"!"`` (id 0).
    """
    from transformers import CLIPTokenizer

    vocab, merges = _vocab_and_merges()
    with tempfile.TemporaryDirectory(prefix="clip-bpe-") as tmp:
        vocab_file = os.path.join(tmp, "vocab.json")
        merges_file = os.path.join(tmp, "merges.txt")
        with open(vocab_file, "w", encoding="utf-8") as f:
            json.dump(vocab, f, ensure_ascii=False)
        with open(merges_file, "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
        # CLIPTokenizer reads both files in __init__; the temporary folder can go afterwards.
        tok = CLIPTokenizer(vocab_file, merges_file, model_max_length=CLIP_MAX_LENGTH, pad_token=pad_token)
    tok.init_kwargs.pop("vocab_file", None)
    tok.init_kwargs.pop("merges_file", None)
    return tok
