"""The ``beam`` command: ``beam run <pipeline file> [--runner=NAME] [job flags...]``.

Runs a pipeline module's ``run(argv)`` with the remaining arguments, as users write it:

    beam run pipelines/teacher_dump.py --runner=Dataflow --project=P --region=R ...

The file is a path to a pipeline module. Where no such file exists relative to the working
directory, the same path is resolved inside the installed package (``pipelines/teacher_dump.py``
-> module ``pipelines.teacher_dump``), so the command works from any directory. A module that is
part of the installed package is imported by its dotted name, so Beam pickles its DoFns by
reference and remote workers (which have the package installed) can load them.

Short runner names map to Beam's classes; Beam's class names and full class paths pass through.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

RUNNERS = {
    "direct": "DirectRunner",
    "dataflow": "DataflowRunner",
    "dask": "apache_beam.runners.dask.dask_runner.DaskRunner",
    "flink": "FlinkRunner",
    "spark": "SparkRunner",
    "prism": "PrismRunner",
    "portable": "PortableRunner",
}

USAGE = "usage: beam run <pipeline file> [--runner=Direct|Dataflow|Dask|Flink|Spark|Prism|<class>] [job flags...]"


def normalise_runner(name: str) -> str:
    """``Dask`` -> ``apache_beam.runners.dask.dask_runner.DaskRunner``; ``direct`` -> ``DirectRunner``."""
    key = name.lower().removesuffix("runner")
    return RUNNERS.get(key, name)


def normalise_argv(argv: list[str]) -> list[str]:
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--runner="):
            out.append("--runner=" + normalise_runner(arg.split("=", 1)[1]))
        elif arg == "--runner" and i + 1 < len(argv):
            out.append("--runner=" + normalise_runner(argv[i + 1]))
            i += 1
        else:
            out.append(arg)
        i += 1
    return out


def load_pipeline_module(path: str):
    """Import the pipeline module named by ``path`` (see the module docstring)."""
    if not path.endswith(".py"):
        raise SystemExit(f"beam run: {path!r} is not a Python pipeline file (expected e.g. pipelines/teacher_dump.py)")
    dotted = os.path.normpath(path)[:-3].replace(os.sep, ".").lstrip(".")
    candidates = [dotted] if "." in dotted else []
    for name in candidates:  # part of the installed package?
        try:
            spec = importlib.util.find_spec(name)
        except ModuleNotFoundError:
            spec = None
        if spec is not None and spec.origin and (not os.path.exists(path)
                                                  or os.path.samefile(spec.origin, path)):
            return importlib.import_module(name)
    if not os.path.isfile(path):
        raise SystemExit(f"beam run: no pipeline file {path!r} here, and no module {dotted!r} in the installed package")
    # A user's own pipeline file outside the package: load it under its file name.
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2 or argv[0] != "run":
        print(USAGE, file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    module = load_pipeline_module(argv[1])
    if not hasattr(module, "run"):
        print(f"beam run: {argv[1]} has no run(argv) function", file=sys.stderr)
        return 2
    result = module.run(normalise_argv(argv[2:]))
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
