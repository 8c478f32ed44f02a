"""The ``liftcam-jax`` command line: ``demo``, ``explain``, ``evaluate``, ``bench``.

The CLI is generic over a *zoo*: any object (a module will do) with

* ``names() -> list[str]``: the model names it knows;
* ``load(name, weights=None, layer=None) -> liftcam_jax.Classifier``:
  ``weights`` is ``None`` (the model's pretrained default, or an error saying how
  to get one), ``"random"``, or a checkpoint path;
* ``sample_images() -> list[pathlib.Path]``: photos for the demo.

The library never imports a zoo; the ``liftcam-jax`` console script passes the
Flax zoo in ``models`` (``models.cli:main``). User mistakes print one line,
``liftcam-jax: error: ...``, and exit with status 2.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from .errors import LiftcamError

COMMANDS = ("demo", "explain", "evaluate", "bench", "status")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        raise SystemExit(_fail(f"{message} (see '{self.prog} --help')"))


def _fail(message: str) -> int:
    print(f"liftcam-jax: error: {message}", file=sys.stderr)
    return 2


def enable_compilation_cache(path: str | None = None) -> None:
    """A persistent XLA compilation cache for CLI runs: ``$LIFTCAM_JAX_CACHE/xla``
    (default ``~/.cache/liftcam-jax/xla``), beside the zoo's converted parameters in
    ``$LIFTCAM_JAX_CACHE/params``."""
    import jax

    root = os.environ.get("LIFTCAM_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "liftcam-jax")
    path = path or os.path.join(root, "xla")
    try:
        os.makedirs(path, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    except Exception:  # a read-only home must not stop a run
        pass


def build_parser(zoo) -> argparse.ArgumentParser:
    parser = _Parser(prog="liftcam-jax", description=__doc__.splitlines()[0])
    from . import __version__

    parser.add_argument("--version", action="version", version=f"liftcam-jax {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        mod = importlib.import_module(f".commands.{name}", __package__)
        p = sub.add_parser(name, help=mod.__doc__.strip().splitlines()[0], description=mod.__doc__)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv=None, zoo=None) -> int:
    if zoo is None:
        return _fail("no model zoo given (run the 'liftcam-jax' console script, or pass zoo=)")
    parser = build_parser(zoo)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    enable_compilation_cache()
    try:
        return int(args._run(args, zoo) or 0)
    except LiftcamError as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        return _fail("interrupted")
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
        return _fail(f"{e.strerror or e}: {e.filename}" if getattr(e, "filename", None) else str(e))
