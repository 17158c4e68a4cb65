"""The ``shapes-sd3`` teacher: SD3's MMDiT, two CLIP text encoders and rectified flow on the shapes world,
trained on the training split only, loaded as diffusers' own StableDiffusion3Pipeline (a flow teacher)."""

import hashlib
import json
import os

import numpy as np
import pytest
import torch

from teachers.shapes import model as M
from teachers.shapes import sd3 as S
from teachers.shapes import world

pytestmark = pytest.mark.usefixtures("one_thread")

CAPTIONS = [world.caption(s) for s in world.train_scenes()[:3]] + [world.caption(world.heldout_scenes()[0]), ""]


def _perturbed_pipeline(seed=0):
    """The arch's pipeline from seeded modules, every weight moved off its init (SD3's zero-initialised
    layers would hide a wrong input)."""
    torch.manual_seed(seed)
    modules = M.build_modules("sd3")
    with torch.no_grad():
        for name in ("transformer", "text_encoder", "text_encoder_2"):
            for p in modules[name].parameters():
                p.add_(0.05 * torch.randn_like(p))
    return M.sd3_pipeline(**modules)


def _ids(pipe, captions):
    return [tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                return_tensors="pt").input_ids for tok in (pipe.tokenizer, pipe.tokenizer_2)]


def test_its_parts_are_sd3s_and_the_size_of_the_sd15_unet():
    from diffusers import (FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextModelWithProjection

    pipe = _perturbed_pipeline()
    assert type(pipe) is StableDiffusion3Pipeline and type(pipe.transformer) is SD3Transformer2DModel
    assert type(pipe.text_encoder) is type(pipe.text_encoder_2) is CLIPTextModelWithProjection
    assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None
    assert type(pipe.scheduler) is FlowMatchEulerDiscreteScheduler and pipe.scheduler.config.shift == 1.0
    assert not pipe.scheduler.config.use_dynamic_shifting
    assert pipe.vae.config.shift_factor == 0.0 and pipe.vae.config.latent_channels == 4 and pipe.vae_scale_factor == 4
    assert pipe.tokenizer.model_max_length == pipe.tokenizer_2.model_max_length == M.SD3_CLIP_TOKENS == 16
    assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer.pad_token == "<|endoftext|>"
    assert max(len(ids) for ids in pipe.tokenizer([world.caption(s) for s in world.all_scenes()]).input_ids) == 14
    for name in ("text_encoder", "text_encoder_2"):  # each the shapes text encoder's size
        assert getattr(pipe, name).config.hidden_size == M.text_config()["hidden_size"] == 64
        assert getattr(pipe, name).config.num_hidden_layers == M.text_config()["num_hidden_layers"]
    n = sum(p.numel() for p in pipe.transformer.parameters())
    torch.manual_seed(0)
    n_sd15 = sum(p.numel() for p in UNet2DConditionModel(**M.unet_config("sd15")).parameters())
    assert n == 1_974_724 and 0.8 < n / n_sd15 < 1.1, (n, n_sd15)
    cfg = pipe.transformer.config
    assert (cfg.patch_size, cfg.num_layers, cfg.num_attention_heads * cfg.attention_head_dim) == (1, 6, 96)
    # without T5 the pipeline appends max_sequence_length (default 256) zero tokens of joint_attention_dim
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(prompt=CAPTIONS[:2], prompt_2=None, prompt_3=None,
                                                  do_classifier_free_guidance=False)
    assert embeds.shape == (2, 16 + M.SD3_T5_TOKENS, 128) and pooled.shape == (2, 128)
    assert not embeds[:, 16:].any() and embeds[:, :16].abs().min(-1).values.max() > 0
    assert M.components("sd3") == ("transformer", "vae", "text_encoder", "text_encoder_2")
    with pytest.raises(ValueError, match="'sd3' has a transformer"):
        M.unet_config("sd3")


def test_the_loader_knows_it_as_a_flow_teacher_and_says_how_to_train_it(monkeypatch, tmp_path):
    from diffusion_distill import kit
    from teachers.load import BUILTIN_SPECS, SD3_SPECS, SHAPES_ARCHS, build_sd3, load_teacher, teacher_geometry

    assert "shapes-sd3" in BUILTIN_SPECS and "shapes-sd3" in SD3_SPECS and SHAPES_ARCHS["shapes-sd3"] == "sd3"
    assert M.WEIGHTS_DIRS["sd3"] == M.WEIGHTS_DIR_SD3 and M.WEIGHTS_DIR_SD3.endswith(os.path.join("shapes", "weights_sd3"))
    assert teacher_geometry("shapes-sd3") == dict(levels=None, resolution=32, multiple=4, is_xl=False, is_flow=True,
                                                  blocks=6, max_resolution=64)
    meta = build_sd3("shapes-sd3", device="meta")  # shapes without weights (none loaded on meta)
    assert next(meta.transformer.parameters()).device.type == "meta"
    monkeypatch.setitem(M.WEIGHTS_DIRS, "sd3", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"train them with `python -m teachers\.shapes\.train --arch sd3") as err:
        load_teacher("shapes-sd3")
    assert "\n" not in str(err.value)
    monkeypatch.setattr(M, "WEIGHTS_DIR_SD3", str(tmp_path))
    (tmp_path / "weights.json").write_text(json.dumps({"guidance_scale": 3.5}))
    assert kit.shapes_guidance("shapes-sd3") == 3.5


def test_the_training_prompt_states_are_encode_prompts_and_folding_the_t5_zeros_changes_nothing():
    """``S.prompt_embeds`` equals ``encode_prompt`` exactly (same modules, same ops); the folded
    transformer call (17 context tokens) equals the unfolded one on all 272, outputs and gradients."""
    pipe = _perturbed_pipeline()
    ids, ids_2 = _ids(pipe, CAPTIONS)
    embeds, pooled = S.prompt_embeds(pipe.text_encoder, pipe.text_encoder_2, ids, ids_2, joint_attention_dim=128,
                                     t5_tokens=M.SD3_T5_TOKENS)
    assert embeds.requires_grad and pooled.requires_grad  # differentiable: the text encoders train through it
    with torch.no_grad():
        want, _, want_pooled, _ = pipe.encode_prompt(prompt=CAPTIONS, prompt_2=None, prompt_3=None,
                                                     do_classifier_free_guidance=False)
        want_cfg, neg, want_pooled_cfg, neg_pooled = pipe.encode_prompt(prompt=CAPTIONS, prompt_2=None, prompt_3=None,
                                                                        do_classifier_free_guidance=True)
    assert embeds.shape == want.shape == (5, 272, 128)
    assert torch.equal(embeds, want) and torch.equal(pooled, want_pooled)
    assert torch.equal(want_cfg, want) and torch.equal(neg[0], embeds[-1]) and torch.equal(neg_pooled[0], pooled[-1])
    assert not torch.equal(embeds[0], embeds[1])  # the captions differ, so must their states

    transformer = pipe.transformer
    z, t = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([10.0, 250, 500, 750, 990])
    full = transformer(hidden_states=z, timestep=t, encoder_hidden_states=embeds, pooled_projections=pooled).sample
    grads_full = torch.autograd.grad(full.square().sum(), list(transformer.parameters()))
    folded = S.velocity(transformer, z, t, embeds, pooled, clip_tokens=16)
    grads_folded = torch.autograd.grad(folded.square().sum(), list(transformer.parameters()))
    assert type(next(iter(transformer.attn_processors.values()))).__name__ == "JointAttnProcessor2_0"  # restored
    scale = full.abs().max().item()
    assert scale > 0.5 and (folded - full).abs().max().item() < 1e-5 * scale
    for a, b in zip(grads_full, grads_folded):
        assert (a - b).abs().max().item() <= 1e-4 * max(1.0, a.abs().max().item())
    assert any(a.abs().max() > 0 for a in grads_full)
    with pytest.raises(ValueError, match="not identical"):
        S.velocity(transformer, z, t, embeds, pooled, clip_tokens=15)  # the last CLIP token is not a T5 zero


def test_the_noising_and_target_are_rectified_flow():
    x0 = torch.tensor([[2.0, -1.0], [0.5, 4.0]]).view(2, 2, 1, 1)
    eps = torch.tensor([[-1.0, 3.0], [1.0, 0.0]]).view(2, 2, 1, 1)
    z, timestep, v = S.rectified_flow(x0, eps, torch.tensor([0.25, 0.9]))
    assert torch.allclose(z.flatten(), torch.tensor([0.75 * 2 - 0.25, -0.75 + 0.75, 0.1 * 0.5 + 0.9, 0.4]))
    assert torch.allclose(timestep, torch.tensor([250.0, 900.0]))
    assert torch.equal(v.flatten(), torch.tensor([-3.0, 4.0, 0.5, -4.0]))  # eps - x0
    # the Euler step the pipeline takes, z + (sigma' - sigma) v, stays on the straight path
    assert torch.allclose(z[0] + (0.0 - 0.25) * v[0], x0[0]) and torch.allclose(z[0] + 0.75 * v[0], eps[0])
    sigmas = S.draw_sigmas(200_000, torch.Generator().manual_seed(0))
    logit = torch.logit(sigmas.double())
    assert 0 < sigmas.min() and sigmas.max() < 1
    assert abs(logit.mean().item()) < 0.01 and abs(logit.std().item() - 1) < 0.01  # logit-normal(0, 1)
    assert abs(sigmas.median().item() - 0.5) < 0.005


def _train(output, *extra):
    from teachers.shapes import train as T

    return T.main(["--arch", "sd3", "--output", str(output), "--unet_steps", "4", "--batch", "4", "--data", "32",
                   "--eval_every", "2", "--eval_n", "2", "--eval_steps", "2", "--checkpoint_every", "2",
                   "--calibrate_n", "2", "--calibrate_heldout", "3", "--calibrate_steps", "2",
                   "--calibrate_guidances", "1.5,4.0", *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step ``--arch sd3`` run (its defaults: training split, the committed autoencoder and analyser)
    with every noising and transformer call of training recorded: ``(folder, flows, calls, history_losses)``."""
    flows, calls = [], []
    folder = tmp_path_factory.mktemp("sd3") / "straight"
    with pytest.MonkeyPatch.context() as mp:
        rectified_flow, velocity = S.rectified_flow, S.velocity

        def spy_flow(x0, eps, sigma):
            out = rectified_flow(x0, eps, sigma)
            flows.append((x0.clone(), eps.clone(), sigma.clone(), *(o.detach().clone() for o in out)))
            return out

        def spy_velocity(transformer, z, timestep, embeds, pooled, clip_tokens):
            pred = velocity(transformer, z, timestep, embeds, pooled, clip_tokens)
            calls.append((z.detach().clone(), timestep.detach().clone(), embeds.detach().clone(), pred.detach().clone()))
            return pred

        mp.setattr(S, "rectified_flow", spy_flow)
        mp.setattr(S, "velocity", spy_velocity)
        assert _train(folder) == 0
    return folder, flows, calls


def test_a_short_training_writes_weights_the_loader_loads_and_whose_pipeline_samples(trained, monkeypatch):
    from teachers.load import load_teacher
    from teachers.shapes.train import sample_images

    folder, _, _ = trained
    assert sorted(n for n in os.listdir(folder) if n.endswith(".safetensors")) == [
        "analyser.safetensors", "text_encoder.safetensors", "text_encoder_2.safetensors", "transformer.safetensors",
        "vae.safetensors"]
    for name in ("vae.safetensors", "analyser.safetensors"):  # the committed autoencoder and analyser, byte for byte
        assert (folder / name).read_bytes() == open(os.path.join(M.WEIGHTS_DIR, name), "rb").read()
    meta = json.loads((folder / "weights.json").read_text())
    assert meta["arch"] == "sd3" and meta["split"] == "train" and meta["heldout_scenes"] == 45
    assert meta["transformer_parameters"] == 1_974_724 and [h["step"] for h in meta["history"]] == [2, 4]
    assert meta["guidance_scale"] in (1.5, 4.0) and set(meta["guidance_sweep_heldout"]) == {"1.5", "4.0"}
    for name, digest in meta["sha256"].items():
        assert hashlib.sha256((folder / f"{name}.safetensors").read_bytes()).hexdigest() == digest
    assert not os.path.exists(folder / "checkpoint")

    monkeypatch.setitem(M.WEIGHTS_DIRS, "sd3", str(folder))
    teacher = load_teacher("shapes-sd3")
    assert teacher.is_flow and teacher.prediction_type == "flow" and teacher.denoiser is teacher.pipe.transformer
    assert teacher.default_resolution == 32 and teacher.pipe.vae.config.scaling_factor == meta["scaling_factor"]
    from safetensors.torch import load_file

    saved = load_file(str(folder / "transformer.safetensors"))
    for k, v in teacher.pipe.transformer.state_dict().items():
        assert torch.equal(v, saved[k].float()), k
    for name in ("text_encoder", "text_encoder_2"):  # sparse tables filled back: the world's rows, zeros elsewhere
        table = getattr(teacher.pipe, name).get_input_embeddings().weight
        ids = load_file(str(folder / f"{name}.safetensors"))["text_model.embeddings.token_embedding.weight.ids"]
        assert table[ids].abs().sum(1).min() > 0 and (table.abs().sum(1) > 0).sum() == len(ids)
    images = sample_images(teacher.pipe, CAPTIONS[:2], steps=3, guidance=meta["guidance_scale"], seed=0)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all() and images.std() > 0.01
    assert not torch.equal(images, sample_images(teacher.pipe, CAPTIONS[:2], steps=3, guidance=1.0, seed=0))


def test_training_noises_and_targets_by_rectified_flow_at_the_pipelines_timesteps(trained):
    folder, flows, calls = trained
    meta = json.loads((folder / "weights.json").read_text())
    assert len(flows) == len(calls) == 4  # one noising and one transformer call per step
    losses = {h["step"]: h["loss"] for h in meta["history"]}
    for step, ((x0, eps, sigma, z, timestep, v), (z_in, t_in, embeds, pred)) in enumerate(zip(flows, calls), 1):
        x0_, eps_, s_ = x0.double(), eps.double(), sigma.double().view(-1, 1, 1, 1)
        assert torch.allclose(z.double(), (1 - s_) * x0_ + s_ * eps_, atol=1e-6)
        assert torch.allclose(v.double(), eps_ - x0_, atol=1e-6)
        assert torch.equal(z_in, z) and torch.allclose(t_in, sigma * 1000)  # the pipeline's timestep for sigma
        assert embeds.shape == (4, 272, 128) and not embeds[:, 16:].any()  # encode_prompt's states, T5 zeros
        assert ((0 < sigma) & (sigma < 1)).all() and len(set(sigma.tolist())) == 4
        assert x0.shape == (4, 4, 8, 8) and abs(eps.std().item() - 1) < 0.2
        if step in losses:  # the loss is the MSE to the velocity eps - x0
            assert abs(((pred.double() - eps_ + x0_) ** 2).mean().item() - losses[step]) < 1e-5


def test_a_warm_restart_from_another_arch_is_refused_in_one_line(tmp_path):
    with pytest.raises(SystemExit, match=r"^--init_from \S+weights_sd15: its weights are of arch 'sd15', not 'sd3'$"):
        _train(tmp_path / "out", "--init_from", M.WEIGHTS_DIR_SD15)
    assert not os.path.exists(tmp_path / "out" / "weights.json")


def _digests(folder):
    return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in sorted(os.listdir(folder))
            if n.endswith(".safetensors")}


def test_an_interrupted_training_resumes_to_the_same_weights(trained, tmp_path):
    folder, _, _ = trained
    assert _train(tmp_path / "resumed", "--stop_after", "3") == 0  # interrupted after 3 of 4 steps
    assert os.path.isfile(tmp_path / "resumed" / "checkpoint" / "state.pt")
    assert not os.path.exists(tmp_path / "resumed" / "weights.json")
    state = torch.load(tmp_path / "resumed" / "checkpoint" / "state.pt", weights_only=False)
    assert state["step"] == 3 and {"transformer", "text", "text_2", "ema_transformer", "ema_text_2"} <= set(state)
    assert _train(tmp_path / "resumed") == 0  # the same command again continues
    assert not os.path.exists(tmp_path / "resumed" / "checkpoint")
    assert _digests(tmp_path / "resumed") == _digests(folder)  # bit for bit: the uninterrupted run's weights
    a, b = (json.loads((f / "weights.json").read_text()) for f in (folder, tmp_path / "resumed"))
    assert a["history"] == b["history"] and a["guidance_sweep"] == b["guidance_sweep"]


def test_the_teacher_dump_of_shapes_sd3_is_a_flow_dump_of_the_pipelines_latents(trained, tmp_path, monkeypatch):
    """``distill dump --teacher shapes-sd3``: a schema-3 flow dump (flow-euler, the transformer's blocks as
    feature layers) that verifies, every stored latent the pipeline's own for the sample's seed; a caption
    longer than its 16 CLIP tokens is counted as truncated."""
    from conftest import run_dump
    from test_sd3 import _fp16_tol, _pipeline_trajectory

    from diffusion_distill.cli import main
    from shards.loader import dataset_shards, record_pipeline
    from teachers.load import load_teacher
    from teachers.sampler import SampleRequest

    folder, _, _ = trained
    monkeypatch.setitem(M.WEIGHTS_DIRS, "sd3", str(folder))
    long = CAPTIONS[0] + " and a second small blue square far away at the right"  # 25 tokens
    out = run_dump(tmp_path, captions=CAPTIONS[:3] + [long], teacher="shapes-sd3", feature_layers=None, num_inference_steps=3,
                   guidance_scale=4.0, batch_size=4, cpu_threads=1)
    info = json.load(open(os.path.join(out, "dataset.json")))
    assert info["schema_version"] == 3 and info["prediction_type"] == "flow"
    assert info["recipe"]["scheduler"] == "flow-euler" and info["scheduler_class"] == "FlowMatchEulerDiscreteScheduler"
    assert info["recipe"]["feature_layers"] == ["transformer_blocks.3", "transformer_blocks.5"]
    assert info["totals"]["captions_truncated"] == 1
    assert main(["inspect", out, "--verify"]) == 0
    records = sorted(record_pipeline(dataset_shards(out)), key=lambda r: r.key)
    assert len(records) == 4 and all(r.meta["prediction_type"] == "flow" for r in records)
    assert records[0].latents.shape == (4, 4, 8, 8) and records[0].prompt_embeds.shape == (272, 128)
    assert records[0].feats["transformer_blocks.3"].shape == (2, 96, 8, 8)
    teacher = load_teacher("shapes-sd3")
    reqs = [SampleRequest(r.key, r.caption, r.meta["seed"]) for r in records]
    after, final = _pipeline_trajectory(teacher, reqs, 3, 4.0)
    for b, rec in enumerate(records):
        noise = torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(rec.meta["seed"]))[0]
        ref = [noise.numpy()] + [a[b].numpy() for a in after[:-1]] + [final[b].numpy()]
        for i, r in enumerate(ref):  # the dump's batch is the pipeline's: last bits, then float16 storage
            scale = max(1.0, float(np.abs(r).max()))
            assert (np.abs(rec.latents[i].astype(np.float64) - r) <= _fp16_tol(r) + 1e-6 * scale).all(), (rec.key, i)
