"""A model as a sequence of named stages, splittable at any boundary, and inside blocks.

Each stage is a plain Flax module applied in inference mode. Variables are a
dict ``{stage_name: flax_variables}``; ``features`` runs the stages up to and
including the split stage, ``head`` the rest. Both are pure functions of
``(params, input)``: they jit, vmap, and never close over weights.

**Inside a block.** A stage module may name inner split *points* (``points``,
e.g. ``("expand", "dw")`` for an inverted residual block, ``("relu1", "relu2")``
for a bottleneck), each right after an activation; the layer
``"<stage>.<point>"`` splits there. Such a module is a :class:`Phase` list run
by :func:`run_block`, and is called as ``module.apply(v, x, start=, stop=)``.
A block with a residual connection needs its shortcut after the split, and
``head(params, A)`` sees nothing but ``A``: so ``features`` *carries* the
shortcut, ``A = concat([inner activation, shortcut], axis=-1)``, the inner
activation's channels first, and the head takes it apart again. Both halves
stay exact (``head(features(x)) == f(x)``) and the carried channels are maps
like any other: an explanation at such a point attributes the class score to
the inner activation *and* to the shortcut stream, both of which the rest of
the block reads. Blocks without a shortcut carry nothing.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from liftcam_jax.errors import UsageError
from liftcam_jax.model import Preprocess, Split
from liftcam_jax.tokens import TokenLayout


class UnknownLayerError(UsageError):
    """A split point name that the model does not have."""


def _identity(x):
    return x


@dataclasses.dataclass(frozen=True)
class Phase:
    """A stretch of a block's main path, ending at split point ``point`` (``None``: the
    block's end, before the merge with the shortcut).

    ``main`` maps the main path's value on; ``shortcut`` maps the carried shortcut
    alongside (a projection where the block has one; the identity elsewhere), so the
    carried tensor has the main path's resolution at every point. ``channels``: the
    main path's channels at ``point``.
    """

    point: Optional[str]
    channels: int
    main: Callable
    shortcut: Callable = _identity


def run_block(phases: Sequence[Phase], x, start: Optional[str], stop: Optional[str],
              merge: Optional[Callable] = None):
    """Run ``phases`` from point ``start`` (``None``: the block input) to point ``stop``
    (``None``: the block output).

    ``merge(y, s)`` ends a block with a shortcut ``s`` (e.g. ``y + s``, ``relu(y + s)``);
    ``merge=None`` is a block without one. At an inner point the value is the main path,
    or ``concat([main, shortcut], -1)`` when there is a shortcut (see the module doc).
    """
    points = [p.point for p in phases[:-1]]
    for name in (start, stop):
        if name is not None and name not in points:
            raise ValueError(f"no split point {name!r} in this block (points: {', '.join(points)})")
    i = 0 if start is None else points.index(start) + 1
    j = len(phases) - 1 if stop is None else points.index(stop)
    if i > j:
        raise ValueError(f"split point {start!r} comes after {stop!r}")
    if start is None:
        y, s = x, (x if merge is not None else None)
    elif merge is not None:
        k = phases[i - 1].channels
        y, s = x[..., :k], x[..., k:]
    else:
        y, s = x, None
    for phase in phases[i:j + 1]:
        y = phase.main(y)
        if s is not None:
            s = phase.shortcut(s)
    if stop is not None:
        return y if s is None else jnp.concatenate([y, s], axis=-1)
    return y if merge is None else merge(y, s)


@dataclasses.dataclass(frozen=True)
class StagedModel:
    """A classifier made of named stages: ``logits = stage_n(...stage_1(x))``.

    ``aliases`` maps friendly split names (e.g. ``"layer3"``) to stage names
    (e.g. ``"layer3.5"``, the last block of layer3). ``default_layer`` is the
    LIFT-CAM authors' split for the family.

    ``tokens``: for a model whose activations are tokens ``(B, N, D)`` at every split (the
    ViTs), their layout ``(prefix, (h, w))``: ``prefix`` tokens (class, distillation) first,
    then an ``h x w`` patch grid in row-major order, ``N = prefix + h w``; ``None`` for models
    with ``(B, h, w, C)`` activations.
    """

    name: str
    stages: Tuple[Tuple[str, nn.Module], ...]
    default_layer: str
    preprocess: Preprocess
    aliases: Mapping[str, str] = dataclasses.field(default_factory=dict)
    num_classes: int = 1000
    tokens: Optional[Tuple[int, Tuple[int, int]]] = None

    # -- names -----------------------------------------------------------
    @property
    def stage_names(self) -> Tuple[str, ...]:
        return tuple(n for n, _ in self.stages)

    def inner_layers(self) -> dict:
        """``{"<stage>.<point>": (stage, point)}`` for the split points inside blocks, in order."""
        return {f"{name}.{p}": (name, p) for name, module in self.stages[:-1]
                for p in getattr(module, "points", ())}

    @property
    def layers(self) -> Tuple[str, ...]:
        """Every valid split name: stage names with the points inside each block just before
        it, then aliases (the last stage is not a split)."""
        inner = self.inner_layers()
        names = []
        for stage in self.stage_names[:-1]:
            names += [n for n, (s, _) in inner.items() if s == stage] + [stage]
        names += [a for a in self.aliases if a not in names]
        return tuple(names)

    def resolve(self, layer: str | None) -> str:
        """The canonical split name: a stage name, or ``"<stage>.<point>"`` inside a block."""
        layer = self.default_layer if layer is None else layer
        stage = self.aliases.get(layer, layer)
        if stage not in self.stage_names[:-1] and stage not in self.inner_layers():
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
        """``(features, head)`` split after stage ``layer``, or at a point inside a block
        (default: the authors' split)."""
        canonical = self.resolve(layer)
        stage, point = self.inner_layers().get(canonical, (canonical, None))
        i = self.stage_names.index(stage) + 1
        if point is None:
            front, back, cut = self.stages[:i], self.stages[i:], None
        else:
            front, back, cut = self.stages[:i - 1], self.stages[i:], self.stages[i - 1]

        def features(params, x):
            x = self._run(params, x, front)
            if cut is not None:
                x = cut[1].apply(params[cut[0]], x, stop=point)
            return x

        def head(params, a):
            if cut is not None:
                a = cut[1].apply(params[cut[0]], a, start=point)
            return self._run(params, a, back)

        features.__name__ = f"{self.name}_features_to_{canonical}"
        head.__name__ = f"{self.name}_head_from_{canonical}"
        return Split(features, head, None if self.tokens is None else TokenLayout(*self.tokens))
