"""demo: not built yet."""
from ..errors import UsageError


def add_arguments(parser):
    pass


def run(args, zoo):
    raise UsageError("'demo' is not available yet")
