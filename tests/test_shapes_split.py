"""The shapes world's held-out split: 45 whole scenes out of 450, balanced, fixed for good."""

import collections
import hashlib
import itertools

import numpy as np
import pytest

from teachers.shapes import world

# sha256 of the held-out captions, one a line in heldout_scenes() order: the shapes-sd15 teacher was
# trained without exactly these scenes, so the split may never change under it.
HELDOUT_SHA256 = "b26af4a353e8df387c70fec0c90a7e75a74971d67e084f4f0aa03186369b5566"


def test_the_splits_partition_the_world_into_405_and_45_scenes():
    train, held = world.train_scenes(), world.heldout_scenes()
    assert len(held) == 45 == len(set(held)) and len(train) == 405 == len(set(train))
    assert set(train) | set(held) == set(world.all_scenes()) and not set(train) & set(held)
    assert all(world.split_of(s) == "train" for s in train) and all(world.split_of(s) == "heldout" for s in held)
    assert world.split_scenes("all") == world.all_scenes() == world.split_scenes(None)
    assert world.split_scenes("train") == train and world.split_scenes("heldout") == held
    assert [s for s in world.all_scenes() if s in set(train)] == train  # training scenes in world order
    with pytest.raises(ValueError, match="split 'test'"):
        world.split_scenes("test")


def test_the_split_is_deterministic_and_pinned():
    assert world.heldout_scenes() == world.heldout_scenes()
    text = "\n".join(world.caption(s) for s in world.heldout_scenes())
    assert hashlib.sha256(text.encode()).hexdigest() == HELDOUT_SHA256


def test_training_keeps_every_value_pair_and_triple_and_each_heldout_scene_is_one_change_from_training():
    train = world.train_scenes()
    labels = np.array([s.labels for s in train])
    sizes = [len(world.VALUES[a]) for a in world.ATTRIBUTES]
    for k in (1, 2, 3):
        for attrs in itertools.combinations(range(5), k):
            seen = {tuple(row[list(attrs)]) for row in labels}
            assert len(seen) == int(np.prod([sizes[a] for a in attrs])), [world.ATTRIBUTES[a] for a in attrs]
    train_set = set(train)
    for scene in world.heldout_scenes():  # any one attribute changed: a training scene
        for i, name in enumerate(world.ATTRIBUTES):
            for value in world.VALUES[name]:
                if value != getattr(scene, name):
                    other = list(scene.labels)
                    other[i] = world.VALUES[name].index(value)
                    assert world.Scene.from_labels(other) in train_set


def test_the_heldout_scenes_are_balanced_over_values_and_pairs():
    held = np.array([s.labels for s in world.heldout_scenes()])
    sizes = [len(world.VALUES[a]) for a in world.ATTRIBUTES]
    for attrs in itertools.chain(itertools.combinations(range(5), 1), itertools.combinations(range(5), 2)):
        combos = int(np.prod([sizes[a] for a in attrs]))
        counts = collections.Counter(tuple(row[list(attrs)]) for row in held)
        share = 45 / combos  # each value (pair) held out its fair share, rounded down or up
        assert len(counts) == combos or share < 1
        assert all(np.floor(share) <= c <= np.ceil(share) for c in counts.values()), [world.ATTRIBUTES[a] for a in attrs]


def test_split_caption_files_and_drawing_from_a_split(tmp_path):
    paths = world.write_split_captions(str(tmp_path))
    for split in world.SPLITS:
        lines = open(paths[split], encoding="utf-8").read().splitlines()
        assert lines == [world.caption(s) for s in world.split_scenes(split)]
        assert all(world.split_of(world.parse_caption(line)) == split for line in lines)
    lines = world.write_captions(str(tmp_path / "held.txt"), 200, seed=3, split="heldout")
    assert {world.split_of(world.parse_caption(t)) for t in lines} == {"heldout"}
    assert len(set(lines)) > 30  # drawn across the split, not one scene
    images, scenes = world.sample_batch(np.random.default_rng(0), 64, scenes=world.train_scenes())
    assert images.shape == (64, 32, 32, 3) and {world.split_of(s) for s in scenes} == {"train"}
    # without a split nothing changes: the same draws as before the split existed
    assert world.write_captions(str(tmp_path / "a.txt"), 20, seed=1) == \
        [world.caption(s) for s in world.random_scenes(np.random.default_rng(1), 20)]


def test_the_split_cli_writes_both_files(tmp_path, capsys):
    assert world.main([str(tmp_path)]) == 0
    assert "heldout: 45 captions" in capsys.readouterr().out
    assert len((tmp_path / "captions_train.txt").read_text().splitlines()) == 405
