r"""Evaluating saliency maps: faithfulness, localisation, and SHAP agreement.

Every metric is a pure, batched, jit-compiled function. ``model`` is a pure
``model(params, x) -> logits (B, C)`` (a :class:`liftcam_jax.Split` will do)
and is a static argument; ``params`` are always arguments. Inputs ``x`` are the
*preprocessed* model inputs ``(B, H, W, 3)``, ``maps`` the explanations at the
input resolution ``(B, H, W)`` in [0, 1] (``Explanation.maps``), ``targets``
``(B,)`` int class indices. Per-image values are returned; aggregate them with
:func:`mean_ci`.

**Faithfulness**

* :func:`confidence_change` -- Average Drop % and Increase in Confidence %
  (Chattopadhay et al., "Grad-CAM++", WACV 2018). With ``Y_i`` the softmax
  score of the target on image ``i`` and ``O_i`` the score on the image
  multiplied by its map,

  .. math::
      \mathrm{AD} = \frac{100}{N}\sum_i \frac{\max(0, Y_i - O_i)}{Y_i}, \qquad
      \mathrm{IC} = \frac{100}{N}\sum_i \mathbb{1}[O_i > Y_i].

  The map (at the input resolution, broadcast over the channels) multiplies the
  **preprocessed** input, as in the LIFT-CAM and Score-CAM authors' code: a
  zero-saliency pixel becomes 0 in normalised space, i.e. the dataset's mean
  colour, not black.

* :func:`deletion` and :func:`insertion` -- the causal metrics of RISE
  (Petsiuk et al., BMVC 2018). Pixels are sorted by decreasing saliency, ties
  broken by the lower flat index (``tie_break="raster"``, a stable sort: the
  default, so earlier results reproduce) or in a random order fixed by a key
  (``tie_break="random"``; see :func:`saliency_rank`). After ``n_s`` pixels
  (``n_s = min(s * step, H W)``, ``s = 0 .. ceil(HW / step)``) the top-``n_s``
  pixels are replaced: deletion turns the image into a *substrate* (zeros of the
  normalised input, as in RISE's code, or the image's per-channel mean),
  insertion turns a blurred copy back into the image. The curve is the softmax
  probability of the target after each step, and

  .. math::  \mathrm{AUC} = \int_0^1 p(f)\,df

  by the trapezoid rule over the *fraction* ``f_s = n_s / HW`` of pixels
  changed (so a last partial step counts for its real width). Lower deletion
  and higher insertion AUC are better. The settings (steps, substrate, blur,
  tie-break) are one :class:`CurveConfig`. The insertion start is RISE's blur,
  ``klen=11, sigma=5``: :func:`liftcam_jax.image.gaussian_blur` with
  ``blur_sigma=5`` and ``blur_truncate=1`` (radius 5, 11 taps), edge-padded.
  RISE's own kernel (``gkern``: ``scipy.ndimage.gaussian_filter`` of an
  11 x 11 Dirac, reflect mode) folds the Gaussian's tails back into the 11
  taps, which makes it flatter, almost a box (taps 0.088..0.094 against
  0.066..0.109 here), and RISE convolves with zero padding, which darkens a
  5-pixel border; both are small differences in how blurred the start is.

**Localisation**

* :func:`energy_pointing_game` -- the energy-based pointing game (Wang et al.,
  "Score-CAM", CVPR-W 2020): the share of the map's energy inside the union
  of the ground-truth boxes, ``sum(L * mask) / sum(L)``.
* :func:`pointing_game` -- the pointing game (Zhang et al., "Top-down Neural
  Attention by Excitation Backprop", ECCV 2016): a hit when the map's maximum
  lies within ``tolerance`` pixels (default 15) of a ground-truth box.

Boxes are ``(xmin, ymin, xmax, ymax)`` in the model input's continuous pixel
coordinates (pixel ``(i, j)`` covers ``[j, j+1) x [i, i+1)``; its centre is
``(j + 0.5, i + 0.5)``); :func:`boxes_to_input` maps boxes drawn on the stored
image through a :class:`liftcam_jax.Preprocess`.

**Agreement with SHAP values** (of the activation maps, as estimated by
:mod:`liftcam_jax.shap`): :func:`cosine_similarity`, :func:`spearman`
(Spearman's rank correlation with average ranks for ties, like
``scipy.stats.spearmanr``) and :func:`topk_overlap`.

**Aggregation**: :func:`mean_ci`, the mean with a Student-t 95% confidence
interval.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from .errors import positive_int
from .image import gaussian_blur
from .results import Summary, mean_ci  # noqa: F401  (Aggregation: with the results, no JAX)

Array = Any

RISE_STEP = 224          # RISE's default: 224 pixels per step for 224 x 224 inputs
RISE_BLUR_SIGMA = 5.0     # RISE's insertion blur: sigma 5 px ...
RISE_BLUR_TRUNCATE = 1.0  # ... with klen = 11 taps (radius 5 = 1 sigma)
POINTING_TOLERANCE = 15  # pixels (Zhang et al., ECCV 2016)


def target_probability(model: Callable, params, x: Array, targets: Array) -> Array:
    """Softmax probability of ``targets`` ``(B,)`` under ``model`` for a batch ``x`` -> ``(B,)``."""
    logits = model(params, x)
    p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(p, targets.astype(jnp.int32)[:, None], axis=-1)[:, 0]


# ---------------------------------------------------------------------------
# Average Drop / Increase in Confidence
# ---------------------------------------------------------------------------

class ConfidenceChange(NamedTuple):
    """Per image: ``base`` = Y, ``masked`` = O, ``drop`` = 100 max(0, Y-O)/Y, ``increase`` = 100 [O > Y]."""

    base: Array
    masked: Array
    drop: Array
    increase: Array


@functools.partial(jax.jit, static_argnames=("model",))
def confidence_change(model: Callable, params, x: Array, maps: Array, targets: Array) -> ConfidenceChange:
    """Average Drop and Increase in Confidence, per image (Chattopadhay et al., WACV 2018).

    The means of ``drop`` and ``increase`` over images are AD % and IC %.
    """
    base = target_probability(model, params, x, targets)
    masked = target_probability(model, params, x * maps[..., None].astype(x.dtype), targets)
    drop = 100.0 * jnp.maximum(base - masked, 0.0) / base
    increase = 100.0 * (masked > base).astype(jnp.float32)
    return ConfidenceChange(base, masked, drop, increase)


# ---------------------------------------------------------------------------
# Deletion / Insertion (RISE)
# ---------------------------------------------------------------------------

class CausalCurve(NamedTuple):
    """``fractions`` ``(S+1,)`` of pixels changed, ``scores`` ``(B, S+1)``, trapezoid ``auc`` ``(B,)``."""

    fractions: Array
    scores: Array
    auc: Array


def step_counts(num_pixels: int, step: Optional[int] = None, num_steps: Optional[int] = None) -> np.ndarray:
    """Pixels changed after each step: ``[0, step, 2 step, ..., HW]`` (the last step may be partial).

    Give either ``step`` (pixels per step; RISE uses 224 for 224 x 224) or
    ``num_steps`` (then ``n_s = floor(s HW / num_steps)``).
    """
    if (step is None) == (num_steps is None):
        raise ValueError("give exactly one of step and num_steps")
    if step is not None:
        step = positive_int("step", step)
        n = -(-num_pixels // step)
        return np.minimum(np.arange(n + 1, dtype=np.int64) * step, num_pixels)
    num_steps = positive_int("num_steps", num_steps)
    return (np.arange(num_steps + 1, dtype=np.int64) * num_pixels) // num_steps


TIE_BREAKS = ("raster", "random")


def check_tie_break(tie_break: str, key) -> None:
    """A :class:`ValueError` for an unknown ``tie_break``, or ``"random"`` without a ``key``."""
    if tie_break not in TIE_BREAKS:
        raise ValueError(f"unknown tie_break {tie_break!r} (use 'raster' or 'random')")
    if tie_break == "random" and key is None:
        raise ValueError("tie_break='random' needs key= (e.g. jax.random.PRNGKey(0))")


def saliency_rank(maps: Array, tie_break: str = "raster", key: Optional[Array] = None) -> Array:
    """Rank of every pixel in decreasing saliency, ``(B, H, W)`` int32 (0 = most salient).

    Pixels of equal saliency (a map's flat zero region, say) are ordered by
    ``tie_break``: ``"raster"`` (default) by the lower row-major index, a stable
    sort, so deletion eats a flat region from the top rows down; ``"random"`` by
    one random permutation of the pixel positions drawn from ``key``, the same
    for every image, so an image's order does not depend on the batch it is in.
    Either is deterministic, and without ties both give the same ranks.
    """
    check_tie_break(tie_break, key)
    b, h, w = maps.shape
    flat = maps.reshape(b, h * w)
    if tie_break == "raster":
        order = jnp.argsort(flat, axis=-1, descending=True, stable=True)
    else:  # a stable sort of the permuted pixels: ties keep the random order
        perm = jax.random.permutation(key, h * w)
        order = perm[jnp.argsort(flat[:, perm], axis=-1, descending=True, stable=True)]
    iota = jnp.broadcast_to(jnp.arange(h * w, dtype=jnp.int32), (b, h * w))
    rank = jnp.zeros((b, h * w), jnp.int32).at[jnp.arange(b)[:, None], order].set(iota)
    return rank.reshape(b, h, w)


def trapezoid(scores: Array, fractions: Array) -> Array:
    """``int scores d fractions`` by the trapezoid rule along the last axis."""
    dx = jnp.diff(fractions)
    return jnp.sum(0.5 * (scores[..., 1:] + scores[..., :-1]) * dx, axis=-1)


@functools.partial(jax.jit, static_argnames=("model", "counts", "chunk", "tie_break"))
def causal_curve(model: Callable, params, start: Array, finish: Array, maps: Array, targets: Array,
                 *, counts: tuple, chunk: int = 16, tie_break: str = "raster",
                 key: Optional[Array] = None) -> CausalCurve:
    """The general RISE game: move the ``counts[s]`` most salient pixels from ``start`` to ``finish``.

    The perturbed images of all steps are independent (pixel ``p`` is taken
    from ``finish`` iff ``rank[p] < n_s``), so steps are evaluated in parallel:
    ``chunk`` steps of the whole batch per model call (``vmap``), chunks in
    sequence (``lax.map``) to bound memory.

    Args:
      counts: the static tuple ``(n_0, ..., n_S)`` from :func:`step_counts`.
      tie_break, key: the order of equally salient pixels (:func:`saliency_rank`).
    """
    b, h, w = maps.shape
    if start.shape != finish.shape or start.shape[:3] != (b, h, w) or targets.shape != (b,):
        raise ValueError(f"shapes disagree: images {start.shape} and {finish.shape}, maps {maps.shape}, "
                         f"targets {targets.shape}")
    rank = saliency_rank(maps, tie_break, key)[..., None]
    n = len(counts)
    chunk = max(1, min(int(chunk), n))
    padded = list(counts) + [counts[-1]] * ((-n) % chunk)
    cs = jnp.asarray(padded, jnp.int32).reshape(-1, chunk)

    def run(c):  # (chunk,) -> (chunk, B)
        imgs = jax.vmap(lambda k: jnp.where(rank < k, finish, start))(c)
        p = target_probability(model, params, imgs.reshape((-1,) + start.shape[1:]), jnp.tile(targets, chunk))
        return p.reshape(chunk, b)

    scores = jax.lax.map(run, cs).reshape(-1, b)[:n].T
    fractions = jnp.asarray(counts, jnp.float32) / float(h * w)
    return CausalCurve(fractions, scores, trapezoid(scores, fractions))


@dataclasses.dataclass(frozen=True)
class CurveConfig:
    """How :func:`deletion` and :func:`insertion` draw their curves; the defaults are RISE's.

    Attributes:
      step: pixels changed per step (default :data:`RISE_STEP`, 224, when
        ``num_steps`` is not given either); num_steps: the number of steps
        instead (:func:`step_counts`).
      substrate: what deletion turns the image into: ``"zeros"`` (zeros of the
        normalised input, as RISE's code) or ``"mean"`` (each image's
        per-channel mean).
      blur_sigma, blur_truncate: insertion's blurred start
        (:func:`liftcam_jax.image.gaussian_blur`; RISE's ``klen=11, sigma=5``).
      tie_break: the order of equally salient pixels, ``"raster"`` or
        ``"random"`` (which needs a ``key``; :func:`saliency_rank`).
      chunk: steps of the whole batch per model call (memory and speed only).
    """

    step: Optional[int] = None
    num_steps: Optional[int] = None
    substrate: str = "zeros"
    blur_sigma: float = RISE_BLUR_SIGMA
    blur_truncate: float = RISE_BLUR_TRUNCATE
    tie_break: str = "raster"
    chunk: int = 16

    def counts(self, num_pixels: int) -> tuple:
        """The static ``(n_0, ..., n_S)`` of :func:`causal_curve` for images of ``num_pixels`` pixels."""
        step = RISE_STEP if self.step is None and self.num_steps is None else self.step
        return tuple(int(c) for c in step_counts(num_pixels, step, self.num_steps))


def _curve(model, params, start, finish, maps, targets, config: CurveConfig, key) -> CausalCurve:
    h, w = maps.shape[-2:]
    return causal_curve(model, params, start, finish, maps, targets, counts=config.counts(h * w),
                        chunk=config.chunk, tie_break=config.tie_break, key=key)


def deletion(model: Callable, params, x: Array, maps: Array, targets: Array,
             config: CurveConfig = CurveConfig(), *, key: Optional[Array] = None) -> CausalCurve:
    """RISE deletion: remove the most salient pixels first; lower AUC is better.

    ``config``: the steps, the substrate (``"zeros"``, as RISE's code, or
    ``"mean"``) and the order of equally salient pixels (:class:`CurveConfig`);
    ``key``: for ``tie_break="random"`` (:func:`saliency_rank`).
    """
    if config.substrate == "zeros":
        finish = jnp.zeros_like(x)
    elif config.substrate == "mean":
        finish = jnp.broadcast_to(jnp.mean(x, axis=(1, 2), keepdims=True), x.shape)
    else:
        raise ValueError(f"unknown deletion substrate {config.substrate!r} (use 'zeros' or 'mean')")
    return _curve(model, params, x, finish, maps, targets, config, key)


def insertion(model: Callable, params, x: Array, maps: Array, targets: Array,
              config: CurveConfig = CurveConfig(), *, key: Optional[Array] = None) -> CausalCurve:
    """RISE insertion: start from a blurred copy, insert the most salient pixels first; higher AUC is better.

    ``config`` (the steps, the blur, the order of ties) and ``key`` as in :func:`deletion`.
    """
    start = gaussian_blur(x, config.blur_sigma, config.blur_truncate)
    return _curve(model, params, start, x, maps, targets, config, key)


# ---------------------------------------------------------------------------
# Localisation
# ---------------------------------------------------------------------------

def boxes_to_input(boxes: np.ndarray, image_size, preprocess) -> np.ndarray:
    """Map boxes ``(N, 4)`` drawn on a stored ``(H, W)`` image to the model input's pixels.

    Follows :meth:`liftcam_jax.Preprocess.resize_image` exactly: ``"squash"``
    scales x by ``S/W`` and y by ``S/H``; ``"shorter_crop"`` scales by the
    resized over the original size of each axis (integer resized sizes, as
    there), subtracts the crop offset, and clips to ``[0, S]``. A box wholly
    outside the crop comes back empty (``xmax <= xmin`` or ``ymax <= ymin``).
    """
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    h, w = int(image_size[0]), int(image_size[1])
    s = int(preprocess.size)
    if preprocess.resize == "squash":
        sx, sy, left, top = s / w, s / h, 0.0, 0.0
    elif preprocess.resize == "shorter_crop":
        r = int(preprocess.resize_to)
        nw, nh = (r, int(r * h / w)) if w <= h else (int(r * w / h), r)
        sx, sy = nw / w, nh / h
        left, top = float(int(round((nw - s) / 2.0))), float(int(round((nh - s) / 2.0)))
    else:
        raise ValueError(f"unknown resize policy {preprocess.resize!r}")
    out = np.stack([boxes[:, 0] * sx - left, boxes[:, 1] * sy - top,
                    boxes[:, 2] * sx - left, boxes[:, 3] * sy - top], axis=-1)
    return np.clip(out, 0.0, float(s)).astype(np.float32)


def box_mask(boxes: Array, valid: Array, size) -> Array:
    """Union of boxes as a ``(B, H, W)`` bool mask: pixels whose centre lies in a valid box.

    ``boxes`` ``(B, N, 4)`` (``xmin, ymin, xmax, ymax``), ``valid`` ``(B, N)``
    marks real boxes (the rest is padding).
    """
    h, w = int(size[0]), int(size[1])
    yc = jnp.arange(h, dtype=jnp.float32)[:, None] + 0.5
    xc = jnp.arange(w, dtype=jnp.float32)[None, :] + 0.5
    bx = boxes[..., None, None, :]  # (B, N, 1, 1, 4)
    inside = ((xc >= bx[..., 0]) & (xc <= bx[..., 2]) & (yc >= bx[..., 1]) & (yc <= bx[..., 3]))
    return jnp.any(inside & valid[..., None, None], axis=1)


@jax.jit
def energy_pointing_game(maps: Array, boxes: Array, valid: Array) -> Array:
    """Energy-based pointing game (Wang et al., Score-CAM, CVPR-W 2020), per image.

    ``sum(L * mask) / sum(L)`` with ``mask`` the union of the boxes
    (:func:`box_mask`). NaN where no box covers a pixel (undefined: no object in
    view); 0 for an all-zero map (no energy at all in the box).
    """
    mask = box_mask(boxes, valid, maps.shape[1:]).astype(maps.dtype)
    total = jnp.sum(maps, axis=(1, 2))
    inside = jnp.sum(maps * mask, axis=(1, 2))
    share = jnp.where(total > 0, inside / jnp.where(total > 0, total, 1.0), 0.0)
    return jnp.where(jnp.any(mask > 0, axis=(1, 2)), share, jnp.nan)


@functools.partial(jax.jit, static_argnames=("tolerance",))
def pointing_game(maps: Array, boxes: Array, valid: Array, tolerance: float = POINTING_TOLERANCE) -> Array:
    """Pointing game (Zhang et al., ECCV 2016): 1.0 for a hit, 0.0 for a miss, per image.

    The point is the map's maximum (the first in row-major order if several;
    so a constant map points at the top-left pixel). A hit when the Euclidean
    distance from the point's pixel centre to some valid box is at most
    ``tolerance`` pixels. NaN where the image has no non-empty box.
    """
    b, h, w = maps.shape
    idx = jnp.argmax(maps.reshape(b, -1), axis=-1)
    py = (idx // w).astype(jnp.float32) + 0.5
    px = (idx % w).astype(jnp.float32) + 0.5
    dx = jnp.maximum(jnp.maximum(boxes[..., 0] - px[:, None], 0.0), px[:, None] - boxes[..., 2])
    dy = jnp.maximum(jnp.maximum(boxes[..., 1] - py[:, None], 0.0), py[:, None] - boxes[..., 3])
    nonempty = valid & (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
    hit = jnp.any(nonempty & (dx * dx + dy * dy <= float(tolerance) ** 2), axis=-1)
    return jnp.where(jnp.any(nonempty, axis=-1), hit.astype(jnp.float32), jnp.nan)


# ---------------------------------------------------------------------------
# Agreement of coefficients with SHAP values
# ---------------------------------------------------------------------------

@jax.jit
def cosine_similarity(a: Array, b: Array) -> Array:
    """``<a, b> / (|a| |b|)`` along the last axis; NaN when either vector is zero."""
    a = a.astype(jnp.float32)
    b = b.astype(jnp.float32)
    num = jnp.sum(a * b, axis=-1)
    den = jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1)
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), jnp.nan)


def average_ranks(v: Array) -> Array:
    """Ranks 1..n along the last axis, ties given their average rank (``scipy.stats.rankdata``)."""
    flat_v = v.reshape(-1, v.shape[-1])
    flat_s = jnp.sort(flat_v, axis=-1)
    lo = jax.vmap(lambda a, q: jnp.searchsorted(a, q, side="left"))(flat_s, flat_v)
    hi = jax.vmap(lambda a, q: jnp.searchsorted(a, q, side="right"))(flat_s, flat_v)
    return ((lo + hi + 1).astype(jnp.float32) / 2.0).reshape(v.shape)


def _pearson(a, b):
    a = a - jnp.mean(a, axis=-1, keepdims=True)
    b = b - jnp.mean(b, axis=-1, keepdims=True)
    den = jnp.sqrt(jnp.sum(a * a, axis=-1) * jnp.sum(b * b, axis=-1))
    return jnp.where(den > 0, jnp.sum(a * b, axis=-1) / jnp.where(den > 0, den, 1.0), jnp.nan)


@jax.jit
def spearman(a: Array, b: Array) -> Array:
    """Spearman's rank correlation along the last axis (Pearson of average ranks); NaN for a constant vector."""
    return _pearson(average_ranks(a.astype(jnp.float32)), average_ranks(b.astype(jnp.float32)))


@functools.partial(jax.jit, static_argnames=("k", "absolute"))
def topk_overlap(a: Array, b: Array, k: int = 10, absolute: bool = False) -> Array:
    """``|top_k(a) & top_k(b)| / k`` along the last axis (largest values; ``absolute``: largest magnitudes).

    Ties are broken by the lower index (``lax.top_k``).
    """
    if absolute:
        a, b = jnp.abs(a), jnp.abs(b)
    n = a.shape[-1]
    k = int(min(k, n))
    _, ia = jax.lax.top_k(a, k)
    _, ib = jax.lax.top_k(b, k)
    in_a = jnp.sum(jax.nn.one_hot(ia, n, dtype=jnp.float32), axis=-2)
    in_b = jnp.sum(jax.nn.one_hot(ib, n, dtype=jnp.float32), axis=-2)
    return jnp.sum(in_a * in_b, axis=-1) / k
