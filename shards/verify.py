"""Verifying a whole shard: size and sha256 against its index, every member's checksum, every array
finite, every json parseable and of a supported schema version, and the embedding sidecar.

    problems = verify_shard(out_dir, shard_index)   # [] when the shard is good
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tarfile

from core.fs import join, url_to_fs
from shards.reader import read_embeddings, read_index
from shards.record import (ARRAY_FIELDS, CHECKSUM_MISMATCH, CORRUPT_MEMBER, JSON, NON_FINITE, SUPPORTED_SCHEMA_VERSIONS,
                           load_npy, member_checksum)
from shards.schema import index_name, shard_name


def _stream_check(f, index: dict) -> tuple[str, list[str], list[str]]:
    """One pass over an open shard: (its sha256, its keys in order, problems with its members).

    Problems: a member whose checksum differs from the index, a member the index does not list or
    one it lists that is absent, an ``.npy`` member that does not parse, holds NaN/Inf or has another
    shape than the sample's json lists (``array_shapes``), a json member that does not parse, names
    another key or has an unsupported schema version, and a member that is no sample's regular file
    (an absolute path, a ``..`` or a folder in its name, a symlink, a hard link, a device).
    """
    import numpy as np

    digest = hashlib.sha256()

    class _Tee:  # hashes exactly the bytes tarfile reads, in order
        def read(self, n=-1):
            data = f.read(n)
            digest.update(data)
            return data

    sums = dict(zip(index["keys"], index["checksums"])) if index.get("checksums") is not None else None
    keys, seen, problems = [], {}, []
    listed: dict = {}  # the sample's json: array name -> shape

    def close_sample(key):
        if sums is not None and key in sums and set(sums[key]) != set(seen):
            problems.append(f"sample {key!r}: members {sorted(seen)}, index lists {sorted(sums[key])}")
        for name, shape in sorted(listed.items()):  # what the trainer would skip as corrupt_member
            ext = ARRAY_FIELDS.get(name, f"{name}.npy")
            if isinstance(seen.get(ext), tuple) and list(seen[ext]) != list(shape):
                problems.append(f"{CORRUPT_MEMBER}: sample {key!r} member {ext} has shape {list(seen[ext])}, "
                                f"its json lists {list(shape)}")

    with tarfile.open(fileobj=_Tee(), mode="r|") as tar:
        for member in tar:
            why = _not_a_sample_member(member)
            if why:  # never read or followed: reported, and no key of the shard
                problems.append(f"bad member {member.name!r}: {why} (a shard holds only regular files <key>.<ext>)")
                continue
            key, _, ext = member.name.partition(".")
            if not keys or keys[-1] != key:
                if keys:
                    close_sample(keys[-1])
                keys.append(key)
                seen, listed = {}, {}
            data = tar.extractfile(member).read()
            seen[ext] = True
            if sums is not None and sums.get(key, {}).get(ext) != member_checksum(data):
                problems.append(f"{CHECKSUM_MISMATCH}: sample {key!r} member {ext}")
            if ext == JSON:
                problems += _json_problems(key, data)
                with contextlib.suppress(ValueError, AttributeError):
                    listed = dict(json.loads(data).get("array_shapes") or {})
            if ext.endswith(".npy"):
                try:
                    array = load_npy(data)
                except ValueError as err:
                    problems.append(f"sample {key!r} member {ext} does not parse: {err}")
                    continue
                seen[ext] = tuple(array.shape)
                if array.dtype.kind in "fc" and not np.isfinite(array).all():
                    problems.append(f"{NON_FINITE}: sample {key!r} member {ext} holds NaN or Inf")
        if keys:
            close_sample(keys[-1])
    while chunk := f.read(1 << 20):  # what tarfile left unread (end-of-archive padding) is hashed too
        digest.update(chunk)
    return digest.hexdigest(), keys, problems


def _not_a_sample_member(member: tarfile.TarInfo) -> str | None:
    """Why a tar member cannot be a sample's member (None when it can): the writer stores regular
    files named ``<key>.<ext>`` only, so anything else was put there by something else."""
    name = member.name
    if name.startswith("/"):
        return "an absolute path"
    if "/" in name:
        return "a path with folders" if ".." not in name.split("/") else "a path with '..'"
    if member.issym() or member.islnk():
        return f"a {'symlink' if member.issym() else 'hard link'} to {member.linkname!r}"
    if not member.isfile():
        return "not a regular file"
    return None


def _json_problems(key: str, data: bytes) -> list[str]:
    try:
        meta = json.loads(data)
    except ValueError as err:
        return [f"sample {key!r} json does not parse: {err}"]
    if not isinstance(meta, dict) or meta.get("key") != key:
        return [f"sample {key!r} json names key {meta.get('key') if isinstance(meta, dict) else None!r}"]
    if meta.get("schema_version") not in SUPPORTED_SCHEMA_VERSIONS:
        return [f"sample {key!r} json has schema_version {meta.get('schema_version')!r}"]
    return []


def verify_shard(out_dir: str, shard_index: int, *, check_hash: bool = True, recipe_hash: str | None = None) -> list[str]:
    """Problems found with shard ``shard_index`` against its index; empty means complete and intact.

    Checks the tar's size and (``check_hash``) its sha256, keys, every member's checksum and that
    every array member is finite, and the embedding sidecar of a scored shard.
    """
    try:
        index = read_index(out_dir, shard_index)
    except FileNotFoundError:
        return [f"{index_name(shard_index)} missing"]
    except ValueError as err:  # UserError included: an invalid or unsupported index
        return [f"{index_name(shard_index)} unreadable: {err}"]
    name = shard_name(shard_index)
    fs, path = url_to_fs(join(out_dir, name))
    if not fs.exists(path):
        return [f"{name} missing"]
    problems = []
    if recipe_hash is not None and index.get("recipe_hash") != recipe_hash:
        problems.append(f"{name} was made with recipe {index.get('recipe_hash')}, expected {recipe_hash}")
    size = fs.size(path)
    if size != index.get("bytes"):
        problems.append(f"{name} has {size} bytes, index says {index.get('bytes')}")
    elif check_hash:
        try:
            with fs.open(path, "rb") as f:
                sha, keys, member_problems = _stream_check(f, index)
        except (tarfile.TarError, EOFError, OSError) as err:  # cut short, garbled
            return problems + [f"{name} is not a readable tar: {type(err).__name__}: {err}"]
        if sha != index.get("sha256"):
            problems.append(f"{name} sha256 {sha[:12]}... differs from index {str(index.get('sha256'))[:12]}...")
        if keys != index.get("keys"):
            problems.append(f"{name} holds keys that differ from its index")
        problems += [f"{name}: {p}" for p in member_problems]
    return problems + _embedding_problems(out_dir, shard_index, index, check_hash)


def _embedding_problems(out_dir: str, shard_index: int, index: dict, check_hash: bool) -> list[str]:
    entry = index.get("embeddings")
    if not entry:
        return []
    if not check_hash:
        fs, path = url_to_fs(join(out_dir, entry["file"]))
        return [] if fs.exists(path) else [f"{entry['file']} missing"]
    import numpy as np

    try:
        embeds = read_embeddings(out_dir, shard_index, index)
    except ValueError as err:
        return [str(err)]
    bad = np.flatnonzero(~np.isfinite(embeds).all(axis=1)) if embeds.ndim == 2 else []
    if len(bad):  # the filter rejects these samples (non_finite_score); here the shard is bad
        keys = [index["keys"][i] for i in bad[:5] if i < len(index["keys"])]
        return [f"{NON_FINITE}: {entry['file']} row(s) {bad[:5].tolist()} (sample(s) {keys}) hold NaN or Inf"]
    return []
