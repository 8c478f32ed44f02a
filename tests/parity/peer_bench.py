#!/usr/bin/env python
"""Peer comparison: liftcam-jax against the PyTorch implementations, on the same weights.

A script of the parity tier (run by hand; ``test_peer_bench.py`` runs it once
in ``--smoke`` mode). For each model, a torchvision network with its random
initialisation (seed 0) is converted to the Flax zoo's parameters
(``models.convert.from_torch``), so both sides compute the same function
(the logits' agreement is printed). For each method and batch size it times,
interleaved in one loop so that both see the same machine load:

* the liftcam-jax explainer and the jit-compiled Flax forward pass;
* the PyTorch peer and the torchvision forward pass (``torch.no_grad``).

Peers (``torch.set_num_threads(--threads)``, default 2):

* ``lift-cam``: the authors' method (Jung & Oh, ICCV 2021): Captum's
  ``DeepLift`` on the head module (VGG16: ``features[30]`` max-pool,
  ``avgpool``, ``classifier``; ResNet: ``avgpool``, ``fc``) with a zero
  baseline; coefficients are the spatial sums of the attributions; the map is
  ``ReLU(sum_k phi_k A^k)``, bilinearly upsampled, min-max normalised. The
  features and the logits (for the predicted class) come from one forward
  pass of the feature extractor and the head.
* ``grad-cam``, ``grad-cam++``, ``xgrad-cam``, ``layer-cam``, ``hires-cam``,
  ``eigen-cam``, ``score-cam``, ``ablation-cam``: pytorch-grad-cam 1.5.7
  (target layer ``features[29]`` for VGG, ``layer4[-1]`` for ResNet; Score-CAM's
  default batch of 16, Ablation-CAM's default batch of 32).

The maps of both sides are compared (max absolute difference of the
normalised maps) as a check that like is compared with like. Times are
seconds per image, medians over ``--repeats`` calls after one warm-up call.

Usage::

    .venv/bin/python tests/parity/peer_bench.py --models vgg16,resnet50 \\
        --methods lift-cam,grad-cam --batch-sizes 1,32 --repeats 5 --out peer.json
    .venv/bin/python tests/parity/peer_bench.py --models vgg16 \\
        --methods score-cam,ablation-cam --batch-sizes 1 --repeats 1
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # Score-CAM's progress bars

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GRAD_CAM_CLASSES = {
    "grad-cam": "GradCAM",
    "grad-cam++": "GradCAMPlusPlus",
    "xgrad-cam": "XGradCAM",
    "layer-cam": "LayerCAM",
    "hires-cam": "HiResCAM",
    "eigen-cam": "EigenCAM",
    "score-cam": "ScoreCAM",
    "ablation-cam": "AblationCAM",
}
PEERS = ("lift-cam",) + tuple(GRAD_CAM_CLASSES)


# ---------------------------------------------------------------------------
# the torch side
# ---------------------------------------------------------------------------

def torch_model(name: str):
    """torchvision ``name`` with its random initialisation (seed 0), ReLUs not in place
    (Captum and pytorch-grad-cam hook them), split as the Flax zoo splits it."""
    import torch
    import torchvision

    torch.manual_seed(0)
    net = getattr(torchvision.models, name)(weights=None).eval()
    for m in net.modules():
        if isinstance(m, torch.nn.ReLU):
            m.inplace = False
    if name.startswith("vgg"):
        last_relu = max(i for i, m in enumerate(net.features) if isinstance(m, torch.nn.ReLU))
        features = net.features[: last_relu + 1]
        head = torch.nn.Sequential(*net.features[last_relu + 1:], net.avgpool, torch.nn.Flatten(1), net.classifier)
        layer = net.features[last_relu]
    elif name.startswith("resnet"):
        features = torch.nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool,
                                       net.layer1, net.layer2, net.layer3, net.layer4)
        head = torch.nn.Sequential(net.avgpool, torch.nn.Flatten(1), net.fc)
        layer = net.layer4[-1]
    else:
        raise SystemExit(f"peer_bench: no torch split for {name!r} (vgg*, resnet*)")
    return net, features.eval(), head.eval(), layer


def _normalize_torch(cam):
    import torch

    flat = cam.flatten(1)
    lo, hi = flat.min(1)[0][:, None, None], flat.max(1)[0][:, None, None]
    span = hi - lo
    return torch.where(span > 0, (cam - lo) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(cam))


def authors_lift_cam(features, head):
    """The authors' LIFT-CAM: Captum DeepLift on the head, zero baseline."""
    import torch
    import torch.nn.functional as F
    from captum.attr import DeepLift

    dl = DeepLift(head)

    def run(x):
        with torch.no_grad():
            a = features(x)
            target = head(a).argmax(1)
        attr = dl.attribute(a, baselines=torch.zeros_like(a), target=target)
        phi = attr.detach().sum(dim=(2, 3))
        cam = torch.relu((phi[:, :, None, None] * a).sum(1, keepdim=True))
        cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        return _normalize_torch(cam).numpy()

    return run


class _GradCamPeer:
    """A pytorch-grad-cam method as a callable (hooks released by close())."""

    def __init__(self, method, net, layer):
        import pytorch_grad_cam

        self.cam = getattr(pytorch_grad_cam, GRAD_CAM_CLASSES[method])(model=net, target_layers=[layer])

    def __call__(self, x):
        return self.cam(input_tensor=x, targets=None)

    def close(self):
        self.cam.activations_and_grads.release()


# ---------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------

def _time(fn, *args):
    """(wall seconds, process CPU seconds, output) of one call."""
    import jax

    c0, t0 = time.process_time(), time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0, time.process_time() - c0, out


def measure(name, methods, batch_sizes, repeats, size, options, log, warmup=1):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    import models
    from liftcam_jax import explainer

    net, t_features, t_head, layer = torch_model(name)
    fwd_net = copy.deepcopy(net)  # the yardstick, free of the peers' hooks
    staged = models.get(name)
    params = jax.device_put(models.convert.from_torch(
        {k: v.detach().numpy() for k, v in net.state_dict().items()}, staged))
    split = staged.split()
    forward = jax.jit(lambda p, x: split(p, x))

    rows = []
    for b in batch_sizes:
        xt = torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(b))
        xj = jnp.asarray(xt.numpy().transpose(0, 2, 3, 1))
        with torch.no_grad():
            logits_t = fwd_net(xt).numpy()
        logits_j = np.asarray(forward(params, xj))
        logit_diff = float(np.max(np.abs(logits_t - logits_j)))
        log(f"{name} b={b}: max |logits torch - jax| = {logit_diff:.2e}")
        for method in methods:
            opts = options.get(method, {})
            fn = explainer(split, method, **opts)
            peer = authors_lift_cam(t_features, t_head) if method == "lift-cam" else _GradCamPeer(method, net, layer)
            try:
                t_first = _time(fn, params, xj)[0]  # compiles
                _time(forward, params, xj)
                t_peer_first = None
                for _ in range(warmup):
                    _time(fn, params, xj)
                    t = _time(peer, xt)[0]
                    t_peer_first = t_peer_first or t
                jf, jm, tf, tm = [], [], [], []  # wall
                cjf, cjm, ctf, ctm = [], [], [], []  # CPU
                maps_j = maps_t = None
                for _ in range(repeats):
                    t, c, _ = _time(forward, params, xj)
                    jf.append(t), cjf.append(c)
                    t, c, e = _time(fn, params, xj)
                    jm.append(t), cjm.append(c)
                    maps_j = np.asarray(e.maps)
                    with torch.no_grad():
                        t, c, _ = _time(fwd_net, xt)
                    tf.append(t), ctf.append(c)
                    t, c, maps_t = _time(peer, xt)
                    tm.append(t), ctm.append(c)
                    maps_t = np.asarray(maps_t)
            finally:
                if hasattr(peer, "close"):
                    peer.close()
            med = lambda v: statistics.median(v) / b
            row = {
                "model": name, "method": method, "options": opts, "batch_size": b,
                "jax_s_per_image": med(jm), "jax_forward_s_per_image": med(jf),
                "jax_ratio_to_forward": statistics.median([m / f for m, f in zip(jm, jf)]),
                "peer_s_per_image": med(tm), "torch_forward_s_per_image": med(tf),
                "peer_ratio_to_forward": statistics.median([m / f for m, f in zip(tm, tf)]),
                "speedup": statistics.median([p / j for p, j in zip(tm, jm)]),
                "jax_cpu_s_per_image": med(cjm), "peer_cpu_s_per_image": med(ctm),
                "jax_forward_cpu_s_per_image": med(cjf), "torch_forward_cpu_s_per_image": med(ctf),
                "jax_cpu_ratio_to_forward": statistics.median([m / f for m, f in zip(cjm, cjf)]),
                "peer_cpu_ratio_to_forward": statistics.median([m / f for m, f in zip(ctm, ctf)]),
                "cpu_speedup": statistics.median([p / j for p, j in zip(ctm, cjm)]),
                "jax_first_call_s": t_first, "peer_first_call_s": t_peer_first,
                "max_map_diff": float(np.max(np.abs(maps_j - maps_t))),
                "logit_diff": logit_diff,
                "jax_runs_s": jm, "jax_forward_runs_s": jf, "peer_runs_s": tm, "torch_forward_runs_s": tf,
                "jax_cpu_runs_s": cjm, "jax_forward_cpu_runs_s": cjf, "peer_cpu_runs_s": ctm,
                "torch_forward_cpu_runs_s": ctf,
            }
            rows.append(row)
            log(f"{name} {method} b={b}: jax {row['jax_s_per_image']:.4g} s/img, peer {row['peer_s_per_image']:.4g} "
                f"s/img, speedup {row['speedup']:.2f}x (CPU time {row['cpu_speedup']:.2f}x), "
                f"max |map diff| {row['max_map_diff']:.2e}")
    return rows


def markdown(rows, info) -> str:
    lines = [
        f"Device: {info['device']} ({info['cpu_count']} CPU cores visible), torch {info['torch']} "
        f"({info['torch_threads']} threads), JAX {info['jax']}, pytorch-grad-cam {info['grad_cam']}, "
        f"captum {info['captum']}. Median of {info['repeats']} interleaved calls after {info['warmup']} "
        "warm-up call(s), seconds per image.",
        "",
        f"Command: `{info['command']}`",
        "",
        "| model | method | batch | liftcam-jax s/img | jax / jax forward | peer s/img | peer / torch forward "
        "| speedup (peer / jax) | jax forward s/img | torch forward s/img "
        "| CPU s/img jax | CPU s/img peer | CPU speedup | max map diff |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        label = r["method"] + "".join(f":{k}={v}" for k, v in r["options"].items())
        lines.append(
            f"| {r['model']} | {label} | {r['batch_size']} | {r['jax_s_per_image']:.4g} | {r['jax_ratio_to_forward']:.2f} "
            f"| {r['peer_s_per_image']:.4g} | {r['peer_ratio_to_forward']:.2f} | {r['speedup']:.2f}x "
            f"| {r['jax_forward_s_per_image']:.4g} | {r['torch_forward_s_per_image']:.4g} "
            f"| {r['jax_cpu_s_per_image']:.4g} | {r['peer_cpu_s_per_image']:.4g} | {r['cpu_speedup']:.2f}x "
            f"| {r['max_map_diff']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def _options(text):
    """``score-cam:chunk_size=64,ablation-cam:chunk_size=64`` -> {method: {key: value}}."""
    import ast

    out = {}
    for item in filter(None, (t.strip() for t in (text or "").split(","))):
        method, _, kv = item.partition(":")
        key, _, value = kv.partition("=")
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass
        out.setdefault(method, {})[key] = value
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="vgg16,resnet50")
    p.add_argument("--methods", default="lift-cam,grad-cam", help=f"comma-separated, from {', '.join(PEERS)}")
    p.add_argument("--batch-sizes", default="1,32")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1, help="untimed calls of each side before timing (default 1)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--size", type=int, default=224, help="input size (default 224)")
    p.add_argument("--options", default="", help="liftcam-jax method options, e.g. score-cam:chunk_size=64")
    p.add_argument("--smoke", action="store_true", help="tiny run for the test: resnet18, 64x64, batch 1, one repeat")
    p.add_argument("--out", action="append", default=[], help="FILE.json or FILE.md (repeatable)")
    args = p.parse_args(argv)
    if args.smoke:
        args.models, args.batch_sizes, args.repeats, args.size = "resnet18", "1", 1, 64
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in PEERS]
    if unknown:
        p.error(f"no peer for {', '.join(unknown)}; peers: {', '.join(PEERS)}")

    import captum
    import jax
    import pytorch_grad_cam  # noqa: F401
    import torch
    from importlib.metadata import version

    torch.set_num_threads(args.threads)
    log = lambda s: print(f"peer_bench: {s}", file=sys.stderr, flush=True)
    rows = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        rows += measure(name, methods, [int(b) for b in args.batch_sizes.split(",")], args.repeats, args.size,
                        _options(args.options), log, warmup=args.warmup)
    info = {
        "device": jax.devices()[0].device_kind, "platform": jax.devices()[0].platform,
        "cpu_count": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "jax": jax.__version__,
        "grad_cam": version("grad-cam"), "captum": captum.__version__, "repeats": args.repeats,
        "warmup": args.warmup, "command": "python tests/parity/peer_bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    table = markdown(rows, info)
    print(table, end="")
    for out in args.out:
        text = json.dumps({"info": info, "rows": rows}, indent=2) + "\n" if out.endswith(".json") else table
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
