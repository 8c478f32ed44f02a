"""The ``liftcam-jax`` command line: ``demo``, ``explain``, ``evaluate``, ``bench``.

The CLI is generic over a *zoo*: any object (a module will do) with

* ``names() -> list[str]``: the model names it knows;
* ``load(name, weights=None, layer=None) -> liftcam_jax.Classifier``:
  ``weights`` is ``None`` (the model's pretrained default, or an error saying how
  to get one), ``"random"``, or a checkpoint path;
* ``sample_images() -> list[pathlib.Path]``: photos for the demo;
* optionally ``DEFAULT_MODEL``: the model every command uses without
  ``--model`` (otherwise ``efficientnet_lite0`` when the zoo has it, the bundled
  pretrained model of the Flax zoo, else the zoo's only model).

The library never imports a zoo by name: the ``liftcam-jax`` console script
(:func:`console_main`) loads the one a package declares in the
``liftcam_jax.zoos`` entry-point group (this project declares its Flax zoo,
``models``; ``python -m models.cli`` runs the same CLI over it directly). User
mistakes print one line, ``liftcam-jax: error: ...``, and exit with status 2.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import os
import re
import sys

from .errors import LiftcamError, UsageError, one_line

COMMANDS = ("demo", "explain", "evaluate", "bench", "status")
ZOO_GROUP = "liftcam_jax.zoos"
ZOO_VARIABLE = "LIFTCAM_JAX_ZOO"


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

    from .files import cache_root

    path = path or cache_root("xla")
    try:
        os.makedirs(path, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    except Exception:  # a read-only home must not stop a run
        pass


def plain(text: str) -> str:
    """Docstring reST as terminal text: ``code`` and :role:`target` lose their markup."""
    text = re.sub(r":[\w:]+:`~?([^`]+)`", r"\1", text)
    return re.sub(r"``(.+?)``", r"\1", text)


def build_parser(zoo) -> argparse.ArgumentParser:
    parser = _Parser(prog="liftcam-jax", description=plain(__doc__.splitlines()[0]))
    from . import __version__

    parser.add_argument("--version", action="version", version=f"liftcam-jax {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        mod = importlib.import_module(f".commands.{name}", __package__)
        doc = plain(mod.__doc__.strip())
        summary = doc.splitlines()[0].removeprefix(f"{name}:").strip()
        p = sub.add_parser(name, help=summary, description=doc,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
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


def find_zoo():
    """The model zoo a package declares in the ``liftcam_jax.zoos`` entry-point group, loaded.

    One declared zoo is used; with several, ``$LIFTCAM_JAX_ZOO`` names one. No
    zoo (or an unknown name) is a one-line :class:`UsageError`.
    """
    found = {ep.name: ep for ep in importlib.metadata.entry_points(group=ZOO_GROUP)}
    if not found:
        raise UsageError(f"no model zoo is installed (a package that declares a {ZOO_GROUP!r} entry point; "
                         "this project's: pip install -e .)")
    wanted = os.environ.get(ZOO_VARIABLE)
    if wanted is None and len(found) > 1:
        raise UsageError(f"several model zoos are installed ({', '.join(sorted(found))}); "
                         f"choose one with {ZOO_VARIABLE}=NAME")
    name = wanted if wanted is not None else next(iter(found))
    if name not in found:
        raise UsageError(f"{ZOO_VARIABLE}={name!r} is not an installed model zoo; installed: {', '.join(sorted(found))}")
    try:
        return found[name].load()
    except Exception as e:
        raise UsageError(f"cannot load model zoo {name!r} ({found[name].value}): {one_line(e)}") from None


def console_main(argv=None) -> int:
    """The ``liftcam-jax`` console script: :func:`main` over the installed zoo (:func:`find_zoo`)."""
    try:
        zoo = find_zoo()
    except UsageError as e:
        return _fail(str(e))
    return main(argv, zoo=zoo)
