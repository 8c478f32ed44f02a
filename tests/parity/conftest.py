"""Shared helpers of the parity tier (torch vs JAX on identical weights).

* ``relative_error(ours, theirs) = max|ours - theirs| / max|theirs|`` (one tensor);
* ``randomize_torch_model(model, seed)``: random biases (N(0, 0.1)) on every
  conv/linear with a bias, random BatchNorm weight (N(1, 0.2)), bias
  (N(0, 0.1)), running mean (N(0, 0.1)) and running variance (U(0.5, 1.5)), and
  random LayerNorm weight (N(1, 0.2)) and bias (N(0, 0.1)), so that no layer is
  an identity by accident;
* fixture ``torchvision_pair(name, seed=0) -> (torch_model, params)``: a
  random-weight torchvision model (``eval()``, randomised as above) and the same
  weights converted by ``models.convert.from_torch`` for ``models.get(name)``;
* fixtures ``rel_error`` and ``randomize``: the two functions above.

Torch runs on at most 2 threads. Without torch, the fixture skips the test.
"""
import numpy as np
import pytest

REASON = ("parity tier needs the PyTorch reference stack "
          "(pip install torch==2.14.1 torchvision==0.29.1 timm captum grad-cam)")

try:
    import torch
except ImportError:  # the core tier runs without torch
    torch = None
else:
    torch.set_num_threads(min(2, torch.get_num_threads()))


def relative_error(ours, theirs) -> float:
    """``max|ours - theirs| / max|theirs|`` over the whole tensor."""
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    return float(np.max(np.abs(ours - theirs)) / max(np.max(np.abs(theirs)), 1e-30))


def cli_maps(tmp_path, x, model: str, weights, *options):
    """``liftcam-jax explain X.npy --model MODEL --weights W OPTIONS --save raw``: the ``(target, map)``
    of each image, read back from the npz files the command wrote."""
    import models
    from liftcam_jax.cli import main

    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "out"
    rc = main(["explain", str(tmp_path / "x.npy"), "--model", model, "--weights", str(weights), *options,
               "--out", str(out), "--save", "raw", "--quiet"], zoo=models)
    assert rc == 0, f"explain exited with {rc}"
    return [(int(z["target"]), z["map"]) for z in (np.load(out / f"x_{i}.npz") for i in range(len(x)))]


def randomize_torch_model(model, seed: int = 0):
    """Random biases, BatchNorm statistics/affine parameters and LayerNorm affine parameters, in
    place; returns ``model``."""
    gen = torch.Generator().manual_seed(seed)

    def fill(t, kind, a, b):
        v = torch.randn(t.shape, generator=gen) * b + a if kind == "normal" else \
            torch.rand(t.shape, generator=gen) * (b - a) + a
        t.copy_(v)

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                fill(m.weight, "normal", 1.0, 0.2)
                fill(m.bias, "normal", 0.0, 0.1)
                fill(m.running_mean, "normal", 0.0, 0.1)
                fill(m.running_var, "uniform", 0.5, 1.5)
            elif isinstance(m, torch.nn.LayerNorm) and m.elementwise_affine:
                fill(m.weight, "normal", 1.0, 0.2)
                fill(m.bias, "normal", 0.0, 0.1)
            elif isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and m.bias is not None:
                fill(m.bias, "normal", 0.0, 0.1)
    return model


@pytest.fixture(scope="session")
def torchvision_pair():
    """Factory ``(name, seed=0) -> (torch_model, params)`` on identical random weights."""
    pytest.importorskip("torch", reason=REASON)
    torchvision = pytest.importorskip("torchvision", reason=REASON)
    import models

    def make(name: str, seed: int = 0):
        torch.manual_seed(seed)
        net = torchvision.models.get_model(name, weights=None).eval()
        randomize_torch_model(net, seed)
        state = {k: v.detach().numpy() for k, v in net.state_dict().items()}
        return net, models.convert.from_torch(state, models.get(name))

    return make


@pytest.fixture(scope="session")
def rel_error():
    """:func:`relative_error` as a fixture."""
    return relative_error


@pytest.fixture(scope="session")
def randomize():
    """:func:`randomize_torch_model` as a fixture (skips without torch)."""
    pytest.importorskip("torch", reason=REASON)
    return randomize_torch_model
