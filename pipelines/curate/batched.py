"""The curate job's caption stages on Arrow record batches: read, normalise, rules, exact dedup, manifest.

The same decisions as the per-record stages (``pipelines.curate.stages``), made a batch of
``record_batch`` rows at a time so that Beam's per-element cost is paid once per batch:

- ``ReadBatches``: a ``Split`` -> pyarrow Tables of ``RECORD_SCHEMA`` (reader errors and undecodable
  captions leave through ``rejects`` one row each, as in ``NormaliseCaption``). A ``.txt`` file goes
  straight into columns (no record dict per line); other formats are read as records, decoded, and
  gathered into columns. Then per batch: NFKC and whitespace normalisation in ``pyarrow.compute``
  for ASCII captions (``normalise_texts``; others per caption), word counts from the normalised
  captions, CLIP-token counts once per distinct word (``filters.captions.clip_token_counts``);
- ``apply_rules``: ``filters.captions.check_batch`` (``pyarrow.compute``) sets ``stage``/``reason``;
- ``DropExactDuplicateRows``: active rows keyed by ``crc32(caption) % buckets`` (buckets from the
  active count, ``EXACT_BUCKET_ROWS`` rows each, so no key is hot), one GroupByKey of sub-tables, and
  per bucket one sort by (caption, aesthetic descending with unknown last, key): the first row of each
  caption is kept (``filters.captions.keep_priority``), the others name it in ``duplicate_of``;
- ``manifest_table``: the manifest columns (``pipelines.curate.schema.MANIFEST_SCHEMA``) of a table,
  as ``manifest_row`` gives them row by row.

Stages that still work per record (downloads, images, CLIP, scores, SemDeDup) get the rows back as
record dicts (``to_records``). ``tests/test_curate_batched.py`` checks that both paths write the same
manifest, rejects and counts.
"""

from __future__ import annotations

import math
import pickle
import zlib

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.metrics import Metrics

from core.allocator import set_allocator
from filters import captions, reasons
from filters.config import CurateConfig
from pipelines.curate.schema import MANIFEST_SCHEMA
from pipelines.curate.sources import read_split
from pipelines.curate.stages import decode_or_reject

NAMESPACE = "curate"
EXACT_BUCKET_ROWS = 262_144  # active rows per exact-dedup bucket (about 60 MB of captions and fields)

_FLOATS = ("width", "height", "punsafe", "pwatermark", "laion_similarity", "laion_aesthetic")
_STRINGS = ("key", "source", "input", "source_id", "url", "nsfw")
IMAGE_REF = pa.struct([("path", pa.string()), ("offset", pa.int64()), ("size", pa.int64())])
RECORD_SCHEMA = pa.schema(
    [(name, pa.string()) for name in _STRINGS] + [("caption", pa.string())]
    + [(name, pa.float64()) for name in _FLOATS]  # sizes too: the rules compare them as the source gave them
    + [("image_ref", IMAGE_REF), ("n_words", pa.int32()), ("n_clip_tokens", pa.int32()),
       ("stage", pa.string()), ("reason", pa.string()), ("duplicate_of", pa.string()), ("n_duplicates", pa.int64())])


class ArrowTableCoder(beam.coders.Coder):
    """pyarrow Tables across a stage boundary, for the PCollections of tables (``TABLE`` /
    ``KEYED_TABLES`` type hints): an Arrow IPC stream of the columns that vary, while a column that
    is all null (most of ``RECORD_SCHEMA``'s for a prompt list) or holds one value throughout (a
    file's ``source`` and ``input``) travels as its type and value only; decoding gives the same
    schema and values. Its size estimate is the table's buffer size: Beam's element counters
    estimate the size of sampled elements at every step (every one of a stage's first ten or so),
    and the default (pickle) coder estimates by encoding, a copy of the whole table each time."""

    def encode(self, table: pa.Table) -> bytes:
        n, varying, constant = table.num_rows, [], {}
        for i, column in enumerate(table.columns):
            if n and column.null_count == n:
                constant[i] = None
            elif n > 1 and not column.null_count and pa.types.is_string(column.type):
                low, high = pc.min_max(column).values()
                if low == high:
                    constant[i] = low.as_py()
                    continue
                varying.append(i)
            else:
                varying.append(i)
        sink = pa.BufferOutputStream()
        raw = table.select(varying)
        with pa.ipc.new_stream(sink, raw.schema) as writer:
            writer.write_table(raw)
        return pickle.dumps((table.schema, n, constant, sink.getvalue().to_pybytes()), protocol=pickle.HIGHEST_PROTOCOL)

    def decode(self, data: bytes) -> pa.Table:
        schema, n, constant, stream = pickle.loads(data)
        raw = pa.ipc.open_stream(pa.py_buffer(stream)).read_all()
        columns, j = [], 0
        for i, field in enumerate(schema):
            if i in constant:
                columns.append(pa.repeat(pa.scalar(constant[i], field.type), n))
            else:
                columns.append(raw.column(j))
                j += 1
        return pa.Table.from_arrays(columns, schema=schema)

    def estimate_size(self, table: pa.Table) -> int:
        return table.nbytes

    def is_deterministic(self) -> bool:
        return False

    def to_type_hint(self):
        return pa.Table


beam.coders.registry.register_coder(pa.Table, ArrowTableCoder)
TABLE = pa.Table  # the type hint of a PCollection of tables
KEYED_TABLES = beam.typehints.Tuple[int, pa.Table]


def _count(name: str, n: int = 1) -> None:
    Metrics.counter(NAMESPACE, name).inc(n)


def _number(value) -> float | None:
    """A number the rules can compare; anything else (null, NaN, text) is unknown, which the rules pass."""
    if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)):
        return float(value)
    return None


_CONTROL_OR_SPACE = r"[\x00-\x20\x7f]+"  # ASCII: the Cc characters (C0 controls, DEL) and the space


def normalise_texts(texts: list[str]) -> pa.Array:
    """``filters.captions.normalize_caption`` over a batch of decoded captions -> a string Array.

    ASCII captions (most of LAION's) are done in ``pyarrow.compute``: for them NFKC changes nothing,
    the Cc characters are the C0 controls and DEL, and ``str.split()``'s whitespace is a subset of
    those plus the space, so one regex replace of runs of [\x00-\x20\x7f] by a space and a trim of
    spaces give what the per-caption function gives. Other captions go through that function."""
    fast = pc.utf8_trim(pc.replace_substring_regex(pa.array(texts, pa.string()), _CONTROL_OR_SPACE, " "), " ")
    other = [i for i, t in enumerate(texts) if not t.isascii()]
    if not other:
        return fast
    slow = [None] * len(texts)
    for i in other:
        slow[i] = captions.normalize_caption(texts[i])
    mask = np.zeros(len(texts), bool)
    mask[other] = True
    return pc.if_else(pa.array(mask), pa.array(slow, pa.string()), fast)


def word_counts(caption: pa.Array) -> pa.Array:
    """``len(caption.split())`` of normalised captions (words joined by one space) -> int32 Array."""
    n = pc.add(pc.count_substring(caption, " "), 1)
    return pc.cast(pc.if_else(pc.equal(pc.utf8_length(caption), 0), 0, n), pa.int32())


class _Columns:
    """Column lists of decoded records, flushed as a ``RECORD_SCHEMA`` table (``caption_table``)."""

    def __init__(self):
        self.data = {name: [] for name in _STRINGS + _FLOATS + ("image_ref",)}
        self.texts = []

    def add(self, record: dict, text: str) -> None:
        d = self.data
        for name in _STRINGS:
            value = record.get(name)
            d[name].append(value if value is None or type(value) is str else str(value))
        for name in _FLOATS:
            value = record.get(name)
            d[name].append(None if value is None else _number(value))
        d["image_ref"].append(record.get("image_ref"))
        self.texts.append(text)

    def __len__(self):
        return len(self.texts)

    def flush(self) -> pa.Table:
        columns = {name: pa.array(values, RECORD_SCHEMA.field(name).type) for name, values in self.data.items()}
        table = caption_table(columns, self.texts)
        self.__init__()
        return table


def caption_table(columns: dict, texts: list[str]) -> pa.Table:
    """A ``RECORD_SCHEMA`` table from source columns (``_STRINGS``, ``_FLOATS``, ``image_ref``;
    missing ones null) and the decoded captions: normalised, words and CLIP tokens counted, no
    stage or reason yet."""
    n = len(texts)
    caption = normalise_texts(texts)
    out = {}
    for field in RECORD_SCHEMA:
        if field.name == "caption":
            out["caption"] = caption
        elif field.name == "n_words":
            out["n_words"] = word_counts(caption)
        elif field.name == "n_clip_tokens":
            out["n_clip_tokens"] = captions.clip_token_counts(caption)
        else:
            out[field.name] = columns.get(field.name, pa.nulls(n, field.type))
    return pa.table(out, schema=RECORD_SCHEMA)


def txt_tables(split, batch: int):
    """A ``.txt`` split -> ``RECORD_SCHEMA`` tables of up to ``batch`` lines, built straight from the
    file's lines (no record dict per line; ``sources.read_txt``'s keys, numbering and blank-line
    rule), and ("rejects", row) for lines that are not UTF-8. -> (tables and rejects, lines read)."""
    from pipelines.curate.sources import make_key, new_record, txt_lines

    path = split.path
    prefix = make_key("txt", path, "")  # + the line number, which make_key's character rule leaves as it is
    numbers, texts, n_read = [], [], 0
    for n, line in txt_lines(split):
        n_read += 1
        try:
            texts.append(line.decode("utf-8"))
        except UnicodeDecodeError:  # decode_or_reject counts it and makes the reject row
            yield "rejects", decode_or_reject(new_record("txt", path, n, line))[1]
            continue
        numbers.append(n)
        if len(texts) == batch:
            yield "table", _txt_table(prefix, path, numbers, texts)
            numbers, texts = [], []
    if texts:
        yield "table", _txt_table(prefix, path, numbers, texts)
    yield "read", n_read


def _txt_table(prefix: str, path: str, numbers: list[int], texts: list[str]) -> pa.Table:
    n = len(texts)
    ids = [str(k) for k in numbers]
    columns = {"key": pa.array([prefix + i for i in ids], pa.string()), "source": pa.array(["txt"] * n, pa.string()),
               "input": pa.array([path] * n, pa.string()), "source_id": pa.array(ids, pa.string())}
    return caption_table(columns, texts)


class ReadBatches(beam.DoFn):
    """Split -> Tables of up to ``batch`` normalised records (word and CLIP-token counts filled in);
    reader errors and undecodable captions to ``rejects``, as ``ReadRecords`` + ``NormaliseCaption``.
    A ``.txt`` split is read straight into columns (``txt_tables``). ``allocator``: the worker's
    ``core.allocator`` state, set once per worker."""

    def __init__(self, batch: int, allocator: str = "default"):
        self.batch, self.allocator = batch, allocator

    def setup(self):
        set_allocator(self.allocator)
        captions.clip_token_count("warm up")  # loads the BPE vocabulary once per worker

    def process(self, split):
        n_read = 0
        if split.format == "txt":
            for kind, value in txt_tables(split, self.batch):
                if kind == "table":
                    yield value
                elif kind == "rejects":
                    yield beam.pvalue.TaggedOutput("rejects", value)
                else:
                    n_read = value
        else:
            columns = _Columns()
            for record in read_split(split):
                n_read += 1
                text, rejected = decode_or_reject(record)
                if rejected is not None:
                    yield beam.pvalue.TaggedOutput("rejects", rejected)
                    continue
                columns.add(record, text)
                if len(columns) == self.batch:
                    yield columns.flush()
            if len(columns):
                yield columns.flush()
        _count("input", n_read)
        _count(f"input_{split.format}", n_read)


def _count_reasons(reason: pa.Array | pa.ChunkedArray, prefix: str) -> None:
    for item in pc.value_counts(reason.drop_null()).to_pylist():
        _count(f"{prefix}{item['values']}", item["counts"])


def _set_dropped(table: pa.Table, mask, stage: str, reason_col) -> pa.Table:
    """Rows where ``mask`` (and still active) get ``stage`` and the reason in ``reason_col``."""
    mask = pc.and_(pc.fill_null(mask, False), pc.is_null(table.column("reason")))
    stages = pc.if_else(mask, pa.scalar(stage), table.column("stage"))
    reason = pc.if_else(mask, reason_col, table.column("reason"))
    table = table.set_column(table.schema.get_field_index("stage"), "stage", stages)
    return table.set_column(table.schema.get_field_index("reason"), "reason", reason)


def apply_rules(table: pa.Table, cfg: CurateConfig) -> pa.Table:
    """Length, safety and size rules (``filters.captions.check_batch``) on a table of active rows."""
    found = captions.check_batch(table, cfg)
    _count_reasons(found, "filtered_")
    return _set_dropped(table, pc.is_valid(found), "rules", found)


def is_active_rows(table: pa.Table) -> pa.Array:
    return pc.is_null(table.column("reason"))


def active_count(table: pa.Table) -> int:
    """Rows still active: those without a reason (``is_active_rows``)."""
    return table.column("reason").null_count


def _bucket_rows(table: pa.Table, n_active: int):
    """Active rows -> (bucket, sub-table) per bucket met; bucket = crc32(caption) mod the bucket count
    (``n_active``: the active rows, or a bound on them, over ``EXACT_BUCKET_ROWS``)."""
    active = table.filter(is_active_rows(table))
    if active.num_rows == 0:
        return
    n_buckets = max(1, math.ceil(n_active / EXACT_BUCKET_ROWS))
    if n_buckets == 1:
        yield 0, active
        return
    bucket = np.fromiter((zlib.crc32(c.encode("utf-8")) % n_buckets for c in active.column("caption").to_pylist()),
                         np.int64, active.num_rows)
    order = np.argsort(bucket, kind="stable")
    bounds = np.flatnonzero(np.r_[True, bucket[order][1:] != bucket[order][:-1], True])
    for st, en in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        yield int(bucket[order[st]]), active.take(order[st:en])


def _inactive_rows(table: pa.Table):
    rest = table.filter(pc.invert(is_active_rows(table)))
    if rest.num_rows:
        yield rest


def resolve_exact_table(keyed) -> pa.Table:
    """(bucket, tables of active rows) -> one table: per caption the ``keep_priority`` winner kept
    (with ``n_duplicates``), the others ``exact_duplicate`` of it."""
    table = pa.concat_tables(list(keyed[1]))
    order = pc.sort_indices(table, sort_keys=[("caption", "ascending", "at_end"),
                                              ("laion_aesthetic", "descending", "at_end"),  # unknown ranks last
                                              ("key", "ascending", "at_end")])
    table = table.take(order)
    caption = table.column("caption").combine_chunks()
    n = table.num_rows
    first = np.ones(n, bool)
    if n > 1:
        first[1:] = pc.not_equal(caption[1:], caption[:-1]).to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(first)
    group = np.cumsum(first) - 1
    sizes = np.diff(np.r_[starts, n])
    winner = pc.take(table.column("key"), pa.array(starts[group]))
    dup = pa.array(~first)
    n_dups = np.zeros(n, np.int64)
    n_dups[starts] = sizes - 1
    _count(f"filtered_{reasons.EXACT_DUPLICATE}", int(n - len(starts)))
    table = _set_dropped(table, dup, "exact_dedup", pa.scalar(reasons.EXACT_DUPLICATE))
    table = table.set_column(table.schema.get_field_index("duplicate_of"), "duplicate_of",
                             pc.if_else(dup, winner, pa.nulls(n, pa.string())))
    return table.set_column(table.schema.get_field_index("n_duplicates"), "n_duplicates",
                            pa.array(n_dups, mask=~(first & (n_dups > 0))))


def split_row_bound(split) -> int:
    """At most about how many records ``split`` holds, without reading them: the exact-dedup bucket
    count comes from the sum, so the buckets can be cut where the tables are made. Parquet: the row
    group's rows (footer); ``.txt``/``.jsonl``: lines; COCO JSON: bytes / 32 (an annotation takes
    more); webdataset: bytes / 512 (a tar member's header). Only the buckets' size depends on it."""
    from apache_beam.io.filesystems import FileSystems

    if split.format == "laion":
        import pyarrow.parquet as pq

        with FileSystems.open(split.path) as f:
            return pq.ParquetFile(f).metadata.row_group(split.part).num_rows
    if split.format in ("txt", "jsonl"):
        with FileSystems.open(split.path) as f:
            return f.read().count(b"\n") + 1
    size = FileSystems.match([split.path])[0].metadata_list[0].size_in_bytes
    return size // (32 if split.format == "coco" else 512) + 1


class DropExactDuplicateRows(beam.PTransform):
    """Tables -> tables with exact duplicates (same normalised caption) marked, one kept per caption.

    ``n_rows``: a one-element PCollection bounding the records (``split_row_bound`` summed over the
    splits) that the bucket count comes from. Computed apart from the tables, it lets the bucketing
    run in the stage that makes them; without it the active rows are counted first, which holds
    every table at that stage boundary until the count is done."""

    def __init__(self, n_rows=None):
        super().__init__()
        self.n_rows = n_rows

    def expand(self, tables):
        n_active = self.n_rows
        if n_active is None:
            n_active = (tables
                        | "CountActive" >> beam.Map(active_count)
                        | "SumActive" >> beam.CombineGlobally(sum))
        inactive = tables | "SelectInactiveRows" >> beam.FlatMap(_inactive_rows).with_output_types(TABLE)
        resolved = (tables
                    | "BucketByCaption" >> beam.FlatMap(_bucket_rows, beam.pvalue.AsSingleton(n_active))
                    .with_output_types(KEYED_TABLES)
                    | "GroupByBucket" >> beam.GroupByKey()
                    | "KeepOnePerCaption" >> beam.Map(resolve_exact_table).with_output_types(TABLE))
        return (resolved, inactive) | "Rejoin" >> beam.Flatten()


def to_records(table: pa.Table):
    """A table's rows as the record dicts the per-record stages take."""
    for record in table.to_pylist():
        yield {**record, "error": None}


def manifest_table(table: pa.Table) -> pa.Table:
    """``MANIFEST_SCHEMA`` columns of a records table (no embeddings: ``has_image`` false), as
    ``manifest_row`` would give for each row."""
    n = table.num_rows
    reason = table.column("reason").combine_chunks()
    encoded = reason.dictionary_encode()
    fates = pa.array([reasons.fate_of(r) for r in encoded.dictionary.to_pylist()], pa.string())
    columns = {}
    for field in MANIFEST_SCHEMA:
        if field.name == "fate":
            columns["fate"] = pc.fill_null(pc.take(fates, encoded.indices), reasons.KEPT)
        elif field.name == "has_image":
            columns["has_image"] = pa.array(np.zeros(n, bool))
        elif field.name in table.schema.names:
            columns[field.name] = pc.cast(table.column(field.name), field.type, safe=False)  # int(): truncates
        else:
            columns[field.name] = pa.nulls(n, field.type)
    return pa.table(columns, schema=MANIFEST_SCHEMA)
