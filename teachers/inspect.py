"""``distill inspect DIR [--verify] [--json]``: what a dataset of shards holds, and whether it is intact.

Prints the shards, samples, bytes per sample by field, the recipe and the lineage from
``dataset.json``: for a dataset written by the filter job, the chain of parents back to the dump,
each step with its filter recipe. ``--verify`` re-reads every shard (and its embedding sidecar, in
scored datasets) and checks size, sha256 and keys against its index; it exits 1 naming each bad shard.
"""

from __future__ import annotations

import argparse
import json
import sys

from teachers.fs import url_to_fs
from teachers.shards import index_name, join, list_indexes, read_index, shard_name, verify_shard


def summarise(data_dir: str) -> dict:
    fs, path = url_to_fs(join(data_dir, "dataset.json"))
    dataset = {}
    if fs.exists(path):
        with fs.open(path, "rb") as f:
            dataset = json.loads(f.read())
    shards = list_indexes(data_dir)
    samples, total, fields = 0, 0, {}
    for i in shards:
        index = read_index(data_dir, i)
        samples += index["count"]
        total += index["bytes"]
        for field, n in index.get("field_bytes", {}).items():
            fields[field] = fields.get(field, 0) + n
    per_sample = {k: v / samples for k, v in sorted(fields.items())} if samples else {}
    return dict(path=data_dir, shards=len(shards), samples=samples, bytes=total,
                bytes_per_sample=total / samples if samples else 0.0, bytes_per_sample_by_field=per_sample,
                recipe=dataset.get("recipe"), recipe_hash=dataset.get("recipe_hash"),
                lineage=lineage_chain(dataset.get("lineage")), totals=dataset.get("totals"))


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="distill inspect", description=__doc__.split("\n")[0])
    parser.add_argument("data_dir", help="dataset folder (local path or fsspec URL)")
    parser.add_argument("--verify", action="store_true", help="check every shard's size, sha256 and keys")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    fs, root = url_to_fs(args.data_dir)
    if not fs.isdir(root):
        print(f"distill inspect: {args.data_dir!r} is not a folder", file=sys.stderr)
        return 2
    summary = summarise(args.data_dir)
    if args.json:
        print(json.dumps(summary, indent=1, sort_keys=True))
    else:
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
    if not args.verify:
        return 0
    bad = 0
    for i in list_indexes(args.data_dir):
        problems = verify_shard(args.data_dir, i)
        for p in problems:
            print(f"BAD {shard_name(i)}: {p}", file=sys.stderr)
        bad += bool(problems)
    # A tar without its index is an incomplete write (or a deleted index): report it too.
    names = {p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)}
    for name in sorted(n for n in names if n.endswith(".tar") and n[:-4].isdigit()):
        if index_name(int(name[:-4])) not in names:
            print(f"BAD {name}: no index", file=sys.stderr)
            bad += 1
    print(f"verify: {summary['shards'] - min(bad, summary['shards'])} ok, {bad} bad")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
