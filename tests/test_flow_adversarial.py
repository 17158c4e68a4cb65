"""LADD on a flow teacher: ``flow_ladd`` / ``flow_step_adv`` on a tiny-sd3 dump (each term logged, finite,
the heads train, stop-and-resume exact), the transformer discriminator's features against the blocks' own
outputs, the re-noising on the rectified-flow path at LADD's logit-normal sigma, and the refusals."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from shards.loader import dataset_shards, read_dataset, record_pipeline
from students.distill import adversarial
from students.distill.batches import training_batch
from students.distill.recipes import DistillRecipe, compute_losses, get_recipe
from students.models.discriminator import TransformerFeatureDiscriminator
from students.training.train import TrainConfig, train

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.numerics]

CAPTIONS = ["a red cube on a table", "two blue birds", "a green tree", "a cat on a mat"]


@pytest.fixture(scope="module")
def flow_dump(tmp_path_factory):
    """tiny-sd3's dump of 4 captions: 4 Euler steps, all recorded (the jump rows), no block features."""
    from conftest import run_dump

    return run_dump(tmp_path_factory.mktemp("flow"), captions=CAPTIONS, teacher="tiny-sd3", feature_layers="",
                    num_inference_steps=4, guidance_scale=5.0, batch_size=4, record_steps="all")


@pytest.fixture(scope="module")
def transformer():
    from teachers.load import load_teacher

    return load_teacher("tiny-sd3").denoiser


def _cfg(data, out, **kw):
    base = dict(data=data, output=str(out), preset="tiny_sd3", recipe="flow_ladd", student_steps=2, batch_size=2,
                max_steps=3, warmup_steps=1, checkpoint_every=1, keep_checkpoints=3, shuffle_buffer=4, lr=1e-3,
                disc_lr=1e-2, ema_decay=0.0)
    return TrainConfig(**{**base, **kw})


def _logged(out):
    with open(os.path.join(out, "losses.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _batch(flow_dump, recipe, n=2):
    dataset, negative = read_dataset(flow_dump)
    records = sorted(record_pipeline(dataset_shards(flow_dump)), key=lambda r: r.key)[:n]
    return dataset, training_batch(records, negative, recipe, seed=0, epoch=0, scheduler_config={})


# -- (a) the trainer ---------------------------------------------------------------------------------

@pytest.mark.parametrize("recipe_name, student_terms, layers", [
    ("flow_ladd", {"step"}, []),  # the default: a head on every joint block
    ("flow_step_adv", {"step", "output", "task"}, ["--disc_layers", "transformer_blocks.3"]),
])
def test_flow_adversarial_run_logs_every_term_trains_the_heads_and_resumes_exactly(flow_dump, tmp_path, recipe_name,
                                                                                     student_terms, layers):
    from diffusion_distill.cli import main
    from students.training.cli import parse_args

    argv = ["train", "--data", flow_dump, "--preset", "tiny_sd3", "--recipe", recipe_name, "--student_steps", "2",
            "--batch_size", "2", "--max_steps", "2", "--warmup_steps", "1", "--checkpoint_every", "1",
            "--lr", "1e-3", "--disc_lr", "1e-2", "--ema_decay", "0", "--adv_warmup", "1", *layers]
    assert main([*argv, "--output", str(tmp_path / "ref")]) == 0
    rows = _logged(tmp_path / "ref")
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        for key in ["loss", "loss/adv_d", "disc/acc_real", "disc/acc_fake"] + [f"loss/{t}" for t in student_terms]:
            assert key in row and torch.isfinite(torch.tensor(row[key])), (key, row)
        assert 0.0 <= row["disc/acc_real"] <= 1.0 and 0.0 <= row["disc/acc_fake"] <= 1.0
        assert "loss/r1" not in row  # LADD's choice: no R1 (--r1_gamma -1 = the source's, 0)
    assert "loss/adv_g" not in rows[0] and "loss/adv_g" in rows[1]  # --adv_warmup 1
    row = rows[1]  # the generator's term is in the student's total at the recipe's weight
    assert row["loss_scaled/adv_g"] == pytest.approx(get_recipe(recipe_name).adv_weight * row["loss/adv_g"], rel=1e-5,
                                                     abs=1e-7)
    assert row["loss"] == pytest.approx(sum(v for k, v in row.items() if k.startswith("loss_scaled/")), rel=1e-5, abs=1e-6)
    scaled = {k.split("/")[1] for k in row if k.startswith("loss_scaled/")}
    assert scaled == student_terms | {"adv_g"}  # flow_ladd: LADD drops the distillation losses, the step term stays
    ckpts = sorted((tmp_path / "ref" / "checkpoints").iterdir())
    first, last = (load_file(str(c / "disc_heads.safetensors")) for c in (ckpts[0], ckpts[-1]))
    want = [f"transformer_blocks_{i}" for i in range(4)] if not layers else ["transformer_blocks_3"]
    assert sorted({k.split(".")[0] for k in first}) == want
    assert any(not torch.equal(first[k], last[k]) for k in first)  # the heads train
    saved = json.load(open(ckpts[-1] / "config.json"))
    assert saved["recipe"]["adversarial"] == "ladd" and saved["recipe"]["adv_logit_normal"] == [1.0, 1.0]
    assert saved["student"]["prediction_type"] == "flow" and saved["student"]["num_inference_steps"] == 2  # the jumps
    if recipe_name != "flow_ladd":
        return  # the resume is the same mechanism for both recipes: once is enough
    # killed after step 1, resumed by re-running the command: the same losses, discriminator included
    cfg = parse_args([*argv[1:], "--output", str(tmp_path / "run")])
    assert len(train(cfg, stop_after=1)) == 1
    assert main([*argv, "--output", str(tmp_path / "run")]) == 0
    assert _logged(tmp_path / "run") == rows
    a, b = (load_file(str(tmp_path / r / "checkpoints" / ckpts[-1].name / "disc_heads.safetensors")) for r in ("ref", "run"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_generator_term_reaches_the_student_through_the_frozen_transformer_and_only_the_heads_train(flow_dump,
                                                                                                       transformer):
    from students.models.unet import build_unet

    recipe = get_recipe("flow_ladd", student_steps=2)
    dataset, data = _batch(flow_dump, recipe)
    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    adv = adversarial.build(_cfg(flow_dump, "unused"), recipe, dataset, transformer, torch.device("cpu"))
    assert isinstance(adv.disc, TransformerFeatureDiscriminator) and adv.r1_gamma == 0.0
    heads_before = {k: v.clone() for k, v in adv.disc.heads.state_dict().items()}
    torch.manual_seed(0)
    student = build_unet("tiny_sd3")
    outputs, gen = {}, torch.Generator().manual_seed(0)
    compute_losses(student, torch.nn.ModuleDict(), data["batch"], data["targets"], recipe, None, gen, outputs=outputs)
    terms = adv.generator_terms({"loss": torch.zeros(())}, outputs["x0"], data["batch"], gen, step=1)
    terms["adv_g"].backward()  # the adversarial term alone
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0
    assert all(p.grad is None for p in adv.disc.heads.parameters())
    logged = adv.discriminator_step(step=1)
    assert set(logged) == {"loss/adv_d", "disc/acc_real", "disc/acc_fake"} and torch.isfinite(logged["loss/adv_d"])
    assert all(torch.equal(before[k], v) for k, v in transformer.state_dict().items())
    assert all(p.grad is None for p in transformer.parameters())
    assert any(not torch.equal(heads_before[k], v) for k, v in adv.disc.heads.state_dict().items())


# -- (b) the discriminator's features ------------------------------------------------------------------

def _inputs(seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 16, 16, 16, generator=g), torch.tensor([900.0, 250.0])[:batch],
            torch.randn(batch, 154, 96, generator=g), {"text_embeds": torch.randn(batch, 64, generator=g)})


def test_features_are_the_transformer_blocks_image_tokens_on_the_patch_grid(transformer):
    """Against the blocks' own outputs in a full forward (forward hooks), and a planted block output whose
    token r * 8 + c holds (r, c, channel): the map at (channel, r, c) must read it back."""
    disc = TransformerFeatureDiscriminator(transformer, layers=("transformer_blocks.1", "transformer_blocks.3"))
    z, t, ctx, added = _inputs()
    captured = {}

    def keep(name):
        def hook(module, inputs, output):
            captured[name] = output[1]
        return hook

    hooks = [transformer.transformer_blocks[i].register_forward_hook(keep(i)) for i in (1, 3)]
    with torch.no_grad():
        transformer(hidden_states=z, encoder_hidden_states=ctx, pooled_projections=added["text_embeds"], timestep=t)
        feats = disc.features(z, t, ctx, added)
    for h in hooks:
        h.remove()
    assert sorted(feats) == ["transformer_blocks.1", "transformer_blocks.3"]
    for i in (1, 3):
        tokens = captured[i]  # (2, 64, 32): the 8 x 8 patch grid of 2 x 2 patches, row-major
        assert tokens.shape == (2, 64, 32) and feats[f"transformer_blocks.{i}"].shape == (2, 32, 8, 8)
        torch.testing.assert_close(feats[f"transformer_blocks.{i}"], tokens.transpose(1, 2).reshape(2, 32, 8, 8),
                                   rtol=0, atol=0)
    # planted: block 0's image tokens replaced by a code of (row, column, channel)
    r, c, ch = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), torch.arange(32.0), indexing="ij")
    code = (1000 * r + 10 * c + ch / 100).reshape(1, 64, 32).expand(2, 64, 32)
    plant = transformer.transformer_blocks[0].register_forward_hook(lambda m, i, out: (out[0], code.clone()))
    norm_out_ran = []
    watch = transformer.norm_out.register_forward_hook(lambda *a: norm_out_ran.append(1))
    try:
        with torch.no_grad():
            planted = TransformerFeatureDiscriminator(transformer, layers=("transformer_blocks.0",)).features(z, t, ctx, added)
    finally:
        plant.remove()
        watch.remove()
    got = planted["transformer_blocks.0"]
    assert float(got[1, 7, 2, 5]) == pytest.approx(1000 * 2 + 10 * 5 + 7 / 100)
    torch.testing.assert_close(got[0], code[0].reshape(8, 8, 32).permute(2, 0, 1), rtol=0, atol=0)
    assert norm_out_ran == []  # the forward stopped at the deepest chosen block


def test_logits_depend_on_the_pooled_text_and_bad_layers_are_refused(transformer):
    torch.manual_seed(0)
    disc = TransformerFeatureDiscriminator(transformer, layers=("transformer_blocks.2",))
    z, t, ctx, added = _inputs(batch=1)
    with torch.no_grad():
        a = disc(z, t, ctx, added)[0]
        b = disc(z, t, ctx, {"text_embeds": added["text_embeds"] + 1.0})[0]
    assert a.shape == (1,) and not torch.allclose(a, b)
    with pytest.raises(ValueError, match="expected transformer_blocks.N"):
        TransformerFeatureDiscriminator(transformer, layers=("mid_block",))
    with pytest.raises(ValueError, match="pooled text embeddings"):
        disc(z, t, ctx, None)


# -- (c) the re-noising ----------------------------------------------------------------------------------

def test_renoising_puts_both_sides_on_the_rectified_flow_path_at_a_shared_logit_normal_sigma(flow_dump, transformer):
    """z = (1 - s) x0 + s eps for the student's x0 (fake) and the teacher's final latent (real), the same s and
    eps, judged at t = 1000 s; s drawn from LADD's logit-normal m = 1, s = 1 (its median sigmoid(1) = 0.73)."""
    recipe = get_recipe("flow_ladd", student_steps=2)
    dataset, _ = read_dataset(flow_dump)
    adv = adversarial.build(_cfg(flow_dump, "unused"), recipe, dataset, transformer, torch.device("cpu"))
    n = 4096
    g = torch.Generator().manual_seed(0)
    x0, x0_pred = torch.randn(n, 16, 2, 2, generator=g), torch.randn(n, 16, 2, 2, generator=g)
    fake, real, t = adv.discriminator_inputs(x0_pred, {"x0": x0}, torch.Generator().manual_seed(7))
    replay = torch.Generator().manual_seed(7)  # the draws in their order: the noise, then the sigmas
    eps = torch.randn(x0.shape, generator=replay)
    s = torch.sigmoid(1.0 + 1.0 * torch.randn(n, generator=replay))
    torch.testing.assert_close(t, 1000 * s, rtol=1e-6, atol=0)
    sv = s.view(-1, 1, 1, 1)
    torch.testing.assert_close(fake, (1 - sv) * x0_pred + sv * eps, rtol=0, atol=1e-6)
    torch.testing.assert_close(real, (1 - sv) * x0 + sv * eps, rtol=0, atol=1e-6)
    torch.testing.assert_close(fake - real, (1 - sv) * (x0_pred - x0), rtol=1e-5, atol=1e-5)  # shared s and eps
    logit = torch.log(s) - torch.log1p(-s)
    assert abs(float(logit.mean()) - 1.0) < 0.06 and abs(float(logit.std()) - 1.0) < 0.05
    assert abs(float((s > 0.5).float().mean()) - 0.8413) < 0.02  # P(u > -1), u ~ N(0, 1): toward high noise


# -- (d) refusals ------------------------------------------------------------------------------------------

def test_flow_ladd_on_an_epsilon_dump_and_bad_flow_adversarial_settings_are_one_line_errors(flow_dump, tiny_dump,
                                                                                           tmp_path, capsys):
    from core.errors import UserError
    from diffusion_distill.cli import main

    out = tmp_path / "run"
    capsys.readouterr()
    assert main(["train", "--data", tiny_dump, "--output", str(out), "--preset", "tiny", "--recipe", "flow_ladd",
                 "--max_steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "recipe 'flow_ladd' is a flow recipe" in err[0] and "need a flow dump" in err[0], err
    assert not out.exists()
    dataset, _ = read_dataset(flow_dump)
    with pytest.raises(UserError, match="--disc_layers 'mid_block'.*transformer_blocks.N"):
        adversarial.build(_cfg(flow_dump, "unused", disc_layers="mid_block"), get_recipe("flow_ladd"), dataset, None,
                          torch.device("cpu"))
    with pytest.raises(ValueError, match="not UFOGen's"):
        DistillRecipe(name="x", prediction_type="flow", adversarial="ufogen")
    with pytest.raises(ValueError, match="adv_logit_normal"):
        get_recipe("flow_ladd", adv_logit_normal=(1.0, 0.0))
