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

The score is whatever the target says (:mod:`liftcam_jax.targets`): the
class logit by default, or pytorch-grad-cam's ``ClassifierOutputReST`` with
``score="rest"`` (:func:`liftcam_jax.targets.rest`, the logit minus the
cross-entropy, :math:`s_b = 2 y_t - \mathrm{logsumexp}(y)`), or any function
of the head's output.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from .. import targets as _targets
from ..explanation import Attribution
from .registry import register

SPATIAL = (1, 2)


def shapley_terms(head, params, activations, targets):
    r"""``(g, hvp)``, both shaped like ``A``: :math:`\nabla_A S` and :math:`(\nabla^2_A S) A`.

    ``S = sum_b s_b(head(params, A))`` for the score of ``targets`` (class
    indices, scored by their logit, or a score function,
    :func:`liftcam_jax.targets.as_score`); one ``jax.jvp`` of ``jax.grad(S)``
    at ``A`` with tangent ``A`` gives both (the primal output is the gradient,
    the tangent output the Hessian-vector product).
    """
    score = _targets.as_score(targets)

    def total(z):
        return jnp.sum(score(head(params, z)))

    return jax.jvp(jax.grad(total), (activations,), (activations,))


@register("shapley-cam", summary="ShapleyCAM: gradient minus half the Hessian-vector product, spatially averaged (Cai, arXiv 2501.06261)")
def shapley_cam(split, params, x, activations, targets, logits, *, key=None):
    r"""ShapleyCAM (Cai, arXiv 2501.06261):
    :math:`w_k = \mathrm{mean}_{ij}\big(g - \tfrac12 H A\big)_{ijk}` for the target's score
    (the logit, or ``score="rest"``: logit minus cross-entropy); see the module docstring.
    """
    del x, logits, key
    g, hvp = shapley_terms(split.head, params, activations, targets)
    return Attribution(jnp.mean(g - 0.5 * hvp, axis=SPATIAL))
