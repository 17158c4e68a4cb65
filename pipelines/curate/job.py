"""Curate job (Beam): caption and image collections -> curated manifest + report.

    python -m pipelines.curate --input laion/ --input captions_train2017.json --input prompts.txt \\
        --output out/curated [--preset tiny] [--config overrides.json] [--min_words 3 ...] [Beam flags]
    distill curate ...                                   # the same, through the CLI
    beam run pipelines/curate.py ... --direct_running_mode=multi_processing

Inputs: LAION Parquet, COCO caption JSON, .txt/.jsonl prompt lists, img2dataset webdataset shards
(``pipelines.curate.sources``). Outputs in ``--output``:

- ``manifest.parquet``: every valid record with its scores, ``fate``, ``stage`` and ``reason``
  (``pipelines.curate.schema.MANIFEST_SCHEMA``); the teacher dump job reads it unchanged;
- ``rejects.parquet``: records that could not be judged, with the reason;
- ``embeddings/{text,image}-*.parquet``: CLIP embeddings (when a CLIP model is configured);
- ``images/``: webdataset shards written by img2dataset (with ``--download_images true``);
- ``report.html`` (funnel, score histograms, cluster sizes, examples) and ``summary.json``.

Stages, in order: ReadInputs, NormaliseCaptions, ApplyRules, DropExactDuplicates, DownloadImages,
LoadImages, EmbedWithClip, ScoreAesthetics, FilterScores, DropSemanticDuplicates, then the writers.
The caption stages (read to exact dedup) run on Arrow tables of ``--record_batch`` rows
(``pipelines.curate.batched``: ReadBatches, ApplyRuleColumns, DropExactDuplicateRows), and so do the
manifest and report when no image or CLIP stage follows; ``--record_batch 0`` runs every stage one
record at a time (the reference path; the outputs are the same). ``--allocator steady`` (the
default) puts the launcher and every worker in ``core.allocator``'s steady state: the
runner's copies of the tables between stages then reuse memory instead of faulting in fresh pages
(about half a stage boundary's cost); the processes keep their peak heap.
Thresholds live in ``filters.config.CurateConfig``: a preset, then ``--config`` (JSON object of
field overrides), then one flag per field (``--semdedup_eps 0.1``; ``none`` clears an optional one).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.ml.inference.base import RunInference

from core.allocator import ALLOCATORS, set_allocator
from core.errors import UserError
from core.options import add_arguments, build_parser, flags_of, from_mapping, not_one_of, option
from filters import config as config_lib
from filters.config import CurateConfig
from pipelines import common
from pipelines.curate.batched import (TABLE, DropExactDuplicateRows, ReadBatches, apply_rules, manifest_table,
                                      split_row_bound, to_records)
from pipelines.curate.download import DownloadBatch
from pipelines.curate.models import AestheticHandler, ClipEmbeddingHandler
from pipelines.curate.report import CurateStats, table_stats, write_report
from pipelines.curate.schema import MANIFEST_SCHEMA, REJECTS_SCHEMA, manifest_row
from pipelines.curate.sinks import WriteEmbeddings, WriteSortedParquet
from pipelines.curate.sources import FORMATS, Split, plan_inputs
from pipelines.curate.stages import ApplyRules, DropExactDuplicates, LoadImage, NormaliseCaption, ReadRecords
from pipelines.dedup import SemanticDedup, without_vectors
from pipelines.records import is_active
from pipelines.scoring import check_models
from pipelines.stages import ActiveOnly, FilterScores
from core.fs import check_beam_filesystem, remove_temporaries

PROG = "distill curate"


_S_IO = "input and output"
_S_THRESHOLDS = "thresholds (a preset, then --config, then one flag per field)"
_S_RUN = "execution"


@dataclass(frozen=True, kw_only=True)
class CurateJobConfig:
    """The job's own flags; every ``filters.config.CurateConfig`` field is a flag too (``--min_words 3``)."""

    input: tuple[str, ...] = option(section=_S_IO, help="file, folder or glob; repeatable", repeat=True)
    input_format: str | None = option(None, section=_S_IO, choices=FORMATS,
                                      help="the format of every --input (default: recognised from each name)")
    output: str = option(section=_S_IO, help="output folder (manifest.parquet, report.html, ...)")
    preset: str = option("default", section=_S_THRESHOLDS, choices=config_lib.PRESETS,
                         help="filters.config preset: the thresholds every field flag below starts from")
    config: str | None = option(None, section=_S_THRESHOLDS,
                                help="JSON file: an object of CurateConfig field overrides")
    record_batch: int = option(4096, section=_S_RUN,
                               help="records per Arrow batch in the caption stages (read, rules, exact dedup, "
                                    "manifest); 0 = one record per element (the per-record reference path)")
    allocator: str = option("steady", section=_S_RUN,
                            help="allocator state of the launcher and the workers: steady (glibc keeps the "
                                 "memory it frees, so the tables' copies between stages pay no page faults; "
                                 "the process keeps its peak heap) | default (core/allocator.py)", choices=ALLOCATORS)
    progress: str = option("auto", section=_S_RUN, choices=("auto", "on", "off"),
                           help="progress lines: auto (on a terminal, local runners) | on | off")

    def __post_init__(self):
        if self.record_batch < 0:
            raise UserError(f"--record_batch must be >= 0 (0 = per record), got {self.record_batch}")
        if self.allocator not in ALLOCATORS:
            raise UserError(not_one_of("--allocator", self.allocator, ALLOCATORS))


@dataclass(frozen=True, kw_only=True)
class CurateOptions:
    """The job as planned on the launcher: every input checked, thresholds resolved."""

    inputs: tuple[str, ...]  # --input values as given
    input_format: str | None  # one of FORMATS for every input, or None to recognise from names
    output: str  # output folder
    config: CurateConfig  # resolved thresholds
    splits: tuple[Split, ...]  # reading work units, planned (and checked) before the pipeline starts
    record_batch: int = 4096  # rows per Arrow batch in the caption stages; 0 = per-record stages
    allocator: str = "steady"  # core.allocator state of the launcher and of the workers
    progress: str = "off"  # --progress: records read and kept per stage on stderr (auto | on | off)


def _read_overrides(path: str) -> dict:
    if not FileSystems.exists(path):
        raise UserError(f"--config file {path!r} not found")
    with FileSystems.open(path) as f:
        try:
            overrides = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"--config {path!r} is not JSON ({err})") from err
    if not isinstance(overrides, dict):
        raise UserError(f"--config {path!r} must hold a JSON object of CurateConfig fields")
    return overrides


def parse_options(argv: list[str] | None) -> tuple[CurateOptions, list[str]]:
    """Job options and the remaining (Beam) flags; ``UserError`` naming any bad value.

    Thresholds: the preset, then ``--config``, then one flag per ``CurateConfig`` field.
    """
    with common.launcher_checks():
        parser = build_parser(CurateJobConfig, prog=PROG, description=__doc__.split("\n\n")[0], passthrough=True)
        preset = CurateJobConfig.__dataclass_fields__["preset"].default  # --help shows its values as the defaults
        add_arguments(parser, CurateConfig, defaults=False,  # unset: the preset's or --config's value
                      preset=(preset, config_lib.preset(preset)))
        args, beam_args = parser.parse_known_args(argv)
        common.check_beam_args(beam_args, flags_of(parser))
        job = from_mapping(CurateJobConfig, vars(args))
        for path in (*job.input, job.output, *([job.config] if job.config else [])):  # read and written by Beam
            check_beam_filesystem(path)
        common.check_output(job.output)
        cfg = config_lib.preset(job.preset)
        if job.config:
            cfg = config_lib.with_overrides(cfg, _read_overrides(job.config))
        flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(CurateConfig) if hasattr(args, f.name)}
        cfg = config_lib.validate(config_lib.with_overrides(cfg, flags))
        check_models(cfg)
        common.check_local_device(cfg.clip_device, beam_args, "--clip_device")
        splits = plan_inputs(list(job.input), job.input_format)
    opts = CurateOptions(inputs=job.input, input_format=job.input_format, output=job.output,
                         config=cfg, splits=tuple(splits), record_batch=job.record_batch,
                         allocator=job.allocator, progress=job.progress)
    return opts, beam_args


def _needs_download(record: dict, n: int) -> int:
    return 0 if is_active(record) and record.get("url") and record.get("image_ref") is None else 1


class DownloadImages(beam.PTransform):
    """img2dataset over the URLs of records that have no image yet -> (records, rejects)."""

    def __init__(self, output: str, cfg: CurateConfig):
        super().__init__()
        self.output, self.cfg = output, cfg

    def expand(self, records):
        todo, rest = records | "SplitNeedsDownload" >> beam.Partition(_needs_download, 2)
        done = (todo
                | "BatchUrls" >> beam.BatchElements(min_batch_size=self.cfg.download_batch_size,
                                                    max_batch_size=self.cfg.download_batch_size)
                | "RunImg2dataset" >> beam.ParDo(DownloadBatch(os.path.join(self.output, "images"), self.cfg))
                .with_outputs("rejects", main="records"))
        return (done.records, rest) | "Rejoin" >> beam.Flatten(), done.rejects


def _dedup_modality(record: dict, n: int, on: str) -> int:
    """0: image embedding, 1: text embedding, 2: not deduplicated (dropped, or no image for "image")."""
    if not is_active(record):
        return 2
    has_image = record.get("image_embedding") is not None
    if on == "text":
        return 1
    if on == "image":
        return 0 if has_image else 2
    return 0 if has_image else 1


class DropSemanticDuplicates(beam.PTransform):
    """SemDeDup of each record on its image embedding or its text embedding (``semdedup_on``).

    Every record comes out ``without_vectors`` (the job writes the embeddings before this stage), so
    the join of records and fates carries no embedding."""

    def __init__(self, cfg: CurateConfig):
        super().__init__()
        self.cfg = cfg

    def expand(self, records):
        image, text, rest = records | "SplitByModality" >> beam.Partition(_dedup_modality, 3, self.cfg.semdedup_on)
        return ((image | "DedupImages" >> SemanticDedup("image", self.cfg, keep_vectors=False),
                 text | "DedupTexts" >> SemanticDedup("text", self.cfg, keep_vectors=False),
                 rest | "StripVectors" >> beam.Map(without_vectors))
                | "Rejoin" >> beam.Flatten())


class CountStage(beam.DoFn):
    """Passes every element on unchanged, counting the records it holds (an Arrow table's rows or one
    record) and those still active into the run's progress lines (``pipelines.common.stage_counts``)."""

    def __init__(self, spec: common.ProgressSpec, stage: str):
        self.spec, self.stage = spec, stage

    def setup(self):
        self.counts = common.stage_counts(self.spec)

    def process(self, element):
        import pyarrow as pa

        from pipelines.curate.batched import active_count

        if self.counts is not None:
            if isinstance(element, pa.Table):
                self.counts.add(self.stage, element.num_rows, active_count(element))
            else:
                self.counts.add(self.stage, 1, int(is_active(element)))
        yield element


def _tag(row: dict, kind: str) -> tuple[str, dict]:
    return kind, row


class Curate(beam.PTransform):
    """The whole job, applied to the pipeline root; writes its outputs under ``opts.output``.

    With ``opts.record_batch`` > 0 the caption stages run on Arrow tables (``pipelines.curate.batched``)
    and, when no later stage needs record dicts (images, CLIP), so do the manifest and the report;
    with 0 every stage takes one record at a time. Both write the same outputs.
    """

    def __init__(self, opts: CurateOptions, progress: common.ProgressSpec | None = None):
        super().__init__()
        self.opts, self.progress = opts, progress

    def _counted(self, pcoll, stage: str, label: str | None = None):
        """``pcoll`` with its records counted as ``stage`` in the progress lines (unchanged without them)."""
        if self.progress is None:
            return pcoll
        return pcoll | (label or f"Count_{stage}") >> beam.ParDo(CountStage(self.progress, stage)).with_output_types(
            pcoll.element_type)

    def _needs_records(self) -> bool:
        cfg = self.opts.config
        return bool(cfg.download_images or cfg.clip_model or any(s.format == "wds" for s in self.opts.splits))

    def _caption_stages(self, splits):
        """Read, normalise, rules, exact dedup, one record per element -> (records, rejects)."""
        cfg = self.opts.config
        records = self._counted(splits | "ReadInputs" >> beam.ParDo(ReadRecords(self.opts.allocator)), "read")
        normalised = records | "NormaliseCaptions" >> beam.ParDo(NormaliseCaption()).with_outputs("rejects", main="records")
        records = self._counted(normalised.records | "ApplyRules" >> beam.ParDo(ApplyRules(cfg)), "caption_rules")
        if cfg.exact_dedup:
            records = self._counted(records | "DropExactDuplicates" >> ActiveOnly(DropExactDuplicates()), "exact_dedup")
        return records, normalised.rejects

    def _caption_stages_batched(self, root, splits):
        """The same on Arrow tables -> (tables, rejects)."""
        cfg = self.opts.config
        read = splits | "ReadBatches" >> beam.ParDo(ReadBatches(self.opts.record_batch, self.opts.allocator)).with_outputs(
            "rejects", main="tables")
        tables = read.tables
        tables.element_type = TABLE  # tables (ArrowTableCoder); the rejects stay row dicts
        tables = self._counted(self._counted(tables, "read")
                               | "ApplyRuleColumns" >> beam.Map(apply_rules, cfg).with_output_types(TABLE), "caption_rules")
        if cfg.exact_dedup:
            n_rows = (root  # a bound on the records, apart from the tables: bucketing runs where they are made
                      | "ListInputsToCount" >> beam.Create(list(self.opts.splits))
                      | "BoundRows" >> beam.Map(split_row_bound)
                      | "SumRows" >> beam.CombineGlobally(sum))
            tables = self._counted(tables | "DropExactDuplicateRows" >> DropExactDuplicateRows(n_rows), "exact_dedup")
        return tables, self._counted(read.rejects, "read", "Count_read_rejects")

    def _record_stages(self, records, rejects):
        """Downloads, images, CLIP, scores, SemDeDup, embeddings -> (manifest rows, cutoff)."""
        cfg, out = self.opts.config, self.opts.output
        if cfg.download_images:
            records, failed = records | "DownloadImages" >> DownloadImages(out, cfg)
            records = self._counted(records, "download_images")
            rejects.append(failed)
        if cfg.download_images or any(s.format == "wds" for s in self.opts.splits):
            loaded = records | "LoadImages" >> beam.ParDo(LoadImage(cfg)).with_outputs("rejects", main="records")
            records = self._counted(loaded.records, "load_images")
            rejects.append(loaded.rejects)
        if cfg.clip_model:
            records = records | "EmbedWithClip" >> ActiveOnly(RunInference(ClipEmbeddingHandler(
                cfg.clip_model, cfg.clip_weights, cfg.clip_device, cfg.clip_batch_size)))
            records = self._counted(records, "clip_embed")
        if cfg.aesthetic_weights:
            records = records | "ScoreAesthetics" >> ActiveOnly(RunInference(AestheticHandler(
                cfg.aesthetic_weights, cfg.clip_device)))
            records = self._counted(records, "aesthetic")
        records, cutoff = records | "FilterScores" >> FilterScores(cfg)
        records = self._counted(records, "score_filter")
        if cfg.clip_model:  # every record's embeddings, whatever its fate; then no stage needs them
            records | "WriteEmbeddings" >> WriteEmbeddings(out)
        if cfg.clip_model and cfg.semdedup_eps is not None:
            records = self._counted(records | "DropSemanticDuplicates" >> DropSemanticDuplicates(cfg), "semdedup")
        return records | "ToManifestRows" >> beam.Map(manifest_row), cutoff

    def expand(self, root):
        cfg, out = self.opts.config, self.opts.output
        splits = (root
                  | "ListInputs" >> beam.Create(list(self.opts.splits))
                  | "SpreadInputs" >> beam.Reshuffle())
        tables = None
        if self.opts.record_batch:
            tables, first_rejects = self._caption_stages_batched(root, splits)
            records = (tables | "ToRecords" >> beam.FlatMap(to_records)) if self._needs_records() else None
        else:
            records, first_rejects = self._caption_stages(splits)
        rejects = [first_rejects]
        manifest = FileSystems.join(out, "manifest.parquet")
        if records is not None:
            rows, cutoff = self._record_stages(records, rejects)
            rows | "WriteManifest" >> WriteSortedParquet(manifest, MANIFEST_SCHEMA)
            tagged = rows | "TagManifest" >> beam.Map(_tag, "manifest")
        else:  # batched all the way: no stage after exact dedup needs records, and no score applies
            cutoff = root | "NoCutoff" >> beam.Create([None])
            rows = tables | "ToManifestTables" >> beam.Map(manifest_table).with_output_types(TABLE)
            rows | "WriteManifest" >> WriteSortedParquet(manifest, MANIFEST_SCHEMA, tables=True)
            # Each table's statistics where it is made: a small accumulator goes on, not the table.
            tagged = rows | "TableStats" >> beam.Map(table_stats, cfg.report_examples)
        all_rejects = rejects | "GatherRejects" >> beam.Flatten()
        all_rejects | "WriteRejects" >> WriteSortedParquet(FileSystems.join(out, "rejects.parquet"), REJECTS_SCHEMA)
        return ((tagged, all_rejects | "TagRejects" >> beam.Map(_tag, "reject"))
                | "GatherRows" >> beam.Flatten()
                | "ComputeStats" >> beam.CombineGlobally(CurateStats(cfg.report_examples))
                | "WriteReport" >> beam.Map(write_report, out, dataclasses.asdict(cfg), beam.pvalue.AsSingleton(cutoff)))


def _clear_stale_embeddings(output: str) -> None:
    """A re-run may shard differently; old shards would otherwise mix with the new ones."""
    pattern = FileSystems.join(output, "embeddings", "*-of-*.parquet")
    stale = [m.path for m in FileSystems.match([pattern])[0].metadata_list]
    if stale:
        FileSystems.delete(stale)


def _input_counter(result) -> int | None:
    try:
        counters = result.metrics().query(MetricsFilter().with_namespace("curate").with_name("input"))["counters"]
    except (NotImplementedError, KeyError, AttributeError):  # some runners do not report metrics
        return None
    return sum((c.committed if c.committed is not None else c.attempted) or 0 for c in counters) or None


def run(argv: list[str] | None = None, test_pipeline=None) -> dict:
    """Parse, check, run, print the summary; returns ``summary.json``'s content."""
    opts, beam_args = parse_options(argv)
    allocator = set_allocator(opts.allocator)  # the launcher: DirectRunner's runner copies the elements here
    lock = common.lock_output(opts.output, PROG)  # one writer per output, before anything is removed or written
    progress = None
    try:
        _clear_stale_embeddings(opts.output)
        remove_temporaries(opts.output, recursive=True)  # what killed writers left, in the whole tree: no worker runs yet
        options = common.pipeline_options(beam_args)
        progress = common.start_stage_counts("curate", common.progress_mode(opts.progress, options))
        pipeline = test_pipeline or beam.Pipeline(options=options)
        _ = pipeline | "Curate" >> Curate(opts, progress)
        summary, result = common.run_pipeline(pipeline, opts.output, "summary.json", lock=lock, options=options)
    except BaseException:  # refused or failed before the graph ran: the next writer may go
        common.end_progress(progress)
        if lock is not None:
            lock.release()
        raise
    common.end_progress(progress)  # the counts' last line, before the summary
    if summary is None:  # --dry_run=True on Dataflow: built, not submitted
        return common.dry_run_summary(PROG, result, opts.output)
    read = _input_counter(result)
    print(f"curate: input {summary['input']} = kept {summary['kept']} + filtered {summary['filtered']} "
          f"+ duplicate {summary['duplicate']} + rejected {summary['rejected']}"
          + ("" if read is None else f" (records read: {read})"))
    for fate, by in summary["by_reason"].items():
        for reason, n in sorted(by.items()):
            print(f"  {fate:<9} {reason:<28} {n}")
    print(f"curate: manifest {FileSystems.join(opts.output, 'manifest.parquet')}, "
          f"report {FileSystems.join(opts.output, 'report.html')}; allocator {allocator}")
    if read is not None and read != summary["input"]:
        raise RuntimeError(f"records read ({read}) != kept + filtered + duplicate + rejected ({summary['input']})")
    return summary


def main(argv: list[str] | None = None) -> int:
    """``distill curate`` / ``python -m pipelines.curate``: a user error is one line on stderr and exit 2."""
    return common.job_main(PROG, run, argv)


if __name__ == "__main__":
    sys.exit(main())
