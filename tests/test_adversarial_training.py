"""Adversarial recipes in the trainer: snapgen_adv and ufogen run, log every term, keep the teacher
backbone bit-identical while the heads train, reach the student through the backbone, and resume exactly."""

import json

import pytest
import torch
from safetensors.torch import load_file

from students.distill import adversarial
from shards.loader import dataset_shards, read_dataset, record_pipeline
from students.distill.batches import training_batch
from students.distill.recipes import compute_losses, get_recipe
from students.training.train import TrainConfig, train

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.numerics]  # numerics: rerun on AVX2 kernels (CI)


def _cfg(data, out, **kw):
    base = dict(data=data, output=str(out), preset="tiny", batch_size=2, max_steps=3, warmup_steps=1,
                checkpoint_every=1, keep_checkpoints=3, shuffle_buffer=4, lr=1e-3, disc_lr=1e-2, r1_every=2)
    return TrainConfig(**{**base, **kw})


def _logged(out):
    """Step (from 1) -> its losses.jsonl row, by line order (the step-distillation term is also named "step")."""
    with open(out / "losses.jsonl", encoding="utf-8") as f:
        return {i + 1: json.loads(line) for i, line in enumerate(f)}


def test_backbone_is_bit_identical_and_student_gets_gradient_from_the_adversarial_term_alone(tiny_dump):
    from students.models.unet import build_unet
    from teachers.load import load_teacher

    dataset, negative = read_dataset(tiny_dump)
    teacher_unet = load_teacher("tiny").unet
    before = {k: v.clone() for k, v in teacher_unet.state_dict().items()}
    for name in ("snapgen_adv", "ufogen"):
        # every distillation term off: the adversarial term is the student's only loss
        recipe = get_recipe(name, task_weight=0.0, output_weight=0.0, recon_weight=0.0,
                            dynamic_gamma=None, guidance_prob=0.0, adv_weight=1.0)
        cfg = _cfg(tiny_dump, "unused", recipe=name, r1_gamma=1.0, r1_every=1)
        adv = adversarial.build(cfg, recipe, dataset, teacher_unet, torch.device("cpu"))
        heads_before = {k: v.clone() for k, v in adv.disc.heads.state_dict().items()}
        torch.manual_seed(0)
        student = build_unet("tiny")
        records = list(record_pipeline(dataset_shards(tiny_dump)))[:2]
        data = training_batch(records, negative, recipe, seed=0, epoch=0, scheduler_config=dataset.scheduler_config)
        gen = torch.Generator().manual_seed(0)
        abar = adversarial.training_schedule(dataset, "cpu")
        outputs = {}
        compute_losses(student, torch.nn.ModuleDict(), data["batch"], data["targets"], recipe, abar, gen, outputs=outputs)
        terms = adv.generator_terms({"loss": torch.zeros(())}, outputs["x0"], data["batch"], gen, step=1)
        terms["adv_g"].backward()
        grads = [p.grad for p in student.parameters() if p.grad is not None]
        assert grads and sum(float(g.abs().sum()) for g in grads) > 0  # through the frozen backbone
        assert all(p.grad is None for p in adv.disc.heads.parameters())  # the generator pass leaves the heads alone
        logged = adv.discriminator_step(step=1)
        assert set(logged) == {"loss/adv_d", "loss/r1", "disc/acc_real", "disc/acc_fake"}
        assert all(torch.equal(before[k], v) for k, v in teacher_unet.state_dict().items())
        assert all(p.grad is None for p in teacher_unet.parameters())
        assert any(not torch.equal(heads_before[k], v) for k, v in adv.disc.heads.state_dict().items())


def test_ufogen_posterior_inputs_share_noise_and_are_judged_at_the_next_level(tiny_dump):
    """Real and fake posterior samples differ by exactly the x0 coefficient times (x0_pred - x0)."""
    dataset, negative = read_dataset(tiny_dump)
    recipe = get_recipe("ufogen")
    cfg = _cfg(tiny_dump, "unused", recipe="ufogen")
    from teachers.load import load_teacher

    adv = adversarial.build(cfg, recipe, dataset, load_teacher("tiny").unet, torch.device("cpu"))
    records = list(record_pipeline(dataset_shards(tiny_dump)))[:2]
    batch = training_batch(records, negative, recipe, seed=0, epoch=0, scheduler_config=dataset.scheduler_config)["batch"]
    x0_pred = torch.randn_like(batch["x0"])
    fake, real, t = adv.discriminator_inputs(x0_pred, batch, torch.Generator().manual_seed(0))
    a_t, s_t, a_s, s_s = (batch[k].double() for k in ("alpha", "sigma", "alpha_next", "sigma_next"))
    coef = a_s * (s_t ** 2 - (a_t / a_s) ** 2 * s_s ** 2) / s_t ** 2
    want = coef.view(-1, 1, 1, 1) * (x0_pred.double() - batch["x0"].double())
    torch.testing.assert_close((fake - real).double(), want, rtol=1e-4, atol=1e-5)
    abar = adversarial.training_schedule(dataset, "cpu")
    assert torch.equal(t, abar.sub(a_s.float()[:, None] ** 2).abs().argmin(1).float())


@pytest.mark.parametrize("recipe_name", ["snapgen_adv", "ufogen"])
def test_adversarial_run_logs_every_term_trains_the_heads_and_resumes_exactly(recipe_name, tiny_dump, tmp_path):
    kw = dict(recipe=recipe_name, r1_gamma=1.0, adv_warmup=1)
    ref = train(_cfg(tiny_dump, tmp_path / "ref", **kw))
    assert len(ref) == 3 and all(torch.isfinite(torch.tensor(ref)))
    rows = _logged(tmp_path / "ref")
    for row in rows.values():
        for key in ("loss/adv_d", "disc/acc_real", "disc/acc_fake") + (("loss/recon",) if recipe_name == "ufogen" else ()):
            assert key in row and torch.isfinite(torch.tensor(row[key]))
    assert "loss/r1" in rows[2] and "loss/r1" not in rows[1] and "loss/r1" not in rows[3]  # lazy R1 every 2 steps
    ckpts = sorted((tmp_path / "ref" / "checkpoints").iterdir())
    first, last = load_file(str(ckpts[0] / "disc_heads.safetensors")), load_file(str(ckpts[-1] / "disc_heads.safetensors"))
    assert any(not torch.equal(first[k], last[k]) for k in first)  # the heads train
    first = train(_cfg(tiny_dump, tmp_path / "run", **kw), stop_after=1)
    rest = train(_cfg(tiny_dump, tmp_path / "run", **kw))
    assert first + rest == ref  # exact: the discriminator heads and their AdamW state resume too
    a, b = _logged(tmp_path / "ref"), _logged(tmp_path / "run")
    assert [a[s]["loss/adv_d"] for s in sorted(a)] == [b[s]["loss/adv_d"] for s in sorted(b)]
    assert "loss/adv_g" not in a[1] and "loss/adv_g" in a[2]  # --adv_warmup 1
    last = sorted((tmp_path / "ref" / "checkpoints").iterdir())[-1].name
    ra = load_file(str(tmp_path / "ref" / "checkpoints" / last / "disc_heads.safetensors"))
    rb = load_file(str(tmp_path / "run" / "checkpoints" / last / "disc_heads.safetensors"))
    assert all(torch.equal(ra[k], rb[k]) for k in ra)


def test_bad_adversarial_flags_are_one_line_user_errors(tiny_dump):
    from core.errors import UserError
    from teachers.load import load_teacher

    with pytest.raises(UserError, match="--disc_lr"):
        _cfg(tiny_dump, "unused", recipe="ufogen", disc_lr=0.0)
    with pytest.raises(UserError, match="--r1_every"):
        _cfg(tiny_dump, "unused", recipe="ufogen", r1_every=0)
    dataset, _ = read_dataset(tiny_dump)
    for layers in ("up_blocks.0", "down_blocks.7"):
        with pytest.raises(UserError, match="--disc_layers"):
            adversarial.build(_cfg(tiny_dump, "unused", recipe="ufogen", disc_layers=layers), get_recipe("ufogen"),
                              dataset, load_teacher("tiny").unet, torch.device("cpu"))


def test_two_process_ddp_with_grad_accumulation_keeps_ranks_and_discriminator_heads_equal(tiny_dump, tmp_path, torchrun):
    """The heads are outside DDP (their gradients are all-reduced by hand): if that averaging were missing,
    the two ranks' heads would part after one step, since each rank judges different samples."""
    import subprocess

    launch, env = torchrun
    out = tmp_path / "ddp"
    proc = subprocess.run([*launch, "-m", "students.training", "--data", tiny_dump,
                           "--output", str(out), "--preset", "tiny", "--recipe", "snapgen_adv", "--student_steps", "2",
                           "--batch_size", "1", "--grad_accum", "2", "--max_steps", "2", "--warmup_steps", "1",
                           "--disc_lr", "1e-2", "--checkpoint_every", "2", "--shuffle_buffer", "0", "--audit_keys", "1"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.load(open(out / "ranks" / f"rank-{r}.json")) for r in (0, 1))
    assert r0["weights_sha256"] == r1["weights_sha256"]
    assert r0["disc_heads_sha256"] == r1["disc_heads_sha256"]
    rows = _logged(out)
    assert len(rows) == 2 and all("loss/adv_g" in row and "disc/acc_real" in row for row in rows.values())
    ckpt = sorted((out / "checkpoints").iterdir())[-1]
    heads = load_file(str(ckpt / "disc_heads.safetensors"))
    assert all(torch.isfinite(v).all() for v in heads.values())


@pytest.mark.parametrize("recipe_name,steps", [("ufogen", 1), ("snapgen_adv", 2)])
def test_adversarial_recipes_lower_the_held_out_gap_to_the_teacher_on_a_tiny_budget(recipe_name, steps, tiny_dump, tmp_path):
    """The few-step student's x0 at its first jump against the teacher's final latent, on a held-out
    shard (trained on the others), after 1 step against after 8: the gap must shrink."""
    import os
    import shutil

    import numpy as np

    from students.training.checkpoint import checkpoints
    from students.training.runs import load_student_unet

    train_dir = tmp_path / "data"
    shutil.copytree(tiny_dump, train_dir)
    urls = dataset_shards(tiny_dump)
    held_out = list(record_pipeline(urls[-1:]))
    meta = json.load(open(os.path.join(tiny_dump, "dataset.json")))
    negative = np.load(os.path.join(tiny_dump, meta["shared"]["negative_prompt_embeds"]))
    meta["shards"] = meta["shards"][:-1]  # hold the last shard out of training
    (train_dir / "dataset.json").write_text(json.dumps(meta))
    recipe = get_recipe(recipe_name, student_steps=steps)

    def gap(ckpt) -> float:
        student = load_student_unet(ckpt, weights="raw")
        data = training_batch(held_out, negative, recipe, seed=1, epoch=0,
                              scheduler_config=held_out[0].meta["scheduler_config"])
        batch = data["batch"]
        outputs = {}
        with torch.no_grad():
            compute_losses(student, torch.nn.ModuleDict(), batch, data["targets"], recipe,
                           adversarial.training_schedule(read_dataset(tiny_dump)[0], "cpu"), torch.Generator().manual_seed(0),
                           outputs=outputs)
        return float((outputs["x0"] - batch["x0"]).pow(2).mean())

    cfg = _cfg(str(train_dir), tmp_path / "run", recipe=recipe_name, student_steps=steps, max_steps=8, batch_size=2,
               checkpoint_every=1, keep_checkpoints=8, lr=3e-3)
    train(cfg)
    ckpts = checkpoints(str(tmp_path / "run"))
    assert gap(ckpts[-1]) < 0.75 * gap(ckpts[0])  # measured: 0.45x (ufogen) and 0.51x (snapgen_adv) after 8 steps


# ---------------------------------------------------------------------------------------------
# real images as the discriminator's "real" side (dump --real_images, train --adv_real image)
# ---------------------------------------------------------------------------------------------

SHAPES_CAPTIONS = ("a large red circle in the center on a white background",
                   "a large blue square at the top left on a black background",
                   "a large yellow triangle at the bottom right on a grey background",
                   "a large green square in the center on a black background")


@pytest.fixture(scope="module")
def shapes_real_dump(tmp_path_factory):
    """The ``shapes`` teacher's dump of four captions (2 DDIM steps) with real-image latents, plus one
    caption outside the shapes grammar (no truth to render: rejected)."""
    from conftest import dump_argv
    from pipelines import teacher_dump

    tmp = tmp_path_factory.mktemp("real")
    (tmp / "p.txt").write_text("\n".join(SHAPES_CAPTIONS) + "\na photo of a cat\n")
    summary = teacher_dump.run(dump_argv(tmp / "p.txt", tmp / "out", teacher="shapes", num_inference_steps=2,
                                         feature_layers="", real_images=True, samples_per_shard=8, batch_size=None,
                                         cpu_threads=1))
    return str(tmp / "out"), summary


def test_real_image_latents_decode_to_the_caption_and_a_caption_without_truth_is_rejected(shapes_real_dump):
    """Planted answer: each record's image_latents, decoded by the teacher's VAE, is read back by the
    shapes analyser as its own caption (every attribute of every sample)."""
    import numpy as np

    from teachers.load import load_teacher
    from teachers.shapes.analyser import Adherence, load_analyser

    data, summary = shapes_real_dump
    assert summary["recipe"]["real_images"] is True
    assert summary["totals"]["samples_written"] == 4 and summary["rejects_by_reason"] == {"no_real_image": 1}
    records = sorted(record_pipeline(dataset_shards(data)), key=lambda r: r.key)
    assert [r.caption for r in records] == list(SHAPES_CAPTIONS)
    vae = load_teacher("shapes").pipe.vae
    z = torch.from_numpy(np.stack([r.image_latents for r in records]).astype(np.float32))
    assert z.shape == (4, 4, 8, 8)
    with torch.no_grad():
        images = (vae.decode(z / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    metric = Adherence(load_analyser())
    metric.update(images, [r.caption for r in records])
    assert metric.compute()["exact"] == 1.0
    # the real image is not the teacher's sample: its latents differ from the recorded final latent
    assert all(not np.allclose(r.image_latents, r.latents[-1], atol=0.1) for r in records)


def test_adv_real_image_without_real_latents_or_real_images_without_a_source_are_one_line_errors(tiny_dump, tmp_path):
    from core.errors import UserError
    from pipelines import teacher_dump

    with pytest.raises(UserError, match="--adv_real image needs real-image latents.*--real_images"):
        train(_cfg(tiny_dump, tmp_path / "run", recipe="snapgen_adv", adv_real="image"))
    assert not (tmp_path / "run" / "checkpoints").exists()
    with pytest.raises(UserError, match="--adv_real image only applies to the adversarial recipes"):
        _cfg(tiny_dump, tmp_path / "run", recipe="snapfusion_step", adv_real="image")
    (tmp_path / "p.txt").write_text("a red circle\n")
    with pytest.raises(UserError, match="--real_images: .* no 'image' column and teacher 'tiny' renders no ground truth"):
        teacher_dump.run(["--prompts", str(tmp_path / "p.txt"), "--output", str(tmp_path / "dump"), "--teacher", "tiny",
                          "--real_images"])
    assert not (tmp_path / "dump").exists()


@pytest.mark.parametrize("recipe_name", ["snapgen_adv", "ufogen"])
def test_adversarial_step_with_real_images_judges_their_latents_trains_the_heads_and_keeps_the_backbone(
        recipe_name, shapes_real_dump, tmp_path):
    import os

    from students.training.checkpoint import checkpoints
    from teachers.load import load_teacher

    data, _ = shapes_real_dump
    dataset, negative = read_dataset(data)
    teacher_unet = load_teacher("shapes").unet
    before = {k: v.clone() for k, v in teacher_unet.state_dict().items()}
    recipe = get_recipe(recipe_name, student_steps=2)
    cfg = _cfg(data, tmp_path / "run", preset="shapes", recipe=recipe_name, student_steps=2, adv_real="image",
               max_steps=2, r1_gamma=1.0, r1_every=1)
    adv = adversarial.build(cfg, recipe, dataset, teacher_unet, torch.device("cpu"))
    records = sorted(record_pipeline(dataset_shards(data)), key=lambda r: r.key)[:2]
    batch = training_batch(records, negative, recipe, seed=0, epoch=0, scheduler_config=dataset.scheduler_config,
                           with_image_latents=True)["batch"]
    x0_pred = torch.randn_like(batch["x0"])
    fake, real, t = adv.discriminator_inputs(x0_pred, batch, torch.Generator().manual_seed(0))
    # the real side is the real image's latents noised with the fake side's noise: both are alpha x + sigma eps
    # at one level for snapgen_adv; for ufogen the fake is the posterior sample, the real the marginal at s
    noise = torch.randn(batch["x0"].shape, generator=torch.Generator().manual_seed(0))
    if recipe_name == "snapgen_adv":
        from students.distill import losses as distill

        alpha, sigma = (v.view(-1, 1, 1, 1) for v in distill.alpha_sigma(adv.alphas_cumprod, t))
        torch.testing.assert_close(real, alpha * batch["image_latents"] + sigma * noise, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fake - real, alpha * (x0_pred - batch["image_latents"]), rtol=1e-4, atol=1e-5)
    else:
        a_s, s_s = (batch[k].view(-1, 1, 1, 1) for k in ("alpha_next", "sigma_next"))
        torch.testing.assert_close(real, a_s * batch["image_latents"] + s_s * noise, rtol=1e-5, atol=1e-5)
    # one discriminator step on the real-image inputs: the heads change, the teacher backbone is bit-identical
    heads_before = {k: v.clone() for k, v in adv.disc.heads.state_dict().items()}
    adv.generator_terms({"loss": torch.zeros(())}, x0_pred, batch, torch.Generator().manual_seed(0), step=1)
    logged = adv.discriminator_step(step=1)
    assert torch.isfinite(logged["loss/adv_d"]) and "loss/r1" in logged
    assert any(not torch.equal(heads_before[k], v) for k, v in adv.disc.heads.state_dict().items())
    assert all(torch.equal(before[k], v) for k, v in teacher_unet.state_dict().items())
    # and the trainer runs end to end with --adv_real image (every term finite, the heads saved and trained)
    losses = train(cfg)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    first, last = (load_file(os.path.join(c, "disc_heads.safetensors")) for c in checkpoints(str(tmp_path / "run"))[:2])
    assert any(not torch.equal(first[k], last[k]) for k in first)
