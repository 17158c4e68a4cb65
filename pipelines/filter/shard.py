"""Writing one output shard of the filter job (the body of its Beam work unit, free of Beam).

The worker reads its rows from the plan (``pipelines.filter.plan``) and copies each kept sample
from the parent's shard by its byte range (``offsets`` in the parent's index): the tar headers of
the range are checked first (``shards.reader.sample_members``: 512 bytes each, data skipped),
then the member data is streamed in 1 MiB chunks through the same deterministic, atomic
``ShardWriter`` as the dump. Member bytes are copied unchanged, never decoded or re-encoded, and
never held whole in memory; kept samples are adjacent in the parent, so the reads are sequential.
The scores and embeddings go along into the new index and sidecar, so the output can be
inspected, trained on, or filtered again like a dump. Ranges the fast path cannot stream (pax
headers for very long keys, indexes without ranges) are read whole and parsed by
``shards.reader.read_samples``.
Every sample's members are checked against the parent index's per-member CRC-32 before a byte is
written (``ShardWriter.copy_members(checksums=...)``; the index is read once per input shard). A
sample whose members differ (``checksum_mismatch``), are missing (``missing_member``) or cannot be
read (``corrupt_member``: a truncated or overwritten parent shard) is left out and reported in the
index's ``copy_rejects``; the job counts it as rejected at stage ``copy``, with its reason.
"""

from __future__ import annotations

import itertools
import json

from filters import reasons
from pipelines.common import work_unit
from core.fs import url_to_fs
from shards.record import JSON, BadRecord
from shards.schema import ShardIndex
from shards.writer import ShardWriter
from core.fs import join
from shards.reader import read_embeddings, read_samples, sample_members
from shards.schema import shard_name


def _check_json(key: str, data: bytes) -> None:
    """The json member must parse and name the key: a cheap guard against a shard overwritten in place."""
    try:
        meta = json.loads(data)
    except ValueError as err:
        raise ValueError(f"json member unreadable: {err}") from None
    if meta.get("key") != key:
        raise ValueError(f"json member names key {meta.get('key')!r}")


def _stream_one(src, row: dict, writer: ShardWriter, scores: dict, embedding, checksums: dict | None) -> None:
    """The fast path: check the sample's headers and json, then stream its member data across,
    checked against ``checksums`` (the parent index's entry for the key) before anything is written.

    ``BadRecord`` (``checksum_mismatch``, ``missing_member``) when the members differ from the index;
    ``ValueError`` (nothing written yet) when the range cannot be copied this way.
    """
    members = sample_members(src, row["key"], row["start"], row["end"])
    for ext, offset, size in members:
        if ext == JSON:
            src.seek(offset)
            _check_json(row["key"], src.read(size))
    writer.copy_members(src, row["key"], members, scores=scores, embedding=embedding, checksums=checksums)


def _read_one(parent: str, input_shard: int, rows: list[dict], index: dict):
    """The general path (indexes without byte ranges, pax headers): whole samples parsed in memory,
    their members checked against ``index``'s checksums by ``read_samples``."""
    wanted = [(r["key"], None if r["start"] is None else [r["start"], r["end"]]) for r in rows]
    for key, sample, problem in read_samples(parent, input_shard, wanted, index=index):
        if sample is not None:
            try:
                _check_json(key, bytes(sample.get(JSON, b"")))
            except ValueError as err:
                sample, problem = None, str(err)
        yield key, sample, problem


def _copy_from(parent: str, input_shard: int, rows: list[dict], writer: ShardWriter) -> list[dict]:
    """Append the samples of ``rows`` (one parent shard, in position order); returns the copy rejects."""
    try:
        index = ShardIndex.read(parent, input_shard)  # once per input shard: its checksums guard every copy
        embeds = read_embeddings(parent, input_shard, index.to_dict())
    except (ValueError, FileNotFoundError) as err:  # changed since ReadScores checked it
        return [{"key": r["key"], "reason": reasons.CORRUPT_EMBEDDINGS, "detail": str(err)} for r in rows]
    light = {r["key"]: ({"aesthetic_score": r["aesthetic_score"], "clip_score": r["clip_score"]},
                        embeds[r["input_position"]]) for r in rows}
    rejects = []
    fs, path = url_to_fs(join(parent, shard_name(input_shard)))
    try:
        src = fs.open(path, "rb")
    except FileNotFoundError:  # removed since ReadScores found it
        return [{"key": r["key"], "reason": reasons.UNREADABLE_SHARD, "detail": f"{shard_name(input_shard)} is missing"}
                for r in rows]
    with src:
        for row in rows:
            if row["start"] is None:
                continue
            try:
                _stream_one(src, row, writer, *light[row["key"]], index.member_checksums(row["key"]))
            except BadRecord as err:  # members differ from the parent's index: a counted rejection, never a copy
                rejects.append({"key": row["key"], "reason": err.reason, "detail": f"{shard_name(input_shard)}: {err}"})
            except ValueError:  # not streamable (pax headers, damage): read it whole, or learn why not
                rejects += _copy_slow(parent, input_shard, [row], writer, light, index)
    unranged = [r for r in rows if r["start"] is None]  # indexes written before byte ranges existed
    return rejects + _copy_slow(parent, input_shard, unranged, writer, light, index)


def reason_of(problem: str) -> str:
    """The reason code that starts a ``read_samples`` problem (``"checksum_mismatch: sample ..."``),
    else ``corrupt_member`` (a range that does not parse, a shard cut short)."""
    code = problem.split(": ", 1)[0]
    return code if code in reasons.REJECT_REASONS else reasons.CORRUPT_MEMBER


def _copy_slow(parent: str, input_shard: int, rows: list[dict], writer: ShardWriter, light: dict,
               index: ShardIndex) -> list[dict]:
    rejects = []
    for key, sample, problem in _read_one(parent, input_shard, rows, index.to_dict()) if rows else ():
        if sample is None:
            rejects.append({"key": key, "reason": reason_of(problem),
                            "detail": f"{shard_name(input_shard)}: {problem}"})
        else:
            writer.write(sample, scores=light[key][0], embedding=light[key][1])
    return rejects


def copy_shard(parent: str, output: str, shard: int, recipe_hash: str, *, progress=None) -> dict:
    """Write output shard ``shard`` from the plan; returns its index (with ``copy_rejects``). ``progress``:
    the run's overall counter (``pipelines.common.shard_progress``) or None."""
    rejects = []
    with work_unit(output, shard, progress) as (rows, bar):
        with ShardWriter(output, shard, recipe_hash=recipe_hash) as writer:
            for input_shard, group in itertools.groupby(rows, key=lambda r: r["input_shard"]):
                group = list(group)
                rejects += _copy_from(parent, input_shard, group, writer)
                if bar is not None:
                    bar.update(len(group))
            writer.extra = {"copy_rejects": rejects,
                            "input_shards": sorted({r["input_shard"] for r in rows})}
    return writer.index
