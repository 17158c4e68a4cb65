"""The distillation objective: which loss terms with which weights (a frozen recipe), and their glue.

A recipe preset names the terms of ``students/distill/losses.py`` to combine; ``compute_losses`` evaluates
them for one batch, with the teacher's targets read from the shards (offline) or computed by a
teacher UNet beside the student (online, BK-SDM style). Both paths feed the same loss functions.

Offline targets come from one recorded trajectory point per sample (``z_t`` on the teacher's own
sampling path, with its cond/uncond predictions and, at feature steps, its block outputs). The task
loss uses fresh noise on the teacher's final latent. Step distillation matches one student DDIM step
from ``z_t`` to the recorded latent ``k`` teacher steps later (SnapFusion's x-target); because the
dump records guided trajectories, this target is CFG-aware at the sample's recorded guidance, and the
student's output is guided with the same ``w``.

Flow recipes (``flow_kd``, ``flow_snapgen_kd``, ``flow_step``, ``flow_ladd``, ``flow_step_adv``;
``prediction_type="flow"``) train a velocity-predicting student on a rectified-flow dump (an SD3-shaped
teacher): ``compute_flow_losses``.
Their task loss is SD3's flow matching at logit-normal sigmas, the output term the teacher's recorded
velocity, the step term one Euler step onto the recorded latent k steps later (``losses.flow_step_target``),
and the feature term maps UNet stages to transformer blocks (``feature_map``; ``default_feature_map``).
``flow_ladd`` and ``flow_step_adv`` add LADD's adversarial term with the flow teacher's transformer as the
discriminator's backbone, the student's x0 re-noised on the rectified-flow path (``students/distill/adversarial.py``).
"""

from __future__ import annotations

import dataclasses
import hashlib

import torch
from torch import nn

from core.errors import UserError
from students.distill import losses as D


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistillRecipe:
    name: str  # preset name, written into every checkpoint
    prediction_type: str = "epsilon"  # the student's parameterisation (output/feature KD need the teacher's)
    task_weight: float = 1.0  # L_task on the teacher's final latents with fresh noise
    output_weight: float = 1.0  # L_outKD at the recorded point
    feature_weights: tuple[tuple[str, float], ...] = ()  # L_featKD: (block, weight) pairs (the student's stage and the
    # teacher's block of that name, unless feature_map maps the stage to another teacher block)
    feature_map: tuple[tuple[str, str], ...] = ()  # cross-architecture KD: (student stage, teacher block) pairs
    logit_normal: tuple[float, float] = (0.0, 1.0)  # flow recipes: (m, s) of the task loss's sigma density (SD3: 0, 1)
    timestep_aware: bool = False  # SnapGen: scale each distillation term to the task loss per sample
    guidance_prob: float = 0.0  # SnapFusion p: probability of the guidance-aware (CFG) output term
    guidance_range: tuple[float, float] = (2.0, 14.0)  # w ~ U[lo, hi] for the guidance-aware output term
    step_weight: float = 0.0  # SnapFusion step distillation term
    student_steps: int = 8  # sampling steps the step-distilled student is trained for
    dynamic_gamma: float | None = None  # SnapFusion: task weight = gamma * L_dstl / L_task (dynamic)
    robust_skip_prob: float = 0.0  # SnapFusion robust training: skip each attention block with this p
    adversarial: str = ""  # "" | "ladd" (SnapGen: hinge, re-noised x0) | "ufogen" (non-saturating, posterior); students/distill/adversarial.py
    adv_weight: float = 0.0  # weight of the generator's adversarial term
    adv_logit_normal: tuple[float, float] = (1.0, 1.0)  # flow adversarial recipes: (m, s) of the re-noising sigma's
    # logit-normal density (LADD: m = 1, s = 1, shifted toward high noise)
    recon_weight: float = 0.0  # UFOGen's reconstruction term ||x0_pred - x0||^2 against the recorded final latent
    two_step_teacher: bool = False  # progressive distillation: the step target is two DDIM steps of an online teacher

    def __post_init__(self):
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {self.prediction_type!r} is not one of {', '.join(PREDICTION_TYPES)}")
        if self.is_flow and (self.adversarial not in ("", "ladd") or self.two_step_teacher or self.guidance_prob
                             or self.robust_skip_prob or self.dynamic_gamma is not None):
            raise ValueError("a flow recipe takes the task, output, feature and step terms, timestep-aware scaling and "
                             "LADD's adversarial term ('ladd'); not UFOGen's (its posterior is the DDPM one), progressive, "
                             "guidance-aware, robust or dynamic-gamma terms")
        if not self.adv_logit_normal[1] > 0:
            raise ValueError(f"adv_logit_normal={self.adv_logit_normal}: its scale s must be > 0")
        if not 0 <= self.guidance_prob <= 1 or not 0 <= self.robust_skip_prob < 1:
            raise ValueError(f"guidance_prob={self.guidance_prob} / robust_skip_prob={self.robust_skip_prob} out of range")
        if self.adversarial not in ("", "ladd", "ufogen"):
            raise ValueError(f"adversarial {self.adversarial!r} is not '', 'ladd' or 'ufogen'")


    @property
    def is_flow(self) -> bool:
        """A flow-matching recipe: trains a velocity student on a rectified-flow dump (``compute_flow_losses``)."""
        return self.prediction_type == "flow"

    def feature_pairs(self) -> list[tuple[str, str, float]]:
        """(student stage, teacher block, weight) of each feature term: the stage's own name unless mapped."""
        mapping = dict(self.feature_map)
        return [(stage, mapping.get(stage, stage), weight) for stage, weight in self.feature_weights]

    def teacher_layers(self) -> list[str]:
        """The teacher blocks the feature terms read from the dump (or compute online)."""
        return [teacher for _, teacher, _ in self.feature_pairs()]


PREDICTION_TYPES = ("epsilon", "v_prediction", "flow")


def bk_sdm() -> DistillRecipe:
    """BK-SDM (Kim et al. 2023): task + output KD + feature KD over every stage, all weights 1."""
    layers = tuple((f"{k}.{i}", 1.0) for k in ("down_blocks", "up_blocks") for i in range(4))
    return DistillRecipe(name="bk_sdm", feature_weights=layers + (("mid_block", 1.0),))


def snapgen_kd() -> DistillRecipe:
    """SnapGen (Hu et al. 2024) multi-level KD: task + output + features, timestep-aware scaling."""
    return DistillRecipe(name="snapgen_kd", feature_weights=(("mid_block", 1.0), ("up_blocks.0", 1.0)), timestep_aware=True)


def snapfusion_step(student_steps: int = 8) -> DistillRecipe:
    """SnapFusion: step distillation + CFG-aware output term (p = 0.1) + task loss at dynamic gamma 0.2."""
    return DistillRecipe(name="snapfusion_step", output_weight=1.0, guidance_prob=0.1, step_weight=1.0,
                         student_steps=student_steps, dynamic_gamma=0.2)


def progressive(student_steps: int = 8) -> DistillRecipe:
    """Progressive distillation (Salimans & Ho 2022, Algorithm 2): one student step t -> t'' matches two
    DDIM steps of the teacher (the previous round's student, online) t -> t' -> t''; the step term alone.
    Offline (no online teacher), the recorded trajectory k teacher steps later is the target."""
    return DistillRecipe(name="progressive", task_weight=0.0, output_weight=0.0, step_weight=1.0,
                         student_steps=student_steps, two_step_teacher=True)


def output_kd() -> DistillRecipe:
    """Output distillation alone (plus the task loss): the smallest recipe, for tests and the demo."""
    return DistillRecipe(name="output_kd", task_weight=0.1)


def snapgen_adv(student_steps: int = 4) -> DistillRecipe:
    """SnapGen (Hu et al. 2024, sec. 4.3) adversarial step distillation: SnapFusion's step + CFG-aware
    output KD + task terms, plus a LADD hinge term on the student's x0 re-noised (students/distill/adversarial.py)."""
    return dataclasses.replace(snapfusion_step(student_steps), name="snapgen_adv", adversarial="ladd", adv_weight=0.1)


def ufogen(student_steps: int = 1) -> DistillRecipe:
    """UFOGen (Xu et al. 2023) / MobileDiffusion's one-step diffusion-GAN: non-saturating GAN on the
    posterior sample q(z_s | z_t, x0) plus the reconstruction term; the step term gives the jump's rows."""
    return DistillRecipe(name="ufogen", task_weight=0.0, output_weight=0.0, step_weight=1.0, student_steps=student_steps,
                         adversarial="ufogen", adv_weight=0.1, recon_weight=1.0)


def flow_kd() -> DistillRecipe:
    """Flow-matching distillation of a velocity student from a flow (SD3-shaped) teacher's dump:
    SD3's flow-matching task loss (Esser et al. 2024, sec. 2 and 3.1: v = eps - x0 regressed at
    z = (1 - sigma) x0 + sigma eps, sigma logit-normal with m = 0, s = 1) on the teacher's final latents,
    plus velocity output distillation at the recorded trajectory points (BK-SDM's output KD, eq. 3, on
    the teacher's conditional velocity). Samples with the teacher's sigmas and steps."""
    return DistillRecipe(name="flow_kd", prediction_type="flow", task_weight=1.0, output_weight=1.0)


def flow_snapgen_kd() -> DistillRecipe:
    """SnapGen's (Hu et al. 2024, sec. 4.1) cross-architecture multi-level KD from a transformer teacher
    into a UNet: ``flow_kd`` plus feature terms on the student's ``mid_block`` and ``up_blocks.0`` matched
    through learned 1x1 projections to the dump's recorded transformer blocks (``default_feature_map``:
    the earlier block to mid_block, the later to up_blocks.0), with SnapGen's timestep-aware scaling."""
    return DistillRecipe(name="flow_snapgen_kd", prediction_type="flow", task_weight=1.0, output_weight=1.0,
                         feature_weights=(("mid_block", 1.0), ("up_blocks.0", 1.0)), timestep_aware=True)


def flow_step(student_steps: int = 4) -> DistillRecipe:
    """Step distillation from a flow teacher's trajectory: the student's guided velocity at recorded
    z_i takes ONE Euler step over k = S / student_steps recorded teacher steps and must land on the
    recorded latent z_{i+k} (``losses.flow_step_target``: v* = (z_{i+k} - z_i) / (sigma_{i+k} - sigma_i),
    SnapFusion's x-target rule, Li et al. 2023 eq. 5, on the rectified-flow path), plus the velocity
    output term and the flow-matching task loss at 0.1. Samples with the teacher's sigmas at rows 0, k, 2k, ..."""
    return DistillRecipe(name="flow_step", prediction_type="flow", task_weight=0.1, output_weight=1.0, step_weight=1.0,
                         student_steps=student_steps)


def flow_ladd(student_steps: int = 4) -> DistillRecipe:
    """LADD (Sauer et al. 2024, "Fast High-Resolution Image Synthesis with Latent Adversarial Diffusion
    Distillation"; SD3-Turbo) on a flow teacher's dump: the few-step student's x0 = z - sigma v at the
    recorded jump starts and the teacher's final latent (real) re-noised to z = (1 - s) x0 + s eps, s drawn
    from the logit-normal pi_ln(s; m = 1, s = 1) (SD3's density, Esser et al. 2024 sec. 3.1, shifted toward
    high noise as LADD's discriminator noise is; ``adv_logit_normal``), judged by hinge heads on the frozen
    teacher transformer's blocks; the adversarial term at weight 1 is the student's main signal (LADD drops
    the distillation losses: task and output are off). The step term (``flow_step``'s) stays at 1: it is what
    makes the rows the jump starts the student is trained and exported on (as in ``ufogen``)."""
    return dataclasses.replace(flow_step(student_steps), name="flow_ladd", task_weight=0.0, output_weight=0.0,
                               adversarial="ladd", adv_weight=1.0)


def flow_step_adv(student_steps: int = 4) -> DistillRecipe:
    """``flow_step``'s terms (step, velocity output, task at 0.1) plus ``flow_ladd``'s adversarial term at 0.1:
    the flow form of ``snapgen_adv`` (SnapGen sec. 4.3, step distillation with a LADD term)."""
    return dataclasses.replace(flow_step(student_steps), name="flow_step_adv", adversarial="ladd", adv_weight=0.1)


FLOW_RECIPES = ("flow_kd", "flow_snapgen_kd", "flow_step", "flow_ladd", "flow_step_adv")


def default_feature_map(stages: list[str], recorded: list[str]) -> tuple[tuple[str, str], ...]:
    """The cross-architecture mapping, student stage -> teacher block: the recipe's stages in its order
    (``flow_snapgen_kd``: mid_block, up_blocks.0) take the LAST ``len(stages)`` of the dump's recorded
    blocks in depth order (``transformer_blocks.N`` by N), so the deeper stage of the UNet's decoder path
    meets the deeper transformer block (tiny-sd3's default dump: mid_block -> transformer_blocks.2,
    up_blocks.0 -> transformer_blocks.3). ``ValueError`` when the dump recorded fewer blocks than stages."""
    def depth(name):
        tail = name.rsplit(".", 1)[-1]
        return (0, int(tail), name) if tail.isdigit() else (1, 0, name)

    ordered = sorted(recorded, key=depth)
    if len(ordered) < len(stages):
        raise ValueError(f"the dump recorded {len(ordered)} teacher block(s) {ordered} for {len(stages)} student "
                         f"stage(s) {list(stages)}: dump more --feature_layers, or map them with --feature_map")
    return tuple(zip(stages, ordered[len(ordered) - len(stages):]))


def parse_feature_map(text: str) -> tuple[tuple[str, str], ...]:
    """``mid_block=transformer_blocks.2,up_blocks.0=transformer_blocks.3`` -> ((stage, block), ...)."""
    pairs = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        stage, eq, block = item.partition("=")
        if not eq or not stage.strip() or not block.strip():
            raise UserError(f"--feature_map: {item!r} is not STUDENT_STAGE=TEACHER_BLOCK")
        pairs.append((stage.strip(), block.strip()))
    return tuple(pairs)


RECIPES = {"bk_sdm": bk_sdm, "snapgen_kd": snapgen_kd, "snapfusion_step": snapfusion_step, "output_kd": output_kd,
           "snapgen_adv": snapgen_adv, "ufogen": ufogen,
           "progressive": progressive, "flow_kd": flow_kd, "flow_snapgen_kd": flow_snapgen_kd, "flow_step": flow_step,
           "flow_ladd": flow_ladd, "flow_step_adv": flow_step_adv}


def get_recipe(name: str, **overrides) -> DistillRecipe:
    if name not in RECIPES:
        raise UserError(f"unknown distillation recipe {name!r}; known: {', '.join(sorted(RECIPES))}")
    base = RECIPES[name]()
    unknown = set(overrides) - {f.name for f in dataclasses.fields(base)}
    if unknown:
        raise UserError(f"unknown recipe override(s) {sorted(unknown)}")
    return dataclasses.replace(base, **overrides)


def head_key(layer: str) -> str:
    return layer.replace(".", "_")


def make_projections(student_channels: dict[str, int], teacher_channels: dict[str, int], layers,
                     feature_map: dict[str, str] | None = None) -> nn.ModuleDict:
    """The distillation head: a 1x1 conv per level from student to teacher channels (dropped at export).
    ``layers`` are student stages; ``feature_map`` maps a stage to the teacher block it is matched with
    (cross-architecture KD), else the teacher block of the same name. Keyed by the student stage."""
    feature_map = feature_map or {}
    return nn.ModuleDict({head_key(l): nn.Conv2d(student_channels[l], teacher_channels[feature_map.get(l, l)], 1)
                          for l in layers})


def choose_row(key: str, seed: int, epoch: int, candidates: list[int]) -> int:
    """A recorded row for this sample, the same on every rank, worker and resume (hash, not RNG state)."""
    h = int.from_bytes(hashlib.sha256(f"{seed}:{epoch}:{key}".encode()).digest()[:8], "little")
    return candidates[h % len(candidates)]


@torch.no_grad()
def online_targets(teacher_unet, z, t, cond, uncond, layers, added=None, added_uncond=None) -> dict:
    """Teacher predictions (cond, uncond) and cond-branch block outputs at (z, t), computed now."""
    from teachers.sampler import FeatureCapture, resolve_modules

    capture = FeatureCapture(resolve_modules(teacher_unet, layers), z.shape[0])
    try:
        capture.active = bool(layers)
        extra = None
        if added is not None:
            extra = {k: torch.cat([added_uncond[k], added[k]]) for k in added}
        out = teacher_unet(torch.cat([z, z]), t.repeat(2) if t.ndim else t, encoder_hidden_states=torch.cat([uncond, cond]),
                           added_cond_kwargs=extra).sample
    finally:
        capture.remove()
    pred_uncond, pred_cond = out.chunk(2)
    return {"pred_cond": pred_cond, "pred_uncond": pred_uncond, "feats": dict(capture.captured)}


def student_forward(student, z, t, cond, added=None, features=False):
    out = student(z, t, encoder_hidden_states=cond, added_cond_kwargs=added, return_features=features) if features \
        else student(z, t, encoder_hidden_states=cond, added_cond_kwargs=added)
    return out.sample, (out.features if features else None)


def compute_losses(student, heads, batch: dict, targets: dict, recipe: DistillRecipe, alphas_cumprod,
                   generator: torch.Generator, task_point: dict | None = None, decoder=None,
                   decoder_weight: float = 1.0, outputs: dict | None = None,
                   raw: dict | None = None) -> dict[str, torch.Tensor]:
    """All loss terms of ``recipe`` for one batch; returns per-term means and ``loss`` (the total).

    A returned term is what it adds to ``loss``: the loss function's value times the recipe's weight,
    and for ``snapgen_kd`` rescaled to the task loss per sample (timestep-aware), so those terms alone
    do not tell the terms apart.

    ``batch``: z (B,4,h,w) at float timesteps t (B,) with its noise level alpha, sigma (B,) (from
    ``shards.loader.noise_levels``), cond/uncond embeddings, x0 (final latent), guidance (B,), and for
    step distillation z_next with alpha_next, sigma_next; ``image`` (B,3,H,W) when a decoder is distilled.
    ``targets``: pred_cond, pred_uncond, feats at (z, t) - offline from the shards or ``online_targets``.
    ``alphas_cumprod``: the training schedule, for the task loss's fresh timesteps only.
    ``task_point``: z/t/noise of the task loss; None draws fresh noise and timesteps from ``generator``.
    ``decoder``: the small decoder of SnapFusion's data distillation (its term weighted ``decoder_weight``).
    ``outputs``: if given, receives the student's ``x0`` at (z, t) (guided when the recipe runs the
    unconditional branch), for the adversarial terms (``students.distill.adversarial``).
    ``raw``: if given, receives each term's batch mean before any weight or scaling (detached): the
    loss functions' own values, comparable across recipes and steps (what ``losses.jsonl`` logs as ``loss/<term>``).
    """
    if recipe.is_flow:
        return compute_flow_losses(student, heads, batch, targets, recipe, generator, task_point=task_point,
                                   outputs=outputs, raw=raw)
    z, t, cond, added = batch["z"], batch["t"], batch["cond"], batch.get("added")
    alpha, sigma = batch["alpha"].to(z), batch["sigma"].to(z)
    terms: dict[str, torch.Tensor] = {}
    unweighted: dict[str, torch.Tensor] = {}  # the same terms before weights and scaling, per sample
    feature_layers = dict(recipe.feature_weights)
    pred, feats = student_forward(student, z, t, cond, added, features=bool(feature_layers))
    if recipe.guidance_prob > 0 or recipe.step_weight > 0:
        pred_u, _ = student_forward(student, z, t, batch["uncond"], batch.get("added_uncond"))
    if recipe.output_weight > 0:
        out = D.output_distill_loss(pred, targets["pred_cond"])
        if recipe.guidance_prob > 0:  # SnapFusion: guidance-aware with probability p, w ~ U[range], per sample
            use = torch.rand(z.shape[0], generator=generator) < recipe.guidance_prob
            lo, hi = recipe.guidance_range
            w = lo + (hi - lo) * torch.rand(z.shape[0], generator=generator)
            guided = D.guided_distill_loss(pred, pred_u, targets["pred_cond"], targets["pred_uncond"], w.to(z.device))
            out = torch.where(use.to(z.device), guided, out)
        unweighted["output"] = out
        terms["output"] = recipe.output_weight * out
    if feature_layers and recipe.feature_map:  # stages matched to other-named teacher blocks
        terms["feature"] = unweighted["feature"] = D.mapped_feature_distill_loss(feats, targets["feats"], heads,
                                                                                 recipe.feature_pairs())
    elif feature_layers:
        terms["feature"] = unweighted["feature"] = D.feature_distill_loss(feats, targets["feats"], heads, feature_layers)
    if recipe.step_weight > 0:
        guided_pred = D.guidance_combine(pred, pred_u, batch["guidance"])
        unweighted["step"] = D.step_distill_loss(guided_pred, z, batch["z_next"], alpha, sigma, batch["alpha_next"].to(z),
                                                 batch["sigma_next"].to(z), recipe.prediction_type)
        terms["step"] = recipe.step_weight * unweighted["step"]
    if outputs is not None:
        guided = D.guidance_combine(pred, pred_u, batch["guidance"]) if recipe.guidance_prob > 0 or recipe.step_weight > 0 else pred
        outputs["x0"] = D.pred_to_x0(guided, z, alpha, sigma, recipe.prediction_type)
    distill_total = sum(terms.values()) if terms else None
    if recipe.task_weight > 0 or recipe.dynamic_gamma is not None:
        terms["task"], unweighted["task"] = _task_term(student, batch, recipe, alphas_cumprod, generator, task_point,
                                                       distill_total, terms)
    if decoder is not None:  # SnapFusion data distillation: small decoder vs the teacher decoder's image
        image = decoder.decode(batch["x0"] / decoder.config.scaling_factor).sample
        unweighted["decoder"] = D.decoder_distill_loss(image, batch["image"])
        terms["decoder"] = decoder_weight * unweighted["decoder"]
    if raw is not None:
        raw.update({k: v.detach().mean() for k, v in unweighted.items()})
    means = {k: v.mean() for k, v in terms.items()}
    means["loss"] = sum(means.values())
    return means


def _task_term(student, batch, recipe, alphas_cumprod, generator, task_point, distill_total, terms):
    """L_task at fresh noise on x0, weighted (fixed, or SnapFusion's dynamic gamma); with SnapGen's
    timestep-aware scaling the distillation ``terms`` are rescaled to it in place. -> (weighted, unweighted), (batch,) each"""
    x0 = batch["x0"]
    if task_point is None:
        noise = torch.randn(x0.shape, generator=generator).to(x0)
        t_task = torch.randint(0, len(alphas_cumprod), (x0.shape[0],), generator=generator).to(x0.device)
    else:
        noise, t_task = task_point["noise"], task_point["t"]
    a_task, s_task = D.alpha_sigma(alphas_cumprod, t_task)
    z_task = a_task.view(-1, 1, 1, 1).to(x0) * x0 + s_task.view(-1, 1, 1, 1).to(x0) * noise
    pred_task, _ = student_forward(student, z_task, t_task.to(x0.dtype), batch["cond"], batch.get("added"))
    task = D.task_loss(pred_task, x0, noise, a_task, s_task, recipe.prediction_type)
    if recipe.timestep_aware and distill_total is not None:
        for k in list(terms):
            terms[k] = D.timestep_aware_scale(terms[k], task)
    weight = D.dynamic_gamma(distill_total, task, recipe.dynamic_gamma) if (
        recipe.dynamic_gamma is not None and distill_total is not None) else recipe.task_weight
    return weight * task, task


def compute_flow_losses(student, heads, batch: dict, targets: dict, recipe: DistillRecipe, generator: torch.Generator,
                        task_point: dict | None = None, outputs: dict | None = None,
                        raw: dict | None = None) -> dict[str, torch.Tensor]:
    """The terms of a flow recipe (``recipe.is_flow``) for one batch of a rectified-flow dump, as
    ``compute_losses`` returns them (per-term means and ``loss``; ``raw`` the unweighted batch means).

    ``batch`` as ``compute_losses``'s, with the flow record's noise levels: z = (1 - sigma) x0 + sigma eps
    (alpha = 1 - sigma) at timesteps t = sigma * ``batch["num_train_timesteps"]`` (1000 if absent), the
    student's time input as the teacher's; ``targets`` the recorded velocities v = eps - x0 and block maps.
    Terms: ``output`` (``velocity_distill_loss`` against the teacher's conditional velocity), ``feature``
    (``mapped_feature_distill_loss`` over ``recipe.feature_pairs()``), ``step`` (``flow_step_distill_loss``
    of the student's velocity guided at the sample's recorded w, onto the recorded z_next at sigma_next) and
    ``task`` (``flow_matching_loss`` at z = (1 - s) x0 + s eps with fresh noise and s drawn logit-normal,
    ``recipe.logit_normal``; ``task_point`` = {"noise", "sigma"} fixes them). With ``timestep_aware`` the
    distillation terms are scaled to the task loss per sample (SnapGen). ``outputs`` receives ``x0`` =
    z - sigma v of the student's (guided, for step distillation) velocity.
    """
    z, t, cond, added = batch["z"], batch["t"], batch["cond"], batch.get("added")
    sigma = batch["sigma"].to(z)
    scale = float(batch.get("num_train_timesteps", 1000))
    terms: dict[str, torch.Tensor] = {}
    unweighted: dict[str, torch.Tensor] = {}
    pairs = recipe.feature_pairs()
    pred, feats = student_forward(student, z, t, cond, added, features=bool(pairs))
    guided = pred
    if recipe.step_weight > 0:
        pred_u, _ = student_forward(student, z, t, batch["uncond"], batch.get("added_uncond"))
        guided = D.guidance_combine(pred, pred_u, batch["guidance"])
    if recipe.output_weight > 0:
        unweighted["output"] = D.velocity_distill_loss(pred, targets["pred_cond"])
        terms["output"] = recipe.output_weight * unweighted["output"]
    if pairs:
        terms["feature"] = unweighted["feature"] = D.mapped_feature_distill_loss(feats, targets["feats"], heads, pairs)
    if recipe.step_weight > 0:
        unweighted["step"] = D.flow_step_distill_loss(guided, z, batch["z_next"], sigma, batch["sigma_next"].to(z))
        terms["step"] = recipe.step_weight * unweighted["step"]
    if outputs is not None:
        outputs["x0"] = D.flow_pred_to_x0(guided, z, sigma)
    if recipe.task_weight > 0:
        x0 = batch["x0"]
        if task_point is None:
            m, s = recipe.logit_normal
            noise = torch.randn(x0.shape, generator=generator).to(x0)
            s_task = D.logit_normal_timesteps(x0.shape[0], m=m, s=s, generator=generator).to(x0)
        else:
            noise, s_task = task_point["noise"].to(x0), task_point["sigma"].to(x0)
        pred_task, _ = student_forward(student, D.flow_interpolate(x0, noise, s_task), s_task * scale, cond, added)
        unweighted["task"] = task = D.flow_matching_loss(pred_task, x0, noise)
        if recipe.timestep_aware:
            for k in list(terms):
                terms[k] = D.timestep_aware_scale(terms[k], task)
        terms["task"] = recipe.task_weight * task
    if raw is not None:
        raw.update({k: v.detach().mean() for k, v in unweighted.items()})
    means = {k: v.mean() for k, v in terms.items()}
    means["loss"] = sum(means.values())
    return means


class robust_skip:
    """SnapFusion robust training (sec. 3.2): for one step, skip each skippable block with probability p.

    Skippable: transformer stages (output = input) and ResNet blocks whose input and output shapes
    match (output = input, the identity of their residual path). Skipping is a forward hook that
    returns the block's input, so the graph shape and the DDP bucket layout stay the same.
    """

    def __init__(self, model, p: float, generator: torch.Generator):
        self.model, self.p, self.generator, self.handles = getattr(model, "module", model), p, generator, []

    def _skippable(self):
        from students.models.blocks import ResnetBlock, Transformer2D

        for module in self.model.modules():
            if isinstance(module, Transformer2D) or (isinstance(module, ResnetBlock) and module.conv_shortcut is None):
                yield module

    def __enter__(self):
        if self.p > 0:
            for module in self._skippable():
                if float(torch.rand((), generator=self.generator)) < self.p:
                    self.handles.append(module.register_forward_hook(lambda m, inputs, output: inputs[0]))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles = []
        return False
