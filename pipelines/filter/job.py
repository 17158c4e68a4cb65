"""The filter job: thresholds and semantic dedup over a scored dump, then the final training shards.

    beam run pipelines/filter_shards.py --input out/dump --output out/final \\
        --aesthetic_threshold 5.5 --clip_score_threshold 0.2 --semdedup_eps 0.05
    python -m pipelines.filter_shards ...   |   python -m pipelines.filter ...   |   distill filter ...

The input is a dump made with ``--save_images --score_images PRESET`` (or a dataset this job wrote:
filters chain). Graph: ``ListInputShards -> ReadScores -> FilterScores -> DropSemanticDuplicates ->
ToFates -> GatherFates -> PlanOutputShards -> ListOutputShards -> CopyShards -> CollectIndexes ->
WriteDataset``. The first half touches only light data: each input shard's index (keys, byte
ranges, scores) and its ``NNNNNN.emb.npy`` embeddings, through the stages the curate job also runs
(``pipelines.stages.FilterScores``: aesthetic and CLIP-score thresholds or top fraction;
``pipelines.dedup.SemanticDedupShards``: faiss k-means, then duplicates per cluster, one kept per
group: highest aesthetic, then smallest key), so duplicates are found across the whole dump. An
element is an input shard's records (``FilterScores`` applies the thresholds to a shard at a
time), and no record carries its embedding: SemDeDup gets one block per input shard naming the
sidecar rows the thresholds kept, reads them itself, and only the fates (key, cluster,
duplicate_of, similarity) join the records, by shard. ``PlanOutputShards`` gathers the fates (about 200
bytes per key) in one worker, assigns kept keys to balanced output shards in the parent's order
and writes ``_plan/plan.parquet`` (``pipelines/filter/plan.py``). A copy work unit is an output shard number: it reads its rows
from the plan and its members from the parent's shards by key, so heavy arrays never pass a shuffle.

Outputs: ``NNNNNN.tar`` + index + ``.emb.npy`` (the dump's format: the trainer reads it unchanged),
``manifest.parquet`` (every input key once with fate and reason: input = kept + filtered + duplicate
+ rejected, the dump's own rejects included), ``report.html``, and ``dataset.json`` with the parent's
recipe, schedule and shared arrays, and ``lineage`` (this filter's recipe and the parent dataset).
Re-running skips complete shards; the same input and flags give byte-identical shards.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

import apache_beam as beam
from apache_beam.metrics import Metrics

from core.errors import UserError
from core.options import option, parse
from pipelines import common
from pipelines.dedup import SemanticDedup, SemanticDedupShards
from pipelines.filter import plan as filter_plan
from pipelines.filter.plan import FilterRecipe
from pipelines.records import EMBEDDING_FIELDS
from pipelines.scoring import ImageScoring
from pipelines.stages import ActiveOnly, FilterScores, apply_score_rules, clip_scores
from core.fs import atomic_write_bytes, join, remove_temporaries, url_to_fs
from shards.schema import DatasetInfo, write_dataset_info
from shards.schema import embeds_name, index_name
from shards.reader import list_indexes, read_index

NAMESPACE = "filter_shards"
PROG = "distill filter"


_S_IO = "input and output"
_S_THRESHOLDS = "score thresholds"
_S_DEDUP = "semantic dedup (SemDeDup)"


@dataclasses.dataclass(frozen=True, kw_only=True)
class FilterConfig:
    """The filter job's flags; the thresholds and dedup knobs go into ``FilterRecipe`` by name."""

    input: str = option(section=_S_IO, help="a scored dump (--save_images --score_images) or a filtered dataset")
    output: str = option(section=_S_IO, help="output folder for the final shards (local or gs://...)")
    aesthetic_threshold: float | None = option(None, section=_S_THRESHOLDS, help="keep aesthetic score >= this")
    clip_score_threshold: float | None = option(None, section=_S_THRESHOLDS,
                                                help="keep the cosine of the generated image and its caption >= this")
    clip_score_top_fraction: float | None = option(
        None, section=_S_THRESHOLDS, help="keep this top fraction by CLIP score (instead of --clip_score_threshold)")
    semdedup_eps: float | None = option(
        0.05, section=_S_DEDUP, help="duplicates: cosine of image embeddings >= 1 - eps (0: identical only); none = no dedup")
    kmeans_clusters: int | None = option(None, section=_S_DEDUP, help="SemDeDup k (default: the scoring preset's rule)")
    target_cluster_size: int | None = option(None, section=_S_DEDUP, help="samples per k-means cluster aimed at")
    kmeans_sample_size: int | None = option(None, section=_S_DEDUP, help="embeddings sampled to train k-means")
    samples_per_shard: int = option(0, section=_S_IO, help="output shard size (0: the dump's)")
    report_examples: int = option(6, section=_S_IO, help="images per reason in report.html")
    progress: str = option("auto", section=_S_IO,
                           help="progress bar: auto (local runners) | on | off", choices=("auto", "on", "off"))


# ---------------------------------------------------------------------------------------------
# launcher side: validation
# ---------------------------------------------------------------------------------------------


def _same_folder(a: str, b: str) -> bool:
    if "://" in a or "://" in b:
        return a.rstrip("/") == b.rstrip("/")
    return os.path.abspath(a) == os.path.abspath(b)


def _check_indexes(data_dir: str, shards: list[int]) -> None:
    """Every listed shard's index parses and is of a supported schema, read on the launcher (small
    files, a few at a time): a bad one is one line here, not a worker's traceback after an ERROR log."""
    from concurrent.futures import ThreadPoolExecutor

    def problem(shard: int) -> str | None:
        try:
            read_index(data_dir, shard)
        except ValueError as err:  # UserError included: not JSON, a bad field, an unsupported schema_version
            return " ".join(str(err).split())
        return None

    with ThreadPoolExecutor(max_workers=min(16, max(1, len(shards)))) as pool:
        bad = [(s, p) for s, p in zip(shards, pool.map(problem, shards)) if p]
    if bad:
        shard, why = bad[0]
        more = f" (and {len(bad) - 1} more shard(s))" if len(bad) > 1 else ""
        raise UserError(f"--input {data_dir!r}: the index {index_name(shard)} is unreadable: {why}{more}; check the "
                        "dump with distill inspect --verify")


def build_recipe(cfg: FilterConfig):
    """Validate the flags against the parent (naming the bad value).

    Returns (filter recipe, the curate config its stages run with, parent entry of the lineage, the
    parent's dataset.json as ``DatasetInfo``); reads only the parent's dataset.json and its folder listing.
    """
    common.check_output(cfg.output)
    if _same_folder(cfg.input, cfg.output):
        raise UserError(f"--output {cfg.output!r} is the --input folder: write the filtered dataset elsewhere")
    dataset, sha = filter_plan.read_parent(cfg.input)
    scoring = filter_plan.scoring_of(dataset, cfg.input)
    if cfg.aesthetic_threshold is not None and not scoring.get("aesthetic_weights"):
        raise UserError(f"--aesthetic_threshold {cfg.aesthetic_threshold}: the dump in {cfg.input!r} has no "
                        f"aesthetic scores (it was made with --score_images {scoring['preset']!r} and no "
                        "--aesthetic_weights)")
    if cfg.samples_per_shard < 0 or cfg.report_examples < 0:
        raise UserError("--samples_per_shard and --report_examples must be >= 0")
    shards = sorted(filter_plan.input_shards(dataset))
    missing = sorted(set(shards) - set(list_indexes(cfg.input)))
    if missing:
        raise UserError(f"--input {cfg.input!r} lacks the index of shard(s) "
                        f"{[index_name(i) for i in missing][:5]}: check it with distill inspect --verify")
    _check_indexes(cfg.input, shards)
    preset = ImageScoring(**scoring).curate_config()
    knobs = ("kmeans_clusters", "target_cluster_size", "kmeans_sample_size")  # unset: the scoring preset's
    given = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(FilterRecipe) if hasattr(cfg, f.name)}
    given = {k: v for k, v in given.items() if not (k in knobs and v is None)}
    from_preset = {k: getattr(preset, k) for k in (*knobs, "kmeans_iterations", "kmeans_seed")}
    recipe = FilterRecipe(**{
        **from_preset, **given, "parent_recipe_hash": dataset.recipe_hash, "parent_dataset_sha256": sha,
        "samples_per_shard": cfg.samples_per_shard or dataset.dump_recipe.samples_per_shard,
    })
    curate_config = recipe.curate_config(scoring)  # validates thresholds and dedup knobs, naming the field
    parent = {"path": cfg.input, "recipe_hash": dataset.recipe_hash, "dataset_sha256": sha,
              "lineage": dataset.lineage}
    return recipe, curate_config, parent, dataset


# ---------------------------------------------------------------------------------------------
# worker side
# ---------------------------------------------------------------------------------------------


class ReadScoresFn(beam.DoFn):
    """Input shard number -> one record per sample: key, scores, byte range, and (``embeddings``)
    its CLIP image embedding. The sidecar is read and checked either way (a bad one rejects the
    shard's samples at stage ``scores``); without ``embeddings`` the vectors stay in it."""

    def __init__(self, parent: str, embeddings: bool = True, per_shard: bool = False):
        self.parent, self.embeddings, self.per_shard = parent, embeddings, per_shard
        self.shards = Metrics.counter(NAMESPACE, "input_shards_read")
        self.samples = Metrics.counter(NAMESPACE, "samples_read")
        self.rejected = Metrics.counter(NAMESPACE, "samples_rejected_unscored")

    def process(self, shard: int):
        records = filter_plan.without_tar(self.parent, shard, filter_plan.score_records(self.parent, shard))
        if not self.embeddings:
            records = [{k: v for k, v in r.items() if k != EMBEDDING_FIELDS["image"]} for r in records]
        self.shards.inc()
        self.samples.inc(len(records))
        self.rejected.inc(sum(r["stage"] is not None for r in records))
        if self.per_shard:
            yield shard, records
        else:
            yield from records


def _shard_clip_scores(shard_records):
    for record in shard_records[1]:
        yield from clip_scores(record)


def _apply_score_rules_to_shard(shard_records, cfg, cutoff):
    """``FilterScores``'s rules on (shard, records): the same rules and the same top-fraction cutoff
    (one element per score to ``ApproximateQuantiles``, as for records), every record of a shard in one step."""
    shard, records = shard_records
    return shard, [apply_score_rules(r, cfg, cutoff) for r in records]


def fate_rows_of_shard(shard_records) -> list[dict]:
    return [filter_plan.fate_row(r) for r in shard_records[1]]


def concat(lists: list[list]) -> list:
    return [x for part in lists for x in part]


def plan_output(fates: list[dict], parent: str, output: str, samples_per_shard: int) -> int:
    """All fates (+ the dump's own rejects) -> ``_plan/plan.parquet``; returns the output shard count."""
    rows = fates + filter_plan.dump_rejects(parent)
    num_shards = filter_plan.layout(rows, samples_per_shard)
    filter_plan.write_plan(output, rows, num_shards)
    Metrics.counter(NAMESPACE, "samples_planned").inc(sum(r["fate"] == filter_plan.KEPT for r in rows))
    return num_shards


def shard_numbers(num_shards: int):
    yield from range(num_shards)


class CopyShardFn(beam.DoFn):
    """Output shard number -> the shard copied from the parent and committed (or verified and skipped)."""

    def __init__(self, parent: str, output: str, recipe_hash: str, progress: common.ProgressSpec | None):
        self.parent, self.output, self.recipe_hash, self.progress = parent, output, recipe_hash, progress
        self.shards = Metrics.counter(NAMESPACE, "shards_written")
        self.skipped = Metrics.counter(NAMESPACE, "shards_skipped")
        self.samples = Metrics.counter(NAMESPACE, "samples_written")
        self.bytes = Metrics.counter(NAMESPACE, "bytes_written")
        self.rejected = Metrics.counter(NAMESPACE, "samples_rejected_copy")

    def process(self, shard: int):
        from pipelines.filter.shard import copy_shard
        from shards.reader import read_index
        from shards.verify import verify_shard

        progress = common.shard_progress(self.progress)  # the run's shards i/N (this process's); N from the plan
        if not verify_shard(self.output, shard, recipe_hash=self.recipe_hash):
            self.skipped.inc()
            common.skip_shard(progress, shard)
            yield read_index(self.output, shard)
            return
        index = copy_shard(self.parent, self.output, shard, self.recipe_hash, progress=progress)
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


def _check_accounting(rows: list[dict], parent_dataset: DatasetInfo, written: int, kept: int) -> None:
    """Every sample of the parent has one fate, and every kept one was written: a runner that loses or
    repeats records (Beam's Dask runner drops ``finish_bundle`` output) fails here, not silently."""
    in_shards = sum(s["count"] for s in parent_dataset.shards)
    judged = [r["key"] for r in rows if r["stage"] not in filter_plan.DUMP_STAGES]
    if len(judged) != in_shards or len(set(judged)) != len(judged):
        raise RuntimeError(f"the parent's shards hold {in_shards} samples but {len(judged)} were judged "
                           f"({len(judged) - len(set(judged))} keys repeated): records were lost or repeated")
    if written != kept:  # every kept key is in exactly one output shard
        raise RuntimeError(f"{written} samples written, the manifest keeps {kept}")


def write_dataset(indexes: list[dict], parent: dict, parent_dataset: DatasetInfo, output: str, recipe: FilterRecipe,
                  cutoff: float | None, report_examples: int) -> dict:
    """The last step: manifest, shared arrays, report, then ``dataset.json`` (written last: it marks completion)."""
    from pipelines.filter.report import write_report

    rows = common.read_plan(output)
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
    _copy_shared(parent["path"], output, parent_dataset.shared)
    lineage = {"filter_recipe": recipe.to_json(), "filter_recipe_hash": recipe.hash, "parent": parent}
    thresholds = {"aesthetic_score": recipe.aesthetic_threshold,
                  "clip_score": recipe.clip_score_threshold if recipe.clip_score_threshold is not None else cutoff}
    write_report(output, parent["path"], rows, counts, thresholds, {"lineage": lineage, "clip_score_cutoff": cutoff},
                 report_examples)
    keep = ("schema_version", "recipe", "recipe_hash", "shared", "timesteps", "recorded_steps", "scheduler_class",
            "scheduler_config", "prediction_type")
    dataset = {k: getattr(parent_dataset, k) for k in keep}  # the parent's fields as read (None: absent)
    dataset.update(
        shards=[{k: ix[k] for k in ("shard", "count", "bytes", "sha256")} for ix in indexes],
        totals={**counts, "samples_written": written, "bytes": sum(ix["bytes"] for ix in indexes),
                "clip_score_cutoff": cutoff},
        lineage=lineage,
    )
    return write_dataset_info(output, dataset).to_dict()  # validated by shards.schema.DatasetInfo


# ---------------------------------------------------------------------------------------------
# entry points
# ---------------------------------------------------------------------------------------------


def prepare(argv: list[str] | None):
    """(config, recipe, curate config, parent, parent dataset, Beam flags), all checked; writes nothing."""
    with common.launcher_checks():
        cfg, beam_args = parse(FilterConfig, argv, prog=PROG, description=__doc__.split("\n")[0], known_only=True, check_unknown=common.check_beam_args)
        return (cfg, *build_recipe(cfg), beam_args)


DEDUP_PATHS = ("sidecars", "records")


def run(argv: list[str] | None = None, test_pipeline=None, *, dedup: str = "sidecars") -> dict:
    """Validate on the launcher, run the Beam job, return the output's ``dataset.json``.

    ``dedup``: how the first half runs. "sidecars" (the default): one element per input shard (its
    records, without embeddings) through the thresholds (``FilterScores`` per shard) and SemDeDup
    (``pipelines.dedup.SemanticDedupShards``: one ``EmbeddingRows`` block per shard, the rows of its
    ``.emb.npy`` the thresholds kept; only the fates join the records, by shard). "records": one
    element per record, each carrying its embedding through ``FilterScores`` and ``SemanticDedup``
    (the earlier path, kept to check that both give the same outputs)."""
    if dedup not in DEDUP_PATHS:
        raise ValueError(f"dedup={dedup!r}: one of {DEDUP_PATHS}")
    cfg, recipe, curate_config, parent, parent_dataset, beam_args = prepare(argv)
    options = common.pipeline_options(beam_args)
    fs, out = url_to_fs(cfg.output)
    fs.makedirs(out, exist_ok=True)
    lock = common.lock_output(cfg.output, PROG)  # one writer per output, before anything is removed or written
    progress = None
    try:
        remove_temporaries(cfg.output, recursive=True)  # what killed writers left, in the whole tree: no worker runs yet
        common.check_or_write_recipe(cfg.output, recipe)
        # N is known once PlanOutputShards wrote the plan; its last row group holds the keys not kept
        progress = common.start_shard_progress("filter", common.progress_mode(cfg.progress, options), cfg.output,
                                               plan_tail=1, planned=False)
        input_shards = sorted(filter_plan.input_shards(parent_dataset))
        start = time.monotonic()
        pipeline = test_pipeline or beam.Pipeline(options=options)
        shards = (pipeline
                  | "ListInputShards" >> beam.Create(input_shards)
                  | "SpreadInputShards" >> beam.Reshuffle())  # only shard numbers cross it
        sidecars = {s: join(cfg.input, embeds_name(s)) for s in input_shards}  # vectors and k-means sample, from storage
        dedup_on = curate_config.semdedup_eps is not None
        if dedup == "sidecars":
            shards = shards | "ReadScores" >> beam.ParDo(ReadScoresFn(cfg.input, embeddings=False, per_shard=True))
            shards, cutoff = shards | "FilterScores" >> FilterScores(curate_config, scores_of=_shard_clip_scores,
                                                                     apply=_apply_score_rules_to_shard)
            if dedup_on:
                shards = shards | "DropSemanticDuplicates" >> SemanticDedupShards("image", curate_config, sidecars)
            fates = (shards
                     | "ToFates" >> beam.Map(fate_rows_of_shard)  # ~200 bytes per key from here on
                     | "GatherFates" >> beam.combiners.ToList()
                     | "ConcatFates" >> beam.Map(concat))
        else:
            records = shards | "ReadScores" >> beam.ParDo(ReadScoresFn(cfg.input))
            records, cutoff = records | "FilterScores" >> FilterScores(curate_config)
            if dedup_on:
                records = records | "DropSemanticDuplicates" >> ActiveOnly(
                    SemanticDedup("image", curate_config, sidecars=tuple(sidecars.values())))
            fates = (records
                     | "ToFates" >> beam.Map(filter_plan.fate_row)  # embeddings stay behind: ~200 bytes per key
                     | "GatherFates" >> beam.combiners.ToList())
        # One connected graph ending in WriteDataset (Beam's Dask runner computes only the last bag).
        _ = (fates
             | "PlanOutputShards" >> beam.Map(plan_output, cfg.input, cfg.output, recipe.samples_per_shard)
             | "ListOutputShards" >> beam.FlatMap(shard_numbers)
             | "SpreadOutputShards" >> beam.Reshuffle()
             | "CopyShards" >> beam.ParDo(CopyShardFn(cfg.input, cfg.output, recipe.hash, progress))
             | "CollectIndexes" >> beam.combiners.ToList()
             | "WriteDataset" >> beam.Map(write_dataset, parent, parent_dataset, cfg.output, recipe,
                                          beam.pvalue.AsSingleton(cutoff), cfg.report_examples))
        dataset, result = common.run_pipeline(pipeline, cfg.output, lock=lock, options=options)
    except BaseException:  # refused or failed before the graph ran: the next writer may go
        common.end_progress(progress)
        if lock is not None:
            lock.release()
        raise
    common.end_progress(progress)
    if dataset is None:  # --dry_run=True on Dataflow: built, not submitted
        return common.dry_run_summary(PROG, result, cfg.output)
    print_summary(dataset, cfg.output, time.monotonic() - start)
    return dataset


def print_summary(dataset: dict, output: str, seconds: float) -> None:
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
    """``distill filter`` / ``python -m pipelines.filter``: a user error is one line on stderr and exit 2."""
    return common.job_main(PROG, run, argv)


if __name__ == "__main__":
    sys.exit(main())
