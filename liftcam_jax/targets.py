r"""What is explained: a target is a function of the head's output.

A method explains a *score* :math:`s(y)`, one scalar per image, of the head's
output :math:`y = \mathrm{head}(A)` (any pytree, not only ``(B, C)`` logits).
The usual targets are class logits, :math:`s(y) = y_c`; the library takes
any of these as ``targets`` (:func:`liftcam_jax.explain`):

* ``None``: the predicted class, :math:`c_b = \arg\max_c y_{bc}`;
* an int, or ``(B,)`` ints: one class per image;
* ``(B, T)`` ints, or ``top_k=T``: ``T`` classes per image (the ``T`` highest
  logits, in decreasing order), explained in one call;
* a function ``fn(out) -> (B,)`` (or ``(B, T)`` for ``T`` targets per image)
  of the head's output, e.g. the helpers below. Per-call data (a mask, a
  reference embedding) are leaves of a :class:`jax.tree_util.Partial`, so a
  compiled explainer takes a new mask without recompiling.

Class indices are scored by a *class score* ``score(classes) -> fn``:
:func:`class_logit` (the default) or :func:`rest`.

:func:`resolve` normalises all of these, once, into a :class:`Target`: ``T``
score functions ``out -> (B,)`` that the methods consume. Every method
explains the score where it explained the logit: LIFT-CAM is DeepLIFT of
``score o head`` (summation-to-delta then holds for the score:
:math:`\sum_k \phi_k = s(y(A)) - s(y(A_{\mathrm{ref}}))`), the gradient family
differentiates the score, the perturbation methods evaluate it.

Several targets share the work: the methods run under ``jax.vmap`` over the
``T`` score functions with the activations and the head's forward pass
unbatched, so the front runs once, LIFT-CAM's rescale-rule linear map is built
once and transposed for ``T`` cotangents, and the gradient family's one
``jax.vjp`` of the head serves ``T`` cotangents.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from .errors import UsageError, positive_int

Array = Any

__all__ = ["SCORES", "Target", "as_score", "check_targets", "class_indices", "class_logit", "class_score",
           "cosine_similarity", "logit_difference", "per_image", "resolve", "rest", "score_cotangent", "score_multipliers",
           "segmentation"]


# ---------------------------------------------------------------------------
# named targets
# ---------------------------------------------------------------------------

def _classes(c, batch: int):
    """Class indices ``c`` (one int, ``(B,)`` or ``(B, T)``) as int32 with a leading batch axis."""
    c = jnp.asarray(c, jnp.int32)
    return jnp.broadcast_to(c, (batch,)) if c.ndim == 0 else c


def _take(out, c):
    """``out[b, c_b]`` (``c`` ``(B,)``) or ``out[b, c_bt]`` (``c`` ``(B, T)``)."""
    c = _classes(c, out.shape[0])
    if c.ndim == 1:
        return jnp.take_along_axis(out, c[:, None], axis=-1)[:, 0]
    return jnp.take_along_axis(out, c, axis=-1)


def _class_logit(c, out):
    return _take(out, c)


def class_logit(c) -> Partial:
    r"""The logit of class ``c``: :math:`s(y) = y_c`. ``c``: one int, ``(B,)`` or ``(B, T)`` ints."""
    return Partial(_class_logit, jnp.asarray(c, jnp.int32))


def _logit_difference(c, other, out):
    return _take(out, c) - _take(out, other)


def logit_difference(c, other) -> Partial:
    r"""Class ``c`` against class ``other``: :math:`s(y) = y_c - y_{c'}` (what makes ``c`` rather than ``c'``).

    ``c``, ``other``: one int or ``(B,)`` ints each (or ``(B, T)`` both)."""
    return Partial(_logit_difference, jnp.asarray(c, jnp.int32), jnp.asarray(other, jnp.int32))


def _segmentation(c, mask, out):
    b, classes = out.shape[0], out.shape[-1]
    onehot = jax.nn.one_hot(_classes(c, b), classes, dtype=out.dtype)  # (B, C)
    m = jnp.broadcast_to(jnp.asarray(mask, out.dtype), out.shape[:-1])  # (B, h, w)
    return jnp.einsum("bhwc,bhw,bc->b", out, m, onehot)


def segmentation(c, mask) -> Partial:
    r"""A segmentation class over a mask: :math:`s(y) = \sum_{ij} M_{ij}\, y_{ijc}`.

    For a segmentation head whose output is ``(B, h, w, C)`` per-pixel logits
    (pytorch-grad-cam's ``SemanticSegmentationTarget``). ``c``: one int or
    ``(B,)``; ``mask``: ``(h, w)`` or ``(B, h, w)`` weights (a 0/1 mask or soft),
    at the head's output resolution. Linear in ``y``: DeepLIFT of it is exact.
    """
    return Partial(_segmentation, jnp.asarray(c, jnp.int32), jnp.asarray(mask))


def _cosine_similarity(reference, out):
    r = jnp.broadcast_to(jnp.asarray(reference, out.dtype), out.shape)
    dot = jnp.sum(out * r, axis=-1)
    return dot / (jnp.linalg.norm(out, axis=-1) * jnp.linalg.norm(r, axis=-1))


def cosine_similarity(reference) -> Partial:
    r"""Similarity of an embedding to a reference embedding: :math:`s(y) = \frac{y \cdot e}{\|y\|\,\|e\|}`.

    For a head whose output is an embedding ``(B, D)`` (pytorch-grad-cam's
    ``SimilarityToConceptTarget``); ``reference``: ``(D,)`` or ``(B, D)``. The
    gradient family explains it as is; LIFT-CAM takes it through the rescale
    rules for products and quotients of two input-dependent values
    (:mod:`liftcam_jax.rescale_rules`), with summation-to-delta exact.
    """
    return Partial(_cosine_similarity, jnp.asarray(reference))


def _rest(c, out):
    lse = jax.nn.logsumexp(out, axis=-1)
    y = _take(out, c)
    return 2.0 * y - (lse if y.ndim == 1 else lse[:, None])


def rest(c) -> Partial:
    r"""ShapleyCAM's ReST score: the logit minus the cross-entropy of class ``c``.

    .. math::  s(y) = y_c - \big(\log\textstyle\sum_{c'} e^{y_{c'}} - y_c\big) = 2 y_c - \mathrm{LSE}(y)

    (Cai et al., "CAMs as Shapley Value-based Explainers", 2025;
    pytorch-grad-cam's ``ClassifierOutputReST``). ``c``: one int, ``(B,)`` or
    ``(B, T)``. LIFT-CAM takes the log-sum-exp with its max shift shared by
    the input and the reference (:mod:`liftcam_jax.rescale_rules`), so
    summation-to-delta holds for the ReST value.
    """
    return Partial(_rest, jnp.asarray(c, jnp.int32))


SCORES = {"logit": class_logit, "rest": rest}
"""Class scores by name (the CLI's ``--score``): ``score(classes) -> fn(out)``."""


def class_score(score: Union[None, str, Callable]) -> Callable:
    """``None`` -> :func:`class_logit`; a name in :data:`SCORES`; or a callable ``score(classes) -> fn`` as it is."""
    if score is None:
        return class_logit
    if isinstance(score, str):
        try:
            return SCORES[score]
        except KeyError:
            raise UsageError(f"unknown score {score!r}; valid scores: {', '.join(SCORES)}") from None
    if not callable(score):
        raise UsageError(f"score must be a name ({', '.join(SCORES)}) or a function of the classes, got {score!r}")
    return score


def class_indices(score) -> Optional[Array]:
    """The classes of a :func:`class_logit` score (its logit is what it explains), else ``None``."""
    if isinstance(score, Partial) and score.func is _class_logit:
        return score.args[0]
    return None


_OF_CLASSES = (_class_logit, _rest)  # the scores of SCORES: f(classes, out)


def per_image(score) -> Optional[Callable]:
    """``cut(i) -> score of image i alone`` for a named class score (:data:`SCORES`), else ``None``.

    A score of one class per image, :func:`class_logit` or :func:`rest` of ``(B,)`` classes
    (or one int), explains image ``b`` by the same function of class ``c_b``: what an
    image-by-image computation (:func:`liftcam_jax.shap.permutation_shapley`) needs."""
    if not (isinstance(score, Partial) and score.func in _OF_CLASSES and not score.keywords):
        return None
    c = score.args[0]
    if c.ndim > 1:
        return None
    return lambda i: Partial(score.func, c if c.ndim == 0 else c[i][None])


def as_score(targets) -> Callable:
    """A score function ``out -> (B,)``: ``targets`` as it is when callable, else :func:`class_logit` of them."""
    return targets if callable(targets) else class_logit(targets)


# ---------------------------------------------------------------------------
# DeepLIFT and gradients of a score
# ---------------------------------------------------------------------------

def _one_hot(c, out):
    """``one_hot(c)`` shaped like the ``(B, C)`` logits ``out``: the gradient of :func:`class_logit`."""
    return jax.nn.one_hot(_classes(c, out.shape[0]), out.shape[-1], dtype=out.dtype)


def score_cotangent(score: Callable, out) -> Array:
    r"""The gradient :math:`\partial \sum_b s_b(y) / \partial y` (a pytree like ``out``).

    The cotangent that one ``jax.vjp`` of the head turns into :math:`\partial s / \partial A`
    (chain rule); for :func:`class_logit` it is ``one_hot(c)``."""
    c = class_indices(score)
    if c is not None:
        return _one_hot(c, out)
    s, vjp = jax.vjp(score, out)
    (ct,) = vjp(jnp.ones_like(s))
    return ct


def score_multipliers(score: Callable, out, out_ref, *, eps: Optional[float] = None) -> Array:
    r"""The DeepLIFT multipliers of the score with respect to the head's output, between ``out_ref`` and ``out``.

    DeepLIFT's multipliers compose by the chain rule (Shrikumar et al., ICML
    2017, §3.3), so DeepLIFT of ``score o head`` is the head's rescale-rule
    map transposed at these; for a linear score (:func:`class_logit`,
    :func:`logit_difference`, :func:`segmentation`) they are its gradient."""
    from . import rescale

    c = class_indices(score)
    if c is not None:  # a logit: linear, its multipliers are its gradient
        return _one_hot(c, out)
    kw = {} if eps is None else {"eps": eps}
    # a score the user chose may end in a log-softmax (ReST): it is what is explained, not a softmax to refuse
    lin = rescale.linearize(score, out, out_ref, allow_softmax_output=True, **kw)
    return lin.transpose(jnp.ones_like(lin.out))


def chosen(score) -> bool:
    """Whether ``score`` is a function the user chose (anything but a class logit): the head's output may then
    end in a softmax, which the score reads (DeepLIFT and LRP refuse a softmax at the output only when the
    logits of a class are explained)."""
    return callable(score) and class_indices(score) is None


# ---------------------------------------------------------------------------
# normalisation
# ---------------------------------------------------------------------------

class Target(NamedTuple):
    """Targets normalised for the methods (:func:`resolve`).

    Attributes:
      columns: a pytree whose leaves have a leading ``T`` axis; ``score_of`` of
        its ``t``-th slice is the ``t``-th score function.
      score_of: ``column -> (out -> (B,))``.
      classes: ``(B, T)`` int32 class indices, ``-1`` for a target that is a function.
      valid: ``(B, T)`` bool: ``False`` for a traced class index outside ``[0, C)``
        (that image's maps are NaN, never blank).
      several: whether the explanation keeps the ``T`` axis (``(B, T)`` targets,
        ``top_k``, or a function giving ``(B, T)``); else ``T == 1`` and the
        shapes are one target's.
    """

    columns: Any
    score_of: Callable
    classes: Array
    valid: Array
    several: bool

    @property
    def count(self) -> int:
        return int(jax.tree_util.tree_leaves(self.columns)[0].shape[0])

    def score(self, t: int = 0) -> Callable:
        """The ``t``-th score function ``out -> (B,)``."""
        return self.score_of(jax.tree_util.tree_map(lambda c: c[t], self.columns))

    def reported(self) -> Array:
        """``Explanation.targets``: ``(B,)``, or ``(B, T)`` with several targets."""
        return self.classes if self.several else self.classes[:, 0]


def check_targets(targets, classes: int, batch: int) -> None:
    """Raise a one-line :class:`UsageError` for concrete targets that cannot be explained.

    Targets must be integers in ``[0, classes)``: one int, one per image
    ``(B,)``, or ``T`` per image ``(B, T)``; a function is checked where it is
    used. Traced targets (inside ``jit``) cannot be checked here; out of range,
    they give NaN maps (see :func:`liftcam_jax.explanation.from_attribution`).
    """
    if targets is None or callable(targets) or isinstance(targets, jax.core.Tracer):
        return
    try:
        concrete = np.asarray(targets)
    except Exception:  # noqa: BLE001 - not concrete: nothing to check
        return
    if concrete.dtype.kind not in "iu":
        raise UsageError(f"targets must be integers or a function of the model's output, got {concrete.dtype}")
    if concrete.ndim > 2 or (concrete.ndim >= 1 and concrete.shape[0] != batch) or 0 in concrete.shape:
        raise UsageError(f"targets must be one int, one per image ({batch},) or several per image ({batch}, T), "
                         f"got shape {concrete.shape}")
    bad = concrete[(concrete < 0) | (concrete >= classes)]
    if bad.size:
        raise UsageError(f"target index {int(bad.flat[0])} out of range for {classes} classes (valid: 0..{classes - 1})")


def _logits_shape(out, what: str):
    if not hasattr(out, "shape") or len(out.shape) != 2:
        shape = getattr(out, "shape", type(out).__name__)
        raise UsageError(f"{what} needs a head that returns (B, C) logits, this one returns {shape}; "
                         "pass a target function of its output (liftcam_jax.targets)")
    return out.shape


def _column(s, t):
    return jnp.take(s, t, axis=1)


def resolve(targets, out, *, top_k: Optional[int] = None, score=None) -> Target:
    """Normalise ``targets`` (see the module doc) at the head's output ``out`` into a :class:`Target`.

    ``score`` scores class indices (``None``/``"logit"``, ``"rest"`` or a
    callable ``classes -> fn``); it and ``top_k`` do not combine with a
    function target. A :class:`UsageError` for what cannot be explained.
    """
    if callable(targets):
        if top_k is not None or score is not None:
            raise UsageError("top_k and score pick classes; a target function already says what to explain")
        value = jax.eval_shape(targets, out)
        batch = jax.tree_util.tree_leaves(out)[0].shape[0]
        if not hasattr(value, "shape") or value.ndim not in (1, 2) or value.shape[0] != batch:
            raise UsageError(f"a target function must give one score per image ({batch},) or several "
                             f"({batch}, T), got {getattr(value, 'shape', type(value).__name__)}")
        count = 1 if value.ndim == 1 else value.shape[1]
        if value.ndim == 1:
            score_of = lambda t: targets  # noqa: E731
        else:
            score_of = lambda t: (lambda o: _column(targets(o), t))  # noqa: E731
        minus = jnp.full((batch, count), -1, jnp.int32)
        return Target(jnp.arange(count), score_of, minus, jnp.ones((batch, count), bool), value.ndim == 2)
    maker = class_score(score)
    what = "top_k" if top_k is not None else "a class target"
    batch, classes = _logits_shape(out, what)
    if top_k is not None:
        if targets is not None:
            raise UsageError("give targets or top_k, not both")
        k = positive_int("top_k", top_k)
        if k > classes:
            raise UsageError(f"top_k={k} is more than the {classes} classes")
        c = jax.lax.top_k(jax.lax.stop_gradient(out), k)[1].astype(jnp.int32)
        several = True
    elif targets is None:
        c = jnp.argmax(out, axis=-1).astype(jnp.int32)[:, None]
        several = False
    else:
        check_targets(targets, classes, batch)
        t = jnp.asarray(targets, jnp.int32)
        several = t.ndim == 2
        c = t if several else jnp.broadcast_to(t, (batch,))[:, None]
    valid = (c >= 0) & (c < classes)
    return Target(c.T, maker, c, valid, several)
