"""Evaluate explanation methods on labelled images: faithfulness, localisation, SHAP agreement.

The public face of :mod:`liftcam_jax.runs.evaluate` (``liftcam-jax evaluate``:
the metrics, their definitions and the run) and of :mod:`liftcam_jax.results`
(the aggregates, paired intervals and the replication table)::

    from liftcam_jax import evaluation
    res = evaluation.evaluate(classifier, "imagenet-val-dev/", ["lift-cam", "grad-cam"], ["ad", "deletion"],
                              out_dir="runs/eval", limit=50)
    res.to_markdown(); res.to_json(); res.curves_figure()
"""
from .errors import UsageError  # noqa: F401  (raised by Results.paired and evaluate; named here before)
from .results import Results, aggregate, cosine_ceiling, replication_table
from .runs.evaluate import (METRICS, RUN_FIELDS, Context, EvalConfig, Metric, check_cam_applies, evaluate,
                            parse_metrics, register_metric)
from .runs.folder import LOG_STEMS, log_name
from .data import DataOptions

LOG = log_name(LOG_STEMS["evaluate"])  # one process's log: evaluate.jsonl

__all__ = ["Context", "DataOptions", "EvalConfig", "LOG", "METRICS", "Metric", "RUN_FIELDS", "Results", "aggregate",
           "check_cam_applies", "cosine_ceiling", "evaluate", "parse_metrics", "register_metric",
           "replication_table"]
