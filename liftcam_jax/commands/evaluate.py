"""evaluate: score explanation methods on labelled images (faithfulness, localisation, SHAP agreement).

--data is a folder with images and labels.csv (columns file = path relative to
the folder, imagenet_index = the class; other columns ignored), and optionally
boxes.csv (file,xmin,ymin,xmax,ymax; several rows per file allowed; pixel
coordinates of the stored image, mapped to the model input through its
preprocessing: squash, or shorter-side resize + centre crop, where boxes
outside the crop drop out) for the localisation metrics; or a TFDS split
tfds:NAME[/CONFIG][@VERSION]:SPLIT, array_record or TFRecord (labels from its
ClassLabel feature, mapped to the model's classes by WordNet id, as imagenette's
and imagenet2012's are, or by --label-map; boxes from an 'objects/bbox' or
'bbox' feature when there is one).

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
The same in Python: liftcam_jax.evaluation.evaluate(classifier, data, ...).
Without --model the zoo's default model is evaluated (the bundled, pretrained
EfficientNet-Lite0 for the Flax zoo); without --out the results go to
liftcam-out/<data name>-evaluate. Box metrics (epg, pointing) named in
--metrics on data without boxes are a usage error.
Exit status: 0 when every image was evaluated, 1 when some failed, 2 for a
usage error.
"""
from __future__ import annotations

from .. import methods as _methods
from .. import metrics as M
from ..errors import UsageError
from ..runs import evaluate as E
from ._args import (add_distributed_arguments, add_model_arguments, add_tfds_arguments, data_options, default_out,
                    join_cluster, load_model, positive_int)


def add_arguments(parser):
    parser.add_argument("--data", required=True,
                        help="folder with images + labels.csv (+ boxes.csv), or tfds:NAME[/CONFIG][@VERSION]:SPLIT")
    add_model_arguments(parser)
    parser.add_argument("--methods", default="all",
                        help="comma-separated methods, or 'all' (default): " + ", ".join(_methods.names()))
    parser.add_argument("--metrics", default="all",
                        help="comma-separated metrics, or 'all' (default): " + ", ".join(E.METRICS))
    parser.add_argument("--out", default=None,
                        help="output folder (created; reused to resume; default liftcam-out/<data name>-evaluate)")
    parser.add_argument("--limit", type=positive_int, default=None, help="evaluate only the first N labelled images")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="images per step (default 8)")
    parser.add_argument("--target", choices=("label", "predicted"), default="label",
                        help="explain the ground-truth class (default) or the predicted one")
    parser.add_argument("--score", default="logit",
                        help="how that class is scored, by every method and by the SHAP game of --metrics shap: "
                             "'logit' (default) or 'rest' (ShapleyCAM's ReST: the logit minus the cross-entropy)")
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
    g.add_argument("--tie-break", choices=("raster", "random"), default="raster",
                   help="order of equally salient pixels: row-major (default) or a random order fixed by --seed")
    g.add_argument("--step-chunk", type=positive_int, default=16,
                   help="perturbed copies per image per model call (memory; default 16)")
    g = parser.add_argument_group("localisation and SHAP")
    g.add_argument("--tolerance", type=float, default=M.POINTING_TOLERANCE,
                   help=f"pointing game tolerance in pixels (default {M.POINTING_TOLERANCE})")
    g.add_argument("--shap-method", default="permutation", help="SHAP estimator: permutation, kernel or exact")
    g.add_argument("--shap-samples", type=positive_int, default=16,
                   help="SHAP samples per image: permutations or coalitions, even (default 16)")
    g.add_argument("--shap-chunk", type=positive_int, default=64, help="SHAP head evaluations per call (default 64)")
    g.add_argument("--topk", type=positive_int, default=10, help="k of the SHAP top-k overlap (default 10)")
    g = parser.add_argument_group("outputs")
    g.add_argument("--grid", type=int, default=4, help="images in the qualitative grid (0: none; default 4)")
    add_tfds_arguments(g)
    g.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    add_distributed_arguments(parser)


def run(args, zoo) -> int:
    import sys

    metrics = E.parse_metrics(args.metrics)
    methods = _methods.parse_names(args.methods)  # a bad method name fails before the model loads
    if args.step is not None and args.num_steps is not None:
        raise UsageError("give --step or --num-steps, not both")
    out = args.out or default_out(args.data, "-evaluate")
    config = E.EvalConfig(target=args.target, score=args.score, seed=args.seed, step=args.step, num_steps=args.num_steps,
                          substrate=args.substrate, blur_sigma=args.blur_sigma, tie_break=args.tie_break,
                          tolerance=args.tolerance, shap_method=args.shap_method, shap_samples=args.shap_samples,
                          topk=args.topk, batch_size=args.batch_size, step_chunk=args.step_chunk,
                          shap_chunk=args.shap_chunk, limit=args.limit,
                          redo=tuple(r.strip() for r in str(args.redo or "").split(",") if r.strip()),
                          grid=args.grid, quiet=args.quiet, run_info={"weights": args.weights or "default"},
                          data=data_options(args))
    config.check(metrics)  # before the model loads
    join_cluster(args)  # several hosts: each evaluates its share, process 0 writes the results
    classifier = load_model(zoo, args)
    res = E.evaluate(classifier, args.data, methods, args.metrics, out_dir=out, config=config)
    s = res.summary
    if not args.quiet:
        print(f"liftcam-jax: evaluate: {s['done']} images evaluated, {s['skipped']} skipped (already done), "
              f"{s['failed']} failed of {res.images} in {s['seconds']:.1f} s; model: {classifier.name}; "
              f"results: {out}/results.md ({len(res.methods)} methods)" + "".join(f"; {n}" for n in res.notes),
              file=sys.stderr)
    return 1 if s["failed"] else 0
