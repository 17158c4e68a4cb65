"""Reading shards: the index files present, one shard's index, its embedding sidecar, and samples by
key with ranged reads (``read_samples``), each member checked against the index's checksum before use.

A shard is ``NNNNNN.tar`` plus its index ``NNNNNN.json`` (``shards.schema.ShardIndex``); ``shards.writer``
writes both, ``shards.verify`` checks a whole shard, ``shards.loader`` streams them to a trainer.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile

from core.fs import join, url_to_fs
from shards.record import BadRecord, verify_members
from shards.schema import ShardIndex, index_name, shard_name


_SHARD_RE = re.compile(r"^(\d{6})\.json$")


def list_indexes(out_dir: str) -> list[int]:
    """Shard numbers that have an index in ``out_dir``, ascending."""
    fs, root = url_to_fs(out_dir)
    if not fs.exists(root):
        return []
    names = [os.path.basename(p.rstrip("/")) for p in fs.ls(root, detail=False)]
    return sorted(int(m.group(1)) for m in map(_SHARD_RE.match, names) if m)


def read_index(out_dir: str, shard_index: int) -> dict:
    """The index of shard ``shard_index`` as a dict (``ShardIndex.to_dict``), validated: a
    ``UserError`` names the file and the bad field or unsupported ``schema_version``;
    ``FileNotFoundError`` when it is absent."""
    return ShardIndex.read(out_dir, shard_index).to_dict()


def read_embeddings(out_dir: str, shard_index: int, index: dict):
    """The ``(count, dim)`` float32 embeddings of a scored shard, checked against its index.

    ``ValueError`` when the sidecar is missing, or its sha256 or shape differs from the index.
    """
    import numpy as np

    from shards.record import load_npy

    entry = index.get("embeddings")
    if not entry:
        raise ValueError(f"{index_name(shard_index)} lists no embeddings (the shard was not scored)")
    fs, path = url_to_fs(join(out_dir, entry["file"]))
    try:
        with fs.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ValueError(f"{entry['file']} missing") from None
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ValueError(f"{entry['file']} sha256 differs from its index")
    array = load_npy(data)
    if list(array.shape) != entry["shape"] or array.shape[0] != index["count"]:
        raise ValueError(f"{entry['file']} has shape {list(array.shape)}, index says {entry['shape']}")
    return array.astype(np.float32, copy=False)


def sample_members(src, key: str, start: int, end: int) -> list[tuple[str, int, int]]:
    """The members of sample ``key`` in bytes [start, end) of an open shard: (ext, data offset, size).

    Reads the 512-byte headers only (data is skipped by seeking), so a copy can be checked before
    anything is written. ``ValueError`` naming the problem for a header that is not a plain regular
    member ``<key>.<ext>`` (a corrupt range, or pax/long-name headers: ``read_samples`` parses those)
    or members that do not end exactly at ``end``.
    """
    src.seek(end - 1)
    if end <= start or len(src.read(1)) != 1:
        raise ValueError(f"the shard ends before byte {end}, inside sample {key!r}")
    members, pos = [], start
    while pos < end:
        src.seek(pos)
        header = src.read(tarfile.BLOCKSIZE)
        if len(header) < tarfile.BLOCKSIZE:
            raise ValueError(f"the shard ends at byte {pos + len(header)}, inside sample {key!r}")
        try:
            info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
        except tarfile.TarError as err:
            raise ValueError(f"unreadable tar header at byte {pos}: {err}") from None
        name_key, _, ext = info.name.partition(".")
        if info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE) or name_key != key or not ext:
            raise ValueError(f"member {info.name!r} at byte {pos} is not a regular member of sample {key!r}")
        members.append((ext, pos + tarfile.BLOCKSIZE, info.size))
        pos += tarfile.BLOCKSIZE + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    if pos != end or not members:
        raise ValueError(f"the members of sample {key!r} do not end at byte {end}")
    return members


def _parse_sample(key: str, raw: bytes) -> dict[str, bytes]:
    """The members of one sample from the tar bytes of its range -> ``{"__key__", ext: bytes}``.

    ``ValueError`` naming the problem when a member is not ``<key>.<ext>``, not a regular file, or
    cut short (a truncated or overwritten shard).
    """
    sample: dict[str, bytes] = {"__key__": key}
    try:
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
            for member in tar:
                name_key, _, ext = member.name.partition(".")
                if name_key != key or not ext or not member.isfile():
                    raise ValueError(f"member {member.name!r} does not belong to sample {key!r}")
                data = raw[member.offset_data : member.offset_data + member.size]
                if len(data) != member.size:
                    raise ValueError(f"member {member.name!r} is cut short")
                sample[ext] = data
    except tarfile.TarError as err:
        raise ValueError(f"unreadable tar data: {err}") from None
    if len(sample) == 1:
        raise ValueError(f"no members for sample {key!r}")
    return sample


def _runs(wanted: list[tuple[str, list[int]]], max_bytes: int):
    """Group (key, [start, end)) sorted by start into runs of adjacent ranges read with one request."""
    run: list = []
    for key, (start, end) in sorted(wanted, key=lambda w: w[1][0]):
        if run and (start != run[-1][1][1] or end - run[0][1][0] > max_bytes):
            yield run
            run = []
        run.append((key, (start, end)))
    if run:
        yield run


def read_samples(out_dir: str, shard_index: int, wanted: list[tuple[str, list[int] | None]], *,
                 max_read: int = 64 << 20, index: dict | None = None):
    """Read whole samples by key from one shard -> yields ``(key, sample or None, problem or None)``.

    ``wanted``: (key, its ``[start, end)`` from the index's ``offsets``, or None to scan the tar).
    Adjacent ranges are fetched with one ranged read (at most ``max_read`` bytes), so copying a run
    of kept samples reads the shard sequentially; nothing outside the wanted ranges is read. Member
    bytes come back unchanged, checked against the index's checksums (``index``, or the shard's
    index read here): a sample that cannot be read or does not match yields its problem instead of
    raising, ``"<reason>: <detail>"`` with the reason code first (``checksum_mismatch``, ...).
    """
    if index is None:
        index = read_index(out_dir, shard_index)
    sums = dict(zip(index["keys"], index["checksums"])) if index.get("checksums") is not None else {}
    for key, sample, problem in _read_samples(out_dir, shard_index, wanted, max_read):
        if sample is not None:
            try:
                verify_members(sums.get(key) if sums else None, sample)
            except BadRecord as err:
                sample, problem = None, f"{err} (in {shard_name(shard_index)})"  # the reason code first
        yield key, sample, problem


def _read_samples(out_dir: str, shard_index: int, wanted, max_read: int):
    fs, path = url_to_fs(join(out_dir, shard_name(shard_index)))
    ranged = [(k, o) for k, o in wanted if o is not None]
    scan = {k for k, o in wanted if o is None}
    with fs.open(path, "rb") as f:
        for run in _runs(ranged, max_read):
            f.seek(run[0][1][0])
            block = f.read(run[-1][1][1] - run[0][1][0])
            base = run[0][1][0]
            for key, (start, end) in run:
                raw = block[start - base : end - base]
                try:
                    if len(raw) != end - start:
                        raise ValueError(f"{shard_name(shard_index)} ends before byte {end}")
                    yield key, _parse_sample(key, raw), None
                except ValueError as err:
                    yield key, None, str(err)
        if scan:
            yield from _scan_samples(f, shard_index, scan)


def _scan_samples(f, shard_index: int, keys: set[str]):
    """Fallback for shards indexed without byte ranges: stream the tar and yield the wanted samples
    in tar order as each one completes; keys not found (or after a tar error) come last."""
    f.seek(0)
    done: set[str] = set()
    current: dict[str, bytes] | None = None
    problem = None
    try:
        with tarfile.open(fileobj=f, mode="r|") as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                if current is not None and key != current["__key__"]:
                    done.add(current["__key__"])
                    yield current["__key__"], current, None
                    current = None
                if key in keys and key not in done and member.isfile():
                    current = current or {"__key__": key}
                    current[ext] = tar.extractfile(member).read()
    except tarfile.TarError as err:
        problem, current = f"{shard_name(shard_index)} is not a readable tar: {err}", None
    if current is not None:
        done.add(current["__key__"])
        yield current["__key__"], current, None
    for key in sorted(keys - done):
        yield key, None, problem or f"sample {key!r} not found in {shard_name(shard_index)}"
