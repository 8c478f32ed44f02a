"""Arguments shared by the subcommands: the model triple and positive integers."""
from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a clear one-line error otherwise)."""
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def add_model_arguments(parser, *, model_default=None, weights_default=None, weights_help=None) -> None:
    """``--model`` (required unless a default is given), ``--weights`` and ``--layer``."""
    if model_default is None:
        parser.add_argument("--model", required=True, help="model name in the zoo (e.g. efficientnet_lite0, resnet50, vgg16)")
    else:
        parser.add_argument("--model", default=model_default, help=f"model name in the zoo (default: {model_default})")
    parser.add_argument(
        "--weights", default=weights_default,
        help=weights_help or "checkpoint path, or 'random' (default: the model's pretrained weights)",
    )
    parser.add_argument("--layer", default=None, help="where to split the model (default: the model's default layer)")
