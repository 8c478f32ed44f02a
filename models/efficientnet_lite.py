"""EfficientNet-Lite0/1/2, the TensorFlow variant (Tan & Le 2019; TF "lite" models).

EfficientNet-B0's inverted-residual blocks without squeeze-excitation, ReLU6
activations, BatchNorm eps 1e-3, TensorFlow "SAME" padding (asymmetric where the
stride needs it, as timm's ``tf_efficientnet_lite*``), and a fixed 32-channel stem
and 1280-channel head. Lite1/Lite2 scale widths (rounded to multiples of 8) and
repeats (``ceil``), except the first and last stage's repeats.

Stages: ``stem``, ``blocks.0`` .. ``blocks.{n-1}`` (aliases ``stage1`` ..
``stage7``: the last block of each stage), ``head_conv`` (1x1 conv to 1280 + BN
+ ReLU6; the default split, 7x7 at 224x224), ``pool`` (global mean), ``fc``.
Inside block N: ``blocks.N.expand`` (after the expand conv's BN + ReLU6; every
block but ``blocks.0``) and ``blocks.N.dw`` (after the depthwise BN + ReLU6).
Blocks with a residual (stride 1, width kept) carry their input after those
channels (:mod:`models.base`); the first block of each stage, and so the last
block ``blocks.{n-1}`` (its head: projection, BN, head conv, BN, ReLU6, pool, fc),
carries nothing.
Preprocessing: the whole image resized to ``size x size`` (bicubic, no crop),
``(v - 0.5) / 0.5`` on [0, 1] pixels.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp

from liftcam_jax.model import Preprocess

from .base import Phase, StagedModel, run_block
from .layers import GlobalAvgPool, batch_norm, conv, same_padding

EPS = 1e-3
STEM = 32  # stem channels, fixed for every variant

# EfficientNet-B0 stages: (expand ratio, kernel, stride, out channels, repeats)
B0_STAGES = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)

# name: (width multiplier, depth multiplier, resolution)
CONFIGS = {
    "efficientnet_lite0": (1.0, 1.0, 224),
    "efficientnet_lite1": (1.0, 1.1, 240),
    "efficientnet_lite2": (1.1, 1.2, 260),
}


def round_channels(channels: int, multiplier: float, divisor: int = 8) -> int:
    """Width scaling of EfficientNet: nearest multiple of 8, never below 90% of the target."""
    v = channels * multiplier
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


def block_specs(width: float, depth: float):
    """Per-stage ``(expand, kernel, stride, out, repeats)`` of a Lite variant."""
    specs = []
    for s, (e, k, st, c, r) in enumerate(B0_STAGES):
        fixed = s in (0, len(B0_STAGES) - 1)
        specs.append((e, k, st, round_channels(c, width), r if fixed else math.ceil(r * depth)))
    return tuple(specs)


def _same(x, kernel: int, stride: int):
    return (same_padding(x.shape[1], kernel, stride), same_padding(x.shape[2], kernel, stride))


class Stem(nn.Module):
    """3x3/2 conv (SAME) to 32 channels, BN, ReLU6."""

    @nn.compact
    def __call__(self, x):
        x = conv(STEM, 3, 2, _same(x, 3, 2), name="conv_stem")(x)
        return nn.relu6(batch_norm(EPS, name="bn0")(x))


class MBConv(nn.Module):
    """Inverted residual: [1x1 expand + BN + ReLU6], depthwise kxk + BN + ReLU6,
    1x1 project + BN, plus the input when the stride is 1 and the width is kept.

    Split points (after each ReLU6): ``expand`` (absent when ``expand == 1``) and
    ``dw``; a residual block carries its input there (see :mod:`models.base`)."""

    in_features: int
    features: int
    kernel: int
    stride: int
    expand: int

    @property
    def points(self):
        return (("expand",) if self.expand != 1 else ()) + ("dw",)

    @property
    def residual(self) -> bool:
        return self.stride == 1 and self.in_features == self.features

    @nn.compact
    def __call__(self, x, start=None, stop=None):
        mid = self.in_features * self.expand
        phases = []
        if self.expand != 1:
            phases.append(Phase("expand", mid, lambda y: nn.relu6(
                batch_norm(EPS, name="bn0")(conv(mid, 1, name="expand_conv")(y)))))

        def depthwise(y):
            y = conv(mid, self.kernel, self.stride, _same(y, self.kernel, self.stride),
                     groups=mid, name="depthwise_conv")(y)
            return nn.relu6(batch_norm(EPS, name="bn1")(y))

        phases.append(Phase("dw", mid, depthwise))
        phases.append(Phase(None, self.features, lambda y: batch_norm(EPS, name="bn2")(
            conv(self.features, 1, name="project_conv")(y))))
        return run_block(phases, x, start, stop, jnp.add if self.residual else None)


class HeadConv(nn.Module):
    """1x1 conv to ``features`` (1280), BN, ReLU6."""

    features: int = 1280

    @nn.compact
    def __call__(self, x):
        x = conv(self.features, 1, name="conv_head")(x)
        return nn.relu6(batch_norm(EPS, name="bn1")(x))


def efficientnet_lite(name: str, num_classes: int = 1000) -> StagedModel:
    """The staged EfficientNet-Lite ``name`` (one of :data:`CONFIGS`)."""
    width, depth, size = CONFIGS[name]
    stages = [("stem", Stem())]
    aliases = {}
    n, cin = 0, STEM
    for s, (e, k, st, c, r) in enumerate(block_specs(width, depth), start=1):
        for j in range(r):
            stages.append((f"blocks.{n}", MBConv(cin, c, k, st if j == 0 else 1, e)))
            n, cin = n + 1, c
        aliases[f"stage{s}"] = f"blocks.{n - 1}"
    stages += [("head_conv", HeadConv(1280)), ("pool", GlobalAvgPool()),
               ("fc", nn.Dense(num_classes))]
    preprocess = Preprocess(size=size, resize="squash", interpolation="bicubic",
                            mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    return StagedModel(name=name, stages=tuple(stages), default_layer="head_conv",
                       preprocess=preprocess, aliases=aliases, num_classes=num_classes)
