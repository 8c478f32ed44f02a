"""The Flax model zoo: torchvision ResNet/VGG, EfficientNet-Lite and timm's ViTs, split at named stages.

Zoo interface used by the ``liftcam-jax`` CLI (see :mod:`liftcam_jax.cli`):

* ``names()``: model names (``resnet18`` ... ``vgg19_bn``, ``efficientnet_lite0`` ... ``efficientnet_lite2``,
  ``vit_tiny_patch16_224`` ... ``vit_base_patch16_224``, ``deit_tiny_distilled_patch16_224``);
* ``get(name) -> StagedModel``: the architecture;
* ``load(name, weights=None, layer=None) -> liftcam_jax.Classifier``;
* ``sample_images()``: the bundled photos; ``class_names()``: ImageNet's 1000 names;
  ``class_ids()``: their WordNet ids.

``models.convert.from_torch(state_dict, model)`` converts PyTorch state dicts (timm's, for the
ViTs) and ``models.convert.to_torch(variables, model)`` writes them back;
``models.checkpoints.load_state_dict(path)`` reads ``.pth``/``.safetensors`` without torch.
"""
from . import convert
from .base import StagedModel, UnknownLayerError
from .zoo import class_ids, class_names, get, load, names, sample_images

__all__ = [
    "StagedModel",
    "UnknownLayerError",
    "class_ids",
    "class_names",
    "convert",
    "get",
    "load",
    "names",
    "sample_images",
]
