r"""Splits of a user's own Flax model (linen or NNX) at a named submodule.

A model :math:`f = h \circ g` is cut at the output of one submodule (a
``layer`` path such as ``"stage2"`` or ``"backbone/layer4"``):

* ``features(params, x)`` runs the model and returns that submodule's output
  :math:`A = g(x)`;
* ``head(params, a)`` runs the model with that output *replaced* by ``a``:
  :math:`h(a)`. The modules before the cut still appear in the traced program
  (they run on a zero input of the model's input shape), but nothing reads
  their values, so under ``jit`` XLA removes them: a jitted head computes only
  the modules after the cut (the library's tests check the compiled HLO).

The cut must separate the network: if the output depends on the input other
than through the layer (a skip connection around it), the head is refused
with a :class:`SplitError` rather than computed on the zero input.

The head needs the model's input shape to build that zero input: it is
remembered from ``features`` calls (per activation shape), or given as
``input_shape=(H, W, C)``.

A submodule called several times (a shared block) is chosen by
``call_index`` (0-based, in call order); without it, it is an error.

Linen modules are intercepted with ``flax.linen.intercept_methods`` (every
``__call__`` of the submodule at the path); NNX modules are merged from
``(graphdef, state)`` (the state is the ``params`` argument) and the
submodule's ``__call__`` is wrapped on the fresh copy.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from .errors import UsageError
from .interpreter import live_equations
from .model import Split

__all__ = ["SplitError", "linen_split", "nnx_split"]


class SplitError(UsageError):
    """A layer path that does not name a submodule called once, or a cut that does not separate."""


def _parse(layer) -> Tuple[str, ...]:
    if isinstance(layer, (tuple, list)):
        return tuple(str(p) for p in layer)
    if not isinstance(layer, str) or not layer.strip("/"):
        raise SplitError(f"layer must be a submodule path such as 'stage2' or 'backbone/layer4', got {layer!r}")
    return tuple(layer.strip("/").split("/"))


def _join(path) -> str:
    return "/".join(str(p) for p in path)


class _Hook:
    """One run of the model: counts the calls at ``path`` and records or replaces the chosen one."""

    def __init__(self, path, call_index, replacement=None):
        self.path, self.call_index, self.replacement = path, call_index, replacement
        self.calls = 0
        self.outputs = []
        self.seen = []  # paths of every submodule called, in order

    def __call__(self, path, run):
        path = tuple(str(p) for p in path)
        if path and path not in self.seen:
            self.seen.append(path)
        if path != self.path:
            return run()
        i, self.calls = self.calls, self.calls + 1
        if self.replacement is not None and (self.call_index is None or i == self.call_index):
            return self.replacement
        out = run()
        self.outputs.append(out)
        return out

    def chosen(self, layer: str):
        if self.calls == 0:
            valid = ", ".join(_join(p) for p in self.seen) or "(none)"
            raise SplitError(f"no submodule {layer!r} is called by the model; valid layers: {valid}")
        if self.call_index is None and self.calls > 1:
            raise SplitError(
                f"submodule {layer!r} is called {self.calls} times; choose one with call_index=0..{self.calls - 1}"
            )
        if self.call_index is not None and not 0 <= self.call_index < self.calls:
            raise SplitError(f"call_index {self.call_index} out of range: {layer!r} is called {self.calls} times")
        return None if self.replacement is not None else self.outputs[self.call_index or 0]


def _split(run: Callable, layer, call_index: Optional[int], input_shape, input_dtype) -> Split:
    """The :class:`Split` of a model given ``run(params, x, hook) -> output``."""
    path = _parse(layer)
    name = _join(path)
    inputs: Dict[Any, Tuple[tuple, Any]] = {}
    checked = set()

    def features(params, x):
        hook = _Hook(path, call_index)
        run(params, x, hook)
        a = hook.chosen(name)
        inputs[(tuple(jnp.shape(a)[1:]), jnp.result_type(a))] = (tuple(jnp.shape(x)[1:]), jnp.result_type(x))
        return a

    def _input(a):
        key = (tuple(jnp.shape(a)[1:]), jnp.result_type(a))
        if input_shape is not None:
            shape, dtype = tuple(input_shape), input_dtype
        elif key in inputs:
            shape, dtype = inputs[key]
        else:
            raise SplitError(
                f"the head of layer {name!r} needs the model's input shape: call features once "
                "for this activation shape, or pass input_shape=(H, W, C)"
            )
        return jax.ShapeDtypeStruct((jnp.shape(a)[0],) + shape, dtype)

    def run_head(params, x, a):
        hook = _Hook(path, call_index, replacement=a)
        out = run(params, x, hook)
        hook.chosen(name)
        return out

    def head(params, a):
        spec = _input(a)
        key = (jax.tree_util.tree_structure(params), spec.shape, spec.dtype, tuple(jnp.shape(a)), jnp.result_type(a))
        if key not in checked:
            _check_separates(run_head, params, spec, a, name)
            checked.add(key)
        return run_head(params, jnp.zeros(spec.shape, spec.dtype), a)

    return Split(features, head)


def _check_separates(run_head, params, spec, a, name):
    """Refuse a head whose output still depends on the model's input (a skip around the cut).

    The head's jaxpr is dead-code eliminated (:func:`liftcam_jax.interpreter.live_equations`,
    which looks inside ``jit`` and ``remat`` bodies): the input is read exactly
    when some output depends on it other than through the replaced layer.
    """
    a_spec = jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a))
    p_spec = jax.tree_util.tree_map(lambda v: jax.ShapeDtypeStruct(jnp.shape(v), jnp.result_type(v)), params)
    jaxpr = jax.make_jaxpr(run_head)(p_spec, spec, a_spec).jaxpr
    _, used = live_equations(jaxpr)
    n_params = len(jax.tree_util.tree_leaves(p_spec))
    if used[n_params]:
        raise SplitError(
            f"the model's output depends on its input other than through layer {name!r} "
            "(a connection around it); choose a layer that cuts the network in two"
        )


# ---------------------------------------------------------------------------
# linen
# ---------------------------------------------------------------------------

def linen_split(module, layer, method=None, *, call_index: Optional[int] = None,
                input_shape: Optional[Sequence[int]] = None, input_dtype=jnp.float32,
                tokens=None, **apply_kwargs) -> Split:
    """Split a ``flax.linen`` module at the output of the submodule at path ``layer``.

    Args:
      module: the (unbound) linen module; ``variables`` (what ``module.init``
        returns, e.g. ``{"params": ..., "batch_stats": ...}``) are the
        ``params`` argument of ``features`` and ``head``.
      layer: ``"name"`` or ``"parent/child"``: the path of names from the root
        (auto-named submodules too, e.g. ``"Bottleneck_15"``). An unknown path
        is a :class:`SplitError` listing the submodules the model calls.
      method: the module's method to run (``module.apply``'s ``method=``).
      call_index: which call of a submodule called several times.
      input_shape: the per-image input shape; default: remembered from
        ``features``.
      tokens: for ``(B, N, D)`` token outputs, their
        :class:`~liftcam_jax.tokens.TokenLayout` (default: inferred).
      **apply_kwargs: passed to ``module.apply`` (e.g. ``train=False``).

    Example::

        split = lj.linen_split(net, "backbone/stage4", train=False)
        e = lj.explainer(split, "lift-cam")(variables, x)
    """
    import flax.linen as nn

    def run(variables, x, hook):
        def interceptor(next_fun, args, kwargs, context):
            if context.method_name != "__call__":
                return next_fun(*args, **kwargs)
            return hook(context.module.path, lambda: next_fun(*args, **kwargs))

        with nn.intercept_methods(interceptor):
            return module.apply(variables, x, method=method, **apply_kwargs)

    return _split(run, layer, call_index, input_shape, input_dtype)._replace(tokens=tokens)


# ---------------------------------------------------------------------------
# NNX
# ---------------------------------------------------------------------------

def nnx_split(model, layer, *, call_index: Optional[int] = None,
              input_shape: Optional[Sequence[int]] = None, input_dtype=jnp.float32,
              tokens=None, **call_kwargs):
    """Split a ``flax.nnx`` module at the output of the submodule at path ``layer``.

    Returns ``(split, state)``: ``state`` (``nnx.split(model)``'s state: the
    parameters and batch statistics) is the ``params`` argument of
    ``features`` and ``head``, so it is an argument of any compiled program.
    ``layer`` is an attribute path (``"backbone/stage4"``, list items by index:
    ``"blocks/3"``); an unknown one is a :class:`SplitError` listing the valid
    ones. Put the model in evaluation mode first (``model.eval()``).
    ``tokens``: for ``(B, N, D)`` token outputs, their
    :class:`~liftcam_jax.tokens.TokenLayout` (default: inferred).
    ``call_kwargs`` are passed to the model's ``__call__``.

    Example::

        split, state = lj.nnx_split(model, "stage4")
        e = lj.explainer(split, "lift-cam")(state, x)
    """
    from flax import nnx

    graphdef, state = nnx.split(model)
    path = _parse(layer)
    valid = [tuple(str(p) for p in p_) for p_, _ in nnx.iter_modules(model) if p_]
    if path not in valid:
        raise SplitError(f"no submodule {_join(path)!r} in the model; valid layers: {', '.join(map(_join, valid))}")

    def run(state, x, hook):
        m = nnx.merge(graphdef, state)
        for p_, sub in nnx.iter_modules(m):
            if tuple(str(q) for q in p_) == path:
                cls = type(sub)
                call = cls.__call__
                sub.__class__ = type(cls.__name__, (cls,), {
                    "__call__": lambda self, *args, **kw: hook(path, lambda: call(self, *args, **kw)),
                })
                break
        return m(x, **call_kwargs)

    return _split(run, layer, call_index, input_shape, input_dtype)._replace(tokens=tokens), state
