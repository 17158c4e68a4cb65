"""The ``shapes-sd15`` teacher: SD-1.5's UNet layout and scheduler on the shapes world, trained on
the training split only, with a training command that checkpoints and resumes."""

import hashlib
import json
import os

import numpy as np
import pytest
import torch

from teachers.shapes import model as M
from teachers.shapes import world


def test_its_unet_and_scheduler_are_sd15s():
    from diffusers import UNet2DConditionModel

    from teachers import configs

    cfg = M.unet_config("sd15")
    assert cfg["down_block_types"] == ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    assert cfg["up_block_types"] == ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    assert cfg["layers_per_block"] == 2 and cfg["sample_size"] == 8
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**cfg)
    assert type(unet.mid_block).__name__ == "UNetMidBlock2DCrossAttn"
    assert [len(b.resnets) for b in unet.down_blocks] == [2, 2, 2] and [len(b.resnets) for b in unet.up_blocks] == [3, 3, 3]
    assert [len(getattr(b, "attentions", [])) for b in unet.down_blocks] == [2, 2, 0]
    assert 1.5e6 < sum(p.numel() for p in unet.parameters()) < 3e6  # the size of the shapes UNet (2.2M)
    sched = M.scheduler_config("sd15")
    for key, value in configs.sd15_scheduler().items():
        assert sched[key] == value, key
    assert sched["timestep_spacing"] == "leading" and sched["steps_offset"] == 1
    assert sched["beta_schedule"] == "scaled_linear" and (sched["beta_start"], sched["beta_end"]) == (0.00085, 0.012)
    assert M.scheduler_config()["timestep_spacing"] == "trailing"  # the shapes teacher's is unchanged
    assert M.unet_config() == M.unet_config("shapes") and M.unet_config()["layers_per_block"] == 1
    with pytest.raises(ValueError, match="arch 'sd21'"):
        M.unet_config("sd21")


def test_the_loader_knows_it_and_says_how_to_train_it(monkeypatch, tmp_path):
    from teachers.load import BUILTIN_SPECS, load_teacher, teacher_geometry

    assert "shapes-sd15" in BUILTIN_SPECS
    assert teacher_geometry("shapes-sd15") == dict(levels=3, resolution=32, multiple=16, is_xl=False)
    monkeypatch.setitem(M.WEIGHTS_DIRS, "sd15", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="--arch sd15 --unet_steps 5000 .* --init_from"):
        load_teacher("shapes-sd15")


def test_the_training_split_uses_every_token_of_the_world():
    from teachers.tokenizer import clip_tokenizer

    tok = clip_tokenizer()
    assert M.world_token_ids(tok, world.train_scenes()) == M.world_token_ids(tok)


def _train(output, *extra):
    from teachers.shapes import train as T

    return T.main(["--arch", "sd15", "--split", "train", "--output", str(output), "--reuse_vae", M.WEIGHTS_DIR,
                   "--unet_steps", "4", "--batch", "4", "--data", "32", "--eval_every", "2", "--eval_n", "2",
                   "--eval_steps", "2", "--checkpoint_every", "2", "--calibrate_n", "2", "--calibrate_heldout", "3",
                   "--calibrate_steps", "2", "--calibrate_guidances", "1.5,4.0", *extra])


def _digests(folder):
    return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in sorted(os.listdir(folder)) if n.endswith(".safetensors")}


@pytest.mark.slow  # two short trainings of the teacher: about 35 s here
def test_training_resumes_to_the_same_weights_never_sees_heldout_scenes_and_calibrates_on_both(tmp_path, monkeypatch):
    from teachers.shapes import train as T

    rendered, swept = [], []
    render = world.render
    monkeypatch.setattr(world, "render", lambda scene, *a, **k: rendered.append(scene) or render(scene, *a, **k))
    adherence = T.adherence
    monkeypatch.setattr(T, "adherence", lambda pipe, analyser, captions, **k: swept.append(captions) or adherence(pipe, analyser, captions, **k))
    calibrate, calibrating = T.calibrate, []
    monkeypatch.setattr(T, "calibrate", lambda *a, **k: calibrating.append(len(swept)) or calibrate(*a, **k))

    assert _train(tmp_path / "straight") == 0
    assert rendered and {world.split_of(s) for s in rendered} == {"train"}  # held-out scenes never rendered
    before = swept[: calibrating[0]]  # evaluations during training: training-split captions only
    assert before and {world.split_of(world.parse_caption(c)) for cs in before for c in cs} == {"train"}
    assert {world.split_of(world.parse_caption(c)) for cs in swept[calibrating[0]:] for c in cs} == {"train", "heldout"}

    assert _train(tmp_path / "resumed", "--stop_after", "3") == 0  # interrupted after 3 of 4 steps
    assert os.path.isfile(tmp_path / "resumed" / "checkpoint" / "state.pt")
    assert not os.path.exists(tmp_path / "resumed" / "weights.json")
    assert _train(tmp_path / "resumed") == 0  # the same command again continues
    assert not os.path.exists(tmp_path / "resumed" / "checkpoint")  # removed once weights are calibrated
    straight, resumed = _digests(tmp_path / "straight"), _digests(tmp_path / "resumed")
    assert straight == resumed  # bit for bit: the resumed run is the uninterrupted one
    assert set(straight) == {f"{n}.safetensors" for n in ("analyser", "text_encoder", "unet", "vae")}
    # the committed autoencoder and analyser, byte for byte
    for name in ("vae.safetensors", "analyser.safetensors"):
        assert (tmp_path / "resumed" / name).read_bytes() == open(os.path.join(M.WEIGHTS_DIR, name), "rb").read()

    meta = json.loads((tmp_path / "resumed" / "weights.json").read_text())
    assert meta["arch"] == "sd15" and meta["split"] == "train" and meta["heldout_scenes"] == 45
    assert set(meta["guidance_sweep"]) == set(meta["guidance_sweep_heldout"]) == {"1.5", "4.0"}
    assert meta["heldout_adherence"] == meta["guidance_sweep_heldout"][str(meta["guidance_scale"])]
    assert [h["step"] for h in meta["history"]] == [2, 4]
    assert (tmp_path / "resumed" / "captions_heldout.txt").read_text().splitlines() == \
        [world.caption(s) for s in world.heldout_scenes()]

    assert _train(tmp_path / "resumed") == 0  # complete: nothing retrained
    assert _digests(tmp_path / "resumed") == resumed
    (tmp_path / "resumed" / "checkpoint").mkdir()  # a checkpoint of another run is refused, not mixed in
    T._save_state(str(tmp_path / "resumed" / "checkpoint"), "state.pt", dict(key={"unet_steps": 9}))
    with pytest.raises(SystemExit, match="another run"):
        _train(tmp_path / "resumed")


WEIGHTS_JSON = os.path.join(M.WEIGHTS_DIR_SD15, "weights.json")
needs_weights = pytest.mark.skipif(not os.path.isfile(WEIGHTS_JSON), reason=(
    f"shapes-sd15 weights not committed yet (train them: {M.TRAIN_COMMANDS['sd15']})"))


@needs_weights
def test_committed_sd15_weights_match_their_manifest_and_held_out_was_measured():
    with open(WEIGHTS_JSON, encoding="utf-8") as f:
        meta = json.load(f)
    for name, digest in meta["sha256"].items():
        with open(os.path.join(M.WEIGHTS_DIR_SD15, f"{name}.safetensors"), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == digest
    assert meta["sha256"]["vae"] == json.load(open(os.path.join(M.WEIGHTS_DIR, "weights.json")))["sha256"]["vae"]
    assert meta["arch"] == "sd15" and meta["split"] == "train" and "guidance_sweep_heldout" in meta
    files = [n for n in os.listdir(M.WEIGHTS_DIR_SD15) if os.path.isfile(os.path.join(M.WEIGHTS_DIR_SD15, n))]
    assert sum(os.path.getsize(os.path.join(M.WEIGHTS_DIR_SD15, n)) for n in files) < 10 * 2**20


@needs_weights
def test_the_sd15_teacher_draws_what_training_split_captions_say_at_50_steps():
    from teachers.load import load_teacher
    from teachers.shapes import analyser as A
    from teachers.shapes.train import sample_images

    teacher = load_teacher("shapes-sd15")
    assert teacher.pipe.scheduler.config.timestep_spacing == "leading" and teacher.pipe.scheduler.config.steps_offset == 1
    captions = [world.caption(s) for s in world.random_scenes(np.random.default_rng(2024), 60, world.train_scenes())]
    guidance = json.load(open(WEIGHTS_JSON, encoding="utf-8"))["guidance_scale"]
    metric = A.Adherence()
    metric.update(sample_images(teacher.pipe, captions, steps=50, guidance=guidance, seed=0), captions)
    score = metric.compute()
    assert score["adherence"] >= 0.90, score
