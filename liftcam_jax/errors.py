"""Errors that mean "the user asked for something wrong": one line, no traceback, in the CLI.

Also the two helpers every user-facing check shares: :func:`positive_int` (an
integer argument, checked once, one way) and :func:`one_line` (an exception as a
one-line reason).
"""
from __future__ import annotations

import operator


class LiftcamError(Exception):
    """Base of the library's user-facing errors."""


class UsageError(LiftcamError, ValueError):
    """A bad name, argument or input: the message says what and what is valid."""


def positive_int(name: str, value, *, minimum: int = 1, even: bool = False) -> int:
    """``value`` as an ``int`` >= ``minimum`` (and even when ``even``); :class:`UsageError` naming ``name`` otherwise.

    Python and numpy integers are accepted; ``bool``, floats, strings and anything
    else are refused (command-line text goes through
    ``liftcam_jax.commands._args.positive_int``, argparse's wrapper of this).
    """
    try:
        v = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        v = None
    if v is None or v < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise UsageError(f"{name} must be {what}{' and even' if even else ''}, got {value!r}")
    if even and v % 2:
        raise UsageError(f"{name} must be even, got {value!r}")
    return v


def one_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
