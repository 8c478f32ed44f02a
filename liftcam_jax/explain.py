"""Explain a batch: features -> method -> the shared map assembly."""
from __future__ import annotations

import functools
from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp

from . import methods as _methods
from . import tokens as _tokens
from .methods import Method
from . import targets as _targets
from .errors import UsageError
from .explanation import Explanation, from_attribution
from .targets import check_targets
from .model import Split


def explain(split: Split, params, x, targets=None, *, method: Union[str, Method] = "lift-cam", key=None,
            top_k: Optional[int] = None, score=None, **options) -> Explanation:
    """Explain a batch of images with a registered method (its name, or the :class:`~liftcam_jax.methods.Method`).

    Pure and jit-able (``split`` and ``method`` are static; close over them or
    use :func:`explainer`). ``x`` is a preprocessed ``(B, H, W, 3)`` batch.
    ``targets`` says what is explained (:mod:`liftcam_jax.targets`): ``None``
    (the predicted class), one int, ``(B,)`` ints (one class per image),
    ``(B, T)`` ints (``T`` classes per image), or a function ``fn(out)`` of the
    head's output (any pytree) giving ``(B,)`` or ``(B, T)`` scores, such as
    :func:`liftcam_jax.targets.segmentation`. ``top_k=T`` explains the ``T``
    highest-scoring classes of each image; ``score`` scores the classes
    (``"logit"``, the default, or ``"rest"``, :func:`liftcam_jax.targets.rest`).

    With one target per image the :class:`Explanation` has ``maps`` ``(B, H, W)``,
    ``raw`` ``(B, h, w)``, ``coefficients`` ``(B, K)``, ``targets`` ``(B,)``;
    with ``T`` per image (``(B, T)`` targets, ``top_k``, a function giving
    ``(B, T)``) ``(B, T, H, W)``, ``(B, T, h, w)``, ``(B, T, K)``, ``(B, T)``,
    from one pass of ``features`` and of the head: the method runs under
    ``jax.vmap`` over the ``T`` scores, which leaves everything that does not
    depend on the target unbatched (LIFT-CAM's rescale-rule map is built once
    and transposed for ``T`` cotangents; the gradient family's one
    ``jax.vjp`` serves ``T`` cotangents). ``targets`` reports ``-1`` for a
    target function.

    Concrete class targets outside ``[0, C)`` raise
    :class:`~liftcam_jax.errors.UsageError`; traced ones (when this function
    runs under ``jit`` with targets as an argument) cannot be checked, and an
    out-of-range target gives that image NaN maps and coefficients, never a
    blank map.

    Token activations ``(B, N, D)`` (a ViT block's output) are explained on
    their patch grid: the layout is ``split.tokens`` or inferred
    (:mod:`liftcam_jax.tokens`, which also says how each method sees tokens).

    Example::

        exp = explain(model.split, model.params, x)              # LIFT-CAM
        exp = explain(model.split, model.params, x, 285, method="grad-cam")
        exp = explain(model.split, model.params, x, top_k=5)     # maps (B, 5, H, W)
        exp = explain(split, params, x, lambda out: out[:, 3] - out[:, 5])
    """
    m = _methods.resolve(method)
    activations = split.features(params, x)
    logits = split.head(params, activations)
    target = _targets.resolve(targets, logits, top_k=top_k, score=score)
    if m.needs_key:
        if key is None:
            key = jax.random.PRNGKey(0)
        options = dict(options, key=key)
    layout = _tokens.resolve(activations, x.shape[1:3], split.tokens)  # None for (B, h, w, K) maps
    seen_split, seen, layout = _tokens.method_inputs(split, activations, layout, m.tokens)
    if not target.several:
        att = m.fn(seen_split, params, x, seen, target.score(0), logits, **options)
        return from_attribution(seen, att, x.shape[1:3], logits, target, tokens=layout)
    relu = []

    def one(column):  # the activations and the head's output stay unbatched: computed once for all T
        att = m.fn(seen_split, params, x, seen, target.score_of(column), logits, **options)
        relu.append(att.relu)
        return att._replace(relu=None)

    att = jax.vmap(one)(target.columns)
    return from_attribution(seen, att._replace(relu=relu[0]), x.shape[1:3], logits, target, tokens=layout)


def explainer(split: Split, method: Union[str, Method] = "lift-cam", *, target: Optional[Callable] = None,
              top_k: Optional[int] = None, score=None, **options):
    """A ``jax.jit``-compiled ``fn(params, x, targets=None, key=None) -> Explanation``.

    Parameters are arguments of the compiled program, never constants in it.
    ``targets`` at call time are class indices or a target function that is a
    pytree (a :class:`jax.tree_util.Partial`, as the helpers of
    :mod:`liftcam_jax.targets` return: its arrays, a mask or a reference
    embedding, are arguments of the compiled program). A plain Python function
    cannot be a traced argument: give it here, ``target=fn``, where the
    explainer is built. ``top_k`` and ``score`` are :func:`explain`'s.

    Concrete targets are checked before the compiled program runs (the number
    of classes comes from ``jax.eval_shape`` of the model, once per parameter
    and input shapes): out of range is a one-line
    :class:`~liftcam_jax.errors.UsageError`. Targets traced by an enclosing
    ``jit`` cannot be checked; out of range they give NaN maps
    (:func:`explain`). ``fn.lower`` is the compiled function's.
    """
    method = _methods.resolve(method)  # a bad name fails here, once
    fixed = target
    if fixed is not None and not callable(fixed):
        raise UsageError(f"explainer's target= is a function of the model's output; give class indices "
                         f"when calling the explainer, got {fixed!r}")

    @jax.jit
    def compiled(params, x, targets=None, key=None):
        return explain(split, params, x, fixed if targets is None and fixed is not None else targets,
                       method=method, key=key, top_k=top_k, score=score, **options)

    classes = {}

    @functools.wraps(compiled)
    def fn(params, x, targets=None, key=None):
        if fixed is not None and targets is not None:
            raise UsageError("this explainer was built with target=; call it without targets")
        if targets is not None and callable(targets) and not isinstance(targets, jax.tree_util.Partial):
            raise UsageError("a target function passed at call time must be a jax.tree_util.Partial "
                             "(liftcam_jax.targets' helpers are); else build the explainer with target=fn")
        if targets is not None and not callable(targets) and not isinstance(targets, jax.core.Tracer):
            sig = (jax.tree_util.tree_structure(params),
                   tuple((jnp.shape(a), jnp.result_type(a)) for a in jax.tree_util.tree_leaves(params)),
                   jnp.shape(x), jnp.result_type(x))
            if sig not in classes:
                out = jax.eval_shape(lambda p, z: split(p, z), params, x)
                classes[sig] = out.shape[-1] if hasattr(out, "shape") else None  # else: resolve says why
            if classes[sig] is not None:
                check_targets(targets, classes[sig], jnp.shape(x)[0])
        return compiled(params, x, targets, key)

    fn.lower = compiled.lower
    return fn
