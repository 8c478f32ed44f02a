"""evaluate: not built yet."""
from ..errors import UsageError


def add_arguments(parser):
    pass


def run(args, zoo):
    raise UsageError("'evaluate' is not available yet")
