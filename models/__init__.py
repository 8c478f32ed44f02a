"""The Flax model zoo: torchvision ResNet/VGG and EfficientNet-Lite, split at named stages.

Zoo interface used by the ``liftcam-jax`` CLI (see :mod:`liftcam_jax.cli`):

* ``names()``: model names (``resnet18`` ... ``vgg19_bn``, ``efficientnet_lite0``);
* ``get(name) -> StagedModel``: the architecture;
* ``load(name, weights=None, layer=None) -> liftcam_jax.Classifier``;
* ``sample_images()``: the bundled photos.
"""
from .base import StagedModel, UnknownLayerError

__all__ = ["StagedModel", "UnknownLayerError"]
