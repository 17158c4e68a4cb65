"""The trainer: offline = online targets, DDP on two gloo processes, kill-and-resume, it learns."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from students.data import dataset_shards, record_pipeline, training_batch
from students.objective import compute_losses, get_recipe, make_projections, online_targets
from students.train import TrainConfig, train


@pytest.fixture(scope="module")
def tiny_dump(tmp_path_factory):
    from pipelines import teacher_dump

    tmp = tmp_path_factory.mktemp("dump")
    (tmp / "p.txt").write_text("".join(f"a {c} {s} on a {b} background\n" for c in ("red", "blue") for s in
                                       ("circle", "square") for b in ("white", "grey", "green", "black")))
    teacher_dump.run(["--prompts", str(tmp / "p.txt"), "--output", str(tmp / "out"), "--teacher", "tiny",
                      "--num_inference_steps", "4", "--samples_per_shard", "4", "--batch_size", "8",
                      "--feature_layers", "mid_block,up_blocks.0", "--num_feature_steps", "2", "--progress", "off",
                      "--cpu_threads", "2"])
    return str(tmp / "out")


def _cfg(data, out, **kw):
    base = dict(data=data, output=str(out), preset="tiny", recipe="snapgen_kd", batch_size=4, max_steps=6,
                warmup_steps=2, checkpoint_every=2, shuffle_buffer=8, lr=1e-3)
    return TrainConfig(**{**base, **kw})


def test_offline_and_online_teachers_give_the_same_loss(tiny_dump, tiny_teacher):
    from students.unet import build_unet

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
    assert float(a["output"]) > 0


def test_kill_then_resume_gives_the_identical_loss_sequence(tiny_dump, tmp_path):
    # Both runs are subprocesses with the same environment: CPU rounding depends on the thread count,
    # and other tests in this process may have changed it.
    def args_for(out):
        return [sys.executable, "-m", "students.train", "--data", tiny_dump, "--output", str(out), "--preset", "tiny",
                "--recipe", "snapgen_kd", "--batch_size", "4", "--max_steps", "10", "--warmup_steps", "2",
                "--checkpoint_every", "2", "--shuffle_buffer", "8", "--lr", "1e-3"]

    subprocess.run(args_for(tmp_path / "ref"), check=True, capture_output=True)
    ref = [json.loads(line)["loss"] for line in (tmp_path / "ref" / "losses.jsonl").read_text().splitlines()]
    assert len(ref) == 10
    out = tmp_path / "killed"
    args = args_for(out)
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while not (out / "checkpoints" / "step-0000002").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "checkpoints" / "step-0000010").exists(), "finished before the kill"
    subprocess.run(args, check=True, capture_output=True)
    logged = {}
    for line in (out / "losses.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["step"] in logged:  # a step redone after the resume gives the same value
            assert logged[row["step"]] == row["loss"]
        logged[row["step"]] = row["loss"]
    assert [logged[s] for s in range(1, 11)] == ref  # bitwise on CPU, one process


def test_two_process_ddp_on_gloo(tiny_dump, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    # 16 samples in 4 shards, 2 ranks x batch 4: 2 steps = one epoch.
    proc = subprocess.run([torchrun, "--nnodes", "1", "--nproc_per_node", "2", "--rdzv_backend", "c10d",
                           "--rdzv_endpoint", f"127.0.0.1:{port}", "-m", "students.train", "--data", tiny_dump,
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
    from students.unet import EfficientUNet2DConditionModel, build_unet

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
    train(_cfg(str(train_dir), tmp_path / "run", recipe="output_kd", max_steps=60, lr=2e-3, warmup_steps=5,
               checkpoint_every=60, ema_decay=0.0, image_every=60))
    from PIL import Image
    grid = Image.open(tmp_path / "run" / "grids" / "step-0000060.png")
    assert grid.size == (110 + 4 * 128, 2 * 128)  # 4 prompts; teacher row and student row (EMA off)
    student = EfficientUNet2DConditionModel.from_pretrained(str(tmp_path / "run" / "checkpoints" / "step-0000060" / "student"))
    after = held_out_loss(student)
    assert after < 0.5 * before, (before, after)


def test_resampled_epochs_have_the_set_length_and_replay_on_resume(tiny_dump, tmp_path):
    from students.train import Batches

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

    from pipelines import teacher_dump
    from students.distill import decoder_distill_loss

    (tmp_path / "p.txt").write_text("".join(f"a {c} ball number {i}\n" for c in ("red", "blue") for i in range(6)))
    teacher_dump.run(["--prompts", str(tmp_path / "p.txt"), "--output", str(tmp_path / "d"), "--teacher", "tiny",
                      "--num_inference_steps", "2", "--samples_per_shard", "12", "--batch_size", "12",
                      "--feature_layers", "", "--save_images", "--progress", "off"])
    records = list(record_pipeline(dataset_shards(str(tmp_path / "d"))))
    held_out = training_batch(records[-4:], np.zeros((77, 32)), get_recipe("output_kd"), seed=0, epoch=0,
                              scheduler_config=records[0].meta["scheduler_config"], with_images=True)["batch"]

    def held_out_loss(decoder):
        with torch.no_grad():
            return float(decoder_distill_loss(decoder.decode(held_out["x0"]).sample, held_out["image"]).mean())

    torch.manual_seed(0)
    from students.vae import build_vae
    before = held_out_loss(build_vae("tiny"))
    train(_cfg(str(tmp_path / "d"), tmp_path / "run", recipe="output_kd", decoder="tiny", batch_size=2, max_steps=8,
               lr=1e-3, warmup_steps=1, checkpoint_every=8, ema_decay=0.0))
    decoder = AutoencoderTiny.from_pretrained(str(tmp_path / "run" / "checkpoints" / "step-0000008" / "decoder"))
    assert held_out_loss(decoder) < 0.5 * before


def test_sdxl_shaped_dump_trains_and_online_equals_offline(tmp_path, tiny_xl_teacher):
    from pipelines import teacher_dump
    from students.data import read_dataset

    (tmp_path / "p.txt").write_text("".join(f"a {c} cube number {i}\n" for c in ("red", "blue") for i in range(4)))
    teacher_dump.run(["--prompts", str(tmp_path / "p.txt"), "--output", str(tmp_path / "d"), "--teacher", "tiny-xl",
                      "--num_inference_steps", "3", "--samples_per_shard", "8", "--batch_size", "8",
                      "--feature_layers", "mid_block", "--num_feature_steps", "1", "--progress", "off"])
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
