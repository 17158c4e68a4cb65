"""Sinks of the curate job: atomic single-file Parquet (manifest, rejects) and sharded embeddings.

Every file is written under a temporary name in its final folder and renamed into place when
complete (Beam ``FileSystems``, so ``gs://`` works too): a reader never sees half a manifest.
"""

from __future__ import annotations

import hashlib
import io
import uuid

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from pipelines.records import EMBEDDING_FIELDS


def atomic_write(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary sibling and a rename."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with FileSystems.create(tmp) as f:
        f.write(data)
    # Local rename (os.rename) replaces the old file atomically; object stores' rename is a copy
    # that may refuse an existing target, so there the old file goes first.
    if FileSystems.get_scheme(path) not in (None, "file") and FileSystems.exists(path):
        FileSystems.delete([path])
    FileSystems.rename([tmp], [path])


def _key(row: dict) -> str:
    return row["key"]


def write_sorted_parquet(rows: list[dict], path: str, schema: pa.Schema) -> int:
    """All ``rows`` sorted by key into one Parquet file at ``path`` (atomically); returns the count."""
    table = pa.Table.from_pylist(sorted(rows, key=_key), schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=65_536)
    atomic_write(path, buf.getvalue())
    return table.num_rows


def write_sorted_tables(tables: list[pa.Table], path: str, schema: pa.Schema) -> int:
    """``write_sorted_parquet`` for rows that come as pyarrow tables (the batched caption stages)."""
    table = pa.concat_tables(tables).sort_by("key") if tables else schema.empty_table()
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=65_536)
    atomic_write(path, buf.getvalue())
    return table.num_rows


PART_MARK = ".tmp-part-"  # a temporary (core.fs.TMP_MARK): a killed run's parts go with the launcher's clean-up


def part_path(path: str, table: pa.Table) -> str:
    """Where ``table``'s rows wait for the final write of ``path``: named after the table's first key, so
    a retried bundle rewrites the same part (keys are unique, and every row is in exactly one table)."""
    first = table.column("key")[0].as_py() or ""
    return f"{path}{PART_MARK}{hashlib.sha1(first.encode('utf-8')).hexdigest()[:20]}"


def write_part(table: pa.Table, path: str, schema: pa.Schema):
    """A table of ``path``'s rows as an uncompressed Arrow IPC file beside it; yields its name (none
    for an empty table). Written where the table is made, so the rows never cross a stage boundary."""
    if table.num_rows == 0:
        return
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, schema) as writer:
        writer.write_table(table.cast(schema) if table.schema != schema else table)
    name = part_path(path, table)
    atomic_write(name, sink.getvalue().to_pybytes())
    yield name


def merge_parts(parts: list[str], path: str, schema: pa.Schema) -> int:
    """The parts' rows sorted by key into ``path`` (``write_sorted_tables``), then the parts removed."""
    parts = sorted(set(parts))  # a retried bundle names its part again
    tables = []
    for name in parts:
        with FileSystems.open(name) as f:
            tables.append(pa.ipc.open_file(pa.py_buffer(f.read())).read_all())
    n = write_sorted_tables(tables, path, schema)
    if parts:
        FileSystems.delete(parts)
    return n


class WriteSortedParquet(beam.PTransform):
    """One Parquet file sorted by ``key``: the rows are gathered in one worker (no embeddings in
    them: a few hundred bytes each), so the teacher dump's deterministic sharding sees the same
    order on every run. With ``tables`` (elements are pyarrow tables of rows) each table is written
    as a part file where it is made and only the parts' names are gathered: the rows cross no
    stage boundary on their way to the file."""

    def __init__(self, path: str, schema: pa.Schema, *, tables: bool = False):
        super().__init__()
        self.path = path
        self.schema = schema
        self.tables = tables  # elements are pyarrow tables of rows, not row dicts

    def expand(self, rows):
        if self.tables:
            return (rows
                    | "WriteParts" >> beam.FlatMap(write_part, self.path, self.schema)
                    | "GatherParts" >> beam.combiners.ToList()
                    | "WriteFile" >> beam.Map(merge_parts, self.path, self.schema))
        return (rows
                | "Gather" >> beam.combiners.ToList()
                | "WriteFile" >> beam.Map(write_sorted_parquet, self.path, self.schema))


def _embedding_row(record: dict, field: str):
    vector = record.get(field)
    if vector is not None:
        yield {"key": record["key"], "embedding": [float(v) for v in vector]}


def embeddings_prefix(output_dir: str, modality: str) -> str:
    return FileSystems.join(output_dir, "embeddings", modality)


EMBEDDINGS_SCHEMA = pa.schema([("key", pa.string()), ("embedding", pa.list_(pa.float32()))])


class WriteEmbeddings(beam.PTransform):
    """``OUTPUT/embeddings/{text,image}-SSSSS-of-NNNNN.parquet``: (key, L2-normalised embedding).

    Sharded by Beam (its file sink writes to a temporary folder and renames on finalisation), so
    no worker holds all embeddings. Later jobs (dedup of dumps, retrieval) reuse them.
    """

    def __init__(self, output_dir: str):
        super().__init__()
        self.output_dir = output_dir

    def expand(self, records):
        for modality, field in EMBEDDING_FIELDS.items():
            (records
             | f"Select{modality.title()}" >> beam.FlatMap(_embedding_row, field)
             | f"Write{modality.title()}" >> beam.io.WriteToParquet(
                 embeddings_prefix(self.output_dir, modality), EMBEDDINGS_SCHEMA, file_name_suffix=".parquet"))
        return records
