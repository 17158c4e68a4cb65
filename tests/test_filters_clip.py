"""open_clip embeddings with the tiny random-weight model, the CLIP score and the top-fraction cutoff."""

import numpy as np
import pytest
from PIL import Image

from filters.clip_embed import (TINY_MODEL, clip_score, embed_images, embed_texts, load_clip, model_embed_dim,
                                top_fraction_threshold)


@pytest.fixture(scope="module")
def tiny_clip():
    return load_clip(TINY_MODEL, "random")


def test_embeddings_are_unit_norm_and_deterministic(tiny_clip):
    texts = ["a red bicycle", "a blue car", "a red bicycle"]
    emb = embed_texts(tiny_clip, texts)
    assert emb.shape == (3, 32) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(emb[0], emb[2])
    assert not np.allclose(emb[0], emb[1])
    images = [Image.new("RGB", (50, 40), c) for c in ((255, 0, 0), (0, 0, 255))] + [Image.new("L", (20, 20), 128)]
    img = embed_images(tiny_clip, images)
    assert img.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1.0, atol=1e-5)
    # same random weights in a second load (every Beam worker must agree)
    np.testing.assert_allclose(embed_texts(load_clip(TINY_MODEL, "random"), texts[:1]), emb[:1], atol=1e-6)
    # the model's own similarity equals ours
    np.testing.assert_allclose(clip_score(img[:2], emb[:2]), np.sum(img[:2] * emb[:2], axis=1), atol=1e-6)


def test_clip_score_against_float64():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 8)), rng.normal(size=(6, 8))
    ref = np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    np.testing.assert_allclose(clip_score(a, b), ref, atol=1e-6)
    assert clip_score(np.array([[1.0, 0.0]]), np.array([[0.0, 2.0]]))[0] == pytest.approx(0.0)


def test_top_fraction_threshold():
    scores = np.arange(10) / 10.0  # 0.0 .. 0.9
    assert top_fraction_threshold(scores, 0.3) == pytest.approx(0.7)  # keeps 0.7, 0.8, 0.9
    assert (scores >= top_fraction_threshold(scores, 0.3)).sum() == 3
    assert top_fraction_threshold(scores, 1.0) == pytest.approx(0.0)
    assert top_fraction_threshold([], 0.5) == float("-inf")


def test_unknown_model_and_missing_weights_are_named():
    with pytest.raises(ValueError, match="ViT-Q-99"):
        model_embed_dim("ViT-Q-99")
    assert model_embed_dim("ViT-L-14") == 768
    with pytest.raises(FileNotFoundError, match="nowhere.bin"):
        load_clip(TINY_MODEL, "/nowhere.bin")
