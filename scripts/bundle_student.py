"""Bundle a trained student checkpoint for the demo: ``diffusion_distill/data/students/NAME``.

    python scripts/bundle_student.py runs/small-s4-seed0 --name shapes_small_s4 [--note "..."]

Copies what starting a new run from it (``distill train --init_from``) and sampling it need: the
checkpoint's ``config.json`` (train settings, recipe, the dump's dataset.json), its scheduler, its
distillation head, and its EMA weights as the folder's ``student/`` (the bundle keeps one set of weights:
the EMA, which every evaluation of the run used; sample or export it with ``--weights raw``). No optimizer
state. Writes ``weights.json`` (the source checkpoint, step, command, sha256 of every file) last, so a
half-written bundle has none.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

from pipelines.common import file_sha256
from students.training.runs import resolve_checkpoint


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a run folder (its newest checkpoint) or a checkpoint folder")
    p.add_argument("--name", required=True)
    p.add_argument("--note", default="", help="how the run was made (kept in weights.json)")
    args = p.parse_args(argv)
    ckpt = resolve_checkpoint(args.checkpoint)
    if not os.path.isdir(os.path.join(ckpt, "ema")):
        p.error(f"{ckpt} has no ema/ weights")
    out = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "diffusion_distill", "data",
                       "students", args.name)
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    shutil.copy(os.path.join(ckpt, "config.json"), tmp)
    shutil.copytree(os.path.join(ckpt, "ema"), os.path.join(tmp, "student"))
    for extra in ("scheduler", "distill_head.safetensors"):
        src = os.path.join(ckpt, extra)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(tmp, extra))
        elif os.path.isfile(src):
            shutil.copy(src, tmp)
    files = sorted(os.path.relpath(os.path.join(d, f), tmp) for d, _, fs in os.walk(tmp) for f in fs)
    config = json.load(open(os.path.join(tmp, "config.json"), encoding="utf-8"))
    meta = {"source": os.path.relpath(ckpt), "step": config.get("step"), "weights": "ema (as student/)",
            "preset": config["train"].get("preset"), "student_steps": config["train"].get("student_steps"),
            "seed": config["train"].get("seed"), "note": args.note,
            "sha256": {f: file_sha256(os.path.join(tmp, f)) for f in files}}
    with open(os.path.join(tmp, "weights.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    print(f"{out}: {len(files)} files, {sum(os.path.getsize(os.path.join(out, f)) for f in files) / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
