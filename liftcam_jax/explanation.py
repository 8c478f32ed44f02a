r"""The one explanation object and the one map assembly shared by every method.

A CAM method returns channel weights ``w`` (``(B, K)``, or ``(B, h, w, K)`` for
methods that weight each position); the map is assembled the same way for all::

    raw  = ReLU( sum_k w_k * A^k + bias )             # (B, h, w), feature resolution
    up   = bilinear upsample of raw to the input size  # half-pixel centres
    map  = (up - min(up)) / (max(up) - min(up))        # per image; a constant map -> 0

(Zhou et al., CVPR 2016, "Learning Deep Features for Discriminative
Localization"; Selvaraju et al., ICCV 2017, Grad-CAM; Jung & Oh, ICCV 2021,
LIFT-CAM.) Bilinear upsampling with half-pixel centres is PyTorch's
``F.interpolate(mode="bilinear", align_corners=False)`` and OpenCV's
``cv2.resize(INTER_LINEAR)``, which the reference implementations use.

Token activations ``(B, N, D)`` (:mod:`liftcam_jax.tokens`): the map is drawn
on the grid tokens, ``A^k`` = the grid tokens reshaped to ``(B, h, w, D)``;
the prefix tokens (class, distillation, registers) are left out of the map, and
their share of the coefficients is reported (``prefix_coefficients``).
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from .errors import UsageError
from .targets import Target, check_targets, resolve  # noqa: F401  (check_targets: its old home)
from .tokens import TokenLayout, prefix_share, to_grid

Array = Any


class Explanation(NamedTuple):
    """What every method returns, for a batch of ``B`` images.

    Attributes:
      maps: ``(B, H, W)`` normalised saliency in [0, 1] at the input resolution.
      raw: ``(B, h, w)`` the map before upsampling and normalisation.
      coefficients: ``(B, K)`` channel coefficients (for LIFT-CAM, the DeepLIFT
        estimates of the activation maps' SHAP values); for methods that weight
        each position, the spatial sum of ``w * A`` per channel.
      logits: ``(B, C)`` the model's logits (the head's output, any pytree).
      targets: ``(B,)`` the explained class per image (``-1`` for a target
        function, :mod:`liftcam_jax.targets`).
      reference_logits: ``(B, C)`` the head's logits at the reference
        activations (LIFT-CAM: ``y(0)``), or ``None`` for methods without one.
      prefix_coefficients: for token activations, ``(B, K)`` the prefix
        tokens' part of ``coefficients`` (methods that sum over every token:
        LIFT-CAM, DeepLIFT-SHAP-CAM, LRP-CAM), so that ``coefficients -
        prefix_coefficients`` is the grid tokens' part; summation-to-delta holds
        for ``coefficients``, over all tokens. ``None`` for ``(B, h, w, K)``
        maps and for methods without such a split (:mod:`liftcam_jax.tokens`).

    With ``T`` targets per image (``(B, T)`` targets, ``top_k``, a function
    giving ``(B, T)``), ``maps``, ``raw``, ``coefficients``, ``targets`` and
    ``prefix_coefficients`` are ``(B, T, H, W)``, ``(B, T, h, w)``,
    ``(B, T, K)``, ``(B, T)`` and ``(B, T, K)``.
    """

    maps: Array
    raw: Array
    coefficients: Array
    logits: Array
    targets: Array
    reference_logits: Optional[Array] = None
    prefix_coefficients: Optional[Array] = None


class Attribution(NamedTuple):
    """What a method computes before assembly.

    Attributes:
      weights: ``(B, K)`` channel weights or ``(B, h, w, K)`` per-position weights.
      coefficients: ``(B, K)`` to report; defaults to ``weights`` when 2-D, else
        the spatial sum of ``weights * A``.
      reference_logits: ``(B, C)`` or ``None``.
      bias: ``(B,)`` added to the weighted sum before the ReLU, or ``None``.
      relu: whether the assembled map is rectified (a Python bool).
      prefix_coefficients: ``(B, K)`` the prefix tokens' part of the
        coefficients, or ``None`` (see :class:`Explanation`).
    """

    weights: Array
    coefficients: Optional[Array] = None
    reference_logits: Optional[Array] = None
    bias: Optional[Array] = None
    relu: bool = True
    prefix_coefficients: Optional[Array] = None


def weighted_sum(activations: Array, weights: Array, bias: Optional[Array] = None) -> Array:
    """``sum_k w_k A^k`` (+ bias) for channel or per-position weights -> ``(B, h, w)``."""
    if weights.ndim == 2:
        raw = jnp.einsum("bhwk,bk->bhw", activations, weights.astype(activations.dtype))
    else:
        raw = jnp.sum(activations * weights.astype(activations.dtype), axis=-1)
    if bias is not None:
        raw = raw + jnp.reshape(bias, (-1, 1, 1))
    return raw


def upsample(raw: Array, size) -> Array:
    """Bilinear ``(B, h, w) -> (B, H, W)`` with half-pixel centres (``align_corners=False``)."""
    h, w = int(size[0]), int(size[1])
    if raw.shape[1:] == (h, w):
        return raw
    return jax.image.resize(raw, (raw.shape[0], h, w), method="bilinear", antialias=False)


def normalize(maps: Array) -> Array:
    """Per-image min-max to [0, 1]; a constant map becomes all zeros."""
    lo = jnp.min(maps, axis=(1, 2), keepdims=True)
    hi = jnp.max(maps, axis=(1, 2), keepdims=True)
    span = hi - lo
    return jnp.where(span > 0, (maps - lo) / jnp.where(span > 0, span, 1.0), 0.0)


def assemble(activations: Array, weights: Array, size, *, bias: Optional[Array] = None, relu: bool = True):
    """The shared map assembly: ``(maps, raw)`` from activations and weights.

    Args:
      activations: ``(B, h, w, K)``.
      weights: ``(B, K)`` or ``(B, h, w, K)``.
      size: ``(H, W)`` of the input.
    """
    raw = weighted_sum(activations, weights, bias)
    if relu:
        raw = jax.nn.relu(raw)
    return normalize(upsample(raw, size)), raw


def resolve_targets(targets, logits: Array) -> Array:
    """``None`` -> predicted class; an int -> that class for every image; ``(B,)`` or ``(B, T)`` ints as they are.

    Concrete targets are checked against the number of classes
    (:func:`liftcam_jax.targets.check_targets`); :func:`liftcam_jax.targets.resolve`
    is the whole normalisation (functions, ``top_k``).
    """
    return resolve(targets, logits).reported()


def from_attribution(activations: Array, att: Attribution, size, logits: Array, targets, *,
                     tokens: Optional[TokenLayout] = None) -> Explanation:
    """Assemble an :class:`Explanation` from a method's :class:`Attribution`.

    ``targets``: the :class:`~liftcam_jax.targets.Target` explained (or ``(B,)``
    class indices). With several targets, ``att``'s arrays carry a leading
    ``T`` axis (the method ran under ``jax.vmap`` over the targets; its
    ``reference_logits`` are the same for all of them) and the maps, raw maps
    and coefficients come out ``(B, T, ...)``.

    ``tokens``: the layout of ``(B, N, D)`` token activations; the map is drawn
    on the grid tokens (:func:`liftcam_jax.tokens.to_grid` of the activations,
    and of per-position weights). Per-position weights without reported
    coefficients give ``coefficients = sum over all tokens of w * A`` and its
    prefix part.

    An image whose target is not a class index (``t < 0`` or ``t >= C``, only
    possible for targets traced under ``jit``; concrete ones are refused
    earlier) gets NaN maps, raw map and coefficients: a one-hot of such a
    target is all zeros, which would otherwise give a blank map silently.
    """
    if isinstance(targets, Target):
        valid, reported = targets.valid, targets.reported()
        if targets.several:
            ref = None if att.reference_logits is None else jax.tree_util.tree_map(lambda r: r[0],
                                                                                    att.reference_logits)
            one = lambda w, c, bias, p: _assemble_one(  # noqa: E731
                activations, Attribution(w, c, None, bias, att.relu, p), size, tokens)
            maps, raw, coeffs, prefix = jax.vmap(one)(att.weights, att.coefficients, att.bias,
                                                      att.prefix_coefficients)
            move = lambda a: jnp.moveaxis(a, 0, 1)  # noqa: E731  (T, B, ...) -> (B, T, ...)
            nan_unless = lambda a: jnp.where(valid.reshape(valid.shape + (1,) * (a.ndim - 2)), a, jnp.nan)  # noqa: E731
            return Explanation(nan_unless(move(maps)), nan_unless(move(raw)), nan_unless(move(coeffs)), logits,
                               reported, ref, None if prefix is None else nan_unless(move(prefix)))
        valid = valid[:, 0]
    else:
        reported = targets
        valid = (targets >= 0) & (targets < logits.shape[-1])
    maps, raw, coeffs, prefix = _assemble_one(activations, att, size, tokens)
    nan_unless = lambda a: jnp.where(valid.reshape((-1,) + (1,) * (a.ndim - 1)), a, jnp.nan)
    return Explanation(nan_unless(maps), nan_unless(raw), nan_unless(coeffs), logits, reported,
                       att.reference_logits, None if prefix is None else nan_unless(prefix))


def _assemble_one(activations: Array, att: Attribution, size, tokens: Optional[TokenLayout] = None):
    """``(maps, raw, coefficients, prefix_coefficients)`` of one target's :class:`Attribution`."""
    grid, weights = activations, att.weights
    if tokens is not None:
        grid = to_grid(activations, tokens)
        weights = to_grid(weights, tokens) if weights.ndim == activations.ndim else weights
    maps, raw = assemble(grid, weights, size, bias=att.bias, relu=att.relu)
    coeffs, prefix = att.coefficients, att.prefix_coefficients
    if coeffs is None:
        if att.weights.ndim == 2:
            coeffs = att.weights
        else:
            coeffs, share = prefix_share(att.weights * activations, tokens)
            prefix = share if prefix is None else prefix
    return maps, raw, coeffs, prefix
