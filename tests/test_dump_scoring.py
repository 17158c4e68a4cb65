"""Scoring in the teacher dump (--score_images): the curate job's models on the decoded images, stored in
the sample json, the shard index and the NNNNNN.emb.npy sidecar; byte ranges per key; bad flags."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from filters.aesthetic import AestheticMLP, aesthetic_scores, load_aesthetic_mlp
from filters.clip_embed import embed_images, embed_texts, load_clip
from conftest import dump_argv
from pipelines import teacher_dump
from pipelines.dump import plan as dump_plan
from pipelines.scoring import image_scoring
from shards import reader as shard_reader
from shards import schema as shard_schema
from shards import verify as shard_verify
from shards import writer as shard_writer

BASE = dict(resolution=64, num_inference_steps=2, samples_per_shard=2, batch_size=2, feature_layers="mid_block",
            num_feature_steps=1)
# Shard 1 replays shard 0 (same prompts and seeds, in the same batch positions) under other ids.
ROWS = [{"key": "x0", "caption": "a red boat at sea", "seed": 5}, {"key": "y0", "caption": "a cat on a mat", "seed": 6},
        {"key": "x1", "caption": "a red boat at sea", "seed": 5}, {"key": "y1", "caption": "a cat on a mat", "seed": 6}]


def aesthetic_weights(path, dim=32):
    torch.manual_seed(0)
    torch.save(AestheticMLP(dim).state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scored")
    (tmp / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    weights = aesthetic_weights(tmp / "aes.pth")
    dataset = teacher_dump.run(dump_argv(tmp / "p.jsonl", tmp / "dump", **BASE, save_images=True, score_images="tiny",
                                         aesthetic_weights=weights))
    return tmp / "dump", dataset, weights


def read_tar(path):
    """key -> {ext: bytes} of every member, with plain tarfile."""
    samples = {}
    with tarfile.open(path) as tar:
        for m in tar:
            key, _, ext = m.name.partition(".")
            samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def test_scores_are_the_curate_models_scores_of_the_stored_png(scored):
    out, dataset, weights = scored
    clip = load_clip("dd-tiny-clip", "random")
    mlp = load_aesthetic_mlp(weights)
    assert dataset["recipe"]["score_images"] == {"preset": "tiny", "clip_model": "dd-tiny-clip", "clip_weights": "random",
                                                 "aesthetic_weights": weights, "embed_dim": 32}
    for shard in range(2):
        index = shard_reader.read_index(str(out), shard)
        embeds = shard_reader.read_embeddings(str(out), shard, index)
        assert embeds.shape == (2, 32) and embeds.dtype == np.float32
        members = read_tar(out / shard_schema.shard_name(shard))
        for i, key in enumerate(index["keys"]):
            meta = json.loads(members[key]["json"])
            image = Image.open(io.BytesIO(members[key]["png"]))
            ref_embed = embed_images(clip, [image])[0]  # re-scored from the stored PNG
            ref_clip = float(ref_embed @ embed_texts(clip, [meta["prompt"]])[0])
            ref_aesthetic = float(aesthetic_scores(mlp, ref_embed[None])[0])
            np.testing.assert_allclose(embeds[i], ref_embed, atol=1e-6)
            assert meta["image_scores"] == {"clip_model": "dd-tiny-clip", "clip_score": index["scores"]["clip_score"][i],
                                            "aesthetic_score": index["scores"]["aesthetic_score"][i]}
            assert index["scores"]["clip_score"][i] == pytest.approx(ref_clip, abs=1e-5)
            assert index["scores"]["aesthetic_score"][i] == pytest.approx(ref_aesthetic, abs=1e-5)
        assert shard_verify.verify_shard(str(out), shard) == []


def test_byte_ranges_fetch_each_sample_alone(scored):
    out, _, _ = scored
    index = shard_reader.read_index(str(out), 1)
    members = read_tar(out / shard_schema.shard_name(1))
    got = {key: sample for key, sample, problem in shard_reader.read_samples(str(out), 1, [(k, o) for k, o in zip(
        index["keys"], index["offsets"])][::-1])}  # any order asked; each key read by its own range
    assert got == {k: {"__key__": k, **members[k]} for k in index["keys"]}
    scanned = {k: s for k, s, _ in shard_reader.read_samples(str(out), 1, [(k, None) for k in index["keys"]])}
    assert scanned == got  # the fallback for indexes without ranges agrees


def test_same_prompt_and_seed_under_two_ids_gives_identical_images_and_embeddings(scored):
    out, _, _ = scored
    a, b = read_tar(out / "000000.tar"), read_tar(out / "000001.tar")
    assert a["x0-s0"]["png"] == b["x1-s0"]["png"] and a["y0-s0"]["png"] == b["y1-s0"]["png"]
    ea = shard_reader.read_embeddings(str(out), 0, shard_reader.read_index(str(out), 0))
    eb = shard_reader.read_embeddings(str(out), 1, shard_reader.read_index(str(out), 1))
    assert np.array_equal(ea, eb) and not np.array_equal(ea[0], ea[1])


def test_a_corrupt_sidecar_fails_verification(scored, tmp_path):
    import shutil

    out, _, _ = scored
    shutil.copytree(out, tmp_path / "d")
    path = tmp_path / "d" / shard_schema.embeds_name(0)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    assert shard_verify.verify_shard(str(tmp_path / "d"), 0) == ["000000.emb.npy sha256 differs from its index"]
    assert shard_verify.verify_shard(str(tmp_path / "d"), 1) == []


def test_unscored_recipes_keep_their_hash():
    import dataclasses

    from teachers.sampler import SamplerConfig

    sampler = SamplerConfig(scheduler="ddim", num_inference_steps=2, guidance_scale=7.5, height=64, width=64,
                            feature_layers=(), num_feature_steps=0, save_images=True)
    recipe = dump_plan.DumpRecipe(
        teacher="tiny", dtype="float32", device="cpu", sampler=sampler, storage_dtype="float16",
        seeds_per_prompt=1, samples_per_shard=2, batch_size=2, cpu_threads=0, input_sha256="0" * 64)
    assert "score_images" not in recipe.to_json()  # dumps made before scoring existed still resume
    scoring = dataclasses.asdict(image_scoring("tiny", None, None))
    assert dataclasses.replace(recipe, score_images=scoring).hash != recipe.hash


def test_shard_writer_refuses_a_mix_of_scored_and_unscored_samples(tmp_path):
    writer = shard_writer.ShardWriter(str(tmp_path), 0, recipe_hash="r")
    writer.write({"__key__": "a", "txt": b"a"}, scores={"clip_score": 0.1}, embedding=np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="every sample of a shard has the same scores"):
        writer.write({"__key__": "b", "txt": b"b"})
    writer.abort()


@pytest.mark.parametrize("args,message", [
    (["--score_images", "tiny"], "--score_images 'tiny' scores the decoded images: it needs --save_images"),
    (["--save_images", "--score_images", "nope"], "unknown curate preset 'nope'"),
    (["--save_images", "--score_images", "default"], "--score_images 'default': that preset has no CLIP model"),
    (["--save_images", "--score_images", "laion-aesthetics"], "needs --clip_weights"),
    (["--save_images", "--score_images", "tiny", "--aesthetic_weights", "/no/aes.pth"],
     "aesthetic_weights '/no/aes.pth' not found"),
    (["--save_images", "--aesthetic_weights", "/no/aes.pth"], "--aesthetic_weights only apply with --score_images"),
])
def test_bad_scoring_flags_fail_before_any_work(tmp_path, args, message):
    (tmp_path / "p.txt").write_text("a cat\n")
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        teacher_dump.run([*dump_argv(tmp_path / "p.txt", tmp_path / "o", **BASE), *args])
    assert not (tmp_path / "o").exists()


def test_aesthetic_weights_for_another_clip_width_are_refused(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n")
    weights = aesthetic_weights(tmp_path / "l14.pth", dim=768)
    with pytest.raises(ValueError, match="take 768-d embeddings but clip_model 'dd-tiny-clip' gives 32-d"):
        teacher_dump.run(dump_argv(tmp_path / "p.txt", tmp_path / "o", **BASE, save_images=True, score_images="tiny",
                                   aesthetic_weights=weights))
    assert not (tmp_path / "o").exists()
