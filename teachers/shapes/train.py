"""Train the ``shapes`` teacher and its analyser from scratch (CPU, float32, seeded).

    python -m teachers.shapes.train --output teachers/shapes/weights

and the SD-1.5-shaped ``shapes-sd15`` teacher on the training split only, reusing the committed
autoencoder and analyser (``--reuse_vae``: stages 1 and 2 are skipped), as its committed weights were
made: 5,000 steps from scratch, then a warm restart of 4,000 (``--init_from``; the first run stalled with
position, the attribute learnt last, at 0.44):

    python -m teachers.shapes.train --arch sd15 --unet_steps 5000 --output /tmp/sd15_5k
    python -m teachers.shapes.train --arch sd15 --init_from /tmp/sd15_5k --unet_steps 4000

and the SD3-shaped ``shapes-sd3`` teacher (``model.py``: an MMDiT, two CLIP encoders, rectified flow) the
same way, into ``teachers/shapes/weights_sd3`` (its defaults: ``--split train``, ``--reuse_vae
teachers/shapes/weights``, 6,000 steps at batch 64, learning rate 5e-4, a checkpoint every 100 steps):

    python -m teachers.shapes.train --arch sd3 --unet_steps 6000 --threads 1

Its training step (batch 64, one thread) measured 1.11 s where the sd15 UNet's measured 1.36 s on the
same shared core, interleaved (about 0.9 s on a quiet core, where sd15's is 1.0-1.2 s); each evaluation
(90 captions, 20 steps) about 77 s there and the calibration sweep (5 weights x 210 captions x 50 steps)
about 37 min: about 2.7 h in all on a shared core, 2-2.5 h on a quiet one.

Three stages, each on freshly rendered images of the shapes world:

1. the analyser (CNN classifier of the five attributes), held-out accuracy printed;
2. the autoencoder (AutoencoderKL, factor 4): L1 + MSE reconstruction with a small KL term;
   its latent scaling factor is 1 / std of the training latents, as SD's 0.18215 was chosen;
3. the UNet and the CLIP text transformer together, epsilon prediction on SD-1.5's noise schedule,
   10% empty captions for classifier-free guidance, EMA weights kept and saved; for ``sd3`` the
   transformer and both text encoders, with SD3's rectified-flow objective instead (``sd3.py``: sigma
   ~ logit-normal(0, 1), z = (1 - sigma) x0 + sigma eps, MSE to v = eps - x0 at timestep sigma * 1000,
   on the prompt states ``StableDiffusion3Pipeline.encode_prompt`` makes).

Every ``--eval_every`` steps the EMA teacher samples a fixed set of captions (DDIM; for ``sd3`` its
``StableDiffusion3Pipeline``) and the analyser scores its prompt adherence, so progress is a number,
not a loss.

With ``--checkpoint_every N`` (the ``sd15`` and ``sd3`` default) the UNet stage saves its whole state (weights,
EMA, optimiser, learning-rate schedule, data-order generator, history, time spent) to
``OUTPUT/checkpoint/`` every N steps, and the same command run again continues from there: an
interrupted run resumed gives the weights an uninterrupted one would (same thread count). The time
budget counts the time of every run. Once the weights are saved and calibrated the checkpoint is
removed; run again, the command then says the weights are complete (``--restart`` trains anew).

With ``--split train`` the UNet and text encoder see only ``world.train_scenes()``: the held-out
scenes are never rendered or captioned before calibration, which then sweeps the guidance on
training-split captions (the weight chosen) and on the held-out captions (recorded beside it).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time

import numpy as np
import torch
from torch import nn

from teachers.shapes import analyser as A
from teachers.shapes import model as M
from teachers.shapes import world


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# ------------------------------------------------------------------------------------------
# 1. analyser
# ------------------------------------------------------------------------------------------


def heldout_accuracy(model: A.ShapesAnalyser, n: int = 1000, seed: int = 10_000) -> dict:
    images, scenes = world.sample_batch(np.random.default_rng(seed), n)
    _, labels = model.eval().read(world.to_tensor(images))
    truth = np.array([s.labels for s in scenes])
    correct = labels == truth
    out = {name: float(correct[:, i].mean()) for i, name in enumerate(world.ATTRIBUTES)}
    out["all"] = float(correct.all(1).mean())
    return out


def train_analyser(steps: int, batch: int, seed: int) -> A.ShapesAnalyser:
    torch.manual_seed(seed)
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    model = A.ShapesAnalyser()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, steps, 100))
    for step in range(steps):
        images, scenes = world.sample_batch(rng, batch)
        x = A.augment(world.to_tensor(images), gen)
        labels = torch.tensor([s.labels for s in scenes])
        _, logits = model.train()(x)
        loss = sum(nn.functional.cross_entropy(logits[name], labels[:, i]) for i, name in enumerate(world.ATTRIBUTES))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 200 == 0 or step == steps - 1:
            _log(f"analyser step {step} loss {loss.item():.4f}")
    _log(f"analyser held-out accuracy {heldout_accuracy(model)}")
    return model.eval()


# ------------------------------------------------------------------------------------------
# 2. autoencoder
# ------------------------------------------------------------------------------------------


def train_vae(steps: int, batch: int, seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed + 1)
    vae = AutoencoderKL(**M.vae_config())
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, steps, 100))
    for step in range(steps):
        x = world.to_tensor(world.sample_batch(rng, batch)[0]) * 2 - 1
        post = vae.encode(x).latent_dist
        recon = vae.decode(post.sample()).sample
        rec = (recon - x).abs().mean() + ((recon - x) ** 2).mean()
        kl = post.kl().mean() / x[0].numel()
        loss = rec + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 200 == 0 or step == steps - 1:
            _log(f"vae step {step} rec {rec.item():.4f} kl {kl.item():.3f}")
    vae.eval()
    with torch.no_grad():
        x = world.to_tensor(world.sample_batch(np.random.default_rng(seed + 2), 512)[0]) * 2 - 1
        z = vae.encode(x).latent_dist.mean
        scaling = float(1.0 / z.std())
        mse = float(((vae.decode(z).sample - x) ** 2).mean())
    vae.register_to_config(scaling_factor=scaling)
    _log(f"vae scaling_factor {scaling:.4f} held-out mse {mse:.5f}")
    return vae, scaling, mse


# ------------------------------------------------------------------------------------------
# 3. UNet + text encoder
# ------------------------------------------------------------------------------------------


def encode_dataset(vae, n: int, seed: int, batch: int = 256, scenes: list | None = None):
    """(scaled latents [n, 4, 8, 8], scene index into ``scenes``) of ``n`` random renders of ``scenes``
    (default: every attribute drawn independently, indices into ``world.all_scenes()``)."""
    rng = np.random.default_rng(seed)
    index = {s: i for i, s in enumerate(world.all_scenes() if scenes is None else scenes)}
    latents, ids = [], []
    with torch.no_grad():
        for start in range(0, n, batch):
            images, batch_scenes = world.sample_batch(rng, min(batch, n - start), scenes=scenes)
            z = vae.encode(world.to_tensor(images) * 2 - 1).latent_dist.mean
            latents.append(z * vae.config.scaling_factor)
            ids += [index[s] for s in batch_scenes]
    return torch.cat(latents), torch.tensor(ids)


def build_pipeline(unet, vae, text_encoder, tokenizer, arch: str = "shapes"):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    if arch == "sd3":
        raise ValueError("the sd3 arch's pipeline is StableDiffusion3Pipeline: use arch_pipeline")
    scheduler = DDIMScheduler(**M.scheduler_config(arch))
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def arch_pipeline(arch: str, modules: dict):
    """The arch's diffusers pipeline of ``modules`` (keyed as ``M.components(arch)``), progress bar off:
    ``StableDiffusion3Pipeline`` for sd3, ``StableDiffusionPipeline`` with DDIM for the UNet archs."""
    if arch == "sd3":
        pipe = M.sd3_pipeline(modules["transformer"], modules["vae"], modules["text_encoder"], modules["text_encoder_2"])
        pipe.set_progress_bar_config(disable=True)
        return pipe
    return build_pipeline(modules["unet"], modules["vae"], modules["text_encoder"], M.tokenizers(arch)[0], arch)


@torch.no_grad()
def sample_images(pipe, captions: list[str], steps: int, guidance: float, seed: int, batch: int = 64) -> torch.Tensor:
    """Images [N, 3, 32, 32] in [0, 1] from the standard pipeline call, seeded per chunk."""
    out = []
    for i in range(0, len(captions), batch):
        gen = torch.Generator().manual_seed(seed + i)
        images = pipe(captions[i : i + batch], num_inference_steps=steps, guidance_scale=guidance,
                      generator=gen, output_type="pt").images
        out.append(images.float().clamp(0, 1))
    return torch.cat(out)


def adherence(pipe, analyser, captions: list[str], steps: int, guidance: float, seed: int = 0) -> dict:
    metric = A.Adherence(analyser)
    metric.update(sample_images(pipe, captions, steps, guidance, seed), captions)
    return metric.compute()


CHECKPOINT = "checkpoint"  # folder inside --output; removed once the weights are saved and calibrated


def _save_state(folder: str, name: str, state: dict) -> None:
    """``torch.save`` to a temporary name and a rename: a run killed mid-write leaves the old file."""
    from core.fs import tmp_name

    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    tmp = tmp_name(path)
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_state(folder: str, name: str) -> dict | None:
    path = os.path.join(folder, name)
    return torch.load(path, map_location="cpu", weights_only=False) if os.path.isfile(path) else None


def train_unet(vae, analyser, *, steps: int, batch: int, lr: float, seed: int, data: int, eval_every: int,
               eval_captions: list[str], time_budget_s: float, arch: str = "shapes", scenes: list | None = None,
               checkpoint_dir: str | None = None, checkpoint_every: int = 0, resume_key: dict | None = None,
               stop_after: int = 0, eval_steps: int = 20, init_from: str | None = None):
    """Train the UNet (sd3: the transformer) and the text encoder(s); returns ``(ema, token_ids, history,
    done)``: the EMA modules keyed as ``M.components(arch)`` without ``vae``, each text encoder's token ids.

    The UNet archs: epsilon prediction on SD-1.5's schedule. ``sd3``: SD3's rectified flow
    (``teachers.shapes.sd3``): sigma ~ logit-normal(0, 1), z = (1 - sigma) x0 + sigma eps, MSE to the
    velocity eps - x0, the transformer at timestep sigma * 1000 on ``encode_prompt``'s prompt states.

    ``scenes``: the scenes to train on (default: every attribute drawn independently, all 450).
    ``checkpoint_dir`` and ``checkpoint_every``: save the training state every that many steps and
    resume from it; ``resume_key`` (what fixes the run: arch, split, seed, steps, ...) must match the
    checkpoint's. ``stop_after``: train at most this many steps in this call, then checkpoint and
    return ``done=False`` (a run split over sessions). ``init_from``: a weights folder of the same arch
    whose UNet and text encoder this run starts from (a warm restart: fresh optimiser and schedule)."""
    from diffusers import DDPMScheduler, SD3Transformer2DModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from teachers import configs
    from teachers.shapes import sd3 as S

    torch.manual_seed(seed)
    flow = arch == "sd3"
    tokenizers = M.tokenizers(arch)
    if flow:  # SD3's parts: the MMDiT and two CLIP encoders with projection
        cfg = M.configs_dict(arch)
        nets = dict(transformer=SD3Transformer2DModel(**cfg["transformer"]),
                    text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text"])),
                    text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_2"])))
    else:
        nets = dict(unet=UNet2DConditionModel(**M.unet_config(arch)),
                    text_encoder=CLIPTextModel(CLIPTextConfig(**M.text_config())))
    denoiser = next(iter(nets))
    encoders = [name for name in nets if name.startswith("text_encoder")]
    train_scenes = world.all_scenes() if scenes is None else scenes
    token_ids = {name: M.world_token_ids(tok, train_scenes) for name, tok in zip(encoders, tokenizers)}
    with torch.no_grad():  # rows the world never uses: zero, and they stay zero (see model.py)
        for name in encoders:
            table = nets[name].get_input_embeddings().weight
            keep = table[token_ids[name]].clone()
            table.zero_()
            table[token_ids[name]] = keep
    if init_from:
        from diffusers import AutoencoderKL

        start_meta = M.load_components(init_from, dict(nets, vae=AutoencoderKL(**M.vae_config(arch))), arch)
        if start_meta.get("arch", "shapes") != arch:
            raise SystemExit(f"--init_from {init_from}: its weights are of arch {start_meta.get('arch', 'shapes')!r}, not {arch!r}")
        for module in nets.values():
            module.float()
        _log(f"starting from the {denoiser} and text encoder{'s' if flow else ''} of {init_from}")
    captions = [world.caption(s) for s in train_scenes] + [""]  # only the training scenes are ever captioned
    input_ids = [tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                     return_tensors="pt").input_ids for tok in tokenizers]
    empty = len(captions) - 1

    saving = bool(checkpoint_dir and checkpoint_every > 0)
    state = _load_state(checkpoint_dir, "state.pt") if saving else None
    if state is not None and state["key"] != resume_key:
        diff = {k: (state["key"].get(k), v) for k, v in (resume_key or {}).items() if state["key"].get(k) != v}
        raise SystemExit(f"the checkpoint in {checkpoint_dir} is of another run (checkpoint vs now: {diff}): "
                         "run the same command, or pass --restart to train anew")
    cached = _load_state(checkpoint_dir, "latents.pt") if saving else None
    if cached is not None and cached["key"] == resume_key:
        latents, scene_ids = cached["latents"], cached["scene_ids"]
        _log(f"loaded {len(latents)} encoded training images from {checkpoint_dir}")
    else:
        _log(f"encoding {data} training images")
        latents, scene_ids = encode_dataset(vae, data, seed + 3, scenes=scenes)
        if saving:
            _save_state(checkpoint_dir, "latents.pt", dict(key=resume_key, latents=latents, scene_ids=scene_ids))
    if not flow:
        noise_sched = DDPMScheduler(**configs.sd15_scheduler())
        alphas = noise_sched.alphas_cumprod

    params = [p for module in nets.values() for p in module.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, steps, 200))
    ema = {name: copy.deepcopy(module).eval() for name, module in nets.items()}
    gen = torch.Generator().manual_seed(seed + 4)
    history, first, spent = [], 0, 0.0
    if state is not None:
        for name in nets:
            nets[name].load_state_dict(state[_STATE_NAMES[name]])
            ema[name].load_state_dict(state["ema_" + _STATE_NAMES[name]])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        gen.set_state(state["gen"])
        history, first, spent = state["history"], state["step"], state["train_seconds"]
        _log(f"resumed from {checkpoint_dir} at step {first} of {steps} ({spent / 60:.1f} min trained)")
        if state["done"]:
            return ema, token_ids, history, True

    def checkpoint(step_done: int, done: bool) -> None:
        modules = {_STATE_NAMES[name]: module.state_dict() for name, module in nets.items()}
        modules.update({"ema_" + _STATE_NAMES[name]: module.state_dict() for name, module in ema.items()})
        _save_state(checkpoint_dir, "state.pt", dict(
            key=resume_key, step=step_done, done=done, history=history, train_seconds=spent + time.time() - start,
            **modules, opt=opt.state_dict(), sched=sched.state_dict(), gen=gen.get_state()))

    start, done, loss = time.time(), True, None
    for step in range(first, steps):
        idx = torch.randint(0, len(latents), (batch,), generator=gen)
        x0 = latents[idx]
        cap = scene_ids[idx].clone()
        cap[torch.rand(batch, generator=gen) < 0.1] = empty
        if flow:  # SD3's rectified flow on encode_prompt's states (the T5 zeros folded: exact, see sd3.py)
            sigma = S.draw_sigmas(batch, gen)
            eps = torch.randn(x0.shape, generator=gen)
            z, timestep, target = S.rectified_flow(x0, eps, sigma)
            transformer = nets["transformer"]
            embeds, pooled = S.prompt_embeds(
                nets["text_encoder"], nets["text_encoder_2"], input_ids[0][cap], input_ids[1][cap],
                joint_attention_dim=transformer.config.joint_attention_dim, t5_tokens=M.SD3_T5_TOKENS)
            pred = S.velocity(transformer, z, timestep, embeds, pooled, clip_tokens=input_ids[0].shape[1])
        else:
            t = torch.randint(0, 1000, (batch,), generator=gen)
            eps = torch.randn(x0.shape, generator=gen)
            a = alphas[t].view(-1, 1, 1, 1)
            xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
            cond = nets["text_encoder"](input_ids[0][cap])[0]
            pred, target = nets["unet"](xt, t, cond).sample, eps
        loss = nn.functional.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for name, src in nets.items():
                for p, q in zip(src.parameters(), ema[name].parameters()):
                    q.lerp_(p, 1 - decay)
        if step % 100 == 0:
            _log(f"{denoiser} step {step} loss {loss.item():.4f} lr {sched.get_last_lr()[0]:.2e} "
                 f"({(time.time() - start) / (step + 1 - first):.2f} s/step)")
        last = step == steps - 1 or spent + time.time() - start > time_budget_s
        if (step + 1) % eval_every == 0 or last:
            pipe = arch_pipeline(arch, dict(ema, vae=vae))
            score = adherence(pipe, analyser, eval_captions, steps=eval_steps, guidance=5.0)
            history.append(dict(step=step + 1, loss=loss.item(), **score))
            _log(f"eval step {step + 1}: {score}")
        paused = not last and stop_after > 0 and step + 1 - first >= stop_after
        if saving and (last or paused or (step + 1) % checkpoint_every == 0):
            checkpoint(step + 1, last)
        if last:
            if step < steps - 1:
                _log(f"time budget reached at step {step + 1} of {steps}")
            break
        if paused:
            _log(f"stopping after {stop_after} steps at step {step + 1} of {steps}: run again to continue")
            done = False
            break
    return ema, token_ids, history, done


_STATE_NAMES = dict(unet="unet", transformer="transformer", text_encoder="text", text_encoder_2="text_2")  # checkpoint keys


def calibrate(folder: str, guidances=(1.5, 2.5, 4.0, 6.0, 8.0), n: int = 120, steps: int = 50, seed: int = 0,
              n_heldout: int = 90) -> dict:
    """Pick the CFG weight with the best prompt adherence at ``steps`` sampling steps (DDIM; the sd3 arch: its
    pipeline's flow-matching Euler); store it in ``weights.json``.

    Like choosing SD's 7.5: the default guidance of the pipeline is a property of the trained weights.
    Captions are drawn with their own seed (not the training eval's). For weights trained on the
    training split (``weights.json`` ``split``), the ``n`` captions come from that split and pick the
    weight; the same sweep on ``n_heldout`` held-out captions (the 45 held-out scenes in turn) is
    recorded beside it (``guidance_sweep_heldout``), so held-out adherence is measured at every weight
    but never chooses one."""
    from core.fs import atomic_write_json

    with open(os.path.join(folder, "weights.json"), encoding="utf-8") as f:
        arch = json.load(f).get("arch", "shapes")
    modules = M.build_modules(arch)
    meta = M.load_components(folder, modules, arch)
    pipe = arch_pipeline(arch, {name: module.eval() for name, module in modules.items()})
    analyser = A.load_analyser(os.path.join(folder, "analyser.safetensors"))
    split = meta.get("split", "all")
    rng = np.random.default_rng(seed + 77)
    captions = [world.caption(s) for s in world.random_scenes(rng, n, None if split == "all" else world.split_scenes(split))]
    sets = {"": captions}
    if split == "train":
        held = world.heldout_scenes()
        sets["_heldout"] = [world.caption(held[i % len(held)]) for i in range(n_heldout)]
    sweeps = {}
    for suffix, texts in sets.items():
        sweeps[suffix] = {}
        for w in guidances:
            sweeps[suffix][str(w)] = adherence(pipe, analyser, texts, steps=steps, guidance=w, seed=seed)
            _log(f"guidance {w}{' held-out' if suffix else ''}: {sweeps[suffix][str(w)]}")
    best = max(guidances, key=lambda w: (sweeps[""][str(w)]["adherence"], -w))
    meta.update(guidance_scale=float(best), guidance_sweep=sweeps[""])
    if "_heldout" in sweeps:
        meta.update(guidance_sweep_heldout=sweeps["_heldout"], heldout_adherence=sweeps["_heldout"][str(best)],
                    calibration=dict(steps=steps, train_captions=n, heldout_captions=n_heldout, seed=seed))
    atomic_write_json(os.path.join(folder, "weights.json"), meta)
    _log(f"guidance_scale {best}" + (f"; held-out at it: {meta['heldout_adherence']}" if "_heldout" in sweeps else ""))
    return meta


# Defaults per --arch: ``shapes`` keeps the command's original behaviour. ``sd15``'s UNet step at batch
# 64 costs 1.0-1.2 s on one quiet core, up to 2.3 s on a shared one (the ``shapes`` UNet about half).
# Position is the attribute learnt last (the ``shapes`` teacher: 0.42 at 2000 steps, 0.93 at 3000; an
# sd15 run of 2000 steps stayed at chance, 0.2, with the other four attributes at 0.87-1.0): 4000
# steps, which a 75-minute budget on one quiet thread cuts at about 3600 with the learning rate near
# its floor (the EMA averages the last ~1000 steps either way). ``sd3`` (step times in the module docstring):
# learning rate 5e-4, half the UNets' (attention-only blocks; a 300-step check at batch 64 went from loss 2.44
# to 0.58 and adherence 0.53 at step 150 to 0.60 at 300, 30 captions at 20 steps, position already 0.43), and
# 6,000 steps, as the sd15 UNet needed more than 5,000 to learn position.
ARCH_DEFAULTS = {
    "shapes": dict(output=M.WEIGHTS_DIR, split="all", reuse_vae="", unet_steps=6000, batch=64, lr=1e-3,
                   checkpoint_every=0),
    "sd15": dict(output=M.WEIGHTS_DIR_SD15, split="train", reuse_vae=M.WEIGHTS_DIR, unet_steps=4000, batch=64,
                 lr=1e-3, checkpoint_every=100),
    "sd3": dict(output=M.WEIGHTS_DIR_SD3, split="train", reuse_vae=M.WEIGHTS_DIR, unet_steps=6000, batch=64,
                lr=5e-4, checkpoint_every=100),
}
# What fixes a run's result: a checkpoint resumes only a run with the same values (time budget and
# threads may change between runs).
RUN_KEYS = ("arch", "split", "reuse_vae", "seed", "analyser_steps", "vae_steps", "unet_steps", "batch", "lr", "data",
            "eval_every", "eval_n", "eval_steps", "init_from")


def _reuse(folder: str, output: str):
    """The committed autoencoder and analyser of ``folder``, copied into ``output`` byte for byte."""
    import shutil

    from diffusers import AutoencoderKL

    with open(os.path.join(folder, "weights.json"), encoding="utf-8") as f:
        src = json.load(f)
    from safetensors.torch import load_file

    vae = AutoencoderKL(**M.vae_config())
    vae.load_state_dict({k: v.float() for k, v in load_file(os.path.join(folder, "vae.safetensors")).items()})
    vae.register_to_config(scaling_factor=float(src["scaling_factor"]))
    if os.path.abspath(folder) != os.path.abspath(output):
        shutil.copyfile(os.path.join(folder, "analyser.safetensors"), os.path.join(output, "analyser.safetensors"))
    analyser = A.load_analyser(os.path.join(output, "analyser.safetensors"))
    meta = dict(scaling_factor=float(src["scaling_factor"]), vae_heldout_mse=src.get("vae_heldout_mse"),
                analyser_heldout_accuracy=src.get("analyser_heldout_accuracy"),
                reused=dict(folder=os.path.relpath(os.path.abspath(folder), os.getcwd()),
                            sha256=dict(vae=src["sha256"]["vae"])))
    return vae.eval(), analyser, meta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=M.ARCHS, default="shapes",
                   help="shapes: the 2-level teacher (weights/); sd15: SD-1.5's UNet layout and scheduler (weights_sd15/); "
                        "sd3: SD3's MMDiT, two CLIP encoders and rectified flow (weights_sd3/)")
    p.add_argument("--output", default=None, help="weights folder (default: the arch's committed folder)")
    p.add_argument("--split", choices=("all", "train"), default=None,
                   help="scenes the UNet and text encoder train on: all 450, or the training split (held-out "
                        "scenes never seen); default: all for shapes, train for sd15 and sd3")
    p.add_argument("--reuse_vae", default=None, metavar="FOLDER",
                   help="take the autoencoder and analyser from this weights folder instead of training them "
                        "(default for sd15 and sd3: teachers/shapes/weights; '' trains them)")
    p.add_argument("--init_from", default="", metavar="FOLDER",
                   help="start the UNet and text encoder from this weights folder of the same arch (a warm restart: "
                        "fresh optimiser and learning-rate schedule; its provenance is kept in weights.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--analyser_steps", type=int, default=1500)
    p.add_argument("--vae_steps", type=int, default=1500)
    p.add_argument("--unet_steps", type=int, default=None,
                   help="steps of the UNet stage (sd3: the transformer's); default: 6000 for shapes, 4000 for sd15, "
                        "6000 for sd3")
    p.add_argument("--batch", type=int, default=None, help="default 64")
    p.add_argument("--lr", type=float, default=None, help="default 1e-3 (sd3: 5e-4)")
    p.add_argument("--data", type=int, default=30000, help="rendered training images encoded once for the UNet")
    p.add_argument("--eval_every", type=int, default=500)
    p.add_argument("--eval_n", type=int, default=90, help="captions of the evaluation during training")
    p.add_argument("--eval_steps", type=int, default=20, help="sampling steps of the evaluation during training")
    p.add_argument("--time_budget_min", type=float, default=1e9,
                   help="stop UNet training after this long (all runs of a resumed training together)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--checkpoint_every", type=int, default=None,
                   help="save the UNet stage's state every N steps into OUTPUT/checkpoint/ and resume from it when "
                        "run again (0: off; default: 0 for shapes, 100 for sd15 and sd3)")
    p.add_argument("--restart", action="store_true", help="ignore a checkpoint or complete weights and train anew")
    p.add_argument("--stop_after", type=int, default=0,
                   help="train at most this many UNet steps in this run, checkpoint and exit (run again to continue)")
    p.add_argument("--calibrate_n", type=int, default=120, help="captions of the guidance sweep")
    p.add_argument("--calibrate_heldout", type=int, default=90,
                   help="held-out captions of the sweep (with --split train; the 45 scenes in turn)")
    p.add_argument("--calibrate_steps", type=int, default=50, help="sampling steps of the guidance sweep")
    p.add_argument("--calibrate_guidances", default="1.5,2.5,4.0,6.0,8.0", help="comma-separated CFG weights")
    p.add_argument("--calibrate_only", action="store_true", help="only re-pick the guidance of existing weights")
    args = p.parse_args(argv)
    for key, value in ARCH_DEFAULTS[args.arch].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.threads:
        torch.set_num_threads(args.threads)
    guidances = tuple(float(w) for w in args.calibrate_guidances.split(","))

    def calibrate_output() -> dict:
        return calibrate(args.output, guidances, n=args.calibrate_n, steps=args.calibrate_steps, seed=args.seed,
                         n_heldout=args.calibrate_heldout)

    if args.calibrate_only:
        calibrate_output()
        return 0
    t0 = time.time()
    os.makedirs(args.output, exist_ok=True)
    resumable = args.checkpoint_every > 0
    ckpt = os.path.join(args.output, CHECKPOINT)
    key = {k: getattr(args, k) for k in RUN_KEYS}
    if key["reuse_vae"]:  # the reused autoencoder by content, not by path
        with open(os.path.join(key["reuse_vae"], "weights.json"), encoding="utf-8") as f:
            key["reuse_vae"] = "sha256:" + json.load(f)["sha256"]["vae"]
    if key["init_from"]:  # the starting weights by content, too
        with open(os.path.join(key["init_from"], "weights.json"), encoding="utf-8") as f:
            start = json.load(f)
        if start.get("arch", "shapes") != args.arch:
            raise SystemExit(f"--init_from {args.init_from}: its weights are of arch {start.get('arch', 'shapes')!r}, "
                             f"not {args.arch!r}")
        key["init_from"] = "sha256:" + start["sha256"][M.components(args.arch)[0]]  # the UNet's (sd3: transformer's)
    if args.restart and os.path.isdir(ckpt):
        import shutil

        shutil.rmtree(ckpt)
    if resumable and not args.restart and not os.path.isdir(ckpt):
        try:
            with open(os.path.join(args.output, "weights.json"), encoding="utf-8") as f:
                meta = json.load(f)
        except (OSError, ValueError):
            meta = {}
        if meta.get("run_key") == key and "guidance_scale" in meta:
            _log(f"{args.output} already holds the calibrated weights of this run; --restart trains anew")
            return 0
    if args.split == "train":  # the split's captions beside the weights, for evaluation on held-out captions
        world.write_split_captions(args.output)

    if args.reuse_vae:
        vae, analyser, reused = _reuse(args.reuse_vae, args.output)
        scaling = reused["scaling_factor"]
        acc, vae_mse = reused["analyser_heldout_accuracy"], reused["vae_heldout_mse"]
        _log(f"reusing the autoencoder and analyser of {args.reuse_vae} (scaling_factor {scaling:.4f})")
    else:
        reused = None
        analyser = train_analyser(args.analyser_steps, 128, args.seed)
        acc = heldout_accuracy(analyser)
        from safetensors.torch import save as save_bytes

        from core.fs import atomic_write_bytes

        atomic_write_bytes(os.path.join(args.output, "analyser.safetensors"),
                           save_bytes({k: v.to(torch.float16).contiguous() for k, v in analyser.state_dict().items()}))
        analyser = A.load_analyser(os.path.join(args.output, "analyser.safetensors"))  # score with what is committed
        vae, scaling, vae_mse = train_vae(args.vae_steps, 32, args.seed)
    if args.arch == "sd3":  # StableDiffusion3Pipeline decodes latents / scaling_factor + shift_factor (model.vae_config)
        vae.register_to_config(shift_factor=M.vae_config("sd3")["shift_factor"])

    scenes = None if args.split == "all" else world.split_scenes(args.split)
    eval_captions = [world.caption(s) for s in world.random_scenes(np.random.default_rng(args.seed + 5), args.eval_n, scenes)]
    ema, token_ids, history, done = train_unet(
        vae, analyser, steps=args.unet_steps, batch=args.batch, lr=args.lr, seed=args.seed, data=args.data,
        eval_every=args.eval_every, eval_captions=eval_captions, time_budget_s=args.time_budget_min * 60,
        arch=args.arch, scenes=scenes, checkpoint_dir=ckpt if resumable else None,
        checkpoint_every=args.checkpoint_every, resume_key=key, stop_after=args.stop_after, eval_steps=args.eval_steps,
        init_from=args.init_from or None)
    if not done:
        return 0
    meta = dict(scaling_factor=scaling, vae_heldout_mse=vae_mse, analyser_heldout_accuracy=acc, history=history,
                args=vars(args), seconds=time.time() - t0, torch=torch.__version__)
    if args.arch != "shapes" or args.split != "all" or reused or resumable:  # the original command's json stays as it was
        denoiser = next(iter(ema))  # unet, or sd3's transformer
        meta.update(arch=args.arch, split=args.split, run_key=key)
        meta[f"{denoiser}_parameters"] = sum(p.numel() for p in ema[denoiser].parameters())
        if args.split == "train":
            meta["heldout_scenes"] = len(world.heldout_scenes())
        if reused:
            meta["reused"] = reused["reused"]
        if args.init_from:  # a warm restart: what it started from, and that run's own record
            meta["init_from"] = dict(folder=args.init_from, sha256=start["sha256"], run_key=start.get("run_key"),
                                     history=start.get("history"), seconds=start.get("seconds"))
    M.save_components(args.output, {name: vae if name == "vae" else ema[name] for name in M.components(args.arch)},
                      token_ids, meta)
    calibrate_output()
    if resumable and os.path.isdir(ckpt):
        import shutil

        shutil.rmtree(ckpt)  # the weights and weights.json now hold all that is kept
    _log(f"wrote {args.output} in {(time.time() - t0) / 60:.1f} min")
    print(json.dumps(history[-1] if history else {}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
