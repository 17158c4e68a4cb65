"""The trainer: offline = online targets, DDP on two gloo processes, kill-and-resume, it learns."""

import dataclasses
import json
import re
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from shards.loader import dataset_shards, record_pipeline
from students.distill.batches import training_batch
from students.distill.recipes import compute_losses, get_recipe, make_projections, online_targets
from students.training.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(data, out, **kw):
    base = dict(data=data, output=str(out), preset="tiny", recipe="snapgen_kd", batch_size=4, max_steps=6,
                warmup_steps=2, checkpoint_every=2, shuffle_buffer=8, lr=1e-3)
    return TrainConfig(**{**base, **kw})


def test_offline_and_online_teachers_give_the_same_loss(tiny_dump, tiny_teacher):
    from students.models.unet import build_unet

    recipe = get_recipe("snapgen_kd")
    records = list(record_pipeline(dataset_shards(tiny_dump)[:1]))
    meta = json.load(open(os.path.join(tiny_dump, "dataset.json")))
    negative = np.load(os.path.join(tiny_dump, meta["shared"]["negative_prompt_embeds"]))
    data = training_batch(records, negative, recipe, seed=0, epoch=0, scheduler_config=records[0].meta["scheduler_config"])
    batch, offline = data["batch"], data["targets"]
    online = online_targets(tiny_teacher.unet, batch["z"], batch["t"], batch["cond"], batch["uncond"], ["mid_block", "up_blocks.0"])
    torch.manual_seed(0)
    student = build_unet("tiny")
    heads = make_projections({k: c for k, (c, _) in student.feature_info().items()}, {"mid_block": 64, "up_blocks.0": 64},
                             ["mid_block", "up_blocks.0"])
    abar = tiny_teacher.pipe.scheduler.alphas_cumprod
    a = compute_losses(student, heads, batch, offline, recipe, abar, torch.Generator().manual_seed(1))
    b = compute_losses(student, heads, batch, online, recipe, abar, torch.Generator().manual_seed(1))
    for k in ("output", "feature", "task", "loss"):
        assert torch.allclose(a[k], b[k], rtol=2e-3), (k, a[k], b[k])  # offline targets are float16 on disk
    assert float(a["output"].detach()) > 0


def test_kill_then_resume_gives_the_identical_loss_sequence(tiny_dump, tmp_path):
    # Both runs are subprocesses with the same environment: CPU rounding depends on the thread count,
    # and other tests in this process may have changed it.
    def args_for(out):
        return [sys.executable, "-m", "students.training", "--data", tiny_dump, "--output", str(out), "--preset", "tiny",
                "--recipe", "snapgen_kd", "--batch_size", "4", "--max_steps", "8", "--warmup_steps", "2",
                "--checkpoint_every", "2", "--shuffle_buffer", "8", "--lr", "1e-3"]

    env = dict(os.environ, OMP_NUM_THREADS="1")  # one thread each: tiny models, a shared 2-core machine
    subprocess.run(args_for(tmp_path / "ref"), check=True, capture_output=True, env=env)
    ref = [json.loads(line)["loss"] for line in (tmp_path / "ref" / "losses.jsonl").read_text().splitlines()]
    assert len(ref) == 8
    out = tmp_path / "killed"
    args = args_for(out)
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 180
    while not (out / "checkpoints" / "step-0000002").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the first run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # killed mid-way: a checkpoint existed and the final one did not
    assert (out / "checkpoints" / "step-0000002").exists() and not (out / "checkpoints" / "step-0000008").exists()
    subprocess.run(args, check=True, capture_output=True, env=env)
    assert [row["loss"] for row in _logged(out)] == ref
    assert _logged(out) == _logged(tmp_path / "ref")  # every logged value, bitwise on CPU, one process each
    _assert_same_state(_final_state(out, 8), _final_state(tmp_path / "ref", 8))  # weights, optimizer and RNG states


def test_two_process_ddp_on_gloo(tiny_dump, tmp_path, torchrun):
    launch, env = torchrun
    # 16 samples in 4 shards, 2 ranks x batch 4: 2 steps = one epoch.
    proc = subprocess.run([*launch, "-m", "students.training", "--data", tiny_dump,
                           "--output", str(tmp_path / "ddp"), "--preset", "tiny", "--recipe", "output_kd", "--batch_size", "4",
                           "--max_steps", "2", "--warmup_steps", "1", "--checkpoint_every", "2", "--shuffle_buffer", "0",
                           "--audit_keys", "1"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.load(open(tmp_path / "ddp" / "ranks" / f"rank-{r}.json")) for r in (0, 1))
    assert r0["weights_sha256"] == r1["weights_sha256"]
    k0, k1 = r0["keys_by_epoch"]["0"], r1["keys_by_epoch"]["0"]
    all_keys = [k for i in range(4) for k in json.load(open(os.path.join(tiny_dump, f"{i:06d}.json")))["keys"]]
    assert not set(k0) & set(k1) and sorted(k0 + k1) == sorted(all_keys) and len(k0) == len(k1) == 8


def test_training_lowers_held_out_output_distillation_loss(tiny_dump, tmp_path):
    from students.models.unet import EfficientUNet2DConditionModel, build_unet

    urls = dataset_shards(tiny_dump)
    held_out = list(record_pipeline(urls[-1:]))
    meta = json.load(open(os.path.join(tiny_dump, "dataset.json")))
    negative = np.load(os.path.join(tiny_dump, meta["shared"]["negative_prompt_embeds"]))
    recipe = get_recipe("output_kd", task_weight=0.0)

    def held_out_loss(student):
        losses = []
        for epoch in range(4):  # several recorded points per sample
            data = training_batch(held_out, negative, recipe, seed=1, epoch=epoch, scheduler_config=held_out[0].meta["scheduler_config"])
            with torch.no_grad():
                losses.append(compute_losses(student, torch.nn.ModuleDict(), data["batch"], data["targets"], recipe,
                                             torch.tensor(np.cumprod(1 - np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2)).float(),
                                             torch.Generator().manual_seed(0))["output"])
        return float(torch.stack(losses).mean())

    torch.manual_seed(0)
    before = held_out_loss(build_unet("tiny"))
    # train on the first three shards only (the fourth is held out)
    import shutil
    train_dir = tmp_path / "train_data"
    os.makedirs(train_dir)
    for name in os.listdir(tiny_dump):
        if not name.startswith("000003"):
            (shutil.copytree if os.path.isdir(os.path.join(tiny_dump, name)) else shutil.copy)(os.path.join(tiny_dump, name), train_dir / name)
    meta["shards"] = meta["shards"][:3]
    (train_dir / "dataset.json").write_text(json.dumps(meta))
    losses = train(_cfg(str(train_dir), tmp_path / "run", recipe="output_kd", max_steps=60, lr=2e-3, warmup_steps=5,
                        checkpoint_every=60, ema_decay=0.0, image_every=60, audit_keys=1))
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10]), losses  # the training loss fell
    audit = json.load(open(tmp_path / "run" / "ranks" / "rank-0.json"))
    shard_keys = [json.load(open(os.path.join(tiny_dump, f"{i:06d}.json")))["keys"] for i in range(3)]
    for epoch, keys in audit["keys_by_epoch"].items():  # 60 steps x 4 = 20 epochs of 12: every shard, every sample
        assert sorted(keys) == sorted(k for ks in shard_keys for k in ks), epoch
    assert len(audit["keys_by_epoch"]) == 20
    from PIL import Image
    grid = Image.open(tmp_path / "run" / "grids" / "step-0000060.png")
    assert grid.size == (110 + 4 * 128, 2 * 128 + 44)  # 4 prompts; teacher and student rows (EMA off), captions
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tb"), size_guidance={"images": 0})
    events.Reload()
    (image,) = events.Images("grid")  # the same grid, at its step, in TensorBoard
    assert image.step == 60 and (image.width, image.height) == grid.size
    import io
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(image.encoded_image_string)).convert("RGB")),
                          np.asarray(grid.convert("RGB")))
    student = EfficientUNet2DConditionModel.from_pretrained(str(tmp_path / "run" / "checkpoints" / "step-0000060" / "student"))
    after = held_out_loss(student)
    assert after < 0.5 * before, (before, after)


def test_resampled_epochs_have_the_set_length_and_replay_on_resume(tiny_dump, tmp_path):
    from students.training.train import Batches

    cfg = _cfg(tiny_dump, tmp_path, epoch_length=6, batch_size=4, shuffle_buffer=4)
    urls = dataset_shards(tiny_dump)
    a = Batches(cfg, urls)
    seq = [[r.key for r in a.next()] for _ in range(4)]
    assert [len(b) for b in seq] == [4, 2, 4, 2]  # an epoch of 6 ends on a partial batch
    assert a.epoch == 2 and a.position == 0
    b = Batches(cfg, urls, epoch=1, position=4)  # resume in the middle of epoch 1
    assert [r.key for r in b.next()] == seq[3]
    all_keys = {k for i in range(4) for k in json.load(open(os.path.join(tiny_dump, f"{i:06d}.json")))["keys"]}
    assert {k for batch in seq for k in batch} <= all_keys


def test_decoder_distillation_learns_the_teacher_decoder(tmp_path):
    from diffusers import AutoencoderTiny

    from conftest import dump_argv
    from pipelines import teacher_dump
    from students.distill.losses import decoder_distill_loss

    (tmp_path / "p.txt").write_text("".join(f"a {c} ball number {i}\n" for c in ("red", "blue") for i in range(6)))
    teacher_dump.run(dump_argv(tmp_path / "p.txt", tmp_path / "d", num_inference_steps=2, samples_per_shard=12,
                               batch_size=12, feature_layers="", save_images=True, cpu_threads=None))
    records = list(record_pipeline(dataset_shards(str(tmp_path / "d"))))
    held_out = training_batch(records[-4:], np.zeros((77, 32)), get_recipe("output_kd"), seed=0, epoch=0,
                              scheduler_config=records[0].meta["scheduler_config"], with_images=True)["batch"]

    def held_out_loss(decoder):
        with torch.no_grad():
            return float(decoder_distill_loss(decoder.decode(held_out["x0"]).sample, held_out["image"]).mean())

    torch.manual_seed(0)
    from students.models.vae import build_vae
    before = held_out_loss(build_vae("tiny"))
    losses = train(_cfg(str(tmp_path / "d"), tmp_path / "run", recipe="output_kd", decoder="tiny", batch_size=2, max_steps=8,
                        lr=1e-3, warmup_steps=1, checkpoint_every=8, ema_decay=0.0, audit_keys=1))
    assert losses[-1] < losses[0]
    audit = json.load(open(tmp_path / "run" / "ranks" / "rank-0.json"))
    assert sorted(audit["keys_by_epoch"]["0"]) == sorted(r.key for r in records)  # the one shard, every sample
    decoder = AutoencoderTiny.from_pretrained(str(tmp_path / "run" / "checkpoints" / "step-0000008" / "decoder"))
    assert held_out_loss(decoder) < 0.5 * before


def test_shapes_dump_refuses_a_preset_of_another_text_width_and_its_decoders_follow_the_f4_vae(tmp_path):
    """The ``shapes`` teacher: text width 64 and an f4 VAE (8x8 latents, 32 px images). ``--preset tiny``
    (width 32) is one line before anything is written; ``--decoder tiny``/``pruned`` train at factor 4 and
    decode the dump's latents to the teacher's image size."""
    from core.errors import UserError
    from conftest import dump_argv
    from diffusers import AutoencoderKL, AutoencoderTiny
    from pipelines import teacher_dump
    from students.models.vae import decode
    from teachers.shapes import world

    world.write_captions(str(tmp_path / "p.txt"), 4, seed=3)
    teacher_dump.run(dump_argv(tmp_path / "p.txt", tmp_path / "d", teacher="shapes", num_inference_steps=2, batch_size=4,
                               feature_layers="", save_images=True, cpu_threads=1))
    data = str(tmp_path / "d")
    with pytest.raises(UserError, match=r"--preset tiny has cross_attention_dim 32 but .* prompt embeddings of width 64; "
                                        r"presets that fit: shapes"):
        train(_cfg(data, tmp_path / "wrong", preset="tiny", recipe="output_kd"))
    assert not (tmp_path / "wrong").exists()
    z = torch.from_numpy(next(iter(record_pipeline(dataset_shards(data)))).latents[-1:].astype(np.float32))
    assert z.shape == (1, 4, 8, 8)
    for name, cls in (("tiny", AutoencoderTiny), ("pruned", AutoencoderKL)):
        out = tmp_path / name
        losses = train(_cfg(data, out, preset="shapes", recipe="output_kd", decoder=name, batch_size=2, max_steps=1,
                            checkpoint_every=1, ema_decay=0.0))
        assert len(losses) == 1 and np.isfinite(losses[0])
        decoder = cls.from_pretrained(str(out / "checkpoints" / "step-0000001" / "decoder")).eval()
        with torch.no_grad():
            assert decode(decoder, z).shape == (1, 3, 32, 32)  # the teacher's images: 4x the 8x8 latent


def test_sdxl_shaped_dump_trains_and_online_equals_offline(tmp_path, tiny_xl_teacher):
    from conftest import dump_argv
    from pipelines import teacher_dump
    from shards.loader import read_dataset

    (tmp_path / "p.txt").write_text("".join(f"a {c} cube number {i}\n" for c in ("red", "blue") for i in range(4)))
    teacher_dump.run(dump_argv(tmp_path / "p.txt", tmp_path / "d", teacher="tiny-xl", num_inference_steps=3,
                               samples_per_shard=8, feature_layers="mid_block", num_feature_steps=1, cpu_threads=None))
    dataset, shared = read_dataset(str(tmp_path / "d"))
    assert set(shared) == {"negative_prompt_embeds", "negative_pooled_prompt_embeds"}
    recipe = get_recipe("snapgen_kd", feature_weights=(("mid_block", 1.0),))
    records = list(record_pipeline(dataset_shards(str(tmp_path / "d"))))[:4]
    data = training_batch(records, shared, recipe, seed=0, epoch=0, scheduler_config=records[0].meta["scheduler_config"])
    batch = data["batch"]
    assert batch["added"]["text_embeds"].shape == (4, 32) and batch["added"]["time_ids"].shape == (4, 6)
    online = online_targets(tiny_xl_teacher.unet, batch["z"], batch["t"], batch["cond"], batch["uncond"], ["mid_block"],
                            batch["added"], batch["added_uncond"])
    np.testing.assert_allclose(online["pred_cond"].numpy(), data["targets"]["pred_cond"].numpy(), atol=2e-2, rtol=1e-2)
    np.testing.assert_allclose(online["feats"]["mid_block"].numpy(), data["targets"]["feats"]["mid_block"].numpy(),
                               atol=2e-2, rtol=1e-2)
    losses = train(_cfg(str(tmp_path / "d"), tmp_path / "run", preset="tiny_xl", recipe="output_kd", max_steps=2,
                        batch_size=4, checkpoint_every=2))
    assert len(losses) == 2 and all(np.isfinite(losses))


# ------------------------------------------------------------------------------------------
# corrupt data, non-finite losses, exact resume for every recipe, fsspec outputs
# ------------------------------------------------------------------------------------------


def _rewrite_member(shard, key, ext, change):
    """Rewrite shard tar ``shard`` with member ``key.ext`` replaced by ``change(bytes)``."""
    import io
    import tarfile

    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for m, data in members:
            if m.name == f"{key}.{ext}":
                data = change(data)
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data))


def _corrupt_copy(tiny_dump, dst):
    """A copy of the dump with planted faults; -> the keys of its 4 shards.

    keys[0][1]: a NaN latent whose index checksum is rewritten to match (the loader's finiteness check
    must catch it); keys[3][0]: a NaN latent with the index left alone (the CRC-32 catches it first);
    keys[1][2]: 8 flipped bytes in pred_cond (finite values still: only the checksum sees it);
    shard 2: truncated mid-file (its last sample loses members)."""
    import shutil

    from shards import record
    from shards.schema import ShardIndex

    shutil.copytree(tiny_dump, dst)
    keys = [json.load(open(dst / f"{i:06d}.json"))["keys"] for i in range(4)]

    def plant_nan(data):
        array = record.load_npy(data).copy()
        array[1, 0, 0, 0] = np.nan
        return record.npy_bytes(array)

    _rewrite_member(dst / "000000.tar", keys[0][1], "latents.npy", plant_nan)
    index = ShardIndex.read(str(dst), 0)
    assert index.checksums is not None  # the dump writes per-member CRC-32s
    sums = [dict(c) for c in index.checksums]
    sums[1]["latents.npy"] = record.member_checksum(plant_nan(_member(tiny_dump, 0, keys[0][1], "latents.npy")))
    dataclasses.replace(index, checksums=sums).write(str(dst), 0)
    _rewrite_member(dst / "000003.tar", keys[3][0], "latents.npy", plant_nan)

    def flip(data):
        buf = bytearray(data)
        for i in range(len(buf) - 8, len(buf)):
            buf[i] ^= 0x01  # the last 8 bytes of the array data: finite values still, only the checksum sees it
        return bytes(buf)

    _rewrite_member(dst / "000001.tar", keys[1][2], "pred_cond.npy", flip)
    with open(dst / "000002.tar", "r+b") as f:  # truncated mid-file: its last sample loses members
        f.truncate(os.path.getsize(dst / "000002.tar") // 2 + 700)
    return keys


def _member(root, shard, key, ext):
    import tarfile

    with tarfile.open(os.path.join(root, f"{shard:06d}.tar")) as tar:
        return tar.extractfile(f"{key}.{ext}").read()


def test_corrupt_samples_are_skipped_and_counted_with_their_keys_from_every_worker(tiny_dump, tmp_path):
    from students.training.train import Batches

    keys = _corrupt_copy(tiny_dump, tmp_path / "d")
    cfg = _cfg(str(tmp_path / "d"), tmp_path / "run", num_workers=2, batch_size=32, shuffle_buffer=0)
    batches = Batches(cfg, dataset_shards(str(tmp_path / "d")))
    seen = [r.key for r in batches.next()]  # the whole epoch: a partial batch ends it
    assert batches.epoch == 1
    stats = batches.stats  # gathered in the main process from both DataLoader workers
    skipped = {s.key: s.reason for s in stats.skips if s.key is not None}
    assert skipped[keys[0][1]] == "non_finite" and skipped[keys[1][2]] == "checksum_mismatch"
    assert skipped[keys[3][0]] == "checksum_mismatch"
    # the truncated shard: its cut sample counted with its key (members missing), a tar error without one
    planted = {keys[0][1], keys[1][2], keys[3][0]}
    assert set(skipped) - planted <= set(keys[2]) and stats.reasons.get("missing_member", 0) >= 1
    assert stats.skipped == len(stats.skips) >= 4 and stats.samples == len(seen) == len(set(seen))
    intact = {k for i in (0, 1, 3) for k in keys[i]} - planted
    assert intact <= set(seen) and set(seen) <= intact | set(keys[2])  # every good sample read, once
    losses = train(_cfg(str(tmp_path / "d"), tmp_path / "run", recipe="output_kd", max_steps=2, num_workers=2))
    assert len(losses) == 2 and all(np.isfinite(losses))


def test_a_non_finite_loss_stops_training_after_the_last_good_checkpoint(tiny_dump, tmp_path, monkeypatch, capsys):
    from students.training import cli
    from students.training import train as T

    real, calls = T.compute_losses, []

    def poisoned(*args, **kwargs):
        terms = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:  # step 3
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(T, "compute_losses", poisoned)
    out = tmp_path / "run"
    argv = ["--data", tiny_dump, "--output", str(out), "--recipe", "output_kd", "--batch_size", "4", "--max_steps", "6",
            "--checkpoint_every", "2", "--shuffle_buffer", "0"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len([l for l in err.splitlines() if "error" in l]) == 1
    line = err.strip().splitlines()[-1]  # after the progress bar
    assert line.startswith("distill train: error: non-finite loss at step 3")
    assert "step-0000002" in line and "p00000" in line  # the last good checkpoint and the batch's keys
    assert sorted(os.listdir(out / "checkpoints")) == ["step-0000002"]
    assert [json.loads(l)["step"] for l in (out / "losses.jsonl").read_text().splitlines()] == [1, 2]


def _final_state(out, step):
    from safetensors.torch import load_file

    folder = out / "checkpoints" / f"step-{step:07d}"
    weights = {f"{sub}/{k}": v for sub in ("student", "ema") if (folder / sub).exists()
               for k, v in load_file(folder / sub / "diffusion_pytorch_model.safetensors").items()}
    if (folder / "distill_head.safetensors").exists():
        weights.update({f"head/{k}": v for k, v in load_file(folder / "distill_head.safetensors").items()})
    return weights, torch.load(folder / "trainer_state.pt", weights_only=True)


def _assert_same_state(a, b):
    (wa, sa), (wb, sb) = a, b
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert sa["step"] == sb["step"] and sa["data"] == sb["data"]
    for name, value in sa["rng"].items():  # torch, generator, numpy and python RNGs: the uninterrupted run's
        assert torch.equal(value, sb["rng"][name]) if torch.is_tensor(value) else value == sb["rng"][name], name
    flat = lambda s: [v for st in s["optimizer"]["state"].values() for v in st.values()]  # noqa: E731
    assert all(torch.equal(x, y) for x, y in zip(flat(sa), flat(sb)))


def _logged(out):
    rows = [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))  # one line per step, resumed or not
    return rows


@pytest.mark.parametrize("recipe_name", ["output_kd", "snapgen_kd", "snapfusion_step", "bk_sdm"])
def test_stop_and_resume_equals_the_uninterrupted_run_for_every_recipe(recipe_name, tiny_dump, tmp_path):
    import dataclasses

    import random

    recipe = get_recipe(recipe_name)
    if recipe_name == "bk_sdm":  # the tiny teacher has two stages: distil the blocks the dump recorded
        recipe = dataclasses.replace(recipe, feature_weights=(("mid_block", 1.0), ("up_blocks.0", 1.0)))
    if recipe.step_weight > 0:  # the tiny dump has 4 teacher steps: a 2-step student (the default 8 is refused)
        recipe = dataclasses.replace(recipe, student_steps=2)
    kw = dict(recipe=recipe_name, max_steps=3, checkpoint_every=1, keep_checkpoints=3, batch_size=2)
    ref = train(_cfg(tiny_dump, tmp_path / "ref", **kw), recipe=recipe)
    after_ref = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    first = train(_cfg(tiny_dump, tmp_path / "run", **kw), recipe=recipe, stop_after=1)
    assert len(first) == 1 and sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["step-0000001"]
    rest = train(_cfg(tiny_dump, tmp_path / "run", **kw), recipe=recipe)
    assert first + rest == ref and len(ref) == 3
    assert torch.equal(torch.get_rng_state(), after_ref[0]) and np.array_equal(np.random.get_state()[1], after_ref[1])
    assert random.getstate() == after_ref[2]  # the process RNGs end where the uninterrupted run's did
    assert _logged(tmp_path / "run") == _logged(tmp_path / "ref")  # every logged value, every step
    for step in (1, 2, 3):
        _assert_same_state(_final_state(tmp_path / "run", step), _final_state(tmp_path / "ref", step))


def test_train_and_export_to_an_fsspec_memory_filesystem(tiny_dump, tmp_path):
    import fsspec

    from students.export import folder as export
    from students.training.checkpoint import checkpoints

    out = "memory://dd-run"
    losses = train(_cfg(tiny_dump, out, recipe="output_kd", max_steps=2, checkpoint_every=1, keep_checkpoints=1))
    fs = fsspec.filesystem("memory")
    assert checkpoints(out) == ["memory://dd-run/checkpoints/step-0000002"]
    assert fs.exists("/dd-run/checkpoints/step-0000002/student/diffusion_pytorch_model.safetensors")
    assert [json.loads(l)["step"] for l in fs.cat_file("/dd-run/losses.jsonl").decode().splitlines()] == [1, 2]
    stale = fs.cat_file("/dd-run/losses.jsonl") + b'{"step": 3, "loss": 9.0}\n'  # logged, then killed before step 3's checkpoint
    fs.pipe_file("/dd-run/losses.jsonl", stale)
    more = train(_cfg(tiny_dump, out, recipe="output_kd", max_steps=3, checkpoint_every=1, keep_checkpoints=1,
                       extend=True))  # on purpose: one step more than the run was started with
    assert len(losses) == 2 and len(more) == 1  # resumed from the memory checkpoint
    rows = [json.loads(l) for l in fs.cat_file("/dd-run/losses.jsonl").decode().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[2]["loss"] == more[0]  # the stale line replaced, not kept
    path = export.export(out, "memory://dd-export")
    assert path == "memory://dd-export" and export.read_inference(path)["step"] == 3
    for name in ("model_index.json", "unet/diffusion_pytorch_model.safetensors", "unet/student_unet.py", "README.md"):
        assert fs.exists(f"/dd-export/{name}"), name
    with pytest.raises(export.ExportError, match="pass --overwrite"):
        export.export(out, "memory://dd-export")
    export.export(out, "memory://dd-export", overwrite=True, weights="raw")
    assert export.read_inference("memory://dd-export")["weights"] == "raw"


def test_init_from_starts_from_the_runs_weights_with_a_fresh_optimizer(tiny_dump, tmp_path):
    """SnapGen's order as two commands: a feature-KD run, then a step-distillation run started from its EMA
    weights. The second run is new: its optimizer and LR schedule start at step 0, only the weights come along."""
    from safetensors.torch import load_file

    from core.errors import UserError

    first, second = tmp_path / "kd", tmp_path / "step"
    train(_cfg(tiny_dump, first, max_steps=2, ema_decay=0.5))
    source = first / "checkpoints" / "step-0000002"
    start = load_file(str(source / "ema" / "diffusion_pytorch_model.safetensors"))
    raw = load_file(str(source / "student" / "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(start[k], raw[k]) for k in start)  # EMA and raw differ: which one came along shows
    from students.training.train import lr_lambda

    cfg = _cfg(tiny_dump, second, preset=None, init_from=str(first), recipe="snapfusion_step", student_steps=2,
               max_steps=1, checkpoint_every=1, weight_decay=0.01)
    train(cfg)
    state = torch.load(str(second / "checkpoints" / "step-0000001" / "trainer_state.pt"), weights_only=True)
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {1}  # fresh AdamW: one step taken
    assert state["lr_scheduler"]["last_epoch"] == 1  # the schedule restarted: one step into its warmup
    lr_1 = cfg.lr * lr_lambda(cfg)(0)  # the rate of the new run's first step
    after = load_file(str(second / "checkpoints" / "step-0000001" / "student" / "diffusion_pytorch_model.safetensors"))
    # one AdamW step moves a weight by at most lr_1 (1 + wd |w|) (the update's elementwise size is <= 1)
    for k, w in start.items():
        assert ((after[k] - w).abs() <= lr_1 * (1 + 0.01 * w.abs()) * (1 + 1e-3) + 1e-7).all(), k
    assert any(not torch.equal(after[k], start[k]) for k in start)
    with pytest.raises(UserError, match="--init_from"):
        _cfg(tiny_dump, tmp_path / "x", init_from=str(first))  # with --preset tiny: one or the other
    with pytest.raises(UserError, match="neither a checkpoint folder"):
        train(_cfg(tiny_dump, tmp_path / "y", preset=None, init_from=str(tmp_path / "nothing")))


def test_a_kill_during_a_save_leaves_nothing_after_the_resume(tiny_dump, tmp_path):
    """Killed while writing checkpoint 4 (its folder still under its temporary name, steps 3 and 4 logged,
    the last line cut short): the resumed run removes the temporaries and logs each step once, as an
    uninterrupted run does."""
    kw = dict(recipe="output_kd", max_steps=6, checkpoint_every=2, keep_checkpoints=3, batch_size=2)
    train(_cfg(tiny_dump, tmp_path / "ref", **kw))
    run, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    train(_cfg(tiny_dump, run, **kw), stop_after=4)
    os.rename(ckpts / "step-0000004", ckpts / "step-0000004.tmp-abc")
    (ckpts / "step-0000009.tmp-abc").mkdir()
    (ckpts / "step-0000009.tmp-abc" / "trainer_state.pt").write_bytes(b"partial")
    with open(run / "losses.jsonl", "a", encoding="utf-8") as f:
        f.write('{"step": 5, "loss": 0.')
    assert len(train(_cfg(tiny_dump, run, **kw))) == 4  # resumed from step 2
    assert sorted(os.listdir(ckpts)) == ["step-0000002", "step-0000004", "step-0000006"]
    lines = (run / "losses.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5, 6]
    assert lines == (tmp_path / "ref" / "losses.jsonl").read_text().splitlines()


def test_a_kill_inside_a_checkpoint_swap_resumes_from_the_swapped_out_checkpoint(tiny_dump, tmp_path):
    """Killed between ``publish_folder``'s two renames while saving step 4 again: ``step-0000004`` is
    ``step-0000004.old-<uuid>`` (the only complete copy) beside the new one's temporary. The re-run puts
    it back and resumes from step 4, the temporary gone."""
    kw = dict(recipe="output_kd", max_steps=6, checkpoint_every=2, keep_checkpoints=3, batch_size=2)
    train(_cfg(tiny_dump, tmp_path / "ref", **kw))
    run, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    train(_cfg(tiny_dump, run, **kw), stop_after=4)
    os.rename(ckpts / "step-0000004", ckpts / f"step-0000004.old-{'c' * 32}")
    (ckpts / "step-0000004.tmp-def").mkdir()
    assert len(train(_cfg(tiny_dump, run, **kw))) == 2  # steps 5 and 6: resumed from step 4
    assert sorted(os.listdir(ckpts)) == ["step-0000002", "step-0000004", "step-0000006"]
    assert (run / "losses.jsonl").read_text().splitlines() == (tmp_path / "ref" / "losses.jsonl").read_text().splitlines()


def test_a_batch_larger_than_the_data_is_said_and_its_speed_counts_what_was_read(tiny_dump, tmp_path, capsys, monkeypatch):
    """``--batch_size 1000`` on 16 samples logged samples_s as if 1000 had been read."""
    from students.training import train as train_module

    taken = []
    real_next = train_module.Batches.next

    def next_batch(self):
        records = real_next(self)
        taken.append((len(records), self.taken))
        return records

    monkeypatch.setattr(train_module.Batches, "next", next_batch)  # the real batches, seen as they pass
    losses = train(_cfg(tiny_dump, tmp_path / "run", recipe="output_kd", batch_size=1000, max_steps=1, shuffle_buffer=0))
    assert len(losses) == 1 and np.isfinite(losses[0])
    assert taken == [(16, 16)]  # the whole epoch, counted as 16
    assert (f"distill train: warning: --batch_size 1000 is more than the 16 samples of {tiny_dump!r}: each batch is "
            "the whole epoch (16 samples or fewer)") in capsys.readouterr().err.splitlines()


def test_a_rerun_with_another_recipe_is_refused_and_a_finished_run_says_so(tiny_dump, tmp_path, capsys):
    from core.errors import UserError

    out = tmp_path / "run"
    train(_cfg(tiny_dump, out, recipe="output_kd", max_steps=2))
    for change, words in ((dict(recipe="snapgen_kd"), "--recipe 'output_kd' -> 'snapgen_kd'"),
                          (dict(lr=5e-4), "--lr 0.001 -> 0.0005"),
                          (dict(max_steps=4), "started with --max_steps 2, not 4"),
                          (dict(max_steps=1), "at step 2, past --max_steps 1")):
        with pytest.raises(UserError, match=re.escape(words)):
            train(_cfg(tiny_dump, out, **dict(dict(recipe="output_kd", max_steps=2), **change)))
    assert train(_cfg(tiny_dump, out, recipe="output_kd", max_steps=2)) == []  # finished: nothing to do
    assert "is finished (step 2 of --max_steps 2)" in capsys.readouterr().err
    assert len(train(_cfg(tiny_dump, out, recipe="output_kd", max_steps=3, extend=True))) == 1  # on purpose


def test_a_second_trainer_into_one_run_folder_is_refused_and_a_stale_lock_is_taken_over(tiny_dump, tmp_path, capsys):
    import socket
    import subprocess
    import sys

    from core.errors import UserError
    from core.fs import LOCK_FILE

    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:  # a live writer on this host holds the folder
        (out / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid, "started": 0,
                                                 "what": "distill train"}))
        with pytest.raises(UserError, match=f"being written by distill train \\(pid {holder.pid}"):
            train(_cfg(tiny_dump, out, max_steps=1))
        assert sorted(os.listdir(out)) == [LOCK_FILE]  # nothing written beside the other writer's files
    finally:
        holder.kill()
        holder.wait()
    capsys.readouterr()
    assert len(train(_cfg(tiny_dump, out, max_steps=1))) == 1  # its holder is gone: the lock is stale
    assert f"taking over the stale lock of distill train (pid {holder.pid}" in capsys.readouterr().err
    assert not (out / LOCK_FILE).exists()  # released at the end


def test_the_fast_step_kernels_train_the_same_run_to_rounding(tiny_dump, tmp_path):
    """channels-last memory format and the fused AdamW kernel are speed knobs: the same run trained with
    them and without gives the same losses and weights to float32 rounding. Adam divides by the gradient's
    own size, so a weight whose gradient is ~0 can take a step of up to lr either way on a rounding
    difference: every weight is within 2 lr per step, and all but a few within 1e-6 (measured: 99.99%)."""
    steps, lr = 4, 1e-3
    kw = dict(max_steps=steps, checkpoint_every=steps, batch_size=2, lr=lr, warmup_steps=1)
    fast = train(_cfg(tiny_dump, tmp_path / "fast", **kw))
    plain = train(_cfg(tiny_dump, tmp_path / "plain", channels_last=False, fused_optimizer=False, **kw))
    assert fast == pytest.approx(plain, rel=1e-4)
    (a, _), (b, _) = _final_state(tmp_path / "fast", steps), _final_state(tmp_path / "plain", steps)
    assert a.keys() == b.keys()
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert float(diff.max()) <= 2 * lr * steps
    assert float((diff > 1e-6).float().mean()) < 1e-3


def test_compile_is_refused_with_robust_training(tiny_dump, tmp_path):
    from core.errors import UserError

    recipe = dataclasses.replace(get_recipe("snapgen_kd"), robust_skip_prob=0.1)
    with pytest.raises(UserError, match="--compile"):
        train(_cfg(tiny_dump, tmp_path / "r", compile=True), recipe=recipe)
    assert not (tmp_path / "r").exists()
