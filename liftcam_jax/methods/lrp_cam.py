r"""LRP-CAM: layer-wise relevance of the target logit, summed over each activation map.

One of the baselines of LIFT-CAM (Jung & Oh, "Towards Better Explanations of
Class Activation Mapping", ICCV 2021, arXiv 2102.05228), as in the authors'
code: LRP-epsilon (Bach et al., PLoS ONE 2015; :mod:`liftcam_jax.lrp`) on the
head, starting from the target logit, with :math:`\epsilon = 10^{-9}`; the
coefficient of map ``k`` is its total relevance

.. math::  \phi_k = \sum_{i,j} R_{ijk}, \qquad
           \text{map} = \mathrm{ReLU}\Big(\sum_k \phi_k A^k\Big).

ReLU and dropout pass relevance through; max- and average-pooling follow
Captum's ``EpsilonRule``. For a ``GAP -> Linear`` head LRP-CAM equals LIFT-CAM,
:math:`\phi_k = w_{ck}\,\mathrm{mean}(A^k)` up to the stabiliser: the bias
keeps its own share :math:`b_c\,y_c/\mathrm{stab}(y_c) \approx b_c` of the
starting relevance :math:`y_c`. Deeper heads differ from LIFT-CAM: LRP
explains :math:`y_c` itself, DeepLIFT :math:`y_c(A) - y_c(0)`.

Token activations ``(B, N, D)`` (:mod:`liftcam_jax.tokens`): the relevance is
summed over ALL tokens, so conservation holds over all tokens; the prefix
tokens' part is reported as ``Explanation.prefix_coefficients``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from .. import lrp as _lrp, tokens as _tokens
from ..explanation import Attribution
from .registry import register


def lrp_cam_coefficients(head, params, activations, targets, *, epsilon=_lrp.DEFAULT_EPSILON,
                         per_position: bool = False):
    """LRP-CAM coefficients for one or several targets per image.

    Args:
      head: ``head(params, A) -> (B, C)``.
      activations: ``A``, ``(B, h, w, K)`` maps or ``(B, N, K)`` tokens.
      targets: ``(B,)`` ints, or ``(T, B)`` for ``T`` targets per image.
      per_position: return the relevance per position, shaped like ``A``,
        instead of its sum over positions.

    Returns:
      ``(phi, logits)``: ``phi`` is ``(B, K)`` (or ``(T, B, K)``), the spatial sum
      of the relevance of the target logit at ``A``.
    """
    prop = _lrp.propagate(lambda a: head(params, a), activations, epsilon=epsilon)
    logits = prop.out
    targets = jnp.asarray(targets, jnp.int32)

    def coeffs(t):
        r = prop.relevance(jax.nn.one_hot(t, logits.shape[-1], dtype=logits.dtype) * logits)
        return r if per_position else jnp.sum(r, axis=_tokens.position_axes(r))

    phi = coeffs(targets) if targets.ndim == 1 else jax.vmap(coeffs)(targets)
    return phi, logits


@register("lrp-cam", tokens="all", summary="LRP-CAM: LRP-epsilon relevance of the target logit summed per map (Bach et al. 2015)")
def lrp_cam(split, params, x, activations, targets, logits, *, key=None, epsilon=_lrp.DEFAULT_EPSILON):
    """LRP-CAM: LRP-epsilon relevance of the target logit, summed over each activation map."""
    del logits, key
    r, _ = lrp_cam_coefficients(split.head, params, activations, targets, epsilon=epsilon, per_position=True)
    phi, prefix = _tokens.prefix_share(r, _tokens.resolve(activations, x.shape[1:3], split.tokens))
    return Attribution(phi, prefix_coefficients=prefix)
