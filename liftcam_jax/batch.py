"""Explaining datasets: sharded over devices, streamed, crash-safe and resumable.

:func:`run` is what ``liftcam-jax explain`` calls; notebooks and other
commands use it directly::

    from liftcam_jax import batch
    summary = batch.run(classifier, ["photos/", "tfds:imagenette:validation[:500]"],
                        method="lift-cam", out_dir="out/", batch_size=32)

**Pipeline.** Inputs are listed first (names only, :mod:`liftcam_jax.data`).
A background thread reads and decodes them with a small thread pool, applies
the model's preprocessing and groups them into batches; a bounded queue
(``prefetch`` batches) and a bounded read-ahead window keep memory flat
whatever the dataset's size. Batches are explained while the previous one is
written (JAX dispatch is asynchronous).

**Devices.** One :class:`jax.sharding.Mesh` over the local devices with one
axis, ``batch``; inputs and targets are placed with
``NamedSharding(mesh, P("batch"))``, parameters replicated
(``NamedSharding(mesh, P())``), so each device explains its slice of every
batch. The batch size is rounded *up* to a multiple of the number of devices.
A short batch (one photo, a dataset's tail) is padded with zeros only to the
next power of two times the device count (:func:`padded_size`: a few compiled
shapes per run, never the cost of a full batch), and padded rows are never
written. Every image's result depends on that
image only, so results are the same on 1 device and on N.

**Several hosts** (``jax.distributed.initialize()`` first): host ``p`` of
``P`` explains items ``p, p + P, p + 2P, ...`` of the listing (the listing is
the same on every host) on its own local devices, and writes its own manifest
``manifest-<p>-of-<P>.jsonl`` (one host: ``manifest.jsonl``) into the shared
output folder. Hosts never wait for each other: explaining needs no
communication, and each resumes its own share.

**Outputs** (``out_dir/<item id>.npz`` and/or ``.png``; ids in
:mod:`liftcam_jax.data`): the ``.npz`` holds ``map`` ``(H, W)`` in [0, 1],
``raw`` ``(h, w)``, ``coefficients`` ``(K,)``, ``logits`` ``(C,)``,
``target``, ``predicted``, for methods with one ``reference_logits``, and
for labelled inputs (TFDS ``ClassLabel``) the dataset's ``label`` and ``label_name``;
the ``.png`` is the map over the image the model saw (the resized input; for
``.npy`` inputs the input de-normalised). ``manifest.jsonl`` has one JSON line
per input: ``id``, ``source``, ``status`` (``done``/``failed``),
``outputs``, ``error``, ``target``, ``target_name``, ``predicted``,
``predicted_name``, ``label``, ``label_name``. ``run.json`` records the model, layer, method and target:
resuming into a folder made by a different run is refused.

**Crash safety.** Files are written atomically (:mod:`liftcam_jax.io`); an
item's manifest line is appended (and ``fsync``-ed) only after its files
exist. Rerunning the same command after a crash, even ``kill -9``, skips the
items whose last manifest line says ``done`` and whose files exist, retries
failed ones, and completes the rest; a torn last manifest line is dropped.
"""
from __future__ import annotations

import collections
import concurrent.futures as futures
import dataclasses
import glob
import json
import math
import os
import queue
import sys
import threading
import time
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Union

import numpy as np

from . import io as _io
from . import methods as _methods
from .data import Item, ItemError, Source, open_inputs
from .errors import LiftcamError, UsageError

__all__ = ["Summary", "run", "manifest_name", "read_manifests", "output_paths"]

SAVE_MODES = ("overlay", "raw", "both")


@dataclasses.dataclass
class Summary:
    """What a run did. ``failed`` > 0 makes the CLI exit with status 1."""

    done: int
    skipped: int
    failed: int
    total: int
    out_dir: str
    manifest: str
    seconds: float
    batch_size: int
    devices: int

    @property
    def images_per_second(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        return (
            f"{self.done} done, {self.skipped} skipped (already done), {self.failed} failed "
            f"of {self.total} in {self.seconds:.1f} s ({self.images_per_second:.1f} images/s, "
            f"batch {self.batch_size} on {self.devices} device{'s' if self.devices != 1 else ''}); "
            f"manifest: {self.manifest}"
        )


# ---------------------------------------------------------------------------
# manifest and outputs
# ---------------------------------------------------------------------------

def manifest_name(process_index: int = 0, process_count: int = 1) -> str:
    """``manifest.jsonl`` for one host, ``manifest-<p>-of-<P>.jsonl`` for host ``p`` of ``P``."""
    if process_count <= 1:
        return "manifest.jsonl"
    return f"manifest-{process_index:05d}-of-{process_count:05d}.jsonl"


def read_manifests(out_dir) -> Dict[str, dict]:
    """The last record per item id over every manifest in ``out_dir``."""
    paths = sorted(glob.glob(os.path.join(glob.escape(os.fspath(out_dir)), "manifest*.jsonl")))
    return _io.latest(r for p in paths for r in _io.read_jsonl(p))


def output_paths(item_id: str, save: str) -> List[str]:
    """Relative output file names of an item for a ``save`` mode."""
    out = []
    if save in ("raw", "both"):
        out.append(item_id + ".npz")
    if save in ("overlay", "both"):
        out.append(item_id + ".png")
    return out


def _is_done(record: Optional[dict], out_dir: str, wanted: List[str]) -> bool:
    if not record or record.get("status") != "done":
        return False
    have = set(record.get("outputs") or ())
    return all(w in have and os.path.isfile(os.path.join(out_dir, w)) for w in wanted)


def _remove_stale_temp_files(out_dir: str) -> None:
    """Delete temporary files left by an interrupted atomic write (one writer only)."""
    for root, _, files in os.walk(out_dir):
        for f in files:
            if f.startswith(".") and f.endswith(".tmp"):
                try:
                    os.unlink(os.path.join(root, f))
                except OSError:
                    pass


def check_run_identity(out_dir: str, identity: dict) -> None:
    """Record ``identity`` (model, weights, method, options...) in ``out_dir/run.json``, or
    refuse with a :class:`UsageError` when the folder holds a run with a different one:
    resuming must never mix two configurations in one output."""
    path = os.path.join(out_dir, "run.json")
    try:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
    except FileNotFoundError:
        old = None
    except (OSError, ValueError):
        old = None  # a damaged run.json (older crash): rewrite it
    if isinstance(old, dict):
        diff = [f"{k} {old.get(k)!r} (now {identity.get(k)!r})" for k in identity if old.get(k) != identity.get(k)]
        if diff:
            raise UsageError(
                f"{out_dir} holds results of a different run ({'; '.join(diff)}); "
                "choose another --out, or remove that folder"
            )
        return
    _io.write_json(path, identity)


# ---------------------------------------------------------------------------
# the compiled, sharded step
# ---------------------------------------------------------------------------

_STEPS: Dict[Any, Any] = {}


def _step_fn(split, method: str, options: dict, devices: tuple):
    """A jitted ``(params, x, targets, key) -> Explanation`` with batch-sharded outputs (cached)."""
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from .explain import explain

    try:
        cache_key = (split, method, tuple(sorted(options.items())), devices)
        hash(cache_key)
    except TypeError:
        cache_key = None
    if cache_key is not None and cache_key in _STEPS:
        return _STEPS[cache_key]
    mesh = Mesh(np.asarray(devices, dtype=object), ("batch",))
    data = NamedSharding(mesh, P("batch"))
    repl = NamedSharding(mesh, P())

    def step(params, x, targets, key):
        return explain(split, params, x, targets, method=method, key=key, **options)

    entry = (jax.jit(step, out_shardings=data), data, repl)
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


def _label_classes(classifier, sources, classes: int, label_map, required: bool) -> Dict[int, np.ndarray]:
    """``id(source) -> (dataset label -> model class)`` for the labelled sources (see ``data.label_mapping``).

    With ``required`` (``target="label"``) every source must have labels and a
    mapping, else a :class:`UsageError` before any work; otherwise sources
    whose labels cannot be mapped simply have none (labels are still recorded).
    """
    from .data import label_mapping

    out = {}
    for s in sources:
        names = getattr(s, "label_names", None)
        if names is None:
            if required:
                raise UsageError(f"--target label needs labelled inputs (a TFDS split with a ClassLabel feature); "
                                 f"{getattr(s, 'spec', None) or s.items[0].source} has no labels")
            continue
        try:
            out[id(s)] = label_mapping(names, classes, class_ids=classifier.class_ids,
                                       class_names=classifier.class_names, label_map=label_map, dataset=s.spec)
        except UsageError:
            if required:
                raise
    return out


def _num_classes(classifier, size: int) -> int:
    import jax

    x = jax.ShapeDtypeStruct((1, size, size, 3), np.float32)
    out = jax.eval_shape(lambda p, v: classifier.split(p, v), classifier.params, x)
    return int(out.shape[-1])


# ---------------------------------------------------------------------------
# the reading thread
# ---------------------------------------------------------------------------

def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


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


class Reader(threading.Thread):
    """Reads, decodes and preprocesses items; emits ``("batch", entries)`` and ``("fail", item, msg)``.

    An entry is ``(item, x, shown, meta)``: the preprocessed input, the resized
    image (when ``keep_display``) and its :class:`Meta`.
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
                return self._emit(("fail", item, f"{type(e).__name__}: {_one_line(e)}"))
            buf.append((item, x, shown, meta))
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


# ---------------------------------------------------------------------------
# run
# ---------------------------------------------------------------------------

def run(
    classifier,
    inputs: Union[Sequence[str], Sequence[Source]],
    *,
    out_dir,
    method: str = "lift-cam",
    target: Union[None, str, int] = None,
    batch_size: int = 32,
    save: str = "both",
    options: Optional[dict] = None,
    seed: int = 0,
    limit: Optional[int] = None,
    quiet: bool = False,
    workers: Optional[int] = None,
    prefetch: int = 2,
    devices: Optional[Sequence] = None,
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
    alpha: float = 0.5,
    cmap: str = "jet",
    data_dir: Optional[str] = None,
    download: bool = False,
    image_key: Optional[str] = None,
    label_key: Optional[str] = None,
    label_map=None,
    run_info: Optional[dict] = None,
    stderr=None,
) -> Summary:
    """Explain every input and write the results to ``out_dir`` (see the module doc).

    Args:
      classifier: a :class:`liftcam_jax.Classifier`.
      inputs: paths / folders / ``.npy`` / ``tfds:NAME:SPLIT`` strings, or
        sources from :func:`liftcam_jax.data.open_inputs`.
      out_dir: output folder (created).
      method: a registered method name (:func:`liftcam_jax.methods.names`).
      target: ``None``/``"auto"`` (the predicted class), ``"label"`` (each
        image's dataset label, mapped to the model's classes by
        :func:`liftcam_jax.data.label_mapping`) or one class index.
      batch_size: images per step, rounded up to a multiple of the devices.
      save: ``"both"``, ``"raw"`` (``.npz`` only) or ``"overlay"`` (``.png`` only).
      options: keyword options of the method.
      seed: PRNG seed for methods that need a key (batch ``i`` uses
        ``fold_in(PRNGKey(seed), i)``).
      limit: explain only the first ``limit`` inputs of the listing.
      quiet: no progress bar and no summary (failures are still printed).
      workers: decoding threads (default: up to 4, no more than the CPUs).
      prefetch: batches read ahead.
      devices: the devices to shard over (default: ``jax.local_devices()``).
      process_index, process_count: this host's share (default: JAX's).
      alpha, cmap: overlay blending (:func:`liftcam_jax.viz.overlay`).
      data_dir, download, image_key, label_key: for ``tfds:`` inputs
        (:func:`liftcam_jax.data.open_inputs`).
      label_map: how dataset labels map to the model's classes (``None``:
        WordNet ids or equal class names; ``"identity"``; a dict or JSON path).
      run_info: extra identity of the run stored in ``run.json`` (e.g. the weights).

    Returns:
      A :class:`Summary`. Raises :class:`UsageError` before any work for bad
      arguments; failures of single inputs are recorded, not raised.
    """
    import jax

    err = stderr if stderr is not None else sys.stderr
    t_start = time.perf_counter()
    if save not in SAVE_MODES:
        raise UsageError(f"unknown save mode {save!r}; valid: {', '.join(SAVE_MODES)}")
    m = _methods.get(method)
    if int(batch_size) < 1:
        raise UsageError(f"batch size must be at least 1, got {batch_size}")
    if limit is not None and int(limit) < 1:
        raise UsageError(f"limit must be at least 1, got {limit}")
    options = dict(options or {})
    from .viz import CMAPS

    if cmap not in CMAPS:
        raise UsageError(f"unknown colormap {cmap!r}; valid: {', '.join(CMAPS)}")
    if not 0.0 <= float(alpha) <= 1.0:
        raise UsageError(f"alpha must be in [0, 1], got {alpha}")
    prep = classifier.preprocess
    size = int(prep.size)
    classes = _num_classes(classifier, size)
    if isinstance(target, str):
        if target.strip().lower() == "auto":
            target = None
        elif target.strip().lower() == "label":
            target = "label"
        else:
            try:
                target = int(target)
            except ValueError:
                raise UsageError(f"bad target {target!r}; use 'auto', 'label' or a class index") from None
    if target is not None and target != "label":
        target = int(target)
        if not 0 <= target < classes:
            raise UsageError(f"target index {target} out of range for {classifier.name} ({classes} classes: 0..{classes - 1})")

    sources = list(inputs)
    if not sources or not all(isinstance(s, Source) for s in sources):
        sources = open_inputs([os.fspath(s) for s in sources], data_dir=data_dir, download=download,
                              image_key=image_key, label_key=label_key)
    class_of = _label_classes(classifier, sources, classes, label_map, required=target == "label")

    out_dir = os.fspath(out_dir)
    try:
        _io.check_writable(out_dir)
    except OSError as e:
        raise UsageError(f"output folder {out_dir} is not writable: {e.strerror or e}") from None

    identity = {
        "model": classifier.name,
        "layer": classifier.layer,
        "method": method,
        "target": "auto" if target is None else target,
        "options": {k: repr(v) for k, v in sorted(options.items())},
        **({"label_map": label_map if isinstance(label_map, str) or label_map is None else repr(label_map)}
           if target == "label" else {}),
        "input_size": size,
    }
    identity.update(run_info or {})
    check_run_identity(out_dir, identity)

    # -- the share of this host, minus what is done -------------------------
    pi = jax.process_index() if process_index is None else int(process_index)
    pc = jax.process_count() if process_count is None else int(process_count)
    if not 0 <= pi < pc:
        raise UsageError(f"process index {pi} out of range for {pc} processes")
    listing = [(s, it) for s in sources for it in s.items]
    if limit is not None:
        listing = listing[: int(limit)]
    share = listing[pi::pc]
    if pc == 1:
        _remove_stale_temp_files(out_dir)
    previous = read_manifests(out_dir)
    todo_by_source: Dict[int, list] = {}
    skipped = 0
    for s, it in share:
        if _is_done(previous.get(it.id), out_dir, output_paths(it.id, save)):
            skipped += 1
        else:
            todo_by_source.setdefault(id(s), []).append(it)
    work = [(s, todo_by_source[id(s)]) for s in sources if id(s) in todo_by_source]
    n_todo = sum(len(v) for _, v in work)

    devs = tuple(jax.local_devices() if devices is None else devices)
    n_dev = len(devs)
    bs = int(math.ceil(int(batch_size) / n_dev) * n_dev)
    if bs != int(batch_size) and not quiet:
        print(f"liftcam-jax: batch size {batch_size} rounded up to {bs}, a multiple of the {n_dev} devices", file=err)

    manifest_path = os.path.join(out_dir, manifest_name(pi, pc))
    summary = Summary(0, skipped, 0, len(share), out_dir, manifest_path, 0.0, bs, n_dev)
    if n_todo == 0:
        summary.seconds = time.perf_counter() - t_start
        if not quiet:
            print(f"liftcam-jax: explain: {summary.line()}", file=err)
        return summary

    step, data_sharding, repl = _step_fn(classifier.split, method, options, devs)
    params = jax.device_put(classifier.params, repl)
    base_key = jax.random.PRNGKey(seed) if m.needs_key else None
    keep_display = save in ("overlay", "both")
    if workers is None:
        workers = max(1, min(4, os.cpu_count() or 1))

    from tqdm import tqdm

    from .viz import overlay

    bar = tqdm(total=n_todo, unit="img", desc="explain", file=err, disable=quiet, dynamic_ncols=True, smoothing=0.1)
    manifest = _io.Manifest(manifest_path)
    reader = Reader(work, prep, bs, keep_display, workers, prefetch)

    source_of = {it.id: id(s) for s, its in work for it in its}

    def fail(item: Item, msg: str, meta: Optional[Meta] = None):
        fixed = isinstance(target, int)
        manifest.append({
            "id": item.id, "source": item.source, "status": "failed", "outputs": [], "error": msg,
            "target": target if fixed else None, "target_name": classifier.class_name(target) if fixed else None,
            "predicted": None, "predicted_name": None,
            "label": None if meta is None else meta.label, "label_name": None if meta is None else meta.label_name,
        })
        summary.failed += 1
        bar.update(1)
        line = f"liftcam-jax: failed: {item.source}: {msg}"
        if quiet:
            print(line, file=err)
        else:
            bar.write(line, file=err)

    def label_target(item: Item, meta: Meta) -> Optional[int]:
        """The model class of the item's dataset label, or ``None`` (the item failed) for ``target="label"``."""
        mapping = class_of.get(source_of[item.id])
        if meta.label is None or mapping is None:
            fail(item, "no label to explain (target 'label')", meta)
        elif not 0 <= meta.label < len(mapping) or mapping[meta.label] < 0:
            fail(item, f"label {meta.label} ({meta.label_name}) has no class in {classifier.name} "
                       "(give one in the label map)", meta)
        else:
            return int(mapping[meta.label])
        return None

    def dispatch(entries, index):
        if target == "label":
            entries = [e for e in entries if label_target(e[0], e[3]) is not None]
            if not entries:
                return None
        n = padded_size(len(entries), bs, n_dev)
        x = np.zeros((n, size, size, 3), np.float32)
        for i, e in enumerate(entries):
            x[i] = e[1]
        xs = jax.device_put(x, data_sharding)
        if target == "label":
            t = np.zeros((n,), np.int32)
            t[: len(entries)] = [class_of[source_of[e[0].id]][e[3].label] for e in entries]
            ts = jax.device_put(t, data_sharding)
        else:
            ts = None if target is None else jax.device_put(np.full((n,), target, np.int32), data_sharding)
        key = None if base_key is None else jax.random.fold_in(base_key, index)
        return entries, step(params, xs, ts, key)

    def write_one(rel, path, i, x, shown, meta, tgt, pred, host):
        if rel.endswith(".npz"):
            _io.write_npz(
                path,
                map=np.asarray(host.maps[i], np.float32),
                raw=np.asarray(host.raw[i], np.float32),
                coefficients=np.asarray(host.coefficients[i], np.float32),
                logits=np.asarray(host.logits[i], np.float32),
                target=np.int64(tgt),
                predicted=np.int64(pred),
                reference_logits=None if host.reference_logits is None
                else np.asarray(host.reference_logits[i], np.float32),
                label=None if meta.label is None else np.int64(meta.label),
                label_name=None if meta.label_name is None else np.str_(meta.label_name),
            )
        else:
            base = shown if shown is not None else prep.denormalize(x)
            _io.write_png(path, overlay(base, np.asarray(host.maps[i]), alpha=alpha, cmap=cmap))

    def write(entries, exp):
        host = jax.device_get(exp)
        for i, (item, x, shown, meta) in enumerate(entries):
            outputs = output_paths(item.id, save)
            tgt = int(host.targets[i])
            pred = int(np.argmax(host.logits[i]))
            for rel in outputs:
                path = os.path.join(out_dir, rel)
                try:
                    write_one(rel, path, i, x, shown, meta, tgt, pred, host)
                except OSError as e:  # disk full, folder removed...: fatal, the rerun resumes
                    raise LiftcamError(
                        f"cannot write {path}: {e.strerror or e} (fix it and rerun the same command to resume)"
                    ) from None
            manifest.append({
                "id": item.id, "source": item.source, "status": "done", "outputs": outputs, "error": None,
                "target": tgt, "target_name": classifier.class_name(tgt),
                "predicted": pred, "predicted_name": classifier.class_name(pred),
                "label": meta.label, "label_name": meta.label_name,
            })
            summary.done += 1
            bar.update(1)

    in_flight = None
    batches = 0
    reader.start()
    try:
        while True:
            event = reader.events.get()
            kind = event[0]
            if kind == "fail":
                fail(event[1], event[2])
            elif kind == "batch":
                launched = dispatch(event[1], batches)
                if launched is None:
                    continue
                batches += 1
                if in_flight is not None:
                    write(*in_flight)
                in_flight = launched
            elif kind == "end":
                break
            else:  # "error": a failure of the reading machinery itself
                raise event[1]
        if in_flight is not None:
            write(*in_flight)
            in_flight = None
    finally:
        reader.stop.set()
        manifest.close()
        bar.close()
    summary.seconds = time.perf_counter() - t_start
    if not quiet:
        print(f"liftcam-jax: explain: {summary.line()}", file=err)
    return summary
