"""bench: not built yet."""
from ..errors import UsageError


def add_arguments(parser):
    pass


def run(args, zoo):
    raise UsageError("'bench' is not available yet")
