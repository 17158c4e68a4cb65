"""Curate job (Beam): caption and image collections -> curated manifest + report.

    python -m pipelines.curate --input laion/ --input captions_train2017.json --input prompts.txt \\
        --output out/curated [--preset tiny] [--config overrides.json] [--min_words 3 ...] [Beam flags]
    distill curate ...                                   # the same, through the CLI
    beam run pipelines/curate.py ... --direct_running_mode=multi_processing

Inputs: LAION Parquet, COCO caption JSON, .txt/.jsonl prompt lists, img2dataset webdataset shards
(``pipelines.curate.sources``). Outputs in ``--output``:

- ``manifest.parquet``: every valid record with its scores, ``kept`` and ``drop_reason``
  (``pipelines.curate.schema.MANIFEST_SCHEMA``); the teacher dump job reads it unchanged;
- ``rejects.parquet``: records that could not be judged, with the reason;
- ``embeddings/{text,image}-*.parquet``: CLIP embeddings (when a CLIP model is configured);
- ``images/``: webdataset shards written by img2dataset (with ``--download_images true``);
- ``report.html`` (funnel, score histograms, cluster sizes, examples) and ``summary.json``.

Stages, in order: ReadInputs, NormaliseCaptions, ApplyRules, DropExactDuplicates, DownloadImages,
LoadImages, EmbedWithClip, ScoreAesthetics, FilterScores, DropSemanticDuplicates, then the writers.
Thresholds live in ``filters.config.CurateConfig``: a preset, then ``--config`` (JSON object of
field overrides), then one flag per field (``--semdedup_eps 0.1``; ``none`` clears an optional one).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from dataclasses import dataclass

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.ml.inference.base import RunInference
from apache_beam.options.pipeline_options import PipelineOptions

from filters import config as config_lib
from filters.config import CurateConfig
from pipelines import common
from pipelines.curate.download import DownloadBatch
from pipelines.curate.models import AestheticHandler, ClipEmbeddingHandler
from pipelines.curate.report import CurateStats, write_report
from pipelines.curate.schema import MANIFEST_SCHEMA, REJECTS_SCHEMA, manifest_row
from pipelines.curate.sinks import WriteEmbeddings, WriteSortedParquet
from pipelines.curate.sources import FORMATS, Split, plan_inputs
from pipelines.curate.stages import ApplyRules, DropExactDuplicates, LoadImage, NormaliseCaption, ReadRecords
from pipelines.dedup import SemanticDedup
from pipelines.records import is_active
from pipelines.scoring import check_models
from pipelines.stages import ActiveOnly, FilterScores

FIELD_HELP = {
    "semdedup_eps": "SemDeDup threshold: two records are duplicates when the cosine similarity of their "
                    "embeddings is >= 1 - eps (eps 0: identical only; larger eps: more duplicates); none = off",
    "clip_weights": "local open_clip checkpoint, or 'random' (random weights, for tests)",
    "aesthetic_threshold": "keep aesthetic score >= this (LAION-Aesthetics: 5, 6, 6.5)",
    "clip_score_threshold": "keep image-text cosine >= this (DataComp ViT-B/32: 0.28)",
    "clip_score_top_fraction": "keep this top fraction by image-text cosine (DataComp ViT-L/14: 0.3)",
}


@dataclass(frozen=True, kw_only=True)
class CurateOptions:
    inputs: tuple[str, ...]  # --input values as given
    input_format: str | None  # one of FORMATS for every input, or None to recognise from names
    output: str  # output folder
    config: CurateConfig  # resolved thresholds
    splits: tuple[Split, ...]  # reading work units, planned (and checked) before the pipeline starts


def _value_parser(type_text: str):
    optional = "None" in type_text
    base = type_text.replace(" | None", "").strip()

    def parse(text: str):
        if optional and text.strip().lower() in ("none", "null", ""):
            return None
        if base == "bool":
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(f"expected true/false, got {text!r}")
            return text.lower() in ("true", "1", "yes")
        return {"int": int, "float": float, "str": str}[base](text)

    parse.__name__ = base  # argparse names it in "invalid <type> value"
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distill curate", description=__doc__.split("\n\n")[0],
                                     exit_on_error=False)
    parser.add_argument("--input", action="append", default=[], help="file, folder or glob; repeatable")
    parser.add_argument("--input_format", help=f"one of {', '.join(FORMATS)} (default: from names)")
    parser.add_argument("--output", help="output folder (manifest.parquet, report.html, ...)")
    parser.add_argument("--preset", default="default", help=f"one of {', '.join(config_lib.PRESETS)}")
    parser.add_argument("--config", help="JSON file: an object of CurateConfig field overrides")
    for field in dataclasses.fields(CurateConfig):
        parser.add_argument(f"--{field.name}", type=_value_parser(str(field.type)), default=argparse.SUPPRESS,
                            help=FIELD_HELP.get(field.name, f"CurateConfig.{field.name} (default {field.default!r})"))
    return parser


def parse_options(argv: list[str] | None) -> tuple[CurateOptions, list[str]]:
    """Job options and the remaining (Beam) flags; ``ValueError`` naming any bad value."""
    try:
        args, beam_args = build_parser().parse_known_args(argv)
    except argparse.ArgumentError as err:
        raise ValueError(str(err)) from err
    if not args.output:
        raise ValueError("--output is required")
    cfg = config_lib.preset(args.preset)
    if args.config:
        if not FileSystems.exists(args.config):
            raise ValueError(f"--config file {args.config!r} not found")
        with FileSystems.open(args.config) as f:
            try:
                overrides = json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(f"--config {args.config!r} is not JSON ({err})") from err
        if not isinstance(overrides, dict):
            raise ValueError(f"--config {args.config!r} must hold a JSON object of CurateConfig fields")
        cfg = config_lib.with_overrides(cfg, overrides)
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(CurateConfig) if hasattr(args, f.name)}
    cfg = config_lib.validate(config_lib.with_overrides(cfg, flags))
    check_models(cfg)
    splits = plan_inputs(args.input, args.input_format)
    opts = CurateOptions(inputs=tuple(args.input), input_format=args.input_format, output=args.output,
                         config=cfg, splits=tuple(splits))
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
    def __init__(self, cfg: CurateConfig):
        super().__init__()
        self.cfg = cfg

    def expand(self, records):
        image, text, rest = records | "SplitByModality" >> beam.Partition(_dedup_modality, 3, self.cfg.semdedup_on)
        return ((image | "DedupImages" >> SemanticDedup("image", self.cfg),
                 text | "DedupTexts" >> SemanticDedup("text", self.cfg), rest)
                | "Rejoin" >> beam.Flatten())


def _tag(row: dict, kind: str) -> tuple[str, dict]:
    return kind, row


class Curate(beam.PTransform):
    """The whole job, applied to the pipeline root; writes its outputs under ``opts.output``."""

    def __init__(self, opts: CurateOptions):
        super().__init__()
        self.opts = opts

    def expand(self, root):
        cfg, out = self.opts.config, self.opts.output
        records = (root
                   | "ListInputs" >> beam.Create(list(self.opts.splits))
                   | "SpreadInputs" >> beam.Reshuffle()
                   | "ReadInputs" >> beam.ParDo(ReadRecords()))
        normalised = records | "NormaliseCaptions" >> beam.ParDo(NormaliseCaption()).with_outputs("rejects", main="records")
        rejects = [normalised.rejects]
        records = normalised.records | "ApplyRules" >> beam.ParDo(ApplyRules(cfg))
        if cfg.exact_dedup:
            records = records | "DropExactDuplicates" >> ActiveOnly(DropExactDuplicates())
        if cfg.download_images:
            records, failed = records | "DownloadImages" >> DownloadImages(out, cfg)
            rejects.append(failed)
        if cfg.download_images or any(s.format == "wds" for s in self.opts.splits):
            loaded = records | "LoadImages" >> beam.ParDo(LoadImage(cfg)).with_outputs("rejects", main="records")
            records = loaded.records
            rejects.append(loaded.rejects)
        if cfg.clip_model:
            records = records | "EmbedWithClip" >> ActiveOnly(RunInference(ClipEmbeddingHandler(
                cfg.clip_model, cfg.clip_weights, cfg.clip_device, cfg.clip_batch_size)))
        if cfg.aesthetic_weights:
            records = records | "ScoreAesthetics" >> ActiveOnly(RunInference(AestheticHandler(
                cfg.aesthetic_weights, cfg.clip_device)))
        records, cutoff = records | "FilterScores" >> FilterScores(cfg)
        if cfg.clip_model and cfg.semdedup_eps is not None:
            records = records | "DropSemanticDuplicates" >> DropSemanticDuplicates(cfg)
        if cfg.clip_model:
            records | "WriteEmbeddings" >> WriteEmbeddings(out)
        rows = records | "ToManifestRows" >> beam.Map(manifest_row)
        rows | "WriteManifest" >> WriteSortedParquet(FileSystems.join(out, "manifest.parquet"), MANIFEST_SCHEMA)
        all_rejects = rejects | "GatherRejects" >> beam.Flatten()
        all_rejects | "WriteRejects" >> WriteSortedParquet(FileSystems.join(out, "rejects.parquet"), REJECTS_SCHEMA)
        return ((rows | "TagManifest" >> beam.Map(_tag, "manifest"),
                 all_rejects | "TagRejects" >> beam.Map(_tag, "reject"))
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
    _clear_stale_embeddings(opts.output)
    pipeline = test_pipeline or beam.Pipeline(options=PipelineOptions(beam_args))
    _ = pipeline | "Curate" >> Curate(opts)
    result = pipeline.run()
    result.wait_until_finish()
    with FileSystems.open(FileSystems.join(opts.output, "summary.json")) as f:
        summary = json.load(f)
    read = _input_counter(result)
    print(f"curate: input {summary['input']} = kept {summary['kept']} + filtered {summary['filtered']} "
          f"+ rejected {summary['rejected']}" + ("" if read is None else f" (records read: {read})"))
    for status in ("filtered", "rejected"):
        for reason, n in sorted(summary["by_reason"][status].items()):
            print(f"  {status:<8} {reason:<28} {n}")
    print(f"curate: manifest {FileSystems.join(opts.output, 'manifest.parquet')}, "
          f"report {FileSystems.join(opts.output, 'report.html')}")
    if read is not None and read != summary["input"]:
        raise RuntimeError(f"records read ({read}) != kept + filtered + rejected ({summary['input']})")
    return summary


def main(argv: list[str] | None = None) -> int:
    try:
        run(argv)
    except ValueError as err:
        print(f"distill curate: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
