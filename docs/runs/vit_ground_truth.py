"""Ground truth on attention heads: CAM coefficients of small and tiny ViTs against SHAP values.

The experiment behind docs/results.md, "Attention heads (Vision Transformers)". Every score
comes from the library's own evaluation path (``liftcam_jax.evaluation.evaluate`` with the
``shap`` metric: cosine, Spearman and top-10 overlap of ``Explanation.coefficients`` with the
SHAP values of the channel game of :mod:`liftcam_jax.shap`), run once per model, split and
weight seed; this script only builds the models and pools the per-image scores over seeds.

``small``: ViTs of :func:`models.vit.vision_transformer` with 16 players at every split
(width 16 at block outputs, width 8 inside a block, where the split carries the residual
stream: ``2 x 8`` channels), random weights (:func:`models.zoo.random_params`, seeds 0..S-1),
32x32 inputs, 1000 classes, exact Shapley values by enumeration of the 2^16 coalitions.
It also checks LIFT-CAM's summation-to-delta in float64 on every split and seed.

``tiny``: ``vit_tiny_patch16_224`` with random weights at ``blocks.11.norm1`` (384 channels:
192 normalised + 192 residual) and ``blocks.10`` (192), against permutation SHAP (antithetic
pairs) with its cosine ceiling.

    PYTHONPATH=. python docs/runs/vit_ground_truth.py small --data ../shared/data/imagenet-val-dev \
        --limit 16 --seeds 3 --out runs/vit-gt
    PYTHONPATH=. python docs/runs/vit_ground_truth.py tiny --data ../shared/data/imagenet-val-dev \
        --limit 4 --shap-samples 16 --out runs/vit-gt
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from liftcam_jax import evaluation
from liftcam_jax.explain import explain
from liftcam_jax.model import Classifier
from liftcam_jax.results import mean_ci
from models import zoo
from models.vit import ViTConfig, vision_transformer

METHODS = ["lift-cam", "grad-cam", "grad-cam++", "xgrad-cam", "shapley-cam", "score-cam", "deeplift-shap-cam"]
COLUMNS = ["shap_cosine", "shap_spearman", "shap_topk"]

# model name: (width, depth, splits); 16 players everywhere (2 x 8 inside a block)
SMALL = {
    "vit_gt_w16": (16, 3, ["blocks.1", "blocks.0", "blocks.2", "norm"]),
    "vit_gt_w8": (8, 3, ["blocks.2.norm1", "blocks.1.norm1", "blocks.0.norm1"]),
}


def classifier(model, split, params, layer) -> Classifier:
    return Classifier(name=model.name, split=split, params=params, preprocess=model.preprocess, layer=layer,
                      class_names=zoo.class_names(), class_ids=zoo.class_ids(), layers=model.layers)


def summation_to_delta(split, params, size: int, n: int = 4) -> float:
    """max |sum_k c_k - (f_t(x) - f_t(ref))| / max |f_t(x) - f_t(ref)| of LIFT-CAM in float64."""
    with jax.enable_x64(True):
        p64 = jax.tree_util.tree_map(lambda v: jnp.asarray(v, jnp.float64), params)
        x = jax.random.normal(jax.random.PRNGKey(7), (n, size, size, 3), jnp.float64)
        e = jax.jit(lambda p, x: explain(split, p, x, method="lift-cam"))(p64, x)
        rows = jnp.arange(n)
        delta = e.logits[rows, e.targets] - e.reference_logits[rows, e.targets]
        return float(jnp.max(jnp.abs(jnp.sum(e.coefficients, -1) - delta)) / jnp.max(jnp.abs(delta)))


def run(model, layer, seeds, args, report):
    split = model.split(layer)  # one split object: the compiled steps are reused across seeds
    rows = {m: {c: [] for c in COLUMNS} for m in METHODS}
    extra = {"ceiling": [], "rel_stderr": [], "delta": [], "seconds": 0.0}
    for seed in seeds:
        params = jax.device_put(zoo.random_params(model, seed))
        clf = classifier(model, split, params, layer)
        t0 = time.perf_counter()
        res = evaluation.evaluate(clf, args.data, METHODS, ["shap"], out_dir=os.path.join(
            args.out, f"{model.name}-{layer}-seed{seed}"), target=args.target, limit=args.limit,
            batch_size=args.batch_size, shap_method=args.shap_method, shap_samples=args.shap_samples,
            shap_chunk=args.shap_chunk, topk=args.topk, seed=seed, run_info={"weights": f"random_params seed {seed}"})
        extra["seconds"] += time.perf_counter() - t0
        for r in res.per_image:
            if r.get("status", "done") != "done":
                continue
            for c in COLUMNS:
                v = (r.get("metrics") or {}).get(c)
                rows[r["method"]][c].append(np.nan if v is None else v)
            if r["method"] == "lift-cam":
                extra["ceiling"].append(r.get("shap_cosine_ceiling"))
                extra["rel_stderr"].append(r.get("shap_rel_stderr"))
        if args.delta:
            extra["delta"].append(summation_to_delta(split, params, int(model.preprocess.size)))
    out = {"model": model.name, "layer": layer, "seeds": list(seeds), "seconds": extra["seconds"],
           "delta_rel_max": max(extra["delta"]) if extra["delta"] else None,
           "ceiling": [x for x in extra["ceiling"] if x is not None],
           "rel_stderr": [x for x in extra["rel_stderr"] if x is not None], "methods": {}}
    for m in METHODS:
        out["methods"][m] = {c: mean_ci(rows[m][c])._asdict() for c in COLUMNS}
    report.append(out)
    print(json.dumps({k: out[k] for k in ("model", "layer", "seconds", "delta_rel_max")}), flush=True)
    for m in METHODS:
        print(f"  {m:18s} " + "  ".join(f"{c[5:]} {out['methods'][m][c]['mean']:.4f} (n={out['methods'][m][c]['n']})"
                                         for c in COLUMNS), flush=True)


LABELS = {"lift-cam": "LIFT-CAM", "deeplift-shap-cam": "DeepLIFT-SHAP-CAM", "grad-cam": "Grad-CAM",
          "grad-cam++": "Grad-CAM++", "xgrad-cam": "XGrad-CAM", "shapley-cam": "ShapleyCAM", "score-cam": "Score-CAM"}


def pool_results(args):
    """Pool the results under ``--out`` (``*/<model>-<layer>-seed<s>/results.json``, each of the images its
    last run evaluated) over seeds: ``vit-ground-truth.json`` and one markdown row per split
    (cosine / Spearman / top-k)."""
    import glob

    pooled = {}
    for path in sorted(glob.glob(os.path.join(args.out, "*", "*-seed*", "results.json"))):
        key, seed = os.path.basename(os.path.dirname(path)).rsplit("-seed", 1)
        with open(path) as f:
            res = json.load(f)
        p = pooled.setdefault(key, {"seeds": [], "rows": {m: {c: [] for c in COLUMNS} for m in LABELS},
                                    "ceiling": []})
        p["seeds"].append(int(seed))
        for r in res["per_image"]:
            if r["method"] not in LABELS:
                continue
            for c in COLUMNS:
                v = (r.get("metrics") or {}).get(c)
                p["rows"][r["method"]][c].append(np.nan if v is None else v)
            if r["method"] == "lift-cam" and r.get("shap_cosine_ceiling") is not None:
                p["ceiling"].append(r["shap_cosine_ceiling"])
    out = {}
    for key, p in pooled.items():
        out[key] = {"seeds": sorted(p["seeds"]), "cosine_ceiling": float(np.mean(p["ceiling"])) if p["ceiling"] else None,
                    "methods": {m: {c: mean_ci(p["rows"][m][c])._asdict() for c in COLUMNS} for m in LABELS}}
        cells = []
        for m in LABELS:
            s = out[key]["methods"][m]
            blank = s["shap_cosine"]["n"] == 0  # all-zero coefficients: no ranking either
            cells.append(" / ".join("—" if blank or s[c]["n"] == 0 else f"{s[c]['mean']:.2f}" for c in COLUMNS))
        n = out[key]["methods"]["lift-cam"]["shap_cosine"]["n"]
        print(f"| `{key}` | {n} | " + " | ".join(cells) + " |")
    with open(os.path.join(args.out, "vit-ground-truth.json"), "w") as f:
        json.dump(out, f, indent=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("which", choices=["small", "tiny", "report"])
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--limit", type=int, default=16)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--target", default="predicted")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--shap-samples", type=int, default=16)
    ap.add_argument("--shap-chunk", type=int, default=1024)
    ap.add_argument("--topk", type=int, default=4)
    ap.add_argument("--only", default=None, help="comma-separated model:layer pairs")
    args = ap.parse_args()
    report = []
    t0 = time.perf_counter()
    if args.which == "report":
        return pool_results(args)
    if args.which == "small":
        args.shap_method, args.delta = "exact", True
        for name, (width, depth, layers) in SMALL.items():
            model = vision_transformer(name, ViTConfig(width, depth, 2, patch=8, size=32), 1000)
            for layer in layers:
                if args.only and f"{name}:{layer}" not in args.only.split(","):
                    continue
                run(model, layer, range(args.seeds), args, report)
    else:
        args.shap_method, args.delta = "permutation", False
        model = zoo.get("vit_tiny_patch16_224")
        for layer in ["blocks.10", "blocks.11.norm1"]:
            if args.only and f"{model.name}:{layer}" not in args.only.split(","):
                continue
            run(model, layer, range(args.seeds), args, report)
    print(f"total {time.perf_counter() - t0:.0f} s", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"vit-ground-truth-{args.which}.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
