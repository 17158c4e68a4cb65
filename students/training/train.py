"""Distil a student UNet from teacher shards. One process or many (torchrun, DDP: NCCL on GPUs, gloo on CPU).

    distill train --data out/dump --output runs/s1 --preset tiny --recipe output_kd --max_steps 200
    torchrun --nproc_per_node 8 -m students.training --data gs://b/dump --output gs://b/runs/s1 --preset snapgen ...

Re-running the same command resumes from the newest checkpoint in ``--output`` exactly where it
stopped (weights, EMA, optimizer, LR schedule, the torch/numpy/Python RNG states and data position),
so a killed and resumed run computes the same losses as an uninterrupted one. ``--data`` and
``--output`` may be local paths or fsspec URLs (``gs://``, ``s3://``, ``memory://``).

Bad flags, presets, recipes and datasets are reported as one line before any work (exit 2). A
corrupt sample is skipped and counted with its key and reason. A NaN or Inf loss stops the run
with an error naming the step and the batch's keys; the last good checkpoint stays as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time

import torch

from core.devices import check_device
from core.errors import UserError
from core.options import differing_fields, not_one_of, option
from students.distill import adversarial
from students.training import checkpoint as ckpt
from shards.loader import MAX_LISTED_SKIPS, ReadStats, dataset_shards, read_dataset, record_pipeline
from shards.record import RECTIFIED_FLOW
from shards.schema import DatasetInfo
from students.distill.batches import step_rows, training_batch
from students.distill.inference import student_sampling
from students.distill.recipes import (FLOW_RECIPES, RECIPES, DistillRecipe, compute_losses, default_feature_map,
                                      get_recipe, make_projections, online_targets, parse_feature_map, robust_skip)
from core.fs import join, read_bytes, url_to_fs

SCRATCH_LR = 2e-3  # peak learning rate of a student trained from scratch (the shapes preset)
INIT_LR = 3e-4  # of a teacher-initialised student: a fine-tune; 2e-3 pulls it off the teacher (BENCHMARKS.md)
MIXED_PRECISION = ("no", "bf16")
ADV_REAL = ("teacher", "image")  # --adv_real (students/distill/adversarial.py)


class TrainingDiverged(UserError):
    """A non-finite loss: training stopped before the optimizer step, the last good checkpoint kept."""


_S_DATA = "data and output"
_S_STUDENT = "the student"
_S_RECIPE = "the recipe"
_S_OPTIM = "optimisation"
_S_LOADING = "data loading"
_S_SAVING = "checkpoints and logs"
_S_DEVICE = "device and speed"
_S_ADV = "adversarial recipes (snapgen_adv, ufogen, flow_ladd, flow_step_adv)"


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    data: str = option(section=_S_DATA, help="dataset folder: a dump or a filtered dump (local path or fsspec URL)")
    output: str = option(section=_S_DATA,
                         help="run folder: checkpoints, losses.jsonl, TensorBoard logs, image grids (local or URL)")
    preset: str | None = option(None, section=_S_STUDENT,
                                help="student UNet preset (students.models.unet.PRESETS; none = tiny)")
    init_from_teacher: str | None = option(None, section=_S_STUDENT,
                                           help="build the student as the teacher's UNet cut by this cut "
                                           "(students.models.teacher_init.CUTS; full = the whole UNet) and start it from "
                                           "the teacher's weights; not with --preset (none = from --preset)")
    init_from: str | None = option(None, section=_S_STUDENT,
                                   help="start from another run's (or checkpoint's) student weights, EMA if it "
                                   "kept one: a new run with a fresh optimizer and LR schedule (SnapGen's feature "
                                   "KD first, then step distillation); replaces --preset and --init_from_teacher")
    recipe: str = option("output_kd", section=_S_RECIPE, help="distillation recipe", choices=sorted(RECIPES))
    student_steps: int = option(0, section=_S_RECIPE,
                                help="step distillation: sampling steps the student is trained for (0 = the recipe's)")
    progressive_from: int = option(0, section=_S_RECIPE,
                                   help="progressive distillation: rounds halving the steps from this many to "
                                   "--student_steps, each round's student the next one's teacher (0 = one run)")
    max_steps: int = option(100, section=_S_OPTIM, help="optimizer steps (per progressive round)")
    extend: bool = option(False, section=_S_OPTIM,
                          help="re-running a run with another --max_steps: train it on (or stop it) at the new "
                          "count on purpose (the LR schedule follows --max_steps); without it such a re-run is refused")
    batch_size: int = option(8, section=_S_OPTIM, help="samples per rank per micro-batch")
    grad_accum: int = option(1, section=_S_OPTIM, help="micro-batches per optimizer step")
    lr: float = option(1e-4, section=_S_OPTIM, help="peak AdamW learning rate")
    warmup_steps: int = option(10, section=_S_OPTIM, help="linear warm-up steps, then cosine decay to 0 at max_steps")
    weight_decay: float = option(0.01, section=_S_OPTIM, help="AdamW weight decay")
    grad_clip: float = option(1.0, section=_S_OPTIM, help="max global grad norm (0 = off)")
    ema_decay: float = option(0.999, section=_S_OPTIM, help="EMA decay of the student (0 = off)")
    seed: int = option(0, section=_S_OPTIM,
                       help="seed of the torch, numpy and Python RNGs, the data order and the trajectory rows")
    shuffle_buffer: int = option(64, section=_S_LOADING,
                                 help="samples in webdataset's shuffle buffer (0 = shard order)")
    epoch_length: int = option(0, section=_S_LOADING,
                               help="0: an epoch is one pass over this rank's shards; N: resampled shards, N samples per rank")
    num_workers: int = option(0, section=_S_LOADING, help="DataLoader workers per rank")
    checkpoint_every: int = option(50, section=_S_SAVING, help="steps between checkpoints")
    keep_checkpoints: int = option(2, section=_S_SAVING, help="newest K checkpoints kept")
    log_every: int = option(10, section=_S_SAVING, help="steps between TensorBoard scalars")
    image_every: int = option(0, section=_S_SAVING, help="steps between teacher/student PNG grids (0 = off)")
    decoder: str | None = option(None, section=_S_STUDENT,
                                 help="also distil a small decoder (students.models.vae preset: tiny | pruned); needs a --save_images dump")
    decoder_weight: float = option(1.0, section=_S_STUDENT, help="weight of the decoder distillation term")
    online_teacher: str | None = option(None, section=_S_RECIPE,
                                        help="teacher spec: compute targets online instead of reading them")
    audit_keys: int = option(0, section=_S_SAVING,
                             help="1: write OUTPUT/ranks/rank-R.json (keys read per epoch, final weight hash)")
    device: str = option("cpu", section=_S_DEVICE, help="cpu | cuda | cuda:N")
    mixed_precision: str = option("no", section=_S_DEVICE,
                                  help="bf16: autocast on GPUs that support it", choices=MIXED_PRECISION)
    channels_last: bool = option(True, section=_S_DEVICE,
                                 help="keep the student and its latents in channels-last memory format: faster "
                                 "convolutions in oneDNN (CPU) and cuDNN (GPU); results equal to rounding")
    fused_optimizer: bool = option(True, section=_S_DEVICE,
                                   help="AdamW's fused kernel (one call per step instead of one per parameter); "
                                   "results equal to rounding")
    compile: bool = option(False, section=_S_DEVICE,
                           help="torch.compile the student's forward (inductor: CPU and GPU); the first steps "
                           "compile it (minutes on a small CPU), then each step is faster; not with robust training")
    feature_map: str = option("", section=_S_RECIPE,
                              help="feature KD across architectures: STAGE=BLOCK pairs, comma-separated, the "
                              "student stage matched to the teacher block ('' = the recipe's; flow_snapgen_kd: its "
                              "stages take the dump's last recorded blocks in depth order)")
    prediction_type: str = option("", section=_S_RECIPE,
                                  help="the student's parameterisation ('' = the recipe's, the teacher's): "
                                  "v_prediction makes 1-step students far better (x0 = alpha z - sigma v does not "
                                  "amplify errors at t ~ T); the output KD term, which compares with the teacher's "
                                  "prediction, is then off", choices=("", "epsilon", "v_prediction"))
    # adversarial recipes (snapgen_adv, ufogen, flow_ladd, flow_step_adv; students/distill/adversarial.py)
    adv_weight: float = option(-1.0, section=_S_ADV,
                               help="weight of the generator's adversarial term (-1 = the recipe's)")
    disc_layers: str = option("", section=_S_ADV,
                              help="teacher blocks the discriminator heads read, comma-separated ('' = last down block, "
                              "mid_block; a flow teacher's transformer: every transformer_blocks.N)")
    disc_lr: float = option(1e-4, section=_S_ADV, help="AdamW learning rate of the discriminator heads")
    r1_gamma: float = option(-1.0, section=_S_ADV,
                             help="R1 weight on real inputs (-1 = the recipe's source: ladd 0, ufogen 0.1)")
    r1_every: int = option(16, section=_S_ADV, help="steps between (lazy) R1 penalties")
    adv_warmup: int = option(0, section=_S_ADV,
                             help="first steps without the generator's adversarial term (the discriminator trains)")
    adv_real: str = option("teacher", section=_S_ADV,
                           help="what the discriminator takes as real: the dump's final teacher latents, or "
                           "real images of the captions (image: a dump made with --real_images)",
                           choices=ADV_REAL)

    def __post_init__(self):
        positive = ("max_steps", "batch_size", "grad_accum", "checkpoint_every", "keep_checkpoints", "log_every", "r1_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be at least 1, got {getattr(self, name)}")
        for name in ("student_steps", "progressive_from", "warmup_steps", "shuffle_buffer", "epoch_length", "num_workers",
                     "image_every", "grad_clip", "weight_decay", "decoder_weight", "adv_warmup"):
            if not (getattr(self, name) >= 0 and math.isfinite(getattr(self, name))):  # nan < 0 is False
                raise UserError(f"--{name} must be a finite number >= 0, got {getattr(self, name)}")
        if not math.isfinite(self.adv_weight):
            raise UserError(f"--adv_weight must be a finite number, got {self.adv_weight}")
        for name in ("lr", "disc_lr"):
            if not getattr(self, name) > 0 or not math.isfinite(getattr(self, name)):
                raise UserError(f"--{name} must be a positive number, got {getattr(self, name)}")
        if not 0 <= self.ema_decay < 1:
            raise UserError(f"--ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.recipe not in RECIPES:
            raise UserError(f"--recipe: unknown distillation recipe {self.recipe!r}; known: {', '.join(sorted(RECIPES))}")
        if self.progressive_from:
            from students.distill.progressive import rounds

            if self.recipe != "progressive" or not self.student_steps:
                raise UserError("--progressive_from needs --recipe progressive and --student_steps")
            rounds(self.progressive_from, self.student_steps)
        if self.feature_map:
            stages = {stage for stage, _ in parse_feature_map(self.feature_map)}
            known = {stage for stage, _ in RECIPES[self.recipe]().feature_weights}
            if not known or stages - known:
                raise UserError(f"--feature_map maps {sorted(stages - known) or sorted(stages)}, which recipe "
                                f"{self.recipe!r} has no feature term on (its stages: {sorted(known) or 'none'})")
        if self.adv_real not in ADV_REAL:
            raise UserError(not_one_of("--adv_real", self.adv_real, ADV_REAL))
        if self.adv_real != "teacher" and not RECIPES[self.recipe]().adversarial:
            raise UserError(f"--adv_real {self.adv_real} only applies to the adversarial recipes "
                            f"({', '.join(n for n in sorted(RECIPES) if RECIPES[n]().adversarial)}), not {self.recipe!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise UserError(not_one_of("--mixed_precision", self.mixed_precision, MIXED_PRECISION))
        if not (self.device == "cpu" or self.device.startswith("cuda") or self.device == "mps"):
            raise UserError(f"--device {self.device!r} is not cpu, cuda, cuda:N or mps")
        from students.models.unet import PRESETS

        if self.init_from is not None and (self.preset is not None or self.init_from_teacher is not None):
            given = "--preset" if self.preset is not None else "--init_from_teacher"
            raise UserError(f"--init_from takes the student's architecture and weights from {self.init_from!r}; "
                            f"{given} builds another: pass one, not both")
        if self.init_from_teacher is not None:
            from students.models.teacher_init import CUTS, unknown_cut

            if self.init_from_teacher not in CUTS:
                raise UserError(f"--init_from_teacher: {unknown_cut(self.init_from_teacher)}")
            if self.preset is not None:
                raise UserError(f"--init_from_teacher builds the student from the teacher's blocks; --preset {self.preset!r} "
                                "has blocks with no teacher counterpart (separable convs, other widths): pass one, not both")
        elif self.preset is None and self.init_from is None:
            object.__setattr__(self, "preset", "tiny")
        if self.preset is not None and self.preset not in PRESETS:
            raise UserError(f"--preset: unknown student preset {self.preset!r}; known: {', '.join(sorted(PRESETS))}")
        if self.decoder is not None:
            from students.models.vae import VAE_PRESETS

            if self.decoder not in VAE_PRESETS:
                raise UserError(f"--decoder: unknown decoder preset {self.decoder!r}; known: {', '.join(sorted(VAE_PRESETS))}")
        if self.online_teacher is not None:
            from teachers.load import TeacherError, teacher_geometry

            try:
                geometry = teacher_geometry(self.online_teacher)
            except TeacherError as err:
                raise UserError(f"--online_teacher: {err}") from None
            if geometry and geometry.get("is_flow"):
                raise UserError(f"--online_teacher {self.online_teacher!r} is a flow-matching teacher: "
                                "the flow recipes read their teacher's targets from a flow dump (dump it, then "
                                f"train with --recipe {FLOW_RECIPES[0]}); --online_teacher takes UNet teachers")


    def resolved_recipe(self) -> DistillRecipe:
        recipe = get_recipe(self.recipe, **({"student_steps": self.student_steps} if self.student_steps else {}),
                            **({"adv_weight": self.adv_weight} if self.adv_weight >= 0 else {}))
        if self.prediction_type and self.prediction_type != recipe.prediction_type and not recipe.is_flow:
            recipe = dataclasses.replace(recipe, prediction_type=self.prediction_type, output_weight=0.0)
        if self.feature_map:
            recipe = dataclasses.replace(recipe, feature_map=parse_feature_map(self.feature_map))
        return recipe


def lr_lambda(cfg: TrainConfig):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


class Batches:
    """Epoch-ordered micro-batches of records for this rank, resumable at (epoch, position).

    A stateful object of the trainer's state (``state_dict``: epoch and position). ``stats`` gathers
    the skips counted in every DataLoader worker (they travel with the records, ``shards.loader.Loaded``).
    """

    def __init__(self, cfg: TrainConfig, urls: list[str], epoch: int = 0, position: int = 0):
        self.cfg, self.urls, self.epoch, self.position = cfg, urls, epoch, position
        self.seen: dict[int, list[str]] = {}  # epoch -> keys read by this rank (with audit_keys)
        self.stats = ReadStats()
        self.taken = 0  # records handed out by next() in this process (a batch that ends an epoch is short)
        self._it = None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position, self._it = int(state["epoch"]), int(state["position"]), None

    def _records(self):
        # The loader's own generator: creating its iterator must not draw from the global torch RNG.
        pipeline = record_pipeline(self.urls, shuffle_buffer=self.cfg.shuffle_buffer, seed=self.cfg.seed + self.epoch,
                                   resampled=self.cfg.epoch_length > 0, report_skips=True)
        loader = torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=self.cfg.num_workers,
                                             generator=torch.Generator().manual_seed(self.cfg.seed + self.epoch))
        for item in loader:
            for skip in item.skips:
                self.stats.add(skip)
            if item.record is not None:
                self.stats.samples += 1
                yield item.record

    def _epoch_iter(self, skip: int):
        it = self._records()
        for _ in range(skip):  # the loader's order is deterministic: skipping restores the position
            next(it)
        return it

    def next(self) -> list:
        if self._it is None:
            self._it = self._epoch_iter(skip=self.position)
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
                    raise UserError(f"no readable samples for this rank in {len(self.urls)} shard(s) "
                                    f"({self.stats.summary()})") from None
                self.epoch, self.position = self.epoch + 1, 0
                self._it = self._epoch_iter(skip=0)
                if records:  # an epoch ends on a partial batch: finish it, next batch starts the new epoch
                    break
        self.taken += len(records)
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


def check_inputs(cfg: TrainConfig, recipe: DistillRecipe, student_config=None):
    """Everything that can be checked before any work: the output path, the dataset, and whether the
    student (``student_config``, else ``--preset``'s) and the decoder fit the dump's conditioning and
    latents, the step counts, and every listed shard's index (``dataset_shards``). -> (dataset, negative,
    urls, decoder kwargs for ``students.models.vae.build_vae``)"""
    fs, fpath = url_to_fs(cfg.output)
    if fs.exists(fpath) and not fs.isdir(fpath):
        raise UserError(f"--output {cfg.output!r} is an existing file, not a run folder")
    check_device(cfg.device)  # before the output folder or a process group exists
    check_rerun(cfg)
    if cfg.init_from is not None:
        from students.training.runs import resolve_checkpoint

        resolve_checkpoint(cfg.init_from)  # a RunError (one line) before any work when it is not a run
    dataset, negative = read_dataset(cfg.data)
    sampler = dataset.dump_recipe.sampler
    check_noise_process(cfg, recipe, dataset)
    if recipe.prediction_type != dataset.prediction_type and (recipe.output_weight or recipe.feature_weights):
        raise UserError(f"recipe {recipe.name!r} trains a {recipe.prediction_type} student on a "
                        f"{dataset.prediction_type} teacher: output/feature distillation need the same target")
    recorded = dataset.recorded_steps
    if recipe.step_weight > 0 and recorded is not None and recorded != list(range(sampler.num_inference_steps)):
        raise UserError(f"recipe {recipe.name!r} (step distillation) needs every teacher step recorded; "
                        f"{cfg.data!r} recorded steps {recorded} (dump with --record_steps all)")
    check_step_counts(cfg, recipe, sampler.num_inference_steps)
    if cfg.adv_real == "image" and not sampler.real_images:
        raise UserError(f"--adv_real image needs real-image latents: {cfg.data!r} was dumped without --real_images "
                        "(re-dump with --real_images, or use --adv_real teacher)")
    if cfg.decoder and not sampler.save_images:
        raise UserError(f"--decoder needs the teacher's images: {cfg.data!r} was dumped without --save_images")
    first = _FirstRecord(lambda: dataset_shards(cfg.data))  # the flags against the dump first, then every index
    if student_config is None and cfg.init_from_teacher is None and cfg.init_from is None:  # a cut is the teacher's UNet: it fits by construction
        from students.models.unet import preset

        student_config = preset(cfg.preset)
    if student_config is not None:
        check_conditioning(student_config, _dump_conditioning(negative, first), cfg, dataset)
    decoder_kwargs = _decoder_fit(cfg, dataset, first) if cfg.decoder else {}
    return dataset, negative, dataset_shards(cfg.data), decoder_kwargs



# TrainConfig fields a re-run may change without changing what the run is (where and how it logs and saves)
RERUN_FREE = ("output", "max_steps", "extend", "checkpoint_every", "keep_checkpoints", "log_every", "image_every",
              "num_workers", "device", "audit_keys", "channels_last", "fused_optimizer", "compile")


def check_noise_process(cfg: TrainConfig, recipe: DistillRecipe, dataset: DatasetInfo) -> None:
    """A flow recipe trains on a rectified-flow dump only, and a diffusion recipe on a variance-preserving one
    (``shards.record.noise_process``); else one line naming the dump and the recipes that fit it."""
    flow_dump = dataset.noise_process == RECTIFIED_FLOW
    if flow_dump and not recipe.is_flow:
        raise UserError(f"--data {cfg.data!r} is a flow dump (prediction_type {dataset.prediction_type!r}, "
                        f"rectified flow) and recipe {recipe.name!r} is a diffusion recipe: flow dumps need a flow "
                        f"recipe ({', '.join(FLOW_RECIPES)}) and a student that takes the dump's latents (--preset tiny_sd3)")
    if recipe.is_flow and not flow_dump:
        raise UserError(f"recipe {recipe.name!r} is a flow recipe (velocity student, rectified flow) but --data "
                        f"{cfg.data!r} is a {dataset.prediction_type} dump of a diffusion teacher: flow recipes need "
                        "a flow dump (an SD3-shaped teacher such as tiny-sd3)")


def resolve_features(recipe: DistillRecipe, dataset: DatasetInfo) -> DistillRecipe:
    """A flow recipe's feature stages mapped to the dump's recorded transformer blocks
    (``default_feature_map``) where the recipe does not map them already; other recipes unchanged."""
    if not recipe.is_flow or not recipe.feature_weights:
        return recipe
    stages = [stage for stage, _ in recipe.feature_weights]
    mapped = dict(recipe.feature_map)
    if all(stage in mapped for stage in stages):
        return recipe
    recorded = list(dataset.dump_recipe.sampler.feature_layers or [])
    try:
        auto = dict(default_feature_map([s for s in stages if s not in mapped],
                                        [b for b in recorded if b not in mapped.values()]))
    except ValueError as err:
        raise UserError(f"recipe {recipe.name!r}: {err}") from None
    return dataclasses.replace(recipe, feature_map=tuple((s, mapped.get(s) or auto[s]) for s in stages))


def check_rerun(cfg: TrainConfig) -> None:
    """A re-run into a folder that holds a run resumes it only with the same recipe: every ``TrainConfig``
    field but ``RERUN_FREE`` as the newest checkpoint saved it, else one line naming the fields that differ
    (the dump's guard does the same for its recipe). ``--max_steps`` may change only with ``--extend``; a
    finished run says it is finished."""
    from students.training.runs import resolve_checkpoint

    found = ckpt.checkpoints(cfg.output)
    if not found:
        return
    saved = json.loads(read_bytes(join(resolve_checkpoint(cfg.output), ckpt.CONFIG)))
    old, step = saved.get("train", {}), int(saved.get("step", 0))
    new = json.loads(json.dumps(dataclasses.asdict(cfg)))  # tuples as lists, as saved
    differ = differing_fields(old, new, ignore=RERUN_FREE)
    if differ:
        shown = ", ".join(f"--{k} {old.get(k)!r} -> {new.get(k)!r}" for k in differ[:4])
        raise UserError(f"{cfg.output!r} holds a run made with another recipe ({shown}"
                        f"{', ...' if len(differ) > 4 else ''}): re-run with its flags to resume it, or pass a new --output")
    if step > cfg.max_steps and not cfg.extend:
        raise UserError(f"{cfg.output!r} is at step {step}, past --max_steps {cfg.max_steps}: pass --extend to stop "
                        "it there on purpose, or a new --output")
    if old.get("max_steps") not in (None, cfg.max_steps) and not cfg.extend:
        raise UserError(f"{cfg.output!r} was started with --max_steps {old['max_steps']}, not {cfg.max_steps} (its LR "
                        "schedule follows it): pass --extend to change it on purpose")
    if step >= cfg.max_steps:
        print(f"distill train: {cfg.output} is finished (step {step} of --max_steps {cfg.max_steps}); "
              "pass a larger --max_steps with --extend to train on", file=sys.stderr, flush=True)


def check_step_counts(cfg: TrainConfig, recipe: DistillRecipe, teacher_steps: int) -> None:
    """Student step counts that fit the dump's ``teacher_steps``, or a one-line ``UserError`` naming both.

    A step-distilled student jumps k = teacher_steps / student_steps recorded steps at a time
    (``students.distill.batches.step_stride``): a count that does not divide them would train and
    export a student of another step count (3 on 8 steps: 4 jumps of 2; 16 on 8: 8 jumps of 1).
    Progressive rounds start from the dump itself: round 1's target is two recorded steps, so
    ``--progressive_from`` is the dump's step count (the rounds then halve it down to
    ``--student_steps``, a power of two below it: ``students.distill.progressive.rounds``).
    """
    if cfg.progressive_from and cfg.progressive_from != teacher_steps:
        raise UserError(f"--progressive_from {cfg.progressive_from} is not the {teacher_steps} teacher steps of "
                        f"{cfg.data!r}: round 1 halves the dump's own trajectory, so pass --progressive_from "
                        f"{teacher_steps} (or dump {cfg.progressive_from} steps)")
    if recipe.step_weight <= 0:
        return
    n = recipe.student_steps
    flag = f"--student_steps {n}" + ("" if cfg.student_steps else f" (the default of recipe {recipe.name!r})")
    if n > teacher_steps:
        raise UserError(f"{flag} is more than the {teacher_steps} teacher steps of {cfg.data!r}: a student "
                        "step jumps one or more recorded teacher steps")
    if teacher_steps % n:
        raise UserError(f"{flag} does not divide the {teacher_steps} teacher steps of {cfg.data!r}: each "
                        f"student step jumps a whole number of recorded steps (it would train "
                        f"{len(step_rows(teacher_steps, n))} jumps); use a divisor of {teacher_steps}")


class _FirstRecord:
    """The dump's first readable record, read once and only if a check needs it (None: none readable)."""

    def __init__(self, list_shards):
        self.list_shards, self._read, self._rec = list_shards, False, None

    def get(self):
        if not self._read:
            self._read, self._rec = True, next(iter(record_pipeline(self.list_shards())), None)
        return self._rec


def _dump_conditioning(negative: dict, first: _FirstRecord) -> dict:
    """What the dump conditions on: ``text_dim`` (prompt embeddings' width), ``pooled_dim`` (SDXL's pooled
    text embeddings; None for SD-shaped teachers) and ``time_ids`` (SDXL's size/crop ids per sample), from
    the unconditional embeddings stored once, else the first record; None where unknown."""
    shape = lambda a: tuple(a.shape) if a is not None else None  # noqa: E731
    text, pooled = shape(negative.get("negative_prompt_embeds")), shape(negative.get("negative_pooled_prompt_embeds"))
    rec = first.get() if text is None else None
    if rec is not None:
        text = text or shape(rec.arrays.get("prompt_embeds"))
        pooled = pooled or shape(rec.arrays.get("pooled_prompt_embeds"))

    def time_ids():  # read only for an SDXL student on an SDXL dump, the one check that needs a record
        found = first.get()
        ids = shape(found.arrays.get("add_time_ids")) if found is not None else None
        return ids[-1] if ids else None

    def channels():  # latent channels, read only for a flow dump's check
        found = first.get()
        return int(found.latents.shape[1]) if found is not None else None

    return {"text_dim": text[-1] if text else None, "pooled_dim": pooled[-1] if pooled else None,
            "time_ids": time_ids, "channels_of": channels}


def check_conditioning(student_config, dump: dict, cfg: TrainConfig, dataset: DatasetInfo) -> None:
    """The student takes the dump's text conditioning (``_dump_conditioning``): its cross-attention width,
    and for SDXL-shaped teachers the pooled embeddings and time ids; else one line naming the preset,
    its value, the dump's and the presets that would fit."""
    from students.models.unet import PRESETS

    who = f"--preset {cfg.preset}" if cfg.init_from_teacher is None else "the student"
    where = f"the dump {cfg.data!r} (teacher {dataset.dump_recipe.teacher or '?'!r})"
    flow_dump = dataset.noise_process == RECTIFIED_FLOW
    if flow_dump:
        return check_flow_conditioning(student_config, dump, who, where)
    xl_student, xl_dump = student_config.addition_embed_type == "text_time", dump["pooled_dim"] is not None

    def fitting() -> str:
        names = [n for n, f in sorted(PRESETS.items()) if f().cross_attention_dim == dump["text_dim"]
                 and (f().addition_embed_type == "text_time") == xl_dump]
        return f"; presets that fit: {', '.join(names)}" if names else ""

    if dump["text_dim"] is not None and student_config.cross_attention_dim != dump["text_dim"]:
        raise UserError(f"{who} has cross_attention_dim {student_config.cross_attention_dim} but {where} has prompt "
                        f"embeddings of width {dump['text_dim']}{fitting()}")
    if dump["text_dim"] is not None and xl_student != xl_dump:
        raise UserError(f"{who} is {'SDXL' if xl_student else 'SD'}-shaped (addition_embed_type="
                        f"{student_config.addition_embed_type!r}) but {where} is {'SDXL' if xl_dump else 'SD'}-shaped "
                        f"({'with' if xl_dump else 'without'} pooled text embeddings){fitting()}")
    n_ids = dump["time_ids"]() if xl_student and xl_dump else None
    if n_ids is not None:
        want = n_ids * student_config.addition_time_embed_dim + dump["pooled_dim"]
        if student_config.projection_class_embeddings_input_dim != want:
            raise UserError(f"{who} has projection_class_embeddings_input_dim "
                            f"{student_config.projection_class_embeddings_input_dim} but {where} gives {n_ids} "
                            f"time ids x addition_time_embed_dim {student_config.addition_time_embed_dim} + pooled width "
                            f"{dump['pooled_dim']} = {want}")


def check_flow_conditioning(student_config, dump: dict, who: str, where: str) -> None:
    """A student of a flow (SD3-shaped) dump takes its 16-channel latents, its prompt embeddings' width in
    cross-attention and its pooled embeddings (``addition_embed_type="pooled"``), as ``tiny_sd3`` does."""
    from students.models.unet import PRESETS

    def fits(c) -> bool:
        return (c.cross_attention_dim == dump["text_dim"] and c.addition_embed_type == "pooled"
                and c.projection_class_embeddings_input_dim == dump["pooled_dim"]
                and (dump.get("channels") is None or c.in_channels == c.out_channels == dump["channels"]))

    dump = dict(dump, channels=dump["channels_of"]())
    if fits(student_config):
        return
    names = [n for n, f in sorted(PRESETS.items()) if fits(f())]
    hint = f"; presets that fit: {', '.join(names)}" if names else ""
    raise UserError(f"{who} (in/out channels {student_config.in_channels}/{student_config.out_channels}, "
                    f"cross_attention_dim {student_config.cross_attention_dim}, addition_embed_type "
                    f"{student_config.addition_embed_type!r}) does not take {where}: it has {dump.get('channels')}-channel "
                    f"latents, prompt embeddings of width {dump['text_dim']} and pooled embeddings of width "
                    f"{dump['pooled_dim']} (a flow student needs addition_embed_type 'pooled'){hint}")


def _decoder_fit(cfg: TrainConfig, dataset: DatasetInfo, first: _FirstRecord) -> dict:
    """``students.models.vae.build_vae`` kwargs that make ``--decoder`` decode the dump's latents to its
    images' size: the teacher VAE's upsamplings (image side / latent side, a power of 2) and latent channels."""
    from students.models.vae import VAE_PRESETS

    rec = first.get()
    if rec is None:
        return {}  # nothing readable: the loader names the skipped samples when training starts
    channels, side = int(rec.latents.shape[1]), int(rec.latents.shape[-1])
    image = int(rec.meta.get("width") or dataset.dump_recipe.sampler.width or 0)
    factor = image // side if side and image % side == 0 else 0
    upsamplings = factor.bit_length() - 1
    if factor < 2 or factor != 2 ** upsamplings:
        raise UserError(f"--decoder {cfg.decoder}: {cfg.data!r} has {image} px images from {side} px latents, not a "
                        "power-of-2 factor a decoder can upsample by")
    kwargs = {"upsamplings": upsamplings, "latent_channels": channels}
    try:
        VAE_PRESETS[cfg.decoder](**kwargs)
    except ValueError as err:
        raise UserError(f"--decoder {cfg.decoder} cannot decode the teacher's factor-{factor} latents of {cfg.data!r}: "
                        f"{err}") from None
    return kwargs


def train(cfg: TrainConfig, *, recipe: DistillRecipe | None = None, stop_after: int | None = None,
          teacher_unet=None, student=None) -> list[float]:
    """Run (or resume) training; returns the loss of every optimizer step run in this call (rank 0).

    ``recipe`` replaces ``cfg.recipe``'s preset (tests: a variant); ``stop_after`` stops after that
    step's checkpoint as if the process had been killed there (tests of the resume). ``teacher_unet``
    replaces ``--online_teacher`` and ``student`` the built student (progressive rounds: the previous round's).
    """
    from students.models.unet import build_unet

    # 1. seeds, the recipe, the inputs (before any process group or write)
    recipe = recipe or cfg.resolved_recipe()
    if recipe.is_flow and cfg.online_teacher is not None:
        raise UserError(f"recipe {recipe.name!r} reads its flow teacher's targets from the dump: --online_teacher "
                        "is for UNet teachers")
    if cfg.compile and recipe.robust_skip_prob > 0:
        raise UserError("--compile: this recipe skips blocks at random (robust training), which a compiled graph "
                        "cannot do; train it without --compile")
    dataset, negative, urls, decoder_kwargs = check_inputs(cfg, recipe, getattr(student, "student_config", None))
    rank, world = setup_distributed(cfg)
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if cfg.device.startswith("cuda") else cfg.device)
    ckpt.RNGState.seed_all(cfg.seed)
    from shards.loader import alphas_cumprod

    recipe = resolve_features(recipe, dataset)
    # the task loss's training schedule (a flow dump has none: its task loss draws sigma, compute_flow_losses)
    train_schedule = None if recipe.is_flow else torch.tensor(alphas_cumprod(dataset.scheduler_config),
                                                              dtype=torch.float32, device=device)
    # 2. models: student, distillation head, EMA, optional online teacher and decoder
    if student is None:
        if cfg.init_from is not None:
            student = student_from_run(cfg.init_from)
        elif cfg.init_from_teacher is not None:
            student = student_from_teacher(cfg, dataset)
        else:
            student = build_unet(cfg.preset)
    student = student.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)
    layers = [name for name, _ in recipe.feature_weights]  # student stages
    teacher_channels = _teacher_channels(cfg.data, urls, recipe.teacher_layers())
    heads = make_projections({k: c for k, (c, _) in student.feature_info().items()}, teacher_channels, layers,
                             dict(recipe.feature_map)).to(device)
    ema_unet = ckpt.make_ema(student) if cfg.ema_decay > 0 else None
    teacher_unet = teacher_unet.to(device) if teacher_unet is not None else _online_teacher(cfg, device)
    if recipe.two_step_teacher and teacher_unet is not None:
        from students.distill.progressive import check_round

        check_round(dataset.dump_recipe.sampler.num_inference_steps, recipe.student_steps)
    decoder = None
    if cfg.decoder:
        from students.models.vae import build_vae

        decoder = build_vae(cfg.decoder, **decoder_kwargs).to(device).train()  # at the teacher VAE's factor
    params = list(student.parameters()) + list(heads.parameters()) + (list(decoder.parameters()) if decoder else [])
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **optimizer_kernel(cfg, params))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    batches = Batches(cfg, urls)
    # 3. the trainer's state: every stateful object, saved and restored together
    adversary = adversarial.build(cfg, recipe, dataset, teacher_unet, device) if recipe.adversarial else None
    state = {"student": student, "ema": ema_unet, "decoder": decoder, "distill_head": heads, "optimizer": optimizer,
             "lr_scheduler": scheduler, "rng": ckpt.RNGState(generator), "data": batches,
             **(adversary.state() if adversary else {})}
    lock = None
    if rank == 0:  # one writer per run folder; the other ranks write nothing but through rank 0
        from core.fs import OutputLock

        lock = OutputLock.acquire(cfg.output, "distill train")
        ckpt.remove_stale(cfg.output)  # what a kill left (before the resume: a swapped-out checkpoint comes back)
    if world > 1:
        torch.distributed.barrier()  # every rank resumes from the folder rank 0 has cleaned
    step = ckpt.load_latest(cfg.output, state)
    model = student
    if world > 1:
        # robust training skips blocks: their parameters get no gradient on that rank in that step
        model = torch.nn.parallel.DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None,
                                                          find_unused_parameters=recipe.robust_skip_prob > 0)
    if cfg.compile:  # after DDP, as torch recommends (its optimizer splits the graph at the gradient buckets)
        model = torch.compile(model)
    # how the student samples, written into every checkpoint (export and eval read it from there)
    sampler, sampling = student_sampling(dataset, dataclasses.asdict(recipe))
    # 4. observers: progress bar, losses.jsonl, TensorBoard, grids (rank 0)
    in_data = sum(int(s.get("count", 0)) for s in dataset.shards)
    if rank == 0 and not cfg.epoch_length and 0 < in_data < cfg.batch_size:
        print(f"distill train: warning: --batch_size {cfg.batch_size} is more than the {in_data} samples of {cfg.data!r}: "
              f"each batch is the whole epoch ({in_data} samples or fewer)", file=sys.stderr, flush=True)
    log = ckpt.RunLog(cfg, rank, resume_step=step) if rank == 0 else None  # drops the lines after `step`
    losses: list[float] = []
    start_step, t0, taken0 = step, time.monotonic(), batches.taken
    try:
        while step < cfg.max_steps:
            optimizer.zero_grad(set_to_none=True)
            terms, raw = _accumulate_gradients(cfg, recipe, model, heads, decoder, teacher_unet, batches, negative, dataset,
                                               train_schedule, generator, device, world, step + 1, adversary)
            if world > 1:  # the head is not wrapped in DDP: average its gradients by hand
                for p in heads.parameters():
                    if p.grad is not None:
                        torch.distributed.all_reduce(p.grad)
                        p.grad /= world
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip > 0 else torch.tensor(0.0)
            optimizer.step()
            scheduler.step()
            if adversary is not None:  # then the discriminator, on this step's real and fake inputs
                terms.update(adversary.discriminator_step(step + 1, world))
            if ema_unet is not None:
                ckpt.update_ema(ema_unet, student, cfg.ema_decay)
            step += 1
            losses.append(float(terms["loss"].detach()))
            if log is not None:
                log.step(step, log_terms(terms, raw), scheduler.get_last_lr()[0], float(grad_norm),
                         samples_per_s=(batches.taken - taken0) * world / (time.monotonic() - t0))  # read, not asked for
            if rank == 0 and cfg.image_every and (step % cfg.image_every == 0 or step == cfg.max_steps):
                log.grid(step, student, ema_unet, dataset, urls, sampler, sampling, decoder)
            if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
                if rank == 0:
                    log.flush()
                    ckpt.save(cfg.output, state, step=step, keep=cfg.keep_checkpoints, describe={"scheduler": sampler},
                              config={"train": dataclasses.asdict(cfg), "recipe": dataclasses.asdict(recipe),
                                      "dataset": dataset.to_dict(), "student": sampling})
                if world > 1:
                    torch.distributed.barrier()
                if stop_after is not None and step >= stop_after:
                    break
        if world > 1:
            _gather_read_stats(batches.stats, rank, world)
    finally:
        if log is not None:
            log.close(batches.stats)
        if lock is not None:
            lock.release()
    if cfg.audit_keys:
        ckpt.write_audit(cfg.output, rank, world, student, batches.seen,
                         heads=adversary.disc.heads if adversary is not None else None)
    return losses


def optimizer_kernel(cfg: TrainConfig, params) -> dict:
    """AdamW's kernel: fused (one call per step) where torch has it for these parameters (float32/16 on CPU or
    CUDA), else foreach; ``--fused_optimizer false`` keeps torch's default (one call per parameter on CPU)."""
    if not cfg.fused_optimizer:
        return {}
    devices = {p.device.type for p in params}
    if devices <= {"cpu", "cuda"} and all(p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in params):
        return {"fused": True}
    return {"foreach": True}


def log_terms(terms: dict, raw: dict | None = None) -> dict[str, float]:
    """The loss terms as ``losses.jsonl`` keys: the total as ``loss``; each term of the student's total
    as ``loss/<term>``, its raw value (``raw``: the loss function's, before weights and scaling), and as
    ``loss_scaled/<term>``, what it adds to ``loss`` (so ``loss`` is the sum of the ``loss_scaled/`` keys).

    Both are needed: ``snapgen_kd``'s timestep-aware scaling brings every distillation term to the
    task loss per sample, so its scaled terms are all equal and only the raw ones show which term
    moves. The prefix keeps a term's name (``step`` of step distillation, say) from overwriting the
    log's own keys (``step``, ``lr``, ``grad_norm``); a name that already has a namespace (the
    discriminator's ``loss/adv_d``, ``disc/acc_real``) is kept as it is."""
    raw = raw or {}
    logged = {}
    for k, v in terms.items():
        if k == "loss" or "/" in k:
            logged[k] = float(v.detach())
        else:
            logged[f"loss/{k}"] = float(raw.get(k, v).detach())
            logged[f"loss_scaled/{k}"] = float(v.detach())
    return logged


def _accumulate_gradients(cfg, recipe, model, heads, decoder, teacher_unet, batches, negative, dataset, train_schedule,
                          generator, device, world, step, adversary=None) -> dict:
    """Forward and backward over ``cfg.grad_accum`` micro-batches; returns the last one's loss terms
    and their raw values (``compute_losses``'s ``raw``)."""
    layers = recipe.teacher_layers()
    for micro in range(cfg.grad_accum):
        records = batches.next()
        data = training_batch(records, negative, recipe, seed=cfg.seed, epoch=batches.epoch,
                              scheduler_config=dataset.scheduler_config, with_images=decoder is not None,
                              with_image_latents=adversary is not None and adversary.real == "image")
        batch, targets = _to(data["batch"], device), _to(data["targets"], device)
        if recipe.two_step_teacher and teacher_unet is not None:  # progressive: the teacher's two DDIM steps
            from students.distill.progressive import midpoint_levels, teacher_z_next

            mids = midpoint_levels(records, recipe, seed=cfg.seed, epoch=batches.epoch,
                                   scheduler_config=dataset.scheduler_config)
            batch["z_next"] = teacher_z_next(teacher_unet, batch, mids, dataset.prediction_type)
        elif teacher_unet is not None:
            targets = online_targets(teacher_unet, batch["z"], batch["t"], batch["cond"], batch["uncond"], layers,
                                     batch.get("added"), batch.get("added_uncond"))
        sync = micro == cfg.grad_accum - 1 or world == 1
        with (model.no_sync() if not sync else contextlib.nullcontext()), robust_skip(model, recipe.robust_skip_prob, generator), \
                torch.autocast(device.type, torch.bfloat16, enabled=cfg.mixed_precision == "bf16"):
            outputs = {} if adversary is not None else None
            raw = {}
            terms = compute_losses(model, heads, batch, targets, recipe, train_schedule, generator, decoder=decoder,
                                   decoder_weight=cfg.decoder_weight, outputs=outputs, raw=raw)
            if adversary is not None:
                terms = adversary.generator_terms(terms, outputs["x0"], batch, generator, step, raw=raw)
        _check_finite(terms, step, batch["keys"], world, cfg.output)
        (terms["loss"] / cfg.grad_accum).backward()
    return terms, raw


def _gather_read_stats(stats: ReadStats, rank: int, world: int) -> None:
    """Rank 0's ``stats`` += every other rank's (samples read, skips with keys), for the final summary."""
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, (stats.samples, stats.skipped, dict(stats.reasons), stats.skips))
    if rank == 0:
        for r, (samples, skipped, reasons, skips) in enumerate(gathered):
            if r == 0:
                continue
            stats.samples += samples
            stats.skipped += skipped
            for reason, n in reasons.items():
                stats.reasons[reason] = stats.reasons.get(reason, 0) + n
            stats.skips.extend(skips[: max(0, MAX_LISTED_SKIPS - len(stats.skips))])


def _check_finite(terms: dict, step: int, keys: list[str], world: int, output: str) -> None:
    """Stop on a NaN/Inf loss (every rank, so none waits in a collective), naming the step and the batch."""
    finite = torch.isfinite(terms["loss"].detach()).float().reshape(1)
    if world > 1:
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    if float(finite) < 1:
        bad = [k for k, v in terms.items() if not torch.isfinite(v.detach()).all()]
        found = ckpt.checkpoints(output)
        kept = f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was written"
        raise TrainingDiverged(f"non-finite loss at step {step} (terms {bad}) on the batch with keys {keys}; "
                               f"training stopped before the optimizer step, {kept}")


def student_from_run(path: str):
    """The student UNet of another run or checkpoint (its EMA weights when it kept them, else the raw
    ones), to start a new run from; nothing else of that run (optimizer, schedule, data position) comes along."""
    import os

    from students.training.runs import load_student_unet, read_run

    run = read_run(path)
    weights = "ema" if os.path.isdir(os.path.join(run.files, "ema")) else "raw"
    return load_student_unet(run.files, weights)


def student_from_teacher(cfg: TrainConfig, dataset: DatasetInfo):
    """The teacher's UNet cut by ``cfg.init_from_teacher``, its kept blocks copied from the teacher
    (BK-SDM sec. 3.1; ``students.models.teacher_init``). The teacher: ``--online_teacher``, else the dump's."""
    from students.models.teacher_init import cut, family_config, init_from_teacher
    from students.models.unet import EfficientUNet2DConditionModel
    from teachers.load import TeacherError, load_teacher

    spec = cfg.online_teacher or dataset.dump_recipe.teacher
    try:
        teacher_unet = load_teacher(spec).unet
        student_cfg, block_map = cut(family_config(teacher_unet), cfg.init_from_teacher)
        student = EfficientUNet2DConditionModel.from_student_config(student_cfg)
        init_from_teacher(student, teacher_unet, block_map)
    except (TeacherError, ValueError) as err:
        raise UserError(f"--init_from_teacher {cfg.init_from_teacher}: teacher {spec!r}: {err}") from None
    return student


def _online_teacher(cfg: TrainConfig, device):
    if not cfg.online_teacher:
        return None
    from teachers.load import TeacherError, load_teacher

    try:
        teacher = load_teacher(cfg.online_teacher, device=str(device))
    except TeacherError as err:
        raise UserError(f"--online_teacher: {err}") from None
    return teacher.unet.requires_grad_(False).eval()


def _to(obj, device):
    """A host batch onto the device. On CUDA the copy goes through pinned memory and does not block, so it
    overlaps the kernels still queued from the previous step (the first use of the batch waits on the stream)."""
    if torch.is_tensor(obj):
        if device.type == "cuda" and obj.device.type == "cpu":
            return obj.pin_memory().to(device, non_blocking=True)
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _teacher_channels(data_dir: str, urls: list[str], layers: list[str]) -> dict[str, int]:
    """Channels of each distilled teacher block, read off the first readable record."""
    if not layers:
        return {}
    rec = next(iter(record_pipeline(urls)), None)
    if rec is None:
        raise UserError(f"no readable sample in {data_dir!r}")
    missing = [l for l in layers if l not in rec.feats]
    if missing:
        raise UserError(f"the recipe distils features {missing} that the dump in {data_dir!r} did not record "
                        f"(it has {sorted(rec.feats)})")
    return {l: int(rec.feats[l].shape[1]) for l in layers}
