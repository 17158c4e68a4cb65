"""What the Beam jobs share: launcher checks, runner defaults, the recipe guard, plans, rejects, the run tail.

Each job (``pipelines.curate``, ``pipelines.dump``, ``pipelines.filter``) validates and plans on the
launcher, then runs one Beam graph whose last step writes a summary file. The pieces every job
needs for that live here, once:

- ``launcher_checks()``: turns the errors of validation and planning into ``UserError`` (one line,
  exit 2, before any worker starts); ``check_output`` refuses an ``--output`` that is a file;
- ``check_beam_args``: a flag the job does not declare must be one of Beam's, else a one-line
  error naming the nearest flag (a typo must not run the job with a default);
- ``pipeline_options`` / ``is_local_runner`` / ``progress_mode``: runner defaults; ``check_runner``:
  a runner Beam can make, with its extra installed (Dataflow: ``gcp``); ``is_dry_run``;
- ``recipe_hash`` and ``check_or_write_recipe``: an output folder holds one recipe's results;
- ``write_plan`` / ``read_plan`` (``PLAN``): one Parquet row group per work unit, so a work unit
  is a number and its rows never pass through the graph; ``work_unit``: the frame of one;
- ``start_shard_progress`` / ``shard_progress`` / ``start_stage_counts`` / ``stage_counts`` /
  ``end_progress``: the job's progress (``core.progress``), one counter per run shared by the work
  units of this process;
- ``write_rejects``: ``rejects/<name>.jsonl`` and the counts by reason (``count_words``: in a summary line);
- ``run_pipeline``: run the graph, wait, read back the summary the last step wrote.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import threading
import time
import uuid

from core.errors import UserError, run_main
from core.fs import atomic_write_bytes, atomic_write_json, join, url_to_fs
from core.options import did_you_mean
from shards.recipe import recipe_hash  # noqa: F401 (pipelines.common.recipe_hash: the jobs' recipes)
from shards.schema import DATASET_JSON

PLAN = "_plan/plan.parquet"  # the launcher's plan inside the output folder
RECIPE = "recipe.json"  # the recipe (and its hash) an output folder was started with
REJECTS = "rejects"  # folder of rejects/<name>.jsonl


# ---------------------------------------------------------------------------------------------
# launcher checks
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def launcher_checks():
    """Validation and planning errors (bad values, missing files, unknown teachers) -> ``UserError``.

    Used only around launcher-side code that reads arguments and input files: there a
    ``ValueError`` or ``FileNotFoundError`` is the user's to fix. Errors inside the running graph
    keep their tracebacks.
    """
    try:
        yield
    except UserError:
        raise
    except (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError) as err:
        raise UserError(str(err)) from err


def check_output(output: str | None, flag: str = "--output") -> str:
    """An output folder: given, and not an existing file. Returns it unchanged."""
    if not output:
        raise UserError(f"{flag} is required")
    fs, path = url_to_fs(output)
    if fs.exists(path) and not fs.isdir(path):
        raise UserError(f"{flag} {output!r} is an existing file: give a folder")
    return output


def check_input_file(path: str, flag: str) -> str:
    """An input file that exists and is not a folder."""
    fs, p = url_to_fs(path)
    if not fs.exists(p):
        raise UserError(f"{flag} {path!r} does not exist")
    if fs.isdir(p):
        raise UserError(f"{flag} {path!r} is a folder: give a file")
    return path


def file_sha256(path: str) -> str:
    fs, p = url_to_fs(path)
    digest = hashlib.sha256()
    with fs.open(p, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# the flags a job hands to Beam
# ---------------------------------------------------------------------------------------------


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


@functools.lru_cache(maxsize=1)
def beam_flags() -> dict[str, bool]:
    """Every flag Beam's pipeline options declare -> whether it takes a value.

    Read from the options classes themselves (each ``PipelineOptions`` subclass adds its flags to a
    parser), so a Beam upgrade brings its new flags along. The Dask runner's module is imported for
    its ``--dask_*`` flags: Beam imports a runner only when the pipeline runs, after this check.
    Subclasses from outside Beam are left out: they declare jobs' flags, and another job's flag
    given to this one is a mistake too.
    """
    from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser

    with contextlib.suppress(ImportError):  # dask is an optional extra
        import apache_beam.runners.dask.dask_runner  # noqa: F401 (declares DaskOptions)
    flags: dict[str, bool] = {}
    for cls in _subclasses(PipelineOptions):
        if not cls.__module__.startswith("apache_beam."):
            continue
        parser = _BeamArgumentParser(allow_abbrev=False)  # one each: a subclass may inherit its parent's flags
        cls._add_argparse_args(parser)
        for action in parser._actions:
            flags.update((name, action.nargs != 0) for name in action.option_strings)
    return flags


def check_beam_args(rest: list[str], job_flags: list[str]) -> list[str]:
    """The arguments a job's parser left (``parse_known_args``), each a Beam flag (or its value); returns them.

    Beam itself only logs ``Discarding unparseable args`` and runs on, so a misspelt job flag would
    run the job with its default: here it is a one-line ``UserError`` naming the nearest flag of
    the job or of Beam, before anything is written.
    """
    known = beam_flags() if rest else {}
    value_due = False  # the previous argument was a Beam flag waiting for its value
    for arg in rest:
        if value_due and not arg.startswith("--"):
            value_due = False
            continue
        if not arg.startswith("-"):
            raise UserError(f"unexpected argument {arg!r}: it is neither a flag nor a flag's value")
        name, eq, _ = arg.partition("=")
        if name not in known:
            raise UserError(f"unknown flag {name}{did_you_mean(name, [*job_flags, *known])}: neither a flag "
                            "of this job nor a Beam pipeline option")
        value_due = known[name] and not eq
    check_runner(rest)
    return rest


def check_runner(beam_args: list[str]) -> None:
    """``--runner`` must name a runner Beam can make (Beam would raise ``ValueError: Unexpected
    pipeline runner`` from inside the launch, after the output folder was created)."""
    if not any(a == "--runner" or a.startswith("--runner=") for a in beam_args):
        return
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
    from apache_beam.runners.runner import create_runner

    runner = PipelineOptions(beam_args).view_as(StandardOptions).runner
    try:
        made = create_runner(runner)
    except (ValueError, ImportError) as err:
        raise UserError(f"--runner {runner!r}: {' '.join(str(err).split())}") from None
    if type(made).__name__ == "DataflowRunner":
        check_dataflow_extra()


def check_dataflow_extra() -> None:
    """Beam's Dataflow runner is made without Google's client packages and fails only when it submits
    (``ImportError: Google Cloud Dataflow runner not available``): here, before any work, one line
    naming the extra that brings them."""
    import importlib

    try:
        importlib.import_module("apache_beam.runners.dataflow.internal.apiclient")  # the runner's client
    except ImportError:
        raise UserError("--runner DataflowRunner needs Beam's Google Cloud packages, which are not installed "
                        "here: pip install 'diffusion-distill[gcp]'") from None


def check_local_device(device: str, beam_args: list[str], flag: str = "--device") -> None:
    """On a local runner the workers are this machine: its ``device`` must exist here
    (``core.devices.check_device``). A remote runner's workers are checked where they run."""
    from core.devices import check_device

    if is_local_runner(pipeline_options(beam_args)):
        check_device(device, flag)


# ---------------------------------------------------------------------------------------------
# runner defaults
# ---------------------------------------------------------------------------------------------


def pipeline_options(beam_args: list[str]):
    """Beam options from the flags the job did not consume; the main session is never pickled
    (every stage is a module-level callable, imported by name on the workers)."""
    from apache_beam.options.pipeline_options import PipelineOptions, SetupOptions

    options = PipelineOptions(beam_args)
    options.view_as(SetupOptions).save_main_session = False
    return options


def is_local_runner(options) -> bool:
    """DirectRunner (or no runner named): the job runs on this machine."""
    from apache_beam.options.pipeline_options import StandardOptions

    runner = str(options.view_as(StandardOptions).runner or "DirectRunner")
    return "Direct" in runner or runner.lower() == "direct"


def progress_mode(progress: str, options) -> str:
    """``--progress auto|on|off`` -> a ``core.progress`` mode: a live line or plain lines on stderr
    on a local runner, log lines on the workers of a remote one, or nothing."""
    from core.progress import resolve_mode

    return resolve_mode(progress, local=is_local_runner(options))


# ---------------------------------------------------------------------------------------------
# recipes
# ---------------------------------------------------------------------------------------------


def _has_results(output: str) -> bool:
    """Whether the folder holds anything a recipe produced: a shard index or a dataset.json."""
    from shards.reader import list_indexes

    fs, root = url_to_fs(output)
    return fs.exists(join(root, DATASET_JSON)) or bool(list_indexes(output))


def check_or_write_recipe(output: str, recipe) -> None:
    """Refuse an output folder holding results of another recipe; record the recipe in a new one.

    A folder whose recipe differs but that holds no result yet (a run that failed before its first
    shard) is taken over: nothing in it would be mixed.
    """
    fs, p = url_to_fs(join(output, RECIPE))
    if fs.exists(p):
        with fs.open(p, "rb") as f:
            old = json.loads(f.read())
        new = recipe.to_json()
        old_recipe = old.get("recipe", {})
        if old.get("recipe_hash") == recipe.hash:
            return
        if _has_results(output):
            diff = {k: (old_recipe.get(k), new.get(k)) for k in sorted(set(old_recipe) | set(new))
                    if json.dumps(old_recipe.get(k)) != json.dumps(new.get(k))}
            changes = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
            raise UserError(f"output {output!r} holds a dataset made with another recipe ({changes}); "
                            "use a new --output folder, or the original settings to resume")
    fs.makedirs(p.rsplit("/", 1)[0] if "/" in p else ".", exist_ok=True)
    atomic_write_json(join(output, RECIPE), {"recipe": recipe.to_json(), "recipe_hash": recipe.hash})


# ---------------------------------------------------------------------------------------------
# plans and rejects
# ---------------------------------------------------------------------------------------------


def write_plan(output: str, schema, groups: list[list[dict]]) -> None:
    """``_plan/plan.parquet``: row group ``i`` holds ``groups[i]`` (work unit ``i``'s rows)."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    with pq.ParquetWriter(buf, schema) as writer:
        for group in groups:
            writer.write_table(pa.Table.from_pylist(group, schema), row_group_size=max(1, len(group)))
    fs, p = url_to_fs(join(output, PLAN))
    fs.makedirs(os.path.dirname(p), exist_ok=True)
    atomic_write_bytes(join(output, PLAN), buf.getvalue())


def read_plan(output: str, group: int | None = None) -> list[dict]:
    """Rows of work unit ``group`` (its row group), or every row of the plan."""
    import pyarrow.parquet as pq

    fs, p = url_to_fs(join(output, PLAN))
    with fs.open(p, "rb") as f:
        pf = pq.ParquetFile(f)
        return (pf.read() if group is None else pf.read_row_group(group)).to_pylist()


def count_words(counts: dict[str, int], none: str = "none") -> str:
    """Counts by reason in words for a summary line: ``3 bad_json, 1 empty_caption`` (most first), or ``none``."""
    items = sorted(((n, reason) for reason, n in counts.items() if n), key=lambda x: (-x[0], x[1]))
    return ", ".join(f"{n} {reason}" for n, reason in items) or none


def write_rejects(output: str, name: str, rejects: list[dict]) -> dict[str, int]:
    """Write ``rejects/<name>.jsonl`` atomically (one JSON object per line); returns counts by reason."""
    fs, root = url_to_fs(output)
    fs.makedirs(join(root, REJECTS), exist_ok=True)
    lines = "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rejects)
    atomic_write_bytes(join(output, f"{REJECTS}/{name}.jsonl"), lines.encode("utf-8"))
    reasons: dict[str, int] = {}
    for r in rejects:
        reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    return reasons


def plan_unit_sizes(output: str) -> list[int]:
    """Rows per row group of the plan (from its footer: no row is read)."""
    import pyarrow.parquet as pq

    fs, p = url_to_fs(join(output, PLAN))
    with fs.open(p, "rb") as f:
        meta = pq.ParquetFile(f).metadata
        return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]


@contextlib.contextmanager
def work_unit(output: str, shard: int, progress=None):
    """The frame of a shard work unit (dump and filter): stale temporaries of an earlier attempt
    removed, the unit's rows read from the plan, and the unit counted in the job's overall progress
    (``progress``: ``shard_progress``'s counter, or None). Yields ``(rows, bar)``: ``bar.update(n)``
    counts ``n`` samples written (None without progress); the caller writes the shard with
    ``shards.writer.ShardWriter``."""
    from shards.writer import remove_stale_temporaries

    remove_stale_temporaries(output, shard)
    rows = read_plan(output, shard)
    if not progress:
        yield rows, None
        return
    with progress.unit(f"{shard:06d}", len(rows)) as bar:
        yield rows, bar


# ---------------------------------------------------------------------------------------------
# progress
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ProgressSpec:
    """What a work unit needs to find its job's progress counter: the launcher's, when the runner runs
    the units in the launcher's process (DirectRunner in memory), else one of its own that logs."""

    run: str  # unique per run: the key of the counter in this process
    label: str  # the job's name at the head of each line
    mode: str  # core.progress.MODES
    output: str = ""  # shard jobs: the output folder, where every worker's complete shards land
    plan_tail: int = 0  # row groups of the plan after the work units (the filter's rows not kept)
    started: float = 0.0  # time.time() on the launcher when the run started
    done_before: int = 0  # shards complete when the run started


_PROGRESS: dict[str, object] = {}  # run -> UnitProgress | StageCounts of this process
_PROGRESS_LOCK = threading.Lock()


def _new_spec(label: str, mode: str, **fields) -> ProgressSpec:
    return ProgressSpec(run=uuid.uuid4().hex, label=label, mode=mode, started=time.time(), **fields)


def _shard_counter(spec: ProgressSpec, reporter, *, worker: bool):
    from core.progress import UnitProgress
    from shards.reader import list_indexes

    if worker:  # its own shards only: count everyone's where they land; times on the wall clock
        return UnitProgress(spec.label, reporter=reporter, clock=time.time, start=spec.started,
                            count_done=lambda: len(list_indexes(spec.output)), done_before=spec.done_before)
    return UnitProgress(spec.label, reporter=reporter)


def start_shard_progress(label: str, mode: str, output: str, *, plan_tail: int = 0,
                         planned: bool = True) -> ProgressSpec | None:
    """The launcher's overall ``shards i/N`` counter of a run (None when ``mode`` is off); ``planned``:
    the plan is written already (else the first work unit reads N from it)."""
    from core.progress import Reporter
    from shards.reader import list_indexes

    if mode == "off":
        return None
    spec = _new_spec(label, mode, output=output, plan_tail=plan_tail, done_before=len(list_indexes(output)))
    counter = _shard_counter(spec, Reporter(mode), worker=False)
    if planned:
        _set_plan_total(counter, spec)
    with _PROGRESS_LOCK:
        _PROGRESS[spec.run] = counter
    return spec


def _set_plan_total(counter, spec: ProgressSpec) -> None:
    sizes = plan_unit_sizes(spec.output)
    counter.unit_sizes = sizes[: len(sizes) - spec.plan_tail]
    worker = counter.count_done is not None  # its own samples only: no total to show them against
    counter.set_total(len(counter.unit_sizes), None if worker else sum(counter.unit_sizes))


def skip_shard(counter, shard: int) -> None:
    """Count ``shard``, complete from an earlier run, as done (not as work: the ETA leaves it out)."""
    if counter:
        sizes = getattr(counter, "unit_sizes", None) or []
        counter.skip(f"{shard:06d}", sizes[shard] if shard < len(sizes) else 0)


def shard_progress(spec: ProgressSpec | None):
    """The run's ``UnitProgress`` in this process (a worker of its own: one that logs each shard), its
    total read from the plan once it is known; None when progress is off."""
    from core.progress import Reporter

    if spec is None or spec.mode == "off":
        return None
    with _PROGRESS_LOCK:
        counter = _PROGRESS.get(spec.run)
        if counter is None:  # not the launcher's process: no shared terminal
            counter = _PROGRESS[spec.run] = _shard_counter(spec, Reporter("log"), worker=True)
    if counter.total is None:
        _set_plan_total(counter, spec)
    return counter


def start_stage_counts(label: str, mode: str) -> ProgressSpec | None:
    """The launcher's records-per-stage counter of a run (None when ``mode`` is off): plain lines,
    at most one per ``core.progress.INTERVAL`` seconds."""
    from core.progress import Reporter, StageCounts

    if mode == "off":
        return None
    spec = _new_spec(label, mode)
    with _PROGRESS_LOCK:
        _PROGRESS[spec.run] = StageCounts(label, reporter=Reporter("lines" if mode == "bar" else mode))
    return spec


def stage_counts(spec: ProgressSpec | None):
    """The run's ``StageCounts`` in this process (a worker of its own: one that logs its counts)."""
    from core.progress import Reporter, StageCounts

    if spec is None or spec.mode == "off":
        return None
    with _PROGRESS_LOCK:
        counts = _PROGRESS.get(spec.run)
        if counts is None:
            counts = _PROGRESS[spec.run] = StageCounts(f"{spec.label} (this worker)", reporter=Reporter("log"))
        return counts


def end_progress(spec: ProgressSpec | None) -> None:
    """Close the launcher's counter of a run (the final line; a drawn bar's line ended)."""
    if spec is None:
        return
    with _PROGRESS_LOCK:
        counter = _PROGRESS.pop(spec.run, None)
    if counter is not None:
        counter.close()


# ---------------------------------------------------------------------------------------------
# the run tail
# ---------------------------------------------------------------------------------------------


def is_dry_run(options) -> bool:
    """``--dry_run=True`` on the Dataflow runner: the job is built and checked but not submitted
    (Beam's other runners ignore the flag and run)."""
    from apache_beam.options.pipeline_options import StandardOptions, TestOptions

    runner = str(options.view_as(StandardOptions).runner or "")
    dry = options.view_as(TestOptions).dry_run  # Beam keeps the flag's text: "False" is set too
    return "Dataflow" in runner and str(dry).strip().lower() in ("1", "true", "yes", "on")


def run_pipeline(pipeline, output: str, summary: str = DATASET_JSON, lock=None, options=None):
    """Run the built graph to completion; returns ``(the summary file's content, the Beam result)``.
    ``lock`` (``lock_output``'s) is released when the graph has finished, or failed. With ``options``
    of a dry run (``is_dry_run``) nothing ran: the summary is None and the result holds the job
    Dataflow would have been sent (``result.job``: its graph and options)."""
    try:
        with _interrupts() as interrupted:
            try:
                result = pipeline.run()
                result.wait_until_finish()
            except Exception:
                if interrupted:  # Beam re-raises a worker's KeyboardInterrupt as RuntimeError
                    raise KeyboardInterrupt from None
                raise
        if options is not None and is_dry_run(options):
            return None, result
        fs, path = url_to_fs(join(output, summary))
        with fs.open(path, "rb") as f:
            return json.loads(f.read()), result
    finally:
        if lock is not None:
            lock.release()


@contextlib.contextmanager
def _interrupts():
    """A list that holds a mark once SIGINT arrived while the graph runs (the signal still interrupts
    as before): so the launcher can tell Ctrl-C from a failure of the graph."""
    import signal
    import threading

    marks: list = []
    if threading.current_thread() is not threading.main_thread():
        yield marks
        return
    previous = signal.getsignal(signal.SIGINT)

    beam_log = logging.getLogger("apache_beam")
    level = beam_log.level

    def handler(signum, frame):
        marks.append(signum)
        beam_log.setLevel(logging.CRITICAL + 1)  # Beam logs the interrupted bundle's traceback: Ctrl-C is one line
        if callable(previous):
            previous(signum, frame)
        else:
            raise KeyboardInterrupt

    if previous in (signal.SIG_IGN, None):  # Ctrl-C ignored (a background job): leave it so
        yield marks
        return
    signal.signal(signal.SIGINT, handler)
    try:
        yield marks
    finally:
        signal.signal(signal.SIGINT, previous)
        beam_log.setLevel(level)


def lock_output(output: str, prog: str):
    """The job's exclusive lock on ``output`` (``core.fs.OutputLock``), taken on the launcher before it
    removes stale temporaries or writes anything: a second launcher into the same output is refused in
    one line and never deletes or mixes the first one's files. None for object stores (unguarded)."""
    from core.fs import OutputLock

    return OutputLock.acquire(output, prog)


def dry_run_summary(prog: str, result, output: str) -> dict:
    """What a job returns from a Dataflow dry run (``run_pipeline`` gave no summary): one line on
    stderr and ``{"dry_run": True, "job": <Beam's Dataflow Job: .proto_pipeline, the graph; .options>}``."""
    import sys

    transforms = len(result.job.proto_pipeline.components.transforms)
    print(f"{prog}: dry run: Dataflow job {result.job.proto.name!r} built ({transforms} transforms; the launcher's "
          f"files are in {output}), not submitted", file=sys.stderr)
    return {"dry_run": True, "job": result.job}


def job_main(prog: str, run, argv: list[str] | None = None) -> int:
    """A job's ``main``: ``run(argv)`` with a user error as one line on stderr and exit 2."""
    def call(args: list[str]) -> int:
        run(args)
        return 0

    return run_main(prog, call, argv)
