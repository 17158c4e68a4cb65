"""SnapFusion's architecture evolution (arXiv 2306.00980, Sec. 3.2, Algorithm 1) on a training checkpoint.

    distill evolve --data out/dump --output runs/evo --init_from_teacher full --recipe snapfusion_step --student_steps 4 \\
        --latency_target_ratio 0.7 --iterations 10 --steps_per_iteration 80 --val_captions val.txt --metric adherence

The loop: robust training for ``--steps_per_iteration`` steps (every skippable block skipped with
``--robust_skip_prob``, ``students.distill.recipes.robust_skip``), then *score* every evolvable block: the
drop of a metric on a fixed validation set (captions, image seeds) when the block is skipped
(``delta_metric = M(full) - M(skipped)``; the shapes analyser's adherence, the CLIP score, or any
``students.evaluation.metrics.Metric``), and the latency it costs from a lookup table (``students.cost.lookup``);
then *evolve*: actions are sorted by ``value = delta_metric / delta_latency_ms``:

- while the predicted latency is over the target: remove blocks in ascending value (ties: the one that
  saves more latency first, then execution order), up to ``--max_actions`` per evolution, stopping as
  soon as the target is met;
- when it is at or under the target: copy blocks in descending value (ties: the cheaper first, then
  execution order), each only if its skip costs metric (delta > 0) and the copy keeps the prediction
  under the target, up to ``--max_actions``.

Once the architecture is final (``is_final``: no evolution can change it again: at or under the target
no copy fits, or over it nothing may be removed), the remaining segments fine-tune it plainly (``--final_robust_skip_prob``, default 0)
and score no blocks.

Evolvable blocks are those whose removal is exactly a skip: transformer blocks (``T``/``C``/``S``
tokens) anywhere, and mid-stage ResNets (the mid stage runs at one width and feeds no skip connection;
the planner keeps at least one block in it). Down- and up-stage ResNets stay: a down-stage ResNet
feeds a skip connection (removing it also removes its up-stage consumer, which is no skip), an
up-stage one concatenates a skip, and the first of each changes channels. ``--keep_cross_attention K``
never removes the last K blocks with cross-attention. The start is ``--preset`` or, as for
``distill train``, the teacher's UNet cut by ``--init_from_teacher`` and started from its weights (then
``--lr`` defaults to ``students.training.train.INIT_LR``, a fine-tune).

The architecture changes in place on the checkpoint at the iteration's last step (``evolve_checkpoint``):
weights and EMA are carried over by block (a copy duplicates its source's weights), the AdamW state
of removed parameters is dropped and that of copied ones duplicated, and the LR schedule, RNG states
and data position are kept, so training resumes from it exactly as the trainer resumes any run.
Outputs in ``--output``: ``run/`` (the trainer's run folder; its last checkpoint is the evolved
student), ``student_config.json``, ``lookup.json``, ``evolution.jsonl`` (one line per iteration: the
scores, the actions, predicted and measured latency, the metric) and ``report.html`` / ``report.png``
(the path of latency against the metric), ``evolve.json`` (the settings it was started with).
Re-running the same command resumes; another setting over an existing evolution is refused in one line
naming the fields that differ, and a finished one says so instead of running again (``check_rerun``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

from core.allocator import ALLOCATORS
from core.errors import UserError, run_main
from core.options import option, parse, reuse
from students.training.train import INIT_LR
from students.search.edit import (Action, apply_actions, copyable, evolvable, evolve_checkpoint, has_cross_attention,
                                  skip_blocks, student_at)
from students.cost.lookup import LookupSettings, LookupTable, unet_blocks
from students.training.train import TrainConfig
from core.fs import join, url_to_fs

METRICS = ("adherence", "clip")
METRIC_KEYS = {"adherence": "adherence", "clip": "clip_score"}
EVOLUTION = "evolution.jsonl"
SETTINGS = "evolve.json"  # the EvolveConfig an evolution folder was started with (its re-run guard)
# EvolveConfig fields a re-run may change without changing what the evolution is (as distill train's RERUN_FREE)
RERUN_FREE = ("output", "num_workers", "audit_keys", "device")
_TRAIN_LR = next(f.default for f in dataclasses.fields(TrainConfig) if f.name == "lr")


# ------------------------------------------------------------------------------------------
# scores and the plan
# ------------------------------------------------------------------------------------------


def metric_value(pipe, prompts, metric, key: str, *, steps: int, guidance: float, size: int, seed: int,
                 batch_size: int, skip=()) -> float:
    """``metric`` over the images the pipeline draws for ``prompts`` (seed + index), with ``skip`` blocks skipped."""
    from students.evaluation.evaluate import generate

    metric.reset()
    with skip_blocks(pipe.unet, skip):
        for images, captions, _ in generate(pipe, prompts, steps, guidance, size, seed, batch_size):
            metric.update(images, captions)
    return float(metric.compute()[key])


def score_blocks(pipe, cfg, table: LookupTable, measure) -> tuple[float, dict[str, dict]]:
    """(M(full), {module: {delta_metric, latency_ms}}) for every evolvable or copyable block;
    ``measure(skip)`` is the metric with those blocks skipped."""
    full = measure(())
    blocks = {b.module: b for b in evolvable(cfg) + copyable(cfg)}
    scores = {}
    for module, block in blocks.items():
        scores[module] = {"delta_metric": full - measure((module,)), "latency_ms": table.block_ms(block), "token": block.token}
    return full, scores


def plan_actions(cfg, scores: dict[str, dict], table: LookupTable, target_ms: float, *, max_actions: int = 1,
                 keep_cross_attention: int = 1) -> list[Action]:
    """The evolution's actions (module doc): remove in ascending value while over the target, else
    copy in descending value while the copy fits under it."""
    predicted = table.predict_ms(cfg)
    actions: list[Action] = []
    order = {b.module: i for i, b in enumerate(unet_blocks(cfg))}
    if predicted > target_ms:
        removable = {b.module: b for b in evolvable(cfg)}
        crossing = sum(has_cross_attention(b) for b in unet_blocks(cfg))
        mid = sum(b.stage == "mid_block" for b in unet_blocks(cfg))
        ranked = sorted((Action("remove", m, s["delta_metric"], s["latency_ms"]) for m, s in scores.items() if m in removable),
                        key=lambda a: (a.value, -a.latency_ms, order[a.module]))
        for action in ranked:
            if len(actions) >= max_actions or predicted <= target_ms:
                break
            block = removable[action.module]
            if has_cross_attention(block) and crossing <= keep_cross_attention:
                continue
            if block.stage == "mid_block" and mid <= 1:  # a stage keeps one block
                continue
            crossing -= has_cross_attention(block)
            mid -= block.stage == "mid_block"
            actions.append(action)
            predicted -= action.latency_ms
    else:
        copies = {b.module for b in copyable(cfg)}
        ranked = sorted((Action("copy", m, s["delta_metric"], s["latency_ms"]) for m, s in scores.items() if m in copies),
                        key=lambda a: (-a.value, a.latency_ms, order[a.module]))
        for action in ranked:
            if len(actions) >= max_actions:
                break
            if action.delta_metric > 0 and predicted + action.latency_ms <= target_ms:
                actions.append(action)
                predicted += action.latency_ms
    return actions


def is_final(cfg, table: LookupTable, target_ms: float, keep_cross_attention: int = 1) -> bool:
    """No evolution can change ``cfg`` any more, whatever the scores: over the target, no block may be
    removed (the last cross-attention blocks and the mid stage's last block stay); at or under it, no
    block's copy fits. The planner itself decides, on scores that would take any action allowed (a copy
    needs a positive score; latency comes from the table, not from training)."""
    anything = {b.module: {"delta_metric": 1.0, "latency_ms": table.block_ms(b)} for b in unet_blocks(cfg)}
    return not plan_actions(cfg, anything, table, target_ms, keep_cross_attention=keep_cross_attention)


# ------------------------------------------------------------------------------------------
# the loop
# ------------------------------------------------------------------------------------------


#: TrainConfig's flags that ``distill evolve`` takes as they are (declared once, in students/training/train.py)
TRAIN_FLAGS = ("data", "preset", "init_from_teacher", "recipe", "student_steps", "batch_size", "grad_accum", "warmup_steps",
               "weight_decay", "grad_clip", "ema_decay", "seed", "shuffle_buffer", "num_workers", "audit_keys", "device")


_S_DATA = "data and output"
_S_TARGET = "latency target"
_S_EVOLUTION = "evolution and robust training"
_S_OPTIM = "optimisation"
_S_VALIDATION = "validation (scoring blocks)"


@dataclasses.dataclass(frozen=True, kw_only=True)
@reuse(TrainConfig, *TRAIN_FLAGS)
class EvolveConfig:
    output: str = option(section=_S_DATA,
                         help="evolution folder: run/, lookup.json, evolution.jsonl, student_config.json, report.html")
    robust_skip_prob: float = option(0.1, section=_S_EVOLUTION,
                                     help="robust training: probability of skipping each skippable block per step")
    final_robust_skip_prob: float = option(0.0, section=_S_EVOLUTION,
                                           help="skip probability once the architecture is final (is_final: no "
                                           "evolution can change it): 0 = the evolved UNet is fine-tuned plainly, as SnapFusion does")
    latency_target_ms: float = option(0.0, section=_S_TARGET,
                                      help="target UNet latency in ms on the lookup's runtime (or --latency_target_ratio)")
    latency_target_ratio: float = option(0.0, section=_S_TARGET,
                                         help="target as a fraction of the starting UNet's predicted latency")
    lookup: str | None = option(None, section=_S_TARGET,
                                help="latency lookup table (distill profile --lookup); None = measure the start UNet")
    lookup_batch: int = option(2, section=_S_TARGET, help="batch of the measured lookup (2 = one CFG step)")
    lookup_repeats: int = option(20, section=_S_TARGET,
                                 help="timed forwards of the measured lookup and of each measured latency")
    lookup_statistic: str = option("median", section=_S_TARGET,
                                   help="median | min of the measured lookup's timed runs", choices=("median", "min"))
    lookup_allocator: str = option("steady", section=_S_TARGET,
                                   help="allocator state of the measured lookup and of every measured latency: steady "
                                   "(glibc keeps freed memory; core/allocator.py) | default", choices=ALLOCATORS)
    iterations: int = option(4, section=_S_EVOLUTION,
                             help="training segments; the architecture evolves after each but the last")
    steps_per_iteration: int = option(100, section=_S_EVOLUTION, help="robust-training optimizer steps per segment")
    max_actions: int = option(1, section=_S_EVOLUTION, help="blocks removed or copied per evolution")
    keep_cross_attention: int = option(1, section=_S_EVOLUTION,
                                       help="never remove the last K blocks with cross-attention")
    val_captions: str = option(section=_S_VALIDATION,
                               help="validation captions (.txt / .jsonl / COCO .json) the blocks are scored on")
    val_images: int = option(32, section=_S_VALIDATION,
                             help="validation captions used (one image each, seed = --val_seed + index)")
    val_seed: int = option(0, section=_S_VALIDATION, help="image seed of the first validation caption")
    metric: str = option("adherence", section=_S_VALIDATION,
                         help="adherence (shapes analyser) | clip (open_clip CLIP score)", choices=METRICS)
    clip_model: str = option("ViT-L-14", section=_S_VALIDATION, help="open_clip architecture for --metric clip")
    clip_weights: str | None = option(None, section=_S_VALIDATION, help="local open_clip checkpoint for --metric clip")
    weights: str = option("ema", section=_S_VALIDATION, help="which student weights are scored", choices=("ema", "raw"))
    eval_batch_size: int = option(64, section=_S_VALIDATION, help="prompts per pipeline call while scoring")
    lr: float | None = option(None, section=_S_OPTIM,
                              help="peak AdamW learning rate, one cosine over all iterations (default: distill "
                              f"train's {_TRAIN_LR:g} from a preset, INIT_LR = {INIT_LR:g} with --init_from_teacher)")

    def __post_init__(self):
        for name in ("iterations", "steps_per_iteration", "max_actions", "val_images", "eval_batch_size", "lookup_batch",
                     "lookup_repeats"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.keep_cross_attention < 0:
            raise UserError(f"--keep_cross_attention must not be negative, got {self.keep_cross_attention}")
        if (self.latency_target_ms > 0) == (self.latency_target_ratio > 0):
            raise UserError("give exactly one of --latency_target_ms and --latency_target_ratio (a positive number)")
        for flag in ("robust_skip_prob", "final_robust_skip_prob"):
            if not 0 <= getattr(self, flag) < 1:
                raise UserError(f"--{flag} must be in [0, 1), got {getattr(self, flag)}")
        if self.metric == "clip" and not self.clip_weights:
            raise UserError("--metric clip needs --clip_weights (a local open_clip checkpoint, or 'random')")
        if self.lr is None:  # a fine-tune from the teacher's weights, else distill train's rate
            object.__setattr__(self, "lr", INIT_LR if self.init_from_teacher is not None else _TRAIN_LR)
        train = self.train_config()  # the training flags, checked by their owner (a preset or a cut, the recipe, ...)
        object.__setattr__(self, "preset", train.preset)

    def train_config(self) -> TrainConfig:
        """The trainer's config of the whole run: one cosine LR schedule over every iteration, a checkpoint at each boundary."""
        return TrainConfig(**{name: getattr(self, name) for name in TRAIN_FLAGS}, output=join(self.output, "run"),
                           max_steps=self.iterations * self.steps_per_iteration, lr=self.lr,
                           checkpoint_every=self.steps_per_iteration, keep_checkpoints=2,
                           log_every=max(1, self.steps_per_iteration // 4))


def evolve_settings(cfg: EvolveConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))  # tuples as lists, as saved


def check_rerun(cfg: EvolveConfig) -> bool:
    """A re-run into a folder that holds an evolution resumes it only with the settings it was started
    with (``evolve.json``: every ``EvolveConfig`` field but ``RERUN_FREE``), else one line naming the
    fields that differ, before any work; returns whether that evolution is finished (every iteration
    recorded and ``student_config.json`` written), which a re-run then says instead of redoing it."""
    from core.fs import exists, read_json
    from core.options import differing_fields

    from core.fs import check_output_folder

    check_output_folder(cfg.output, "--output", own=EVOLUTION)  # not a file, nor a dump, run or export
    fs, fpath = url_to_fs(cfg.output)
    records = read_records(cfg.output)
    if exists(join(cfg.output, SETTINGS)):
        old, new = read_json(join(cfg.output, SETTINGS)), evolve_settings(cfg)
        differ = differing_fields(old, new, ignore=RERUN_FREE)
        if differ:
            shown = ", ".join(f"--{k} {old.get(k)!r} -> {new.get(k)!r}" for k in differ[:4])
            raise UserError(f"{cfg.output!r} holds an evolution made with other settings ({shown}"
                            f"{', ...' if len(differ) > 4 else ''}): re-run with its flags to resume it, or pass a "
                            "new --output")
    elif records or fs.exists(join(fpath, "run")):
        raise UserError(f"{cfg.output!r} holds an evolution without its {SETTINGS} (another version's, or not "
                        "distill evolve's): pass a new --output")
    return len(records) >= cfg.iterations and exists(join(cfg.output, "student_config.json"))


def read_records(output: str) -> list[dict]:
    from core.fs import exists, read_bytes

    path = join(output, EVOLUTION)
    if not exists(path):
        return []
    return [json.loads(line) for line in read_bytes(path).decode("utf-8").splitlines() if line.strip()]


def write_records(output: str, records: list[dict]) -> None:
    from core.fs import atomic_write_bytes

    atomic_write_bytes(join(output, EVOLUTION), "".join(json.dumps(r) + "\n" for r in records).encode("utf-8"))


def layouts(cfg) -> dict:
    return {"down_layouts": list(cfg.down_layouts), "mid_layout": cfg.mid_layout, "up_layouts": list(cfg.up_layouts)}


def _lookup(cfg: EvolveConfig, start) -> LookupTable:
    from core.fs import exists

    path = cfg.lookup or join(cfg.output, "lookup.json")
    if exists(path):
        return LookupTable.load(path)
    if cfg.lookup:
        raise UserError(f"--lookup {cfg.lookup!r} not found")
    from students.cost.lookup import measure_table

    table = measure_table(start, LookupSettings(batch_size=cfg.lookup_batch, repeats=cfg.lookup_repeats,
                                                  statistic=cfg.lookup_statistic, allocator=cfg.lookup_allocator),
                           progress=True)
    table.save(path)
    return table


def _build_metric(cfg: EvolveConfig):
    if cfg.metric == "adherence":
        from teachers.shapes.analyser import Adherence

        return Adherence()
    from students.evaluation.metrics import ClipScore

    return ClipScore.load(cfg.clip_model, cfg.clip_weights, cfg.device)


class Scorer:
    """The metric of a checkpoint's student on the fixed validation captions and seeds."""

    def __init__(self, cfg: EvolveConfig, metric=None):
        from students.evaluation.evaluate import load_prompts

        self.cfg = cfg
        self.metric = metric if metric is not None else _build_metric(cfg)
        self.key = METRIC_KEYS.get(getattr(self.metric, "name", ""), getattr(self.metric, "name", "metric"))
        try:
            self.prompts, _ = load_prompts(cfg.val_captions, cfg.val_images)
        except (OSError, ValueError) as err:
            raise UserError(f"--val_captions: {err}") from None
        self.teacher = None

    def pipeline(self, checkpoint: str):
        from students.export import folder as export
        from students.training import runs as student_runs

        run = student_runs.read_run(checkpoint)
        if self.teacher is None:  # loaded once: its text encoder and decoder serve every checkpoint
            from teachers.load import load_teacher

            self.teacher = load_teacher(run.teacher, device=self.cfg.device)
        return export.assemble_pipeline(run, weights=self.cfg.weights if self.cfg.ema_decay > 0 else "raw",
                                        device=self.cfg.device, teacher=self.teacher)

    def measure_fn(self, pipe, info):
        def measure(skip):
            return metric_value(pipe, self.prompts, self.metric, self.key, steps=int(info["num_inference_steps"]),
                                guidance=float(info["guidance_scale"]), size=int(info["height"]), seed=self.cfg.val_seed,
                                batch_size=self.cfg.eval_batch_size, skip=skip)
        return measure


def start_config(cfg: EvolveConfig):
    """The UNet evolution starts from: ``--preset``, or the teacher's UNet cut by ``--init_from_teacher``."""
    if cfg.init_from_teacher is None:
        from students.models.unet import preset

        return preset(cfg.preset)
    from shards.loader import read_dataset
    from students.training.train import student_from_teacher

    return student_from_teacher(cfg.train_config(), read_dataset(cfg.data)[0]).student_config


def target_ms(cfg: EvolveConfig, table: LookupTable, start) -> float:
    return cfg.latency_target_ms or cfg.latency_target_ratio * table.predict_ms(start)


def evolve(cfg: EvolveConfig, *, metric=None, recipe=None, stop_after_iteration: int | None = None) -> list[dict]:
    """Run (or resume) the evolution; returns the records of ``evolution.jsonl``.

    ``metric``: a ``students.evaluation.metrics.Metric`` object instead of ``--metric``; ``recipe``: a
    ``DistillRecipe`` instead of ``--recipe`` (its robust_skip_prob is replaced by the config's);
    ``stop_after_iteration`` stops after that iteration's record as if killed there (tests)."""
    from students.training import checkpoint as ckpt
    from students.cost.lookup import measure_ms, settings_of
    from students.training.train import check_inputs, setup_distributed, train

    from core.fs import atomic_write_json, exists

    if check_rerun(cfg):  # finished: nothing to redo
        return read_records(cfg.output)
    train_cfg = cfg.train_config()
    recipe = dataclasses.replace(recipe or train_cfg.resolved_recipe(), robust_skip_prob=cfg.robust_skip_prob)
    check_inputs(train_cfg, recipe)  # the dump and the output, before any work
    rank, world = setup_distributed(train_cfg)
    scorer = Scorer(cfg, metric) if rank == 0 else None  # the validation captions, before any work
    _makedirs(cfg.output)
    if rank == 0 and not exists(join(cfg.output, SETTINGS)):
        atomic_write_json(join(cfg.output, SETTINGS), evolve_settings(cfg))
    start = start_config(cfg)
    table = _lookup(cfg, start) if rank == 0 else None
    _barrier(world)
    table = table or _lookup(cfg, start)
    target = target_ms(cfg, table, start)
    records = read_records(cfg.output)
    run = train_cfg.output
    for it in range(len(records) + 1, cfg.iterations + 1):
        boundary = it * cfg.steps_per_iteration
        student, arch = student_at(run)
        found = ckpt.checkpoints(run)
        final = is_final(arch or start, table, target, cfg.keep_cross_attention)  # from here on the architecture stays: fine-tune it
        if not found or int(found[-1].rsplit("-", 1)[1]) < boundary:
            train(train_cfg, recipe=dataclasses.replace(recipe, robust_skip_prob=cfg.final_robust_skip_prob) if final else recipe,
                  stop_after=boundary, student=student)
            student, arch = student_at(run)
        if rank == 0:
            records.append(_iteration(cfg, it, ckpt.checkpoints(run)[-1], arch, table, target, scorer,
                                      measure_ms, settings_of(table), final))
            write_records(cfg.output, records)
        _barrier(world)
        records = read_records(cfg.output)
        if stop_after_iteration is not None and it >= stop_after_iteration:
            return records
    if rank == 0:
        _finish(cfg, records, table, target)
    return records


def _makedirs(path: str) -> None:
    from core.fs import is_local, url_to_fs

    fs, fpath = url_to_fs(path)
    if is_local(fs):
        os.makedirs(fpath, exist_ok=True)


def _barrier(world: int) -> None:
    if world > 1:
        import torch

        torch.distributed.barrier()


def _iteration(cfg, it, checkpoint, arch, table, target, scorer, measure_ms, settings, final: bool) -> dict:
    """Score the checkpoint's blocks, plan and apply the evolution (not after the last segment, nor once the
    architecture is final: then only the metric); the record."""
    from core.fs import read_json

    saved = read_json(join(checkpoint, "config.json")).get("evolution")
    if saved and saved.get("iteration") == it:  # evolved before a crash, its record not yet written
        return saved
    pipe, info = scorer.pipeline(checkpoint)
    measure = scorer.measure_fn(pipe, info)
    last = it == cfg.iterations or final
    if last:
        full, scores = measure(()), {}
    else:
        full, scores = score_blocks(pipe, arch, table, measure)
    actions = [] if last else plan_actions(arch, scores, table, target, max_actions=cfg.max_actions,
                                           keep_cross_attention=cfg.keep_cross_attention)
    record = {"iteration": it, "step": int(checkpoint.rsplit("-", 1)[1]), "metric_name": scorer.key, "metric": full,
              "layouts": layouts(arch), "predicted_ms": table.predict_ms(arch), "measured_ms": measure_ms(arch, settings),
              "target_ms": target, "scores": scores,
              "robust_skip_prob": cfg.final_robust_skip_prob if final else cfg.robust_skip_prob,  # of the segment before
              "actions": [dict(dataclasses.asdict(a), value=a.value) for a in actions]}
    if actions:
        new_cfg, _ = apply_actions(arch, actions)
        record["after"] = {"layouts": layouts(new_cfg), "predicted_ms": table.predict_ms(new_cfg),
                           "measured_ms": measure_ms(new_cfg, settings)}
        evolve_checkpoint(checkpoint, join(cfg.output, "run"), actions, record)
    print(f"evolve: iteration {it} step {record['step']}: {scorer.key} {full:.4f}, predicted {record['predicted_ms']:.3f} ms "
          f"(measured {record['measured_ms']:.3f}, target {target:.3f}); actions "
          + (", ".join(f"{a.kind} {a.module}" for a in actions) or "none"), flush=True)
    return record


def _finish(cfg: EvolveConfig, records: list[dict], table: LookupTable, target: float) -> None:
    from core.fs import atomic_write_json

    from students.training import checkpoint as ckpt

    _, arch = student_at(join(cfg.output, "run"))
    atomic_write_json(join(cfg.output, "student_config.json"), arch.to_dict())
    write_report(cfg.output, records, target, ckpt.checkpoints(join(cfg.output, "run"))[-1])


def target_verdict(record: dict) -> tuple[bool, str]:
    """(met, words): whether the evolved UNet's predicted latency (the planner's measure) is at or under the
    target, said so that a miss cannot be read as a success."""
    predicted, target = record["predicted_ms"], record["target_ms"]
    if predicted <= target:
        return True, f"latency target met: {predicted:.3f} ms predicted <= target {target:.3f} ms"
    return False, (f"latency target MISSED: {predicted:.3f} ms predicted > target {target:.3f} ms "
                   f"({predicted - target:.3f} ms over; more --iterations or --max_actions, or a lower "
                   "--keep_cross_attention, let it remove more)")


def write_report(output: str, records: list[dict], target: float, checkpoint: str) -> None:
    """``report.png`` (latency against the metric along the path) and ``report.html`` (the ``core.report_html``
    template: "target met" or "target missed: X against Y" at the top, the verdict, the plot and the table)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from core import report_html as R
    from core.fs import atomic_write_bytes

    xs = [r["predicted_ms"] for r in records]
    ys = [r["metric"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(xs, ys, marker="o")
    for r in records:
        ax.annotate(str(r["iteration"]), (r["predicted_ms"], r["metric"]), textcoords="offset points", xytext=(4, 4))
    ax.axvline(target, color="grey", linestyle="--", label=f"target {target:.2f} ms")
    name = records[0]["metric_name"] if records else "metric"
    ax.set_xlabel("predicted UNet latency (ms, lookup)"), ax.set_ylabel(name), ax.legend()
    met, verdict = target_verdict(records[-1]) if records else (True, "")
    ax.set_title("latency vs metric along the evolution (label = iteration)"
                 + ("" if met else "\nlatency target MISSED"), color="black" if met else "red", fontsize=10)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(join(output, "report.png"), buf.getvalue())
    rows = [[r["iteration"], r["step"], R.num(r["metric"], ".4f"), R.num(r["predicted_ms"], ".3f"), R.num(r["measured_ms"], ".3f"),
             f"{' / '.join(r['layouts']['down_layouts'])} | {r['layouts']['mid_layout']} | "
             f"{' / '.join(r['layouts']['up_layouts'])}", ", ".join(a["kind"] + " " + a["module"] for a in r["actions"])]
            for r in records]
    headline = None
    if records:
        predicted = records[-1]["predicted_ms"]
        headline = (met, (f"target met: {predicted:.3f} ms against {target:.3f} ms" if met else
                          f"target missed: {predicted:.3f} ms against {target:.3f} ms"))
    html = R.render("Architecture evolution", [
        R.section(None, R.figure(buf.getvalue(), "predicted UNet latency against the metric along the path "
                                                 "(label = iteration; dashed: the target)", alt="latency vs metric")),
        R.section("Iterations", R.table(["iteration", "step", name, "predicted ms", "measured ms",
                                         "layouts (down | mid | up)", "actions"], rows)),
    ], lead=[verdict, f"final checkpoint: {checkpoint}; target {target:.3f} ms"], verdict=headline)
    atomic_write_bytes(join(output, "report.html"), html.encode("utf-8"))


def parse_args(argv: list[str] | None) -> EvolveConfig:
    return parse(EvolveConfig, argv, prog="distill evolve", description=__doc__.split("\n")[0])[0]


def _main(argv: list[str]) -> int:
    import torch

    cfg = parse_args(argv)
    finished = check_rerun(cfg)
    try:
        records = evolve(cfg)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if finished:
        print(f"distill evolve: {cfg.output} is finished ({len(records)} of --iterations {cfg.iterations}); nothing "
              "was run: the result below is that evolution's (pass a new --output to evolve again)", file=sys.stderr)
    if records:
        last = records[-1]
        print(f"evolve: {len(records)} iterations{' (finished earlier)' if finished else ''}; final {last['metric_name']} {last['metric']:.4f} at "
              f"{last['predicted_ms']:.3f} ms predicted ({last['measured_ms']:.3f} measured); "
              f"{join(cfg.output, 'student_config.json')}, {join(cfg.output, 'report.html')}", flush=True)
        print(f"evolve: {target_verdict(last)[1]}")  # last: a miss is the line a reader sees
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main("distill evolve", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
