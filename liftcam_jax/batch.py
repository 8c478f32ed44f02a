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

**Several hosts** (:func:`liftcam_jax.distributed.initialize` first): host
``p`` of ``P`` explains items ``p, p + P, p + 2P, ...`` of the listing (the
listing is the same on every host; of a TFRecord split, read in order, a
contiguous block: :func:`liftcam_jax.distributed.share`) on its own local
devices, reads only those, and writes its own manifest
``manifest-<p>-of-<P>.jsonl`` (one host: ``manifest.jsonl``) into the shared
output folder. Hosts never wait for each other: explaining needs no
communication. Resuming skips every id that any manifest says is done,
whichever host (or host count) did it; :func:`status` merges them.

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

**Crash safety.** Files are written atomically (:mod:`liftcam_jax.files`); an
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

from . import distributed as _distributed
from . import files as _io
from . import methods as _methods
from .data import Item, ItemError, Source, open_inputs
from .errors import LiftcamError, UsageError, one_line, positive_int

__all__ = ["RunConfig", "RunFolder", "Summary", "manifest_name", "output_paths", "read_manifests", "run", "run_loop",
           "status"]

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


def merged_records(paths: Sequence[str], key: str = "id") -> Dict[str, dict]:
    """The last record per ``key`` in each log, merged over the logs: where one host's log says ``done``
    and another's (an earlier host count) says ``failed``, the input is done."""
    out: Dict[str, dict] = {}
    for p in paths:
        for k, r in _io.latest(_io.read_jsonl(p), key).items():
            if k not in out or r.get("status") == "done" or out[k].get("status") != "done":
                out[k] = r
    return out


def read_manifests(out_dir) -> Dict[str, dict]:
    """The last record per item id over every manifest in ``out_dir`` (see :func:`merged_records`)."""
    return merged_records(sorted(glob.glob(os.path.join(glob.escape(os.fspath(out_dir)), "manifest*.jsonl"))))


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
        keys = list(identity) + [k for k in old if k not in identity]  # a key either side lacks differs too
        diff = [f"{k} {old.get(k)!r} (now {identity.get(k)!r})" for k in keys if old.get(k) != identity.get(k)]
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
                return self._emit(("fail", item, f"{type(e).__name__}: {one_line(e)}"))
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
# the run folder and the run loop (shared by explain and evaluate)
# ---------------------------------------------------------------------------

class RunFolder:
    """An output folder: the run's identity (``run.json``), its JSON-lines log(s), and resume.

    ``log`` is this process's log file; every file matching ``pattern`` is read,
    so records written by other hosts (or an earlier host count) count as done.
    ``done(key)`` is true when the last record of ``key`` says ``done``.
    """

    def __init__(self, out_dir, identity: dict, log: str = "manifest.jsonl", pattern: str = "manifest*.jsonl",
                 clean: bool = True):
        self.path = os.fspath(out_dir)
        try:
            _io.check_writable(self.path)
        except OSError as e:
            raise UsageError(f"output folder {self.path} is not writable: {e.strerror or e}") from None
        check_run_identity(self.path, identity)
        if clean:
            _remove_stale_temp_files(self.path)
        self.pattern = pattern
        self.previous: Dict[str, dict] = self.records()
        self.log_path = os.path.join(self.path, log)
        self._log: Optional[_io.Manifest] = None

    def records(self) -> Dict[str, dict]:
        """The last record of every key over all the logs; a ``done`` one wins over another log's failure."""
        return merged_records(sorted(glob.glob(os.path.join(glob.escape(self.path), self.pattern))))

    def done(self, key: str) -> bool:
        rec = self.previous.get(key)
        return bool(rec) and rec.get("status") == "done"

    def append(self, record: dict) -> None:
        if self._log is None:
            self._log = _io.Manifest(self.log_path)
        self._log.append(record)

    def close(self) -> None:
        if self._log is not None:
            self._log.close()


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

    ``launch(entries, index)`` gets each batch (entries ``(item, x, shown, meta)``,
    see :class:`Reader`) and returns a handle, or ``None`` when it has nothing
    to finish; ``finish(handle)`` is called for a batch once the next one has
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


# ---------------------------------------------------------------------------
# run
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RunConfig:
    """How :func:`run` explains: every option of ``liftcam-jax explain``.

    method: a registered method; options: its keyword options; target:
    ``None``/``"auto"`` (predicted), ``"label"`` (each image's dataset label,
    mapped by :func:`liftcam_jax.data.label_mapping` with ``label_map``) or a
    class index; batch_size: images per step (rounded up to a multiple of the
    devices); save: ``"both"``, ``"raw"`` (.npz) or ``"overlay"`` (.png);
    seed: batch ``i`` of a randomised method uses ``fold_in(PRNGKey(seed), i)``;
    limit: the first ``limit`` inputs only; workers/prefetch: decoding threads
    and batches read ahead; devices: default ``jax.local_devices()``;
    process_index/process_count: this host's share (default JAX's); alpha/cmap:
    overlays; data_dir/download/image_key/label_key: ``tfds:`` inputs;
    run_info: extra identity stored in ``run.json`` (e.g. the weights).
    """

    method: str = "lift-cam"
    options: Optional[dict] = None
    target: Union[None, str, int] = None
    label_map: Any = None
    batch_size: int = 32
    save: str = "both"
    seed: int = 0
    limit: Optional[int] = None
    quiet: bool = False
    workers: Optional[int] = None
    prefetch: int = 2
    devices: Optional[Sequence] = None
    process_index: Optional[int] = None
    process_count: Optional[int] = None
    alpha: float = 0.5
    cmap: str = "jet"
    data_dir: Optional[str] = None
    download: bool = False
    image_key: Optional[str] = None
    label_key: Optional[str] = None
    run_info: Optional[dict] = None


def run(classifier, inputs: Union[Sequence[str], Sequence[Source]], config: Optional[RunConfig] = None, *,
        out_dir, stderr=None, **options) -> Summary:
    """Explain every input into ``out_dir`` (see the module doc); ``options`` override ``config``'s fields.

    ``inputs``: paths, folders, ``.npy`` files, ``tfds:...`` specs, or sources from
    :func:`liftcam_jax.data.open_inputs`. Returns a :class:`Summary`; a
    :class:`UsageError` before any work for bad arguments; single inputs that
    fail are recorded, not raised.
    """
    import jax

    cfg = dataclasses.replace(config or RunConfig(), **options)
    err = stderr if stderr is not None else sys.stderr
    t_start = time.perf_counter()
    classes = _num_classes(classifier, int(classifier.preprocess.size))
    target = _check_config(cfg, classes)
    sources = list(inputs)
    if not sources or not all(isinstance(s, Source) for s in sources):
        sources = open_inputs([os.fspath(s) for s in sources], data_dir=cfg.data_dir, download=cfg.download,
                              image_key=cfg.image_key, label_key=cfg.label_key)
    class_of = _label_classes(classifier, sources, classes, cfg.label_map,
                              required=target == "label")
    pi = jax.process_index() if cfg.process_index is None else int(cfg.process_index)
    pc = jax.process_count() if cfg.process_count is None else int(cfg.process_count)
    if not 0 <= pi < pc:
        raise UsageError(f"process index {pi} out of range for {pc} processes")
    folder = RunFolder(out_dir, _identity(classifier, cfg, target), manifest_name(pi, pc), clean=pc == 1)
    listing = [(s, it) for s in sources for it in s.items][: cfg.limit]
    share = _distributed.share(listing, pi, pc, [getattr(s, "sequential", False) for s, _ in listing])
    todo = [(s, it) for s, it in share if not _is_done(folder.previous.get(it.id), folder.path,
                                                        output_paths(it.id, cfg.save))]
    work = [(s, [it for s2, it in todo if s2 is s]) for s in sources if any(s2 is s for s2, _ in todo)]
    devs = tuple(jax.local_devices() if cfg.devices is None else cfg.devices)
    bs = int(math.ceil(int(cfg.batch_size) / len(devs)) * len(devs))
    if bs != int(cfg.batch_size) and not cfg.quiet:
        print(f"liftcam-jax: batch size {cfg.batch_size} rounded up to {bs}, a multiple of the {len(devs)} devices",
              file=err)
    summary = Summary(0, len(share) - len(todo), 0, len(share), folder.path, folder.log_path, 0.0, bs, len(devs))
    if todo:
        progress = Progress(len(todo), "explain", "img", cfg.quiet, err)
        writer = _Writer(classifier, cfg, target, folder, progress, summary, class_of,
                         {it.id: id(s) for s, it in todo}, bs, devs)
        try:
            run_loop(work, classifier.preprocess, bs, launch=writer.launch, finish=writer.finish, fail=writer.fail,
                     keep_display=cfg.save in ("overlay", "both"), workers=cfg.workers, prefetch=cfg.prefetch)
        finally:
            folder.close()
            progress.close()
    summary.seconds = time.perf_counter() - t_start
    if not cfg.quiet:
        print(f"liftcam-jax: explain: {summary.line()}", file=err)
        if pc > 1:  # what every host has done so far, from all the manifests in the folder
            st = status(folder.path, [it.id for _, it in listing])
            print(f"liftcam-jax: explain: all {pc} hosts so far: {st['done']} done, {st['failed']} failed, "
                  f"{st['pending']} pending of {st['total']}", file=err)
    return summary


def status(out_dir, ids: Optional[Sequence[str]] = None) -> dict:
    """The merged state of a run folder (every host's manifest or evaluation log).

    Returns ``{"command", "total", "done", "failed", "pending", "failed_ids": {id: error}, "logs": [...]}``;
    ``ids`` are the run's inputs when known (else ``total`` counts what the logs name).
    """
    out = os.fspath(out_dir)
    try:
        with open(os.path.join(out, "run.json"), encoding="utf-8") as f:
            identity = json.load(f)
    except (OSError, ValueError):
        raise UsageError(f"{out} holds no run (no readable run.json)") from None
    evaluate = identity.get("command") == "evaluate"
    pattern = "evaluate*.jsonl" if evaluate else "manifest*.jsonl"
    logs = sorted(glob.glob(os.path.join(glob.escape(out), pattern)))
    recs = merged_records(logs)
    state: Dict[str, str] = {}
    errors: Dict[str, str] = {}
    for key, r in recs.items():
        item = r.get("item") or key.split("|", 1)[0]
        if r.get("status") == "done":
            state.setdefault(item, "done")
        else:
            state[item] = "failed"
            errors[item] = r.get("error") or ""
    names = list(ids) if ids is not None else list(state)
    done = sum(state.get(i) == "done" for i in names)
    failed = sum(state.get(i) == "failed" for i in names)
    return {"command": "evaluate" if evaluate else "explain", "total": len(names), "done": done, "failed": failed,
            "pending": len(names) - done - failed, "failed_ids": {i: errors[i] for i in names if i in errors},
            "logs": [os.path.basename(p) for p in logs]}


def _check_config(cfg: RunConfig, classes: int):
    """Validate ``cfg`` before any work (:class:`UsageError`); returns the target: ``None``, ``"label"`` or an int."""
    from .viz import CMAPS

    if cfg.save not in SAVE_MODES:
        raise UsageError(f"unknown save mode {cfg.save!r}; valid: {', '.join(SAVE_MODES)}")
    _methods.get(cfg.method)
    positive_int("batch size", cfg.batch_size)
    if cfg.limit is not None:
        positive_int("limit", cfg.limit)
    if cfg.cmap not in CMAPS:
        raise UsageError(f"unknown colormap {cfg.cmap!r}; valid: {', '.join(CMAPS)}")
    if not 0.0 <= float(cfg.alpha) <= 1.0:
        raise UsageError(f"alpha must be in [0, 1], got {cfg.alpha}")
    target = cfg.target
    if isinstance(target, str):
        word = target.strip().lower()
        if word in ("auto", "label"):
            return None if word == "auto" else "label"
        try:
            target = int(target)
        except ValueError:
            raise UsageError(f"bad target {target!r}; use 'auto', 'label' or a class index") from None
    if target is not None and not 0 <= int(target) < classes:
        raise UsageError(f"target index {target} out of range ({classes} classes: 0..{classes - 1})")
    return None if target is None else int(target)


def _identity(classifier, cfg: RunConfig, target) -> dict:
    """What ``run.json`` records: resuming a folder with another identity is refused."""
    identity = {
        "model": classifier.name,
        "layer": classifier.layer,
        "method": cfg.method,
        "target": "auto" if target is None else target,
        "options": {k: repr(v) for k, v in sorted((cfg.options or {}).items())},
        "input_size": int(classifier.preprocess.size),
    }
    if target == "label":
        lm = cfg.label_map
        identity["label_map"] = lm if lm is None or isinstance(lm, str) else repr(lm)
    identity.update(cfg.run_info or {})
    return identity


class _Writer:
    """The explain side of a run: launch each batch on the devices, then write its results and manifest lines."""

    def __init__(self, classifier, cfg, target, folder, progress, summary, class_of, source_of, bs, devs):
        import jax

        self.jax, self.c, self.cfg, self.target = jax, classifier, cfg, target
        self.folder, self.progress, self.summary = folder, progress, summary
        self.class_of, self.source_of, self.bs, self.n_dev = class_of, source_of, bs, len(devs)
        self.step, self.data, repl = _step_fn(classifier.split, cfg.method, dict(cfg.options or {}), devs)
        self.params = jax.device_put(classifier.params, repl)
        self.base_key = jax.random.PRNGKey(cfg.seed) if _methods.get(cfg.method).needs_key else None

    def fail(self, item: Item, msg: str, meta: Optional[Meta] = None) -> None:
        fixed = isinstance(self.target, int)
        self.folder.append({
            "id": item.id, "source": item.source, "status": "failed", "outputs": [], "error": msg,
            "target": self.target if fixed else None,
            "target_name": self.c.class_name(self.target) if fixed else None,
            "predicted": None, "predicted_name": None,
            "label": None if meta is None else meta.label, "label_name": None if meta is None else meta.label_name,
        })
        self.summary.failed += 1
        self.progress.update(1)
        self.progress.write(f"liftcam-jax: failed: {item.source}: {msg}")

    def _label_class(self, item: Item, meta: Meta) -> Optional[int]:
        """The model class of the item's dataset label (``target="label"``), or ``None``: the item failed."""
        mapping = self.class_of.get(self.source_of[item.id])
        if meta.label is None or mapping is None:
            self.fail(item, "no label to explain (target 'label')", meta)
        elif not 0 <= meta.label < len(mapping) or mapping[meta.label] < 0:
            self.fail(item, f"label {meta.label} ({meta.label_name}) has no class in {self.c.name} "
                            "(give one in the label map)", meta)
        else:
            return int(mapping[meta.label])
        return None

    def launch(self, entries, index):
        jax = self.jax
        targets = None
        if self.target == "label":
            classes = [self._label_class(e[0], e[3]) for e in entries]
            entries = [e for e, t in zip(entries, classes) if t is not None]
            targets = [t for t in classes if t is not None]
            if not entries:
                return None
        elif self.target is not None:
            targets = [self.target] * len(entries)
        n = padded_size(len(entries), self.bs, self.n_dev)
        x = np.zeros((n, *entries[0][1].shape), np.float32)
        for i, e in enumerate(entries):
            x[i] = e[1]
        ts = None
        if targets is not None:
            t = np.zeros((n,), np.int32)
            t[: len(targets)] = targets
            ts = jax.device_put(t, self.data)
        key = None if self.base_key is None else jax.random.fold_in(self.base_key, index)
        return entries, self.step(self.params, jax.device_put(x, self.data), ts, key)

    def finish(self, handle) -> None:
        entries, exp = handle
        host = self.jax.device_get(exp)
        # files on a few threads (zlib, PIL and the file system release the GIL); lines in order, after the files
        with _io.OrderedWrites(workers=2, pending=len(entries)) as writes:
            for i, (item, x, shown, meta) in enumerate(entries):
                outputs = output_paths(item.id, self.cfg.save)
                tgt, pred = int(host.targets[i]), int(np.argmax(host.logits[i]))
                record = {
                    "id": item.id, "source": item.source, "status": "done", "outputs": outputs, "error": None,
                    "target": tgt, "target_name": self.c.class_name(tgt),
                    "predicted": pred, "predicted_name": self.c.class_name(pred),
                    "label": meta.label, "label_name": meta.label_name,
                }
                writes.submit(lambda a=(outputs, i, x, shown, meta, tgt, pred, host): self._write_item(*a),
                              lambda r=record: self._commit(r))

    def _write_item(self, outputs, i, x, shown, meta, tgt, pred, host) -> None:
        for rel in outputs:
            path = os.path.join(self.folder.path, rel)
            try:
                self._write(rel, path, i, x, shown, meta, tgt, pred, host)
            except OSError as e:  # disk full, folder removed...: fatal, the rerun resumes
                raise LiftcamError(
                    f"cannot write {path}: {e.strerror or e} (fix it and rerun the same command to resume)"
                ) from None

    def _commit(self, record: dict) -> None:
        self.folder.append(record)
        self.summary.done += 1
        self.progress.update(1)

    def _write(self, rel, path, i, x, shown, meta, tgt, pred, host) -> None:
        from .viz import overlay

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
            base = shown if shown is not None else self.c.preprocess.denormalize(x)
            _io.write_png(path, overlay(base, np.asarray(host.maps[i]), alpha=self.cfg.alpha, cmap=self.cfg.cmap))
