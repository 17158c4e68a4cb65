"""Reading distillation shards: a WebDataset pipeline that yields checked ``shards.record.Record``s.

    from shards.loader import dataset_shards, record_pipeline
    pipeline = record_pipeline(dataset_shards("out/dump"))
    loader = torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=2)

Shards are split by node (``torch.distributed`` rank) and then by DataLoader worker, so every
sample is read exactly once per epoch across all ranks and workers. Decoding goes through the
schema module only, and every sample passes ``check_sample`` (members present with their recorded
shapes, per-member checksums when the shard index carries them, every array finite). A sample that
fails is skipped and counted with its key and reason; it never stops the reader and never passes
silently. With ``report_skips=True`` the pipeline yields ``Loaded(record, skips)`` items, so a
consumer in the main process gathers the counts of every DataLoader worker (each worker counts in
its own copy of this module's ``STATS``).

Three functions are the trainer's only view of the dump's format, so a new schema changes them only:
``read_dataset_info`` (``dataset.json`` as the typed ``shards.schema.DatasetInfo``: ``info.prediction_type``,
``info.scheduler_config``, and its recipe typed in ``info.dump_recipe``, a ``shards.recipe.DumpRecipe`` with
the sampler's settings in ``.sampler``), ``check_sample`` (one sample) and ``noise_levels`` (the
timesteps and noise coefficients of the recorded latents).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time

from core.errors import UserError
from shards import record
from shards import schema
from shards.schema import DatasetInfo, ShardIndex
from core.fs import exists, join, read_bytes, url_to_fs
from shards.reader import list_indexes
from shards.schema import shard_name

log = logging.getLogger(__name__)

# Schedulers whose recorded latents are the variance-preserving z_t = alpha_t x0 + sigma_t eps in schema 1.
# Schema 1 Euler dumps store the unscaled x0 + sigma eps with int-truncated timesteps: refused (issue 19).
VP_SCHEDULERS = ("DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler", "PNDMScheduler")
MAX_LISTED_SKIPS = 1000  # skips kept with their key and reason (all are counted)


@dataclasses.dataclass(frozen=True)
class Skip:
    key: str | None  # sample key (None: a tar-level error before a key was known)
    reason: str  # a code of filters.reasons: corrupt_tar, unreadable_shard, missing_member, checksum_mismatch, ...
    detail: str


@dataclasses.dataclass
class ReadStats:
    """Samples read and skipped (with key and reason). Each DataLoader worker holds its own copy of
    ``STATS``; ``record_pipeline(report_skips=True)`` hands a worker's new skips to the consumer."""

    samples: int = 0
    skipped: int = 0
    reasons: dict[str, int] = dataclasses.field(default_factory=dict)
    skips: list[Skip] = dataclasses.field(default_factory=list)  # the first MAX_LISTED_SKIPS
    pending: list[Skip] = dataclasses.field(default_factory=list)  # not yet handed to the consumer
    _last_log: float = 0.0

    def add(self, skip: Skip) -> None:
        self.skipped += 1
        self.reasons[skip.reason] = self.reasons.get(skip.reason, 0) + 1
        if len(self.skips) < MAX_LISTED_SKIPS:
            self.skips.append(skip)

    def skip(self, reason: str, detail: str, key: str | None = None, min_interval_s: float = 10.0) -> None:
        skip = Skip(key, reason, detail)
        self.add(skip)
        self.pending.append(skip)
        now = time.monotonic()
        if now - self._last_log >= min_interval_s:  # rate-limited: a bad shard must not flood the log
            log.warning("skipped corrupt sample %s (%s): %s [%d skipped so far]", key, reason, detail, self.skipped)
            self._last_log = now

    def drain(self) -> list[Skip]:
        out, self.pending = self.pending, []
        return out

    def summary(self) -> str:
        listed = ", ".join(f"{s.key}: {s.reason}" for s in self.skips[:20])
        return f"skipped {self.skipped} corrupt sample(s) {dict(sorted(self.reasons.items()))} [{listed}]"


STATS = ReadStats()  # this process's counters (a DataLoader worker's own copy in each worker)


@dataclasses.dataclass
class Loaded:
    """An item of ``record_pipeline(report_skips=True)``: a record (None at the end) and the skips before it."""

    record: object
    skips: list[Skip]


# ------------------------------------------------------------------------------------------
# dataset.json and the list of shards
# ------------------------------------------------------------------------------------------


def read_dataset_info(data_dir: str) -> DatasetInfo:
    """``dataset.json`` of a dump, validated by ``shards.schema.DatasetInfo`` (schema version, field types)
    plus what the trainer needs (the scheduler and prediction type); ``UserError`` naming the file otherwise."""
    if not exists(data_dir):
        raise UserError(f"--data {data_dir!r} does not exist")
    path = join(data_dir, schema.DATASET_JSON)
    info = schema.read_dataset_info(data_dir)
    for field in ("scheduler_class", "scheduler_config", "prediction_type"):
        if getattr(info, field) is None:
            raise UserError(f"{path}: missing field {field!r}")
    if info.schema_version == 1 and info.scheduler_class not in VP_SCHEDULERS:
        raise UserError(f"{path}: a schema {info.schema_version} dump made with {info.scheduler_class} stores "
                        "latents this trainer cannot read as z_t = alpha_t x0 + sigma_t eps (supported: "
                        f"{', '.join(VP_SCHEDULERS)}); re-dump it with this version (schema 2)")
    return info


def dataset_shards(data_dir: str) -> list[str]:
    """Paths/URLs of a dataset's complete shards: those listed in ``dataset.json``, else those with an index.

    Each one's index is read and checked here (``read_shard_index``), so a missing or unsupported index
    is refused before any work rather than read past; the indexes are kept for ``shard_index``."""
    if exists(join(data_dir, schema.DATASET_JSON)):
        names = read_dataset_info(data_dir).shard_names
    elif not exists(data_dir):
        raise UserError(f"--data {data_dir!r} does not exist")
    else:
        names = [shard_name(i) for i in list_indexes(data_dir)]
    if not names:
        raise UserError(f"no complete shards in {data_dir!r} (its dataset.json lists none, or there is no "
                        "dataset.json and no NNNNNN.json index): nothing to train on")
    urls = [join(data_dir, n) for n in names]
    for url in urls:
        _INDEXES[url] = read_shard_index(url)
    return urls


def read_shard_index(url: str) -> ShardIndex:
    """The index ``NNNNNN.json`` of listed shard ``url``, validated; a one-line ``UserError`` naming the
    shard when it is missing, unreadable or of a schema this version does not read.

    Without its index a shard's samples would be read with no checksum check and no skip counted,
    so every listed shard must have one before the first step (``dataset_shards``).
    """
    path = _index_path(url)
    if not exists(path):
        raise UserError(f"shard {url}: its index {path} is missing (a shard is complete only with its index): "
                        "re-make the dataset or check it with distill inspect --verify")
    try:
        d = json.loads(read_bytes(path))
    except (OSError, ValueError) as err:
        raise UserError(f"shard {url}: its index {path} is unreadable ({err})") from None
    try:
        return ShardIndex.from_dict(d, source=path)
    except UserError as err:  # schema_version 99, a field of the wrong type: it names the file and the field
        raise UserError(f"shard {url}: {err}") from None


def _index_path(url: str) -> str:
    return url[: -len(".tar")] + ".json" if url.endswith(".tar") else url + ".json"


def read_dataset(data_dir: str):
    """(dataset.json as ``DatasetInfo``, {name: array} of what is stored once: the unconditional embeddings), through fsspec."""
    import numpy as np

    dataset = read_dataset_info(data_dir)
    negative = {}
    for name, file in dataset.shared.items():  # negative_prompt_embeds (+ negative_pooled_prompt_embeds: SDXL)
        try:
            negative[name] = record.load_npy(read_bytes(join(data_dir, file))).astype(np.float32)
        except (OSError, ValueError) as err:
            raise UserError(f"{join(data_dir, file)}: cannot read the dump's {name} ({err})") from None
        if not np.isfinite(negative[name]).all():
            raise UserError(f"{join(data_dir, file)}: {name} contains NaN or Inf")
    return dataset, negative


# ------------------------------------------------------------------------------------------
# one sample
# ------------------------------------------------------------------------------------------


def check_sample(sample: dict, index: ShardIndex | dict | None = None):
    """Raw WebDataset sample (member extension -> bytes) -> a checked ``Record``; ``record.BadRecord`` if not.

    Checks, in order: the sample's members against the shard index's per-member checksums
    (``shards.record.verify_members``: ``missing_member``, ``checksum_mismatch``; skipped for an index
    written before checksums), then ``shards.record.decode_sample`` (every member the json's
    ``array_shapes`` lists present with that shape, every array finite: ``missing_member``,
    ``corrupt_member``, ``non_finite``), then the members the trainer needs present.
    """
    key = sample.get("__key__")
    if index is not None:
        if isinstance(index, dict):
            index = ShardIndex.from_dict(index)
        record.verify_members(index.member_checksums(key), sample)
    rec = record.decode_sample(sample)
    shapes = rec.meta.get("array_shapes") or {}
    for name in ("latents", "pred_cond", "pred_uncond", "prompt_embeds"):
        if name not in rec.arrays and (name in shapes or not shapes):
            raise record.BadRecord(record.MISSING_MEMBER, f"sample {key!r} has no {name} member (truncated shard?)")
    return rec


# ------------------------------------------------------------------------------------------
# the pipeline
# ------------------------------------------------------------------------------------------


_INDEXES: dict[str, ShardIndex | None] = {}  # shard URL -> its NNNNNN.json (this process's cache)


def shard_index(url: str) -> ShardIndex | None:
    """The index ``NNNNNN.json`` beside shard ``url``, as ``dataset_shards`` checked it; in a worker that
    did not inherit that check (a spawned DataLoader worker), read again, None if it has gone since."""
    if url not in _INDEXES:
        path = url[: -len(".tar")] + ".json" if url.endswith(".tar") else None
        try:
            _INDEXES[url] = ShardIndex.from_dict(json.loads(read_bytes(path)), source=path) if path and exists(path) else None
        except (OSError, ValueError):  # the index is advisory here; the shard's members are still checked
            _INDEXES[url] = None
    return _INDEXES[url]


def _count_tar_error(exn: Exception) -> bool:
    """webdataset handler: count a tar-level error and continue with the next shard/member."""
    STATS.skip("corrupt_tar", repr(exn))
    return True


def fsspec_opener(shards):
    """Pipeline stage: ``{"url": ...}`` -> ``{"url", "stream"}`` opened through fsspec; a failure is counted."""
    for shard in shards:
        try:
            fs, path = url_to_fs(shard["url"])
            stream = fs.open(path, "rb")
        except OSError as err:
            STATS.skip("unreadable_shard", f"{shard['url']}: {err}")
            continue
        yield dict(shard, stream=stream)


def decode_records(samples, stats: ReadStats | None = None):
    """Pipeline stage: raw WebDataset samples -> checked Records; bad ones skipped and counted."""
    stats = stats or STATS
    for sample in samples:
        url = sample.get("__url__")
        try:
            rec = check_sample(sample, shard_index(url) if isinstance(url, str) else None)
        except record.BadRecord as err:
            stats.skip(err.reason, str(err), key=sample.get("__key__"))
            continue
        stats.samples += 1
        yield rec


def report_skips_stage(records):
    """Pipeline stage: Records -> ``Loaded(record, skips since the previous item)``, then ``Loaded(None, rest)``."""
    for rec in records:
        yield Loaded(rec, STATS.drain())
    yield Loaded(None, STATS.drain())


def record_pipeline(urls: list[str], *, shuffle_buffer: int = 0, seed: int = 0, decode: bool = True,
                    resampled: bool = False, report_skips: bool = False):
    """A ``webdataset.DataPipeline`` over ``urls`` split by node and worker, optionally shuffled.

    ``resampled``: draw shards with replacement forever (webdataset's ``ResampledShards``, deterministic:
    seeded by ``seed``, the rank and the DataLoader worker); the caller sets the epoch length.
    ``report_skips``: yield ``Loaded`` items carrying the skips counted in the worker that read them.
    """
    from functools import partial

    import webdataset as wds
    from webdataset import tariterators

    sources = [wds.ResampledShards(urls, seed=seed, deterministic=True)] if resampled else [
        wds.SimpleShardList(urls), wds.split_by_node, wds.split_by_worker]
    stages = [
        *sources,
        fsspec_opener,  # local paths and bucket URLs (gs://, s3://) alike
        partial(tariterators.tar_file_expander, handler=_count_tar_error),
        partial(tariterators.group_by_keys, handler=_count_tar_error),
    ]
    if shuffle_buffer > 0:
        import random

        stages.append(wds.shuffle(shuffle_buffer, initial=shuffle_buffer, rng=random.Random(seed)))
    if decode:
        stages.append(decode_records)
        if report_skips:
            stages.append(report_skips_stage)
    return wds.DataPipeline(*stages)


# ------------------------------------------------------------------------------------------
# noise levels and training rows
# ------------------------------------------------------------------------------------------


def noise_levels(meta: dict, scheduler_config: dict | None = None):
    """(timesteps, alphas, sigmas) of a sample's recorded latents: float64 arrays, shape (S,), aligned
    with ``latents[:-1]`` and ``pred_cond``; latent row r is z = alphas[r] x0 + sigmas[r] eps at timesteps[r].

    Schema 1 (VP schedulers only, see ``read_dataset_info``): the timesteps are the sampler's at
    ``recorded_steps``, alpha = sqrt(abar_t), sigma = sqrt(1 - abar_t) with the scheduler's alphas_cumprod.
    The trainer's only source of noise levels (at merge: ``shards.record.noise_levels``).
    """
    if "schema_version" not in meta:  # a bare {timesteps, recorded_steps}: schema 1 of a DDIM-family dump
        meta = {"schema_version": 1, "scheduler_class": "DDIMScheduler", "scheduler_config": scheduler_config, **meta}
    return record.noise_levels(meta)


def final_noise_level(meta_or_config: dict) -> tuple[float, float]:
    """(alpha, sigma) of the final recorded latent ``latents[-1]`` of a sample (its json:
    ``shards.record.final_noise_level``), or, given a bare DDIM scheduler config, DDIM's final
    alpha (1 with ``set_alpha_to_one``, else abar_0)."""
    import math

    if "schema_version" in meta_or_config:
        return record.final_noise_level(meta_or_config)
    abar = 1.0 if meta_or_config.get("set_alpha_to_one") else float(alphas_cumprod(meta_or_config)[0])
    return math.sqrt(abar), math.sqrt(max(0.0, 1.0 - abar))


def alphas_cumprod(scheduler_config: dict):
    """The training noise schedule abar_t, float64 (num_train_timesteps,), from a scheduler config
    (``shards.record.alphas_cumprod``, cached by the config's sorted JSON)."""
    return record.alphas_cumprod(json.dumps(scheduler_config, sort_keys=True))










