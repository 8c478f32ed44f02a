"""Explain a batch: features -> method -> the shared map assembly."""
from __future__ import annotations

import functools

import jax

from . import methods as _methods
from .explanation import Explanation, from_attribution, resolve_targets
from .model import Split


def explain(split: Split, params, x, targets=None, *, method: str = "lift-cam", key=None, **options) -> Explanation:
    """Explain a batch of images with a registered method.

    Pure and jit-able (``split`` and ``method`` are static; close over them or
    use :func:`explainer`). ``x`` is a preprocessed ``(B, H, W, 3)`` batch;
    ``targets`` is ``None`` (the predicted class), one int, or ``(B,)`` ints,
    so every image in a batch may have its own target.

    Example::

        exp = explain(model.split, model.params, x)              # LIFT-CAM
        exp = explain(model.split, model.params, x, 285, method="grad-cam")
    """
    m = _methods.get(method)
    activations = split.features(params, x)
    logits = split.head(params, activations)
    targets = resolve_targets(targets, logits)
    if m.needs_key:
        if key is None:
            key = jax.random.PRNGKey(0)
        options = dict(options, key=key)
    att = m.fn(split, params, x, activations, targets, logits, **options)
    return from_attribution(activations, att, x.shape[1:3], logits, targets)


def explainer(split: Split, method: str = "lift-cam", **options):
    """A ``jax.jit``-compiled ``fn(params, x, targets=None, key=None) -> Explanation``.

    Parameters are arguments of the compiled program, never constants in it.
    """
    _methods.get(method)  # fail early on a bad name

    @jax.jit
    def fn(params, x, targets=None, key=None):
        return explain(split, params, x, targets, method=method, key=key, **options)

    return fn
