"""explain: explain images, folders, .npy arrays or TFDS splits in batches, resumably.

Writes, per input, an .npz (map, raw map, coefficients, logits, target, ...)
and/or a PNG overlay into --out, and a manifest.jsonl with one line per input
(done or failed, with the error). Rerunning the same command after a crash
skips finished inputs and completes the rest.

Inputs: image files; folders (recursive); .npy float arrays (N, H, W, 3)
already preprocessed for the model; TFDS splits tfds:NAME[/CONFIG][@VERSION]:SPLIT
(e.g. tfds:imagenette:validation[:500]) from a local data dir, array_record
(no TensorFlow needed) or TFRecord (needs TensorFlow). Ids are the examples'
indices in the split; their labels and label names are recorded, and
--target label explains each image's labelled class. --target top5 (or
285,281) explains several classes per image in one compiled call; --score
rest scores them with ShapleyCAM's ReST instead of the logit.

The batch is split over all local devices (rounded up to a multiple of their
number). Exit status: 0 when every input was explained, 1 when some failed
(see the manifest), 2 for a usage error (nothing done) or a fatal error such
as a full disk (rerun the same command to resume).

Without --model the zoo's default model explains (the bundled, pretrained
EfficientNet-Lite0 for the Flax zoo); without --out the results go to
liftcam-out/<name of the first input>. The summary names both.
"""
from __future__ import annotations

import argparse

from .. import methods as _methods
from ..errors import UsageError
from ._args import (add_distributed_arguments, add_model_arguments, add_smoothing_arguments, add_tfds_arguments,
                    check_smoothing, data_options, default_out, join_cluster, load_smoothed, positive_int)


def _target(text: str):
    """argparse type: the target words of :func:`liftcam_jax.runs.explain.parse_target`, checked here."""
    from ..errors import UsageError
    from ..runs.explain import parse_target

    try:
        parse_target(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text.strip()


def add_arguments(parser):
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="image files, folders, .npy arrays (N, H, W, 3) preprocessed, or "
                             "tfds:NAME[/CONFIG][@VERSION]:SPLIT")
    add_model_arguments(parser)
    parser.add_argument("--method", default="lift-cam",
                        help="explanation method (default lift-cam); one of: " + ", ".join(_methods.names()))
    parser.add_argument("--target", type=_target, default="predicted",
                        help="what to explain per image: 'predicted' (the predicted class, default), 'label' (each "
                             "input's dataset label, mapped to the model's classes: see --label-map), 'auto' (the "
                             "label when every input is labelled, else the predicted class), 'topK' (e.g. top5: "
                             "the K highest-scoring classes), a class index, or several ('285,281': each, for "
                             "every image); several targets give one .npz with all the maps and one overlay each")
    parser.add_argument("--score", default="logit",
                        help="how the targeted class is scored: 'logit' (default) or 'rest' (ShapleyCAM's ReST, "
                             "the logit minus the cross-entropy; gradient methods)")
    parser.add_argument("--batch-size", type=positive_int, default=32,
                        help="images per step, rounded up to a multiple of the device count (default 32)")
    parser.add_argument("--save", choices=("overlay", "raw", "both"), default="both",
                        help="PNG overlays, .npz arrays, or both (default both)")
    parser.add_argument("--out", default=None,
                        help="output folder (created; reused to resume; default liftcam-out/<first input's name>)")
    parser.add_argument("--limit", type=positive_int, default=None, help="explain only the first N inputs")
    parser.add_argument("--download", action="store_true", help="let TFDS download and prepare a missing dataset")
    add_tfds_arguments(parser)
    parser.add_argument("--workers", type=positive_int, default=None, help="image decoding threads (default up to 4)")
    parser.add_argument("--alpha", type=float, default=0.5, help="heat-map weight in the overlays (default 0.5)")
    parser.add_argument("--cmap", default="jet", help="overlay colormap: jet, hot or gray (default jet)")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed for randomised methods (default 0)")
    add_smoothing_arguments(parser)
    add_distributed_arguments(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no summary")


def run(args, zoo) -> int:
    from ..runs.explain import run as explain_run

    method = _methods.get(args.method)  # a bad name fails before the model loads; resolved once
    layers = check_smoothing(args, [method])
    join_cluster(args)  # several hosts: before JAX starts its backend
    classifier, smoothing = load_smoothed(zoo, args, layers)
    summary = explain_run(
        classifier,
        args.inputs,
        out_dir=args.out or default_out(args.inputs[0]),
        method=method,
        target=args.target,
        score=args.score,
        batch_size=args.batch_size,
        save=args.save,
        limit=args.limit,
        quiet=args.quiet,
        workers=args.workers,
        alpha=args.alpha,
        cmap=args.cmap,
        seed=args.seed,
        data=data_options(args),
        run_info={"weights": args.weights or "default"},
        smoothing=smoothing,
    )
    return 1 if summary.failed else 0
