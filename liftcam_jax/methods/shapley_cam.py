r"""ShapleyCAM: a second-order Taylor estimate of the channels' Shapley values, as pytorch-grad-cam 1.5.7 defines it.

Cai, "CAMs as Shapley Value-based Explainers", arXiv 2501.06261 (2025). With
activations ``A`` ``(B, h, w, K)`` at the split, a per-image score
``s_b = score(head(A)_b, t_b)`` of the explained class ``t_b`` and
``S = \sum_b s_b``, the channel weights are

.. math::  w_k = \frac{1}{hw} \sum_{ij} \Big( g_{ijk} - \tfrac12 (H A)_{ijk} \Big),
           \qquad g = \nabla_A S, \quad H = \nabla^2_A S,

and the map is :math:`\mathrm{ReLU}(\sum_k w_k A^k)` (the shared assembly).
The paper reads the second-order Taylor expansion of the score around ``A``
as a game over the positions' activations; ``g - H A / 2`` is the
expansion's estimate of each activation's Shapley value divided by the
activation, and its spatial mean is the channel weight. pytorch-grad-cam
(``ShapleyCAM.get_cam_weights``) computes the Hessian-vector product as
``torch.autograd.grad(grads, activations, grad_outputs=activations)``, i.e.
``H A`` with the activations themselves as the vector (``H`` is symmetric),
averages ``grads - 0.5 * hvp`` over the positions, and applies no ReLU to
the weights; so does this module.

Here ``(g, H A)`` come from ONE ``jax.jvp`` of ``jax.grad(S)`` at ``A``
along ``A`` (forward-over-reverse), per batch, not per image: the head treats
images independently, so the Hessian of ``S`` is block diagonal over the
batch and one product serves every image exactly.

On a piecewise-linear head (ReLU, max-pooling, linear layers) with the logit
score, ``H = 0`` almost everywhere and ShapleyCAM is Grad-CAM.

Scores (the ``score`` option; a callable ``score(out, targets) -> (B,)`` is
taken as well):

* ``"logit"`` (default): ``s_b = y_{b, t_b}``.
* ``"rest"``: pytorch-grad-cam's ``ClassifierOutputReST``, the logit minus
  the cross-entropy, :math:`s_b = y_{t} - \mathrm{CE}(y, t)
  = y_{t} + \log \mathrm{softmax}(y)_{t} = 2 y_t - \mathrm{logsumexp}(y)`.
"""
from __future__ import annotations

from typing import Callable, Union

import jax
import jax.numpy as jnp

from ..errors import UsageError
from ..explanation import Attribution
from .registry import register

SPATIAL = (1, 2)


def logit_score(out, targets):
    r"""``(B,)``: the logit of each image's target, :math:`y_{b, t_b}` (a one-hot product: an
    out-of-range traced target scores 0 and is masked to NaN by the assembly)."""
    return jnp.sum(out * jax.nn.one_hot(targets, out.shape[-1], dtype=out.dtype), axis=-1)


def rest_score(out, targets):
    r"""``(B,)``: pytorch-grad-cam's ReST score (``ClassifierOutputReST``, Cai 2025), the logit
    minus the cross-entropy: :math:`y_t - (\mathrm{logsumexp}(y) - y_t)`."""
    logit = logit_score(out, targets)
    return 2.0 * logit - jax.nn.logsumexp(out, axis=-1)


SCORES = {"logit": logit_score, "rest": rest_score}


def resolve_score(score: Union[str, Callable]) -> Callable:
    """A score function: a callable as it is, or one of :data:`SCORES` by name (:class:`UsageError` otherwise)."""
    if callable(score):
        return score
    try:
        return SCORES[score]
    except (KeyError, TypeError):
        raise UsageError(f"unknown score {score!r}; valid scores: {', '.join(SCORES)}") from None


def shapley_terms(head, params, activations, targets, score: Union[str, Callable] = "logit"):
    r"""``(g, hvp)``, both ``(B, h, w, K)``: :math:`\nabla_A S` and :math:`(\nabla^2_A S) A`.

    ``S = sum_b score(head(params, A), targets)_b``; one ``jax.jvp`` of
    ``jax.grad(S)`` at ``A`` with tangent ``A`` gives both (the primal output is
    the gradient, the tangent output the Hessian-vector product).
    """
    fn = resolve_score(score)

    def total(z):
        return jnp.sum(fn(head(params, z), targets))

    return jax.jvp(jax.grad(total), (activations,), (activations,))


@register("shapley-cam", summary="ShapleyCAM: gradient minus half the Hessian-vector product, spatially averaged (Cai, arXiv 2501.06261)")
def shapley_cam(split, params, x, activations, targets, logits, *, key=None, score: Union[str, Callable] = "logit"):
    r"""ShapleyCAM (Cai, arXiv 2501.06261):
    :math:`w_k = \mathrm{mean}_{ij}\big(g - \tfrac12 H A\big)_{ijk}` for the ``score``
    ``"logit"`` (default) or ``"rest"`` (logit minus cross-entropy); see the module docstring.
    """
    del x, logits, key
    g, hvp = shapley_terms(split.head, params, activations, targets, score)
    return Attribution(jnp.mean(g - 0.5 * hvp, axis=SPATIAL))
