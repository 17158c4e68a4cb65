"""The filter job's light data: its recipe, per-sample score records, fates, and the output plan.

Everything here works on the small per-sample facts a scored dump keeps outside its tars (keys,
byte ranges, scores in the shard index; CLIP image embeddings in ``NNNNNN.emb.npy``), never on the
heavy members. The plan (``_plan/plan.parquet`` in the output) has one row per input key with its
fate; row group ``j`` holds the kept rows of output shard ``j`` in copy order, the last row group
the rest. A copy work unit reads only its row group, as the dump's shard workers read theirs
(``pipelines/dump/plan.py``); both write it with ``pipelines.common.write_plan``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os

from core.errors import UserError
from filters import reasons
from filters.reasons import DUPLICATE, FATES, FILTERED, KEPT, REJECTED
from pipelines import common
from pipelines.scoring import ImageScoring
from shards import schema
from core.fs import atomic_write_bytes, exists, join, read_bytes, url_to_fs
from shards.record import SCHEMA_VERSION
from shards.schema import embeds_name, index_name, shard_name
from shards.reader import read_embeddings, read_index

MANIFEST = "manifest.parquet"
# Stage that set a record aside -> its fate. dump_input/dump: the dump's own rejects; scores: a shard
# whose scores cannot be read; copy: a sample whose members cannot be read when its shard is written.
DUMP_STAGES = ("dump_input", "dump")  # rejects the parent dump made itself (rejects/*.jsonl)
STAGE_FATES = {"dump_input": REJECTED, "dump": REJECTED, "scores": REJECTED, "aesthetic": FILTERED,
               "clip_score": FILTERED, "semdedup": DUPLICATE, "copy": REJECTED}


@dataclasses.dataclass(frozen=True, kw_only=True)
class FilterRecipe:
    """Everything that decides the filtered dataset's bytes; its hash guards the output folder."""

    parent_recipe_hash: str  # recipe hash of the samples (the dump that generated them)
    parent_dataset_sha256: str  # sha256 of the parent's dataset.json: pins the exact input
    aesthetic_threshold: float | None  # keep aesthetic score >= this; None = off
    clip_score_threshold: float | None  # keep image-prompt cosine >= this; None = off
    clip_score_top_fraction: float | None  # keep this top fraction by image-prompt cosine; None = off
    semdedup_eps: float | None  # duplicates: cosine of image embeddings >= 1 - eps; None = no dedup
    kmeans_sample_size: int  # embeddings sampled to train SemDeDup's k-means
    kmeans_clusters: int  # k; 0 = records / target_cluster_size
    target_cluster_size: int  # records per cluster aimed at when kmeans_clusters = 0
    kmeans_iterations: int  # Lloyd iterations (faiss)
    kmeans_seed: int  # seed of the k-means init and sample
    samples_per_shard: int  # output shard size (sizes are balanced: they differ by at most one)
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def hash(self) -> str:
        return common.recipe_hash(self.to_json())

    def curate_config(self, scoring: dict):
        """The curate job's config for ``FilterScores`` and ``SemanticDedup``: the dump's scoring
        models (``recipe.score_images``) plus these thresholds; ``ValueError`` naming a bad value."""
        from filters import config as config_lib

        fields = ("aesthetic_threshold", "clip_score_threshold", "clip_score_top_fraction", "semdedup_eps",
                  "kmeans_sample_size", "kmeans_clusters", "target_cluster_size", "kmeans_iterations", "kmeans_seed")
        base = ImageScoring(**scoring).curate_config()
        cfg = config_lib.with_overrides(base, {f: getattr(self, f) for f in fields} | {"semdedup_on": "image"})
        return config_lib.validate(cfg)


# ---------------------------------------------------------------------------------------------
# the parent dataset
# ---------------------------------------------------------------------------------------------


def read_parent(data_dir: str) -> tuple[schema.DatasetInfo, str]:
    """(``dataset.json`` as the typed ``shards.schema.DatasetInfo``, its sha256) of a finished dump or filtered
    dataset. Parsed as ``schema.read_dataset_info`` does, from one read of the file, so the sha256 pins the bytes
    that were validated; errors name ``--input``."""
    fs, root = url_to_fs(data_dir)
    if not fs.exists(root):
        raise UserError(f"--input {data_dir!r} does not exist")
    path = join(data_dir, schema.DATASET_JSON)
    try:
        data = read_bytes(path)
    except FileNotFoundError:
        raise UserError(f"--input {data_dir!r} has no dataset.json: not a finished dump "
                        "(re-run the dump job to complete it)") from None
    try:
        d = json.loads(data)
    except ValueError as err:
        raise UserError(f"--input {data_dir!r}: dataset.json is not JSON ({err})") from None
    info = schema.DatasetInfo.from_dict(d, source=path)  # schema version first, then every field
    # Its samples are copied byte for byte into a dataset of the parent's version. Schema 3 only added
    # flow records (shards.record.noise_process): a schema-2 dump's samples are schema-3 ones as they are.
    readable = (2, SCHEMA_VERSION)
    if info.schema_version not in readable:
        raise UserError(f"{path} has schema_version {info.schema_version!r}; the filter reads schema_version "
                        f"{' or '.join(map(str, readable))} (re-make the dump with this version)")
    return info, hashlib.sha256(data).hexdigest()


def input_shards(info: schema.DatasetInfo) -> list[int]:
    """The parent's complete shards (``NNNNNN.tar`` -> NNNNNN), in order."""
    return [int(name[:-4]) for name in info.shard_names]


def scoring_of(dataset: schema.DatasetInfo, data_dir: str) -> dict:
    """The parent's ``score_images`` recipe entry; a dump made without it cannot be filtered."""
    scoring = dataset.dump_recipe.score_images
    if not scoring:
        raise UserError(f"--input {data_dir!r} holds no image scores: make the dump with "
                         "--save_images --score_images PRESET (e.g. --score_images tiny for tests)")
    return scoring


# ---------------------------------------------------------------------------------------------
# records: one per sample of an input shard
# ---------------------------------------------------------------------------------------------


def _base(key: str, shard: int, position: int, offset) -> dict:
    return {"key": key, "input_shard": shard, "input_position": position, "offset": offset,
            "stage": None, "reason": None}


def score_records(data_dir: str, shard: int) -> list[dict]:
    """The curate-style records of one input shard: key, scores, CLIP image embedding.

    Reads the shard's index and embedding sidecar only. A shard whose scores or embeddings cannot be
    read gives records rejected at stage ``scores`` (counted, never silently dropped).
    """
    index = read_index(data_dir, shard)
    keys = index["keys"]
    offsets = index.get("offsets") or [None] * len(keys)
    problem = None
    if keys and not index.get("scores"):
        problem = (reasons.NO_SCORES, f"{index_name(shard)} has no image scores")
    else:
        try:
            embeds = read_embeddings(data_dir, shard, index) if keys else None
        except ValueError as err:
            problem = (reasons.CORRUPT_EMBEDDINGS, str(err))
    if problem:
        return [dict(_base(k, shard, i, offsets[i]), stage="scores", reason=problem[0], detail=problem[1])
                for i, k in enumerate(keys)]
    scores = index["scores"]
    records = []
    for i, k in enumerate(keys):
        record = dict(_base(k, shard, i, offsets[i]), aesthetic_score=scores["aesthetic_score"][i],
                      clip_score=scores["clip_score"][i], image_embedding=embeds[i])
        bad = _non_finite(record, embeds[i])
        if bad:  # a NaN/Inf row would poison k-means and the similarity search: set aside, counted
            record.update(stage="scores", reason=reasons.NON_FINITE_SCORE,
                          detail=f"{bad} of {keys[i]!r} (row {i} of {embeds_name(shard)}) is not finite")
        records.append(record)
    return records


def without_tar(data_dir: str, shard: int, records: list[dict]) -> list[dict]:
    """``records`` of an input shard, each rejected at stage ``scores`` (``unreadable_shard``) when the
    shard's tar is missing though its index is there: nothing of it could be copied (it failed in
    CopyShards after other output shards were written). One stat per shard; the scores are read without it."""
    if not records or exists(join(data_dir, shard_name(shard))):
        return records
    detail = f"{shard_name(shard)} is missing (its index {index_name(shard)} is there)"
    return [r if r["stage"] is not None else dict(r, stage="scores", reason=reasons.UNREADABLE_SHARD, detail=detail)
            for r in records]


def _non_finite(record: dict, embedding) -> str | None:
    """What of a record's scores and embedding row is NaN/Inf (None when all is finite)."""
    import numpy as np

    if not np.isfinite(embedding).all():
        return "the image embedding"
    for name in ("aesthetic_score", "clip_score"):
        value = record.get(name)
        if value is not None and not math.isfinite(value):
            return f"the {name}"
    return None


def dump_rejects(data_dir: str) -> list[dict]:
    """Fate rows of the dump's own rejects (``rejects/*.jsonl``): they count into the funnel."""
    fs, root = url_to_fs(join(data_dir, "rejects"))
    if not fs.exists(root):
        return []
    rows = []
    for path in sorted(fs.ls(root, detail=False)):
        name = os.path.basename(path.rstrip("/"))
        if not name.endswith(".jsonl"):
            continue
        stem = name[: -len(".jsonl")]
        with fs.open(path, "rb") as f:
            lines = f.read().decode("utf-8").splitlines()
        for line in lines:
            rej = json.loads(line)
            stage, shard = ("dump", int(stem)) if stem.isdigit() else ("dump_input", None)
            rows.append(empty_row(rej.get("key") or rej.get("id"), REJECTED, stage, rej["reason"],
                                  detail=rej.get("detail"), input_shard=shard))
    return rows


# ---------------------------------------------------------------------------------------------
# fates: the manifest rows
# ---------------------------------------------------------------------------------------------


def manifest_schema():
    import pyarrow as pa

    return pa.schema([
        ("key", pa.string()),  # the sample key (dump_input rows: the input row's id)
        ("fate", pa.string()),  # kept | filtered | duplicate | rejected
        ("stage", pa.string()),  # what set it aside (STAGE_FATES), null when kept
        ("reason", pa.string()),  # filters.reasons or the dump's reject reason, null when kept
        ("detail", pa.string()),  # reject detail
        ("duplicate_of", pa.string()),  # key of the kept sample this one duplicates
        ("duplicate_similarity", pa.float32()),  # cosine of their image embeddings
        ("n_duplicates", pa.int64()),  # on a kept sample: duplicates dropped in its favour
        ("cluster_id", pa.int64()),  # SemDeDup k-means cluster
        ("aesthetic_score", pa.float64()),  # from the dump's index (null: no aesthetic weights)
        ("clip_score", pa.float64()),  # image-prompt cosine from the dump's index
        ("input_shard", pa.int32()),  # shard of the parent dataset
        ("input_position", pa.int32()),  # position in that shard's index
        ("output_shard", pa.int32()),  # shard of this dataset (kept only)
    ])


def plan_schema():
    import pyarrow as pa

    schema = manifest_schema()
    return schema.append(pa.field("start", pa.int64())).append(pa.field("end", pa.int64()))


def empty_row(key: str, fate: str, stage: str | None = None, reason: str | None = None, **values) -> dict:
    row = {name: None for name in plan_schema().names}
    row.update(key=key, fate=fate, stage=stage, reason=reason, **values)
    return row


def fate_row(record: dict) -> dict:
    """A record after the filter stages -> its plan/manifest row (the embedding is left behind)."""
    stage = record.get("stage")
    offset = record.get("offset") or (None, None)
    fate = KEPT if stage is None else STAGE_FATES[stage]
    values = {k: record.get(k) for k in ("detail", "duplicate_of", "duplicate_similarity", "n_duplicates",
                                         "cluster_id", "aesthetic_score", "clip_score", "input_shard",
                                         "input_position")}
    return empty_row(record["key"], fate, stage, record.get("reason"), **values, start=offset[0], end=offset[1])


def layout(rows: list[dict], samples_per_shard: int) -> int:
    """Assign kept rows to output shards (sets ``output_shard``); returns the number of shards.

    Kept samples keep the parent's order (input shard, position), so an output shard reads runs of
    adjacent samples; ceil(kept / samples_per_shard) shards whose sizes differ by at most one.
    """
    kept = sorted((r for r in rows if r["fate"] == KEPT), key=lambda r: (r["input_shard"], r["input_position"]))
    if not kept:
        return 0
    num = -(-len(kept) // samples_per_shard)
    for j in range(num):
        for row in kept[j * len(kept) // num : (j + 1) * len(kept) // num]:
            row["output_shard"] = j
    return num


def write_plan(output: str, rows: list[dict], num_shards: int) -> None:
    """``_plan/plan.parquet``: row group j = output shard j in copy order; last row group: the rest."""
    by_shard: list[list[dict]] = [[] for _ in range(num_shards + 1)]
    for row in rows:
        by_shard[num_shards if row["output_shard"] is None else row["output_shard"]].append(row)
    by_shard[:num_shards] = [sorted(g, key=lambda r: (r["input_shard"], r["input_position"])) for g in by_shard[:num_shards]]
    by_shard[num_shards].sort(key=lambda r: r["key"])
    common.write_plan(output, plan_schema(), by_shard)


def write_manifest(output: str, rows: list[dict]) -> None:
    """``manifest.parquet``: every input key once, sorted by key, with its fate and reason."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = manifest_schema()
    table = pa.Table.from_pylist(sorted(({k: r[k] for k in schema.names} for r in rows), key=lambda r: r["key"]),
                                 schema)
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=65_536)
    atomic_write_bytes(join(output, MANIFEST), buf.getvalue())


def count_fates(rows: list[dict]) -> dict:
    """Totals by fate and by (fate, reason); ``input`` = kept + filtered + duplicate + rejected."""
    by_fate = {fate: 0 for fate in FATES}
    by_reason: dict[str, dict[str, int]] = {fate: {} for fate in FATES if fate != KEPT}
    for row in rows:
        by_fate[row["fate"]] += 1
        if row["fate"] != KEPT:
            by_reason[row["fate"]][row["reason"]] = by_reason[row["fate"]].get(row["reason"], 0) + 1
    return {"input": len(rows), **by_fate, "by_reason": by_reason}

