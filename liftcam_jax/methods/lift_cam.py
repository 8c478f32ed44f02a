r"""LIFT-CAM and its DeepSHAP generalisation, DeepLIFT-SHAP-CAM.

LIFT-CAM (Jung & Oh, "Towards Better Explanations of Class Activation
Mapping", ICCV 2021, arXiv 2102.05228). With activations ``A = features(x)``
(``K`` maps) and ``y_c = head(A)_c``, the paper's linear explanation model
over the presence of each map makes the maps' SHAP values the right CAM
coefficients. LIFT-CAM estimates them with DeepLIFT's rescale rule on the head,
with the all-zero activations as the reference:

.. math::
    \phi_k = \sum_{i,j} m_{ijk} \, (A_{ijk} - 0), \qquad
    \text{map} = \mathrm{ReLU}\Big(\sum_k \phi_k A^k\Big),

where ``m`` are the DeepLIFT multipliers of ``y_c`` with respect to ``A``
(:mod:`liftcam_jax.rescale`). Summation-to-delta gives
:math:`\sum_k \phi_k = y_c(A) - y_c(0)`. For a head ``GAP -> Linear`` this
is exactly :math:`\phi_k = w_{ck}\,\mathrm{mean}(A^k)`.

DeepLIFT-SHAP-CAM averages the same estimate over several reference
activation tensors :math:`A^{(r)}` (Lundberg & Lee, NeurIPS 2017, DeepSHAP):
:math:`\phi_k = \frac1R \sum_r \sum_{ij} m^{(r)}_{ijk}(A_{ijk} - A^{(r)}_{ijk})`,
so that :math:`\sum_k \phi_k = y_c(A) - \frac1R\sum_r y_c(A^{(r)})`.

Token activations ``(B, N, D)`` (:mod:`liftcam_jax.tokens`): a channel is a
channel of every token, the reference is zero on every token, and
:math:`\phi_k = \sum_n m_{nk} (A_{nk} - A^{ref}_{nk})` sums over ALL tokens,
so summation-to-delta holds over all tokens. The map is
:math:`\mathrm{ReLU}(\sum_k \phi_k A^k_{\mathrm{grid}})` on the grid tokens;
the prefix tokens' part of :math:`\phi_k` (class token, registers) is reported
as ``Explanation.prefix_coefficients``.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from .. import rescale, tokens as _tokens
from ..explanation import Attribution
from ..image import gaussian_blur
from .registry import register


def lift_cam_coefficients(head, params, activations, targets, reference=None, *, eps=rescale.DEFAULT_EPS,
                          per_position: bool = False):
    """LIFT-CAM coefficients ``phi`` for one or several targets per image.

    Args:
      head: ``head(params, A) -> (B, C)``.
      activations: ``A``, ``(B, h, w, K)`` maps or ``(B, N, K)`` tokens.
      targets: ``(B,)`` ints, or ``(T, B)`` for ``T`` targets per image.
      reference: reference activations broadcastable to ``A`` (default zeros).
      per_position: return the contributions ``m * (A - ref)`` per position,
        shaped like ``A``, instead of their sum over positions.

    Returns:
      ``(phi, logits, reference_logits)``: ``phi`` is ``(B, K)`` (or ``(T, B, K)``).
    """
    a = activations
    ref = None if reference is None else jnp.broadcast_to(jnp.asarray(reference, a.dtype), a.shape)
    lin = rescale.linearize(lambda z: head(params, z), a, ref, eps=eps)
    targets = jnp.asarray(targets, jnp.int32)
    classes = lin.out.shape[-1]
    delta = a if ref is None else a - ref

    def coeffs(t):
        m = lin.transpose(jax.nn.one_hot(t, classes, dtype=lin.out.dtype))
        return m * delta if per_position else jnp.sum(m * delta, axis=_tokens.position_axes(delta))

    phi = coeffs(targets) if targets.ndim == 1 else jax.vmap(coeffs)(targets)
    return phi, lin.out, lin.out_ref


@register("lift-cam", tokens="all",
          summary="LIFT-CAM: DeepLIFT (rescale rule) on the head, zero reference (Jung & Oh, ICCV 2021)")
def lift_cam(split, params, x, activations, targets, logits, *, key=None, reference=None, eps=rescale.DEFAULT_EPS):
    """LIFT-CAM: DeepLIFT estimates of the activation maps' SHAP values (Jung & Oh, ICCV 2021)."""
    del logits, key
    c, _, ref_logits = lift_cam_coefficients(split.head, params, activations, targets, reference, eps=eps,
                                             per_position=True)
    phi, prefix = _tokens.prefix_share(c, _tokens.resolve(activations, x.shape[1:3], split.tokens))
    return Attribution(phi, reference_logits=ref_logits, prefix_coefficients=prefix)


DEFAULT_BLUR_SIGMAS = (5.0, 10.0, 20.0)


def blurred_references(split, params, x, sigmas: Sequence[float] = DEFAULT_BLUR_SIGMAS, *, include_zero: bool = True):
    """Reference activations ``(R, B, h, w, K)`` (or ``(R, B, N, D)`` tokens): zeros and the features of blurred copies of ``x``."""
    refs = [split.features(params, gaussian_blur(x, s)) for s in sigmas]
    if include_zero:
        refs = [jnp.zeros_like(refs[0])] + refs
    return jnp.stack(refs)


@register(
    "deeplift-shap-cam", tokens="all",
    summary="DeepLIFT-SHAP-CAM: LIFT-CAM averaged over several reference activations (DeepSHAP)",
)
def deeplift_shap_cam(split, params, x, activations, targets, logits, *, key=None, references=None,
                      sigmas: Sequence[float] = DEFAULT_BLUR_SIGMAS, eps=rescale.DEFAULT_EPS):
    """DeepLIFT-SHAP-CAM: LIFT-CAM averaged over reference activations (Lundberg & Lee, NeurIPS 2017).

    ``references``: ``(R, B, h, w, K)`` or ``(R, h, w, K)`` reference activations
    (e.g. the activations of a background set; ``(R, [B,] N, D)`` for tokens).
    Default: the zero reference and the activations of Gaussian-blurred copies
    of each image (``sigmas`` pixels). ``reference_logits`` is the mean of the
    head over the references. For tokens, the prefix tokens' part of the
    coefficients is reported (``prefix_coefficients``), as for LIFT-CAM.
    """
    del logits, key
    if references is None:
        references = blurred_references(split, params, x, sigmas)
    references = jnp.asarray(references, activations.dtype)
    if references.ndim == activations.ndim:  # (R, h, w, K): shared by the batch
        references = references[:, None]
    references = jnp.broadcast_to(references, (references.shape[0],) + activations.shape)

    layout = _tokens.resolve(activations, x.shape[1:3], split.tokens)

    def one(ref):
        c, _, ref_logits = lift_cam_coefficients(split.head, params, activations, targets, ref, eps=eps,
                                                 per_position=True)
        return _tokens.prefix_share(c, layout), ref_logits

    (phis, prefixes), ref_logits = jax.lax.map(one, references)
    mean = lambda v: None if v is None else jnp.mean(v, axis=0)
    return Attribution(mean(phis), reference_logits=mean(ref_logits), prefix_coefficients=mean(prefixes))
