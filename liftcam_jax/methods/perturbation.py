r"""Perturbation CAMs: Score-CAM and Ablation-CAM, one forward per channel.

Both evaluate the network once per activation channel ``k`` (512 for VGG16,
2048 for ResNet-50), for every image of the batch at once (Score-CAM skips the
channels whose map is constant, see :func:`score_cam`). The channels are
processed ``chunk_size`` at a time (``jax.lax.map`` over batched chunks), so at
most ``chunk_size * B`` perturbed inputs are alive at once. The result does not
depend on ``chunk_size``.

``channels`` (a static sequence of channel indices) restricts the evaluation
to a subset; channels outside it get weight 0 (for Ablation-CAM that is what
pytorch-grad-cam gives a channel it skips, ``(y - y)/y``; for Score-CAM the
softmax runs over the subset only). Both options are ordinary keyword
options of :func:`liftcam_jax.explain`.

Token activations ``(B, N, D)`` (:mod:`liftcam_jax.tokens`): Score-CAM's
masks are the grid tokens' maps (the prefix tokens have no place in the
image); Ablation-CAM ablates a channel on every token, prefix tokens included,
as pytorch-grad-cam's ``AblationLayerVit`` does (a channel is removed from the
head's input, whichever token carries it).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .. import targets as _targets
from ..errors import UsageError
from .. import tokens as _tokens
from ..explanation import Attribution, normalize, upsample
from .cams import _chunk
from .registry import register

DEFAULT_CHUNK = 32


def _channels(channels, k: int) -> np.ndarray:
    """The channel subset as a concrete int array (all ``k`` channels for ``None``)."""
    if channels is None:
        return np.arange(k)
    try:
        idx = np.asarray(channels)
    except Exception:
        idx = None
    if idx is None or idx.dtype == object or idx.ndim != 1 or idx.size == 0 or idx.dtype.kind not in "iu":
        raise UsageError(f"channels must be a non-empty sequence of channel indices (0..{k - 1}), got {channels!r}")
    if idx.min() < 0 or idx.max() >= k:
        raise UsageError(f"channel index {int(idx.max() if idx.max() >= k else idx.min())} out of range for {k} channels")
    if np.unique(idx).size != idx.size:
        raise UsageError("channels must not repeat")
    return idx.astype(np.int32)


def _rows(tree, n: int, b: int):
    """Leaves ``(n * b, ...)`` -> ``(n, b, ...)``."""
    return jax.tree_util.tree_map(lambda v: v.reshape((n, b) + v.shape[1:]), tree)


def _scatter(values, idx: np.ndarray, k: int):
    """``(B, n)`` values of the channels ``idx`` -> ``(B, k)``, zeros elsewhere."""
    if idx.size == k and np.array_equal(idx, np.arange(k)):
        return values
    return jnp.zeros(values.shape[:1] + (k,), values.dtype).at[:, idx].set(values)


def score_cam_mask(maps, size):
    """Score-CAM masks ``(B, H, W)`` of activation maps ``(B, h, w)``: upsampled (half-pixel
    bilinear, :func:`liftcam_jax.explanation.upsample`) and min-max normalised per image
    (:func:`liftcam_jax.explanation.normalize`; a constant map gives a zero mask)."""
    return normalize(upsample(maps, size))


def _masked_scores(split, params, x, maps, alive, score, chunk_size: int):
    """Score-CAM's forward passes: the target's score of ``x`` masked by each map ``(B, n, h, w)``, ``(B, n)``.

    Slot j of image i is its j-th channel, the non-constant ones (``alive``) first; a call scores
    ``chunk_size`` slots of every image (``chunk_size * B`` masked images, one batch of ``B`` per slot,
    as the score reads them), and the calls past the largest count of non-constant maps are skipped.
    The scores of constant maps are zeros here (the caller has their one score).
    """
    b, n, h, w = maps.shape
    calls = -(-n // chunk_size)
    order = jnp.argsort(jnp.logical_not(alive), axis=1, stable=True)  # (B, n)
    order = jnp.concatenate([order, jnp.zeros((b, calls * chunk_size - n), order.dtype)], axis=1)
    n_alive = jnp.max(jnp.sum(alive, axis=1))
    rows = jnp.arange(b)

    def call(c):  # the masks are made per call: memory ~ chunk_size * B images
        slots = jax.lax.dynamic_slice_in_dim(order, c * chunk_size, chunk_size, axis=1).T  # (chunk, B)

        def forward(slots):
            m = score_cam_mask(maps[rows[None, :], slots].reshape(-1, h, w), x.shape[1:3])  # (chunk * B, H, W)
            xs = jnp.broadcast_to(x[None], (chunk_size,) + x.shape).reshape((-1,) + x.shape[1:])
            out = _rows(split(params, xs * m[..., None].astype(x.dtype)), chunk_size, b)
            return jax.vmap(score)(out).astype(x.dtype)  # (chunk, B)

        return jax.lax.cond(c * chunk_size < n_alive, forward, lambda s: jnp.zeros(s.shape, x.dtype), slots)

    scores = jax.lax.map(call, jnp.arange(calls))  # (calls, chunk, B)
    scores = jnp.moveaxis(scores.reshape(calls * chunk_size, b), 0, 1)[:, :n]  # (B, n) by slot
    return jnp.zeros((b, n), scores.dtype).at[rows[:, None], order[:, :n]].set(scores)


@register("score-cam", tokens="all", summary="Score-CAM: softmax of the target logits of the input masked by each activation map (Wang et al., CVPRW 2020)")
def score_cam(split, params, x, activations, targets, logits, *, key=None, chunk_size: int = DEFAULT_CHUNK,
              channels=None):
    r"""Score-CAM (Wang, Wang, Du, Yang, Zhang, Ding, Mardziel & Hu, "Score-CAM:
    Score-Weighted Visual Explanations for Convolutional Neural Networks",
    CVPR Workshops 2020, arXiv 1910.01279).

    Each activation map is upsampled to the input size and min-max
    normalised, :math:`H^k = s(\mathrm{Up}(A^k)) \in [0, 1]`; the whole model
    scores the masked input :math:`X \circ H^k`, and the channel weights are
    the softmax over channels of these target logits, as in pytorch-grad-cam:

    .. math::  w_k = \frac{\exp f^c(X \circ H^k)}{\sum_{k'} \exp f^c(X \circ H^{k'})}.

    (The paper's increase of confidence ``f^c(X \circ H^k) - f^c(X_b)`` over a
    baseline ``X_b`` subtracts the same number from every channel, which the
    softmax ignores.) Cost: ``K`` forward passes of the full model per image
    (``split.features`` then ``split.head``), ``chunk_size`` channels at a time.

    A constant activation map (a dead channel, or one saturated at ReLU6's 6)
    carries no spatial information: its mask is all zeros, so the masked input is
    the all-zero image for every such channel of every image. Its score is
    computed once, by one forward pass of that image, and the other forward passes
    run on the non-constant maps only: each image's channels are sorted with the
    non-constant ones first, a forward pass scores ``chunk_size`` of these slots
    of every image (the target's score reads a batch of ``B`` outputs), and the
    chunks past the largest count of non-constant maps of an image are skipped
    (``lax.cond`` inside ``lax.map``; under an outer ``vmap`` whose axis reaches
    the predicate the cond becomes a select and nothing is skipped; a ``vmap``
    over several targets leaves it, and the forward passes, unbatched).
    The target's score (:mod:`liftcam_jax.targets`) stands for the logit
    :math:`f^c` wherever a target is given as a function. Pretrained networks have many such channels:
    about 45% of EfficientNet-Lite0's 1280 ``head_conv`` maps on ImageNet photos.

    Deliberate differences from pytorch-grad-cam 1.5.7: it upsamples the maps
    with ``torch.nn.UpsamplingBilinear2d``, i.e. ``align_corners=True``; the
    library has one upsampling, half-pixel centres (``align_corners=False``,
    as the Score-CAM authors' code and every map assembly here use). Its
    normalisation divides by ``max - min + 1e-8``; here by ``max - min``
    exactly, and a map that is constant before upsampling gives a zero mask
    (pytorch-grad-cam's upsampling of a constant non-zero map can leave
    rounding noise that its normalisation stretches to [0, 1]).
    """
    del logits, key
    chunk_size = _chunk(chunk_size)
    layout = _tokens.resolve(activations, x.shape[1:3], split.tokens)
    if layout is not None:  # the grid tokens' maps; split(params, x) is the whole model
        activations = _tokens.to_grid(activations, layout)
    score = _targets.as_score(targets)
    b, k = activations.shape[0], activations.shape[3]
    idx = _channels(channels, k)
    maps = jnp.moveaxis(activations[..., idx], 3, 1)  # (B, n, h, w)
    alive = jnp.max(maps, axis=(2, 3)) > jnp.min(maps, axis=(2, 3))  # (B, n)
    # Every constant map masks the input to zeros: one forward pass scores them all.
    zero_out = jax.tree_util.tree_map(lambda v: jnp.broadcast_to(v, (b,) + v.shape[1:]),
                                      split(params, jnp.zeros_like(x[:1])))
    zero_score = score(zero_out)  # (B,)
    scores = _masked_scores(split, params, x, maps, alive, score, chunk_size)
    scores = jnp.where(alive, scores, zero_score[:, None].astype(scores.dtype))
    weights = jax.nn.softmax(scores, axis=-1)
    return Attribution(_scatter(weights, idx, k))


ABLATION_OFFSET = 1e7  # pytorch-grad-cam's ABLATION_VALUE


def ablation_values(activations):
    """Per image, the value an ablated channel takes (pytorch-grad-cam's ``AblationLayer``):
    0 when the image's smallest activation is 0 (post-ReLU layers), else
    ``min(A) - 1e7`` (the minimum over every position and channel: all tokens for tokens)."""
    amin = jnp.min(activations, axis=tuple(range(1, jnp.ndim(activations))))
    return jnp.where(amin == 0, jnp.zeros_like(amin), amin - ABLATION_OFFSET)


@register("ablation-cam", tokens="all", summary="Ablation-CAM: relative drop of the target logit when a channel is ablated (Desai & Ramaswamy, WACV 2020)")
def ablation_cam(split, params, x, activations, targets, logits, *, key=None, chunk_size: int = DEFAULT_CHUNK,
                 channels=None, ablation_value=None):
    r"""Ablation-CAM (Desai & Ramaswamy, "Ablation-CAM: Visual Explanations for
    Deep Convolutional Network via Gradient-free Localization", WACV 2020).

    With :math:`y^c` the target logit and :math:`y^c_k` the head's target logit
    on the activations with channel ``k`` ablated,

    .. math::  w_k = \frac{y^c - y^c_k}{y^c}.

    Only the head runs on the ablated activations (``K`` head passes per
    image, ``chunk_size`` channels at a time). The ablated channel is set to
    :func:`ablation_values` (pytorch-grad-cam's rule: 0 for post-ReLU
    activations whose minimum is 0, else ``min(A) - 1e7``), or to
    ``ablation_value`` if given.

    Deliberate difference from pytorch-grad-cam 1.5.7: when ``min(A) != 0``
    its ``AblationLayer`` recomputes ``min`` over the batch of ablated copies
    while writing into it, so the k-th copy of a chunk gets
    ``min(A) - k * 1e7`` (the value depends on the channel's position in the
    chunk); here every channel gets the same value. For the usual post-ReLU
    split points (``min(A) = 0``) the two agree.
    """
    del x, key
    chunk_size = _chunk(chunk_size)
    a = activations
    k = a.shape[-1]
    idx = _channels(channels, k)
    if ablation_value is None:
        value = ablation_values(a)
    else:
        value = jnp.broadcast_to(jnp.asarray(ablation_value, a.dtype), a.shape[:1])
    value = value.astype(a.dtype).reshape((-1,) + (1,) * (a.ndim - 1))
    score = _targets.as_score(targets)
    original = score(logits)
    channel = jnp.arange(k)

    def ablated_score(c):
        return score(split.head(params, jnp.where(channel == c, value, a)))  # (B,)

    scores = jax.lax.map(ablated_score, jnp.asarray(idx), batch_size=chunk_size)  # (n, B)
    weights = (original[:, None] - scores.T) / original[:, None]
    return Attribution(_scatter(weights, idx, k))
