"""Train the ``shapes`` teacher and its analyser from scratch (CPU, float32, seeded).

    python -m teachers.shapes.train --output teachers/shapes/weights

Three stages, each on freshly rendered images of the shapes world:

1. the analyser (CNN classifier of the five attributes), held-out accuracy printed;
2. the autoencoder (AutoencoderKL, factor 4): L1 + MSE reconstruction with a small KL term;
   its latent scaling factor is 1 / std of the training latents, as SD's 0.18215 was chosen;
3. the UNet and the CLIP text transformer together, epsilon prediction on SD-1.5's noise schedule,
   10% empty captions for classifier-free guidance, EMA weights kept and saved.

Every ``--eval_every`` steps the EMA teacher samples a fixed set of captions (DDIM) and the analyser
scores its prompt adherence, so progress is a number, not a loss.
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


def encode_dataset(vae, n: int, seed: int, batch: int = 256):
    """(scaled latents [n, 4, 8, 8], scene index into ``world.all_scenes()``) of ``n`` random renders."""
    rng = np.random.default_rng(seed)
    scenes = world.all_scenes()
    index = {s: i for i, s in enumerate(scenes)}
    latents, ids = [], []
    with torch.no_grad():
        for start in range(0, n, batch):
            images, batch_scenes = world.sample_batch(rng, min(batch, n - start))
            z = vae.encode(world.to_tensor(images) * 2 - 1).latent_dist.mean
            latents.append(z * vae.config.scaling_factor)
            ids += [index[s] for s in batch_scenes]
    return torch.cat(latents), torch.tensor(ids)


def build_pipeline(unet, vae, text_encoder, tokenizer):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    scheduler = DDIMScheduler(**M.scheduler_config())
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


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


def train_unet(vae, analyser, *, steps: int, batch: int, lr: float, seed: int, data: int, eval_every: int,
               eval_captions: list[str], time_budget_s: float):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from teachers import configs
    from teachers.tokenizer import clip_tokenizer

    torch.manual_seed(seed)
    tokenizer = clip_tokenizer()
    unet = UNet2DConditionModel(**M.unet_config())
    text = CLIPTextModel(CLIPTextConfig(**M.text_config()))
    token_ids = M.world_token_ids(tokenizer)
    with torch.no_grad():  # rows the world never uses: zero, and they stay zero (see model.py)
        table = text.get_input_embeddings().weight
        keep = table[token_ids].clone()
        table.zero_()
        table[token_ids] = keep
    scenes = world.all_scenes()
    captions = [world.caption(s) for s in scenes] + [""]
    input_ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    empty = len(captions) - 1

    _log(f"encoding {data} training images")
    latents, scene_ids = encode_dataset(vae, data, seed + 3)
    noise_sched = DDPMScheduler(**configs.sd15_scheduler())
    alphas = noise_sched.alphas_cumprod

    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, steps, 200))
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text).eval()
    gen = torch.Generator().manual_seed(seed + 4)
    history, start = [], time.time()
    for step in range(steps):
        idx = torch.randint(0, len(latents), (batch,), generator=gen)
        x0 = latents[idx]
        cap = scene_ids[idx].clone()
        cap[torch.rand(batch, generator=gen) < 0.1] = empty
        t = torch.randint(0, 1000, (batch,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        cond = text(input_ids[cap])[0]
        loss = nn.functional.mse_loss(unet(xt, t, cond).sample, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for src, dst in ((unet, ema_unet), (text, ema_text)):
                for p, q in zip(src.parameters(), dst.parameters()):
                    q.lerp_(p, 1 - decay)
        if step % 100 == 0:
            _log(f"unet step {step} loss {loss.item():.4f} lr {sched.get_last_lr()[0]:.2e} "
                 f"({(time.time() - start) / (step + 1):.2f} s/step)")
        last = step == steps - 1 or time.time() - start > time_budget_s
        if (step + 1) % eval_every == 0 or last:
            pipe = build_pipeline(ema_unet, vae, ema_text, tokenizer)
            score = adherence(pipe, analyser, eval_captions, steps=20, guidance=5.0)
            history.append(dict(step=step + 1, loss=float(loss), **score))
            _log(f"eval step {step + 1}: {score}")
        if last:
            break
    return ema_unet, ema_text, tokenizer, token_ids, history


def calibrate(folder: str, guidances=(1.5, 2.5, 4.0, 6.0, 8.0), n: int = 120, steps: int = 50, seed: int = 0) -> dict:
    """Pick the CFG weight with the best prompt adherence at ``steps`` DDIM steps; store it in ``weights.json``.

    Like choosing SD's 7.5: the default guidance of the pipeline is a property of the trained weights.
    Captions are drawn with their own seed (not the training eval's)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from core.fs import atomic_write_json
    from teachers.tokenizer import clip_tokenizer

    unet, vae = UNet2DConditionModel(**M.unet_config()), AutoencoderKL(**M.vae_config())
    text = CLIPTextModel(CLIPTextConfig(**M.text_config()))
    meta = M.load_weights(folder, unet, vae, text)
    pipe = build_pipeline(unet.eval(), vae.eval(), text.eval(), clip_tokenizer())
    analyser = A.load_analyser(os.path.join(folder, "analyser.safetensors"))
    captions = [world.caption(s) for s in world.random_scenes(np.random.default_rng(seed + 77), n)]
    sweep = {}
    for w in guidances:
        sweep[str(w)] = adherence(pipe, analyser, captions, steps=steps, guidance=w, seed=seed)
        _log(f"guidance {w}: {sweep[str(w)]}")
    best = max(guidances, key=lambda w: (sweep[str(w)]["adherence"], -w))
    meta.update(guidance_scale=float(best), guidance_sweep=sweep)
    atomic_write_json(os.path.join(folder, "weights.json"), meta)
    _log(f"guidance_scale {best}")
    return meta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default=M.WEIGHTS_DIR)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--analyser_steps", type=int, default=1500)
    p.add_argument("--vae_steps", type=int, default=1500)
    p.add_argument("--unet_steps", type=int, default=6000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--data", type=int, default=30000, help="rendered training images encoded once for the UNet")
    p.add_argument("--eval_every", type=int, default=500)
    p.add_argument("--time_budget_min", type=float, default=1e9, help="stop UNet training after this long")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--calibrate_only", action="store_true", help="only re-pick the guidance of existing weights")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.calibrate_only:
        calibrate(args.output, seed=args.seed)
        return 0
    t0 = time.time()
    os.makedirs(args.output, exist_ok=True)

    analyser = train_analyser(args.analyser_steps, 128, args.seed)
    acc = heldout_accuracy(analyser)
    from safetensors.torch import save as save_bytes

    from core.fs import atomic_write_bytes

    atomic_write_bytes(os.path.join(args.output, "analyser.safetensors"),
                       save_bytes({k: v.to(torch.float16).contiguous() for k, v in analyser.state_dict().items()}))
    analyser = A.load_analyser(os.path.join(args.output, "analyser.safetensors"))  # score with what is committed

    vae, scaling, vae_mse = train_vae(args.vae_steps, 32, args.seed)
    eval_captions = [world.caption(s) for s in world.random_scenes(np.random.default_rng(args.seed + 5), 90)]
    unet, text, tokenizer, token_ids, history = train_unet(
        vae, analyser, steps=args.unet_steps, batch=args.batch, lr=args.lr, seed=args.seed, data=args.data,
        eval_every=args.eval_every, eval_captions=eval_captions, time_budget_s=args.time_budget_min * 60)
    meta = dict(scaling_factor=scaling, vae_heldout_mse=vae_mse, analyser_heldout_accuracy=acc, history=history,
                args=vars(args), seconds=time.time() - t0, torch=torch.__version__)
    M.save_weights(args.output, unet, vae, text, token_ids, meta)
    calibrate(args.output, seed=args.seed)
    _log(f"wrote {args.output} in {(time.time() - t0) / 60:.1f} min")
    print(json.dumps(history[-1] if history else {}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
