"""Evaluate explanation methods on labelled images: faithfulness, localisation, SHAP agreement.

The library form of ``liftcam-jax evaluate``::

    from liftcam_jax import evaluation
    res = evaluation.evaluate(classifier, "imagenet-val-dev/", ["lift-cam", "grad-cam"], ["ad", "deletion"],
                              out_dir="runs/eval", limit=50)
    res.to_markdown(); res.to_json(); res.curves_figure()

Data (:func:`liftcam_jax.data.open_labelled`): a folder with ``labels.csv``
(+ ``boxes.csv``) or a TFDS split with a ``ClassLabel`` (its labels mapped to
the model's classes, :func:`liftcam_jax.data.label_mapping`). Each image is
explained for its label (``target="label"``) or the model's prediction, by
every method, and scored by every metric of :data:`METRICS`; the scores go to
the crash-safe log ``evaluate.jsonl`` (one line per image and method) as soon
as they exist, so a rerun skips what is done. The log is summarised into
:class:`Results`: per method and column, the mean and the Student-t 95%
interval over images, the median time per image and the mean deletion /
insertion curves.

Metrics (definitions in :mod:`liftcam_jax.metrics`):

* ``ad``: Average Drop %, lower is better (Chattopadhay et al., WACV 2018);
* ``ic``: Increase in Confidence %, higher is better (same paper);
* ``deletion`` / ``insertion``: RISE AUCs, lower / higher is better (Petsiuk et al., BMVC 2018);
* ``epg``: energy-based pointing game, higher is better (Wang et al., CVPR-W 2020);
* ``pointing``: pointing game hit rate (Zhang et al., ECCV 2016);
* ``shap``: cosine, Spearman and top-k overlap of the channel coefficients with
  sampled SHAP values of the activation maps (:mod:`liftcam_jax.shap`).
"""
from __future__ import annotations

import dataclasses
import io as _pyio
import math
import os
import sys
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Union

import numpy as np

from . import files as _io
from . import methods as _methods
from . import metrics as M
from .errors import UsageError, positive_int

__all__ = ["EvalConfig", "METRICS", "Metric", "Results", "cosine_ceiling", "evaluate", "parse_metrics", "register_metric",
           "replication_table"]

LOG = "evaluate.jsonl"


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
    return metric


def _confidence(ctx: Context):
    if "cc" not in ctx.memo:
        ctx.memo["cc"] = M.confidence_change(ctx.split, ctx.params, ctx.x, ctx.explanation.maps, ctx.targets)
    return ctx.memo["cc"]


def _causal(kind: str):
    def fn(ctx: Context):
        c = ctx.config
        kw = dict(step=c.step if c.num_steps is None else None, num_steps=c.num_steps, chunk=c.step_chunk)
        if c.tie_break != "raster":
            import jax

            kw.update(tie_break=c.tie_break, key=jax.random.PRNGKey(c.seed))
        if kind == "deletion":
            d = M.deletion(ctx.split, ctx.params, ctx.x, ctx.explanation.maps, ctx.targets, substrate=c.substrate, **kw)
        else:
            d = M.insertion(ctx.split, ctx.params, ctx.x, ctx.explanation.maps, ctx.targets,
                            blur_sigma=c.blur_sigma, **kw)
        ctx.memo["fractions"] = np.asarray(d.fractions)
        return {kind: (d.auc, d.scores)}
    return fn


def _shap_agreement(ctx: Context):
    import jax.numpy as jnp

    c, s = ctx.explanation.coefficients, jnp.asarray(ctx.shap_values)
    return {"shap_cosine": (M.cosine_similarity(c, s), None), "shap_spearman": (M.spearman(c, s), None),
            "shap_topk": (M.topk_overlap(c, s, k=int(ctx.config.topk)), None)}


register_metric("ad", Metric((("ad", "Average Drop %", "lower", 2),), lambda ctx: {"ad": (_confidence(ctx).drop, None)}))
register_metric("ic", Metric((("ic", "Increase in Conf. %", "higher", 1),),
                             lambda ctx: {"ic": (_confidence(ctx).increase, None)}))
register_metric("deletion", Metric((("deletion", "Deletion AUC", "lower", 4),), _causal("deletion")))
register_metric("insertion", Metric((("insertion", "Insertion AUC", "higher", 4),), _causal("insertion")))
register_metric("epg", Metric((("epg", "Energy pointing game", "higher", 3),),
                              lambda ctx: {"epg": (M.energy_pointing_game(ctx.explanation.maps, ctx.boxes, ctx.valid),
                                                   None)}, needs="boxes"))
register_metric("pointing", Metric((("pointing", "Pointing game", "higher", 3),),
                                   lambda ctx: {"pointing": (M.pointing_game(ctx.explanation.maps, ctx.boxes, ctx.valid,
                                                                             tolerance=float(ctx.config.tolerance)),
                                                             None)}, needs="boxes"))
register_metric("shap", Metric((("shap_cosine", "SHAP cosine", "higher", 4), ("shap_spearman", "SHAP Spearman", "higher", 4),
                                ("shap_topk", "SHAP top-k overlap", "higher", 4)), _shap_agreement, needs="shap"))


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


def _columns(metrics: Sequence[str]) -> List[tuple]:
    return [c for m in metrics for c in METRICS[m].columns]


def _heading(column: tuple) -> str:
    """A column's heading with the arrow of its better direction."""
    _, heading, better, _ = column
    return f"{heading} {'↓' if better == 'lower' else '↑'}"


# ---------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """How images are explained and scored (every field but the last three is part of the run's identity).

    target: ``"label"`` or ``"predicted"``; seed: for randomised methods, SHAP
    sampling and random tie-breaking; step / num_steps: deletion/insertion
    pixels per step or number of steps (default RISE's step); substrate:
    ``"zeros"`` or ``"mean"``; blur_sigma: insertion's start blur; tie_break:
    ``"raster"`` or ``"random"`` order of equal map values; tolerance: pointing
    game; shap_method / shap_samples / topk: the SHAP reference; batch_size,
    step_chunk, shap_chunk: memory and speed only.
    """

    target: str = "label"
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

    def __post_init__(self):
        if self.step is None and self.num_steps is None:
            object.__setattr__(self, "step", M.RISE_STEP)

    def check(self, metrics: Sequence[str]) -> None:
        """A one-line :class:`UsageError` for a bad combination (before any work)."""
        if self.target not in ("label", "predicted"):
            raise UsageError(f"target must be 'label' or 'predicted', not {self.target!r}")
        if self.num_steps is not None and self.step not in (None, M.RISE_STEP):
            raise UsageError("give --step or --num-steps, not both")
        if not self.blur_sigma >= 0:
            raise UsageError(f"--blur-sigma must be >= 0, got {self.blur_sigma}")
        if not self.tolerance >= 0:
            raise UsageError(f"--tolerance must be >= 0, got {self.tolerance}")
        if self.tie_break not in ("raster", "random"):
            raise UsageError(f"--tie-break must be raster or random, not {self.tie_break!r}")
        if "shap" in metrics:
            from . import shap as _shap

            if self.shap_method not in _shap.METHODS:
                raise UsageError(f"unknown --shap-method {self.shap_method!r}; valid: {', '.join(_shap.METHODS)}")
            if self.shap_method != "exact":  # samples come in antithetic pairs
                positive_int("--shap-samples", self.shap_samples, minimum=4, even=True)

    def identity(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("batch_size", "step_chunk", "shap_chunk"):
            d.pop(k)
        if d["num_steps"] is not None:
            d["step"] = None
        if d["tie_break"] == "raster":  # the default keeps the identity of runs made before the option existed
            d.pop("tie_break")
        d["blur_truncate"] = M.RISE_BLUR_TRUNCATE
        return d


# ---------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class Results:
    """Aggregated scores: ``aggregate[method][column]`` is ``{mean, low, high, n}``; ``per_image`` rows.

    ``to_json()`` is what ``results.json`` holds; ``to_markdown()`` the table of
    ``results.md``; ``curves_figure()`` the mean deletion/insertion curves.
    ``summary``: images evaluated, skipped (already in the log) and failed now.
    """

    config: dict
    methods: List[str]
    metrics: List[str]
    images: int
    aggregate: dict
    per_image: list
    notes: list = dataclasses.field(default_factory=list)
    summary: dict = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict:
        return {"config": self.config, "notes": self.notes, "images": self.images, "methods": self.methods,
                "metrics": self.metrics, "aggregate": self.aggregate, "per_image": self.per_image,
                "interval": "Student-t 95% confidence interval of the mean over images"}

    @classmethod
    def from_json(cls, d: dict) -> "Results":
        methods = d.get("methods") or list(d["aggregate"])
        return cls(d["config"], methods, d.get("metrics") or [], d["images"], d["aggregate"], d["per_image"],
                   d.get("notes", []))

    @classmethod
    def load(cls, out_dir) -> "Results":
        import json

        with open(os.path.join(os.fspath(out_dir), "results.json"), encoding="utf-8") as f:
            return cls.from_json(json.load(f))

    def table(self) -> str:
        cols = _columns(self.metrics)
        head = ["Method"] + [_heading(c) for c in cols] + ["s / image", "n"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for m in self.methods:
            e = self.aggregate.get(m, {})
            t = e.get("time_per_image_s")
            row = [m] + [_fmt(e.get(c), digits) for c, _, _, digits in cols]
            lines.append("| " + " | ".join(row + ["n/a" if t is None else f"{t:.4f}", str(e.get("images", 0))]) + " |")
        return "\n".join(lines)

    def default_baseline(self) -> str:
        """The method others are compared with: ``"lift-cam"`` when evaluated, else the first."""
        return "lift-cam" if "lift-cam" in self.methods else self.methods[0]

    def paired(self, baseline: Optional[str] = None) -> Dict[str, dict]:
        """Each method minus ``baseline``, image by image: ``{method: {column: {mean, low, high, n}}}``.

        The difference is taken on the images where both have a value, and
        summarised by its mean and Student-t 95% interval (a paired comparison:
        the images' own difficulty cancels). ``baseline``: ``"lift-cam"`` when
        evaluated, else the first method.
        """
        baseline = baseline or self.default_baseline()
        if baseline not in self.methods:
            raise UsageError(f"baseline {baseline!r} was not evaluated ({', '.join(self.methods)})")
        rows = {(r["item"], r["method"]): r.get("metrics") or {} for r in self.per_image}
        items = sorted({i for i, _ in rows})
        out = {}
        for m in self.methods:
            if m == baseline:
                continue
            out[m] = {}
            for c, _, _, _ in _columns(self.metrics):
                d = [float(rows[i, m][c]) - float(rows[i, baseline][c]) for i in items
                     if rows.get((i, m), {}).get(c) is not None and rows.get((i, baseline), {}).get(c) is not None]
                ci = M.mean_ci(d)
                out[m][c] = {"mean": _num(ci.mean), "low": _num(ci.low), "high": _num(ci.high), "n": ci.n}
        return out

    def paired_table(self, baseline: Optional[str] = None) -> str:
        """:meth:`paired` as a markdown table: mean [95% interval] of each method minus the baseline."""
        baseline = baseline or self.default_baseline()
        diffs = self.paired(baseline)
        cols = _columns(self.metrics)
        lines = ["| Method | " + " | ".join(f"Δ {_heading(c)}" for c in cols) + " |",
                 "|" + "---|" * (len(cols) + 1)]
        for m, row in diffs.items():
            cells = []
            for c, _, _, digits in cols:
                e = row[c]
                cells.append("n/a" if e["n"] == 0 else
                             f"{e['mean']:+.{digits}f} (1 image, no interval)" if e["n"] == 1 else
                             f"{e['mean']:+.{digits}f} [{e['low']:+.{digits}f}, {e['high']:+.{digits}f}]")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def to_markdown(self) -> str:
        cfg = self.config
        md = [
            f"# Evaluation: {cfg['model']} at `{cfg['layer']}`", "",
            f"Data: `{cfg['data']}`, {self.images} images; target: the {cfg['target']} class; "
            f"weights: {cfg.get('weights', 'n/a')}.", "",
            "Mean over images ± half-width of the Student-t 95% confidence interval of the mean. "
            "s / image: median explanation time per image (batch time / batch size, compilation excluded).", "",
            self.table(), "",
            f"Deletion/insertion: {'%d steps' % cfg['num_steps'] if cfg['num_steps'] else '%d pixels per step' % cfg['step']}, "
            f"deletion substrate {cfg['substrate']}, insertion from a Gaussian blur (sigma {cfg['blur_sigma']:g} px)"
            + (", ties in random order" if cfg.get("tie_break") == "random" else "")
            + f". Pointing game tolerance {cfg['tolerance']:g} px.",
        ]
        if "shap" in self.metrics:
            se, ceiling = ([v for v in (self.aggregate.get(m, {}).get(key) for m in self.methods) if v is not None]
                           for key in ("shap_rel_stderr", "shap_cosine_ceiling"))
            md.append(f"SHAP values: {cfg['shap_method']} estimator, {cfg['shap_samples']} samples per image; "
                      f"top-{cfg['topk']} overlap" + (f"; mean relative standard error of the estimates "
                                                      f"{se[0]:.3g}" if se else "")
                      + (f"; expected cosine of the estimates with the exact values {ceiling[0]:.4f} (the "
                         "ceiling of the SHAP cosine column set by sampling error)" if ceiling else "") + ".")
        if len(self.methods) > 1:
            baseline = self.default_baseline()
            md += ["", f"Each method minus {baseline}, image by image: mean [Student-t 95% interval] of the "
                   "paired differences (the arrows say which sign favours the method).", "",
                   self.paired_table(baseline)]
        md += list(self.notes) + [""]
        return "\n".join(md) + "\n"

    def curves_figure(self):
        """A matplotlib ``Figure`` (Agg canvas, no pyplot) of the mean curves, or ``None`` without any."""
        have = [m for m in self.methods if any(f"mean_{k}_curve" in self.aggregate.get(m, {})
                                               for k in ("deletion", "insertion"))]
        if not have:
            return None
        from matplotlib import colormaps
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fr = np.asarray(self.config["fractions"])
        fig = Figure(figsize=(11, 4.2))
        FigureCanvasAgg(fig)
        colors = colormaps["tab20"].colors
        for ax, k in zip(fig.subplots(1, 2), ("deletion", "insertion")):
            for j, m in enumerate(have):
                e = self.aggregate[m]
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
            if ax.lines:
                ax.legend(fontsize=7)
        fig.tight_layout()
        return fig

    def save(self, out_dir, *, stderr=None) -> None:
        """Write ``results.json``, ``results.md`` and (with matplotlib) ``curves.png`` into ``out_dir``."""
        out = os.fspath(out_dir)
        _io.write_json(os.path.join(out, "results.json"), self.to_json(), allow_nan=False)
        _io.write_bytes(os.path.join(out, "results.md"), self.to_markdown().encode("utf-8"))
        try:
            fig = self.curves_figure()
        except ImportError:
            print("liftcam-jax: evaluate: matplotlib not installed; no curves.png (pip install matplotlib)",
                  file=stderr or sys.stderr)
            return
        if fig is not None:
            buf = _pyio.BytesIO()
            fig.savefig(buf, format="png", dpi=110)
            _io.write_bytes(os.path.join(out, "curves.png"), buf.getvalue())


def _num(v):
    v = float(v)
    return v if math.isfinite(v) else None


def _fmt(e, digits):
    if not e or e.get("mean") is None:
        return "n/a"
    if e.get("low") is None or e["n"] < 2:
        return f"{e['mean']:.{digits}f}"
    return f"{e['mean']:.{digits}f} ± {(e['high'] - e['low']) / 2:.{digits}f}"


def replication_table(runs: "Dict[str, Results]", baseline: Optional[str] = None) -> str:
    """Which paired comparisons hold in every run: a markdown table of verdicts.

    For each method (evaluated in every run) and each column (scored in every
    run), each run's paired difference from ``baseline`` (:meth:`Results.paired`)
    is *better* or *worse* when its 95% interval excludes 0 on the side the
    column's arrow favours or not, and *tie* when the interval contains 0; *n/a*
    with fewer than two paired images (no interval, so no verdict). A
    cell names one verdict when every run agrees, else each run's verdict in
    the order of ``runs`` ("worse / tie"). ``runs``: ``{name: Results}``, for
    example one model and split each. ``baseline``: the first run's default.
    """
    if not runs:
        raise UsageError("replication_table needs at least one run")
    names, results = list(runs), list(runs.values())
    baseline = baseline or results[0].default_baseline()
    methods = [m for m in results[0].methods if m != baseline and all(m in r.methods for r in results)]
    cols = [c for c in _columns(results[0].metrics) if all(c in _columns(r.metrics) for r in results)]
    diffs = [r.paired(baseline) for r in results]

    def verdict(e, better):
        if e["n"] < 2:  # one image has no interval: its difference alone is no verdict
            return "n/a"
        if e["low"] <= 0 <= e["high"]:
            return "tie"
        return "better" if (e["mean"] < 0) == (better == "lower") else "worse"

    lines = [f"Each method against {baseline}, in {' / '.join(names)}:", "",
             "| Method | " + " | ".join(_heading(c) for c in cols) + " |",
             "|" + "---|" * (len(cols) + 1)]
    for m in methods:
        cells = []
        for c, _, better, _ in cols:
            v = [verdict(d[m][c], better) for d in diffs]
            cells.append(v[0] if len(set(v)) == 1 else " / ".join(v))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cosine_ceiling(values, stderr) -> float:
    r"""The expected cosine of a Shapley estimate with the exact values: the sampling-error ceiling.

    With :math:`\hat\phi = \phi + \varepsilon`, independent errors of standard deviations
    :math:`s_k`: :math:`E\|\hat\phi\|^2 = \|\phi\|^2 + \sum_k s_k^2` and
    :math:`\cos(\hat\phi, \phi) \approx \|\phi\| / \|\hat\phi\| = \sqrt{1 - \sum_k s_k^2 / \|\hat\phi\|^2}`.
    A method that matched the exact values would score about this much on the SHAP cosine; a
    method's cosine with the exact values is about its cosine with the estimate divided by it.
    """
    v, s = np.asarray(values, np.float64), np.asarray(stderr, np.float64)
    total = float(np.sum(v * v))
    return float(np.sqrt(max(1.0 - float(np.sum(s * s)) / total, 0.0))) if total > 0 else float("nan")


def aggregate(records: Dict[str, dict], ids: Sequence[str], methods, metrics, config: dict, notes=()) -> Results:
    """The log's latest records (``"<id>|<method>"`` keys) of images ``ids`` -> :class:`Results`."""
    columns = [c for c, *_ in _columns(metrics)]
    per_image, agg = [], {}
    for m in methods:
        vals = {c: [] for c in columns}
        times, curves = [], {"deletion": [], "insertion": []}
        for ident in ids:
            r = records.get(f"{ident}|{m}")
            if not r or r.get("status") != "done":
                continue
            per_image.append({k: r.get(k) for k in ("item", "method", "label", "dataset_label", "label_name",
                                                   "target", "predicted", "target_prob", "explain_s", "metrics",
                                                   "shap_stderr", "shap_rel_stderr", "shap_cosine_ceiling")})
            for c in columns:
                v = (r.get("metrics") or {}).get(c)
                vals[c].append(np.nan if v is None else float(v))
            times.append(float(r.get("explain_s") or np.nan))
            for k in curves:
                cv = (r.get("curves") or {}).get(k)
                if cv:
                    curves[k].append(cv)
        entry = {"images": len(times), "time_per_image_s": _num(np.nanmedian(times)) if times else None}
        for c in columns:
            s = M.mean_ci(vals[c])
            entry[c] = {"mean": _num(s.mean), "low": _num(s.low), "high": _num(s.high), "n": s.n}
        for k, cs in curves.items():
            if cs and len({len(c) for c in cs}) == 1:
                entry[f"mean_{k}_curve"] = [float(v) for v in np.mean(np.asarray(cs, np.float64), 0)]
        for key in ("shap_rel_stderr", "shap_cosine_ceiling"):
            got = [r[key] for r in per_image if r["method"] == m and r.get(key) is not None]
            if got:
                entry[key] = float(np.mean(got))
        agg[m] = entry
    config = dict(config)
    if "fractions" not in config:
        h = int(config["input_size"])
        config["fractions"] = [float(f) for f in M.step_counts(h * h, config["step"], config["num_steps"]) / float(h * h)]
    return Results(config, list(methods), list(metrics), len(ids), agg, per_image, list(notes))


# ---------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------

def check_cam_applies(classifier) -> Optional[str]:
    """``None`` when CAM applies to the classifier's head, else the reason."""
    import jax
    import jax.numpy as jnp

    from .methods import cams

    s = int(classifier.preprocess.size)
    shape = jax.eval_shape(classifier.split.features, classifier.params, jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32))
    try:
        cams.check_cam_head(classifier.split.head, classifier.params, jnp.ones(shape.shape, shape.dtype))
    except UsageError as e:
        return str(e)
    return None


def evaluate(classifier, data, methods="all", metrics="all", *, out_dir, config: Optional[EvalConfig] = None,
             limit: Optional[int] = None, redo: Sequence[str] = (), data_dir: Optional[str] = None,
             image_key: Optional[str] = None, label_key: Optional[str] = None, label_map=None,
             run_info: Optional[dict] = None, grid: int = 4, quiet: bool = True, stderr=None,
             process_index: Optional[int] = None, process_count: Optional[int] = None) -> Results:
    """Explain labelled images with ``methods`` and score them with ``metrics`` (see the module doc).

    ``data``: a folder (``labels.csv``) or ``tfds:NAME[/CONFIG][@VERSION]:SPLIT``;
    ``out_dir``: where the log and reports go (reused to resume); ``config``:
    an :class:`EvalConfig`; ``redo``: methods evaluated again even where the
    log has them; ``label_map``: TFDS labels -> classes (see
    :func:`liftcam_jax.data.label_mapping`); ``grid``: images in ``grid.png``.
    Writes ``results.json``, ``results.md``, ``curves.png`` and ``grid.png`` and
    returns the :class:`Results`. Bad arguments raise :class:`UsageError` before
    any work; images that cannot be read or labelled fail alone
    (``results.summary["failed"]``).

    Several processes (:mod:`liftcam_jax.distributed`; default JAX's process
    index and count): each evaluates its share into its own log
    ``evaluate-<p>-of-<P>.jsonl``, all meet at a barrier, and process 0 writes
    the reports from every log: the same results as one process.
    """
    import jax

    from . import distributed
    from .batch import RunFolder, _num_classes
    from .data import label_mapping, open_labelled

    err = stderr if stderr is not None else sys.stderr
    cfg = config or EvalConfig()
    metrics = parse_metrics(metrics)
    methods, explicit = _methods.parse_names(methods if isinstance(methods, str) else ",".join(methods))
    methods = list(methods)
    for r in redo:
        _methods.get(r)
        if r not in methods:
            raise UsageError(f"--redo {r}: not among the evaluated methods ({', '.join(methods)})")
    cfg.check(metrics)
    data = os.fspath(data)
    if label_map is not None and not data.startswith("tfds:"):
        raise UsageError("--label-map applies to TFDS data; labels.csv gives ImageNet indices (imagenet_index)")
    source = open_labelled(data, data_dir=data_dir, image_key=image_key, label_key=label_key)
    items = source.items[:limit]
    classes = _num_classes(classifier, int(classifier.preprocess.size))
    label_classes = None if source.labels_are_classes else label_mapping(
        source.label_names, classes, class_ids=classifier.class_ids, class_names=classifier.class_names,
        label_map=label_map, dataset=data)
    notes = []
    if "cam" in methods:
        why = check_cam_applies(classifier)
        if why is not None:
            if explicit:
                raise UsageError(f"cam does not apply at layer {classifier.layer}: {why}")
            methods.remove("cam")
            notes.append(f"cam skipped: the head after {classifier.layer} is not GAP + Linear.")
    identity = {"command": "evaluate", "data": data if data.startswith("tfds:") else os.path.abspath(data),
                "model": classifier.name, "layer": classifier.layer, "label_map": label_map,
                "input_size": int(classifier.preprocess.size), **cfg.identity(), **(run_info or {})}
    pi = jax.process_index() if process_index is None else int(process_index)
    pc = jax.process_count() if process_count is None else int(process_count)
    log = LOG if pc == 1 else f"evaluate-{pi:05d}-of-{pc:05d}.jsonl"
    folder = RunFolder(out_dir, identity, log, "evaluate*.jsonl", clean=pc == 1)
    t0 = time.perf_counter()
    todo = {}
    for it in distributed.share(items, pi, pc, [getattr(source, "sequential", False)] * len(items)):
        ms = [m for m in methods if m in redo or not (
            folder.done(f"{it.id}|{m}") and set(metrics) <= set(folder.previous[f"{it.id}|{m}"].get("computed", ())))]
        if ms:
            todo[it.id] = ms
    summary = {"done": 0, "failed": 0, "skipped": len(items) - len(todo)}
    grid_ids = [it.id for it in items[: max(0, int(grid))]]
    compile_s, fractions = {}, None
    if todo:
        ev = _Evaluator(classifier, cfg, metrics, methods, folder, summary, label_classes, classes, set(grid_ids),
                        todo, quiet, err)
        try:
            from .batch import run_loop

            run_loop([(source, [it for it in items if it.id in todo])], classifier.preprocess, cfg.batch_size,
                     launch=lambda entries, i: ev.batch(entries), fail=ev.fail, keep_display=True)
        finally:
            folder.close()
            ev.progress.close()
        compile_s, fractions = ev.compile_s, ev.fractions
    config = dict(identity, compile_s=compile_s, batch_size=cfg.batch_size, step_chunk=cfg.step_chunk,
                  shap_chunk=cfg.shap_chunk, tie_break=cfg.tie_break)
    if fractions is not None:
        config["fractions"] = [float(f) for f in fractions]
    if pc > 1:  # every share is in the logs before process 0 reads them
        distributed.barrier(f"liftcam-jax-evaluate-{os.path.abspath(folder.path)}")
    results = aggregate(folder.records(), [it.id for it in items], methods, metrics, config, notes)
    results.summary = dict(summary, seconds=time.perf_counter() - t0)
    if pi == 0:
        results.save(folder.path, stderr=err)
        _grid(folder.path, classifier, methods, grid_ids, results)
    return results


class _Evaluator:
    """Compiled explainers and metrics for one classifier and configuration; scores batches into the log."""

    def __init__(self, classifier, cfg, metrics, methods, folder, summary, label_classes, classes, grid_ids,
                 todo, quiet, stream):
        import jax

        from .batch import Progress

        self.jax, self.c, self.cfg, self.metrics, self.methods = jax, classifier, cfg, metrics, methods
        self.folder, self.summary, self.label_classes, self.classes = folder, summary, label_classes, classes
        self.grid_ids, self.todo = grid_ids, todo
        self.compiled: Dict[tuple, object] = {}
        self.compile_s: Dict[str, float] = {}
        self.fractions = None
        self.logits_fn = jax.jit(lambda p, x: classifier.split(p, x))
        self.features_fn = jax.jit(classifier.split.features)
        self.progress = Progress(sum(len(v) for v in todo.values()), "evaluate", "image x method", quiet, stream)

    def fail(self, item, msg: str) -> None:
        self.folder.append({"id": item.id, "status": "failed", "error": msg, "source": item.source})
        self.summary["failed"] += 1
        self.progress.update(len(self.todo.get(item.id, ())))
        self.progress.write(f"liftcam-jax: failed: {item.source}: {msg}")

    def _explainer(self, method, x, t, key):
        if (method, x.shape[0]) not in self.compiled:
            from .explain import explain

            split = self.c.split

            def step(params, x, t, key):
                return explain(split, params, x, t, method=method, key=key)

            t0 = time.perf_counter()
            self.compiled[method, x.shape[0]] = self.jax.jit(step).lower(self.c.params, x, t, key).compile()
            self.compile_s[method] = self.compile_s.get(method, 0.0) + time.perf_counter() - t0
        return self.compiled[method, x.shape[0]]

    def _shap(self, x, t):
        if not hasattr(self, "_shap_fn"):
            from . import shap as _shap

            cfg, head = self.cfg, self.c.split.head
            self._shap_fn = self.jax.jit(lambda params, a, t, key: _shap.shap_values(
                head, params, a, t, method=cfg.shap_method, num_samples=cfg.shap_samples, key=key,
                chunk_size=cfg.shap_chunk))
        values, stderr = self._shap_fn(self.c.params, self.features_fn(self.c.params, x), t,
                                       self.jax.random.PRNGKey(self.cfg.seed))
        return np.asarray(values, np.float32), np.asarray(stderr, np.float32)

    def _class_of(self, item, meta) -> Optional[int]:
        """The model class an image is labelled with, or ``None`` (the image failed, with the reason)."""
        label = meta.label
        if self.label_classes is not None:  # a TFDS label: the dataset's numbering, mapped to the model's
            if label is None or not 0 <= label < len(self.label_classes) or self.label_classes[label] < 0:
                self.fail(item, f"dataset label {label} ({meta.label_name}) has no class in {self.c.name} "
                                "(give one with --label-map)")
                return None
            label = int(self.label_classes[label])
        if label is None or not 0 <= label < self.classes:
            self.fail(item, f"label {label} out of range for {self.c.name} ({self.classes} classes)")
            return None
        return label

    def batch(self, entries) -> None:
        jax, jnp, cfg = self.jax, self.jax.numpy, self.cfg
        from .batch import padded_size

        good = [(e, c) for e in entries for c in [self._class_of(e[0], e[3])] if c is not None]
        if not good:
            return None
        prep = self.c.preprocess
        n = padded_size(len(good), cfg.batch_size, 1)  # a short batch is padded to a power of two only
        x = np.zeros((n, *good[0][0][1].shape), np.float32)
        labels = np.zeros((n,), np.int32)
        boxes = [None if e[3].boxes is None else M.boxes_to_input(e[3].boxes, e[3].size, prep) for e, _ in good]
        n_boxes = 1 << (max([1] + [len(b) for b in boxes if b is not None]) - 1).bit_length()
        box_arr, valid = np.zeros((n, n_boxes, 4), np.float32), np.zeros((n, n_boxes), bool)
        for i, ((item, xi, _, _), label) in enumerate(good):
            x[i], labels[i] = xi, label
            if boxes[i] is not None:
                box_arr[i, : len(boxes[i])], valid[i, : len(boxes[i])] = boxes[i], True
        have_boxes = any(b is not None for b in boxes)
        xj = jnp.asarray(x)
        logits = np.asarray(self.logits_fn(self.c.params, xj))
        preds = np.argmax(logits, -1).astype(np.int32)
        targets = labels if cfg.target == "label" else preds
        tj = jnp.asarray(targets)
        probs = np.asarray(jax.nn.softmax(jnp.asarray(logits), -1))
        shap_v = shap_se = None
        if "shap" in self.metrics:
            shap_v, shap_se = self._shap(xj, tj)
        for m in self.methods:
            rows = [i for i, ((item, *_), _) in enumerate(good) if m in self.todo[item.id]]
            if not rows:
                continue
            key = jax.random.PRNGKey(cfg.seed) if _methods.get(m).needs_key else None
            fn = self._explainer(m, xj, tj, key)
            t0 = time.perf_counter()
            exp = fn(self.c.params, xj, tj, key)
            jax.block_until_ready(exp.maps)
            seconds = time.perf_counter() - t0
            ctx = Context(self.c.split, self.c.params, xj, exp, tj, jnp.asarray(box_arr) if have_boxes else None,
                          jnp.asarray(valid) if have_boxes else None, shap_v, cfg, {})
            cols: Dict[str, np.ndarray] = {}
            curves: Dict[str, np.ndarray] = {}
            for name in self.metrics:
                metric = METRICS[name]
                if (metric.needs == "boxes" and not have_boxes) or (metric.needs == "shap" and shap_v is None):
                    continue
                for col, (values, curve) in metric.fn(ctx).items():
                    cols[col] = np.asarray(values)
                    if curve is not None:
                        curves[col] = np.asarray(curve)
            if "fractions" in ctx.memo:
                self.fractions = ctx.memo["fractions"]
            maps = np.asarray(exp.maps)
            for i in rows:
                (item, _, shown, meta), label = good[i]
                self._record(item, meta, m, i, label, targets, preds, probs, cols, curves, maps, shown,
                             seconds / n, shap_v, shap_se)
            self.progress.update(len(rows), method=m)
        self.summary["done"] += len(good)
        return None

    def _record(self, item, meta, m, i, label, targets, preds, probs, cols, curves, maps, shown, seconds,
                shap_v, shap_se) -> None:
        out = self.folder.path
        if item.id in self.grid_ids:
            _io.write_png(os.path.join(out, "grid", "images", item.id + ".png"), np.asarray(shown))
            _io.write_npz(os.path.join(out, "grid", m, item.id + ".npz"), map=np.asarray(maps[i], np.float16))
        old = self.folder.previous.get(f"{item.id}|{m}") or {}
        kept = old.get("status") == "done"
        rec_metrics = dict(old.get("metrics") or {}) if kept else {}
        rec_curves = dict(old.get("curves") or {}) if kept else {}
        rec_metrics.update({k: _num(v[i]) for k, v in cols.items()})
        rec_curves.update({k: [round(float(s), 6) for s in v[i]] for k, v in curves.items()})
        rec = {
            "id": f"{item.id}|{m}", "item": item.id, "method": m, "status": "done", "source": item.source,
            "label": int(label), "target": int(targets[i]), "dataset_label": meta.label, "label_name": meta.label_name,
            "predicted": int(preds[i]), "target_prob": _num(probs[i, targets[i]]), "explain_s": seconds,
            "metrics": rec_metrics, "curves": rec_curves,
            "computed": sorted(set(old.get("computed", ()) if kept else ()) | set(self.metrics)),
        }
        if shap_se is not None:
            rec["shap_stderr"] = _num(np.mean(shap_se[i]))
            rec["shap_rel_stderr"] = _num(np.mean(shap_se[i]) / max(np.mean(np.abs(shap_v[i])), 1e-30))
            rec["shap_cosine_ceiling"] = _num(cosine_ceiling(shap_v[i], shap_se[i]))
        self.folder.append(rec)


def _grid(out, classifier, methods, ids, results: Results) -> None:
    """``grid.png``: the first images and their maps, from the files kept under ``grid/``."""
    from PIL import Image

    from .viz import grid, overlay

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
        _io.write_png(os.path.join(out, "grid.png"), grid(rows, texts))
