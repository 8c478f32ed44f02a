"""The run loop shared by ``explain`` and ``evaluate``: reading, batching, the compiled sharded step.

**Reading.** A background thread (:class:`Reader`) reads and decodes the
inputs with a small thread pool, applies the model's preprocessing and groups
them into batches of :class:`Entry`; a bounded queue (``prefetch`` batches)
and a bounded read-ahead window keep memory flat whatever the dataset's size.
:func:`run_loop` hands each batch to the command, which launches it on the
devices while the previous one is written (JAX dispatch is asynchronous).

**Devices.** :func:`compiled_step` is the one explain step of every run: a
:class:`jax.sharding.Mesh` over the given devices with one axis, ``batch``;
inputs and targets placed with ``NamedSharding(mesh, P("batch"))``,
parameters replicated (``NamedSharding(mesh, P())``), each device explaining
its slice of the batch. It is compiled ahead of time once per input signature
(and the compile time recorded), and cached per model split, method, options
and devices. A short batch is padded with zeros only to the next power of two
times the device count (:func:`padded_size`); padded rows are never recorded.
"""
from __future__ import annotations

import collections
import concurrent.futures as futures
import dataclasses
import functools
import os
import queue
import threading
import time
from typing import Any, Dict, NamedTuple, Optional

import numpy as np

from ..data import DataOptions, Item, ItemError, label_mapping
from ..errors import UsageError, one_line

__all__ = ["Entry", "Meta", "Progress", "Reader", "compiled_step", "label_class", "label_classes",
           "num_classes", "padded_size", "process_share", "run_loop"]


_DATA_FIELDS = tuple(f.name for f in dataclasses.fields(DataOptions))


def configure(config, options: dict):
    """``config`` (a dataclass with a ``data`` :class:`DataOptions` field) with ``options`` replaced; the
    names of :class:`DataOptions` fields (``data_dir=``...) set ``config.data``'s."""
    options = dict(options)
    data = {k: options.pop(k) for k in _DATA_FIELDS if k in options}
    if data:
        options["data"] = dataclasses.replace(options.get("data", config.data), **data)
    return dataclasses.replace(config, **options)


def process_share(process_index: Optional[int], process_count: Optional[int]):
    """``(index, count)`` of this process (default JAX's); a :class:`UsageError` when out of range."""
    import jax

    pi = jax.process_index() if process_index is None else int(process_index)
    pc = jax.process_count() if process_count is None else int(process_count)
    if not 0 <= pi < pc:
        raise UsageError(f"process index {pi} out of range for {pc} processes")
    return pi, pc


def num_classes(classifier) -> int:
    """The classifier's number of classes (``jax.eval_shape`` of one input)."""
    import jax

    size = int(classifier.preprocess.size)
    x = jax.ShapeDtypeStruct((1, size, size, 3), np.float32)
    return int(jax.eval_shape(lambda p, v: classifier.split(p, v), classifier.params, x).shape[-1])


# ---------------------------------------------------------------------------
# labels -> classes
# ---------------------------------------------------------------------------

def label_classes(classifier, source, classes: int, label_map=None) -> Optional[np.ndarray]:
    """``dataset label -> model class`` of a labelled source (:func:`liftcam_jax.data.label_mapping`;
    ``-1``: no class), or ``None`` when its labels already are the model's classes (``labels.csv``).

    A :class:`UsageError` before any work for a source without labels, or labels that cannot be mapped.
    """
    if source.labels_are_classes:
        return None
    names = source.label_names
    spec = source.spec
    if names is None:
        raise UsageError(f"--target label needs labelled inputs (a TFDS split with a ClassLabel feature); "
                         f"{spec or source.items[0].source} has no labels")
    return label_mapping(names, classes, class_ids=classifier.class_ids, class_names=classifier.class_names,
                         label_map=label_map, dataset=spec or "the dataset")


def label_class(mapping: Optional[np.ndarray], meta: "Meta", classes: int, model: str) -> int:
    """The model class of an entry's label (``mapping`` from :func:`label_classes`), or an
    :class:`~liftcam_jax.data.ItemError` saying why there is none (that entry fails alone)."""
    label = meta.label
    if label is None:
        raise ItemError("no label to explain (target 'label')")
    if mapping is not None:  # a dataset label: the dataset's numbering, mapped to the model's
        if not 0 <= label < len(mapping) or mapping[label] < 0:
            raise ItemError(f"dataset label {label} ({meta.label_name}) has no class in {model} "
                            "(give one with --label-map)")
        label = int(mapping[label])
    if not 0 <= label < classes:
        raise ItemError(f"label {label} out of range for {model} ({classes} classes)")
    return int(label)


# ---------------------------------------------------------------------------
# the compiled, sharded step
# ---------------------------------------------------------------------------

class _Step:
    """An explain step compiled ahead of time per input signature, with the seconds compiling took."""

    def __init__(self, jitted):
        self.jitted = jitted
        self.programs: Dict[Any, Any] = {}
        self.compile_s = 0.0

    def program(self, params, x, targets, key):
        """The compiled program for these arguments' shapes and shardings (compiled on first use, timed)."""
        sig = tuple(None if a is None else (a.shape, a.dtype, getattr(a, "sharding", None)) for a in (x, targets, key))
        program = self.programs.get(sig)
        if program is None:
            t0 = time.perf_counter()
            program = self.programs[sig] = self.jitted.lower(params, x, targets, key).compile()
            self.compile_s += time.perf_counter() - t0
        return program

    def __call__(self, params, x, targets, key):
        return self.program(params, x, targets, key)(params, x, targets, key)


_STEPS: Dict[Any, Any] = {}


def compiled_step(split, method, options: dict, devices: tuple, smoothing=None):
    """``(step, data, replicated)``: the jitted ``step(params, x, targets, key) -> Explanation``
    with batch-sharded outputs over ``devices``, and the input and parameter shardings (cached).

    ``method`` is a registered :class:`~liftcam_jax.methods.Method`, ``options`` its options;
    ``smoothing``: a :class:`liftcam_jax.smoothing.Smoothing` (aug/eigen smoothing, layer fusion) or ``None``.
    """
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from ..explain import explain as _explain

    try:
        cache_key = (split, method, tuple(sorted(options.items())), devices, smoothing)
        hash(cache_key)
    except TypeError:
        cache_key = None
    if cache_key is not None and cache_key in _STEPS:
        return _STEPS[cache_key]
    mesh = Mesh(np.asarray(devices, dtype=object), ("batch",))
    data = NamedSharding(mesh, P("batch"))
    repl = NamedSharding(mesh, P())

    if smoothing is not None and smoothing.active:
        explain = functools.partial(smoothing.explain, split)
    else:
        explain = functools.partial(_explain, split)

    def step(params, x, targets, key):
        return explain(params, x, targets, method=method, key=key, **options)

    entry = (_Step(jax.jit(step, out_shardings=data)), data, repl)
    if cache_key is not None:
        _STEPS[cache_key] = entry
    return entry


def padded_size(n: int, batch_size: int, devices: int) -> int:
    """Rows a batch of ``n`` inputs is padded to: a power of two times ``devices``, at most ``batch_size``.

    Full batches run as they are; a short one (one photo, the tail of a
    dataset) is padded only to the next bucket, so it costs about what its own
    size costs, and a run compiles at most ``log2(batch_size / devices) + 1`` shapes.
    """
    per_device = -(-int(n) // devices)
    return min(int(batch_size), devices * (1 << (per_device - 1).bit_length()))


# ---------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------

MAX_RESIZED_PIXELS = 1 << 26  # 67 Mpx: ~200 MB for the resized RGB intermediate


def _check_resize_cost(prep, hw) -> None:
    """Refuse images whose aspect ratio would blow up ``shorter_crop``'s intermediate image.

    ``shorter_crop`` resizes the shorter side to ``resize_to`` before cropping,
    so a 1 x 100000 strip would become 256 x 25.6 M pixels.
    """
    h, w = int(hw[0]), int(hw[1])
    if getattr(prep, "resize", None) != "shorter_crop" or min(h, w) < 1:
        return
    r = int(getattr(prep, "resize_to", prep.size))
    pixels = r * int(r * max(h, w) / min(h, w))
    if pixels > MAX_RESIZED_PIXELS:
        raise ItemError(
            f"aspect ratio too extreme ({w}x{h}): resizing the shorter side to {r} would make a "
            f"{pixels}-pixel image (limit {MAX_RESIZED_PIXELS})"
        )


class Meta(NamedTuple):
    """What a batch entry carries besides its pixels: the source's label and boxes, the stored size."""

    label: Optional[int]
    label_name: Optional[str]
    boxes: Optional[np.ndarray]  # (n, 4) in pixels of the stored image
    size: tuple  # (H, W) of the stored image


class Entry(NamedTuple):
    """One input of a batch: the preprocessed ``x``, the resized image ``shown`` (or ``None``) and its :class:`Meta`."""

    item: Item
    x: np.ndarray
    shown: Optional[np.ndarray]
    meta: Meta


class Reader(threading.Thread):
    """Reads, decodes and preprocesses items; emits ``("batch", entries)`` and ``("fail", item, msg)``.

    A batch is a list of :class:`Entry` (``shown`` only with ``keep_display``).
    """

    def __init__(self, work, preprocess, batch_size, keep_display, workers, prefetch):
        super().__init__(daemon=True, name="liftcam-reader")
        self.work = work  # [(source, [items])]
        self.prep = preprocess
        self.batch_size = batch_size
        self.keep_display = keep_display
        self.workers = max(1, int(workers))
        self.window = max(batch_size, 2 * self.workers)
        self.events: "queue.Queue" = queue.Queue(maxsize=max(1, prefetch))
        self.stop = threading.Event()

    def _emit(self, event) -> bool:
        while not self.stop.is_set():
            try:
                self.events.put(event, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _prepare(self, item: Item, fetch):
        ex = fetch()
        arr = ex.image
        meta = Meta(ex.label, ex.label_name, ex.boxes, tuple(np.shape(arr)[:2]))
        size = int(self.prep.size)
        if item.kind == "image":
            _check_resize_cost(self.prep, arr.shape[:2])
            shown = self.prep.resize_image(arr)
            x = np.asarray(self.prep.normalize(shown), np.float32)
            return x, (shown if self.keep_display else None), meta
        x = np.asarray(arr, np.float32)
        if x.shape != (size, size, 3):
            raise ItemError(f"array input has shape {x.shape}; the model takes preprocessed ({size}, {size}, 3)")
        return x, None, meta

    def run(self):
        pool = futures.ThreadPoolExecutor(self.workers, thread_name_prefix="liftcam-decode")
        pending: "collections.deque" = collections.deque()
        buf: list = []

        def finish_one() -> bool:
            item, fut = pending.popleft()
            try:
                x, shown, meta = fut.result()
            except ItemError as e:
                return self._emit(("fail", item, str(e)))
            except MemoryError:
                return self._emit(("fail", item, "out of memory while decoding"))
            except Exception as e:  # any other failure of one input is that input's failure
                return self._emit(("fail", item, f"{type(e).__name__}: {one_line(e)}"))
            buf.append(Entry(item, x, shown, meta))
            if len(buf) == self.batch_size:
                ok = self._emit(("batch", list(buf)))
                buf.clear()
                return ok
            return True

        try:
            for source, items in self.work:
                for item, load in source.read(items):
                    if self.stop.is_set():
                        return
                    if item.error:
                        fut: futures.Future = futures.Future()
                        fut.set_exception(ItemError(item.error))
                    else:
                        fut = pool.submit(self._prepare, item, load)
                    pending.append((item, fut))
                    while len(pending) >= self.window:
                        if not finish_one():
                            return
            while pending:
                if not finish_one():
                    return
            if buf:
                if not self._emit(("batch", list(buf))):
                    return
            self._emit(("end",))
        except BaseException as e:  # surfaced in the main thread
            self._emit(("error", e))
        finally:
            pool.shutdown(wait=False, cancel_futures=True)


class Progress:
    """A progress bar (``tqdm``: rate and ETA) that also prints lines above itself."""

    def __init__(self, total: int, desc: str, unit: str, quiet: bool, stream):
        from tqdm import tqdm

        self.quiet, self.stream = quiet, stream
        self.bar = tqdm(total=total, unit=unit, desc=desc, file=stream, disable=quiet, dynamic_ncols=True,
                        smoothing=0.1)

    def update(self, n: int = 1, **postfix) -> None:
        if postfix:
            self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(n)

    def write(self, line: str) -> None:
        if self.quiet:
            print(line, file=self.stream)
        else:
            self.bar.write(line, file=self.stream)

    def close(self) -> None:
        self.bar.close()


def run_loop(work, preprocess, batch_size: int, *, launch, fail, finish=None, keep_display=False,
             workers: Optional[int] = None, prefetch: int = 2) -> None:
    """Read ``work`` (``[(source, items)]``) in batches and hand them over: the one loop of every run.

    ``launch(entries, index)`` gets each batch (a list of :class:`Entry`) and
    returns a handle, or ``None`` when it has nothing to finish; ``finish(handle)`` is called for a batch once the next one has
    been launched (so writing overlaps JAX's asynchronous compute), and for the
    last one at the end. ``fail(item, message)`` is called for every input that
    cannot be read. A failure of the reading machinery itself is raised.
    """
    if workers is None:
        workers = max(1, min(4, os.cpu_count() or 1))
    reader = Reader(work, preprocess, batch_size, keep_display, workers, prefetch)
    in_flight, batches = None, 0
    reader.start()
    try:
        while True:
            event = reader.events.get()
            if event[0] == "fail":
                fail(event[1], event[2])
            elif event[0] == "batch":
                handle = launch(event[1], batches)
                batches += 1
                if in_flight is not None and finish is not None:
                    finish(in_flight)
                in_flight = handle
            elif event[0] == "end":
                break
            else:  # "error"
                raise event[1]
        if in_flight is not None and finish is not None:
            finish(in_flight)
    finally:
        reader.stop.set()
