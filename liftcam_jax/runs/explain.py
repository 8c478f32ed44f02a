"""Explaining datasets: sharded over devices, streamed, crash-safe and resumable.

:func:`run` is what ``liftcam-jax explain`` calls; notebooks and other
commands use it directly::

    from liftcam_jax import batch   # the public face of this module
    summary = batch.run(classifier, ["photos/", "tfds:imagenette:validation[:500]"],
                        method="lift-cam", out_dir="out/", batch_size=32)

**Pipeline.** Inputs are listed first (names only, :mod:`liftcam_jax.data`),
then read, batched and explained by the shared loop of :mod:`liftcam_jax.runs.loop`;
batches are explained while the previous one is written (JAX dispatch is
asynchronous).

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
``target``, ``predicted``, for methods with one ``reference_logits``, under
smoothing or layer fusion ``raw_axes``, ``coefficients_axes`` (what ``raw`` and
``coefficients`` hold), ``layers`` and ``augmentations``
(:meth:`liftcam_jax.smoothing.Smoothing.layout`), for
token activations and methods that report it ``prefix_coefficients`` ``(K,)``
(:class:`liftcam_jax.explanation.Explanation`), and
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

import dataclasses
import math
import os
import sys
import time
from typing import Dict, List, NamedTuple, Optional, Sequence, Union

import numpy as np

from .. import distributed, files
from .. import methods as _methods
from ..data import DataOptions, Item, ItemError, Source, open_inputs
from ..errors import LiftcamError, UsageError, positive_int
from ..smoothing import Smoothing
from .folder import RunFolder, status
from .loop import (Entry, Meta, Progress, compiled_step, configure, label_class, label_classes,
                   num_classes, padded_size, process_share, run_loop)

__all__ = ["RunConfig", "RunSummary", "output_paths", "run"]

SAVE_MODES = ("overlay", "raw", "both")


@dataclasses.dataclass
class RunSummary:
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
    model: str = ""

    @property
    def images_per_second(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        return (
            f"{self.done} done, {self.skipped} skipped (already done), {self.failed} failed "
            f"of {self.total} in {self.seconds:.1f} s ({self.images_per_second:.1f} images/s, "
            f"batch {self.batch_size} on {self.devices} device{'s' if self.devices != 1 else ''}); "
            f"model: {self.model}; output: {self.out_dir}; manifest: {self.manifest}"
        )


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


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """How :func:`run` explains: every option of ``liftcam-jax explain``.

    method: a registered method (its name or :class:`~liftcam_jax.methods.Method`); options: its keyword options; target:
    ``None``/``"auto"`` (predicted), ``"label"`` (each image's dataset label,
    mapped by :func:`liftcam_jax.data.label_mapping` with ``data.label_map``) or a
    class index; batch_size: images per step (rounded up to a multiple of the
    devices); save: ``"both"``, ``"raw"`` (.npz) or ``"overlay"`` (.png);
    seed: batch ``i`` of a randomised method uses ``fold_in(PRNGKey(seed), i)``;
    limit: the first ``limit`` inputs only; workers/prefetch: decoding threads
    and batches read ahead; devices: default ``jax.local_devices()``;
    process_index/process_count: this host's share (default JAX's); alpha/cmap:
    overlays; data: how ``tfds:`` inputs are found and labelled (:class:`DataOptions`);
    run_info: extra identity stored in ``run.json`` (e.g. the weights); smoothing: aug/eigen
    smoothing and layer fusion (:class:`liftcam_jax.smoothing.Smoothing`; each ``.npz`` then
    says what its ``raw`` and ``coefficients`` hold: ``raw_axes``, ``coefficients_axes``).
    """

    method: Union[str, _methods.Method] = "lift-cam"
    options: Optional[dict] = None
    target: Union[None, str, int] = None
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
    data: DataOptions = DataOptions()
    run_info: Optional[dict] = None
    smoothing: Optional[Smoothing] = None


class _Plan(NamedTuple):
    """What :func:`run` decided before any work, for the writer."""

    method: _methods.Method
    target: Union[None, str, int]  # None (predicted), "label" or a class index
    classes: int
    mappings: Dict[int, Optional[np.ndarray]]  # id(source) -> dataset label -> class (target "label")
    source_of: Dict[str, int]  # item id -> id(source)
    batch_size: int
    devices: tuple


def run(classifier, inputs: Union[Sequence[str], Sequence[Source]], config: Optional[RunConfig] = None, *,
        out_dir, stderr=None, **options) -> RunSummary:
    """Explain every input into ``out_dir`` (see the module doc); ``options`` override ``config``'s fields
    (and :class:`DataOptions`' fields: ``data_dir=``, ``label_map=``...).

    ``inputs``: paths, folders, ``.npy`` files, ``tfds:...`` specs, or sources from
    :func:`liftcam_jax.data.open_inputs`. Returns a :class:`RunSummary`; a
    :class:`UsageError` before any work for bad arguments; single inputs that
    fail are recorded, not raised.
    """
    import jax

    cfg = configure(config or RunConfig(), options)
    err = stderr if stderr is not None else sys.stderr
    t_start = time.perf_counter()
    classes = num_classes(classifier)
    method, target = _check_config(cfg, classes)
    sources = list(inputs)
    if not sources or not all(isinstance(s, Source) for s in sources):
        d = cfg.data
        sources = open_inputs([os.fspath(s) for s in sources], options=d)
    mappings = {id(s): label_classes(classifier, s, classes, cfg.data.label_map) for s in sources
                if target == "label"}
    pi, pc = process_share(cfg.process_index, cfg.process_count)
    folder = RunFolder(out_dir, _identity(classifier, cfg, method, target), "explain", pi, pc)
    listing = [(s, it) for s in sources for it in s.items][: cfg.limit]
    share = distributed.share(listing, pi, pc, [s.sequential for s, _ in listing])
    todo = [(s, it) for s, it in share if not _is_done(folder.previous.get(it.id), folder.path,
                                                        output_paths(it.id, cfg.save))]
    work = [(s, [it for s2, it in todo if s2 is s]) for s in sources if any(s2 is s for s2, _ in todo)]
    devs = tuple(jax.local_devices() if cfg.devices is None else cfg.devices)
    bs = int(math.ceil(int(cfg.batch_size) / len(devs)) * len(devs))
    if bs != int(cfg.batch_size) and not cfg.quiet:
        print(f"liftcam-jax: batch size {cfg.batch_size} rounded up to {bs}, a multiple of the {len(devs)} devices",
              file=err)
    summary = RunSummary(0, len(share) - len(todo), 0, len(share), folder.path, folder.log_path, 0.0, bs, len(devs),
                         classifier.name)
    if todo:
        progress = Progress(len(todo), "explain", "img", cfg.quiet, err)
        plan = _Plan(method, target, classes, mappings, {it.id: id(s) for s, it in todo}, bs, devs)
        writer = _Writer(classifier, cfg, plan, folder, progress, summary)
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


def _check_config(cfg: RunConfig, classes: int):
    """Validate ``cfg`` before any work (:class:`UsageError`); returns the method and the target:
    ``None``, ``"label"`` or an int."""
    from ..viz import CMAPS

    if cfg.save not in SAVE_MODES:
        raise UsageError(f"unknown save mode {cfg.save!r}; valid: {', '.join(SAVE_MODES)}")
    method = _methods.resolve(cfg.method)
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
            return method, None if word == "auto" else "label"
        try:
            target = int(target)
        except ValueError:
            raise UsageError(f"bad target {target!r}; use 'auto', 'label' or a class index") from None
    if target is not None and not 0 <= int(target) < classes:
        raise UsageError(f"target index {target} out of range ({classes} classes: 0..{classes - 1})")
    return method, None if target is None else int(target)


def _identity(classifier, cfg: RunConfig, method: _methods.Method, target) -> dict:
    """What ``run.json`` records: resuming a folder with another identity is refused."""
    identity = {
        "model": classifier.name,
        "layer": classifier.layer,
        "method": method.name,
        "target": "auto" if target is None else target,
        "options": {k: repr(v) for k, v in sorted((cfg.options or {}).items())},
        "input_size": int(classifier.preprocess.size),
    }
    if classifier.split.tokens is not None:  # --tokens: an explicit token layout
        identity["tokens"] = str(classifier.split.tokens)
    if target == "label":
        lm = cfg.data.label_map
        identity["label_map"] = lm if lm is None or isinstance(lm, str) else repr(lm)
    if cfg.smoothing is not None and cfg.smoothing.active:
        identity["smoothing"] = cfg.smoothing.identity(classifier.layer)
    identity.update(cfg.run_info or {})
    return identity


class _Writer:
    """The explain side of a run: launch each batch on the devices, then write its results and manifest lines."""

    def __init__(self, classifier, cfg: RunConfig, plan: _Plan, folder: RunFolder, progress: Progress,
                 summary: RunSummary):
        import jax

        self.jax, self.c, self.cfg, self.plan, self.target = jax, classifier, cfg, plan, plan.target
        self.folder, self.progress, self.summary = folder, progress, summary
        self.step, self.data, repl = compiled_step(classifier.split, plan.method, dict(cfg.options or {}),
                                                   plan.devices, cfg.smoothing)
        active = cfg.smoothing is not None and cfg.smoothing.active
        self.layout = cfg.smoothing.layout(classifier.layer) if active else {}
        self.params = jax.device_put(classifier.params, repl)
        self.base_key = jax.random.PRNGKey(cfg.seed) if plan.method.needs_key else None

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

    def _label_class(self, e: Entry) -> Optional[int]:
        """The model class of the entry's dataset label (``target="label"``), or ``None``: the entry failed."""
        mapping = self.plan.mappings[self.plan.source_of[e.item.id]]
        try:
            return label_class(mapping, e.meta, self.plan.classes, self.c.name)
        except ItemError as err:
            self.fail(e.item, str(err), e.meta)
            return None

    def launch(self, entries: List[Entry], index: int):
        jax = self.jax
        targets = None
        if self.target == "label":
            classes = [self._label_class(e) for e in entries]
            entries = [e for e, t in zip(entries, classes) if t is not None]
            targets = [t for t in classes if t is not None]
            if not entries:
                return None
        elif self.target is not None:
            targets = [self.target] * len(entries)
        n = padded_size(len(entries), self.plan.batch_size, len(self.plan.devices))
        x = np.zeros((n, *entries[0].x.shape), np.float32)
        for i, e in enumerate(entries):
            x[i] = e.x
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
        with files.OrderedWrites(workers=2, pending=len(entries)) as writes:
            for i, e in enumerate(entries):
                outputs = output_paths(e.item.id, self.cfg.save)
                tgt, pred = int(host.targets[i]), int(np.argmax(host.logits[i]))
                record = {
                    "id": e.item.id, "source": e.item.source, "status": "done", "outputs": outputs, "error": None,
                    "target": tgt, "target_name": self.c.class_name(tgt),
                    "predicted": pred, "predicted_name": self.c.class_name(pred),
                    "label": e.meta.label, "label_name": e.meta.label_name,
                }
                writes.submit(lambda a=(outputs, e, i, host): self._write_item(*a),
                              lambda r=record: self._commit(r))

    def _write_item(self, outputs, e: Entry, i: int, host) -> None:
        for rel in outputs:
            path = os.path.join(self.folder.path, rel)
            try:
                self._write(rel, path, e, i, host)
            except OSError as err:  # disk full, folder removed...: fatal, the rerun resumes
                raise LiftcamError(
                    f"cannot write {path}: {err.strerror or err} (fix it and rerun the same command to resume)"
                ) from None

    def _commit(self, record: dict) -> None:
        self.folder.append(record)
        self.summary.done += 1
        self.progress.update(1)

    def _write(self, rel: str, path: str, e: Entry, i: int, host) -> None:
        from ..viz import overlay

        if rel.endswith(".npz"):
            files.write_npz(
                path,
                map=np.asarray(host.maps[i], np.float32),
                raw=np.asarray(host.raw[i], np.float32),
                coefficients=np.asarray(host.coefficients[i], np.float32),
                logits=np.asarray(host.logits[i], np.float32),
                target=np.int64(host.targets[i]),
                predicted=np.int64(np.argmax(host.logits[i])),
                reference_logits=None if host.reference_logits is None
                else np.asarray(host.reference_logits[i], np.float32),
                prefix_coefficients=None if host.prefix_coefficients is None
                else np.asarray(host.prefix_coefficients[i], np.float32),
                label=None if e.meta.label is None else np.int64(e.meta.label),
                label_name=None if e.meta.label_name is None else np.str_(e.meta.label_name),
                **self.layout,
            )
        else:
            base = e.shown if e.shown is not None else self.c.preprocess.denormalize(e.x)
            files.write_png(path, overlay(base, np.asarray(host.maps[i]), alpha=self.cfg.alpha, cmap=self.cfg.cmap))
