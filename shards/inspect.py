"""``distill inspect DIR [--verify] [--json]``: what a dataset of shards holds, and whether it is intact.

Prints the shards, samples, bytes per sample by field, the recipe and the lineage from
``dataset.json``: for a dataset written by the filter job, the chain of parents back to the dump,
each step with its filter recipe. ``--verify`` re-reads every shard (and its embedding sidecar, in
scored datasets) and checks its size, sha256, keys, every member's checksum, that every array is
finite and of the shape its sample's json lists, that the sidecar's rows are finite, and that every
tar member is a sample's regular file (no absolute path, ``..``, symlink or hard link); it prints one line per bad shard (an index without its tar, a tar without its index, a shard
``dataset.json`` lists that is absent) and ``verify: N ok, M bad``, and exits 1 if any is bad.
A folder with no shards, or a ``dataset.json``/index of an unsupported schema, is one line and exit 2.
"""

from __future__ import annotations

import dataclasses
import json
import sys

from core.errors import UserError, run_main
from core.options import build_parser, from_mapping, option
from core.fs import exists, url_to_fs
from shards.schema import DATASET_JSON, read_dataset_info
from shards.schema import index_name, shard_name
from core.fs import join
from shards.reader import list_indexes, read_index
from shards.verify import verify_shard

PROG = "distill inspect"


_S_DATA = "dataset"
_S_OUTPUT = "checks and output"


@dataclasses.dataclass(frozen=True, kw_only=True)
class InspectConfig:
    data_dir: str | None = option(None, section=_S_DATA,
                                  help="dataset folder, local path or fsspec URL (or give it as the first argument)")
    verify: bool = option(False, section=_S_OUTPUT,
                          help="check every shard's size, sha256, keys, member checksums, finiteness, "
                                "array shapes and tar members")
    json: bool = option(False, section=_S_OUTPUT, help="print the summary as JSON")


def summarise(data_dir: str) -> dict:
    info = read_dataset_info(data_dir) if exists(join(data_dir, DATASET_JSON)) else None
    shards = list_indexes(data_dir)
    samples, total, fields = 0, 0, {}
    for i in shards:
        try:
            index = read_index(data_dir, i)
        except ValueError:  # an invalid or unsupported index: --verify names it; the summary skips it
            continue
        samples += index["count"]
        total += index["bytes"]
        for field, n in index.get("field_bytes", {}).items():
            fields[field] = fields.get(field, 0) + n
    per_sample = {k: v / samples for k, v in sorted(fields.items())} if samples else {}
    return dict(path=data_dir, shards=len(shards), samples=samples, bytes=total,
                bytes_per_sample=total / samples if samples else 0.0, bytes_per_sample_by_field=per_sample,
                recipe=info and info.recipe, recipe_hash=info and info.recipe_hash,
                lineage=lineage_chain(info and info.lineage), totals=info and info.totals)


def lineage_chain(lineage: dict | None) -> list[dict]:
    """The filter job's nested ``lineage`` -> one entry per step, newest first, back to the dump."""
    chain = []
    while lineage:
        recipe, parent = lineage.get("filter_recipe", {}), lineage.get("parent", {})
        chain.append({"filter_recipe_hash": lineage.get("filter_recipe_hash"),
                      "filter": {k: v for k, v in recipe.items() if v is not None and not k.startswith("parent_")},
                      "parent": parent.get("path"), "parent_recipe_hash": parent.get("recipe_hash"),
                      "parent_dataset_sha256": parent.get("dataset_sha256")})
        lineage = parent.get("lineage")
    return chain


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    return str(n)


def verify(data_dir: str) -> tuple[int, list[str]]:
    """(shards ok, one line per bad shard). A shard is a number with an index, a tar, or an entry in
    ``dataset.json``; each is ok or bad once. With a ``dataset.json``, every index must carry its
    recipe hash (the filter recipe's, for a filtered dataset)."""
    fs, root = url_to_fs(data_dir)
    names = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)}
    numbers = set(list_indexes(data_dir))
    numbers |= {int(n[:-4]) for n in names if n.endswith(".tar") and n[:-4].isdigit() and len(n) == 10}
    expected_recipe = None
    if DATASET_JSON in names:
        info = read_dataset_info(data_dir)
        numbers |= {int(n[:-4]) for n in info.shard_names if n[:-4].isdigit()}
        # A dump's shards carry its recipe hash; a filtered dataset's carry the filter recipe's.
        expected_recipe = (info.lineage or {}).get("filter_recipe_hash") or info.recipe_hash
    if not numbers:
        raise UserError(f"{data_dir!r} holds no shards (no NNNNNN.tar, no NNNNNN.json index, no dataset.json entries)")
    ok, bad = 0, []
    for i in sorted(numbers):
        if index_name(i) not in names and shard_name(i) in names:
            problems = ["no index (an incomplete write, or a deleted index)"]
        else:
            problems = verify_shard(data_dir, i, recipe_hash=expected_recipe)
        if problems:
            bad.append(f"BAD {shard_name(i)}: {'; '.join(problems)}")
        else:
            ok += 1
    return ok, bad


def main(argv: list[str] | None = None) -> int:
    return run_main(PROG, _main, argv)


def _main(argv: list[str]) -> int:
    parser = build_parser(InspectConfig, prog=PROG, description=__doc__.split("\n")[0],
                          usage="%(prog)s DIR [--verify] [--json]")
    parser.add_argument("path", nargs="?", default=None, help="dataset folder (local path or fsspec URL)")
    values = vars(parser.parse_args(argv))
    path = values.pop("path")
    if path is not None and values.get("data_dir") not in (None, path):
        raise UserError(f"two dataset folders given: {path!r} and --data_dir {values['data_dir']!r}")
    values["data_dir"] = values.get("data_dir") or path
    cfg = from_mapping(InspectConfig, values)
    if cfg.data_dir is None:
        raise UserError("a dataset folder is required: distill inspect DIR [--verify] [--json]")
    fs, root = url_to_fs(cfg.data_dir)
    if not fs.isdir(root):
        raise UserError(f"{cfg.data_dir!r} is not a folder")
    summary = summarise(cfg.data_dir)
    if cfg.json:
        print(json.dumps(summary, indent=1, sort_keys=True))
    else:
        _print_summary(summary)
    if not cfg.verify:
        return 0
    ok, bad = verify(cfg.data_dir)
    for line in bad:
        print(line, file=sys.stderr)
    print(f"verify: {ok} ok, {len(bad)} bad")
    return 1 if bad else 0


def _print_summary(summary: dict) -> None:
    print(f"{summary['path']}: {summary['shards']} shards, {summary['samples']} samples, "
          f"{_human(summary['bytes'])} ({_human(summary['bytes_per_sample'])}/sample)")
    for field, n in summary["bytes_per_sample_by_field"].items():
        print(f"  {field:<28} {_human(n):>12}/sample")
    if summary["recipe"]:
        print(f"recipe {summary['recipe_hash']}:")
        for k, v in summary["recipe"].items():
            print(f"  {k} = {v}")
    for depth, step in enumerate(summary["lineage"]):
        if depth == 0:
            print("lineage (newest first):")
        settings = ", ".join(f"{k}={v}" for k, v in step["filter"].items())
        print(f"  {'  ' * depth}<- filter {step['filter_recipe_hash']} ({settings})")
        print(f"  {'  ' * depth}   of {step['parent']} (recipe {step['parent_recipe_hash']}, "
              f"dataset.json sha256 {str(step['parent_dataset_sha256'])[:16]})")


if __name__ == "__main__":
    sys.exit(main())
