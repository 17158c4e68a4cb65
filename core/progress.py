"""Progress of long steps: units done of N with an ETA, counts per stage with a rate, one line per item.

Three reporters share one ``Reporter`` (where the text goes, how often):

- ``UnitProgress``: units (shards, models) done of ``total``, with the samples inside them; the ETA is
  ``elapsed / worked * (total - done)``, where ``worked`` counts the units done in this run (a unit
  skipped because it was already complete counts as done, not as work). Thread-safe: the work units of
  a local Beam runner run as threads of one process and share one counter.
- ``StageCounts``: records seen and kept per named stage, with the first stage's rate.
- plain ``Reporter.emit(text, force=True)`` for one line per finished item.

Modes (``resolve_mode``): ``bar`` rewrites one terminal line; ``lines`` writes whole lines, at most
one per ``interval`` seconds; ``log`` sends the same lines to ``logging`` (a worker process of a
remote runner has no terminal); ``off`` writes nothing. ``--progress auto`` is ``bar`` when stderr is
a terminal on a local runner, else ``lines`` there and ``log`` on a remote runner; ``on`` is ``bar`` on
a local runner whatever stderr is, ``log`` on a remote one.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time

MODES = ("bar", "lines", "log", "off")
CHOICES = ("auto", "on", "off")  # the --progress flag's values
INTERVAL = 5.0  # seconds between two lines in ``lines`` and ``log`` mode
BAR_INTERVAL = 0.2  # seconds between two redraws of the terminal line
BAR_WIDTH = 20

log = logging.getLogger("distill.progress")


def is_tty(stream=None) -> bool:
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or not a file
        return False


def resolve_mode(progress: str, *, local: bool = True, stream=None) -> str:
    """``--progress auto|on|off`` (and where the job runs) -> one of ``MODES``."""
    if progress not in CHOICES:
        raise ValueError(f"--progress {progress!r} is not one of {', '.join(CHOICES)}")
    if progress == "off":
        return "off"
    if not local:
        return "log"
    if progress == "on":
        return "bar"
    return "bar" if is_tty(stream) else "lines"


def eta_seconds(elapsed: float, worked: int, remaining: int) -> float | None:
    """``elapsed / worked * remaining``; None before any unit was worked on."""
    if remaining <= 0:
        return 0.0
    if worked <= 0:
        return None
    return elapsed / worked * remaining


def format_duration(seconds: float | None) -> str:
    """``42 s``, ``3m05s``, ``2h07m``; ``?`` when unknown."""
    if seconds is None:
        return "?"
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class Reporter:
    """Where progress text goes (``mode``) and how often: at most one line per ``interval`` seconds
    unless a line is forced. ``stream`` None is ``sys.stderr`` at the time of writing."""

    def __init__(self, mode: str, *, stream=None, clock=time.monotonic, interval: float | None = None, logger=None):
        if mode not in MODES:
            raise ValueError(f"progress mode {mode!r} is not one of {', '.join(MODES)}")
        self.mode, self.stream, self.clock, self.logger = mode, stream, clock, logger or log
        self.interval = (BAR_INTERVAL if mode == "bar" else INTERVAL) if interval is None else interval
        self.last: float | None = None  # clock of the last line written
        self.open_line = False  # bar mode: a line is drawn and not ended
        self.lock = threading.RLock()

    @property
    def on(self) -> bool:
        return self.mode != "off"

    def due(self) -> bool:
        return self.last is None or self.clock() - self.last >= self.interval

    def emit(self, text: str, force: bool = False) -> bool:
        """Write ``text`` if forced or due; returns whether it was written."""
        if self.mode == "off":
            return False
        with self.lock:
            if not (force or self.due()):
                return False
            self.last = self.clock()
            if self.mode == "log":
                self.logger.info(text)
                return True
            stream = sys.stderr if self.stream is None else self.stream
            if self.mode == "bar":
                stream.write(f"\r{text}\x1b[K")
                self.open_line = True
            else:
                stream.write(text + "\n")
            stream.flush()
            return True

    def close(self) -> None:
        """Bar mode: end the drawn line, so what follows starts on a line of its own."""
        with self.lock:
            if self.open_line:
                stream = sys.stderr if self.stream is None else self.stream
                stream.write("\n")
                stream.flush()
                self.open_line = False


class _Unit:
    """One unit in progress: ``update(n)`` adds samples (the interface of a tqdm bar)."""

    def __init__(self, progress: "UnitProgress"):
        self.progress, self.done = progress, 0

    def update(self, n: int = 1) -> None:
        self.done += n
        self.progress.add_samples(n)


class UnitProgress:
    """Units (``unit``: "shard", "model") done of ``total``, samples done of ``samples_total``, an ETA.

    ``with progress.unit(name, size) as u: ... u.update(n)`` frames one unit: its samples count as they
    are added, the unit as done when the block ends without an exception (a failed unit's samples are
    taken back: a retry counts them again). ``skip(name, size)``: a unit already complete. Each finished
    unit may write a line (the last one always does); ``update`` may too, when the reporter is due."""

    def __init__(self, label: str, total: int | None = None, *, samples_total: int | None = None,
                 unit: str = "shard", reporter: Reporter, clock=time.monotonic, sample_unit: str = "samples",
                 start: float | None = None, count_done=None, done_before: int = 0):
        self.label, self.unit_name, self.sample_unit = label, unit, sample_unit
        self.total, self.samples_total = total, samples_total
        self.reporter, self.clock = reporter, clock
        self.start = clock() if start is None else start
        # count_done: () -> units complete so far, counted where every process's units land (a worker of a
        # remote runner sees only its own); done_before: how many were complete when the run started
        self.count_done, self.done_before = count_done, done_before
        self.done = self.skipped = self.samples = 0
        self.lock = threading.Lock()

    def set_total(self, total: int, samples_total: int | None = None) -> None:
        with self.lock:
            if self.total is None:
                self.total, self.samples_total = total, samples_total

    def elapsed(self) -> float:
        return self.clock() - self.start

    def eta(self) -> float | None:
        """``(elapsed / worked) * (total - done)``; before the first unit, from the samples' rate."""
        if self.total is None:
            return None
        worked = self.done - (self.done_before if self.count_done is not None else self.skipped)
        if worked <= 0 and self.samples and self.samples_total:
            return eta_seconds(self.elapsed(), self.samples, self.samples_total - self.samples)
        return eta_seconds(self.elapsed(), worked, self.total - self.done)

    def line(self, finished: str | None = None) -> str:
        total = "?" if self.total is None else str(self.total)
        parts = [f"{self.unit_name}s {self.done}/{total}"]
        if self.reporter.mode == "bar" and self.total:
            filled = round(BAR_WIDTH * self.done / self.total)
            parts[0] += " [" + "#" * filled + "." * (BAR_WIDTH - filled) + "]"
        if self.count_done is not None:
            pass  # a worker's own samples would read as the job's
        elif self.samples_total is not None:
            parts.append(f"{self.sample_unit} {self.samples:,}/{self.samples_total:,}")
        elif self.samples:
            parts.append(f"{self.sample_unit} {self.samples:,}")
        parts.append(f"{format_duration(self.elapsed())} elapsed")
        parts.append(f"ETA {format_duration(self.eta())}")
        head = f"{self.label}: " + (f"{self.unit_name} {finished} done, " if finished is not None else "")
        return head + ", ".join(parts)

    def add_samples(self, n: int) -> None:
        with self.lock:
            self.samples += n
            due = self.reporter.due()
        if due and n > 0 and self.reporter.mode != "log":  # the log gets one line per unit, no more
            self.reporter.emit(self.line())

    def finish(self, name: str | None = None, samples: int = 0, *, skipped: bool = False) -> None:
        """One unit done (``samples`` of it not counted yet)."""
        counted = self.count_done() if self.count_done is not None else None
        with self.lock:
            self.done += 1
            if counted is not None:
                self.done = max(self.done, counted)
            self.skipped += skipped
            self.samples += samples
            last = self.total is not None and self.done >= self.total
            text = self.line(name if self.reporter.mode == "log" else None)
        self.reporter.emit(text, force=last or self.reporter.mode == "log")

    def skip(self, name: str | None = None, size: int = 0) -> None:
        self.finish(name, size, skipped=True)

    @contextlib.contextmanager
    def unit(self, name: str | None = None, size: int = 0):
        handle = _Unit(self)
        try:
            yield handle
        except BaseException:
            with self.lock:
                self.samples -= handle.done
            raise
        self.finish(name, max(0, size - handle.done))

    def update(self, n: int = 1) -> None:
        """Samples outside a unit frame."""
        self.add_samples(n)

    def close(self) -> None:
        self.reporter.close()


class StageCounts:
    """Records seen and kept per stage, in the order stages first report: at most one line per
    interval (``read 120,000 records (4,000/s); caption_rules: 118,203 kept of 120,000``)."""

    def __init__(self, label: str, *, reporter: Reporter, clock=time.monotonic, first: str = "read"):
        self.label, self.reporter, self.clock, self.first = label, reporter, clock, first
        self.start = clock()
        self.seen: dict[str, int] = {}
        self.kept: dict[str, int] = {}
        self.lock = threading.Lock()

    def add(self, stage: str, seen: int, kept: int | None = None) -> None:
        with self.lock:
            self.seen[stage] = self.seen.get(stage, 0) + seen
            self.kept[stage] = self.kept.get(stage, 0) + (seen if kept is None else kept)
            due = self.reporter.due()
        if due:
            self.reporter.emit(self.line())

    def line(self, final: bool = False) -> str:
        with self.lock:
            elapsed = self.clock() - self.start
            parts = []
            for stage, seen in self.seen.items():
                if stage == self.first:
                    rate = f" ({seen / elapsed:,.0f}/s)" if elapsed > 0 else ""
                    parts.append(f"{self.first} {seen:,} records{rate}")
                else:
                    parts.append(f"stage {stage}: {self.kept[stage]:,} kept of {seen:,}")
        what = "; ".join(parts) if parts else "no records yet"
        return f"{self.label}: {what} ({'done in ' if final else ''}{format_duration(elapsed)}" \
               f"{'' if final else ' elapsed'})"

    def close(self) -> None:
        """The totals, once, whatever the interval."""
        if self.reporter.on:
            self.reporter.emit(self.line(final=True), force=True)
        self.reporter.close()
