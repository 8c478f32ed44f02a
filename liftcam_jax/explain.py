"""Explain a batch: features -> method -> the shared map assembly."""
from __future__ import annotations

import functools
from typing import Union

import jax
import jax.numpy as jnp

from . import methods as _methods
from . import tokens as _tokens
from .methods import Method
from .explanation import Explanation, check_targets, from_attribution, resolve_targets
from .model import Split


def explain(split: Split, params, x, targets=None, *, method: Union[str, Method] = "lift-cam", key=None,
            **options) -> Explanation:
    """Explain a batch of images with a registered method (its name, or the :class:`~liftcam_jax.methods.Method`).

    Pure and jit-able (``split`` and ``method`` are static; close over them or
    use :func:`explainer`). ``x`` is a preprocessed ``(B, H, W, 3)`` batch;
    ``targets`` is ``None`` (the predicted class), one int, or ``(B,)`` ints,
    so every image in a batch may have its own target. Concrete targets outside
    ``[0, C)`` raise :class:`~liftcam_jax.errors.UsageError`; traced ones (when
    this function runs under ``jit`` with targets as an argument) cannot be
    checked, and an out-of-range target gives that image NaN maps and
    coefficients, never a blank map.

    Token activations ``(B, N, D)`` (a ViT block's output) are explained on
    their patch grid: the layout is ``split.tokens`` or inferred
    (:mod:`liftcam_jax.tokens`, which also says how each method sees tokens).

    Example::

        exp = explain(model.split, model.params, x)              # LIFT-CAM
        exp = explain(model.split, model.params, x, 285, method="grad-cam")
    """
    m = _methods.resolve(method)
    activations = split.features(params, x)
    logits = split.head(params, activations)
    targets = resolve_targets(targets, logits)
    if m.needs_key:
        if key is None:
            key = jax.random.PRNGKey(0)
        options = dict(options, key=key)
    layout = _tokens.resolve(activations, x.shape[1:3], split.tokens)  # None for (B, h, w, K) maps
    seen_split, seen, layout = _tokens.method_inputs(split, activations, layout, m.tokens)
    att = m.fn(seen_split, params, x, seen, targets, logits, **options)
    return from_attribution(seen, att, x.shape[1:3], logits, targets, tokens=layout)


def explainer(split: Split, method: Union[str, Method] = "lift-cam", **options):
    """A ``jax.jit``-compiled ``fn(params, x, targets=None, key=None) -> Explanation``.

    Parameters are arguments of the compiled program, never constants in it.
    Concrete targets are checked before the compiled program runs (the number
    of classes comes from ``jax.eval_shape`` of the model, once per parameter
    and input shapes): out of range is a one-line
    :class:`~liftcam_jax.errors.UsageError`. Targets traced by an enclosing
    ``jit`` cannot be checked; out of range they give NaN maps
    (:func:`explain`). ``fn.lower`` is the compiled function's.
    """
    method = _methods.resolve(method)  # a bad name fails here, once

    @jax.jit
    def compiled(params, x, targets=None, key=None):
        return explain(split, params, x, targets, method=method, key=key, **options)

    classes = {}

    @functools.wraps(compiled)
    def fn(params, x, targets=None, key=None):
        if targets is not None and not isinstance(targets, jax.core.Tracer):
            sig = (jax.tree_util.tree_structure(params),
                   tuple((jnp.shape(a), jnp.result_type(a)) for a in jax.tree_util.tree_leaves(params)),
                   jnp.shape(x), jnp.result_type(x))
            if sig not in classes:
                classes[sig] = jax.eval_shape(lambda p, z: split(p, z), params, x).shape[-1]
            check_targets(targets, classes[sig], jnp.shape(x)[0])
        return compiled(params, x, targets, key)

    fn.lower = compiled.lower
    return fn
