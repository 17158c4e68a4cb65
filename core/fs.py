"""The one filesystem layer: every reader and writer in the project (shards, indexes, dataset.json,
manifests, checkpoints, exports) goes through these helpers, so a local path and any fsspec URL
(``gs://``, ``s3://``, ``memory://``) work the same everywhere.

Object stores need an optional extra (``pyproject.toml``): ``gs://`` the ``gcp`` one (gcsfs),
``s3://`` the ``aws`` one (s3fs). Without it a URL of that kind is one line naming the extra
(``UserError``), not fsspec's ImportError from wherever the path is first used.

Writes are atomic: a local file is written to a temporary name beside its destination, fsynced and
renamed into place; a remote object is uploaded whole (object stores make an object visible only
when complete). Temporaries are named ``<name>.tmp-<uuid>`` so that ``remove_temporaries`` can find
every kind a killed writer leaves behind.
"""

from __future__ import annotations

import json
import os
import uuid

TMP_MARK = ".tmp-"  # every temporary name made here contains this


# URL scheme -> (the optional extra that brings it, the package fsspec opens it with, the module Beam's
# own filesystem for it needs: the curate job writes through Beam's FileSystems)
REMOTE_EXTRAS = {
    "gs": ("gcp", "gcsfs", "google.cloud.storage"),
    "gcs": ("gcp", "gcsfs", "google.cloud.storage"),
    "s3": ("aws", "s3fs", "boto3"),
    "s3a": ("aws", "s3fs", "boto3"),
}


def scheme_of(path: str) -> str:
    """``gs`` for ``gs://b/x``; ``""`` for a local path."""
    head, sep, _ = str(path).partition("://")
    return head.lower() if sep else ""


def missing_extra(path: str, package: str):
    """The ``UserError`` for a URL whose filesystem package is not installed, naming the extra."""
    from core.errors import UserError

    scheme = scheme_of(path)
    extra = REMOTE_EXTRAS.get(scheme, (None,))[0]
    fix = f"pip install 'diffusion-distill[{extra}]'" if extra else f"pip install {package}"
    return UserError(f"{path!r}: {scheme}:// paths need {package}, which is not installed here: {fix}")


def url_to_fs(path: str):
    """``(filesystem, path within it)`` for a local path or an fsspec URL; a URL whose filesystem
    package is missing (``gs://`` without gcsfs) is a ``UserError`` naming the extra to install."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(path)
    except ImportError as err:  # fsspec imports a protocol's package on its first use
        scheme = scheme_of(path)
        package = REMOTE_EXTRAS[scheme][1] if scheme in REMOTE_EXTRAS else (err.name or str(err))
        raise missing_extra(path, package) from None


def check_beam_filesystem(path: str) -> str:
    """A URL that Beam's own ``FileSystems`` will open (the curate job's outputs): its module must
    import (``gs://``: Beam's GCS client, ``s3://``: boto3), else the same one-line ``UserError``."""
    import importlib

    scheme = scheme_of(path)
    if scheme in REMOTE_EXTRAS:
        module = REMOTE_EXTRAS[scheme][2]
        try:
            importlib.import_module(module)
        except ImportError:
            raise missing_extra(path, module) from None
    return path


def is_local(fs) -> bool:
    """True for fsspec's local filesystem (whose ``protocol`` is a tuple such as ``("file", "local")``)."""
    return "file" in fs.protocol


def join(root: str, name: str) -> str:
    """``root/name`` for a local path or a URL (URLs always take ``/``)."""
    return root.rstrip("/") + "/" + name if "://" in root else os.path.join(root, name)


def tmp_name(path: str) -> str:
    return f"{path}{TMP_MARK}{uuid.uuid4().hex}"


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary name and a rename (local) or a whole upload."""
    fs, fpath = url_to_fs(path)
    if is_local(fs):
        tmp = tmp_name(fpath)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, fpath)
    else:
        fs.pipe_file(fpath, data)


def atomic_write_json(path: str, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode("utf-8"))


def read_bytes(path: str) -> bytes:
    fs, fpath = url_to_fs(path)
    with fs.open(fpath, "rb") as f:
        return f.read()


def read_json(path: str):
    return json.loads(read_bytes(path))


def exists(path: str) -> bool:
    fs, fpath = url_to_fs(path)
    return fs.exists(fpath)


def publish_folder(built: str, dest: str, marker: str) -> None:
    """Put the complete local folder ``built`` at ``dest`` (a local path or a URL), replacing what is there.

    Local: renamed into place; a folder already at ``dest`` is first moved aside (``<dest>.old-<uuid>``:
    not a temporary name, so ``remove_temporaries`` never deletes it in the moment before the swap) and
    removed after. URL: what is there is removed, then every file uploaded, ``marker`` last (its presence
    says the folder is complete); ``built`` stays for the caller to delete."""
    import shutil

    fs, fpath = url_to_fs(dest)
    if is_local(fs):
        old = None
        if os.path.exists(fpath):
            old = f"{fpath}.old-{uuid.uuid4().hex}"
            os.replace(fpath, old)
        os.replace(built, fpath)
        if old:
            shutil.rmtree(old)
        return
    if fs.exists(fpath):
        fs.rm(fpath, recursive=True)
    files = sorted(os.path.relpath(os.path.join(d, f), built) for d, _, names in os.walk(built) for f in names)
    for rel in sorted(files, key=lambda r: r == marker):
        with open(os.path.join(built, rel), "rb") as f:
            atomic_write_bytes(join(dest, rel.replace(os.sep, "/")), f.read())


OLD_MARK = ".old-"  # publish_folder's moved-aside folder: <dest>.old-<32 hex>


def _old_of(name: str) -> str | None:
    """The destination name of a ``publish_folder`` leftover ``<dest>.old-<uuid hex>`` (else None)."""
    dest, mark, tail = name.rpartition(OLD_MARK)
    return dest if mark and dest and len(tail) == 32 and all(c in "0123456789abcdef" for c in tail) else None


def _remove(full: str) -> bool:
    import shutil

    try:
        if os.path.isdir(full) and not os.path.islink(full):
            shutil.rmtree(full)
        else:
            os.remove(full)
    except FileNotFoundError:  # another cleaner got there first
        return False
    return True


def remove_temporaries(root: str, prefix: str = "", *, recursive: bool = False) -> list[str]:
    """Delete the temporaries (``<name>.tmp-<uuid>``: files, or folders such as a checkpoint's) that
    killed writers left in folder ``root``, those whose name starts with ``prefix``; returns the names
    removed (paths relative to ``root``). ``recursive``: in every folder under ``root`` too (``_plan/``,
    ``rejects/``, ``checkpoints/``; links are not followed). A ``publish_folder`` leftover
    ``<dest>.old-<uuid>`` is removed when ``<dest>`` is there, and renamed back to ``<dest>`` when a
    kill came between the two renames (it is then the only complete copy). Run it where no writer of
    a matching name is live: a job's launcher before its workers start (prefix ``""``, the whole
    tree), a shard's worker for its own shard's names, the trainer's rank 0 before its first step.
    Remote folders hold none (remote writes upload whole)."""
    fs, path = url_to_fs(root)
    if not is_local(fs) or not os.path.isdir(path):
        return []
    removed = []
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if not name.startswith(prefix):
            continue
        if TMP_MARK in name:
            if _remove(full):
                removed.append(name)
            continue
        dest = _old_of(name)
        if dest is not None:
            if os.path.lexists(os.path.join(path, dest)):
                if _remove(full):
                    removed.append(name)
            else:
                os.replace(full, os.path.join(path, dest))
            continue
        if recursive and os.path.isdir(full) and not os.path.islink(full):
            removed += [f"{name}/{sub}" for sub in remove_temporaries(full, recursive=True)]
    return removed


# ---------------------------------------------------------------------------------------------
# outputs checked before the work
# ---------------------------------------------------------------------------------------------

# What marks a folder as another command's output: marker -> what it is. An output folder of one kind
# is never written into by a command of another (its files would be mixed).
OUTPUT_KINDS = {
    "dataset.json": "a shard dataset (dataset.json)",
    "checkpoints": "a training run (checkpoints/)",
    "model_index.json": "an exported pipeline (model_index.json)",
    "deploy.json": "an on-device export (deploy.json)",
    "evolution.jsonl": "an evolution (evolution.jsonl)",
    "metrics.json": "an evaluation (metrics.json)",
}


def check_output_file(path: str, flag: str) -> str:
    """A file a command will write: not a folder, and (local) in a folder that exists; else a
    ``UserError`` naming the flag, before the work that would end in writing it."""
    from core.errors import UserError

    fs, fpath = url_to_fs(path)
    if fs.isdir(fpath):
        raise UserError(f"{flag} {path!r} is a folder: give the path of a file to write")
    if is_local(fs):
        parent = os.path.dirname(os.path.abspath(fpath))
        if not os.path.isdir(parent):
            raise UserError(f"{flag} {path!r}: its folder {parent!r} does not exist (create it first)")
    return path


def check_output_folder(path: str, flag: str, own: str) -> str:
    """A folder a command will write into: not a file, and not holding another command's output
    (``OUTPUT_KINDS``; ``own``: the marker of this command's, which it may write over or resume)."""
    from core.errors import UserError

    fs, fpath = url_to_fs(path)
    if fs.exists(fpath) and not fs.isdir(fpath):
        raise UserError(f"{flag} {path!r} is an existing file: give a folder")
    if fs.isdir(fpath):
        names = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(fpath, detail=False)}
        other = [what for marker, what in OUTPUT_KINDS.items() if marker in names and marker != own]
        if other and own not in names:
            raise UserError(f"{flag} {path!r} holds {other[0]}: give a new folder, not another command's output")
    return path


# ---------------------------------------------------------------------------------------------
# one writer per output
# ---------------------------------------------------------------------------------------------

LOCK_FILE = ".distill.lock"  # in the output folder while a job or trainer writes it


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


class OutputLock:
    """An exclusive lock on an output folder: ``OUTPUT/.distill.lock`` created atomically (``O_EXCL``)
    with the holder's host, pid, start time and command; released at exit. A second writer is refused
    in one line naming the holder; a lock whose holder is gone (same host, no such pid) is stale and
    taken over with a message. Local folders only: object stores (``gs://``, ``s3://``) have no
    atomic create-if-absent through fsspec, so a remote output is unguarded (README)."""

    def __init__(self, path: str, info: dict):
        self.path, self.info = path, info

    @classmethod
    def acquire(cls, root: str, what: str) -> "OutputLock | None":
        import atexit
        import socket
        import sys
        import time

        from core.errors import UserError

        fs, froot = url_to_fs(root)
        if not is_local(fs):
            return None
        os.makedirs(froot, exist_ok=True)
        path = os.path.join(froot, LOCK_FILE)
        info = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "what": what}
        for _ in range(3):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    with open(path, encoding="utf-8") as f:
                        holder = json.load(f)
                except (OSError, ValueError):  # being written this instant, or damaged: look again
                    holder = None
                if holder is None:
                    time.sleep(0.05)
                    continue
                mine = holder.get("host") == info["host"]
                if mine and (holder.get("pid") == info["pid"] or not _alive(int(holder.get("pid", -1)))):
                    if holder.get("pid") != info["pid"]:
                        print(f"{what}: taking over the stale lock of {holder.get('what')} (pid {holder.get('pid')}, "
                              f"no longer running) on {root}", file=sys.stderr)
                    os.remove(path)
                    continue
                since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
                raise UserError(f"{root!r} is being written by {holder.get('what')} (pid {holder.get('pid')} on "
                                f"{holder.get('host')}, since {since}): one writer per output; wait for it or pass "
                                f"another output (remove {path} if that process is gone)") from None
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(info, f)
            lock = cls(path, info)
            atexit.register(lock.release)
            return lock
        raise UserError(f"cannot lock {root!r}: {path} keeps changing")

    def release(self) -> None:
        try:
            with open(self.path, encoding="utf-8") as f:
                if json.load(f).get("pid") != self.info["pid"]:
                    return  # taken over: not ours any more
            os.remove(self.path)
        except (OSError, ValueError):  # already gone
            pass
