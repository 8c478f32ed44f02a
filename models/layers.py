"""Building blocks shared by the zoo, matching PyTorch's inference semantics (NHWC).

* ``conv``: a bias-free (by default) convolution with explicit padding
  ``((p, p), (p, p))`` like ``torch.nn.Conv2d(padding=p)``; a depthwise one
  (``groups == features``) is a :class:`DepthwiseConv`;
* ``same_padding``: TensorFlow's "SAME" padding of one axis,
  ``pad = max((ceil(n/s) - 1) s + k - n, 0)`` split ``(pad // 2, pad - pad // 2)``
  (the extra pixel at the bottom/right), as in timm's ``tf_`` models;
* ``batch_norm``: inference batch norm on running statistics,
  ``(x - mean) / sqrt(var + eps) * scale + bias``.
* ``adaptive_avg_pool``: ``torch.nn.AdaptiveAvgPool2d`` exactly: output cell
  ``i`` averages input rows ``floor(i n / m) .. ceil((i + 1) n / m) - 1``.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Padding = Union[int, str, Sequence[Tuple[int, int]]]


def conv(features: int, kernel: int, stride: int = 1, padding: Padding = 0, *,
         groups: int = 1, bias: bool = False, name: str | None = None) -> nn.Module:
    """A 2-D convolution; an int ``padding`` pads ``p`` zeros on every side,
    ``((top, bottom), (left, right))`` pads explicitly. One group per output channel
    (``groups == features``, no bias) gives a :class:`DepthwiseConv`: same parameter,
    same result, computed without a grouped convolution."""
    pad = ((padding, padding), (padding, padding)) if isinstance(padding, int) else padding
    if groups > 1 and groups == features and not bias:
        return DepthwiseConv(features, kernel, stride, tuple(map(tuple, pad)), name=name)
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=pad,
                   feature_group_count=groups, use_bias=bias, name=name)


class DepthwiseConv(nn.Module):
    """Depthwise ``k x k`` convolution without bias, as a sum of ``k^2`` shifted products:

    ``y[b, i, j, c] = sum_{u, v < k} xp[b, s i + u, s j + v, c] w[u, v, 0, c]``

    with ``xp`` the zero-padded input and ``s`` the stride. The parameter ``kernel`` has
    the shape ``(k, k, 1, C)`` of ``nn.Conv(C, (k, k), feature_group_count=C)``, so
    checkpoints convert unchanged, and the result is that convolution's up to float
    rounding. Why not the convolution itself: XLA:CPU runs a grouped convolution with one
    channel per group about 20x slower than this elementwise form (which XLA fuses into
    one loop on every backend), and that made EfficientNet about 6x slower on CPU. Every
    operation here is linear in ``x``, so the rescale rule and LRP see a linear layer.
    """

    features: int
    kernel: int
    stride: int = 1
    padding: Tuple[Tuple[int, int], Tuple[int, int]] = ((0, 0), (0, 0))

    @nn.compact
    def __call__(self, x):
        k, s = self.kernel, self.stride
        w = self.param("kernel", nn.initializers.lecun_normal(),
                       (k, k, 1, self.features), jnp.float32)
        w = w.astype(x.dtype)
        xp = jnp.pad(x, ((0, 0), *self.padding, (0, 0)))
        h = (xp.shape[1] - k) // s + 1
        wd = (xp.shape[2] - k) // s + 1
        y = None
        for u in range(k):
            for v in range(k):
                tap = jax.lax.slice(xp, (0, u, v, 0),
                                    (xp.shape[0], u + (h - 1) * s + 1, v + (wd - 1) * s + 1, xp.shape[3]),
                                    (1, s, s, 1)) * w[u, v, 0]
                y = tap if y is None else y + tap
        return y


def batch_norm(eps: float = 1e-5, name: str | None = None) -> nn.BatchNorm:
    """Batch norm in inference mode (running mean/var), PyTorch's default eps 1e-5."""
    return nn.BatchNorm(use_running_average=True, epsilon=eps, name=name)


def _pool_matrix(n: int, m: int) -> np.ndarray:
    """``(m, n)`` averaging weights of PyTorch's adaptive pooling from ``n`` to ``m`` cells."""
    w = np.zeros((m, n), np.float32)
    for i in range(m):
        start, end = (i * n) // m, -((-(i + 1) * n) // m)
        w[i, start:end] = 1.0 / (end - start)
    return w


def adaptive_avg_pool(x: jax.Array, size: Tuple[int, int]) -> jax.Array:
    """``AdaptiveAvgPool2d(size)`` on NHWC ``x``; the identity when the size already matches."""
    (_, h, w, _), (oh, ow) = x.shape, size
    if (h, w) == (oh, ow):
        return x
    ph, pw = _pool_matrix(h, oh), _pool_matrix(w, ow)
    return jnp.einsum("ih,bhwc,jw->bijc", ph, x, pw, precision=jax.lax.Precision.HIGHEST)


class GlobalAvgPool(nn.Module):
    """Mean over the spatial axes: ``(B, H, W, C) -> (B, C)``."""

    @nn.compact
    def __call__(self, x):
        return jnp.mean(x, axis=(1, 2))


def same_padding(n: int, kernel: int, stride: int) -> Tuple[int, int]:
    """TensorFlow's SAME padding ``(before, after)`` of one axis of length ``n``."""
    pad = max((math.ceil(n / stride) - 1) * stride + kernel - n, 0)
    return pad // 2, pad - pad // 2
