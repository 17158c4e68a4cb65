"""The teacher dump job: trajectories and feature targets from a diffusion teacher into WebDataset shards.

    beam run pipelines/teacher_dump.py --prompts prompts.txt --output out/dump --teacher tiny
    beam run pipelines/teacher_dump.py --runner=Dataflow --prompts gs://b/manifest.parquet \\
        --output gs://b/dump --teacher /models/sd15 --device cuda --dtype bfloat16 [Dataflow flags]
    python -m pipelines.teacher_dump ...   |   python -m pipelines.dump ...   |   distill dump ...

Flags: ``DumpConfig`` (one field per flag); the rest go to Beam. Stages: the launcher validates
and plans (``pipelines/dump/plan.py``: fix the recipe, read the input, partition the (caption,
seed) pairs into shards); the Beam graph is ``CreateShards -> Reshuffle -> GenerateShards ->
CollectIndexes -> WriteDataset``, plus ``CountInputRejects``. A work unit is a shard number; its
worker reads its rows from the plan, generates the whole shard and renames it into place with its
index (``pipelines/dump/shard.py``), so nothing heavy passes through a shuffle and a retried shard
is byte-identical (noise seeded from the key, fixed tar headers).

``--save_images --score_images PRESET`` also scores each decoded image with the curate job's models
(``filters/image_scores.py``: CLIP image embedding, aesthetic score, CLIP score against its caption),
loaded once per worker process like the teacher; the filter job (``pipelines/filter``) filters on them.

Model loading: a ``DoFn`` whose ``setup()`` acquires the teacher through
``apache_beam.utils.shared.Shared``, rather than RunInference with a ``ModelHandler``. The unit of
work is a whole shard (a few hundred samples batched across captions, written to one tar with an
index), not a stream of elements to batch; RunInference's per-element batching and result
PCollection would push the heavy arrays through the graph, which the design forbids. ``Shared``
gives the same guarantee RunInference relies on: one teacher per worker process, shared by the
DoFn instances (threads) in it.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.utils import shared

from core.errors import UserError
from core.options import not_one_of, option, parse
from pipelines import common
from pipelines.dump import plan as dump_plan
from pipelines.dump.plan import DumpRecipe
from shards.recipe import SAMPLER_FIELDS, SamplerConfig
from pipelines.scoring import image_scoring
from core.fs import remove_temporaries, url_to_fs
from teachers.load import DTYPES, teacher_lineage
from shards.record import STORAGE_DTYPES
from shards.schema import write_dataset_info

NAMESPACE = "teacher_dump"
PROG = "distill dump"


_S_IO = "input and output"
_S_TEACHER = "teacher and sampling"
_S_RECORD = "what is recorded"
_S_SCORES = "image scores (--score_images)"
_S_COMPUTE = "compute"
# The sampler flags' defaults are SamplerConfig's (declared once, there); ``--record_steps all`` is its None
# and ``--resolution`` (none: the teacher's native size) its height and width.
_SAMPLER = {f.name: f.default for f in dataclasses.fields(SamplerConfig)}


@dataclasses.dataclass(frozen=True, kw_only=True)
class DumpConfig:
    """The dump's flags. Fields with the same name as ``DumpRecipe``'s or its ``SamplerConfig``'s go into the
    recipe unchanged (``build_recipe``); the sampler's take their defaults from ``SamplerConfig``."""

    prompts: str = option(section=_S_IO,
                          help="prompt list (.txt, .jsonl) or curated manifest (.parquet: key, caption[, fate])")
    output: str = option(section=_S_IO, help="output folder (local or gs://...)")
    teacher: str = option("stable-diffusion-v1-5/stable-diffusion-v1-5", section=_S_TEACHER,
                          help="tiny | tiny-xl | shapes | shapes-sd15 | shapes-sd3 | sd15-random | sdxl-random | tiny-sd3 | "
                               "sd3-random | local diffusers folder | hub id")
    num_inference_steps: int = option(_SAMPLER["num_inference_steps"], section=_S_TEACHER, help="teacher steps")
    scheduler: str | None = option(_SAMPLER["scheduler"], section=_S_TEACHER,
                                   help="ddim | euler | dpm++ (UNet teachers) | flow-euler (flow-matching SD3 "
                                        "teachers: their only one) (default: ddim, flow-euler for a flow teacher)")
    guidance_scale: float = option(_SAMPLER["guidance_scale"], section=_S_TEACHER,
                                   help="fixed classifier-free guidance weight")
    guidance_range: tuple[float, ...] | None = option(
        _SAMPLER["guidance_range"], section=_S_TEACHER, metavar="LO,HI",
        help="per-sample guidance weight ~ U[LO, HI] instead of --guidance_scale (SnapFusion: 2,14)")
    resolution: int | None = option(_SAMPLER["height"], section=_S_TEACHER,
                                    help="image side in px (default: the teacher's native size)")
    seeds_per_prompt: int = option(1, section=_S_TEACHER, help="generations per caption")
    record_steps: str = option("all", section=_S_RECORD, help="'all', or comma-separated step indices to record")
    feature_layers: tuple[str, ...] | None = option(
        _SAMPLER["feature_layers"], section=_S_RECORD, metavar="BLOCK,...",
        help="comma-separated blocks to capture ('' for none) (default: mid_block,up_blocks.0 of a UNet, a flow "
             "teacher's middle and last transformer_blocks.N)")
    num_feature_steps: int = option(_SAMPLER["num_feature_steps"], section=_S_RECORD,
                                    help="feature steps per sample (drawn from its seed)")
    save_images: bool = option(_SAMPLER["save_images"], section=_S_RECORD,
                               help="decode and store the teacher image (png)")
    real_images: bool = option(
        _SAMPLER["real_images"], section=_S_RECORD,
        help="also store each caption's real image encoded by the teacher's VAE (image_latents.npy): the input's "
             "'image' column (path or URL), or the shapes teacher's rendered truth; the adversarial trainer's "
             "--adv_real image reads them")
    storage_dtype: str = option("float16", section=_S_RECORD, help="dtype of the stored arrays", choices=STORAGE_DTYPES)
    score_images: str | None = option(
        None, section=_S_SCORES,
        help="filters.config preset (tiny | laion-aesthetics | ...): score each decoded image with the curate job's "
             "CLIP and aesthetic models (json, index, NNNNNN.emb.npy); needs --save_images")
    clip_weights: str | None = option(None, section=_S_SCORES,
                                      help="local open_clip checkpoint for --score_images (overrides the preset)")
    aesthetic_weights: str | None = option(
        None, section=_S_SCORES, help="LAION aesthetic predictor weights for --score_images (overrides the preset)")
    dtype: str = option("float32", section=_S_COMPUTE, help="the teacher's weights and activations", choices=DTYPES)
    device: str = option("cpu", section=_S_COMPUTE, help="cpu | cuda | cuda:N")
    batch_size: int = option(4, section=_S_COMPUTE, help="samples per UNet batch")
    cpu_threads: int = option(
        0, section=_S_COMPUTE,
        help="torch intra-op threads on CPU workers (0 = the worker's default). CPU results depend on it at float "
             "rounding level: pin it for byte-identical dumps across runners and machines")
    samples_per_shard: int = option(256, section=_S_IO, help="samples per shard (the unit of work)")
    progress: str = option("auto", section=_S_IO, help="progress bar: auto shows it on local runners",
                           choices=("auto", "on", "off"))


# ---------------------------------------------------------------------------------------------
# launcher side: validation and planning
# ---------------------------------------------------------------------------------------------


MAX_TEACHER_STEPS = 1000  # num_train_timesteps of every supported scheduler: more steps repeat timesteps


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def check_teacher(spec: str) -> dict | None:
    """The teacher's geometry (``teachers.load.teacher_geometry``), resolved before anything is written.

    ``teachers.load.resolve_teacher`` finds the teacher without loading weights: a hub id must be in
    the local hub cache or on a reachable hub (offline and uncached, it is refused here, not on a
    worker, and the output folder stays untouched). ``TeacherError`` (one line) otherwise.
    """
    from teachers.load import resolve_teacher, teacher_geometry

    resolved = resolve_teacher(spec)
    try:
        return teacher_geometry(resolved)
    except ValueError:  # a hub snapshot without unet/vae configs: shapes unknown until a worker loads it
        return None


UNET_FEATURE_LAYERS = ("mid_block", "up_blocks.0")  # the default of a UNet teacher's dump


def _feature_layers(cfg: DumpConfig, geometry: dict | None) -> tuple[str, ...]:
    from teachers.sampler import flow_feature_layers

    flow = bool(geometry and geometry.get("is_flow"))
    if cfg.feature_layers is None:
        return flow_feature_layers(geometry["blocks"]) if flow else UNET_FEATURE_LAYERS
    for layer in cfg.feature_layers:
        kind, _, num = layer.partition(".")
        if flow:
            ok = kind == "transformer_blocks" and num.isdigit() and int(num) < geometry["blocks"]
            blocks = f"transformer_blocks.N, N < {geometry['blocks']}"
        else:
            ok = layer == "mid_block" or (kind in ("down_blocks", "up_blocks") and num.isdigit()
                                          and (geometry is None or int(num) < geometry["levels"]))
            blocks = "down_blocks.N, mid_block, up_blocks.N"
        _require(ok, f"--feature_layers: {layer!r} is not a block of teacher {cfg.teacher!r} ({blocks})")
    return cfg.feature_layers


def _scheduler(cfg: DumpConfig, geometry: dict | None) -> str:
    """The sampler's scheduler: the flag, else the teacher family's own (ddim; flow-euler for SD3)."""
    from teachers.sampler import FLOW_SCHEDULERS, SCHEDULERS

    flow = bool(geometry and geometry.get("is_flow"))
    name = cfg.scheduler or (FLOW_SCHEDULERS[0] if flow else "ddim")
    _require(name in SCHEDULERS, not_one_of("--scheduler", name, SCHEDULERS))
    if geometry is not None:
        allowed = FLOW_SCHEDULERS if flow else tuple(n for n in SCHEDULERS if n not in FLOW_SCHEDULERS)
        _require(name in allowed, f"--scheduler {name!r} does not sample teacher {cfg.teacher!r} "
                                  f"({'a flow-matching' if flow else 'an epsilon/v'} teacher): use {' or '.join(allowed)}")
    return name


def _record_steps(text: str) -> tuple[int, ...] | None:
    if text in ("all", ""):
        return None
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UserError(f"--record_steps {text!r} must be 'all' or comma-separated step indices") from None


def _scoring(cfg: DumpConfig):
    """``--score_images`` and its weight flags -> ``ImageScoring`` or None; errors name the flag."""
    if not cfg.score_images:
        given = [f"--{n}" for n in ("clip_weights", "aesthetic_weights") if getattr(cfg, n)]
        _require(not given, f"{' and '.join(given)} only apply with --score_images PRESET")
        return None
    _require(cfg.save_images, f"--score_images {cfg.score_images!r} scores the decoded images: it needs --save_images")
    return image_scoring(cfg.score_images, cfg.clip_weights, cfg.aesthetic_weights)


def _check_real_images(cfg: DumpConfig, found) -> None:
    """``--real_images`` needs an image per row or a teacher that renders its captions' truth."""
    from teachers.real_image import RENDERS_TRUTH

    _require(not cfg.real_images or cfg.teacher in RENDERS_TRUTH or any(r.image for r in found.rows),
             f"--real_images: {cfg.prompts!r} has no 'image' column and teacher {cfg.teacher!r} renders no ground "
             f"truth (built-in: {', '.join(RENDERS_TRUTH)}); give each row an image path or URL")


def build_recipe(cfg: DumpConfig) -> DumpRecipe:
    """Validate the flags (naming the bad value) and resolve them into a recipe; writes nothing."""
    from teachers.sampler import SCHEDULERS

    common.check_input_file(cfg.prompts, "--prompts")
    common.check_output(cfg.output)
    _require(cfg.scheduler is None or cfg.scheduler in SCHEDULERS, not_one_of("--scheduler", cfg.scheduler, SCHEDULERS))
    for name, allowed in (("dtype", DTYPES), ("storage_dtype", STORAGE_DTYPES)):  # argparse checks them; a config too
        _require(getattr(cfg, name) in allowed, not_one_of(f"--{name}", getattr(cfg, name), allowed))
    for name in ("num_inference_steps", "batch_size", "seeds_per_prompt", "samples_per_shard"):
        _require(getattr(cfg, name) >= 1, f"--{name} {getattr(cfg, name)} must be >= 1")
    _require(cfg.cpu_threads >= 0, f"--cpu_threads {cfg.cpu_threads} must be >= 0")
    _require(cfg.num_feature_steps >= 0, f"--num_feature_steps {cfg.num_feature_steps} must be >= 0")
    _require(cfg.num_inference_steps <= MAX_TEACHER_STEPS,
             f"--num_inference_steps {cfg.num_inference_steps} is more than the {MAX_TEACHER_STEPS} training timesteps "
             "of a diffusion scheduler: one step per timestep at most")
    _require(math.isfinite(cfg.guidance_scale), f"--guidance_scale {cfg.guidance_scale} must be a finite number")
    _require(cfg.guidance_range is None or len(cfg.guidance_range) == 2,
             f"--guidance_range {cfg.guidance_range} must be LO,HI")
    _require(cfg.guidance_range is None or all(math.isfinite(g) for g in cfg.guidance_range),
             f"--guidance_range {','.join(map(str, cfg.guidance_range or ()))} must be two finite numbers LO,HI")
    geometry = check_teacher(cfg.teacher)
    size = cfg.resolution or (geometry["resolution"] if geometry else 512)
    if geometry:
        _require(size > 0 and size % geometry["multiple"] == 0,
                 f"--resolution {size} is not possible for teacher {cfg.teacher!r}: "
                 f"it needs a positive multiple of {geometry['multiple']}")
        limit = geometry.get("max_resolution")
        _require(limit is None or size <= limit, f"--resolution {size} is not possible for teacher {cfg.teacher!r}: "
                                                 f"its transformer's position table covers sides up to {limit}")
    layers = _feature_layers(cfg, geometry)
    scheduler = _scheduler(cfg, geometry)
    same = {f.name: getattr(cfg, f.name) for cls in (DumpRecipe, SamplerConfig) for f in dataclasses.fields(cls)
            if hasattr(cfg, f.name)}
    sha, scoring = common.file_sha256(cfg.prompts), _scoring(cfg)
    sampler = SamplerConfig(**{  # validates steps, ranges and feature steps (UserError)
        **{k: v for k, v in same.items() if k in SAMPLER_FIELDS}, "scheduler": scheduler,
        "guidance_range": cfg.guidance_range, "height": size, "width": size, "record_steps": _record_steps(cfg.record_steps),
        "feature_layers": layers, "num_feature_steps": cfg.num_feature_steps if layers else 0,
    })
    return DumpRecipe(**{
        **{k: v for k, v in same.items() if k not in SAMPLER_FIELDS}, "sampler": sampler, "input_sha256": sha,
        "score_images": None if scoring is None else dataclasses.asdict(scoring),
    })


# ---------------------------------------------------------------------------------------------
# worker side
# ---------------------------------------------------------------------------------------------


class _TeacherBox:
    """Weak-referenceable holder for ``Shared`` (it caches objects by weak reference)."""

    def __init__(self, teacher):
        self.teacher = teacher


class _ScorerBox:
    """The same for the image scorer (CLIP + aesthetic MLP)."""

    def __init__(self, scorer):
        self.scorer = scorer


def _load_scorer(recipe: DumpRecipe) -> _ScorerBox:
    from filters.image_scores import load_image_scorer

    from pipelines.scoring import ImageScoring

    return _ScorerBox(load_image_scorer(ImageScoring(**recipe.score_images).curate_config(), recipe.device))


class GenerateShardFn(beam.DoFn):
    """Shard number -> the shard generated and committed (or verified and skipped) -> its summary."""

    def __init__(self, output: str, recipe: DumpRecipe, shared_handle: shared.Shared,
                 progress: common.ProgressSpec | None, scorer_handle: shared.Shared | None = None):
        self.output, self.recipe, self.shared_handle, self.progress = output, recipe, shared_handle, progress
        self.scorer_handle = scorer_handle
        self.samples = Metrics.counter(NAMESPACE, "samples_written")
        self.shards = Metrics.counter(NAMESPACE, "shards_written")
        self.skipped = Metrics.counter(NAMESPACE, "shards_skipped")
        self.rejected = Metrics.counter(NAMESPACE, "samples_rejected")
        self.truncated = Metrics.counter(NAMESPACE, "captions_truncated")
        self.bytes = Metrics.counter(NAMESPACE, "bytes_written")

    def setup(self):
        import torch

        from teachers.load import load_teacher

        recipe = self.recipe
        if recipe.cpu_threads and not recipe.device.startswith("cuda"):
            torch.set_num_threads(recipe.cpu_threads)  # Dask workers default to 1 (OMP_NUM_THREADS=1)
        self.box = self.shared_handle.acquire(
            lambda: _TeacherBox(load_teacher(recipe.teacher, dtype=recipe.dtype, device=recipe.device)),
            tag=f"{recipe.teacher}|{recipe.dtype}|{recipe.device}")
        self.scorer = None
        if recipe.score_images is not None:  # the curate job's CLIP + aesthetic MLP, once per process
            scoring = recipe.score_images
            self.scorer_box = self.scorer_handle.acquire(  # held: Shared keeps it only while referenced
                lambda: _load_scorer(recipe),
                tag=f"{scoring['clip_model']}|{scoring['clip_weights']}|{scoring['aesthetic_weights']}|{recipe.device}")
            self.scorer = self.scorer_box.scorer
        self.config = recipe.sampler

    def process(self, shard: int):
        from pipelines.dump.shard import generate_shard
        from shards.reader import read_index
        from shards.verify import verify_shard

        progress = common.shard_progress(self.progress)  # the run's shards i/N (this process's)
        if not verify_shard(self.output, shard, recipe_hash=self.recipe.hash):
            self.skipped.inc()
            common.skip_shard(progress, shard)
            yield read_index(self.output, shard)
            return
        index = generate_shard(self.box.teacher, self.config, self.recipe, self.output, shard, progress=progress,
                               scorer=self.scorer)
        self.shards.inc()
        self.samples.inc(index["count"])
        self.rejected.inc(sum(index["rejects"].values()))
        self.truncated.inc(index["truncated_captions"])
        self.bytes.inc(index["bytes"])
        yield index


class CountInputRejectsFn(beam.DoFn):
    """Counts the launcher's input rejects into Beam metrics (total and per reason); passes them on."""

    def __init__(self):
        self.rejected = Metrics.counter(NAMESPACE, "prompts_rejected")

    def process(self, reject: dict):
        self.rejected.inc()
        Metrics.counter(NAMESPACE, f"prompts_rejected_{reject['reason']}").inc()
        yield reject


def write_dataset(indexes: list[dict], output: str, recipe: DumpRecipe, planned: dict, input_rejects: int) -> dict:
    """The last step: ``dataset.json`` with recipe, totals, shard list and what is stored once."""
    if input_rejects != planned["prompts_rejected"]:  # the Beam-counted rejects must match the plan's
        raise RuntimeError(f"counted {input_rejects} input rejects, the plan has {planned['prompts_rejected']}")
    indexes = sorted(indexes, key=lambda x: x["shard"])
    rejects: dict[str, int] = dict(planned["prompt_rejects"])
    for ix in indexes:
        for reason, n in ix.get("rejects", {}).items():
            rejects[reason] = rejects.get(reason, 0) + n
    first = indexes[0] if indexes else {}
    dataset = {
        "schema_version": recipe.schema_version, "recipe": recipe.to_json(), "recipe_hash": recipe.hash,
        "shards": [{k: ix[k] for k in ("shard", "count", "bytes", "sha256")} for ix in indexes],
        "totals": {
            "prompts_in": planned["prompts_in"], "prompts_not_kept_by_manifest": planned["not_kept"],
            "prompts_rejected": planned["prompts_rejected"], "samples_planned": planned["samples_planned"],
            "samples_written": sum(ix["count"] for ix in indexes),
            "samples_rejected": sum(sum(ix.get("rejects", {}).values()) for ix in indexes),
            "captions_truncated": sum(ix.get("truncated_captions", 0) for ix in indexes),
            "fp32_fallbacks": sum(ix.get("fp32_fallbacks", 0) for ix in indexes),
            "bytes": sum(ix["bytes"] for ix in indexes),
        },
        "rejects_by_reason": rejects,
        "shared": first.get("shared", {}),
        "timesteps": first.get("timesteps"), "recorded_steps": first.get("recorded_steps"),
        "scheduler_class": first.get("scheduler_class"), "scheduler_config": first.get("scheduler_config"),
        "prediction_type": first.get("prediction_type"),
    }
    lineage = teacher_lineage(recipe.teacher)  # a distilled student as the teacher: which folder, which steps
    if lineage is not None:
        dataset["teacher_lineage"] = lineage
    return write_dataset_info(output, dataset).to_dict()  # validated by shards.schema.DatasetInfo


# ---------------------------------------------------------------------------------------------
# entry points
# ---------------------------------------------------------------------------------------------


def prepare(argv: list[str] | None):
    """The launcher's part: flags, recipe and input, all checked before anything is written.

    Returns (config, recipe, input rows, Beam flags); ``UserError`` naming the problem.
    """
    with common.launcher_checks():
        cfg, beam_args = parse(DumpConfig, argv, prog=PROG, description=__doc__.split("\n")[0], known_only=True, check_unknown=common.check_beam_args)
        recipe = build_recipe(cfg)
        common.check_local_device(cfg.device, beam_args)
        found = dump_plan.read_input(cfg.prompts)
        _check_real_images(cfg, found)
    return cfg, recipe, found, beam_args


def run(argv: list[str] | None = None, test_pipeline=None) -> dict:
    """Plan on the launcher, run the Beam job, write ``dataset.json``; returns the dataset summary.

    ``--runner=DataflowRunner --dry_run=True``: the launcher plans into ``--output`` as for a launch and
    builds the Dataflow job without submitting it; returns ``{"dry_run": True, "job": <Beam's Dataflow
    Job: .proto_pipeline, the graph; .options>, "shards_planned": N}``."""
    cfg, recipe, found, beam_args = prepare(argv)
    options = common.pipeline_options(beam_args)
    fs, out = url_to_fs(cfg.output)
    fs.makedirs(out, exist_ok=True)
    lock = common.lock_output(cfg.output, PROG)  # one writer per output, before anything is removed or written
    progress = None
    try:
        remove_temporaries(cfg.output, recursive=True)  # what killed writers left, in the whole tree: no worker runs yet
        common.check_or_write_recipe(cfg.output, recipe)
        planned_rows, input_rejects = dump_plan.plan(found.rows, recipe)
        num_shards = dump_plan.write_plan(cfg.output, planned_rows)
        counts = common.write_rejects(cfg.output, "input", input_rejects)
        planned = dict(prompts_in=len(found.rows) + found.not_kept, not_kept=found.not_kept,
                       prompts_rejected=len(input_rejects), samples_planned=len(planned_rows), prompt_rejects=counts)
        progress = common.start_shard_progress("teacher dump", common.progress_mode(cfg.progress, options), cfg.output)
        start = time.monotonic()
        pipeline = test_pipeline or beam.Pipeline(options=options)
        n_rejects = (pipeline
                     | "CreateInputRejects" >> beam.Create(input_rejects or [])
                     | "CountInputRejects" >> beam.ParDo(CountInputRejectsFn())
                     | "TotalInputRejects" >> beam.combiners.Count.Globally())
        # One connected graph ending in WriteDataset: Beam's Dask runner computes only the last
        # transform's bag, so a side branch would silently not run there.
        _ = (
            pipeline
            | "CreateShards" >> beam.Create(list(range(num_shards)))
            | "Reshuffle" >> beam.Reshuffle()  # spread shard numbers over workers (only ints cross it)
            | "GenerateShards" >> beam.ParDo(GenerateShardFn(cfg.output, recipe, shared.Shared(), progress,
                                                             shared.Shared()))
            | "CollectIndexes" >> beam.combiners.ToList()
            | "WriteDataset" >> beam.Map(write_dataset, cfg.output, recipe, planned, beam.pvalue.AsSingleton(n_rejects))
        )
        dataset, result = common.run_pipeline(pipeline, cfg.output, lock=lock, options=options)
    except BaseException:  # refused or failed before the graph ran: the next writer may go
        common.end_progress(progress)
        if lock is not None:
            lock.release()
        raise
    common.end_progress(progress)
    if dataset is None:  # --dry_run=True on Dataflow: planned and built, not submitted
        return {**common.dry_run_summary(PROG, result, cfg.output), "shards_planned": num_shards}
    print_summary(dataset, cfg.output, time.monotonic() - start)
    return dataset


def print_summary(dataset: dict, output: str, seconds: float) -> None:
    t = dataset["totals"]
    per_sample = t["bytes"] / t["samples_written"] if t["samples_written"] else 0
    print(f"teacher dump: {t['prompts_in']} prompts in = {t['prompts_in'] - t['prompts_rejected'] - t['prompts_not_kept_by_manifest']}"
          f" planned + {t['prompts_rejected']} rejected + {t['prompts_not_kept_by_manifest']} not kept by the manifest; "
          f"{t['samples_planned']} samples planned = {t['samples_written']} written + {t['samples_rejected']} rejected; "
          f"{t['captions_truncated']} captions truncated to the teacher's CLIP length (77 tokens; shapes-sd3: 16)",
          file=sys.stderr)
    print(f"teacher dump: {len(dataset['shards'])} shards, {per_sample / 2**20:.2f} MiB/sample, "
          f"{t['samples_written'] / max(seconds, 1e-9):.2f} samples/s over {seconds:.1f} s "
          f"(rejects: {common.count_words(dataset['rejects_by_reason'])}) -> {output}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """``distill dump`` / ``python -m pipelines.dump``: a user error is one line on stderr and exit 2."""
    return common.job_main(PROG, run, argv)


if __name__ == "__main__":
    sys.exit(main())
