"""Planning the teacher dump on the launcher: read the input, validate, fix the recipe, partition.

The launcher (the machine that runs ``beam run``) reads the prompts or the curated manifest once,
rejects bad rows with a reason, expands seeds, and writes ``_plan/plan.parquet`` into the output
with one Parquet row group per shard (``pipelines.common.write_plan``). A Beam work unit is then
just a shard number: the worker reads its row group, so captions never travel through the
pipeline graph and heavy arrays never through a shuffle. Everything here runs before any worker
starts, so bad arguments fail first.

Inputs: ``.txt`` (one caption per line), ``.jsonl`` (``key``, ``caption``, optional
``guidance_scale``, ``seed`` and ``image``), or a curated manifest ``.parquet`` (``key``, ``caption``,
``fate``: only ``kept`` rows are generated; optional ``image``). ``image`` (a path or URL of a real
image of the caption) is read only with ``--real_images`` (``teachers.real_image``). The names used
before (``id``, ``prompt``, ``kept``) are still read, with a one-line deprecation notice and a count
in ``dataset.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys

from core.errors import UserError
from filters import reasons
from core.fs import url_to_fs
from shards.recipe import DumpRecipe  # noqa: F401 (the recipe lives with the shard format)

# Column names of earlier versions, read for one more version: old name -> current name.
DEPRECATED_COLUMNS = {"id": "key", "prompt": "caption"}


def sample_seed(key: str) -> int:
    """The noise seed of a sample, from its key: a retried or re-run shard draws the same noise."""
    return int.from_bytes(hashlib.sha256(key.encode("ascii")).digest()[:8], "little") >> 1


@dataclasses.dataclass
class InputRow:
    key: str
    caption: object  # str when valid; anything else is a reject
    guidance_scale: float | None = None
    seed: object = None  # explicit noise seed of the row's first sample (int >= 0); None = from the key
    image: object = None  # path/URL of a real image of the caption (--real_images), or None
    problem: str | None = None  # a reason (filters.reasons) found while reading: the row is rejected


@dataclasses.dataclass
class InputRows:
    """What ``read_input`` found: the rows to plan, and how many the manifest did not keep."""

    rows: list[InputRow]
    not_kept: int = 0
    deprecated: dict[str, int] = dataclasses.field(default_factory=dict)  # old column name -> rows read with it


def _line_key(i: int) -> str:
    return f"p{i:07d}"


def _read_txt(raw: bytes) -> InputRows:
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(InputRow(_line_key(i), line.rstrip(b"\r").decode("utf-8")))
        except UnicodeDecodeError:
            rows.append(InputRow(_line_key(i), repr(line), problem=reasons.NON_UTF8_CAPTION))
    return InputRows(rows)


def _read_jsonl(raw: bytes) -> InputRows:
    rows, deprecated = [], {}
    for i, line in enumerate(raw.splitlines()):
        if not line.strip():
            continue
        try:
            obj = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            rows.append(InputRow(_line_key(i), repr(line), problem=reasons.NON_UTF8_CAPTION))
            continue
        except ValueError:
            rows.append(InputRow(_line_key(i), repr(line), problem=reasons.BAD_JSON))
            continue
        if not isinstance(obj, dict):
            rows.append(InputRow(_line_key(i), repr(obj), problem=reasons.BAD_JSON))
            continue
        for old in DEPRECATED_COLUMNS:
            if old in obj and DEPRECATED_COLUMNS[old] not in obj:
                deprecated[old] = deprecated.get(old, 0) + 1
        key = obj.get("key", obj.get("id", _line_key(i)))
        caption = obj.get("caption", obj.get("prompt", obj.get("text")))
        rows.append(InputRow(str(key), caption, obj.get("guidance_scale"), obj.get("seed"), obj.get("image")))
    return InputRows(rows, deprecated=deprecated)


def _read_manifest(f, path: str) -> InputRows:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(f)
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a damaged file; all mean "unreadable"
        raise UserError(f"--prompts {path!r} is not a readable Parquet file ({type(err).__name__}: {err})") from None
    names, deprecated = table.column_names, {}
    columns = {}
    for want in ("key", "caption"):
        old = next(o for o, new in DEPRECATED_COLUMNS.items() if new == want)
        if want in names:
            columns[want] = want
        elif old in names:
            columns[want], deprecated[old] = old, table.num_rows
    missing = [c for c in ("key", "caption") if c not in columns]
    if missing:
        raise UserError(f"manifest {path!r} lacks column(s) {missing}; it has {names}")
    cols = table.to_pydict()
    if "fate" in cols:
        kept = [fate == "kept" for fate in cols["fate"]]
    elif "kept" in cols:
        kept, deprecated["kept"] = cols["kept"], table.num_rows
    else:
        kept = [True] * table.num_rows
    n = table.num_rows
    guid, seeds, images = (cols.get(name, [None] * n) for name in ("guidance_scale", "seed", "image"))
    rows = [InputRow(str(k), c, g, s, i) for k, c, ok, g, s, i in
            zip(cols[columns["key"]], cols[columns["caption"]], kept, guid, seeds, images) if ok]
    return InputRows(rows, n - len(rows), deprecated)


def read_input(path: str) -> InputRows:
    """Rows of a prompt list (.txt / .jsonl) or a curated manifest (.parquet)."""
    fs, p = url_to_fs(path)
    if not fs.exists(p):
        raise UserError(f"--prompts {path!r} does not exist")
    if fs.isdir(p):
        raise UserError(f"--prompts {path!r} is a folder: give a .txt, .jsonl or .parquet file")
    ext = os.path.splitext(p)[1].lower()
    if ext not in (".txt", ".jsonl", ".parquet"):
        raise UserError(f"--prompts {path!r}: unknown input kind {ext!r} (expected .txt, .jsonl or .parquet)")
    with fs.open(p, "rb") as f:
        if ext == ".parquet":
            found = _read_manifest(f, path)
        else:
            raw = f.read()
            found = _read_txt(raw) if ext == ".txt" else _read_jsonl(raw)
    for old, n in sorted(found.deprecated.items()):
        new = DEPRECATED_COLUMNS.get(old, "fate")
        print(f"teacher dump: warning: {path}: column {old!r} is deprecated, read for {n} row(s); name it {new!r}",
              file=sys.stderr)
    return found


def reject_reason(row: InputRow, seen_keys: set[str]) -> str | None:
    from shards.record import BadRecord, check_key

    if row.problem is not None:
        return row.problem
    try:
        check_key(row.key)
    except BadRecord:
        return reasons.BAD_KEY
    if row.key in seen_keys:
        return reasons.DUPLICATE_KEY
    if row.caption is None:
        return reasons.NULL_CAPTION
    if not isinstance(row.caption, str):
        return reasons.CAPTION_NOT_TEXT
    if not row.caption.strip():
        return reasons.EMPTY_CAPTION
    if row.seed is not None and (isinstance(row.seed, bool) or not isinstance(row.seed, int)
                                 or not 0 <= row.seed < 2**63 - 2**16):
        return reasons.BAD_SEED
    return None


def plan(rows: list[InputRow], recipe: DumpRecipe):
    """-> (samples [(shard, key, caption, seed, guidance, image)], rejects [{key, reason, caption}])."""
    samples, rejects, seen = [], [], set()
    for row in rows:
        reason = reject_reason(row, seen)
        if not reason and recipe.sampler.real_images and row.image is not None and not isinstance(row.image, str):
            reason = reasons.NO_REAL_IMAGE  # an image reference that is no path or URL
        if reason:
            rejects.append({"key": row.key, "reason": reason,
                            "caption": row.caption if isinstance(row.caption, str) else repr(row.caption)})
            continue
        seen.add(row.key)
        for k in range(recipe.seeds_per_prompt):
            key = f"{row.key}-s{k}"
            # An explicit seed reproduces a generation (same caption + seed = same sample under another key).
            seed = sample_seed(key) if row.seed is None else row.seed + k
            image = (row.image or None) if recipe.sampler.real_images else None  # read only with --real_images
            samples.append((key, row.caption, seed, row.guidance_scale, image))
    n = recipe.samples_per_shard
    return [(i // n, *s) for i, s in enumerate(samples)], rejects


def plan_schema():
    import pyarrow as pa

    return pa.schema([("shard", pa.int32()), ("key", pa.string()), ("caption", pa.string()),
                      ("seed", pa.int64()), ("guidance_scale", pa.float64()), ("image", pa.string())])


def write_plan(output: str, planned) -> int:
    """Write ``_plan/plan.parquet`` (row group i = shard i). Returns the number of shards."""
    import itertools

    from pipelines.common import write_plan as write_groups

    schema = plan_schema()
    groups = [[dict(zip(schema.names, r)) for r in rows]
              for _, rows in itertools.groupby(planned, key=lambda r: r[0])]  # planned is in shard order
    write_groups(output, schema, groups)
    return len(groups)
