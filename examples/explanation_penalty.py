r"""Training with an explanation in the loss: a LIFT-CAM penalty moves a CNN off a shortcut (optax).

"Right for the right reasons" (Ross, Hughes & Doshi-Velez, IJCAI 2017) penalises input gradients
outside the relevant region; here the penalty is on LIFT-CAM's map. A synthetic dataset of
``16 x 16`` grey images: the label is the orientation of a small bar (class 0 horizontal, class 1
vertical, 1 x 4 pixels, anywhere in the central ``10 x 10``), and a spurious ``3 x 3`` patch in the
top-left corner marks class 1 in every training image. The model, two 3x3 convolutions (stride 1)
then global average pooling and a linear layer, can read either.

The loss for a batch with labels ``y``, object masks ``M`` (the bar's pixels, dilated by one) and
LIFT-CAM's raw maps ``R = ReLU(sum_k phi_k A^k)`` of the class-difference target
:math:`s = y_{\mathrm{label}} - y_{\mathrm{other}}` (:func:`liftcam_jax.targets.logit_difference`):

.. math::
    L = \mathrm{CE}(f(x), y) + \lambda\, \frac{1}{B}\sum_b
        \frac{\sum_{ij} (1 - M_{bij}) R_{bij}}{\sum_{ij} R_{bij} + \epsilon}

``jax.grad`` goes through LIFT-CAM (the rescale rule is differentiable, see the README's
"Differentiable explanations"); optax's Adam updates the parameters. :func:`run` trains twice from
the same seed, with ``lambda = 0`` and with the penalty, and reports, on held-out images, the
share of the map outside the object and the accuracy when the corner patch is flipped (present
exactly on class 0). ``python examples/explanation_penalty.py`` prints them.
"""
from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import liftcam_jax as lj

SIZE = 16


def make_data(n: int, seed: int, *, flipped: bool = False):
    """``(x (n, 16, 16, 1), y (n,), mask (n, 16, 16))``: a bar of the label's orientation, and the corner
    patch on class 1 (on class 0 with ``flipped``)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 0.05, (n, SIZE, SIZE, 1)).astype(np.float32)
    y = rng.integers(0, 2, n)
    mask = np.zeros((n, SIZE, SIZE), np.float32)
    for i in range(n):
        h, w = (1, 4) if y[i] == 0 else (4, 1)
        r, c = rng.integers(4, 14 - h), rng.integers(4, 14 - w)
        x[i, r:r + h, c:c + w, 0] += 1.0
        mask[i, max(r - 1, 0):r + h + 1, max(c - 1, 0):c + w + 1] = 1.0
        if (y[i] == 1) != flipped:
            x[i, 0:3, 0:3, 0] += 1.0
    return jnp.asarray(x), jnp.asarray(y), jnp.asarray(mask)


class Features(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        return nn.relu(nn.Conv(8, (3, 3))(x))


class Head(nn.Module):
    @nn.compact
    def __call__(self, a):
        return nn.Dense(2)(jnp.mean(a, axis=(1, 2)))


SPLIT = lj.Split(lambda p, x: Features().apply(p["f"], x), lambda p, a: Head().apply(p["h"], a))


def init(seed: int):
    kf, kh = jax.random.split(jax.random.PRNGKey(seed))
    x = jnp.zeros((1, SIZE, SIZE, 1))
    pf = Features().init(kf, x)
    return {"f": pf, "h": Head().init(kh, Features().apply(pf, x))}


EXPLAIN = lj.explainer(SPLIT, "lift-cam")


def outside_share(params, x, y, mask, eps: float = 1e-6):
    """Per image, the share of LIFT-CAM's raw map (target: label minus the other class) outside the mask."""
    raw = EXPLAIN(params, x, lj.targets.logit_difference(y, 1 - y)).raw
    return jnp.sum(raw * (1.0 - mask), axis=(1, 2)) / (jnp.sum(raw, axis=(1, 2)) + eps)


def loss(params, x, y, mask, weight):
    ce = optax.softmax_cross_entropy_with_integer_labels(SPLIT(params, x), y).mean()
    return ce + weight * jnp.mean(outside_share(params, x, y, mask))


class Result(NamedTuple):
    """Held-out numbers after training: map share outside the object, accuracy on ordinary images and on
    images whose corner patch is flipped."""

    outside: float
    accuracy: float
    flipped_accuracy: float


def train(weight: float, *, seed: int = 0, steps: int = 150, batch: int = 64, lr: float = 1e-2):
    """Train from ``init(seed)`` with Adam for ``steps`` steps on fresh batches; returns the parameters."""
    params = init(seed)
    opt = optax.adam(lr)
    state = opt.init(params)
    x, y, mask = make_data(steps * batch, seed + 1)

    @jax.jit
    def step(params, state, i):
        sl = lambda a: jax.lax.dynamic_slice_in_dim(a, i * batch, batch)  # noqa: E731
        g = jax.grad(loss)(params, sl(x), sl(y), sl(mask), weight)
        updates, state = opt.update(g, state, params)
        return optax.apply_updates(params, updates), state

    for i in range(steps):
        params, state = step(params, state, i)
    return params


def evaluate(params, *, n: int = 256, seed: int = 123) -> Result:
    x, y, mask = make_data(n, seed)
    xf, yf, _ = make_data(n, seed, flipped=True)
    acc = lambda x, y: float(jnp.mean(jnp.argmax(SPLIT(params, x), -1) == y))  # noqa: E731
    return Result(float(jnp.mean(outside_share(params, x, y, mask))), acc(x, y), acc(xf, yf))


def run(weight: float = 1.0, **kw):
    """``(without, with_penalty)``: :class:`Result` of the same training with ``lambda = 0`` and ``weight``."""
    return evaluate(train(0.0, **kw)), evaluate(train(weight, **kw))


if __name__ == "__main__":
    plain, penalised = run()
    print(f"without the penalty: {plain}\nwith the penalty:    {penalised}")
