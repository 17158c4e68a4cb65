"""The teacher dump job: trajectories and feature targets from a diffusion teacher into WebDataset shards.

    beam run pipelines/teacher_dump.py --prompts prompts.txt --output out/dump --teacher tiny
    beam run pipelines/teacher_dump.py --runner=Dataflow --prompts gs://b/manifest.parquet \\
        --output gs://b/dump --teacher /models/sd15 --device cuda --dtype bfloat16 $(infra/dataflow/flags.sh)
    python -m pipelines.teacher_dump ...   |   distill dump ...

Stages: the launcher plans (``pipelines/dump_plan.py``: validate, fix the recipe, partition the
(prompt, seed) pairs into shards); the Beam graph is ``CreateShards -> Reshuffle ->
GenerateShards -> CollectIndexes -> WriteDataset``, plus ``CountInputRejects``. A work unit is a
shard number; its worker reads its rows from the plan, generates the whole shard and renames it into
place with its index, so nothing heavy passes through a shuffle and a retried shard is
byte-identical (noise seeded from the key, fixed tar headers).

``--save_images --score_images PRESET`` also scores each decoded image with the curate job's models
(``filters/image_scores.py``: CLIP image embedding, aesthetic score, CLIP score against its prompt),
loaded once per worker process like the teacher; ``pipelines/filter_shards.py`` filters on them.

Model loading: a ``DoFn`` whose ``setup()`` acquires the teacher through
``apache_beam.utils.shared.Shared``, rather than RunInference with a ``ModelHandler``. The unit of
work is a whole shard (a few hundred samples batched across prompts, written to one tar with an
index), not a stream of elements to batch; RunInference's per-element batching and result
PCollection would push the heavy arrays through the graph, which the design forbids. ``Shared``
gives the same guarantee RunInference relies on: one teacher per worker process, shared by the
DoFn instances (threads) in it.
"""

from __future__ import annotations

import json
import sys
import time

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions, SetupOptions, StandardOptions
from apache_beam.utils import shared

from pipelines import dump_plan
from pipelines.dump_plan import DumpRecipe
from teachers.fs import url_to_fs
from teachers.shards import atomic_write_json, join

NAMESPACE = "teacher_dump"


def _csv(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


class TeacherDumpOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser):
        add = parser.add_argument

        def both(name, **kw):  # --snake_case and --kebab-case spellings
            add(f"--{name}", f"--{name.replace('_', '-')}", dest=name, **kw)

        both("prompts", default=None, help="prompt list (.txt, .jsonl) or curated manifest (.parquet: id, caption[, kept])")
        both("output", default=None, help="output folder (local or gs://...)")
        both("teacher", default="stable-diffusion-v1-5/stable-diffusion-v1-5",
             help="tiny | tiny-xl | sd15-random | sdxl-random | local diffusers folder | hub id")
        both("num_inference_steps", type=int, default=50, help="teacher steps")
        both("scheduler", default="ddim", help="ddim | euler | dpm++")
        both("guidance_scale", type=float, default=7.5, help="fixed CFG weight")
        both("guidance_range", default=None, help="LO,HI: per-sample CFG weight ~ U[LO, HI] (SnapFusion: 2,14)")
        both("resolution", type=int, default=None, help="image side in px (default: the teacher's native size)")
        both("record_steps", default="all", help="'all', or comma-separated step indices to record")
        both("feature_layers", default="mid_block,up_blocks.0", help="comma-separated UNet blocks to capture ('' for none)")
        both("num_feature_steps", type=int, default=2, help="feature steps per sample (drawn from its seed)")
        both("save_images", action="store_true", help="decode and store the teacher image (png)")
        both("score_images", default=None,
             help="filters.config preset (tiny | laion-aesthetics | ...): score each decoded image with the curate "
                  "job's CLIP and aesthetic models (json, index, NNNNNN.emb.npy); needs --save_images")
        both("clip_weights", default=None, help="local open_clip checkpoint for --score_images (overrides the preset)")
        both("aesthetic_weights", default=None,
             help="LAION aesthetic predictor weights for --score_images (overrides the preset)")
        both("dtype", default="float32", help="float32 | float16 | bfloat16")
        both("device", default="cpu", help="cpu | cuda | cuda:N")
        both("batch_size", type=int, default=4, help="samples per UNet batch")
        both("storage_dtype", default="float16", help="float16 | float32 for stored arrays")
        both("seeds_per_prompt", type=int, default=1, help="generations per caption")
        both("samples_per_shard", type=int, default=256, help="samples per shard (the unit of work)")
        both("cpu_threads", type=int, default=0,
             help="torch intra-op threads on CPU workers (0 = the worker's default). CPU results depend on it "
                  "at float rounding level: pin it for byte-identical dumps across runners and machines")
        both("progress", default="auto", help="progress bar: auto (local runners) | on | off")


# ---------------------------------------------------------------------------------------------
# launcher side: validation and planning
# ---------------------------------------------------------------------------------------------


def build_recipe(opts: TeacherDumpOptions) -> DumpRecipe:
    """Validate the options (naming the bad value) and resolve them into a recipe."""
    from teachers.load import DTYPES, teacher_geometry
    from teachers.record import STORAGE_DTYPES
    from teachers.sampler import SCHEDULERS

    if not opts.prompts:
        raise ValueError("--prompts is required (a .txt/.jsonl prompt list or a .parquet manifest)")
    if not opts.output:
        raise ValueError("--output is required")
    fs, p = url_to_fs(opts.prompts)
    if not fs.exists(p):
        raise FileNotFoundError(f"--prompts {opts.prompts!r} does not exist")
    for name, value, allowed in (("dtype", opts.dtype, DTYPES), ("scheduler", opts.scheduler, tuple(SCHEDULERS)),
                                 ("storage_dtype", opts.storage_dtype, STORAGE_DTYPES)):
        if value not in allowed:
            raise ValueError(f"--{name} {value!r} is not one of {', '.join(allowed)}")
    for name in ("num_inference_steps", "batch_size", "seeds_per_prompt", "samples_per_shard"):
        if getattr(opts, name) < 1:
            raise ValueError(f"--{name} {getattr(opts, name)} must be >= 1")
    if opts.cpu_threads < 0:
        raise ValueError(f"--cpu_threads {opts.cpu_threads} must be >= 0")
    geometry = teacher_geometry(opts.teacher)
    size = opts.resolution or (geometry["resolution"] if geometry else 512)
    if geometry:
        multiple = geometry["multiple"]
        if size <= 0 or size % multiple:
            raise ValueError(f"--resolution {size} is not possible for teacher {opts.teacher!r}: "
                             f"it needs a positive multiple of {multiple}")
    layers = _csv(opts.feature_layers)
    for layer in layers:
        kind, _, num = layer.partition(".")
        ok = layer == "mid_block" or (kind in ("down_blocks", "up_blocks") and num.isdigit()
                                      and (geometry is None or int(num) < geometry["levels"]))
        if not ok:
            raise ValueError(f"--feature_layers: {layer!r} is not a block of teacher {opts.teacher!r} "
                             "(down_blocks.N, mid_block, up_blocks.N)")
    guidance_range = None
    if opts.guidance_range:
        try:
            lo, hi = (float(x) for x in opts.guidance_range.split(","))
        except ValueError:
            raise ValueError(f"--guidance_range {opts.guidance_range!r} must be LO,HI") from None
        guidance_range = (lo, hi)
    record_steps = None if opts.record_steps in ("all", "") else tuple(int(x) for x in _csv(opts.record_steps))
    scoring = _scoring(opts)
    recipe = DumpRecipe(
        teacher=opts.teacher, dtype=opts.dtype, device=opts.device, scheduler=opts.scheduler,
        num_inference_steps=opts.num_inference_steps, guidance_scale=opts.guidance_scale,
        guidance_range=guidance_range, height=size, width=size, record_steps=record_steps,
        feature_layers=layers, num_feature_steps=opts.num_feature_steps if layers else 0,
        save_images=opts.save_images, storage_dtype=opts.storage_dtype, seeds_per_prompt=opts.seeds_per_prompt,
        samples_per_shard=opts.samples_per_shard, batch_size=opts.batch_size, cpu_threads=opts.cpu_threads,
        input_sha256=dump_plan.file_sha256(opts.prompts), score_images=scoring,
    )
    sampler_config(recipe)  # SamplerConfig validates steps, ranges and feature steps
    return recipe


def _scoring(opts: TeacherDumpOptions):
    """``--score_images`` and its weight flags -> ``ImageScoring`` or None; errors name the flag."""
    if not opts.score_images:
        given = [f"--{n}" for n in ("clip_weights", "aesthetic_weights") if getattr(opts, n)]
        if given:
            raise ValueError(f"{' and '.join(given)} only apply with --score_images PRESET")
        return None
    if not opts.save_images:
        raise ValueError(f"--score_images {opts.score_images!r} scores the decoded images: it needs --save_images")
    return dump_plan.image_scoring(opts.score_images, opts.clip_weights, opts.aesthetic_weights)


def sampler_config(recipe: DumpRecipe):
    from teachers.sampler import SamplerConfig

    return SamplerConfig(
        num_inference_steps=recipe.num_inference_steps, scheduler=recipe.scheduler,
        guidance_scale=recipe.guidance_scale, guidance_range=recipe.guidance_range,
        height=recipe.height, width=recipe.width, record_steps=recipe.record_steps,
        feature_layers=recipe.feature_layers, num_feature_steps=recipe.num_feature_steps,
        save_image=recipe.save_images,
    )


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

    return _ScorerBox(load_image_scorer(recipe.score_images.curate_config(), recipe.device))


class GenerateShardFn(beam.DoFn):
    """Shard number -> the shard generated and committed (or verified and skipped) -> its summary."""

    def __init__(self, output: str, recipe: DumpRecipe, shared_handle: shared.Shared, progress: bool,
                 scorer_handle: shared.Shared | None = None):
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
                tag=f"{scoring.clip_model}|{scoring.clip_weights}|{scoring.aesthetic_weights}|{recipe.device}")
            self.scorer = self.scorer_box.scorer
        self.config = sampler_config(recipe)

    def process(self, shard: int):
        from pipelines.dump_shard import generate_shard
        from teachers.shards import read_index, verify_shard

        if not verify_shard(self.output, shard, recipe_hash=self.recipe.hash):
            self.skipped.inc()
            yield read_index(self.output, shard)
            return
        index = generate_shard(self.box.teacher, self.config, self.recipe, self.output, shard, progress=self.progress,
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
    atomic_write_json(join(output, "dataset.json"), dataset)
    return dataset


# ---------------------------------------------------------------------------------------------
# entry points
# ---------------------------------------------------------------------------------------------


def _is_local_runner(options: PipelineOptions) -> bool:
    runner = str(options.view_as(StandardOptions).runner or "DirectRunner")
    return "Direct" in runner or runner.lower() == "direct"


def run(argv: list[str] | None = None, test_pipeline=None) -> dict:
    """Plan on the launcher, run the Beam job, write ``dataset.json``; returns the dataset summary."""
    options = PipelineOptions(argv)
    opts = options.view_as(TeacherDumpOptions)
    options.view_as(SetupOptions).save_main_session = False
    recipe = build_recipe(opts)
    fs, out = url_to_fs(opts.output)
    fs.makedirs(out, exist_ok=True)
    dump_plan.check_or_write_recipe(opts.output, recipe)
    rows, not_kept = dump_plan.read_input(opts.prompts)
    planned_rows, prompt_rejects = dump_plan.plan(rows, recipe)
    num_shards = dump_plan.write_plan(opts.output, planned_rows)
    reasons = dump_plan.write_rejects(opts.output, "input", prompt_rejects)
    planned = dict(prompts_in=len(rows) + not_kept, not_kept=not_kept, prompts_rejected=len(prompt_rejects),
                   samples_planned=len(planned_rows), prompt_rejects=reasons)
    progress = opts.progress == "on" or (opts.progress == "auto" and _is_local_runner(options))
    start = time.monotonic()
    pipeline = test_pipeline or beam.Pipeline(options=options)
    input_rejects = (pipeline
                     | "CreateInputRejects" >> beam.Create(prompt_rejects or [])
                     | "CountInputRejects" >> beam.ParDo(CountInputRejectsFn())
                     | "TotalInputRejects" >> beam.combiners.Count.Globally())
    # One connected graph ending in WriteDataset: Beam's Dask runner computes only the last
    # transform's bag, so a side branch would silently not run there.
    _ = (
        pipeline
        | "CreateShards" >> beam.Create(list(range(num_shards)))
        | "Reshuffle" >> beam.Reshuffle()  # spread shard numbers over workers (only ints cross it)
        | "GenerateShards" >> beam.ParDo(GenerateShardFn(opts.output, recipe, shared.Shared(), progress,
                                                         shared.Shared()))
        | "CollectIndexes" >> beam.combiners.ToList()
        | "WriteDataset" >> beam.Map(write_dataset, opts.output, recipe, planned,
                                     beam.pvalue.AsSingleton(input_rejects))
    )
    result = pipeline.run()
    result.wait_until_finish()
    with fs.open(join(out, "dataset.json"), "rb") as f:
        dataset = json.loads(f.read())
    _print_summary(dataset, opts.output, time.monotonic() - start)
    return dataset


def _print_summary(dataset: dict, output: str, seconds: float) -> None:
    t = dataset["totals"]
    per_sample = t["bytes"] / t["samples_written"] if t["samples_written"] else 0
    print(f"teacher dump: {t['prompts_in']} prompts in = {t['prompts_in'] - t['prompts_rejected'] - t['prompts_not_kept_by_manifest']}"
          f" planned + {t['prompts_rejected']} rejected + {t['prompts_not_kept_by_manifest']} not kept by the manifest; "
          f"{t['samples_planned']} samples planned = {t['samples_written']} written + {t['samples_rejected']} rejected; "
          f"{t['captions_truncated']} captions truncated to 77 tokens", file=sys.stderr)
    print(f"teacher dump: {len(dataset['shards'])} shards, {per_sample / 2**20:.2f} MiB/sample, "
          f"{t['samples_written'] / max(seconds, 1e-9):.2f} samples/s over {seconds:.1f} s "
          f"(rejects by reason: {dataset['rejects_by_reason']}) -> {output}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """``distill dump`` / ``python -m pipelines.teacher_dump``: errors in arguments exit 2 with one line."""
    from teachers.load import TeacherError

    try:
        run(argv)
    except (ValueError, FileNotFoundError, TeacherError) as err:
        print(f"teacher dump: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
