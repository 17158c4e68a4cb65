"""The offline CLIP tokenizer and the teacher architectures' published parameter counts."""

import open_clip
import pytest
import torch

from teachers import configs
from teachers.tokenizer import clip_tokenizer

PROMPTS = [
    "a photo of a cat",
    "A Small RED triangle, at the top-left; on a grey background!!",
    "café crème brûlée — 日本語 🙂 emoji",
    " ".join(["long"] * 120),
]


def test_clip_tokenizer_matches_open_clip_reference():
    tok = clip_tokenizer()
    ref = open_clip.tokenize(PROMPTS)  # OpenAI's SimpleTokenizer: (N, 77), zero-padded, EOT last if truncated
    ids = tok(PROMPTS, padding="max_length", truncation=True, max_length=77).input_ids
    assert tok.model_max_length == 77
    for row, ref_row in zip(ids, ref.tolist()):
        n = ref_row.index(49407) + 1 if 49407 in ref_row else 77
        assert row[:n] == ref_row[:n]
        assert row[n:] == [49407] * (77 - n)  # SD pads with <|endoftext|>


def test_sdxl_second_tokenizer_pads_with_bang():
    tok = clip_tokenizer(pad_token="!")
    ids = tok(["a dog"], padding="max_length", max_length=77).input_ids[0]
    assert ids[:4] == [49406, 320, 1929, 49407] and ids[4:] == [0] * 73


def _count(build):
    with torch.device("meta"):
        return sum(p.numel() for p in build().parameters())


@pytest.mark.parametrize(
    "name,expected",
    [
        ("sd15_unet", 859_520_964),  # SD-1.5 UNet, as published (diffusers model card: 860M)
        ("sdxl_unet", 2_567_463_684),  # SDXL base UNet (2.6B)
        ("sd_vae", 83_653_863),  # KL-f8 autoencoder
        ("clip_l_text", 123_060_480),  # CLIP ViT-L/14 text tower
        ("clip_bigg_text", 694_659_840),  # OpenCLIP ViT-bigG/14 text tower with projection (SDXL's second)
    ],
)
def test_full_architectures_have_published_parameter_counts(name, expected):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = getattr(configs, name)()
    if "unet" in name:
        build = lambda: UNet2DConditionModel(**cfg)  # noqa: E731
    elif "vae" in name:
        build = lambda: AutoencoderKL(**cfg)  # noqa: E731
    else:
        cls = CLIPTextModelWithProjection if "bigg" in name else CLIPTextModel
        build = lambda: cls(CLIPTextConfig(**cfg))  # noqa: E731
    assert _count(build) == expected
