"""Arguments shared by the subcommands: the model triple, TFDS features and positive integers."""
from __future__ import annotations

import argparse

from .. import errors


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (:func:`liftcam_jax.errors.positive_int`; argparse names the option)."""
    try:
        return errors.positive_int("value", int(text))
    except ValueError:  # not an integer, or UsageError (a ValueError): below 1
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None


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


def add_tfds_arguments(parser) -> None:
    """``--image-key``, ``--label-key`` and ``--label-map`` for TFDS inputs."""
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
