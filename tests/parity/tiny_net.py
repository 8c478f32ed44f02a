"""A tiny random ResNet-ish classifier in PyTorch and the same network as pure JAX functions.

Stages (32x32 input): ``stem`` conv 3->8 stride 2 + BN + ReLU (16x16), ``block1`` a
residual block ``ReLU(x + BN(conv(ReLU(BN(conv(x))))))`` (16x16x8), ``block2`` conv 8->16
stride 2 + BN + ReLU (8x8x16), then a head:

* ``"linear"``: global average pooling, Linear(16, 5) (piecewise linear: a zero Hessian);
* ``"tanh"``: global average pooling, Linear(16, 12), tanh, Linear(12, 5) (a smooth head).

:func:`make` builds the torch model (random weights, random BN statistics, ``eval()``) and
returns it with the JAX ``params`` (the same numbers) and ``split(name)``, the
:class:`liftcam_jax.Split` after stage ``name``. The torch stages are ``net[0..2]``.
"""
import jax
import jax.numpy as jnp
import numpy as np
import torch

from liftcam_jax.model import Split

STAGES = ("stem", "block1", "block2")
BN_EPS = 1e-5


def _bn(c):
    return torch.nn.BatchNorm2d(c, eps=BN_EPS)


class Residual(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = torch.nn.Conv2d(c, c, 3, padding=1), _bn(c)
        self.conv2, self.bn2 = torch.nn.Conv2d(c, c, 3, padding=1), _bn(c)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(y)))


def _torch_net(head):
    layers = [torch.nn.Linear(16, 5)] if head == "linear" else [
        torch.nn.Linear(16, 12), torch.nn.Tanh(), torch.nn.Linear(12, 5)]
    return torch.nn.Sequential(
        torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), _bn(8), torch.nn.ReLU()),
        Residual(8),
        torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), _bn(16), torch.nn.ReLU()),
        torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(1), *layers),
    )


def _conv(x, p, stride=1):
    w = jnp.transpose(p["w"], (2, 3, 1, 0))  # OIHW -> HWIO
    y = jax.lax.conv_general_dilated(x, w, (stride, stride), ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + p["b"]


def _bn_apply(x, p):
    return (x - p["mean"]) / jnp.sqrt(p["var"] + BN_EPS) * p["gamma"] + p["beta"]


def _stem(params, x):
    return jax.nn.relu(_bn_apply(_conv(x, params["stem_conv"], 2), params["stem_bn"]))


def _block1(params, x):
    y = jax.nn.relu(_bn_apply(_conv(x, params["b1_conv1"]), params["b1_bn1"]))
    return jax.nn.relu(x + _bn_apply(_conv(y, params["b1_conv2"]), params["b1_bn2"]))


def _block2(params, x):
    return jax.nn.relu(_bn_apply(_conv(x, params["b2_conv"], 2), params["b2_bn"]))


def _head(params, a):
    z = jnp.mean(a, axis=(1, 2))
    for i, layer in enumerate(params["head"]):
        if i:
            z = jnp.tanh(z)
        z = z @ layer["w"].T + layer["b"]
    return z


_FNS = (_stem, _block1, _block2)


def split(name):
    """The :class:`Split` after stage ``name`` (one of :data:`STAGES`)."""
    k = STAGES.index(name) + 1

    def features(params, x):
        for f in _FNS[:k]:
            x = f(params, x)
        return x

    def head(params, a):
        for f in _FNS[k:]:
            a = f(params, a)
        return _head(params, a)

    return Split(features, head)


def make(head="tanh", seed=0):
    """``(torch_net, params)`` with identical random weights (BN with random statistics)."""
    torch.manual_seed(seed)
    net = _torch_net(head)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(1.0 + 0.2 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
            elif isinstance(m, torch.nn.Linear):
                m.weight.mul_(3.0)  # logits of a few units: the softmax (ReST) is not flat
    net.eval()

    def conv(m):
        return {"w": m.weight.detach().numpy(), "b": m.bias.detach().numpy()}

    def bn(m):
        return {"gamma": m.weight.detach().numpy(), "beta": m.bias.detach().numpy(),
                "mean": m.running_mean.numpy(), "var": m.running_var.numpy()}

    stem, res, down, head_mod = net
    params = {
        "stem_conv": conv(stem[0]), "stem_bn": bn(stem[1]),
        "b1_conv1": conv(res.conv1), "b1_bn1": bn(res.bn1),
        "b1_conv2": conv(res.conv2), "b1_bn2": bn(res.bn2),
        "b2_conv": conv(down[0]), "b2_bn": bn(down[1]),
        "head": [conv(m) for m in head_mod if isinstance(m, torch.nn.Linear)],
    }
    return net, jax.tree_util.tree_map(jnp.asarray, params)


def images(batch=2, size=32, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, size, size, 3)).astype(np.float32)


def to_torch(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def mixed_targets(logits):
    """Image 0: its top class; image 1: its second class; and so on alternately."""
    order = np.argsort(np.asarray(logits), axis=1)
    return [int(order[i, -1 - (i % 2)]) for i in range(order.shape[0])]
