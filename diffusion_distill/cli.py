"""The ``distill`` command: one verb per job, each dispatched lazily to its module's ``main(argv)``.

    distill dump --prompts prompts.txt --output out/dump      # pipelines.dump
    distill inspect out/dump --verify                        # shards.inspect

Verbs are looked up in ``COMMANDS``; the module is imported only when its verb runs, so
``distill --help`` stays fast and a verb's heavy dependencies are not loaded by the others.
"""

from __future__ import annotations

import importlib
import sys

from core.errors import UserError, run_main

# verb -> ("module:function", one-line help). The function takes argv (list[str]) and returns an
# exit code or None.
COMMANDS: dict[str, tuple[str, str]] = {
    "dump": ("pipelines.dump:main", "run the teacher dump job (Beam) over prompts or a manifest"),
    "inspect": ("shards.inspect:main", "summarise a dataset of shards; --verify checks every shard"),
    "curate": ("pipelines.curate:main", "curate captions/images into a manifest (Beam)"),
    "filter": ("pipelines.filter:main", "filter and deduplicate a dump into final shards (Beam)"),
    "train": ("students.training.cli:main", "distil a student from shards"),
    "export": ("students.export.deploy:export_main", "turn a checkpoint into a diffusers pipeline folder (--format onnx: device models)"),
    "generate": ("students.export.ondevice:main", "make an image with an exported ONNX pipeline (--onnx DIR; numpy + onnxruntime, no torch)"),
    "eval": ("students.evaluation.evaluate:main", "evaluate a student against its teacher"),
    "profile": ("students.cost.profile:main", "parameters, MACs and latency of students and teachers"),
    "evolve": ("students.search.evolve:main", "evolve a student's blocks toward a latency target (SnapFusion Algorithm 1)"),
    "demo": ("diffusion_distill.demo:main", "run the whole pipeline end to end on bundled data"),
}


def _usage() -> str:
    width = max(len(v) for v in COMMANDS)
    lines = ["usage: distill <verb> [args...]", "", "verbs:"]
    lines += [f"  {verb:<{width}}  {help_}" for verb, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def dispatch(argv: list[str]) -> int:
    """Run the verb's ``main(rest)``; an unknown or missing verb is a ``UserError``."""
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in COMMANDS:
        raise UserError(f"unknown verb {verb!r}; verbs: {', '.join(COMMANDS)} (distill --help)")
    target, _ = COMMANDS[verb]
    module_name, func_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise
        raise UserError(f"verb {verb!r} is not available in this build ({module_name} missing)") from None
    code = getattr(module, func_name)(rest)
    return int(code or 0)


def main(argv: list[str] | None = None) -> int:
    # --debug stays in argv for the verb (each verb's own run_main reads it); only the dispatcher's
    # own errors are handled here.
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_main("distill", lambda _: dispatch(argv), argv)


if __name__ == "__main__":
    sys.exit(main())
