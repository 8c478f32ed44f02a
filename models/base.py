"""A model as a sequence of named stages, splittable at any boundary.

Each stage is a plain Flax module applied in inference mode. Variables are a
dict ``{stage_name: flax_variables}``; ``features`` runs the stages up to and
including the split stage, ``head`` the rest. Both are pure functions of
``(params, input)``: they jit, vmap, and never close over weights.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from liftcam_jax.errors import UsageError
from liftcam_jax.model import Preprocess, Split


class UnknownLayerError(UsageError):
    """A split point name that the model does not have."""


@dataclasses.dataclass(frozen=True)
class StagedModel:
    """A classifier made of named stages: ``logits = stage_n(...stage_1(x))``.

    ``aliases`` maps friendly split names (e.g. ``"layer3"``) to stage names
    (e.g. ``"layer3.5"``, the last block of layer3). ``default_layer`` is the
    LIFT-CAM authors' split for the family.
    """

    name: str
    stages: Tuple[Tuple[str, nn.Module], ...]
    default_layer: str
    preprocess: Preprocess
    aliases: Mapping[str, str] = dataclasses.field(default_factory=dict)
    num_classes: int = 1000

    # -- names -----------------------------------------------------------
    @property
    def stage_names(self) -> Tuple[str, ...]:
        return tuple(n for n, _ in self.stages)

    @property
    def layers(self) -> Tuple[str, ...]:
        """Every valid split name: stage names, then aliases (the last stage is not a split)."""
        names = list(self.stage_names[:-1])
        names += [a for a in self.aliases if a not in names]
        return tuple(names)

    def resolve(self, layer: str | None) -> str:
        layer = self.default_layer if layer is None else layer
        stage = self.aliases.get(layer, layer)
        if stage not in self.stage_names[:-1]:
            raise UnknownLayerError(
                f"unknown layer {layer!r} for {self.name}; valid layers: {', '.join(self.layers)}"
            )
        return stage

    # -- variables -------------------------------------------------------
    def init(self, key: jax.Array, x: jax.Array | None = None):
        """Random variables ``{stage: variables}`` (shapes from a dummy input)."""
        if x is None:
            s = self.preprocess.size
            x = jnp.zeros((1, s, s, 3), jnp.float32)
        variables = {}
        for i, (name, module) in enumerate(self.stages):
            key, sub = jax.random.split(key)
            v = module.init(sub, x)
            variables[name] = v
            x = module.apply(v, x)
        return variables

    # -- running ---------------------------------------------------------
    def _run(self, params, x, stages: Sequence[Tuple[str, nn.Module]]):
        for name, module in stages:
            x = module.apply(params[name], x)
        return x

    def apply(self, params, x):
        """Logits of the whole model."""
        return self._run(params, x, self.stages)

    __call__ = apply

    def stage_outputs(self, params, x) -> dict:
        """``{stage_name: output}`` for every stage, in order."""
        outs = {}
        for name, module in self.stages:
            x = module.apply(params[name], x)
            outs[name] = x
        return outs

    def split(self, layer: str | None = None) -> Split:
        """``(features, head)`` split after stage ``layer`` (default: the authors' split)."""
        stage = self.resolve(layer)
        i = self.stage_names.index(stage) + 1
        front, back = self.stages[:i], self.stages[i:]

        def features(params, x):
            return self._run(params, x, front)

        def head(params, a):
            return self._run(params, a, back)

        features.__name__ = f"{self.name}_features_to_{stage}"
        head.__name__ = f"{self.name}_head_from_{stage}"
        return Split(features, head)
