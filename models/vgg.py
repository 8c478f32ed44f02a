"""VGG-11/13/16/19, with and without batch norm, as torchvision 0.29 computes them.

Stages: one per convolution ``conv{b}_{i}`` (3x3 pad 1 conv [+ BN] + ReLU),
``pool1``..``pool5`` (2x2/2 max pooling), ``avgpool`` (PyTorch's adaptive
average pooling to 7x7, the identity at 224x224), ``fc6`` (flatten in C,H,W
order + linear + ReLU), ``fc7`` (linear + ReLU), ``fc8`` (logits). Dropout is the
identity (inference). The default split is the last convolution (``conv5_3`` for
VGG-16: 14x14 at 224x224, after the ReLU, before ``pool5``).
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from .base import StagedModel
from .layers import adaptive_avg_pool, batch_norm, conv
from .resnet import TORCHVISION_PREPROCESS

# channels per block; each block ends with a 2x2 max pool (torchvision cfgs A, B, D, E)
CONFIGS = {
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}


class ConvReLU(nn.Module):
    """3x3 conv (pad 1, with bias), optional BN, ReLU."""

    features: int
    bn: bool = False

    @nn.compact
    def __call__(self, x):
        x = conv(self.features, 3, 1, 1, bias=True, name="conv")(x)
        if self.bn:
            x = batch_norm(name="bn")(x)
        return nn.relu(x)


class MaxPool(nn.Module):
    """2x2/2 max pooling (floor mode)."""

    @nn.compact
    def __call__(self, x):
        return nn.max_pool(x, (2, 2), strides=(2, 2))


class AdaptiveAvgPool(nn.Module):
    """``nn.AdaptiveAvgPool2d((7, 7))``."""

    size: tuple = (7, 7)

    @nn.compact
    def __call__(self, x):
        return adaptive_avg_pool(x, self.size)


class Linear(nn.Module):
    """A dense layer, optionally flattening NHWC in PyTorch's C,H,W order first, optional ReLU."""

    features: int
    flatten: bool = False
    relu: bool = True

    @nn.compact
    def __call__(self, x):
        if self.flatten:
            x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
        x = nn.Dense(self.features, name="fc")(x)
        return nn.relu(x) if self.relu else x


def vgg(name: str, num_classes: int = 1000) -> StagedModel:
    """The staged VGG ``name``: ``vgg11`` .. ``vgg19``, ``_bn`` suffix for batch norm."""
    base, bn = name.removesuffix("_bn"), name.endswith("_bn")
    stages = []
    for b, block in enumerate(CONFIGS[base], start=1):
        for i, features in enumerate(block, start=1):
            stages.append((f"conv{b}_{i}", ConvReLU(features, bn)))
        stages.append((f"pool{b}", MaxPool()))
    last_conv = stages[-2][0]
    stages += [
        ("avgpool", AdaptiveAvgPool()),
        ("fc6", Linear(4096, flatten=True)),
        ("fc7", Linear(4096)),
        ("fc8", Linear(num_classes, relu=False)),
    ]
    return StagedModel(name=name, stages=tuple(stages), default_layer=last_conv,
                       preprocess=TORCHVISION_PREPROCESS, num_classes=num_classes)
