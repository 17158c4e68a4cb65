"""The filter job: thresholds and semantic dedup over a scored dump, then the final training shards.

    beam run pipelines/filter_shards.py --input out/dump --output out/final \\
        --aesthetic_threshold 5.5 --clip_score_threshold 0.2 --semdedup_eps 0.05
    python -m pipelines.filter_shards ...   |   distill filter ...

The input is a dump made with ``--save_images --score_images PRESET`` (or a dataset this job wrote:
filters chain). Graph: ``ListInputShards -> ReadScores -> FilterScores -> DropSemanticDuplicates ->
ToFates -> GatherFates -> PlanOutputShards -> ListOutputShards -> CopyShards -> CollectIndexes ->
WriteDataset``. The first half touches only light data: each input shard's index (keys, byte
ranges, scores) and its ``NNNNNN.emb.npy`` embeddings, through the curate job's own stages
(``FilterScores``: aesthetic and CLIP-score thresholds or top fraction; ``SemanticDedup``: faiss
k-means, then duplicates per cluster, one kept per group: highest aesthetic, then smallest key),
so duplicates are found across the whole dump. ``PlanOutputShards`` gathers the fates (about 200
bytes per key) in one worker, assigns kept keys to balanced output shards in the parent's order
and writes ``_plan/plan.parquet``. A copy work unit is an output shard number: it reads its rows
from the plan and its members from the parent's shards by key, so heavy arrays never pass a shuffle.

Outputs: ``NNNNNN.tar`` + index + ``.emb.npy`` (the dump's format: the trainer reads it unchanged),
``manifest.parquet`` (every input key once with fate and reason: input = kept + filtered + duplicate
+ rejected, the dump's own rejects included), ``report.html``, and ``dataset.json`` with the parent's
recipe, schedule and shared arrays, and ``lineage`` (this filter's recipe and the parent dataset).
Re-running skips complete shards; the same input and flags give byte-identical shards.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions, SetupOptions

from pipelines import dump_plan, filter_plan
from pipelines.curate_dedup import SemanticDedup
from pipelines.curate_stages import ActiveOnly, FilterScores
from pipelines.filter_plan import FilterRecipe
from pipelines.teacher_dump import _is_local_runner
from teachers.fs import url_to_fs
from teachers.shards import atomic_write_bytes, atomic_write_json, index_name, join, list_indexes

NAMESPACE = "filter_shards"


def _optional_float(text: str) -> float | None:
    return None if text.strip().lower() in ("none", "null", "") else float(text)


def build_parser() -> argparse.ArgumentParser:
    """The job's flags. Plain argparse, not a ``PipelineOptions`` subclass: Beam parses every such
    subclass of the process together, and ``--input``/``--output`` would clash with other jobs'."""
    parser = argparse.ArgumentParser(prog="distill filter", description=__doc__.split("\n\n")[0], exit_on_error=False)

    def both(name, **kw):  # --snake_case and --kebab-case spellings
        parser.add_argument(f"--{name}", *([f"--{name.replace('_', '-')}"] if "_" in name else []), dest=name, **kw)

    both("input", default=None, help="a scored dump (--save_images --score_images) or a filtered dataset")
    both("output", default=None, help="output folder for the final shards (local or gs://...)")
    both("aesthetic_threshold", type=_optional_float, default=None, help="keep aesthetic score >= this")
    both("clip_score_threshold", type=_optional_float, default=None,
         help="keep the cosine of the generated image and its prompt >= this")
    both("clip_score_top_fraction", type=_optional_float, default=None,
         help="keep this top fraction by CLIP score (instead of --clip_score_threshold)")
    both("semdedup_eps", type=_optional_float, default=0.05,
         help="duplicates: cosine of image embeddings >= 1 - eps (0: identical only); none = no dedup")
    both("kmeans_clusters", type=int, default=None, help="SemDeDup k (default: the scoring preset's rule)")
    both("target_cluster_size", type=int, default=None, help="samples per k-means cluster aimed at")
    both("kmeans_sample_size", type=int, default=None, help="embeddings sampled to train k-means")
    both("samples_per_shard", type=int, default=0, help="output shard size (0: the dump's)")
    both("report_examples", type=int, default=6, help="images per reason in report.html")
    both("progress", default="auto", help="progress bar: auto (local runners) | on | off")
    return parser


def parse_args(argv: list[str] | None):
    """(job flags, Beam flags); ``ValueError`` naming a flag argparse cannot read."""
    try:
        return build_parser().parse_known_args(argv)
    except argparse.ArgumentError as err:
        raise ValueError(str(err)) from err


# ---------------------------------------------------------------------------------------------
# launcher side: validation
# ---------------------------------------------------------------------------------------------


def _same_folder(a: str, b: str) -> bool:
    if "://" in a or "://" in b:
        return a.rstrip("/") == b.rstrip("/")
    return os.path.abspath(a) == os.path.abspath(b)


def build_recipe(opts: argparse.Namespace):
    """Validate the options against the parent (naming the bad value).

    Returns (filter recipe, the curate config its stages run with, parent entry of the lineage, the
    parent's dataset.json); reads only the parent's dataset.json and its folder listing.
    """
    if not opts.input:
        raise ValueError("--input is required (a dump made with --save_images --score_images PRESET)")
    if not opts.output:
        raise ValueError("--output is required")
    if _same_folder(opts.input, opts.output):
        raise ValueError(f"--output {opts.output!r} is the --input folder: write the filtered dataset elsewhere")
    dataset, sha = filter_plan.read_parent(opts.input)
    scoring = filter_plan.scoring_of(dataset, opts.input)
    if opts.aesthetic_threshold is not None and not scoring.get("aesthetic_weights"):
        raise ValueError(f"--aesthetic_threshold {opts.aesthetic_threshold}: the dump in {opts.input!r} has no "
                         f"aesthetic scores (it was made with --score_images {scoring['preset']!r} and no "
                         "--aesthetic_weights)")
    if opts.samples_per_shard < 0 or opts.report_examples < 0:
        raise ValueError("--samples_per_shard and --report_examples must be >= 0")
    missing = sorted({int(s["shard"][:-4]) for s in dataset["shards"]} - set(list_indexes(opts.input)))
    if missing:
        raise ValueError(f"--input {opts.input!r} lacks the index of shard(s) "
                         f"{[index_name(i) for i in missing][:5]}: check it with distill inspect --verify")
    preset = dump_plan.ImageScoring(**scoring).curate_config()
    knobs = {k: getattr(opts, k) if getattr(opts, k) is not None else getattr(preset, k)
             for k in ("kmeans_clusters", "target_cluster_size", "kmeans_sample_size")}
    recipe = FilterRecipe(
        parent_recipe_hash=dataset["recipe_hash"], parent_dataset_sha256=sha,
        aesthetic_threshold=opts.aesthetic_threshold, clip_score_threshold=opts.clip_score_threshold,
        clip_score_top_fraction=opts.clip_score_top_fraction, semdedup_eps=opts.semdedup_eps,
        kmeans_iterations=preset.kmeans_iterations, kmeans_seed=preset.kmeans_seed, **knobs,
        samples_per_shard=opts.samples_per_shard or dataset["recipe"]["samples_per_shard"],
    )
    cfg = recipe.curate_config(scoring)  # validates thresholds and dedup knobs, naming the field
    parent = {"path": opts.input, "recipe_hash": dataset["recipe_hash"], "dataset_sha256": sha,
              "lineage": dataset.get("lineage")}
    return recipe, cfg, parent, dataset


# ---------------------------------------------------------------------------------------------
# worker side
# ---------------------------------------------------------------------------------------------


class ReadScoresFn(beam.DoFn):
    """Input shard number -> one record per sample: key, scores, byte range, CLIP image embedding."""

    def __init__(self, parent: str):
        self.parent = parent
        self.shards = Metrics.counter(NAMESPACE, "input_shards_read")
        self.samples = Metrics.counter(NAMESPACE, "samples_read")
        self.rejected = Metrics.counter(NAMESPACE, "samples_rejected_unscored")

    def process(self, shard: int):
        records = filter_plan.score_records(self.parent, shard)
        self.shards.inc()
        self.samples.inc(len(records))
        self.rejected.inc(sum(r["drop_stage"] is not None for r in records))
        yield from records


def plan_output(fates: list[dict], parent: str, output: str, samples_per_shard: int) -> int:
    """All fates (+ the dump's own rejects) -> ``_plan/plan.parquet``; returns the output shard count."""
    rows = fates + filter_plan.dump_rejects(parent)
    num_shards = filter_plan.layout(rows, samples_per_shard)
    filter_plan.write_plan(output, rows, num_shards)
    Metrics.counter(NAMESPACE, "samples_planned").inc(sum(r["fate"] == filter_plan.KEPT for r in rows))
    return num_shards


def _shard_numbers(num_shards: int):
    yield from range(num_shards)


class CopyShardFn(beam.DoFn):
    """Output shard number -> the shard copied from the parent and committed (or verified and skipped)."""

    def __init__(self, parent: str, output: str, recipe_hash: str, progress: bool):
        self.parent, self.output, self.recipe_hash, self.progress = parent, output, recipe_hash, progress
        self.shards = Metrics.counter(NAMESPACE, "shards_written")
        self.skipped = Metrics.counter(NAMESPACE, "shards_skipped")
        self.samples = Metrics.counter(NAMESPACE, "samples_written")
        self.bytes = Metrics.counter(NAMESPACE, "bytes_written")
        self.rejected = Metrics.counter(NAMESPACE, "samples_rejected_copy")

    def process(self, shard: int):
        from pipelines.filter_copy import copy_shard
        from teachers.shards import read_index, verify_shard

        if not verify_shard(self.output, shard, recipe_hash=self.recipe_hash):
            self.skipped.inc()
            yield read_index(self.output, shard)
            return
        index = copy_shard(self.parent, self.output, shard, self.recipe_hash, progress=self.progress)
        self.shards.inc()
        self.samples.inc(index["count"])
        self.bytes.inc(index["bytes"])
        self.rejected.inc(len(index["copy_rejects"]))
        yield index


def _copy_shared(parent: str, output: str, shared: dict) -> None:
    """The arrays stored once per dataset (unconditional embeddings), copied byte for byte."""
    for name in shared.values():
        fs, path = url_to_fs(join(parent, name))
        with fs.open(path, "rb") as f:
            atomic_write_bytes(join(output, name), f.read())


def _check_accounting(rows: list[dict], parent_dataset: dict, written: int, kept: int) -> None:
    """Every sample of the parent has one fate, and every kept one was written: a runner that loses or
    repeats records (Beam's Dask runner drops ``finish_bundle`` output) fails here, not silently."""
    in_shards = sum(s["count"] for s in parent_dataset["shards"])
    judged = [r["key"] for r in rows if r["stage"] not in ("dump", "dump_input")]
    if len(judged) != in_shards or len(set(judged)) != len(judged):
        raise RuntimeError(f"the parent's shards hold {in_shards} samples but {len(judged)} were judged "
                           f"({len(judged) - len(set(judged))} keys repeated): records were lost or repeated")
    if written != kept:  # every kept key is in exactly one output shard
        raise RuntimeError(f"{written} samples written, the manifest keeps {kept}")


def write_dataset(indexes: list[dict], parent: dict, parent_dataset: dict, output: str, recipe: FilterRecipe,
                  cutoff: float | None, report_examples: int) -> dict:
    """The last step: manifest, shared arrays, report, then ``dataset.json`` (written last: it marks completion)."""
    from pipelines.filter_report import write_report

    rows = filter_plan.read_plan(output)
    copy_rejects = {r["key"]: r for ix in indexes for r in ix.get("copy_rejects", [])}
    for row in rows:
        if row["key"] in copy_rejects and row["fate"] == filter_plan.KEPT:
            row.update(fate=filter_plan.REJECTED, stage="copy", reason=copy_rejects[row["key"]]["reason"],
                       detail=copy_rejects[row["key"]]["detail"], output_shard=None)
    counts = filter_plan.count_fates(rows)
    indexes = sorted(indexes, key=lambda x: x["shard"])
    written = sum(ix["count"] for ix in indexes)
    _check_accounting(rows, parent_dataset, written, counts["kept"])
    filter_plan.write_manifest(output, rows)
    _copy_shared(parent["path"], output, parent_dataset.get("shared", {}))
    lineage = {"filter_recipe": recipe.to_json(), "filter_recipe_hash": recipe.hash, "parent": parent}
    thresholds = {"aesthetic_score": recipe.aesthetic_threshold,
                  "clip_score": recipe.clip_score_threshold if recipe.clip_score_threshold is not None else cutoff}
    write_report(output, parent["path"], rows, counts, thresholds, {"lineage": lineage, "clip_score_cutoff": cutoff},
                 report_examples)
    keep = ("schema_version", "recipe", "recipe_hash", "shared", "timesteps", "recorded_steps", "scheduler_class",
            "scheduler_config", "prediction_type")
    dataset = {k: parent_dataset.get(k) for k in keep}
    dataset.update(
        shards=[{k: ix[k] for k in ("shard", "count", "bytes", "sha256")} for ix in indexes],
        totals={**counts, "samples_written": written, "bytes": sum(ix["bytes"] for ix in indexes),
                "clip_score_cutoff": cutoff},
        lineage=lineage,
    )
    atomic_write_json(join(output, "dataset.json"), dataset)
    return dataset


# ---------------------------------------------------------------------------------------------
# entry points
# ---------------------------------------------------------------------------------------------


def run(argv: list[str] | None = None, test_pipeline=None) -> dict:
    """Validate on the launcher, run the Beam job, return the output's ``dataset.json``."""
    opts, beam_args = parse_args(argv)
    recipe, cfg, parent, parent_dataset = build_recipe(opts)
    options = PipelineOptions(beam_args)
    options.view_as(SetupOptions).save_main_session = False
    fs, out = url_to_fs(opts.output)
    fs.makedirs(out, exist_ok=True)
    dump_plan.check_or_write_recipe(opts.output, recipe)
    progress = opts.progress == "on" or (opts.progress == "auto" and _is_local_runner(options))
    input_shards = sorted(int(s["shard"][:-4]) for s in parent_dataset["shards"])
    start = time.monotonic()
    pipeline = test_pipeline or beam.Pipeline(options=options)
    records = (pipeline
               | "ListInputShards" >> beam.Create(input_shards)
               | "SpreadInputShards" >> beam.Reshuffle()  # only shard numbers cross it
               | "ReadScores" >> beam.ParDo(ReadScoresFn(opts.input)))
    records, cutoff = records | "FilterScores" >> FilterScores(cfg)
    if cfg.semdedup_eps is not None:
        records = records | "DropSemanticDuplicates" >> ActiveOnly(SemanticDedup("image", cfg))
    # One connected graph ending in WriteDataset (Beam's Dask runner computes only the last bag).
    _ = (records
         | "ToFates" >> beam.Map(filter_plan.fate_row)  # embeddings stay behind: ~200 bytes per key from here on
         | "GatherFates" >> beam.combiners.ToList()
         | "PlanOutputShards" >> beam.Map(plan_output, opts.input, opts.output, recipe.samples_per_shard)
         | "ListOutputShards" >> beam.FlatMap(_shard_numbers)
         | "SpreadOutputShards" >> beam.Reshuffle()
         | "CopyShards" >> beam.ParDo(CopyShardFn(opts.input, opts.output, recipe.hash, progress))
         | "CollectIndexes" >> beam.combiners.ToList()
         | "WriteDataset" >> beam.Map(write_dataset, parent, parent_dataset, opts.output, recipe,
                                      beam.pvalue.AsSingleton(cutoff), opts.report_examples))
    result = pipeline.run()
    result.wait_until_finish()
    with fs.open(join(out, "dataset.json"), "rb") as f:
        dataset = json.loads(f.read())
    _print_summary(dataset, opts.output, time.monotonic() - start)
    return dataset


def _print_summary(dataset: dict, output: str, seconds: float) -> None:
    t = dataset["totals"]
    print(f"filter: input {t['input']} = kept {t['kept']} + filtered {t['filtered']} + duplicate {t['duplicate']} "
          f"+ rejected {t['rejected']}", file=sys.stderr)
    for fate, by in t["by_reason"].items():
        for reason, n in sorted(by.items()):
            print(f"  {fate:<9} {reason:<28} {n}", file=sys.stderr)
    print(f"filter: {len(dataset['shards'])} shards, {t['bytes'] / 2**20:.1f} MiB in {seconds:.1f} s "
          f"({t['bytes'] / 2**20 / max(seconds, 1e-9):.1f} MiB/s) -> {output} (manifest.parquet, report.html)",
          file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """``distill filter`` / ``python -m pipelines.filter_shards``: errors in arguments exit 2 with one line."""
    try:
        run(argv)
    except (ValueError, FileNotFoundError) as err:
        print(f"filter: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
