"""The ``beam`` command: ``beam run <pipeline file> [--runner=NAME] [job flags...]``.

Runs a pipeline module's ``run(argv)`` with the remaining arguments, as users write it:

    beam run pipelines/teacher_dump.py --runner=Dataflow --project=P --region=R ...

The file is a path to a pipeline module, relative, absolute or ``./x.py``. It is always imported
by its dotted module name, found from its place among packages (``/repo/pipelines/teacher_dump.py``
-> ``pipelines.teacher_dump``), with its root folder added to ``sys.path`` and ``PYTHONPATH``
when needed, so Beam pickles its DoFns by reference and worker processes import the same module.
Where no such file exists relative to the working directory, the same path is resolved inside the
installed package (``pipelines/curate.py`` -> module ``pipelines.curate``, a package), so the
command works from any directory. Errors of the command line are one line and exit code 2.

Short runner names map to Beam's classes; Beam's class names and full class paths pass through.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

from core.errors import UserError, run_main

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


def module_name_for(path: str) -> tuple[str, str | None]:
    """(dotted module name, the folder it is importable from) for a pipeline file path.

    The name is found from the file's place among packages: walk up while the folder holds an
    ``__init__.py``, so ``/abs/repo/pipelines/teacher_dump.py``, ``./pipelines/teacher_dump.py`` and
    ``pipelines/teacher_dump.py`` all name ``pipelines.teacher_dump``, importable from ``/abs/repo``.
    A path that does not exist is read as a path inside the installed package (root ``None``).
    """
    if not path.endswith(".py"):
        raise UserError(f"{path!r} is not a Python pipeline file (expected e.g. pipelines/teacher_dump.py)")
    if not os.path.isfile(path):
        return os.path.normpath(path)[:-3].replace(os.sep, ".").lstrip("."), None
    folder, parts = os.path.dirname(os.path.abspath(path)), [os.path.basename(path)[:-3]]
    while os.path.isfile(os.path.join(folder, "__init__.py")):
        folder, package = os.path.split(folder)
        parts.insert(0, package)
    return ".".join(parts), folder


def _make_importable(root: str) -> None:
    """Put ``root`` on this process's path and on ``PYTHONPATH``, which worker processes inherit."""
    if root not in sys.path:
        sys.path.insert(0, root)
    entries = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in entries:
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *entries])


def load_pipeline_module(path: str):
    """Import the pipeline module named by ``path`` by its dotted name (see ``module_name_for``).

    Importing by name (never by file location) lets Beam pickle the module's DoFns by reference,
    so worker processes and remote workers import the same module.
    """
    name, root = module_name_for(path)
    if root is not None:
        try:
            spec = importlib.util.find_spec(name)
        except ModuleNotFoundError:
            spec = None
        same = spec is not None and spec.origin and os.path.exists(spec.origin) and os.path.samefile(spec.origin, path)
        if not same:  # not importable as the same file yet: import it from the folder it lives in
            _make_importable(root)
            for loaded in [m for m in sys.modules if m == name or name.startswith(m + ".")]:
                sys.modules.pop(loaded)  # a package of that name from elsewhere would shadow the file
            importlib.invalidate_caches()
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if root is None and err.name and name.startswith(err.name):
            raise UserError(f"no pipeline file {path!r} here, and no module {name!r} in the installed package") from None
        raise


def _run(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] != "run":
        raise UserError(USAGE)
    module = load_pipeline_module(argv[1])
    if not hasattr(module, "run"):
        raise UserError(f"{argv[1]} has no run(argv) function")
    result = module.run(normalise_argv(argv[2:]))
    return result if isinstance(result, int) else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(USAGE)
        return 0
    return run_main("beam run", _run, argv)


if __name__ == "__main__":
    sys.exit(main())
