"""Evaluation results: aggregates over images, paired intervals, the replication table. No JAX.

:class:`Results` is what :func:`liftcam_jax.evaluation.evaluate` returns and
``results.json`` holds; it reads back with :meth:`Results.load` anywhere
(numpy and scipy only), to compare runs::

    from liftcam_jax.results import Results, replication_table
    runs = {name: Results.load(f"runs/{name}") for name in ("lite0", "resnet50")}
    print(replication_table(runs))

Each column of a metric (:data:`COLUMNS`) is summarised per method by its mean
and the Student-t 95% confidence interval of the mean over images
(:func:`mean_ci`); :meth:`Results.paired` does the same for the image-by-image
differences from a baseline method (a paired comparison).
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import sys
from typing import Dict, List, NamedTuple, Optional, Sequence

import numpy as np

from . import files
from .errors import UsageError

__all__ = ["COLUMNS", "Results", "Summary", "aggregate", "columns", "cosine_ceiling", "finite", "mean_ci",
           "replication_table"]

# metric -> its columns: ((column, heading, "lower"|"higher" is better, digits), ...); metrics registered with
# :func:`liftcam_jax.evaluation.register_metric` add theirs.
COLUMNS: Dict[str, tuple] = {
    "ad": (("ad", "Average Drop %", "lower", 2),),
    "ic": (("ic", "Increase in Conf. %", "higher", 1),),
    "deletion": (("deletion", "Deletion AUC", "lower", 4),),
    "insertion": (("insertion", "Insertion AUC", "higher", 4),),
    "epg": (("epg", "Energy pointing game", "higher", 3),),
    "pointing": (("pointing", "Pointing game", "higher", 3),),
    "shap": (("shap_cosine", "SHAP cosine", "higher", 4), ("shap_spearman", "SHAP Spearman", "higher", 4),
             ("shap_topk", "SHAP top-k overlap", "higher", 4)),
}


def columns(metrics: Sequence[str]) -> List[tuple]:
    """The columns of ``metrics``, in order."""
    return [c for m in metrics for c in COLUMNS[m]]


def _heading(column: tuple) -> str:
    """A column's heading with the arrow of its better direction."""
    _, heading, better, _ = column
    return f"{heading} {'↓' if better == 'lower' else '↑'}"


class Summary(NamedTuple):
    """Mean of the finite values, its ``confidence`` interval ``[low, high]``, and the count ``n``."""

    mean: float
    low: float
    high: float
    n: int


def mean_ci(values, confidence: float = 0.95) -> Summary:
    """Mean and Student-t confidence interval ``mean +- t_{(1+c)/2, n-1} s / sqrt(n)``.

    NaNs (undefined per-image values, e.g. no box in view) are left out and
    ``n`` counts the rest. With one value the interval is that value; with none,
    all NaN.
    """
    v = np.asarray(values, np.float64).ravel()
    v = v[np.isfinite(v)]
    n = int(v.size)
    if n == 0:
        return Summary(math.nan, math.nan, math.nan, 0)
    m = float(v.mean())
    if n == 1:
        return Summary(m, m, m, 1)
    from scipy.stats import t

    half = float(t.ppf(0.5 + confidence / 2.0, n - 1) * v.std(ddof=1) / math.sqrt(n))
    return Summary(m, m - half, m + half, n)


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
        with open(os.path.join(os.fspath(out_dir), "results.json"), encoding="utf-8") as f:
            return cls.from_json(json.load(f))

    def table(self) -> str:
        cols = columns(self.metrics)
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
            for c, _, _, _ in columns(self.metrics):
                d = [float(rows[i, m][c]) - float(rows[i, baseline][c]) for i in items
                     if rows.get((i, m), {}).get(c) is not None and rows.get((i, baseline), {}).get(c) is not None]
                ci = mean_ci(d)
                out[m][c] = {"mean": finite(ci.mean), "low": finite(ci.low), "high": finite(ci.high), "n": ci.n}
        return out

    def paired_table(self, baseline: Optional[str] = None) -> str:
        """:meth:`paired` as a markdown table: mean [95% interval] of each method minus the baseline."""
        baseline = baseline or self.default_baseline()
        diffs = self.paired(baseline)
        cols = columns(self.metrics)
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
        files.write_json(os.path.join(out, "results.json"), self.to_json(), allow_nan=False)
        files.write_bytes(os.path.join(out, "results.md"), self.to_markdown().encode("utf-8"))
        try:
            fig = self.curves_figure()
        except ImportError:
            print("liftcam-jax: evaluate: matplotlib not installed; no curves.png (pip install matplotlib)",
                  file=stderr or sys.stderr)
            return
        if fig is not None:
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=110)
            files.write_bytes(os.path.join(out, "curves.png"), buf.getvalue())


def finite(v) -> Optional[float]:
    """``float(v)``, or ``None`` when it is not finite (JSON has no NaN)."""
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
    cols = [c for c in columns(results[0].metrics) if all(c in columns(r.metrics) for r in results)]
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
    names = [c for c, *_ in columns(metrics)]
    per_image, agg = [], {}
    for m in methods:
        vals = {c: [] for c in names}
        times, curves = [], {"deletion": [], "insertion": []}
        for ident in ids:
            r = records.get(f"{ident}|{m}")
            if not r or r.get("status") != "done":
                continue
            per_image.append({k: r.get(k) for k in ("item", "method", "label", "dataset_label", "label_name",
                                                   "target", "predicted", "target_prob", "explain_s", "metrics",
                                                   "shap_stderr", "shap_rel_stderr", "shap_cosine_ceiling")})
            for c in names:
                v = (r.get("metrics") or {}).get(c)
                vals[c].append(np.nan if v is None else float(v))
            times.append(float(r.get("explain_s") or np.nan))
            for k in curves:
                cv = (r.get("curves") or {}).get(k)
                if cv:
                    curves[k].append(cv)
        entry = {"images": len(times), "time_per_image_s": finite(np.nanmedian(times)) if times else None}
        for c in names:
            s = mean_ci(vals[c])
            entry[c] = {"mean": finite(s.mean), "low": finite(s.low), "high": finite(s.high), "n": s.n}
        for k, cs in curves.items():
            if cs and len({len(c) for c in cs}) == 1:
                entry[f"mean_{k}_curve"] = [float(v) for v in np.mean(np.asarray(cs, np.float64), 0)]
        for key in ("shap_rel_stderr", "shap_cosine_ceiling"):
            got = [r[key] for r in per_image if r["method"] == m and r.get(key) is not None]
            if got:
                entry[key] = float(np.mean(got))
        agg[m] = entry
    return Results(dict(config), list(methods), list(metrics), len(ids), agg, per_image, list(notes))
