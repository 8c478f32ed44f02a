"""bench: time and memory of CAM methods next to the model's own forward pass.

For each method and batch size: compile time (first call minus a steady call),
steady-state seconds per image (median of --repeats calls after warm-up, each
call interleaved with a forward pass), images per second, the ratio to the
jit-compiled forward pass of the same model, and the compiled program's memory.
Inputs are random normal arrays of the model's input size. Prints a markdown
table; --out FILE.json / FILE.md write the full report / the table.

Methods are names from the registry, optionally with options:
'score-cam:chunk_size=64' (repeat a method with different options to compare).
The persistent compilation cache is off during the run unless
--compilation-cache on (then its hits are reported), so compile times are real.
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

from .. import methods as _methods
from ..errors import UsageError, positive_int
from ..files import write_bytes
from . import _args


def _int_list(text: str):
    try:
        values = [positive_int("--batch-sizes", int(v)) for v in str(text).replace(" ", "").split(",") if v]
    except ValueError:  # not an integer, or below 1 (UsageError is a ValueError)
        values = []
    if not values:
        raise UsageError(f"--batch-sizes takes comma-separated positive integers, got {text!r}")
    return values


def add_arguments(parser):
    _args.add_model_arguments(
        parser, weights_default="random",
        weights_help="'random' (default: speed does not depend on the weights' values), 'pretrained', or a "
                     "checkpoint path")
    parser.add_argument(
        "--methods", default="lift-cam",
        help="comma-separated method names, each optionally NAME:KEY=VALUE[:KEY=VALUE]; 'all' for every "
             "registered method (default: lift-cam)",
    )
    parser.add_argument("--batch-sizes", default="1", help="comma-separated batch sizes (default: 1)")
    parser.add_argument("--repeats", type=_args.positive_int, default=5, help="timed calls per measurement; the median is reported (default: 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls after the compiling call (default: 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default: 0)")
    parser.add_argument(
        "--compilation-cache", choices=("off", "on"), default="off",
        help="use the persistent compilation cache (default off, so compile times are real compilations)",
    )
    parser.add_argument(
        "--out", action="append", default=[], metavar="FILE",
        help="write the report: FILE.json (everything measured) or FILE.md (the table); repeatable",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.add_argument(
        "--data", default=None, metavar="DIR",
        help="measure a dataset run (liftcam-jax explain) on these inputs against its own compiled step, "
             "with --save raw and both, at the first batch size and the first method (default: random inputs)",
    )
    parser.add_argument("--limit", type=_args.positive_int, default=256,
                        help="inputs used with --data (default: 256)")
    _args.add_smoothing_arguments(parser)
    parser.add_argument("--top-k", type=_args.positive_int, default=None, metavar="K",
                        help="measure K targets per image in one call (explain's top_k) against one target and "
                             "against K separate calls, for each method at each batch size (instead of the table)")


def run(args, zoo) -> int:
    from ..bench import bench

    outs = [Path(p) for p in args.out]
    for p in outs:
        if p.suffix.lower() not in (".json", ".md"):
            raise UsageError(f"--out {p}: the file name must end in .json or .md")
    specs = [_methods.parse_method_spec(m) for m in _methods.parse_names(args.methods, allow_options=True).names]
    batch_sizes = _int_list(args.batch_sizes)
    positive_int("--warmup", args.warmup, minimum=0)
    layers = _args.check_smoothing(args, [s.method for s in specs])
    if (args.aug_smooth or args.eigen_smooth or len(layers) > 1) and (args.data or args.top_k):
        raise UsageError("--aug-smooth, --eigen-smooth and --layer a,b are measured on random inputs, "
                         "not with --data or --top-k")
    args.model = _args.model_name(zoo, args.model)  # the report's command line names it
    model, smoothing = _args.load_smoothed(zoo, args, layers,
                                           weights=None if args.weights in (None, "pretrained") else args.weights)
    size = int(model.preprocess.size)
    log = None if args.quiet else (lambda s: print(f"bench: {s}", file=sys.stderr, flush=True))
    if args.data:
        return _dataset_run(args, model, specs[0], batch_sizes[0], outs)
    if args.top_k:
        return _top_k_run(args, model, specs, batch_sizes, outs)
    report = bench(
        model.split,
        model.params,
        (size, size, 3),
        specs,
        batch_sizes,
        repeats=args.repeats,
        warmup=args.warmup,
        seed=args.seed,
        cache=args.compilation_cache == "on",
        model=model.name,
        layer=model.layer,
        weights=args.weights,
        command="liftcam-jax bench " + " ".join(shlex.quote(a) for a in _argv(args)),
        log=log,
        smoothing=smoothing,
    )
    table = report.to_markdown()
    print(table, end="")
    for p in outs:
        text = report.to_json() + "\n" if p.suffix.lower() == ".json" else table
        write_bytes(p, text.encode("utf-8"))
        if log:
            log(f"wrote {p}")
    return 0


def _dataset_run(args, model, spec, batch_size: int, outs) -> int:
    """``--data``: :func:`liftcam_jax.throughput.dataset_efficiency`, printed as markdown."""
    from ..throughput import dataset_efficiency

    report = dataset_efficiency(model, [args.data], method=spec.name, options=dict(spec.options),
                                batch_size=batch_size, limit=args.limit, repeats=args.repeats)
    table = report.to_markdown()
    print(table, end="")
    for p in outs:
        if p.suffix.lower() != ".md":
            raise UsageError(f"--out {p}: with --data the report is markdown (FILE.md)")
        write_bytes(p, table.encode("utf-8"))
    return 0


def _top_k_run(args, model, specs, batch_sizes, outs) -> int:
    """``--top-k K``: :func:`liftcam_jax.bench.bench_top_k` per method and batch size, one line each
    (FILE.md: those lines; FILE.json: every measured field, the command and the device)."""
    import dataclasses
    import json

    from ..bench import bench_top_k, device_info

    size = int(model.preprocess.size)
    lines, costs = [], []
    for b in batch_sizes:
        for spec in specs:
            cost = bench_top_k(model.split, model.params, (size, size, 3), spec, args.top_k, b,
                               repeats=args.repeats, warmup=args.warmup, seed=args.seed,
                               cache=args.compilation_cache == "on")
            costs.append(dataclasses.asdict(cost))
            lines.append(f"{model.name} ({model.layer}) " + cost.line())
            print(lines[-1], flush=True)
    argv = _argv(args) + ["--top-k", str(args.top_k)]
    report = {"command": "liftcam-jax bench " + " ".join(shlex.quote(a) for a in argv), "model": model.name,
              "layer": model.layer, "weights": args.weights, "device": device_info(),
              "rows": costs}
    for p in outs:
        text = json.dumps(report, indent=1) + "\n" if p.suffix.lower() == ".json" else \
            "\n".join(f"- {ln}" for ln in lines) + "\n"
        write_bytes(p, text.encode("utf-8"))
    return 0


def _argv(args):
    """The command line, rebuilt from the parsed arguments (for the report)."""
    parts = ["--model", args.model, "--weights", str(args.weights)]
    if args.layer:
        parts += ["--layer", args.layer]
    parts += ["--methods", args.methods, "--batch-sizes", args.batch_sizes,
              "--repeats", str(args.repeats), "--warmup", str(args.warmup)]
    if args.seed:
        parts += ["--seed", str(args.seed)]
    if args.compilation_cache != "off":
        parts += ["--compilation-cache", args.compilation_cache]
    parts += [flag for flag in ("--aug-smooth", "--eigen-smooth") if getattr(args, flag[2:].replace("-", "_"))]
    if args.layer and "," in args.layer:
        parts += ["--fusion", args.fusion]
    for p in args.out:
        parts += ["--out", p]
    return parts
