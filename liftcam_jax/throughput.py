r"""How close a dataset run comes to its compute bound.

A dataset run (:func:`liftcam_jax.batch.run`) decodes, explains and writes.
Its bound is the compiled step alone: no run can explain faster than
``t_step`` seconds an image. :func:`dataset_efficiency` measures, on the same
``n`` inputs and in one process,

* **step**: the run's own compiled, sharded step (the same jitted function,
  so the same compiled program) on already-preprocessed batches of
  ``batch_size`` (the tail padded as the run pads it), after one untimed call
  per batch shape, each call ending with the explanation copied to the host;
* **decode**: reading, decoding and preprocessing every input on one thread;
* **run**: ``batch.run`` over the same inputs into a fresh folder, once per
  ``save`` mode, after an untimed warm-up run over a few inputs.

and reports, per image, the wall-clock time ``t`` and the CPU time ``c``
(``time.process_time``: every thread of the process) of each, and the
efficiency of each run::

    efficiency     = t_step / t_run        (1 = the run is as fast as its step)
    cpu_efficiency = c_step / c_run        (the share of the run's CPU time spent in the step)

On a machine shared with other busy processes the wall clock measures the
scheduler as much as the program; CPU time measures the work, and on a busy
machine its ratio is the steadier of the two. With several ``repeats`` every
figure is the median over the repeats (each repeat measures the step and then
the runs, so they see about the same load).
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from .errors import UsageError, positive_int

__all__ = ["DatasetEfficiency", "Timing", "dataset_efficiency"]


class Timing(NamedTuple):
    """Per-image seconds of one measured stage: wall clock and CPU (all the process's threads)."""

    seconds: float
    cpu_seconds: float


class DatasetEfficiency(NamedTuple):
    """What :func:`dataset_efficiency` measured (per-image :class:`Timing`; see the module doc)."""

    model: str
    method: str
    images: int
    batch_size: int
    devices: int
    cpus: int
    repeats: int
    step: Timing
    decode: Timing
    runs: Dict[str, Timing]  # save mode -> the full run's timing

    def efficiency(self, save: str) -> float:
        """``t_step / t_run`` for the run that saved ``save``."""
        return self.step.seconds / self.runs[save].seconds

    def cpu_efficiency(self, save: str) -> float:
        """``c_step / c_run`` for the run that saved ``save``."""
        return self.step.cpu_seconds / self.runs[save].cpu_seconds

    def to_markdown(self) -> str:
        """A table: ms an image (wall and CPU) of the step, decoding and each run, and the runs' efficiencies."""
        head = (f"{self.model}, {self.method}, {self.images} images, batch {self.batch_size}, "
                f"{self.devices} device{'s' if self.devices != 1 else ''}, {self.cpus} CPUs, "
                f"median of {self.repeats} repeat{'s' if self.repeats != 1 else ''}")
        rows = [
            "| stage | ms/image | CPU ms/image | efficiency | CPU efficiency |",
            "|---|---:|---:|---:|---:|",
            f"| compiled step alone (the bound) | {1e3 * self.step.seconds:.1f} | "
            f"{1e3 * self.step.cpu_seconds:.1f} | | |",
            f"| decode + preprocess alone (1 thread) | {1e3 * self.decode.seconds:.1f} | "
            f"{1e3 * self.decode.cpu_seconds:.1f} | | |",
        ]
        for save, t in self.runs.items():
            rows.append(f"| `batch.run`, save={save} | {1e3 * t.seconds:.1f} | {1e3 * t.cpu_seconds:.1f} | "
                        f"{100 * self.efficiency(save):.0f}% | {100 * self.cpu_efficiency(save):.0f}% |")
        return head + "\n\n" + "\n".join(rows) + "\n"


def _clock() -> Tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(start: Tuple[float, float], n: int) -> Timing:
    wall, cpu = _clock()
    return Timing((wall - start[0]) / n, (cpu - start[1]) / n)


def _median(timings: Sequence[Timing]) -> Timing:
    return Timing(statistics.median(t.seconds for t in timings), statistics.median(t.cpu_seconds for t in timings))


def _decode_all(preprocess, sources, limit: Optional[int]) -> List[np.ndarray]:
    """Every input (up to ``limit``) read, decoded and preprocessed, as the run's reader does it, on this thread."""
    out: List[np.ndarray] = []
    for source in sources:
        items = source.items[: None if limit is None else limit - len(out)]
        for item, fetch in source.read(items):
            if item.error:
                raise UsageError(f"cannot measure on {item.source}: {item.error}")
            arr = fetch().image
            x = preprocess(arr) if item.kind == "image" else arr
            out.append(np.asarray(x, np.float32))
        if limit is not None and len(out) >= limit:
            break
    return out


def _check(batch_size: int, repeats: int, limit: Optional[int], saves: Sequence[str]) -> None:
    """A one-line :class:`~liftcam_jax.errors.UsageError` for a bad argument of :func:`dataset_efficiency`."""
    from .batch import SAVE_MODES

    positive_int("batch size", batch_size)
    positive_int("repeats", repeats)
    if limit is not None:
        positive_int("limit", limit)
    for save in saves:
        if save not in SAVE_MODES:
            raise UsageError(f"unknown save mode {save!r}; valid: {', '.join(SAVE_MODES)}")


def _stepper(classifier, method, options: dict, devices: tuple, batch_size: int):
    """``one_pass(xs)``: the run's compiled, sharded step over preprocessed inputs ``xs``.

    In batches of ``batch_size`` (the tail padded as the run pads it), each
    call ending with the explanation copied to the host.
    """
    import jax

    from .batch import padded_size
    from .runs.loop import compiled_step

    step, data, repl = compiled_step(classifier.split, method, options, devices)
    params = jax.device_put(classifier.params, repl)
    base_key = jax.random.PRNGKey(0) if method.needs_key else None

    def one_pass(xs: List[np.ndarray]) -> None:
        for b, start in enumerate(range(0, len(xs), batch_size)):
            chunk = xs[start:start + batch_size]
            x = np.zeros((padded_size(len(chunk), batch_size, len(devices)), *chunk[0].shape), np.float32)
            x[: len(chunk)] = np.stack(chunk)
            key = None if base_key is None else jax.random.fold_in(base_key, b)
            jax.device_get(step(params, jax.device_put(x, data), None, key))

    return one_pass


def _timed_run(classifier, sources, out_dir: str, save: str, n: int, run_kw: dict) -> Timing:
    """``batch.run`` over the first ``n`` inputs into ``out_dir``, per image; every input must be explained."""
    from .batch import run

    t0 = _clock()
    summary = run(classifier, sources, out_dir=out_dir, save=save, limit=n, **run_kw)
    timing = _since(t0, n)
    if summary.done != n:
        raise UsageError(f"the {save} run explained {summary.done} of {n} inputs "
                         f"({summary.failed} failed): measure on inputs that all decode")
    return timing


def dataset_efficiency(
    classifier,
    inputs: Sequence,
    *,
    method: str = "lift-cam",
    options: Optional[dict] = None,
    batch_size: int = 32,
    saves: Sequence[str] = ("raw", "both"),
    limit: Optional[int] = 256,
    repeats: int = 1,
    out_dir=None,
    **run_options,
) -> DatasetEfficiency:
    """Measure a dataset run against its compiled step (see the module doc).

    Args:
      classifier: a loaded classifier (``models.load(...)`` or your own).
      inputs: what :func:`liftcam_jax.batch.run` takes (paths, folders, ``tfds:`` specs, sources).
      method, options, batch_size: as for the run.
      saves: the save modes to run (``"raw"``, ``"overlay"``, ``"both"``).
      limit: the first ``limit`` inputs (all of them, preprocessed, are held in
        memory for the step measurement: 0.6 MB each at 224 x 224).
      repeats: measure everything this many times; figures are medians.
      out_dir: where the runs write (a fresh sub-folder per run); default a
        temporary folder, removed afterwards.
      run_options: further :class:`liftcam_jax.batch.RunConfig` fields (``workers``, ``alpha``...).

    Returns:
      a :class:`DatasetEfficiency`; ``to_markdown()`` renders it.
    """
    import jax

    from . import methods as _methods
    from .batch import run
    from .data import open_inputs

    _check(batch_size, repeats, limit, saves)
    m = _methods.resolve(method)
    options = dict(options or {})
    sources = list(inputs)
    if not sources or not all(hasattr(s, "items") and hasattr(s, "read") for s in sources):
        sources = open_inputs([os.fspath(s) for s in sources])

    devs = tuple(run_options.get("devices") or jax.local_devices())
    bs = -(-int(batch_size) // len(devs)) * len(devs)  # as the run rounds it
    one_pass = _stepper(classifier, m, options, devs, bs)
    run_kw = dict(method=method, options=options or None, batch_size=bs, quiet=True, **run_options)
    with tempfile.TemporaryDirectory(prefix="liftcam-throughput-") as tmp:
        root = os.fspath(out_dir) if out_dir is not None else tmp
        decode: List[Timing] = []
        steps: List[Timing] = []
        runs: Dict[str, List[Timing]] = {s: [] for s in saves}
        xs: List[np.ndarray] = []
        for r in range(repeats):
            t0 = _clock()
            xs = _decode_all(classifier.preprocess, sources, limit)
            if not xs:
                raise UsageError("no inputs to measure on")
            decode.append(_since(t0, len(xs)))
            if r == 0:  # compile every batch shape, and warm the run's own machinery up
                tail = len(xs) % bs
                one_pass(xs[: bs + tail])
                for save in saves:
                    run(classifier, sources, out_dir=os.path.join(root, f"warm-up-{save}"), save=save,
                        limit=min(len(xs), bs + tail), **run_kw)
            t0 = _clock()
            one_pass(xs)
            steps.append(_since(t0, len(xs)))
            for save in saves:
                runs[save].append(_timed_run(classifier, sources, os.path.join(root, f"run-{r}-{save}"), save,
                                             len(xs), run_kw))
    return DatasetEfficiency(
        model=str(getattr(classifier, "name", "model")), method=method, images=len(xs), batch_size=bs,
        devices=len(devs), cpus=os.cpu_count() or 1, repeats=repeats, step=_median(steps), decode=_median(decode),
        runs={s: _median(t) for s, t in runs.items()},
    )
