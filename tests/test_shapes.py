"""The shapes world, its analyser and the shapes teacher trained here (weights committed)."""

import hashlib
import json
import os

import numpy as np
import pytest
import torch

from teachers.shapes import analyser as A
from teachers.shapes import model as M
from teachers.shapes import world


def test_every_caption_parses_back_to_its_scene():
    scenes = world.all_scenes()
    assert len(scenes) == 3 * 5 * 2 * 5 * 3 == len(set(scenes))
    for scene in scenes:
        assert world.parse_caption(world.caption(scene)) == scene
        assert world.Scene.from_labels(scene.labels) == scene
    assert world.caption(world.Scene("triangle", "red", "small", "top left", "grey")) == \
        "a small red triangle at the top left on a grey background"
    assert world.parse_caption("a photo of a cat") is None
    assert world.parse_caption("a small pink triangle at the top left on a grey background") is None


def test_rendering_is_seeded_and_draws_the_scene():
    a, scenes = world.sample_batch(np.random.default_rng(3), 16)
    b, _ = world.sample_batch(np.random.default_rng(3), 16)
    assert a.dtype == np.uint8 and a.shape == (16, 32, 32, 3) and np.array_equal(a, b)
    scene = world.Scene("square", "blue", "large", "bottom right", "white")
    img = world.render(scene, np.random.default_rng(0)).astype(float)
    corner = img[:6, :6].reshape(-1, 3).mean(0)  # the top left is background
    centre = img[22:25, 22:25].reshape(-1, 3).mean(0)  # the bottom-right quadrant's middle is the shape
    assert np.abs(corner - world.BACKGROUNDS["white"]).max() < 25
    assert np.abs(centre - world.COLOURS["blue"]).max() < 40


def test_committed_weights_match_their_manifest():
    with open(os.path.join(M.WEIGHTS_DIR, "weights.json"), encoding="utf-8") as f:
        meta = json.load(f)
    for name, digest in meta["sha256"].items():
        with open(os.path.join(M.WEIGHTS_DIR, f"{name}.safetensors"), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == digest
    total = sum(os.path.getsize(os.path.join(M.WEIGHTS_DIR, n)) for n in os.listdir(M.WEIGHTS_DIR))
    assert total < 10 * 2**20  # a few MB in git


def test_analyser_reads_heldout_truth_at_98_percent():
    model = A.load_analyser()
    images, scenes = world.sample_batch(np.random.default_rng(987_654), 600)
    _, labels = model.read(world.to_tensor(images))
    correct = labels == np.array([s.labels for s in scenes])
    per_attribute = correct.mean(0)
    assert per_attribute.min() >= 0.98, dict(zip(world.ATTRIBUTES, per_attribute))
    assert correct.all(1).mean() >= 0.95


def test_frechet_of_truth_against_truth_is_small_and_against_shuffled_captions_large():
    model = A.load_analyser()
    captions = [world.caption(s) for s in world.random_scenes(np.random.default_rng(1), 300)]
    same = A.AnalyserFrechet(model)
    same.update(A.render_truth(captions, seed=50), captions)
    wrong = A.AnalyserFrechet(model)  # every image of a different scene than its caption says: shifted features
    backgrounds = [c.replace("grey background", "TMP").replace("black background", "grey background")
                   .replace("white background", "black background").replace("TMP", "white background") for c in captions]
    wrong.update(A.render_truth(backgrounds, seed=50), captions)
    assert same.compute()["frechet_analyser"] < 0.2 * wrong.compute()["frechet_analyser"]


@pytest.fixture(scope="module")
def shapes_teacher():
    from teachers.load import load_teacher

    return load_teacher("shapes")


def test_shapes_teacher_loads_with_the_trained_sparse_token_table(shapes_teacher):
    from teachers.tokenizer import clip_tokenizer

    pipe = shapes_teacher.pipe
    assert shapes_teacher.default_resolution == world.IMAGE_SIZE
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    table = pipe.text_encoder.get_input_embeddings().weight
    used = M.world_token_ids(clip_tokenizer())
    rest = torch.ones(table.shape[0], dtype=torch.bool)
    rest[used] = False
    assert table[rest].abs().max() == 0 and table[used].abs().sum(1).min() > 0


def test_shapes_teacher_draws_what_its_captions_say_at_50_steps(shapes_teacher):
    """Prompt adherence of the committed teacher, through the stock diffusers pipeline call."""
    from teachers.shapes.train import sample_images

    captions = [world.caption(s) for s in world.random_scenes(np.random.default_rng(2024), 60)]
    guidance = json.load(open(os.path.join(M.WEIGHTS_DIR, "weights.json"), encoding="utf-8"))["guidance_scale"]
    images = sample_images(shapes_teacher.pipe, captions, steps=50, guidance=guidance, seed=0)
    metric = A.Adherence()
    metric.update(images, captions)
    score = metric.compute()
    assert score["adherence"] >= 0.90, score
