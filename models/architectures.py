"""The zoo's architectures by name: :func:`names` and :func:`get` (a :class:`StagedModel`, no weights).

The one registry of names -> builders; :mod:`models.zoo` (weights, classes,
``load``) and :mod:`models.convert` (PyTorch state dicts, which accept a name
for a model) both read it, so neither imports the other to find a model.
"""
from __future__ import annotations

import functools
from typing import Callable, Dict, List

from liftcam_jax.errors import UsageError

from .base import StagedModel
from .efficientnet_lite import CONFIGS as _LITE
from .efficientnet_lite import efficientnet_lite
from .resnet import CONFIGS as _RESNETS
from .resnet import resnet
from .vgg import CONFIGS as _VGGS
from .vgg import vgg
from .vit import CONFIGS as _VITS
from .vit import vit

__all__ = ["get", "names"]

_BUILDERS: Dict[str, Callable[[str], StagedModel]] = {}
_BUILDERS.update({n: resnet for n in _RESNETS})
for _n in _VGGS:
    _BUILDERS[_n] = _BUILDERS[f"{_n}_bn"] = vgg
_BUILDERS.update({n: efficientnet_lite for n in _LITE})
_BUILDERS.update({n: vit for n in _VITS})


def names() -> List[str]:
    """Every model name the zoo knows."""
    return list(_BUILDERS)


@functools.lru_cache(maxsize=None)
def get(name: str) -> StagedModel:
    """The architecture ``name`` as a :class:`StagedModel` (no weights)."""
    if name not in _BUILDERS:
        raise UsageError(f"unknown model {name!r}; valid models: {', '.join(names())}")
    return _BUILDERS[name](name)
