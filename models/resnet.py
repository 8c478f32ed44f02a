"""ResNet-18/34/50/101/152 as torchvision 0.29 computes them (He et al. 2016, v1.5).

Stages: ``stem`` (conv 7x7/2 + BN + ReLU), ``maxpool`` (3x3/2, padding 1 with
-inf), one stage per residual block ``layer{i}.{j}``, ``avgpool`` (global mean)
and ``fc`` (logits). Aliases ``layer1``..``layer4`` name the last block of each
layer; the default split is ``layer4`` (7x7 at 224x224). Bottlenecks put the
stride on the 3x3 convolution (v1.5). Submodules carry torchvision's names.
"""
from __future__ import annotations

import flax.linen as nn

from liftcam_jax.model import Preprocess

from .base import StagedModel
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


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`` with 3x3 convs."""

    features: int
    stride: int = 1
    downsample: bool = False

    @nn.compact
    def __call__(self, x):
        y = conv(self.features, 3, self.stride, 1, name="conv1")(x)
        y = nn.relu(batch_norm(name="bn1")(y))
        y = conv(self.features, 3, 1, 1, name="conv2")(y)
        y = batch_norm(name="bn2")(y)
        if self.downsample:
            x = conv(self.features, 1, self.stride, name="downsample_conv")(x)
            x = batch_norm(name="downsample_bn")(x)
        return nn.relu(y + x)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided, v1.5) -> 1x1 (4x wider), plus the shortcut, then ReLU."""

    features: int
    stride: int = 1
    downsample: bool = False

    @nn.compact
    def __call__(self, x):
        y = conv(self.features, 1, name="conv1")(x)
        y = nn.relu(batch_norm(name="bn1")(y))
        y = conv(self.features, 3, self.stride, 1, name="conv2")(y)
        y = nn.relu(batch_norm(name="bn2")(y))
        y = conv(self.features * 4, 1, name="conv3")(y)
        y = batch_norm(name="bn3")(y)
        if self.downsample:
            x = conv(self.features * 4, 1, self.stride, name="downsample_conv")(x)
            x = batch_norm(name="downsample_bn")(x)
        return nn.relu(y + x)


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
