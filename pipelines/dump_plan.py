"""Planning the teacher dump on the launcher: read the input, validate, fix the recipe, partition.

The launcher (the machine that runs ``beam run``) reads the prompts or the curated manifest once,
rejects bad rows with a reason, expands seeds, and writes ``_plan/plan.parquet`` into the output
with one Parquet row group per shard. A Beam work unit is then just a shard number: the worker
reads its row group, so captions never travel through the pipeline graph and heavy arrays never
through a shuffle. Everything here runs before any worker starts, so bad arguments fail first.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re

from teachers.record import SCHEMA_VERSION
from teachers.fs import url_to_fs
from teachers.shards import atomic_write_bytes, atomic_write_json, join

_ID_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
PLAN = "_plan/plan.parquet"
RECIPE = "recipe.json"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ImageScoring:
    """How a dump scores the images it decodes (``--score_images``): the curate job's models."""

    preset: str  # filters.config preset the CLIP model comes from ("tiny", "laion-aesthetics", ...)
    clip_model: str  # open_clip architecture
    clip_weights: str  # local checkpoint, or "random"
    aesthetic_weights: str | None  # LAION aesthetic predictor state dict; None = no aesthetic score
    embed_dim: int  # width of the stored image embeddings

    def curate_config(self):
        """The ``CurateConfig`` whose models these are (the filter job adds its thresholds to it)."""
        from filters import config as config_lib

        return config_lib.with_overrides(config_lib.preset(self.preset), {
            "clip_model": self.clip_model, "clip_weights": self.clip_weights,
            "aesthetic_weights": self.aesthetic_weights})


def image_scoring(preset: str, clip_weights: str | None, aesthetic_weights: str | None) -> ImageScoring:
    """``--score_images PRESET [--clip_weights P] [--aesthetic_weights P]`` -> checked ``ImageScoring``.

    The preset names a ``filters.config`` preset with a CLIP model; the weight flags override its
    (presets of real models leave weights unset: nothing is downloaded). ``ValueError`` naming the value.
    """
    from filters import config as config_lib
    from filters.clip_embed import model_embed_dim
    from pipelines.curate_models import check_models

    cfg = config_lib.preset(preset)
    if not cfg.clip_model:
        raise ValueError(f"--score_images {preset!r}: that preset has no CLIP model; use one of "
                         + ", ".join(n for n in config_lib.PRESETS if config_lib.preset(n).clip_model))
    overrides = {k: v for k, v in (("clip_weights", clip_weights), ("aesthetic_weights", aesthetic_weights)) if v}
    cfg = config_lib.with_overrides(cfg, overrides)
    if cfg.clip_weights is None:
        raise ValueError(f"--score_images {preset!r} needs --clip_weights: a local open_clip checkpoint for "
                         f"{cfg.clip_model} (nothing is downloaded)")
    check_models(cfg)
    return ImageScoring(preset=preset, clip_model=cfg.clip_model, clip_weights=cfg.clip_weights,
                        aesthetic_weights=cfg.aesthetic_weights, embed_dim=model_embed_dim(cfg.clip_model))


@dataclasses.dataclass(frozen=True, kw_only=True)
class DumpRecipe:
    """Everything that decides the dump's bytes. Its hash guards an output folder against mixing."""

    teacher: str  # teacher spec (built-in, folder, hub id)
    dtype: str  # teacher compute dtype
    device: str  # where the teacher runs (numerics differ across devices)
    scheduler: str  # ddim | euler | dpm++
    num_inference_steps: int  # teacher steps S
    guidance_scale: float  # fixed CFG weight (when no range)
    guidance_range: tuple[float, float] | None  # per-sample U[lo, hi] (SnapFusion CFG range)
    height: int  # image px
    width: int  # image px
    record_steps: tuple[int, ...] | None  # recorded step indices; None = all
    feature_layers: tuple[str, ...]  # UNet blocks captured
    num_feature_steps: int  # feature steps per sample
    save_images: bool  # decode and store the image
    storage_dtype: str  # float16 | float32 for stored arrays
    seeds_per_prompt: int  # generations per caption
    samples_per_shard: int  # shard size N
    batch_size: int  # samples per UNet batch (results agree to float tolerance across batch sizes)
    cpu_threads: int  # torch threads on CPU workers, 0 = default (CPU rounding depends on it)
    input_sha256: str  # the input file's content
    score_images: ImageScoring | None = None  # score decoded images (CLIP, aesthetic); None = off
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        if out["score_images"] is None:  # unscored recipes keep the hash they had before scoring existed
            del out["score_images"]
        return out

    @property
    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:16]


def sample_seed(key: str) -> int:
    """The noise seed of a sample, from its key: a retried or re-run shard draws the same noise."""
    return int.from_bytes(hashlib.sha256(key.encode("ascii")).digest()[:8], "little") >> 1


def file_sha256(path: str) -> str:
    fs, p = url_to_fs(path)
    digest = hashlib.sha256()
    with fs.open(p, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@dataclasses.dataclass
class InputRow:
    id: str
    caption: object  # str when valid; anything else is a reject
    guidance_scale: float | None = None
    seed: object = None  # explicit noise seed of the row's first sample (int >= 0); None = from the key


def _decode_line(raw: bytes):
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw  # bytes: rejected as non_utf8 below


def read_input(path: str) -> tuple[list[InputRow], int]:
    """Rows of a prompt list (.txt / .jsonl) or a curated manifest (.parquet). Returns (rows, not_kept)."""
    fs, p = url_to_fs(path)
    if not fs.exists(p):
        raise FileNotFoundError(f"--prompts {path!r} does not exist")
    ext = os.path.splitext(p)[1].lower()
    if ext == ".txt":
        with fs.open(p, "rb") as f:
            lines = f.read().split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        return [InputRow(f"p{i:07d}", _decode_line(raw.rstrip(b"\r"))) for i, raw in enumerate(lines)], 0
    if ext == ".jsonl":
        rows = []
        with fs.open(p, "rb") as f:
            for i, raw in enumerate(f.read().splitlines()):
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(raw)
                except ValueError:  # includes invalid UTF-8
                    rows.append(InputRow(f"p{i:07d}", raw))
                    continue
                caption = obj.get("caption", obj.get("prompt", obj.get("text")))
                rows.append(InputRow(str(obj.get("id", f"p{i:07d}")), caption, obj.get("guidance_scale"),
                                     obj.get("seed")))
        return rows, 0
    if ext == ".parquet":
        import pyarrow.parquet as pq

        with fs.open(p, "rb") as f:
            table = pq.read_table(f)
        missing = [c for c in ("id", "caption") if c not in table.column_names]
        if missing:
            raise ValueError(f"manifest {path!r} lacks column(s) {missing}; it has {table.column_names}")
        cols = table.to_pydict()
        kept = cols.get("kept", [True] * table.num_rows)
        guid = cols.get("guidance_scale", [None] * table.num_rows)
        seeds = cols.get("seed", [None] * table.num_rows)
        rows = [InputRow(str(i), c, g, s) for i, c, k, g, s in zip(cols["id"], cols["caption"], kept, guid, seeds) if k]
        return rows, table.num_rows - len(rows)
    raise ValueError(f"--prompts {path!r}: unknown input kind {ext!r} (expected .txt, .jsonl or .parquet)")


def reject_reason(row: InputRow, seen_ids: set[str]) -> str | None:
    if not _ID_RE.match(row.id):
        return "bad_id"
    if row.id in seen_ids:
        return "duplicate_id"
    if row.caption is None:
        return "null_caption"
    if isinstance(row.caption, bytes):
        return "non_utf8"
    if not isinstance(row.caption, str):
        return "null_caption"
    if not row.caption.strip():
        return "empty_caption"
    if row.seed is not None and (isinstance(row.seed, bool) or not isinstance(row.seed, int)
                                 or not 0 <= row.seed < 2**63 - 2**16):
        return "bad_seed"
    return None


def plan(rows: list[InputRow], recipe: DumpRecipe):
    """-> (samples [(shard, key, prompt, seed, guidance)], rejects [{id, reason}])."""
    samples, rejects, seen = [], [], set()
    for row in rows:
        reason = reject_reason(row, seen)
        if reason:
            rejects.append({"id": row.id if isinstance(row.id, str) else repr(row.id), "reason": reason,
                            "caption": row.caption if isinstance(row.caption, str) else repr(row.caption)})
            continue
        seen.add(row.id)
        for k in range(recipe.seeds_per_prompt):
            key = f"{row.id}-s{k}"
            # An explicit seed reproduces a generation (same prompt + seed = same sample under another id).
            seed = sample_seed(key) if row.seed is None else row.seed + k
            samples.append((key, row.caption, seed, row.guidance_scale))
    n = recipe.samples_per_shard
    return [(i // n, *s) for i, s in enumerate(samples)], rejects


def write_plan(output: str, planned) -> int:
    """Write ``_plan/plan.parquet`` (row group i = shard i). Returns the number of shards."""
    import io
    import itertools

    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("shard", pa.int32()), ("key", pa.string()), ("prompt", pa.string()),
                        ("seed", pa.int64()), ("guidance_scale", pa.float64())])
    buf, num_shards = io.BytesIO(), 0
    with pq.ParquetWriter(buf, schema) as writer:
        for _, rows in itertools.groupby(planned, key=lambda r: r[0]):  # planned is in shard order
            writer.write_table(pa.Table.from_pylist([dict(zip(schema.names, r)) for r in rows], schema))
            num_shards += 1
    fs, p = url_to_fs(join(output, PLAN))
    fs.makedirs(os.path.dirname(p), exist_ok=True)
    atomic_write_bytes(join(output, PLAN), buf.getvalue())
    return num_shards


def read_shard_plan(output: str, shard: int) -> list[dict]:
    import pyarrow.parquet as pq

    fs, p = url_to_fs(join(output, PLAN))
    with fs.open(p, "rb") as f:
        return pq.ParquetFile(f).read_row_group(shard).to_pylist()


def check_or_write_recipe(output: str, recipe: DumpRecipe) -> None:
    """Refuse an output folder made with another recipe; record the recipe in a new one."""
    fs, p = url_to_fs(join(output, RECIPE))
    if fs.exists(p):
        with fs.open(p, "rb") as f:
            old = json.loads(f.read())
        new = recipe.to_json()
        old_recipe = old.get("recipe", {})
        if old.get("recipe_hash") != recipe.hash:
            diff = {k: (old_recipe.get(k), new.get(k)) for k in sorted(set(old_recipe) | set(new))
                    if json.dumps(old_recipe.get(k)) != json.dumps(new.get(k))}
            changes = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"output {output!r} holds a dataset made with another recipe ({changes}); "
                             "use a new --output folder, or the original settings to resume")
        return
    fs.makedirs(p.rsplit("/", 1)[0] if "/" in p else ".", exist_ok=True)
    atomic_write_json(join(output, RECIPE), {"recipe": recipe.to_json(), "recipe_hash": recipe.hash})


def write_rejects(output: str, name: str, rejects: list[dict]) -> dict[str, int]:
    """Write ``rejects/<name>.jsonl`` atomically (one JSON object per line); returns counts by reason."""
    fs, root = url_to_fs(output)
    fs.makedirs(join(root, "rejects"), exist_ok=True)
    lines = "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rejects)
    atomic_write_bytes(join(output, f"rejects/{name}.jsonl"), lines.encode("utf-8"))
    reasons: dict[str, int] = {}
    for r in rejects:
        reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    return reasons
