"""evaluate: score explanation methods on labelled images (faithfulness, localisation, SHAP agreement).

--data is a folder with images and labels.csv (columns file = path relative to
the folder, imagenet_index = the class; other columns ignored), and optionally
boxes.csv (file,xmin,ymin,xmax,ymax; several rows per file allowed; pixel
coordinates of the stored image, mapped to the model input through its
preprocessing: squash, or shorter-side resize + centre crop, where boxes
outside the crop drop out) for the localisation metrics; or a TFDS split
tfds:NAME[/CONFIG]:SPLIT prepared as array_record (labels from the 'label'
feature; boxes from an 'objects/bbox' or 'bbox' feature when there is one).

Metrics (--metrics, comma-separated or 'all'); definitions in liftcam_jax.metrics:
  ad         Average Drop %, lower is better (Chattopadhay et al., WACV 2018)
  ic         Increase in Confidence %, higher is better (same paper)
  deletion   RISE deletion AUC, lower is better (Petsiuk et al., BMVC 2018)
  insertion  RISE insertion AUC, higher is better (same paper)
  epg        energy-based pointing game, higher is better (Wang et al., CVPR-W 2020)
  pointing   pointing game hit rate, 15 px tolerance (Zhang et al., ECCV 2016)
  shap       cosine, Spearman and top-k overlap of the channel coefficients with
             sampled SHAP values of the activation maps (liftcam_jax.shap)

Writes into --out: results.json (per image and aggregate), results.md (methods x
metrics: mean and Student-t 95% confidence interval, time per image),
curves.png (mean deletion and insertion curves; needs matplotlib), grid.png
(overlays of the first images), and evaluate.jsonl, the crash-safe log of
finished image x method pairs: rerunning the same command skips them.
Exit status: 0 when every image was evaluated, 1 when some failed, 2 for a
usage error.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io as _pyio
import math
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

from .. import io as _io
from .. import methods as _methods
from .. import metrics as M
from ..errors import UsageError
from ._args import add_model_arguments, positive_int

# metric group -> (columns it produces)
METRICS = {
    "ad": ("ad",),
    "ic": ("ic",),
    "deletion": ("deletion",),
    "insertion": ("insertion",),
    "epg": ("epg",),
    "pointing": ("pointing",),
    "shap": ("shap_cosine", "shap_spearman", "shap_topk"),
}
# column -> (heading, better direction)
COLUMNS = {
    "ad": ("Average Drop %", "lower"),
    "ic": ("Increase in Conf. %", "higher"),
    "deletion": ("Deletion AUC", "lower"),
    "insertion": ("Insertion AUC", "higher"),
    "epg": ("Energy pointing game", "higher"),
    "pointing": ("Pointing game", "higher"),
    "shap_cosine": ("SHAP cosine", "higher"),
    "shap_spearman": ("SHAP Spearman", "higher"),
    "shap_topk": ("SHAP top-k overlap", "higher"),
}
LOG = "evaluate.jsonl"


def add_arguments(parser):
    parser.add_argument("--data", required=True,
                        help="folder with images + labels.csv (+ boxes.csv), or tfds:NAME[/CONFIG]:SPLIT")
    add_model_arguments(parser)
    parser.add_argument("--methods", default="all",
                        help="comma-separated methods, or 'all' (default): " + ", ".join(_methods.names()))
    parser.add_argument("--metrics", default="all",
                        help="comma-separated metrics, or 'all' (default): " + ", ".join(METRICS))
    parser.add_argument("--out", required=True, help="output folder (created; reused to resume)")
    parser.add_argument("--limit", type=positive_int, default=None, help="evaluate only the first N labelled images")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="images per step (default 8)")
    parser.add_argument("--target", choices=("label", "predicted"), default="label",
                        help="explain the ground-truth class (default) or the predicted one")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed for randomised methods and SHAP sampling")
    parser.add_argument("--redo", default="",
                        help="comma-separated methods to evaluate again even where the log has them "
                             "(e.g. after a method's code changed)")
    g = parser.add_argument_group("deletion / insertion (RISE)")
    g.add_argument("--step", type=positive_int, default=None,
                   help=f"pixels per step (default {M.RISE_STEP}, RISE's for 224x224)")
    g.add_argument("--num-steps", type=positive_int, default=None, help="number of steps instead of --step")
    g.add_argument("--substrate", choices=("zeros", "mean"), default="zeros",
                   help="what deleted pixels become: zeros of the normalised input (RISE) or the image mean")
    g.add_argument("--blur-sigma", type=float, default=M.RISE_BLUR_SIGMA,
                   help=f"insertion's start blur sigma in pixels, radius = sigma (default {M.RISE_BLUR_SIGMA:g}: RISE's 11 taps)")
    g.add_argument("--tie-break", choices=M.TIE_BREAKS, default="raster",
                   help="order of equally salient pixels: row-major (default) or a random order fixed by --seed")
    g.add_argument("--step-chunk", type=positive_int, default=16,
                   help="perturbed copies per image per model call (memory; default 16)")
    g = parser.add_argument_group("localisation and SHAP")
    g.add_argument("--tolerance", type=float, default=M.POINTING_TOLERANCE,
                   help=f"pointing game tolerance in pixels (default {M.POINTING_TOLERANCE})")
    g.add_argument("--shap-method", default="permutation", help="SHAP estimator: permutation, kernel or exact")
    g.add_argument("--shap-samples", type=positive_int, default=16, help="SHAP samples per image: permutations or coalitions, even (default 16)")
    g.add_argument("--shap-chunk", type=positive_int, default=64, help="SHAP head evaluations per call (default 64)")
    g.add_argument("--topk", type=positive_int, default=10, help="k of the SHAP top-k overlap (default 10)")
    g = parser.add_argument_group("outputs")
    g.add_argument("--grid", type=int, default=4, help="images in the qualitative grid (0: none; default 4)")
    g.add_argument("--data-dir", default=None, help="TFDS data dir (default: TFDS's)")
    g.add_argument("--quiet", action="store_true", help="no progress bar and no summary")


# ---------------------------------------------------------------------------
# names
# ---------------------------------------------------------------------------

def parse_metrics(text: str) -> List[str]:
    """``"all"`` or a comma-separated list of metric names -> the list (a bad name is a UsageError)."""
    parts = [p.strip().lower() for p in str(text).split(",") if p.strip()]
    if not parts:
        raise UsageError(f"no metrics given; valid metrics: {', '.join(METRICS)}, or all")
    if parts == ["all"]:
        return list(METRICS)
    bad = [p for p in parts if p not in METRICS]
    if bad:
        raise UsageError(f"unknown metric {bad[0]!r}; valid metrics: {', '.join(METRICS)}, or all")
    return list(dict.fromkeys(parts))


def parse_methods(text: str) -> tuple:
    """``"all"`` or a comma-separated list -> ``(methods, explicit)``."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if not parts:
        raise UsageError(f"no methods given; valid methods: {', '.join(_methods.names())}, or all")
    if parts == ["all"]:
        return list(_methods.names()), False
    for p in parts:
        _methods.get(p)
    return list(dict.fromkeys(parts)), True


# ---------------------------------------------------------------------------
# data: labels.csv / boxes.csv folders and TFDS splits
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class Labelled:
    """One labelled image: the data item, its class, and its boxes (stored-image pixels) or None."""

    item: object
    label: int
    boxes: Optional[np.ndarray] = None
    source: object = None


def _read_csv(path: str, required: Sequence[str]) -> List[dict]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            cols = [c.strip() for c in (reader.fieldnames or [])]
            missing = [c for c in required if c not in cols]
            if missing:
                raise UsageError(f"{path} has no column {missing[0]!r} (columns: {', '.join(cols) or 'none'}; "
                                 f"needed: {', '.join(required)})")
            return [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except UnicodeDecodeError as e:
        raise UsageError(f"{path} is not UTF-8 text: {e}") from None


def read_folder(folder: str) -> List[Labelled]:
    """``labels.csv`` (+ ``boxes.csv``) of a folder -> labelled items, in the order of labels.csv."""
    from ..data import FileSource, Item

    labels_path = os.path.join(folder, "labels.csv")
    if not os.path.isdir(folder):
        raise UsageError(f"data folder not found: {folder}")
    if not os.path.isfile(labels_path):
        raise UsageError(f"{folder} has no labels.csv (columns file,imagenet_index)")
    rows = _read_csv(labels_path, ("file", "imagenet_index"))
    if not rows:
        raise UsageError(f"{labels_path} lists no images")
    boxes: Dict[str, list] = {}
    boxes_path = os.path.join(folder, "boxes.csv")
    has_boxes = os.path.isfile(boxes_path)
    if has_boxes:
        for n, row in enumerate(_read_csv(boxes_path, ("file", "xmin", "ymin", "xmax", "ymax")), start=2):
            try:
                b = [float(row[k]) for k in ("xmin", "ymin", "xmax", "ymax")]
            except ValueError:
                raise UsageError(f"{boxes_path} line {n}: box coordinates must be numbers") from None
            boxes.setdefault(row["file"], []).append(b)
    out, seen = [], set()
    for n, row in enumerate(rows, start=2):
        rel = row["file"]
        try:
            label = int(row["imagenet_index"])
        except ValueError:
            raise UsageError(f"{labels_path} line {n}: imagenet_index {row['imagenet_index']!r} is not an integer") from None
        if not rel or rel in seen:
            raise UsageError(f"{labels_path} line {n}: {'empty' if not rel else 'repeated'} file name {rel!r}")
        seen.add(rel)
        path = os.path.join(folder, rel)
        item = Item(rel.replace(os.sep, "/"), path, "image", ref=path)
        b = np.asarray(boxes.get(rel, []), np.float32).reshape(-1, 4) if has_boxes else None
        out.append(Labelled(item, label, b))
    source = FileSource([lab.item for lab in out])
    for lab in out:
        lab.source = source
    return out


class _TfdsLabelled:
    """A TFDS source whose ``load`` returns ``(image, label, boxes)`` (array_record splits only)."""

    def __init__(self, inner):
        self.inner = inner
        self.items = inner.items
        if not getattr(inner, "random_access", False):
            raise UsageError(f"evaluate reads TFDS splits prepared as array_record (random access); "
                             f"{inner.spec} is not (tfds build NAME --file_format=array_record)")

    def read(self, items):
        for it in items:
            yield it, (lambda it=it: self.load(it))

    def load(self, item):
        from ..data import ItemError

        ex = self.inner.example(item)
        image = self.inner.image(ex)
        if "label" not in ex:
            raise ItemError(f"{item.source} has no 'label' feature")
        label = int(np.asarray(ex["label"]))
        bbox = None
        objects = ex.get("objects") if isinstance(ex.get("objects"), dict) else None
        raw = objects.get("bbox") if objects else ex.get("bbox", ex.get("bboxes"))
        if raw is not None:  # TFDS BBoxFeature: (ymin, xmin, ymax, xmax) in [0, 1]
            r = np.asarray(raw, np.float32).reshape(-1, 4)
            h, w = image.shape[:2]
            bbox = np.stack([r[:, 1] * w, r[:, 0] * h, r[:, 3] * w, r[:, 2] * h], -1)
        return image, label, bbox


def read_tfds(spec: str, data_dir: Optional[str]) -> List[Labelled]:
    from ..data import open_inputs

    (inner,) = open_inputs([spec], data_dir=data_dir)
    src = _TfdsLabelled(inner)
    return [Labelled(it, -1, None, src) for it in src.items]


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def _num(v):
    v = float(v)
    return v if math.isfinite(v) else None


def _reader_class():
    from ..batch import Reader

    class EvalReader(Reader):
        """The batch pipeline's reader, keeping the stored size and TFDS labels/boxes of each image."""

        def _prepare(self, item, load):
            out = load()
            meta = None
            if isinstance(out, tuple):
                out, meta = out[0], out[1:]
            shown = self.prep.resize_image(out)
            x = np.asarray(self.prep.normalize(shown), np.float32)
            return x, (shown, out.shape[:2], meta)

    return EvalReader


def check_cam_applies(classifier) -> Optional[str]:
    """``None`` when CAM applies to the classifier's head, else the reason."""
    import jax
    import jax.numpy as jnp

    from ..methods import cams

    s = int(classifier.preprocess.size)
    shape = jax.eval_shape(classifier.split.features, classifier.params,
                           jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32))
    try:
        cams.check_cam_head(classifier.split.head, classifier.params, jnp.ones(shape.shape, shape.dtype))
    except UsageError as e:
        return str(e)
    return None


# ---------------------------------------------------------------------------
# the evaluation of one batch
# ---------------------------------------------------------------------------

class _Evaluator:
    """Compiled explainers and metrics for one classifier and one configuration."""

    def __init__(self, classifier, cfg, metrics: List[str]):
        import jax

        self.jax = jax
        self.c = classifier
        self.cfg = cfg
        self.metrics = metrics
        self.split = classifier.split
        self.params = classifier.params
        self.compiled: Dict[str, object] = {}
        self.compile_s: Dict[str, float] = {}
        self.logits_fn = jax.jit(lambda p, x: classifier.split(p, x))
        self.features_fn = jax.jit(classifier.split.features)

    def explainer(self, method, params, x, t, key):
        if method not in self.compiled:
            from ..explain import explain

            split = self.split

            def step(params, x, t, key):
                return explain(split, params, x, t, method=method, key=key)

            t0 = time.perf_counter()
            self.compiled[method] = self.jax.jit(step).lower(params, x, t, key).compile()
            self.compile_s[method] = time.perf_counter() - t0
        return self.compiled[method]

    def shap(self, x, t):
        """Sampled SHAP values of the activation maps for the targets, and their standard errors."""
        if not hasattr(self, "_shap_fn"):
            from .. import shap as _shap

            cfg, head = self.cfg, self.split.head

            def fn(params, a, t, key):
                return _shap.shap_values(head, params, a, t, method=cfg["shap_method"],
                                         num_samples=cfg["shap_samples"], key=key, chunk_size=cfg["shap_chunk"])

            self._shap_fn = self.jax.jit(fn)
        a = self.features_fn(self.params, x)
        values, stderr = self._shap_fn(self.params, a, t, self.jax.random.PRNGKey(self.cfg["seed"]))
        return np.asarray(values, np.float32), np.asarray(stderr, np.float32)

    def run_method(self, method, x, t, boxes, valid, shap_values):
        """Explain the batch with ``method`` and score it: ``(columns, curves, maps, seconds)``."""
        jax, cfg = self.jax, self.cfg
        m = _methods.get(method)
        key = jax.random.PRNGKey(cfg["seed"]) if m.needs_key else None
        fn = self.explainer(method, self.params, x, t, key)
        t0 = time.perf_counter()
        exp = fn(self.params, x, t, key)
        jax.block_until_ready(exp.maps)
        seconds = time.perf_counter() - t0
        maps = exp.maps
        cols: Dict[str, np.ndarray] = {}
        curves: Dict[str, np.ndarray] = {}
        model, params = self.split, self.params
        if "ad" in self.metrics or "ic" in self.metrics:
            cc = M.confidence_change(model, params, x, maps, t)
            if "ad" in self.metrics:
                cols["ad"] = np.asarray(cc.drop)
            if "ic" in self.metrics:
                cols["ic"] = np.asarray(cc.increase)
        steps = dict(step=cfg["step"], num_steps=cfg["num_steps"], chunk=cfg["step_chunk"], tie_break=cfg["tie_break"],
                     key=jax.random.PRNGKey(cfg["seed"]) if cfg["tie_break"] == "random" else None)
        if "deletion" in self.metrics:
            d = M.deletion(model, params, x, maps, t, substrate=cfg["substrate"], **steps)
            cols["deletion"], curves["deletion"] = np.asarray(d.auc), np.asarray(d.scores)
            self.fractions = np.asarray(d.fractions)
        if "insertion" in self.metrics:
            d = M.insertion(model, params, x, maps, t, blur_sigma=cfg["blur_sigma"], **steps)
            cols["insertion"], curves["insertion"] = np.asarray(d.auc), np.asarray(d.scores)
            self.fractions = np.asarray(d.fractions)
        if "epg" in self.metrics and boxes is not None:
            cols["epg"] = np.asarray(M.energy_pointing_game(maps, boxes, valid))
        if "pointing" in self.metrics and boxes is not None:
            cols["pointing"] = np.asarray(M.pointing_game(maps, boxes, valid, tolerance=float(cfg["tolerance"])))
        if "shap" in self.metrics and shap_values is not None:
            c, s = exp.coefficients, jax.numpy.asarray(shap_values)
            cols["shap_cosine"] = np.asarray(M.cosine_similarity(c, s))
            cols["shap_spearman"] = np.asarray(M.spearman(c, s))
            cols["shap_topk"] = np.asarray(M.topk_overlap(c, s, k=int(cfg["topk"])))
        return cols, curves, np.asarray(maps), seconds


# ---------------------------------------------------------------------------
# run
# ---------------------------------------------------------------------------

def run(args, zoo) -> int:
    metrics = parse_metrics(args.metrics)
    methods, explicit = parse_methods(args.methods)
    redo = [r.strip() for r in str(args.redo or "").split(",") if r.strip()]
    for r in redo:
        _methods.get(r)
        if r not in methods:
            raise UsageError(f"--redo {r}: not among the evaluated methods ({', '.join(methods)})")
    if args.step is not None and args.num_steps is not None:
        raise UsageError("give --step or --num-steps, not both")
    if not args.blur_sigma >= 0:
        raise UsageError(f"--blur-sigma must be >= 0, got {args.blur_sigma}")
    if not args.tolerance >= 0:
        raise UsageError(f"--tolerance must be >= 0, got {args.tolerance}")
    if "shap" in metrics:
        try:
            from .. import shap as _shap
        except ImportError:
            raise UsageError("the 'shap' metric needs liftcam_jax.shap, which is not available") from None
        if args.shap_method not in _shap.METHODS:
            raise UsageError(f"unknown --shap-method {args.shap_method!r}; valid: {', '.join(_shap.METHODS)}")
        if args.shap_method != "exact" and (args.shap_samples < 4 or args.shap_samples % 2):
            raise UsageError(f"--shap-samples must be even and at least 4 (samples come in pairs), "
                             f"got {args.shap_samples}")
    names = list(zoo.names())
    if args.model not in names:
        raise UsageError(f"unknown model {args.model!r}; valid models: {', '.join(names)}")

    data = args.data
    if str(data).startswith("tfds:"):
        labelled = read_tfds(data, args.data_dir)
    else:
        labelled = read_folder(data)
    if args.limit is not None:
        labelled = labelled[: args.limit]

    classifier = zoo.load(args.model, weights=args.weights, layer=args.layer)
    notes = []
    if "cam" in methods:
        why = check_cam_applies(classifier)
        if why is not None:
            if explicit:
                raise UsageError(f"cam does not apply at layer {classifier.layer}: {why}")
            methods.remove("cam")
            notes.append(f"cam skipped: the head after {classifier.layer} is not GAP + Linear.")

    out = os.fspath(args.out)
    try:
        _io.check_writable(out)
    except OSError as e:
        raise UsageError(f"output folder {out} is not writable: {e.strerror or e}") from None
    cfg = {
        "command": "evaluate",
        "data": os.path.abspath(data) if not str(data).startswith("tfds:") else data,
        "model": classifier.name,
        "weights": args.weights or "default",
        "layer": classifier.layer,
        "target": args.target,
        "seed": args.seed,
        "step": args.step if (args.step or args.num_steps) else M.RISE_STEP,
        "num_steps": args.num_steps,
        "substrate": args.substrate,
        "tie_break": args.tie_break,
        "blur_sigma": args.blur_sigma,
        "blur_truncate": M.RISE_BLUR_TRUNCATE,
        "tolerance": args.tolerance,
        "shap_method": args.shap_method,
        "shap_samples": args.shap_samples,
        "topk": args.topk,
        "input_size": int(classifier.preprocess.size),
    }
    from ..batch import check_run_identity

    check_run_identity(out, cfg)
    cfg = dict(cfg, step_chunk=args.step_chunk, shap_chunk=args.shap_chunk)

    err = sys.stderr
    t_start = time.perf_counter()
    log = _io.Manifest(os.path.join(out, LOG))
    previous = log.latest()
    wanted_cols = [c for g in metrics for c in METRICS[g]]

    def pending_methods(lab):
        todo = []
        for m in methods:
            rec = previous.get(f"{lab.item.id}|{m}")
            if m in redo or not (rec and rec.get("status") == "done"
                                 and set(metrics) <= set(rec.get("computed", ()))):
                todo.append(m)
        return todo

    todo = [(lab, pending_methods(lab)) for lab in labelled]
    todo = [(lab, ms) for lab, ms in todo if ms]
    n_grid = max(0, int(args.grid))
    grid_ids = {lab.item.id for lab in labelled[:n_grid]}
    summary = {"done": 0, "failed": 0, "skipped": len(labelled) - len(todo)}
    if todo:
        _evaluate(classifier, cfg, metrics, methods, todo, log, previous, grid_ids, out, args, summary)
    log.close()
    seconds = time.perf_counter() - t_start
    results = aggregate(out, labelled, methods, wanted_cols, cfg, notes)
    write_reports(out, results, classifier, methods, labelled[:n_grid], wanted_cols, args)
    if not args.quiet:
        print(f"liftcam-jax: evaluate: {summary['done']} images evaluated, {summary['skipped']} skipped (already "
              f"done), {summary['failed']} failed of {len(labelled)} in {seconds:.1f} s; "
              f"results: {os.path.join(out, 'results.md')}", file=err)
    return 1 if summary["failed"] else 0


def _evaluate(classifier, cfg, metrics, methods, todo, log, previous, grid_ids, out, args, summary):
    import jax
    import jax.numpy as jnp
    from tqdm import tqdm

    prep = classifier.preprocess
    size = int(prep.size)
    bs = int(args.batch_size)
    ev = _Evaluator(classifier, cfg, metrics)
    classes = int(jax.eval_shape(ev.logits_fn, classifier.params,
                                 jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)).shape[-1])
    by_id = {lab.item.id: (lab, ms) for lab, ms in todo}
    max_boxes = max([1] + [len(lab.boxes) for lab, _ in todo if lab.boxes is not None])
    sources: Dict[int, tuple] = {}
    for lab, _ in todo:
        sources.setdefault(id(lab.source), (lab.source, []))[1].append(lab.item)
    work = list(sources.values())
    reader = _reader_class()(work, prep, bs, True, max(1, min(4, os.cpu_count() or 1)), 2)
    bar = tqdm(total=len(todo), unit="img", desc="evaluate", file=sys.stderr, disable=args.quiet,
               dynamic_ncols=True, smoothing=0.1)

    def fail(item, msg):
        log.append({"id": item.id, "status": "failed", "error": msg, "source": item.source})
        summary["failed"] += 1
        bar.update(1)
        bar.write(f"liftcam-jax: failed: {item.source}: {msg}", file=sys.stderr)

    def do_batch(entries):
        good = []
        for item, x, (shown, stored, meta) in entries:
            lab, ms = by_id[item.id]
            label, boxes = lab.label, lab.boxes
            if meta is not None:
                label, boxes = meta[0], meta[1]
            if not 0 <= label < classes:
                fail(item, f"label {label} out of range for {classifier.name} ({classes} classes)")
                continue
            good.append((item, x, shown, stored, label, boxes, ms))
        if not good:
            return
        n = len(good)
        x = np.zeros((bs, size, size, 3), np.float32)
        labels = np.zeros((bs,), np.int32)
        box_arr = np.zeros((bs, max_boxes, 4), np.float32)
        valid = np.zeros((bs, max_boxes), bool)
        have_boxes = False
        for i, (item, xi, shown, stored, label, boxes, _) in enumerate(good):
            x[i], labels[i] = xi, label
            if boxes is not None:
                have_boxes = True
                b = M.boxes_to_input(boxes, stored, prep)[:max_boxes]
                box_arr[i, : len(b)] = b
                valid[i, : len(b)] = True
        xj = jnp.asarray(x)
        logits = np.asarray(ev.logits_fn(classifier.params, xj))
        preds = np.argmax(logits, -1).astype(np.int32)
        targets = labels if cfg["target"] == "label" else preds
        tj = jnp.asarray(targets)
        probs = np.asarray(jax.nn.softmax(jnp.asarray(logits), -1))
        shap_v = shap_se = None
        if "shap" in metrics:
            shap_v, shap_se = ev.shap(xj, tj)
        bj = jnp.asarray(box_arr) if have_boxes else None
        vj = jnp.asarray(valid) if have_boxes else None
        needed = [m for m in methods if any(m in g[6] for g in good)]
        per_method = {}
        for m in needed:
            per_method[m] = ev.run_method(m, xj, tj, bj, vj, shap_v)
        for i, (item, xi, shown, stored, label, boxes, ms) in enumerate(good):
            if item.id in grid_ids:
                _io.write_png(os.path.join(out, "grid", "images", item.id + ".png"), np.asarray(shown))
            for m in ms:
                cols, curves, maps, seconds = per_method[m]
                if item.id in grid_ids:
                    _io.write_npz(os.path.join(out, "grid", m, item.id + ".npz"),
                                  map=np.asarray(maps[i], np.float16))
                old = previous.get(f"{item.id}|{m}") or {}
                rec_metrics = dict(old.get("metrics") or {}) if old.get("status") == "done" else {}
                rec_curves = dict(old.get("curves") or {}) if old.get("status") == "done" else {}
                rec_metrics.update({k: _num(v[i]) for k, v in cols.items()})
                rec_curves.update({k: [round(float(s), 6) for s in v[i]] for k, v in curves.items()})
                computed = sorted(set(old.get("computed", ()) if old.get("status") == "done" else ()) | set(metrics))
                rec = {
                    "id": f"{item.id}|{m}", "item": item.id, "method": m, "status": "done",
                    "source": item.source, "label": int(label), "target": int(targets[i]),
                    "predicted": int(preds[i]), "target_prob": _num(probs[i, targets[i]]),
                    "explain_s": seconds / bs, "metrics": rec_metrics, "curves": rec_curves,
                    "computed": computed,
                }
                if shap_se is not None:
                    rec["shap_stderr"] = _num(np.mean(shap_se[i]))
                    rec["shap_rel_stderr"] = _num(np.mean(shap_se[i]) / max(np.mean(np.abs(shap_v[i])), 1e-30))
                log.append(rec)
            summary["done"] += 1
            bar.update(1)

    reader.start()
    try:
        while True:
            event = reader.events.get()
            if event[0] == "fail":
                fail(event[1], event[2])
            elif event[0] == "batch":
                do_batch(event[1])
            elif event[0] == "end":
                break
            else:
                raise event[1]
    finally:
        reader.stop.set()
        bar.close()
    cfg["compile_s"] = dict(ev.compile_s)
    if hasattr(ev, "fractions"):
        cfg["fractions"] = [float(f) for f in ev.fractions]


# ---------------------------------------------------------------------------
# aggregation and reports
# ---------------------------------------------------------------------------

def aggregate(out, labelled, methods, columns, cfg, notes) -> dict:
    """Read the log and summarise: per method and column, mean and t 95% interval over images."""
    latest = _io.read_jsonl(os.path.join(out, LOG))
    recs = _io.latest(latest)
    per_image, agg = [], {}
    for m in methods:
        vals = {c: [] for c in columns}
        times, curves = [], {"deletion": [], "insertion": []}
        n = 0
        for lab in labelled:
            r = recs.get(f"{lab.item.id}|{m}")
            if not r or r.get("status") != "done":
                continue
            n += 1
            per_image.append({k: r.get(k) for k in ("item", "method", "label", "target", "predicted",
                                                   "target_prob", "explain_s", "metrics", "shap_stderr",
                                                   "shap_rel_stderr")})
            for c in columns:
                v = (r.get("metrics") or {}).get(c)
                vals[c].append(np.nan if v is None else float(v))
            times.append(float(r.get("explain_s") or np.nan))
            for k in curves:
                cv = (r.get("curves") or {}).get(k)
                if cv:
                    curves[k].append(cv)
        entry = {"images": n, "time_per_image_s": _num(np.nanmedian(times)) if times else None}
        for c in columns:
            s = M.mean_ci(vals[c])
            entry[c] = {"mean": _num(s.mean), "low": _num(s.low), "high": _num(s.high), "n": s.n}
        for k, cs in curves.items():
            if cs and len({len(c) for c in cs}) == 1:
                entry[f"mean_{k}_curve"] = [float(v) for v in np.mean(np.asarray(cs, np.float64), 0)]
        shap_se = [r["shap_rel_stderr"] for r in per_image if r["method"] == m and r.get("shap_rel_stderr") is not None]
        if shap_se:
            entry["shap_rel_stderr"] = float(np.mean(shap_se))
        agg[m] = entry
    fr = cfg.get("fractions")
    results = {"config": cfg, "notes": notes, "images": len(labelled), "aggregate": agg, "per_image": per_image,
               "interval": "Student-t 95% confidence interval of the mean over images"}
    if fr is None:
        # a rerun that skipped everything: the fractions follow from the configuration
        h = w = int(cfg["input_size"])
        step = None if cfg["num_steps"] else cfg["step"]
        results["config"]["fractions"] = [float(f) for f in
                                          M.step_counts(h * w, step, cfg["num_steps"]) / float(h * w)]
    _io.write_json(os.path.join(out, "results.json"), results, allow_nan=False)
    return results


def _fmt(e, digits):
    if not e or e.get("mean") is None:
        return "n/a"
    if e.get("low") is None or e["n"] < 2:
        return f"{e['mean']:.{digits}f}"
    return f"{e['mean']:.{digits}f} ± {(e['high'] - e['low']) / 2:.{digits}f}"


def markdown_table(results, methods, columns) -> str:
    digits = {"ad": 2, "ic": 1, "epg": 3, "pointing": 3}
    head = ["Method"] + [f"{COLUMNS[c][0]} {'↓' if COLUMNS[c][1] == 'lower' else '↑'}" for c in columns]
    head += ["s / image", "n"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        e = results["aggregate"].get(m, {})
        row = [m] + [_fmt(e.get(c), digits.get(c, 4)) for c in columns]
        t = e.get("time_per_image_s")
        row += ["n/a" if t is None else f"{t:.4f}", str(e.get("images", 0))]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_reports(out, results, classifier, methods, grid_items, columns, args) -> None:
    cfg = results["config"]
    md = [
        f"# Evaluation: {cfg['model']} at `{cfg['layer']}`",
        "",
        f"Data: `{cfg['data']}`, {results['images']} images; target: the {cfg['target']} class; "
        f"weights: {cfg['weights']}.",
        "",
        "Mean over images ± half-width of the Student-t 95% confidence interval of the mean. "
        "s / image: median explanation time per image (batch time / batch size, compilation excluded).",
        "",
        markdown_table(results, methods, columns),
        "",
        f"Deletion/insertion: {'%d steps' % cfg['num_steps'] if cfg['num_steps'] else '%d pixels per step' % cfg['step']}, "
        f"deletion substrate {cfg['substrate']}, insertion from a Gaussian blur (sigma {cfg['blur_sigma']:g} px). "
        f"Pointing game tolerance {cfg['tolerance']:g} px.",
    ]
    if any(c.startswith("shap") for c in columns):
        se = {m: results["aggregate"].get(m, {}).get("shap_rel_stderr") for m in methods}
        se = [v for v in se.values() if v is not None]
        md.append(f"SHAP values: {cfg['shap_method']} estimator, {cfg['shap_samples']} samples per image; "
                  f"top-{cfg['topk']} overlap" + (f"; mean relative standard error of the estimates "
                                                  f"{se[0]:.3g}." if se else "."))
    for note in results.get("notes", []):
        md.append(note)
    md.append("")
    _io.write_bytes(os.path.join(out, "results.md"), ("\n".join(md) + "\n").encode("utf-8"))
    _plot_curves(out, results, methods, args)
    _grid(out, classifier, methods, grid_items, results)


def _plot_curves(out, results, methods, args) -> None:
    have = [m for m in methods if any(f"mean_{k}_curve" in results["aggregate"].get(m, {})
                                      for k in ("deletion", "insertion"))]
    if not have:
        return
    try:
        # A bare Figure with its own Agg canvas: no pyplot, so the caller's
        # backend (e.g. a notebook's inline one) is left alone.
        from matplotlib import colormaps
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        if not args.quiet:
            print("liftcam-jax: evaluate: matplotlib not installed; no curves.png "
                  "(pip install matplotlib)", file=sys.stderr)
        return
    fr = np.asarray(results["config"]["fractions"])
    fig = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    colors = colormaps["tab20"].colors
    for ax, k in zip(axes, ("deletion", "insertion")):
        for j, m in enumerate(have):
            e = results["aggregate"][m]
            c = e.get(f"mean_{k}_curve")
            if c is not None and len(c) == len(fr):
                auc = (e.get(k) or {}).get("mean")
                ax.plot(fr, c, label=f"{m} ({auc:.3f})" if auc is not None else m, lw=1.4,
                        color=colors[(2 * j) % 20 + (j // 10) % 2], ls=("-", "--", ":")[j // 10 % 3])
        ax.set_title(f"{k} ({'lower' if k == 'deletion' else 'higher'} AUC is better)")
        ax.set_xlabel("fraction of pixels " + ("removed" if k == "deletion" else "inserted"))
        ax.set_ylabel("softmax probability of the target")
        ax.set_xlim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = _pyio.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    _io.write_bytes(os.path.join(out, "curves.png"), buf.getvalue())


def _grid(out, classifier, methods, grid_items, results) -> None:
    from PIL import Image

    from ..viz import grid, overlay

    rows, labels = [], []
    for lab in grid_items:
        ipath = os.path.join(out, "grid", "images", lab.item.id + ".png")
        if not os.path.isfile(ipath):
            continue
        with Image.open(ipath) as im:
            img = np.asarray(im.convert("RGB"))
        row, text = [img], [classifier.class_name(lab.label) if lab.label >= 0 else lab.item.id]
        for m in methods:
            mpath = os.path.join(out, "grid", m, lab.item.id + ".npz")
            if not os.path.isfile(mpath):
                continue
            with np.load(mpath) as z:
                row.append(overlay(img, np.asarray(z["map"], np.float32)))
            text.append(m)
        rows.append(row)
        labels.append(text)
    if rows:
        _io.write_png(os.path.join(out, "grid.png"), grid(rows, labels))
