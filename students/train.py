"""Distil a student UNet from teacher shards. One process or many (torchrun, DDP: NCCL on GPUs, gloo on CPU).

    distill train --data out/dump --output runs/s1 --preset tiny --recipe output_kd --max_steps 200
    torchrun --nproc_per_node 8 -m students.train --data gs://b/dump --output gs://b/runs/s1 --preset snapgen ...

Re-running the same command resumes from the newest checkpoint in ``--output`` exactly where it
stopped (weights, EMA, optimizer, LR schedule, RNG states and data position), so a killed and
resumed run computes the same losses as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import sys
import time

import torch

from students import checkpoint as ckpt
from students.data import STATS, dataset_shards, read_dataset, record_pipeline, training_batch
from students.distill import decoder_distill_loss
from students.objective import DistillRecipe, compute_losses, get_recipe, make_projections, online_targets, robust_skip


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    data: str  # dataset folder (dump or filtered dump)
    output: str  # run folder: checkpoints, TensorBoard logs, image grids
    preset: str = "tiny"  # student UNet preset (students.unet.PRESETS)
    recipe: str = "output_kd"  # distillation recipe (students.objective.RECIPES)
    student_steps: int = 0  # step distillation: sampling steps the student is trained for (0 = the recipe's)
    max_steps: int = 100  # optimizer steps
    batch_size: int = 8  # samples per rank per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-4  # peak AdamW learning rate
    warmup_steps: int = 10  # linear warm-up, then cosine decay to 0 at max_steps
    weight_decay: float = 0.01
    grad_clip: float = 1.0  # max global grad norm (0 = off)
    ema_decay: float = 0.999  # EMA of the student (0 = off)
    seed: int = 0
    shuffle_buffer: int = 64  # samples in webdataset's shuffle buffer (0 = shard order)
    epoch_length: int = 0  # 0: an epoch is one pass over this rank's shards; N: resampled shards, N samples per rank
    num_workers: int = 0  # DataLoader workers per rank
    checkpoint_every: int = 50  # steps between checkpoints
    keep_checkpoints: int = 2  # newest K kept
    log_every: int = 10  # steps between TensorBoard scalars
    image_every: int = 0  # steps between teacher/student PNG grids (0 = off)
    decoder: str | None = None  # also distil a small decoder (students.vae preset: tiny | pruned); needs --save_images dumps
    decoder_weight: float = 1.0  # weight of the decoder distillation term
    online_teacher: str | None = None  # teacher spec: compute targets online instead of reading them
    audit_keys: int = 0  # 1: write OUTPUT/ranks/rank-R.json (keys read per epoch, final weight hash)
    device: str = "cpu"
    mixed_precision: str = "no"  # no | bf16 (autocast on GPUs that support it)


def lr_lambda(cfg: TrainConfig):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


class Batches:
    """Epoch-ordered micro-batches of records for this rank, resumable at (epoch, position)."""

    def __init__(self, cfg: TrainConfig, urls: list[str], epoch: int = 0, position: int = 0):
        self.cfg, self.urls, self.epoch, self.position = cfg, urls, epoch, position
        self.seen: dict[int, list[str]] = {}  # epoch -> keys read by this rank (with audit_keys)
        self._it = self._epoch_iter(skip=position)

    def _epoch_iter(self, skip: int):
        pipeline = record_pipeline(self.urls, shuffle_buffer=self.cfg.shuffle_buffer, seed=self.cfg.seed + self.epoch,
                                   resampled=self.cfg.epoch_length > 0)
        loader = torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=self.cfg.num_workers)
        it = iter(loader)
        for _ in range(skip):  # the loader's order is deterministic: skipping restores the position
            next(it)
        return it

    def next(self) -> list:
        records = []
        while len(records) < self.cfg.batch_size:
            try:
                if self.cfg.epoch_length and self.position >= self.cfg.epoch_length:
                    raise StopIteration  # resampled mode: the epoch ends by count
                records.append(next(self._it))
                self.position += 1
                if self.cfg.audit_keys:
                    self.seen.setdefault(self.epoch, []).append(records[-1].key)
            except StopIteration:
                if not records and self.position == 0:
                    raise RuntimeError(f"no samples for this rank in {len(self.urls)} shard(s)") from None
                self.epoch, self.position = self.epoch + 1, 0
                self._it = self._epoch_iter(skip=0)
                if records:  # an epoch ends on a partial batch: finish it, next batch starts the new epoch
                    break
        return records


def setup_distributed(cfg: TrainConfig):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if cfg.device.startswith("cuda") else "gloo"
        torch.distributed.init_process_group(backend)
        if cfg.device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return rank, world


def train(cfg: TrainConfig) -> list[float]:
    """Run (or resume) training; returns the loss of every optimizer step run in this call (rank 0)."""
    from diffusers import DDPMScheduler

    from students.unet import build_unet

    # 1. processes, seeds, the recipe
    rank, world = setup_distributed(cfg)
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if cfg.device.startswith("cuda") else cfg.device)
    torch.manual_seed(cfg.seed)
    recipe: DistillRecipe = get_recipe(cfg.recipe, **({"student_steps": cfg.student_steps} if cfg.student_steps else {}))
    # 2. the dataset and what it stores once
    dataset, negative = read_dataset(cfg.data)
    noise_schedule = DDPMScheduler.from_config(dataset["scheduler_config"])
    alphas_cumprod = noise_schedule.alphas_cumprod.to(device)
    final_abar = 1.0 if dataset["scheduler_config"].get("set_alpha_to_one") else float(noise_schedule.alphas_cumprod[0])
    if recipe.prediction_type != dataset["prediction_type"] and (recipe.output_weight or recipe.feature_weights):
        raise ValueError(f"recipe {recipe.name!r} trains a {recipe.prediction_type} student on a "
                         f"{dataset['prediction_type']} teacher: output/feature distillation need the same target")
    urls = dataset_shards(cfg.data)
    # 3. models: student, distillation head, EMA, optional online teacher
    student = build_unet(cfg.preset).to(device)
    layers = [name for name, _ in recipe.feature_weights]
    teacher_channels = _teacher_channels(cfg.data, urls, layers)
    heads = make_projections({k: c for k, (c, _) in student.feature_info().items()}, teacher_channels, layers).to(device)
    ema_unet = ckpt.make_ema(student) if cfg.ema_decay > 0 else None
    teacher_unet = None
    if cfg.online_teacher:
        from teachers.load import load_teacher

        teacher_unet = load_teacher(cfg.online_teacher, device=str(device)).unet.requires_grad_(False).eval()
    decoder = None
    if cfg.decoder:
        from students.vae import build_vae

        decoder = build_vae(cfg.decoder).to(device).train()
    params = list(student.parameters()) + list(heads.parameters()) + (list(decoder.parameters()) if decoder else [])
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    # 4. resume from the newest checkpoint, if any
    state = ckpt.load_latest(cfg.output, student, heads, ema_unet, optimizer, scheduler, generator, decoder)
    step, epoch, position = state.get("step", 0), state.get("epoch", 0), state.get("position", 0)
    model = student
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
    batches = Batches(cfg, urls, epoch, position)
    # 5. observers: progress bar, TensorBoard, grids (rank 0)
    log = ckpt.RunLog(cfg, rank) if rank == 0 else None
    losses: list[float] = []
    start_step, t0 = step, time.monotonic()
    while step < cfg.max_steps:
        optimizer.zero_grad(set_to_none=True)
        terms = {}
        for micro in range(cfg.grad_accum):
            records = batches.next()
            data = training_batch(records, negative, recipe, seed=cfg.seed, epoch=batches.epoch,
                                  final_alpha_cumprod=final_abar, with_images=decoder is not None)
            batch = _to(data["batch"], device)
            targets = _to(data["targets"], device)
            if teacher_unet is not None:
                targets = online_targets(teacher_unet, batch["z"], batch["t"], batch["cond"], batch["uncond"], layers,
                                         batch.get("added"), batch.get("added_uncond"))
            sync = micro == cfg.grad_accum - 1 or world == 1
            with (model.no_sync() if not sync else contextlib.nullcontext()), robust_skip(model, recipe.robust_skip_prob, generator), \
                    torch.autocast(device.type, torch.bfloat16, enabled=cfg.mixed_precision == "bf16"):
                terms = compute_losses(model, heads, batch, targets, recipe, alphas_cumprod, generator)
                if decoder is not None:  # SnapFusion data distillation: small decoder vs teacher decoder image
                    image = decoder.decode(batch["x0"] / decoder.config.scaling_factor).sample
                    terms["decoder"] = cfg.decoder_weight * decoder_distill_loss(image, batch["image"]).mean()
                    terms["loss"] = terms["loss"] + terms["decoder"]
                (terms["loss"] / cfg.grad_accum).backward()
        if world > 1:  # the head is not wrapped in DDP: average its gradients by hand
            for p in heads.parameters():
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= world
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip > 0 else torch.tensor(0.0)
        optimizer.step()
        scheduler.step()
        if ema_unet is not None:
            ckpt.update_ema(ema_unet, student, cfg.ema_decay)
        step += 1
        losses.append(float(terms["loss"].detach()))
        if log is not None:
            log.step(step, {k: float(v.detach()) for k, v in terms.items()}, scheduler.get_last_lr()[0], float(grad_norm),
                     samples_per_s=(step - start_step) * cfg.batch_size * cfg.grad_accum * world / (time.monotonic() - t0))
        if rank == 0 and cfg.image_every and (step % cfg.image_every == 0 or step == cfg.max_steps):
            log.grid(step, student, ema_unet, dataset, urls, recipe)
        if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
            if rank == 0:
                ckpt.save(cfg, recipe, step, batches.epoch, batches.position, student, heads, ema_unet, optimizer,
                          scheduler, generator, decoder)
            if world > 1:
                torch.distributed.barrier()
    if log is not None:
        log.close(STATS)
    if cfg.audit_keys:
        ckpt.write_audit(cfg.output, rank, world, student, batches.seen)
    return losses


def _to(obj, device):
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _teacher_channels(data_dir: str, urls: list[str], layers: list[str]) -> dict[str, int]:
    """Channels of each distilled teacher block, read off the first record (its ``array_shapes``)."""
    if not layers:
        return {}
    from students.data import record_pipeline as pipe

    rec = next(iter(pipe(urls[:1])))
    missing = [l for l in layers if l not in rec.feats]
    if missing:
        raise ValueError(f"the recipe distils features {missing} that the dump in {data_dir!r} did not record "
                         f"(it has {sorted(rec.feats)})")
    return {l: int(rec.feats[l].shape[1]) for l in layers}


def parse_args(argv: list[str] | None) -> TrainConfig:
    parser = argparse.ArgumentParser(prog="distill train", description=__doc__.split("\n")[0])
    for field in dataclasses.fields(TrainConfig):
        kind = {int: int, float: float}.get(type(field.default), str)
        required = field.default is dataclasses.MISSING
        parser.add_argument(f"--{field.name}", f"--{field.name.replace('_', '-')}", dest=field.name, type=kind,
                            required=required, default=None if required else field.default)
    args = parser.parse_args(argv)
    return TrainConfig(**vars(args))


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    try:
        train(cfg)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
