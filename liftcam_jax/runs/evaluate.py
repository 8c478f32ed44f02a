"""Evaluate explanation methods on labelled images: faithfulness, localisation, SHAP agreement.

The library form of ``liftcam-jax evaluate``::

    from liftcam_jax import evaluation   # the public face of this module
    res = evaluation.evaluate(classifier, "imagenet-val-dev/", ["lift-cam", "grad-cam"], ["ad", "deletion"],
                              out_dir="runs/eval", limit=50)
    res.to_markdown(); res.to_json(); res.curves_figure()

Data (:func:`liftcam_jax.data.open_labelled`): a folder with ``labels.csv``
(+ ``boxes.csv``) or a TFDS split with a ``ClassLabel`` (its labels mapped to
the model's classes, :func:`liftcam_jax.data.label_mapping`). Each image is
explained for its label (``target="label"``) or the model's prediction, by
every method (the compiled step of :mod:`liftcam_jax.runs.loop`, on one device),
and scored by every metric of :data:`METRICS`; the scores go to the crash-safe
log ``evaluate.jsonl`` (one line per image and method) as soon as they exist,
so a rerun skips what is done. The log is summarised into
:class:`~liftcam_jax.results.Results`: per method and column, the mean and
the Student-t 95% interval over images, the median time per image and the
mean deletion / insertion curves.

Metrics (definitions in :mod:`liftcam_jax.metrics`):

* ``ad``: Average Drop %, lower is better (Chattopadhay et al., WACV 2018);
* ``ic``: Increase in Confidence %, higher is better (same paper);
* ``deletion`` / ``insertion``: RISE AUCs, lower / higher is better (Petsiuk et al., BMVC 2018);
* ``epg``: energy-based pointing game, higher is better (Wang et al., CVPR-W 2020);
* ``pointing``: pointing game hit rate (Zhang et al., ECCV 2016);
* ``shap``: cosine, Spearman and top-k overlap of the channel coefficients with
  sampled SHAP values of the activation maps (:mod:`liftcam_jax.shap`).

Box metrics named in ``metrics`` on data without any boxes are a usage error;
when only some images have a box in view, ``results.notes`` says on how many
they were scored.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

from .. import distributed, files
from .. import methods as _methods
from .. import metrics as M
from ..data import DataOptions, ItemError, open_labelled
from ..errors import UsageError, positive_int
from ..model import compiled_forward
from ..results import COLUMNS, Results, aggregate, cosine_ceiling, finite
from .folder import RunFolder
from .loop import (Entry, Progress, compiled_step, configure, label_class, label_classes, num_classes,
                   padded_size, process_share, run_loop)

__all__ = ["Context", "EvalConfig", "METRICS", "Metric", "RUN_FIELDS", "check_cam_applies", "evaluate", "parse_metrics",
           "register_metric"]


# ---------------------------------------------------------------------------
# metrics, in a registry
# ---------------------------------------------------------------------------

class Context(NamedTuple):
    """What a metric sees for one batch and one method (rows past the real images are padding)."""

    split: object
    params: object
    x: object  # (B, H, W, 3) preprocessed
    explanation: object  # the method's Explanation
    targets: object  # (B,)
    boxes: Optional[object]  # (B, n, 4) in input pixels, or None
    valid: Optional[object]  # (B, n)
    shap_values: Optional[object]  # (B, K)
    config: "EvalConfig"
    memo: dict  # shared between the metrics of one batch and method


class Metric(NamedTuple):
    """A metric: ``fn(ctx) -> {column: (values (B,), curve (B, S) or None)}``; ``needs`` boxes or SHAP values."""

    columns: tuple  # ((column, heading, "lower"|"higher", digits), ...)
    fn: Callable[[Context], dict]
    needs: str = ""


METRICS: Dict[str, Metric] = {}


def register_metric(name: str, metric: Metric) -> Metric:
    """Add a metric to :data:`METRICS` (its columns go into the results and the table)."""
    METRICS[name] = metric
    COLUMNS[name] = tuple(metric.columns)
    return metric


def _confidence(ctx: Context):
    if "cc" not in ctx.memo:
        ctx.memo["cc"] = M.confidence_change(ctx.split, ctx.params, ctx.x, ctx.explanation.maps, ctx.targets)
    return ctx.memo["cc"]


def _causal(kind: str):
    def fn(ctx: Context):
        c = ctx.config
        curve = M.deletion if kind == "deletion" else M.insertion
        config = M.CurveConfig(step=c.step if c.num_steps is None else None, num_steps=c.num_steps,
                               substrate=c.substrate, blur_sigma=c.blur_sigma, tie_break=c.tie_break,
                               chunk=c.step_chunk)
        key = None
        if c.tie_break != "raster":
            import jax

            key = jax.random.PRNGKey(c.seed)
        d = curve(ctx.split, ctx.params, ctx.x, ctx.explanation.maps, ctx.targets, config, key=key)
        ctx.memo["fractions"] = np.asarray(d.fractions)
        return {kind: (d.auc, d.scores)}
    return fn


def _shap_agreement(ctx: Context):
    import jax.numpy as jnp

    c, s = ctx.explanation.coefficients, jnp.asarray(ctx.shap_values)
    return {"shap_cosine": (M.cosine_similarity(c, s), None), "shap_spearman": (M.spearman(c, s), None),
            "shap_topk": (M.topk_overlap(c, s, k=int(ctx.config.topk)), None)}


register_metric("ad", Metric(COLUMNS["ad"], lambda ctx: {"ad": (_confidence(ctx).drop, None)}))
register_metric("ic", Metric(COLUMNS["ic"], lambda ctx: {"ic": (_confidence(ctx).increase, None)}))
register_metric("deletion", Metric(COLUMNS["deletion"], _causal("deletion")))
register_metric("insertion", Metric(COLUMNS["insertion"], _causal("insertion")))
register_metric("epg", Metric(COLUMNS["epg"], lambda ctx: {
    "epg": (M.energy_pointing_game(ctx.explanation.maps, ctx.boxes, ctx.valid), None)}, needs="boxes"))
register_metric("pointing", Metric(COLUMNS["pointing"], lambda ctx: {"pointing": (M.pointing_game(
    ctx.explanation.maps, ctx.boxes, ctx.valid, tolerance=float(ctx.config.tolerance)), None)}, needs="boxes"))
register_metric("shap", Metric(COLUMNS["shap"], _shap_agreement, needs="shap"))


def parse_metrics(text: Union[str, Sequence[str]]) -> List[str]:
    """``"all"``, a comma-separated string or a list of metric names -> the list (a bad name is a UsageError)."""
    parts = [p.strip().lower() for p in (text.split(",") if isinstance(text, str) else text) if p.strip()]
    if not parts:
        raise UsageError(f"no metrics given; valid metrics: {', '.join(METRICS)}, or all")
    if parts == ["all"]:
        return list(METRICS)
    bad = [p for p in parts if p not in METRICS]
    if bad:
        raise UsageError(f"unknown metric {bad[0]!r}; valid metrics: {', '.join(METRICS)}, or all")
    return list(dict.fromkeys(parts))


# ---------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------

RUN_FIELDS = ("batch_size", "step_chunk", "shap_chunk", "limit", "redo", "grid", "quiet", "process_index",
              "process_count", "run_info", "data")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """How images are explained and scored, and the run's other settings (:data:`RUN_FIELDS` are not part
    of the run's identity: they change speed, memory or what is run, never a score).

    target: ``"label"`` or ``"predicted"``; score: how the target class is scored,
    ``"logit"`` or ``"rest"`` (:data:`liftcam_jax.targets.SCORES`), by every method and by
    the SHAP game the ``shap`` metric compares with; seed: for randomised methods, SHAP
    sampling and random tie-breaking; step / num_steps: deletion/insertion
    pixels per step or number of steps (default RISE's step); substrate:
    ``"zeros"`` or ``"mean"``; blur_sigma: insertion's start blur; tie_break:
    ``"raster"`` or ``"random"`` order of equal map values; tolerance: pointing
    game; shap_method / shap_samples / topk: the SHAP reference; batch_size,
    step_chunk, shap_chunk: memory and speed only; limit: the first images
    only; redo: methods evaluated again even where the log has them; grid:
    images in ``grid.png``; quiet: no progress bar; process_index /
    process_count: this process's share (default JAX's); run_info: extra
    identity (e.g. the weights); data: how the data is found and labelled.
    """

    target: str = "label"
    score: str = "logit"
    seed: int = 0
    step: Optional[int] = None
    num_steps: Optional[int] = None
    substrate: str = "zeros"
    blur_sigma: float = M.RISE_BLUR_SIGMA
    tie_break: str = "raster"
    tolerance: float = M.POINTING_TOLERANCE
    shap_method: str = "permutation"
    shap_samples: int = 16
    topk: int = 10
    batch_size: int = 8
    step_chunk: int = 16
    shap_chunk: int = 64
    limit: Optional[int] = None
    redo: Sequence[str] = ()
    grid: int = 4
    quiet: bool = True
    process_index: Optional[int] = None
    process_count: Optional[int] = None
    run_info: Optional[dict] = None
    data: DataOptions = DataOptions()

    def __post_init__(self):
        if self.step is None and self.num_steps is None:
            object.__setattr__(self, "step", M.RISE_STEP)

    def check(self, metrics: Sequence[str]) -> None:
        """A one-line :class:`UsageError` for a bad combination (before any work)."""
        if self.target not in ("label", "predicted"):
            raise UsageError(f"target must be 'label' or 'predicted', not {self.target!r}")
        from ..targets import class_score

        class_score(self.score)  # an unknown name lists the valid ones
        if self.num_steps is not None and self.step not in (None, M.RISE_STEP):
            raise UsageError("give --step or --num-steps, not both")
        if not self.blur_sigma >= 0:
            raise UsageError(f"--blur-sigma must be >= 0, got {self.blur_sigma}")
        if not self.tolerance >= 0:
            raise UsageError(f"--tolerance must be >= 0, got {self.tolerance}")
        if self.tie_break not in ("raster", "random"):
            raise UsageError(f"--tie-break must be raster or random, not {self.tie_break!r}")
        if "shap" in metrics:
            from .. import shap as _shap

            if self.shap_method not in _shap.METHODS:
                raise UsageError(f"unknown --shap-method {self.shap_method!r}; valid: {', '.join(_shap.METHODS)}")
            if self.shap_method != "exact":  # samples come in antithetic pairs
                positive_int("--shap-samples", self.shap_samples, minimum=4, even=True)

    def identity(self) -> dict:
        d = dataclasses.asdict(self)
        for k in RUN_FIELDS:
            d.pop(k)
        if d["num_steps"] is not None:
            d["step"] = None
        for k, default in (("tie_break", "raster"), ("score", "logit")):
            if d[k] == default:  # the default keeps the identity of runs made before the option existed
                d.pop(k)
        d["blur_truncate"] = M.RISE_BLUR_TRUNCATE
        return d


# ---------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------

def check_cam_applies(classifier) -> Optional[str]:
    """``None`` when CAM applies to the classifier's head, else the reason."""
    import jax
    import jax.numpy as jnp

    from .. import tokens
    from ..methods import cams

    s = int(classifier.preprocess.size)
    shape = jax.eval_shape(classifier.split.features, classifier.params, jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32))
    try:
        a = jnp.ones(shape.shape, shape.dtype)
        layout = tokens.resolve(a, (s, s), classifier.split.tokens)  # None for maps
        cams.check_cam_head(classifier.split.head, classifier.params, a, tokens=layout)
    except UsageError as e:
        return str(e)
    return None


def _check_redo(redo: Sequence[str], methods: Sequence[str]) -> None:
    for r in redo:
        if r not in methods:
            _methods.get(r)  # an unknown name says so first
            raise UsageError(f"--redo {r}: not among the evaluated methods ({', '.join(methods)})")


def _check_boxes(source, metrics: Sequence[str], explicit: bool, data: str) -> None:
    """Box metrics asked for by name on data that has no boxes at all: a :class:`UsageError` before any work."""
    wanted = [m for m in metrics if METRICS[m].needs == "boxes"]
    if explicit and wanted and not source.has_boxes:
        raise UsageError(f"--metrics {', '.join(wanted)} need boxes, and {data} has none "
                         "(a boxes.csv beside labels.csv, or a TFDS bbox feature)")


def _box_notes(results: Results, metrics: Sequence[str]) -> List[str]:
    """A note when box metrics were scored on fewer images than the others (no box in view)."""
    cols = [c for m in metrics if METRICS[m].needs == "boxes" for c, *_ in METRICS[m].columns]
    aggs = [results.aggregate[m] for m in results.methods if m in results.aggregate]
    if not cols or not aggs:
        return []
    images = max(a["images"] for a in aggs)
    scored = max(a[c]["n"] for a in aggs for c in cols)
    if scored >= images:
        return []
    return [f"{', '.join(cols)}: scored on {scored} of {images} images; the others have no box in view (n/a)."]


def _runnable(classifier, methods: List[str], explicit: bool, notes: List[str]) -> Dict[str, _methods.Method]:
    """The methods to evaluate, resolved (CAM left out, with a note, where it does not apply)."""
    if "cam" in methods:
        why = check_cam_applies(classifier)
        if why is not None:
            if explicit:
                raise UsageError(f"cam does not apply at layer {classifier.layer}: {why}")
            methods = [m for m in methods if m != "cam"]
            notes.append(f"cam skipped: the head after {classifier.layer} is not GAP + Linear.")
    return {m: _methods.get(m) for m in methods}


def _todo(folder: RunFolder, items, methods, metrics, redo) -> Dict[str, List[str]]:
    """``item id -> methods`` still to evaluate: not in the log, or without every metric asked for."""
    todo = {}
    for it in items:
        ms = [m for m in methods if m in redo or not (
            folder.done(f"{it.id}|{m}") and set(metrics) <= set(folder.previous[f"{it.id}|{m}"].get("computed", ())))]
        if ms:
            todo[it.id] = ms
    return todo


def evaluate(classifier, data, methods="all", metrics="all", *, out_dir, config: Optional[EvalConfig] = None,
             stderr=None, **options) -> Results:
    """Explain labelled images with ``methods`` and score them with ``metrics`` (see the module doc).

    ``data``: a folder (``labels.csv``) or ``tfds:NAME[/CONFIG][@VERSION]:SPLIT``;
    ``methods``: ``"all"``, names, or a :class:`~liftcam_jax.methods.MethodList`;
    ``out_dir``: where the log and reports go (reused to resume); ``config``:
    an :class:`EvalConfig`, whose fields ``options`` override (``limit=``,
    ``redo=``, ``grid=``, ``quiet=``, ``run_info=``... and the
    :class:`DataOptions` ``data_dir=``, ``image_key=``, ``label_key=``, ``label_map=``).
    Writes ``results.json``, ``results.md``, ``curves.png`` and ``grid.png`` and
    returns the :class:`Results`. Bad arguments raise :class:`UsageError` before
    any work; images that cannot be read or labelled fail alone
    (``results.summary["failed"]``).

    Several processes (:mod:`liftcam_jax.distributed`; default JAX's process
    index and count): each evaluates its share into its own log
    ``evaluate-<p>-of-<P>.jsonl``, all meet at a barrier, and process 0 writes
    the reports from every log: the same results as one process.
    """
    cfg = configure(config or EvalConfig(), options)
    err = stderr if stderr is not None else sys.stderr
    explicit_metrics = not (isinstance(metrics, str) and metrics.strip().lower() == "all")
    metrics = parse_metrics(metrics)
    listed = methods if isinstance(methods, _methods.MethodList) else _methods.parse_names(
        methods if isinstance(methods, str) else ",".join(methods))
    _check_redo(cfg.redo, listed.names)
    cfg.check(metrics)
    data = os.fspath(data)
    if cfg.data.label_map is not None and not data.startswith("tfds:"):
        raise UsageError("--label-map applies to TFDS data; labels.csv gives ImageNet indices (imagenet_index)")
    d = cfg.data
    source = open_labelled(data, options=d)
    _check_boxes(source, metrics, explicit_metrics, data)
    items = source.items[: cfg.limit]
    classes = num_classes(classifier)
    labels = _Labels(label_classes(classifier, source, classes, d.label_map), classes)
    notes: List[str] = []
    methods = _runnable(classifier, list(listed.names), listed.explicit, notes)
    identity = {"command": "evaluate", "data": data if data.startswith("tfds:") else os.path.abspath(data),
                "model": classifier.name, "layer": classifier.layer, "label_map": d.label_map,
                "input_size": int(classifier.preprocess.size), **cfg.identity(), **(cfg.run_info or {})}
    if classifier.split.tokens is not None:  # --tokens: an explicit token layout
        identity["tokens"] = str(classifier.split.tokens)
    pi, pc = process_share(cfg.process_index, cfg.process_count)
    folder = RunFolder(out_dir, identity, "evaluate", pi, pc)
    t0 = time.perf_counter()
    todo = _todo(folder, distributed.share(items, pi, pc, [source.sequential] * len(items)),
                 list(methods), metrics, cfg.redo)
    grid_ids = [it.id for it in items[: max(0, int(cfg.grid))]]
    compile_s, fractions, counts = {}, None, {"done": 0, "failed": 0}
    if todo:
        ev = _Evaluator(classifier, cfg, metrics, methods, folder, todo, labels, set(grid_ids), err)
        try:
            run_loop([(source, [it for it in items if it.id in todo])], classifier.preprocess, cfg.batch_size,
                     launch=lambda entries, i: ev.batch(entries), fail=ev.fail, keep_display=True)
        finally:
            folder.close()
            ev.progress.close()
        compile_s, fractions, counts = ev.compile_s, ev.fractions, ev.summary
    config = dict(identity, compile_s=compile_s, batch_size=cfg.batch_size, step_chunk=cfg.step_chunk,
                  shap_chunk=cfg.shap_chunk, tie_break=cfg.tie_break)
    if fractions is None:  # nothing ran: the fractions the configuration gives
        h = int(classifier.preprocess.size)
        fractions = M.step_counts(h * h, cfg.step, cfg.num_steps) / float(h * h)
    config["fractions"] = [float(f) for f in fractions]
    if pc > 1:  # every share is in the logs before process 0 reads them
        distributed.barrier(f"liftcam-jax-evaluate-{os.path.abspath(folder.path)}")
    results = aggregate(folder.records(), [it.id for it in items], list(methods), metrics, config, notes)
    results.notes += _box_notes(results, metrics)
    results.summary = dict(counts, skipped=len(items) - len(todo), seconds=time.perf_counter() - t0)
    if pi == 0:
        results.save(folder.path, stderr=err)
        _grid(folder.path, classifier, list(methods), grid_ids, results)
    return results


class _Labels(NamedTuple):
    """Dataset label -> model class (``None``: the labels are the classes) and the number of classes."""

    mapping: Optional[np.ndarray]
    classes: int


class _Prepared(NamedTuple):
    """One batch of labelled images, ready for every method: inputs, targets, boxes, SHAP values."""

    good: List[Tuple[Entry, int]]  # the entries with a class, and that class
    n: int  # rows after padding
    x: Any  # (n, H, W, 3) on the device
    targets: np.ndarray  # (n,) the explained classes
    preds: np.ndarray
    probs: np.ndarray  # (n, C) softmax
    boxes: Optional[Tuple[Any, Any]]  # (boxes (n, k, 4), valid (n, k)) on the device, or None
    shap: Optional[Tuple[np.ndarray, np.ndarray]]  # (values, standard errors) (n, K), or None


class _Scores(NamedTuple):
    """One method's outputs on a batch: metric columns, curves, maps and seconds per image."""

    cols: Dict[str, np.ndarray]
    curves: Dict[str, np.ndarray]
    maps: np.ndarray
    seconds: float


class _Evaluator:
    """Compiled explainers and metrics for one classifier and configuration; scores batches into the log."""

    def __init__(self, classifier, cfg: EvalConfig, metrics: List[str], methods: Dict[str, _methods.Method],
                 folder: RunFolder, todo: Dict[str, List[str]], labels: _Labels, grid_ids, stream):
        import jax

        self.jax, self.c, self.cfg, self.metrics, self.methods = jax, classifier, cfg, metrics, methods
        self.folder, self.todo, self.labels, self.grid_ids = folder, todo, labels, grid_ids
        self.summary = {"done": 0, "failed": 0}
        self.compile_s: Dict[str, float] = {}
        self.fractions = None
        self.devices = tuple(jax.local_devices()[:1])
        self.logits_fn = compiled_forward(classifier.split)  # the one Classifier.logits uses
        self.features_fn = jax.jit(classifier.split.features)
        self._shap_fn = None
        self.progress = Progress(sum(len(v) for v in todo.values()), "evaluate", "image x method", cfg.quiet, stream)

    def fail(self, item, msg: str) -> None:
        self.folder.append({"id": item.id, "status": "failed", "error": msg, "source": item.source})
        self.summary["failed"] += 1
        self.progress.update(len(self.todo.get(item.id, ())))
        self.progress.write(f"liftcam-jax: failed: {item.source}: {msg}")

    def _shap(self, x, t):
        if self._shap_fn is None:
            from .. import shap as _shap

            cfg, head = self.cfg, self.c.split.head
            from ..targets import class_score

            score = class_score(cfg.score)
            self._shap_fn = self.jax.jit(lambda params, a, t, key: _shap.shap_values(
                head, params, a, score(t), method=cfg.shap_method, num_samples=cfg.shap_samples, key=key,
                chunk_size=cfg.shap_chunk))
        values, stderr = self._shap_fn(self.c.params, self.features_fn(self.c.params, x), t,
                                       self.jax.random.PRNGKey(self.cfg.seed))
        return np.asarray(values, np.float32), np.asarray(stderr, np.float32)

    def _class_of(self, e: Entry) -> Optional[int]:
        """The model class an image is labelled with, or ``None`` (the image failed, with the reason)."""
        try:
            return label_class(self.labels.mapping, e.meta, self.labels.classes, self.c.name)
        except ItemError as err:
            self.fail(e.item, str(err))
            return None

    def _prepare(self, good: List[Tuple[Entry, int]]) -> _Prepared:
        jnp, prep = self.jax.numpy, self.c.preprocess
        n = padded_size(len(good), self.cfg.batch_size, 1)  # a short batch is padded to a power of two only
        x = np.zeros((n, *good[0][0].x.shape), np.float32)
        labels = np.zeros((n,), np.int32)
        boxes = [None if e.meta.boxes is None else M.boxes_to_input(e.meta.boxes, e.meta.size, prep) for e, _ in good]
        n_boxes = 1 << (max([1] + [len(b) for b in boxes if b is not None]) - 1).bit_length()
        box_arr, valid = np.zeros((n, n_boxes, 4), np.float32), np.zeros((n, n_boxes), bool)
        for i, (e, label) in enumerate(good):
            x[i], labels[i] = e.x, label
            if boxes[i] is not None:
                box_arr[i, : len(boxes[i])], valid[i, : len(boxes[i])] = boxes[i], True
        have_boxes = any(b is not None for b in boxes)
        xj = jnp.asarray(x)
        logits = np.asarray(self.logits_fn(self.c.params, xj))
        preds = np.argmax(logits, -1).astype(np.int32)
        targets = labels if self.cfg.target == "label" else preds
        probs = np.asarray(self.jax.nn.softmax(jnp.asarray(logits), -1))
        shap = self._shap(xj, jnp.asarray(targets)) if "shap" in self.metrics else None
        return _Prepared(good, n, xj, targets, preds, probs,
                         (jnp.asarray(box_arr), jnp.asarray(valid)) if have_boxes else None, shap)

    def batch(self, entries: List[Entry]) -> None:
        good = [(e, c) for e in entries for c in [self._class_of(e)] if c is not None]
        if not good:
            return None
        b = self._prepare(good)
        for name, method in self.methods.items():
            rows = [i for i, (e, _) in enumerate(good) if name in self.todo[e.item.id]]
            if not rows:
                continue
            scores = self._score(b, name, method)
            for i in rows:
                self._record(b, i, name, scores)
            self.progress.update(len(rows), method=name)
        self.summary["done"] += len(good)
        return None

    def _score(self, b: _Prepared, name: str, method: _methods.Method) -> _Scores:
        """Explain the batch with one method (timed, compilation excluded) and apply every metric."""
        jax, cfg = self.jax, self.cfg
        tj = jax.numpy.asarray(b.targets)
        key = jax.random.PRNGKey(cfg.seed) if method.needs_key else None
        options = {} if cfg.score == "logit" else {"score": cfg.score}
        step, _, _ = compiled_step(self.c.split, method, options, self.devices)
        before = step.compile_s
        program = step.program(self.c.params, b.x, tj, key)
        self.compile_s[name] = self.compile_s.get(name, 0.0) + step.compile_s - before
        t0 = time.perf_counter()
        exp = program(self.c.params, b.x, tj, key)
        jax.block_until_ready(exp.maps)
        seconds = time.perf_counter() - t0
        boxes, valid = b.boxes if b.boxes is not None else (None, None)
        ctx = Context(self.c.split, self.c.params, b.x, exp, tj, boxes, valid,
                      None if b.shap is None else b.shap[0], cfg, {})
        cols: Dict[str, np.ndarray] = {}
        curves: Dict[str, np.ndarray] = {}
        for metric in (METRICS[m] for m in self.metrics):
            if (metric.needs == "boxes" and boxes is None) or (metric.needs == "shap" and b.shap is None):
                continue
            for col, (values, curve) in metric.fn(ctx).items():
                cols[col] = np.asarray(values)
                if curve is not None:
                    curves[col] = np.asarray(curve)
        if "fractions" in ctx.memo:
            self.fractions = ctx.memo["fractions"]
        return _Scores(cols, curves, np.asarray(exp.maps), seconds / b.n)

    def _record(self, b: _Prepared, i: int, m: str, s: _Scores) -> None:
        (e, label), out = b.good[i], self.folder.path
        if e.item.id in self.grid_ids:
            files.write_png(os.path.join(out, "grid", "images", e.item.id + ".png"), np.asarray(e.shown))
            files.write_npz(os.path.join(out, "grid", m, e.item.id + ".npz"), map=np.asarray(s.maps[i], np.float16))
        old = self.folder.previous.get(f"{e.item.id}|{m}") or {}
        kept = old.get("status") == "done"
        rec_metrics = dict(old.get("metrics") or {}) if kept else {}
        rec_curves = dict(old.get("curves") or {}) if kept else {}
        rec_metrics.update({k: finite(v[i]) for k, v in s.cols.items()})
        rec_curves.update({k: [round(float(x), 6) for x in v[i]] for k, v in s.curves.items()})
        rec = {
            "id": f"{e.item.id}|{m}", "item": e.item.id, "method": m, "status": "done", "source": e.item.source,
            "label": int(label), "target": int(b.targets[i]), "dataset_label": e.meta.label,
            "label_name": e.meta.label_name, "predicted": int(b.preds[i]),
            "target_prob": finite(b.probs[i, b.targets[i]]), "explain_s": s.seconds,
            "metrics": rec_metrics, "curves": rec_curves,
            "computed": sorted(set(old.get("computed", ()) if kept else ()) | set(self.metrics)),
        }
        if b.shap is not None:
            values, se = b.shap[0][i], b.shap[1][i]
            rec["shap_stderr"] = finite(np.mean(se))
            rec["shap_rel_stderr"] = finite(np.mean(se) / max(np.mean(np.abs(values)), 1e-30))
            rec["shap_cosine_ceiling"] = finite(cosine_ceiling(values, se))
        self.folder.append(rec)


def _grid(out, classifier, methods, ids, results: Results) -> None:
    """``grid.png``: the first images and their maps, from the files kept under ``grid/``."""
    from PIL import Image

    from ..viz import grid, overlay

    labels = {r["item"]: r["label"] for r in results.per_image}
    rows, texts = [], []
    for ident in ids:
        ipath = os.path.join(out, "grid", "images", ident + ".png")
        if not os.path.isfile(ipath):
            continue
        with Image.open(ipath) as im:
            img = np.asarray(im.convert("RGB"))
        row = [img]
        text = [classifier.class_name(labels[ident]) if ident in labels else ident]
        for m in methods:
            mpath = os.path.join(out, "grid", m, ident + ".npz")
            if os.path.isfile(mpath):
                with np.load(mpath) as z:
                    row.append(overlay(img, np.asarray(z["map"], np.float32)))
                text.append(m)
        rows.append(row)
        texts.append(text)
    if rows:
        files.write_png(os.path.join(out, "grid.png"), grid(rows, texts))
