"""User errors: the one exception type that every command turns into one line on stderr and exit 2.

Libraries raise ``UserError`` (or a subclass) for what the person at the keyboard can fix: a bad
flag, a missing or wrong-schema file, an output path that is a file, an unknown preset. Everything
else is a bug and keeps its traceback. ``run_main`` is the wrapper each entry point's ``main`` uses (Ctrl-C there is one line too, exit 130):

    def main(argv=None):
        return run_main("distill train", _main, argv)

A traceback for a user error is printed only with ``--debug`` in argv or ``DISTILL_DEBUG=1``.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback

EXIT_USAGE = 2  # argparse's own code for bad arguments; every user error uses it
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C


class UserError(ValueError):
    """A problem the user can fix; its message is the whole story, on one line."""


# Warnings a dependency logs on import that say nothing to the user of a command: Beam warns on
# the root logger that the optional Google API client is absent (GCP IO is not used here).
QUIET_WARNINGS = ("apitools not found",)


class QuietKnownWarnings(logging.Filter):
    """Root-logger filter dropping the records that start with one of ``QUIET_WARNINGS``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(QUIET_WARNINGS)


def quiet_known_warnings() -> None:
    """Install ``QuietKnownWarnings`` on the root logger once: where a command starts, before it
    imports Beam, so a user error is really one line on stderr."""
    root = logging.getLogger()
    if not any(isinstance(f, QuietKnownWarnings) for f in root.filters):
        root.addFilter(QuietKnownWarnings())


def debug_requested(argv: list[str] | None) -> bool:
    return os.environ.get("DISTILL_DEBUG", "") not in ("", "0") or "--debug" in (argv or [])


def run_main(prog: str, fn, argv: list[str] | None = None) -> int:
    """Call ``fn(argv)`` (``--debug`` removed); a ``UserError`` becomes ``prog: error: msg`` and exit 2."""
    quiet_known_warnings()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    argv = [a for a in argv if a != "--debug"]
    try:
        return int(fn(argv) or 0)
    except UserError as err:
        if debug:
            traceback.print_exc()
        message = " ".join(str(err).split())  # one line, whatever the message held
        print(f"{prog}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print(f"{prog}: interrupted: what was written stays as a kill leaves it (complete shards and checkpoints; "
              "the same command resumes)", file=sys.stderr)
        return EXIT_INTERRUPTED
