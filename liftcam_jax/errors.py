"""Errors that mean "the user asked for something wrong": one line, no traceback, in the CLI."""


class LiftcamError(Exception):
    """Base of the library's user-facing errors."""


class UsageError(LiftcamError, ValueError):
    """A bad name, argument or input: the message says what and what is valid."""
