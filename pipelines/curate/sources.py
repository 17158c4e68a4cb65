"""Sources of the curate job: find and check inputs up front, then read them record by record.

Formats (``--input_format`` names one; otherwise it is recognised from the path):

| format    | recognised by                               | one record per                      |
| --------- | ------------------------------------------- | ----------------------------------- |
| ``laion`` | ``.parquet``, or a folder of them           | row (``URL``, ``TEXT``, ...)        |
| ``coco``  | ``.json`` with ``images`` + ``annotations`` | caption annotation (~5 per image)   |
| ``txt``   | ``.txt``                                    | non-blank line                      |
| ``jsonl`` | ``.jsonl``                                  | line (``caption``/``prompt``/``text``) |
| ``wds``   | ``.tar``, or a folder of them (img2dataset) | sample (``.jpg`` + ``.txt`` + ``.json``) |

``plan_inputs`` runs in the launcher: it expands globs and folders, checks that files exist,
that Parquet files have the required columns and that COCO files have the COCO structure, and
raises ``ValueError`` naming the bad value. It returns ``Split`` work units (a Parquet row group,
or a whole file) that ``read_split`` turns into plain record dicts on the workers.

Record keys are ``<format>-<8 hex of sha1(file path)>-<row or native key>``: unique by construction,
ASCII, no dots (webdataset splits keys on dots), and stable while the input paths stay the same.
The source's own id (LAION ``SAMPLE_ID``, COCO annotation id, ...) is kept as ``source_id``.
Captions stay raw here (str, bytes or None); ``decode_caption`` judges them in the next stage.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import tarfile
from dataclasses import dataclass
from typing import Iterator

from apache_beam.io.filesystems import FileSystems

from filters import reasons

FORMATS = ("laion", "coco", "txt", "jsonl", "wds")
_EXTENSIONS = {".parquet": "laion", ".json": "coco", ".txt": "txt", ".jsonl": "jsonl", ".tar": "wds"}

# LAION column -> record field. The first name found is used (LAION's own spelling first, then
# the lower-case one img2dataset and others write).
LAION_REQUIRED = {"caption": ("TEXT", "caption", "text"), "url": ("URL", "url")}
LAION_OPTIONAL = {
    "width": ("WIDTH", "width"), "height": ("HEIGHT", "height"), "laion_similarity": ("similarity",),
    "punsafe": ("punsafe",), "pwatermark": ("pwatermark",), "laion_aesthetic": ("AESTHETIC_SCORE", "aesthetic"),
    "source_id": ("SAMPLE_ID", "key"), "nsfw": ("NSFW",),
}
JSONL_CAPTION_KEYS = ("caption", "prompt", "text", "TEXT")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class Split:
    """One unit of reading work: a whole file, or one row group of a Parquet file."""

    format: str
    path: str
    part: int = 0  # Parquet row group; 0 for other formats
    columns: tuple[tuple[str, str], ...] = ()  # Parquet: (record field, column name) pairs present


@functools.lru_cache(maxsize=4096)  # called once per record: one sha1 per file, not per record
def file_tag(path: str) -> str:
    return hashlib.sha1(path.encode("utf-8")).hexdigest()[:8]


def make_key(fmt: str, path: str, native: object) -> str:
    return f"{fmt}-{file_tag(path)}-{re.sub(r'[^A-Za-z0-9_-]', '_', str(native))}"


def new_record(fmt: str, path: str, native: object, caption: object, **fields) -> dict:
    """A record with every field the later stages read, unknown ones None."""
    record = dict(key=make_key(fmt, path, native), source=fmt, input=path, source_id=str(native), caption=caption,
                  url=None, width=None, height=None, punsafe=None, pwatermark=None, laion_similarity=None,
                  laion_aesthetic=None, nsfw=None, image_ref=None, error=None)
    for key, value in fields.items():
        if key not in record:
            raise KeyError(f"unknown record field {key!r}")
        record[key] = value
    return record


# --------------------------------------------------------------------------------------------
# planning (launcher side): fail fast on bad arguments
# --------------------------------------------------------------------------------------------


def detect_format(path: str) -> str:
    for ext, fmt in _EXTENSIONS.items():
        if path.endswith(ext):
            return fmt
    raise ValueError(f"cannot tell the format of input {path!r} from its name; "
                     f"pass --input_format (one of {', '.join(FORMATS)})")


def _expand(pattern: str, fmt: str | None) -> list[str]:
    """Files behind one ``--input``: a file, a glob, or a folder (its .parquet or .tar files)."""
    is_folder = not any(ch in pattern for ch in "*?[") and not pattern.endswith(tuple(_EXTENSIONS))
    matched = []
    if is_folder:
        for ext in ((".parquet", ".tar") if fmt is None else [k for k, v in _EXTENSIONS.items() if v == fmt]):
            inside = FileSystems.join(pattern.rstrip("/"), f"*{ext}")
            matched = [m.path for m in FileSystems.match([inside])[0].metadata_list]
            if matched:
                break
    if not matched:
        matched = [m.path for m in FileSystems.match([pattern])[0].metadata_list]
        matched = [p for p in matched if "://" in p or not os.path.isdir(p)]
    if not matched:
        raise ValueError(f"input {pattern!r} matches no file")
    return sorted(matched)


def _parquet_plan(path: str) -> list[Split]:
    import pyarrow.parquet as pq

    with FileSystems.open(path) as f:
        try:
            meta = pq.ParquetFile(f).metadata
        except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a damaged file; all mean "unreadable"
            raise ValueError(f"input {path!r} is not a readable Parquet file ({type(err).__name__}: {err})") from None
        names = set(meta.schema.names)
    columns = []
    for field, options in {**LAION_REQUIRED, **LAION_OPTIONAL}.items():
        found = next((c for c in options if c in names), None)
        if found is None and field in LAION_REQUIRED:
            raise ValueError(f"input {path!r} has no {' or '.join(map(repr, options))} column "
                             f"(needed for {field}); its columns are {sorted(names)}")
        if found is not None:
            columns.append((field, found))
    return [Split("laion", path, g, tuple(columns)) for g in range(meta.num_row_groups)]


def _check_coco(path: str) -> None:
    with FileSystems.open(path) as f:
        try:
            data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"input {path!r} is not JSON ({err})") from err
    if not isinstance(data, dict) or not {"images", "annotations"} <= set(data):
        raise ValueError(f"input {path!r} is not a COCO captions file: it needs 'images' and 'annotations'")


def plan_inputs(patterns: list[str], input_format: str | None = None) -> list[Split]:
    """Every ``--input`` checked and cut into ``Split`` work units; ``ValueError`` naming the bad one."""
    if not patterns:
        raise ValueError("no --input given")
    if input_format is not None and input_format not in FORMATS:
        raise ValueError(f"unknown --input_format {input_format!r}; known: {', '.join(FORMATS)}")
    splits: list[Split] = []
    for pattern in patterns:
        for path in _expand(pattern, input_format):
            fmt = input_format or detect_format(path)
            if fmt == "laion":
                splits.extend(_parquet_plan(path))
            else:
                if fmt == "coco":
                    _check_coco(path)
                splits.append(Split(fmt, path))
    return splits


# --------------------------------------------------------------------------------------------
# reading (worker side): never raise on a bad record, mark it with `error` instead
# --------------------------------------------------------------------------------------------


def _number(value):
    """Arrow/pandas nulls and NaN -> None."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value


def read_laion(split: Split) -> Iterator[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with FileSystems.open(split.path) as f:
        pf = pq.ParquetFile(f)
        table = pf.read_row_group(split.part, columns=[c for _, c in split.columns])
        offset = sum(pf.metadata.row_group(g).num_rows for g in range(split.part))
    fields = {}
    for field, column in split.columns:
        col = table.column(column)
        if field == "caption" and (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
            col = col.cast(pa.large_binary())  # bytes: bad UTF-8 becomes a reject, not a read crash
        fields[field] = col.to_pylist()
    for row in range(table.num_rows):
        values = {field: _number(vals[row]) for field, vals in fields.items() if field != "caption"}
        native = values.get("source_id")
        if native is not None:  # some LAION files store SAMPLE_ID as float64
            values["source_id"] = str(int(native)) if isinstance(native, float) and native.is_integer() else str(native)
        else:
            values.pop("source_id", None)
        yield new_record("laion", split.path, offset + row, fields["caption"][row], **values)


def read_coco(split: Split) -> Iterator[dict]:
    """``captions_*.json``: ``annotations`` joined to ``images`` on ``image_id``."""
    with FileSystems.open(split.path) as f:
        data = json.load(f)
    images = {img.get("id"): img for img in data.get("images", []) if isinstance(img, dict)}
    for n, ann in enumerate(data.get("annotations", [])):
        ann = ann if isinstance(ann, dict) else {}
        native = ann.get("id", f"n{n}")
        image = images.get(ann.get("image_id"))
        if image is None:  # an annotation of no listed image: no url, no size to judge
            yield new_record("coco", split.path, native, ann.get("caption"),
                             error=f"{reasons.IMAGE_NOT_FOUND}: image_id {ann.get('image_id')!r} is not in 'images'")
            continue
        yield new_record("coco", split.path, native, ann.get("caption"), url=image.get("coco_url") or image.get("flickr_url"),
                         width=image.get("width"), height=image.get("height"))


def txt_lines(split: Split) -> Iterator[tuple[int, bytes]]:
    """(line number, undecoded line) of a ``.txt`` split's prompts: blank lines separate, they are not
    prompts. ``read_txt`` and the batched reader (``pipelines.curate.batched.txt_tables``) share it."""
    with FileSystems.open(split.path) as f:
        data = f.read()
    data = data[3:] if data.startswith(b"\xef\xbb\xbf") else data  # UTF-8 byte order mark
    for n, line in enumerate(data.splitlines(), start=1):
        if line.strip():
            yield n, line


def read_txt(split: Split) -> Iterator[dict]:
    """One prompt per line; blank lines separate, they are not records. Bytes stay undecoded."""
    for n, line in txt_lines(split):
        yield new_record("txt", split.path, n, line)


def read_jsonl(split: Split) -> Iterator[dict]:
    with FileSystems.open(split.path) as f:
        for n, line in enumerate(f.read().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                yield new_record("jsonl", split.path, n, None, error=f"{reasons.BAD_JSON}: {err}")
                continue
            if not isinstance(obj, dict):
                yield new_record("jsonl", split.path, n, None, error=f"{reasons.BAD_JSON}: not an object")
                continue
            caption = next((obj[k] for k in JSONL_CAPTION_KEYS if k in obj), None)
            yield new_record("jsonl", split.path, n, caption, url=obj.get("url"),
                             width=obj.get("width"), height=obj.get("height"))


def _wds_record(path: str, key: str, parts: dict[str, tuple[int, int, bytes | None]]) -> dict:
    """One webdataset sample (img2dataset layout) from its members: ext -> (offset, size, bytes)."""
    meta, error = {}, None
    if "json" in parts:
        try:
            meta = json.loads(parts["json"][2])
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            error = f"{reasons.BAD_JSON}: {key}.json: {err}"
        meta = meta if isinstance(meta, dict) else {}
    ext = next((e for e in IMAGE_EXTENSIONS if e in parts), None)
    image_ref = None if ext is None else {"path": path, "offset": parts[ext][0], "size": parts[ext][1]}
    caption = parts["txt"][2] if "txt" in parts else meta.get("caption")
    # img2dataset resizes; original_* are the sizes the source served, which the size rules judge.
    width = meta.get("original_width") or meta.get("width")
    height = meta.get("original_height") or meta.get("height")
    return new_record("wds", path, key, caption, url=meta.get("url"), width=width, height=height,
                      image_ref=image_ref, error=error)


def read_wds(split: Split) -> Iterator[dict]:
    """Samples of one tar, grouped webdataset-style (consecutive members sharing the part of the
    name before the first dot). Images are not read: records carry (path, offset, size) so that no
    image bytes pass through a shuffle; the image stage reads them later."""
    key, parts = None, {}
    try:
        with FileSystems.open(split.path) as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = member.name.rsplit("/", 1)[-1]
                if "." not in base:
                    continue
                member_key, ext = base.split(".", 1)
                if member_key != key and parts:
                    yield _wds_record(split.path, key, parts)
                    parts = {}
                key = member_key
                data = tar.extractfile(member).read() if ext in ("txt", "json") else None
                parts[ext.lower()] = (member.offset_data, member.size, data)
            if parts:
                yield _wds_record(split.path, key, parts)
                parts = {}
            # tarfile ends iteration quietly at the first bad header after the first member; bytes
            # other than end-of-archive zeros after that point mean samples were cut off.
            if _has_trailing_data(f, tar.offset):
                raise tarfile.ReadError(f"unreadable data after byte {tar.offset}")
    except (tarfile.TarError, OSError, EOFError) as err:
        # A corrupt shard ends the file, not the job: what follows cannot be located.
        yield new_record("wds", split.path, f"corrupt-after-{key}", None, error=f"{reasons.CORRUPT_TAR}: {err}")


def _has_trailing_data(f, offset: int, chunk: int = 1 << 20) -> bool:
    f.seek(offset)
    while block := f.read(chunk):
        if block.strip(b"\0"):
            return True
    return False


def read_image_bytes(image_ref: dict) -> bytes:
    """The bytes a record's ``image_ref`` ({path, offset, size}) points at."""
    with FileSystems.open(image_ref["path"]) as f:
        f.seek(image_ref["offset"])
        return f.read(image_ref["size"])


READERS = {"laion": read_laion, "coco": read_coco, "txt": read_txt, "jsonl": read_jsonl, "wds": read_wds}


def read_split(split: Split) -> Iterator[dict]:
    return READERS[split.format](split)
