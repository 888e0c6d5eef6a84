"""What every command line of the project does with a user's mistake.

A bad argument or config value is reported as one line on stderr, ``PROG:
error: MESSAGE``, with exit status 2 (argparse's convention), never a
traceback. Inside a command a mistake is raised as ``SystemExit(MESSAGE)``
(a string), so a caller of ``main(argv)`` can catch and read it;
:func:`run` is what a ``__main__`` block calls to turn it into that line.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Callable, Iterable
from typing import NoReturn

USAGE_ERROR = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, whose errors (unknown flags, bad types) are raised
    as ``SystemExit(MESSAGE)`` for :func:`run` to report on one line."""

    def error(self, message: str) -> NoReturn:
        raise SystemExit(message)


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """``"; did you mean A, B?"`` for the known names close to ``name``, or ``""``."""
    close = difflib.get_close_matches(str(name), [str(k) for k in known], n=3, cutoff=0.5)
    return f"; did you mean {', '.join(close)}?" if close else ""


def one_line(message: str) -> str:
    """``message`` with its lines joined, so it reads as one line on stderr."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def run(main: Callable[[], int | None], prog: str) -> NoReturn:
    """Call ``main()`` and exit with its status; a ``SystemExit`` carrying a
    message (a user's mistake) becomes ``PROG: error: MESSAGE`` on stderr and
    exit status 2."""
    try:
        code = main()
    except SystemExit as e:
        if isinstance(e.code, str):
            print(f"{prog}: error: {one_line(e.code)}", file=sys.stderr)
            sys.exit(USAGE_ERROR)
        raise
    sys.exit(code if isinstance(code, int) else 0)


def load_weights(flag: str, weights: str):
    """``lopt.load(weights)``, or ``SystemExit`` naming ``flag`` and what is
    wrong with the name or file."""
    from lopt.checkpoint import load

    try:
        return load(weights)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"{flag} {weights}: {e}") from None


def check_device(flag: str, value: str):
    """``torch.device(value)`` if this machine has it, else ``SystemExit``."""
    import torch

    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        must = "a torch device such as cpu or cuda"
        raise SystemExit(f"{flag} must be {must}, got {value!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"{flag} {value}: torch sees no CUDA device here")
    return device
