"""User errors: the one exception type that every command turns into one line on stderr and exit 2.

Libraries raise ``UserError`` (or a subclass) for what the person at the keyboard can fix: a bad
flag, a missing or wrong-schema file, an output path that is a file, an unknown preset. Everything
else is a bug and keeps its traceback. ``run_main`` is the wrapper each entry point's ``main`` uses:

    def main(argv=None):
        return run_main("distill train", _main, argv)

A traceback for a user error is printed only with ``--debug`` in argv or ``DISTILL_DEBUG=1``.
"""

from __future__ import annotations

import os
import sys
import traceback

EXIT_USAGE = 2  # argparse's own code for bad arguments; every user error uses it


class UserError(ValueError):
    """A problem the user can fix; its message is the whole story, on one line."""


def debug_requested(argv: list[str] | None) -> bool:
    return os.environ.get("DISTILL_DEBUG", "") not in ("", "0") or "--debug" in (argv or [])


def run_main(prog: str, fn, argv: list[str] | None = None) -> int:
    """Call ``fn(argv)`` (``--debug`` removed); a ``UserError`` becomes ``prog: error: msg`` and exit 2."""
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
