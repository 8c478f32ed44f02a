"""Finding a TFDS dataset on disk, or preparing it, with one-line errors that name a step that works.

What TFDS itself does, and what the messages here rely on (tensorflow-datasets 4.9):

* ``tfds.builder`` of an unknown name raises ``DatasetNotFoundError`` whose long
  message lists every dataset and, near its end, ``Did you mean: a -> b ?``:
  that suggestion is kept (:func:`not_found_error`).
* A builder with ``MANUAL_DOWNLOAD_INSTRUCTIONS`` (imagenet2012, ...) reads its
  archives from ``<data_dir>/downloads/manual`` (:func:`manual_dir`); preparing
  it without them fails deep in TFDS with a multi-line message, so it is checked
  before, and the instructions are given collapsed to one line.
* Preparing runs the builder's own code. TFDS's catalog builders (all of
  ``tensorflow_datasets/datasets/*``, imagenette and imagenet2012 included)
  import TensorFlow (lazily) and use ``tf.io.gfile`` and ``tf.image`` to read
  their archives, so preparing them needs TensorFlow even with
  ``file_format='array_record'``; a builder whose module never binds
  ``tensorflow`` (e.g. one of yours yielding image bytes) prepares without it
  (:func:`needs_tensorflow`). Reading the prepared array_record files never
  needs TensorFlow.
* TFDS logs through absl (``WARNING:absl:...``); those lines are held back
  while TFDS is called and dropped when a one-line error follows
  (:func:`absl_quiet`).
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
import sys
import textwrap
import types
from typing import TYPE_CHECKING, Iterator, Optional

from ..errors import UsageError
from .base import DataOptions

if TYPE_CHECKING:  # pragma: no cover
    from .tfds import TfdsSpec

__all__ = ["absl_quiet", "manual_dir", "needs_tensorflow", "prepared_builder", "tf_available"]

_INSTRUCTIONS_SHOWN = 400  # characters of TFDS's manual-download instructions put in a message


def tf_available() -> bool:
    """Whether TensorFlow can be imported (without importing it)."""
    try:
        return importlib.util.find_spec("tensorflow") is not None
    except (ImportError, ValueError):
        return False


@contextlib.contextmanager
def absl_quiet() -> Iterator[None]:
    """Hold back absl's log records (TFDS logs through absl) while TFDS is called.

    When the block ends normally they are passed on to the ``absl`` logger as if
    just logged (nothing is hidden); when it raises, they are dropped, so the
    one-line error that follows has no ``WARNING:absl:`` lines before it.
    Records below the logger's level are never held (they would not show).
    """
    logger = logging.getLogger("absl")
    held = []

    class _Hold(logging.Handler):
        def emit(self, record):
            held.append(record)

    saved = logger.handlers[:], logger.propagate
    logger.handlers, logger.propagate = [_Hold()], False
    try:
        yield
    finally:
        logger.handlers, logger.propagate = saved
    for record in held:  # reached only without an exception
        logger.handle(record)


def _collapse(text: str, limit: Optional[int] = None) -> str:
    """Text on one line (runs of white space -> one space), cut at ``limit`` characters with ``...``."""
    text = " ".join(str(text).split())
    return text if limit is None or len(text) <= limit else text[: limit - 3].rstrip() + "..."


def _where(options: DataOptions) -> str:
    return options.data_dir or "the default TFDS data dir (~/tensorflow_datasets)"


def _spec_text(spec: "TfdsSpec", name: str) -> str:
    """``spec`` with its dataset name (the part before ``/CONFIG``) replaced by ``name``."""
    config = spec.name.partition("/")[2]
    return (f"tfds:{name}{'/' + config if config else ''}{'' if spec.version is None else '@' + spec.version}"
            f":{spec.split}")


def not_found_error(e: BaseException, spec: "TfdsSpec", options: DataOptions) -> UsageError:
    """``tfds.builder``'s failure as one line, keeping TFDS's ``Did you mean: a -> b ?``."""
    text = str(e)
    where = _where(options)
    if type(e).__name__ == "DatasetNotFoundError":
        m = re.search(r"Did you mean:\s*(\S+)\s*->\s*(\S+?)\s*\?", text)
        if m is not None:
            return UsageError(f"TFDS dataset {spec.tfds_name!r} not found in TFDS's catalog nor in {where}; "
                              f"TFDS suggests: did you mean {m[2]!r}? (input {_spec_text(spec, m[2])})")
        return UsageError(f"TFDS dataset {spec.tfds_name!r} not found in TFDS's catalog nor in {where} "
                          "(names: python -c \"import tensorflow_datasets as t; print(t.list_builders())\", "
                          "or https://www.tensorflow.org/datasets/catalog)")
    text = re.sub(r'^Failed to construct dataset "[^"]*", builder_kwargs "[^"]*":\s*', "", text.strip())
    return UsageError(f"TFDS dataset {spec.tfds_name!r} cannot be opened: {_collapse(text, 500) or type(e).__name__}")


def manual_dir(builder) -> str:
    """Where TFDS looks for a manual download: ``<data_dir>/downloads/manual`` (its default)."""
    return os.path.join(os.fspath(builder.data_dir_root), "downloads", "manual")


def _manual_instructions(builder) -> Optional[str]:
    """TFDS's ``MANUAL_DOWNLOAD_INSTRUCTIONS`` of ``builder`` on one line (``None``: no manual download)."""
    text = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
    if isinstance(text, dict):  # per builder config
        config = getattr(builder, "builder_config", None)
        text = text.get(getattr(config, "name", None))
    if not text:
        return None
    shown = _collapse(textwrap.dedent(text), _INSTRUCTIONS_SHOWN)
    if shown.endswith("..."):
        shown += (f" (all of it: python -c \"import tensorflow_datasets as t; "
                  f"print(t.builder({builder.name!r}).MANUAL_DOWNLOAD_INSTRUCTIONS)\")")
    return shown


def _manual_ready(builder) -> bool:
    d = manual_dir(builder)
    return os.path.isdir(d) and bool(os.listdir(d))


def _manual_step(builder) -> str:
    return f"put its files in {manual_dir(builder)} (TFDS: {_manual_instructions(builder)})"


def _is_tensorflow(value) -> bool:
    """``value`` is the ``tensorflow`` module (or a submodule), imported or lazily (TFDS's ``LazyModule``)."""
    if isinstance(value, types.ModuleType):
        name = value.__name__
    elif type(value).__name__ == "LazyModule":
        name = vars(value).get("module_name", "")
    else:
        return False
    return name == "tensorflow" or name.startswith("tensorflow.")


def needs_tensorflow(builder) -> bool:
    """Whether preparing ``builder`` runs TensorFlow code: its module, or a module of its package that it imports,
    binds ``tensorflow`` (TFDS's lazy ``tf`` included: it is imported at first use)."""
    module = sys.modules.get(type(builder).__module__)
    if module is None:
        return False
    package = module.__name__.rpartition(".")[0]
    modules = [module] + [v for v in vars(module).values() if isinstance(v, types.ModuleType) and package
                          and v.__name__.startswith(package + ".")]
    return any(_is_tensorflow(v) for m in modules for v in vars(m).values())


def _tensorflow_step(builder) -> str:
    return (f"TFDS's {builder.name} builder uses TensorFlow to prepare it: pip install tensorflow-cpu first "
            "(reading the prepared array_record files needs no TensorFlow)")


def not_prepared_error(builder, spec: "TfdsSpec", options: DataOptions) -> UsageError:
    """The dataset is registered but not on disk: how to prepare it, manual download and TensorFlow included."""
    name = spec.tfds_name
    dd = f", data_dir={options.data_dir!r}" if options.data_dir else ""
    manual = _manual_instructions(builder) is not None
    tf = needs_tensorflow(builder)
    steps = [f"it needs a manual download: {_manual_step(builder)}"] if manual else []
    if tf and not tf_available():
        steps.append(_tensorflow_step(builder))
    steps.append(f"prepare it once with liftcam-jax's --download, or in Python: tfds.builder({name!r}{dd}, "
                 f"file_format='array_record').download_and_prepare()" + ("" if tf else " (no TensorFlow needed)"))
    if not manual:
        steps.append(f"on Colab tfds.load({name!r}{dd}) prepares TFRecord files, also read here")
    return UsageError(f"TFDS dataset {name!r} is not prepared in {_where(options)}; " + "; ".join(steps))


def _download_and_prepare(tfds, builder, spec: "TfdsSpec", options: DataOptions):
    """``--download``: prepare as array_record, after checking what TFDS would fail on deep inside."""
    name = spec.tfds_name
    if _manual_instructions(builder) is not None and not _manual_ready(builder):
        raise UsageError(f"TFDS dataset {name!r} needs a manual download before --download can prepare it: "
                         f"{_manual_step(builder)}; then run again with --download")
    if needs_tensorflow(builder) and not tf_available():
        raise UsageError(f"cannot prepare TFDS dataset {name!r}: {_tensorflow_step(builder)}; or prepare it where "
                         f"TensorFlow is installed (e.g. Colab: tfds.load({name!r}, data_dir=...)) and read it here "
                         "with that data dir")
    try:
        builder = tfds.builder(name, data_dir=options.data_dir, file_format="array_record")
        builder.download_and_prepare()
    except Exception as e:
        raise UsageError(f"cannot download and prepare TFDS dataset {name!r}: "
                         f"{_collapse(str(e), 500) or type(e).__name__}") from None
    return builder


def prepared_builder(tfds, spec: "TfdsSpec", options: DataOptions):
    """The builder of ``spec``'s dataset as prepared on disk (prepared first with ``options.download``).

    Call inside :func:`absl_quiet`. :class:`UsageError` (one line) when the
    dataset is unknown or not prepared, or cannot be prepared.
    """
    try:
        builder = tfds.builder(spec.tfds_name, data_dir=options.data_dir)
    except Exception as e:
        raise not_found_error(e, spec, options) from None
    if not builder.is_prepared():
        if not options.download:
            raise not_prepared_error(builder, spec, options)
        builder = _download_and_prepare(tfds, builder, spec, options)
    try:  # what is on disk (a registered builder's code ignores formats added later, e.g. by tfds_to_array_record)
        return tfds.builder_from_directory(os.fspath(builder.data_dir))
    except Exception:  # pragma: no cover - an older layout: the registered builder's view
        return builder

