"""Shard I/O: a deterministic, atomic WebDataset tar writer, its index, and verification.

A shard is ``NNNNNN.tar`` plus its index ``NNNNNN.json`` (keys, count, bytes, sha256, schema
version, recipe hash, bytes per field). The writer streams the tar to a temporary name and renames
it into place only when complete, then writes the index the same way, so a reader never sees a
partial shard under a final name and "index present and matching" means "shard complete".

Tar headers are fixed (mtime 0, uid/gid 0, no user names, mode 0644, POSIX pax format) and members
are written in the order given, so the same samples always give byte-identical shards. Stock
``tar`` and ``webdataset`` read them without this project's code.

Paths may be local or any fsspec URL (``gs://...``): remote shards are written to a local
temporary file and uploaded whole (object stores make an object visible only when complete).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import tempfile
import uuid

from teachers.record import SCHEMA_VERSION, field_of

TAR_MTIME = 0  # fixed header time: re-running a shard must give the same bytes
_SHARD_RE = re.compile(r"^(\d{6})\.json$")


def shard_name(index: int) -> str:
    return f"{index:06d}.tar"


def index_name(index: int) -> str:
    return f"{index:06d}.json"


def _fs(path: str):
    import fsspec

    return fsspec.core.url_to_fs(path)


def is_local(fs) -> bool:
    """True for fsspec's local filesystem (whose ``protocol`` is a tuple such as ``("file", "local")``)."""
    return "file" in fs.protocol


def join(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name if "://" in root else os.path.join(root, name)


class _HashingFile(io.RawIOBase):
    """Write-through file wrapper that counts bytes and computes sha256 as the tar streams."""

    def __init__(self, f):
        self._f, self.sha256, self.size = f, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self._f.write(b)
        self.sha256.update(b)
        self.size += len(b)
        return len(b)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary name and a rename (local) or a whole upload."""
    fs, fpath = _fs(path)
    if is_local(fs):
        tmp = f"{fpath}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, fpath)
    else:
        fs.pipe_file(fpath, data)


def atomic_write_json(path: str, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode("utf-8"))


class ShardWriter:
    """Writes one whole shard. Use as a context manager; an exception aborts and removes the temp.

        with ShardWriter(out_dir, 7, recipe_hash=h) as w:
            for sample in samples:
                w.write(sample)
        w.index  # the index written beside the shard
    """

    def __init__(self, out_dir: str, shard_index: int, *, recipe_hash: str, extra: dict | None = None):
        self.out_dir, self.shard_index, self.recipe_hash = out_dir, shard_index, recipe_hash
        self.extra = dict(extra or {})
        fs, root = _fs(out_dir)
        self._local = is_local(fs)
        if self._local:
            os.makedirs(root, exist_ok=True)
            self._tmp = os.path.join(root, f".{shard_name(shard_index)}.tmp-{uuid.uuid4().hex}")
        else:
            fd, self._tmp = tempfile.mkstemp(suffix=".tar")
            os.close(fd)
        self._file = open(self._tmp, "wb")
        self._hash = _HashingFile(self._file)
        self._tar = tarfile.open(fileobj=self._hash, mode="w|", format=tarfile.PAX_FORMAT)
        self.keys: list[str] = []
        self.field_bytes: dict[str, int] = {}
        self.index: dict | None = None

    def write(self, sample: dict[str, bytes]) -> None:
        key = sample["__key__"]
        if key in self.keys:
            raise ValueError(f"duplicate key {key!r} in shard {self.shard_index}")
        for ext, data in sample.items():
            if ext.startswith("__"):
                continue
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
            self.field_bytes[field_of(ext)] = self.field_bytes.get(field_of(ext), 0) + len(data)
        self.keys.append(key)

    def commit(self) -> dict:
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        final = join(self.out_dir, shard_name(self.shard_index))
        if self._local:
            os.replace(self._tmp, _fs(final)[1])
        else:
            fs, fpath = _fs(final)
            fs.put_file(self._tmp, fpath)
            os.remove(self._tmp)
        self.index = dict(self.extra, shard=shard_name(self.shard_index), count=len(self.keys), keys=self.keys,
                          bytes=self._hash.size, sha256=self._hash.sha256.hexdigest(), field_bytes=self.field_bytes,
                          schema_version=SCHEMA_VERSION, recipe_hash=self.recipe_hash)
        atomic_write_json(join(self.out_dir, index_name(self.shard_index)), self.index)
        return self.index

    def abort(self) -> None:
        # Mark the tar stream closed without flushing: its end blocks must not go to a file we discard.
        self._tar.closed = True
        self._tar.fileobj.closed = True
        try:
            self._file.close()
        finally:
            if os.path.exists(self._tmp):
                os.remove(self._tmp)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def list_indexes(out_dir: str) -> list[int]:
    """Shard numbers that have an index in ``out_dir``, ascending."""
    fs, root = _fs(out_dir)
    if not fs.exists(root):
        return []
    names = [os.path.basename(p.rstrip("/")) for p in fs.ls(root, detail=False)]
    return sorted(int(m.group(1)) for m in map(_SHARD_RE.match, names) if m)


def read_index(out_dir: str, shard_index: int) -> dict:
    fs, path = _fs(join(out_dir, index_name(shard_index)))
    with fs.open(path, "rb") as f:
        return json.loads(f.read())


def _sha256_of(out_dir: str, name: str) -> tuple[str, int, list[str]]:
    fs, path = _fs(join(out_dir, name))
    digest, size = hashlib.sha256(), 0
    with fs.open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        keys = []
        for member in tar:
            key = member.name.split(".", 1)[0]
            if not keys or keys[-1] != key:
                keys.append(key)
    return digest.hexdigest(), size, keys


def verify_shard(out_dir: str, shard_index: int, *, check_hash: bool = True, recipe_hash: str | None = None) -> list[str]:
    """Problems found with shard ``shard_index`` against its index; empty means complete and intact."""
    try:
        index = read_index(out_dir, shard_index)
    except FileNotFoundError:
        return [f"{index_name(shard_index)} missing"]
    except ValueError as err:
        return [f"{index_name(shard_index)} unreadable: {err}"]
    name = shard_name(shard_index)
    fs, path = _fs(join(out_dir, name))
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
            sha, _, keys = _sha256_of(out_dir, name)
        except tarfile.TarError as err:
            return problems + [f"{name} is not a readable tar: {err}"]
        if sha != index.get("sha256"):
            problems.append(f"{name} sha256 {sha[:12]}... differs from index {str(index.get('sha256'))[:12]}...")
        if keys != index.get("keys"):
            problems.append(f"{name} holds keys that differ from its index")
    return problems
