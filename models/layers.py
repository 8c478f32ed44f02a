"""Building blocks shared by the zoo, matching PyTorch's inference semantics (NHWC).

* ``conv``: a bias-free (by default) convolution with explicit padding
  ``((p, p), (p, p))`` like ``torch.nn.Conv2d(padding=p)``;
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
         groups: int = 1, bias: bool = False, name: str | None = None) -> nn.Conv:
    """A 2-D convolution; an int ``padding`` pads ``p`` zeros on every side,
    ``((top, bottom), (left, right))`` pads explicitly."""
    pad = ((padding, padding), (padding, padding)) if isinstance(padding, int) else padding
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=pad,
                   feature_group_count=groups, use_bias=bias, name=name)


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
