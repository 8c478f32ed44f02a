"""ResNet-18/34/50/101/152 as torchvision 0.29 computes them (He et al. 2016, v1.5).

Stages: ``stem`` (conv 7x7/2 + BN + ReLU), ``maxpool`` (3x3/2, padding 1 with
-inf), one stage per residual block ``layer{i}.{j}``, ``avgpool`` (global mean)
and ``fc`` (logits). Aliases ``layer1``..``layer4`` name the last block of each
layer; the default split is ``layer4`` (7x7 at 224x224). Bottlenecks put the
stride on the 3x3 convolution (v1.5). Submodules carry torchvision's names.
Inside blocks, after each inner ReLU: ``layer{i}.{j}.relu1`` (basic blocks and
bottlenecks) and ``layer{i}.{j}.relu2`` (bottlenecks); the block's shortcut is
carried after the activation's channels (:mod:`models.base`): the block input at
a bottleneck's ``relu1`` (before the stride), the shortcut's output (the input,
or its 1x1 projection) at ``relu2`` and at a basic block's ``relu1``.
"""
from __future__ import annotations

import flax.linen as nn

from liftcam_jax.model import Preprocess

from .base import Phase, StagedModel, run_block
from .layers import GlobalAvgPool, batch_norm, conv

TORCHVISION_PREPROCESS = Preprocess(size=224, resize="shorter_crop", resize_to=256,
                                    interpolation="bilinear")

# name: (block, blocks per layer)
CONFIGS = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
    "resnet152": ("bottleneck", (3, 8, 36, 3)),
}


class Stem(nn.Module):
    """``conv1`` 7x7/2 pad 3, ``bn1``, ReLU."""

    @nn.compact
    def __call__(self, x):
        x = conv(64, 7, 2, 3, name="conv1")(x)
        return nn.relu(batch_norm(name="bn1")(x))


class MaxPool(nn.Module):
    """3x3/2 max pooling, padding 1 (padded cells are -inf, as in PyTorch)."""

    @nn.compact
    def __call__(self, x):
        return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


class _Block(nn.Module):
    """The shortcut of a residual block: the identity, or ``downsample_bn(downsample_conv(x))``
    (1x1, strided) where the block changes the width or the resolution."""

    def shortcut(self, out: int):
        if not self.downsample:
            return lambda x: x
        return lambda x: batch_norm(name="downsample_bn")(
            conv(out, 1, self.stride, name="downsample_conv")(x))


def _add_relu(y, s):
    return nn.relu(y + s)


class BasicBlock(_Block):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`` with 3x3 convs.

    Split point ``relu1`` (after ``bn1``'s ReLU, at the output resolution); it
    carries the shortcut's output (see :mod:`models.base`)."""

    features: int
    stride: int = 1
    downsample: bool = False
    points = ("relu1",)

    @nn.compact
    def __call__(self, x, start=None, stop=None):
        f = self.features
        return run_block([
            Phase("relu1", f, lambda y: nn.relu(batch_norm(name="bn1")(
                conv(f, 3, self.stride, 1, name="conv1")(y))), self.shortcut(f)),
            Phase(None, f, lambda y: batch_norm(name="bn2")(conv(f, 3, 1, 1, name="conv2")(y))),
        ], x, start, stop, _add_relu)


class Bottleneck(_Block):
    """1x1 -> 3x3 (strided, v1.5) -> 1x1 (4x wider), plus the shortcut, then ReLU.

    Split points ``relu1`` (after ``bn1``'s ReLU, at the input resolution; carries
    the block input) and ``relu2`` (after ``bn2``'s ReLU, at the output resolution;
    carries the shortcut's output), see :mod:`models.base`."""

    features: int
    stride: int = 1
    downsample: bool = False
    points = ("relu1", "relu2")

    @nn.compact
    def __call__(self, x, start=None, stop=None):
        f = self.features
        return run_block([
            Phase("relu1", f, lambda y: nn.relu(batch_norm(name="bn1")(conv(f, 1, name="conv1")(y)))),
            Phase("relu2", f, lambda y: nn.relu(batch_norm(name="bn2")(
                conv(f, 3, self.stride, 1, name="conv2")(y))), self.shortcut(4 * f)),
            Phase(None, 4 * f, lambda y: batch_norm(name="bn3")(conv(4 * f, 1, name="conv3")(y))),
        ], x, start, stop, _add_relu)


def resnet(name: str, num_classes: int = 1000) -> StagedModel:
    """The staged ResNet ``name`` (one of :data:`CONFIGS`)."""
    kind, depths = CONFIGS[name]
    block, expansion = (BasicBlock, 1) if kind == "basic" else (Bottleneck, 4)
    stages = [("stem", Stem()), ("maxpool", MaxPool())]
    aliases = {}
    channels = 64
    for i, (features, depth) in enumerate(zip((64, 128, 256, 512), depths), start=1):
        for j in range(depth):
            stride = 2 if (i > 1 and j == 0) else 1
            downsample = j == 0 and (stride != 1 or channels != features * expansion)
            stages.append((f"layer{i}.{j}", block(features, stride, downsample)))
            channels = features * expansion
        aliases[f"layer{i}"] = f"layer{i}.{depth - 1}"
    stages += [("avgpool", GlobalAvgPool()), ("fc", nn.Dense(num_classes))]
    return StagedModel(name=name, stages=tuple(stages), default_layer="layer4",
                       preprocess=TORCHVISION_PREPROCESS, aliases=aliases,
                       num_classes=num_classes)
