r"""Shapley values of activation maps: the ground truth that LIFT-CAM approximates.

LIFT-CAM (Jung & Oh, ICCV 2021, arXiv 2102.05228) argues that the right CAM
coefficients are the SHAP values of the activation maps. The game has the
``K`` channels of ``A = features(x)`` as players and, for an image and its
target class ``c``,

.. math::  v(S) = \mathrm{head}(A \odot \mathbb 1_S)_c ,

the head's target logit when the channels outside ``S`` are set to zero. ``A`` may
be maps ``(B, h, w, K)`` or tokens ``(B, N, K)`` (a ViT's, :mod:`liftcam_jax.tokens`),
or any ``(B, ..., K)``: a channel is the last axis, and it is zeroed at every
position, so for tokens a channel is one feature dimension across all tokens
(prefix tokens included, as LIFT-CAM's coefficients sum over them). The
Shapley value of channel ``k`` (Shapley, 1953) is

.. math::
    \phi_k = \sum_{S \subseteq N \setminus \{k\}}
             \frac{|S|!\,(K - |S| - 1)!}{K!}\,\big(v(S \cup \{k\}) - v(S)\big),

and they add up to :math:`v(N) - v(\emptyset)` (efficiency). For a linear head
(``GAP -> Linear``) :math:`\phi_k = w_{ck}\,\mathrm{mean}(A^k)`, exactly
LIFT-CAM's coefficients.

Three estimators, all pure, jit-able (the sample counts and ``chunk_size`` are
static) and batched over images; the head runs on ``chunk_size`` coalitions
at a time (``jax.lax.map`` of ``vmap``-ed chunks, see :func:`coalition_values`),
each coalition for the whole batch. The random coalitions are shared by the
images of a batch, so an image's estimate does not depend on the rest of its
batch.

* :func:`exact_shapley` -- enumeration of all :math:`2^K` coalitions
  (``K <= 16``), the formula above.
* :func:`permutation_shapley` -- permutation sampling (Castro, Gómez & Tejada,
  "Polynomial calculation of the Shapley value based on sampling", Computers &
  Operations Research 36(5), 2009) with antithetic pairs: each random
  permutation is used together with its reverse. Each permutation's marginal
  contributions add up to :math:`v(N) - v(\emptyset)` exactly; the estimate is
  the mean over the pairs, the standard error the pairs' standard deviation
  over :math:`\sqrt{\#\text{pairs}}` (pairs are independent).
* :func:`kernel_shap` -- Kernel SHAP (Lundberg & Lee, "A Unified Approach to
  Interpreting Model Predictions", NeurIPS 2017): the Shapley values solve

  .. math::
      \min_\phi \sum_{0 < |S| < K} \pi(S)\,\big(v(S) - v(\emptyset) - z_S^\top\phi\big)^2
      \quad\text{s.t.}\quad \mathbf 1^\top \phi = v(N) - v(\emptyset),
      \qquad \pi(S) = \frac{K - 1}{\binom{K}{|S|}\,|S|\,(K - |S|)} .

  Coalitions are drawn from the normalised kernel (a size ``s`` with
  probability :math:`\propto (K-1)/(s(K-s))`, then a uniform subset of that
  size) together with their complements (paired sampling, Covert & Lee,
  "Improving KernelSHAP", AISTATS 2021), and the regression uses the sample
  moments :math:`\hat A = \overline{z z^\top}`, :math:`\hat b = \overline{z\,
  (v(z) - v(\emptyset))}`; the constraint is enforced exactly through the KKT
  system :math:`[\hat A, \mathbf 1; \mathbf 1^\top, 0]`. The standard error is
  the delta method (sandwich) estimate: with :math:`C` the top-left block of the
  KKT inverse and :math:`e_i = b_i - A_i\hat\phi` per pair, :math:`\mathrm{SE} =
  \mathrm{sd}_i(C e_i)/\sqrt{n}` (the first-order expansion of
  :math:`\hat\phi` in the pair means; asymptotically exact, see the
  calibration test).

:func:`shap_values` dispatches between them with one signature.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import affine as _affine
from . import targets as _target_lib
from .errors import UsageError, positive_int

__all__ = [
    "AFFINE_BYTES",
    "DEFAULT_CHUNK",
    "MAX_EXACT_PLAYERS",
    "METHODS",
    "ShapleyValues",
    "coalition_values",
    "exact_shapley",
    "kernel_shap",
    "permutation_shapley",
    "shap_values",
    "shapley_kernel_size_probabilities",
]

DEFAULT_CHUNK = 64
"""Coalitions per head call (each for the whole batch)."""

AFFINE_BYTES = 2 ** 31
"""The most memory the affine-front permutation path spends on the ``K`` channel contributions
(per batch, else per image; beyond it the head is evaluated per coalition)."""

MAX_EXACT_PLAYERS = 16
"""Enumeration evaluates ``2**K`` coalitions; beyond 16 channels use a sampler."""

METHODS = ("exact", "permutation", "kernel")

Array = Any


class ShapleyValues(NamedTuple):
    """Shapley value estimates ``(B, K)`` and their standard errors ``(B, K)`` (zeros when exact)."""

    values: Array
    stderr: Array


def _score(targets):
    """The explained score ``out -> (B,)``: a class's logit for class indices (:mod:`liftcam_jax.targets`)."""
    return _target_lib.as_score(targets)


def coalition_values(head: Callable, params, activations: Array, targets: Array, masks: Array, *,
                     chunk_size: int = DEFAULT_CHUNK) -> Array:
    r"""The game's values :math:`v(S)` for a set of coalitions.

    Args:
      head: ``head(params, A) -> (B, C)`` logits (any output, with a score function).
      activations: ``A``, ``(B, ..., K)``: maps ``(B, h, w, K)`` or tokens ``(B, N, K)``.
      targets: ``(B,)`` class per image (or one int), or a score function
        ``fn(out) -> (B,)`` (:mod:`liftcam_jax.targets`).
      masks: ``(N, K)`` coalitions, 1 = channel kept, 0 = channel set to zero
        (fractional masks scale the channel).
      chunk_size: coalitions per head call (each call sees ``chunk_size * B`` inputs).

    Returns:
      ``(N, B)``: ``head(A * mask_n)[b, targets[b]]`` (the score of ``head(A * mask_n)``).
    """
    chunk_size = positive_int("chunk_size", chunk_size)
    a = activations
    score = _score(targets)
    masks = jnp.asarray(masks, a.dtype)

    def one(m):
        return score(head(params, a * m))

    return jax.lax.map(one, masks, batch_size=min(chunk_size, masks.shape[0]))


def _ends(head, params, a, t, chunk_size):
    """``v(empty)`` and ``v(all)``, each ``(B,)``."""
    k = a.shape[-1]
    v = coalition_values(head, params, a, t, jnp.stack([jnp.zeros(k), jnp.ones(k)]), chunk_size=chunk_size)
    return v[0], v[1]


# ---------------------------------------------------------------------------
# exact enumeration
# ---------------------------------------------------------------------------

def _shapley_weights(k: int) -> np.ndarray:
    """``w[s] = s! (k - s - 1)! / k!`` for ``s = 0 .. k-1`` (float64)."""
    return np.array([1.0 / (k * math.comb(k - 1, s)) for s in range(k)])


def exact_shapley(head: Callable, params, activations: Array, targets: Array, *,
                  chunk_size: int = 256) -> ShapleyValues:
    r"""Exact Shapley values of the ``K <= 16`` channels by enumeration.

    Evaluates all :math:`2^K` coalitions (coalition ``i`` keeps channel ``k``
    iff bit ``k`` of ``i`` is set) and sums, for each channel, the weighted
    differences :math:`v(S \cup k) - v(S)` (differences first, for accuracy).
    """
    a = activations
    k = a.shape[-1]
    if k > MAX_EXACT_PLAYERS:
        raise UsageError(
            f"exact Shapley values enumerate 2**K coalitions; K = {k} channels is too many "
            f"(at most {MAX_EXACT_PLAYERS}); use method='permutation' or 'kernel'"
        )
    n = 2 ** k
    bits = (jnp.arange(n, dtype=jnp.int32)[:, None] >> jnp.arange(k, dtype=jnp.int32)) & 1  # (2^K, K)
    v = coalition_values(head, params, a, targets, bits, chunk_size=chunk_size)  # (2^K, B)
    w = jnp.asarray(_shapley_weights(k), v.dtype)[jnp.minimum(jnp.sum(bits, axis=1), k - 1)]  # w(|S|)
    phi = []
    for j in range(k):
        shape = (2 ** (k - 1 - j), 2, 2 ** j)
        diff = v.reshape(shape + v.shape[1:])
        diff = (diff[:, 1] - diff[:, 0]).reshape(n // 2, -1)  # v(S + j) - v(S), S without j
        wj = w.reshape(shape)[:, 0].reshape(-1)  # w(|S|), S without j
        phi.append(wj @ diff)
    phi = jnp.stack(phi, axis=-1)  # (B, K)
    return ShapleyValues(phi, jnp.zeros_like(phi))


# ---------------------------------------------------------------------------
# permutation sampling with antithetic pairs
# ---------------------------------------------------------------------------

def _prefix_values(split, params, a, score, perms, chunk_size):
    r"""``v`` of each permutation's proper prefixes, ``(P, K-1, B)``, through the head's affine front.

    :math:`L(A \odot 1_S) = L(0) + \sum_{k \in S} d_k` (:mod:`liftcam_jax.affine`): the channel
    contributions :math:`d_k` once per image, then per permutation a running sum over the players in
    order, ``chunk_size`` positions at a time (``lax.scan``), each prefix through the rest of the head.
    """
    k = a.shape[-1]
    f0 = split.front(params, jnp.zeros_like(a))
    d = jax.lax.map(lambda e: [x - y for x, y in zip(split.front(params, a * e), f0)], jnp.eye(k, dtype=a.dtype),
                    batch_size=min(chunk_size, k))  # per frontier value (K, ...)
    d = [jnp.concatenate([x, jnp.zeros_like(x[:1])]) for x in d]  # row K: nothing added (padding)
    m = min(chunk_size, k)
    segments = -(-k // m)

    def one(perm):
        order = jnp.concatenate([perm, jnp.full((segments * m - k,), k, perm.dtype)]).reshape(segments, m)

        def add(state, j):  # one player joins (a sequential loop: XLA's CPU cumsum is several times slower)
            state = [s + x[j] for s, x in zip(state, d)]
            return state, state

        def segment(carry, idx):
            carry, states = jax.lax.scan(add, carry, idx)
            outs = jax.vmap(lambda s: split.rest(params, s)[0])(states)  # (m, B, C)
            return carry, jax.vmap(score)(outs)

        _, v = jax.lax.scan(segment, f0, order)
        return v.reshape(segments * m, -1)[: k - 1]

    return jax.lax.map(one, perms)


def permutation_shapley(head: Callable, params, activations: Array, targets: Array, key, *,
                        num_permutations: int = 64, chunk_size: int = DEFAULT_CHUNK,
                        affine: bool = True) -> ShapleyValues:
    r"""Permutation-sampling Shapley estimates with antithetic pairs (Castro et al., 2009).

    ``num_permutations`` (even, >= 4) permutations: ``num_permutations / 2``
    random ones and their reverses. Costs ``num_permutations * (K - 1) + 2``
    head evaluations per image. Every permutation's contributions sum to
    ``v(N) - v(empty)``, so the estimate is efficient exactly. The standard
    error is the standard deviation of the pair means over ``sqrt(#pairs)``.

    ``affine`` (default): where the head begins with affine layers
    (:func:`liftcam_jax.affine.affine_front`), the ``K`` channel contributions to
    their output are computed once and each permutation's nested coalitions are
    running sums through the rest of the head: the same estimate (same
    permutations, float rounding aside) at the cost of ``K`` front evaluations
    plus ``num_permutations * K`` evaluations of the rest. At EfficientNet-Lite0's
    ``blocks.15.dw`` (``K = 1152``, front = projection, BN, head conv, BN) the
    rest is ReLU6, pooling and the linear layer. Memory: ``K`` times the
    frontier, for the batch or else image by image, up to :data:`AFFINE_BYTES`;
    beyond it, and with ``affine=False``, the whole head runs per coalition.
    """
    p = positive_int("num_permutations", num_permutations, even=True, minimum=4)
    a = activations
    b, k = a.shape[0], a.shape[-1]
    score = _score(targets)
    cut = _target_lib.per_image(score)  # image by image needs a score that can be cut per image
    pairs = p // 2
    perms = jax.vmap(lambda kk: jax.random.permutation(kk, k))(jax.random.split(key, pairs))
    perms = jnp.concatenate([perms, perms[:, ::-1]])  # (P, K): forward then reversed
    pos = jnp.argsort(perms, axis=1)  # pos[p, k]: position of player k in permutation p
    split = _affine.affine_front(head, params, jax.ShapeDtypeStruct(a.shape, a.dtype)) if affine else None
    need = k * split.frontier_size * a.dtype.itemsize if split is not None else 0  # the K contributions
    if split is not None and split.saves and need <= AFFINE_BYTES:
        v = _prefix_values(split, params, a, score, perms, chunk_size)
    elif (split is not None and split.saves and b > 1 and need // b <= AFFINE_BYTES
          and cut is not None):  # one image at a time
        one = _affine.affine_front(head, params, jax.ShapeDtypeStruct((1,) + a.shape[1:], a.dtype))
        v = jax.lax.map(lambda ai: _prefix_values(one, params, ai[0][None], cut(ai[1]), perms, chunk_size)[..., 0],
                        (a, jnp.arange(b)))  # (B, P, K-1)
        v = jnp.moveaxis(v, 0, -1)
    else:
        sizes = jnp.arange(1, k)
        masks = (pos[:, None, :] < sizes[None, :, None]).astype(a.dtype)  # (P, K-1, K) prefixes
        v = coalition_values(head, params, a, score, masks.reshape(-1, k), chunk_size=chunk_size)
        v = v.reshape(p, k - 1, b)
    v0, v1 = _ends(head, params, a, score, chunk_size)
    chain = jnp.concatenate([jnp.broadcast_to(v0, (p, 1, b)), v, jnp.broadcast_to(v1, (p, 1, b))], axis=1)
    deltas = chain[:, 1:] - chain[:, :-1]  # (P, K, B): contribution of the player at each position
    contrib = jnp.take_along_axis(deltas, pos[:, :, None], axis=1)  # (P, K, B) by player
    pair = 0.5 * (contrib[:pairs] + contrib[pairs:])  # (pairs, K, B)
    est = jnp.mean(pair, axis=0)
    se = jnp.std(pair, axis=0, ddof=1) / math.sqrt(pairs)
    return ShapleyValues(est.T, se.T)


# ---------------------------------------------------------------------------
# Kernel SHAP
# ---------------------------------------------------------------------------

def shapley_kernel_size_probabilities(k: int) -> np.ndarray:
    r"""``P(|S| = s)`` for ``s = 1 .. K-1`` under the normalised Shapley kernel: :math:`\propto (K-1)/(s(K-s))`."""
    s = np.arange(1, k)
    w = (k - 1) / (s * (k - s))
    return w / w.sum()


def kernel_shap(head: Callable, params, activations: Array, targets: Array, key, *,
                num_samples: int = 512, chunk_size: int = DEFAULT_CHUNK) -> ShapleyValues:
    r"""Kernel SHAP with the efficiency constraint and paired sampling (Lundberg & Lee, 2017).

    ``num_samples`` (even) coalitions: ``num_samples / 2`` drawn from the
    Shapley kernel and their complements; ``num_samples + 2`` head
    evaluations per image. The system is singular with too few distinct
    coalitions (fewer than about ``K``); the solve uses a pseudo-inverse,
    so the standard errors then reflect only the identified directions.
    See the module docstring for the estimator and its standard error.
    """
    n = positive_int("num_samples", num_samples, even=True, minimum=4) // 2
    a = activations
    b, k = a.shape[0], a.shape[-1]
    if k < 2:
        raise UsageError(f"Kernel SHAP needs at least 2 channels, got {k}")
    t = _score(targets)
    dt = a.dtype
    k_size, k_subset = jax.random.split(key)
    sizes = jax.random.choice(k_size, jnp.arange(1, k), (n,), p=jnp.asarray(shapley_kernel_size_probabilities(k), dt))
    rank = jnp.argsort(jnp.argsort(jax.random.uniform(k_subset, (n, k)), axis=1), axis=1)
    z = (rank < sizes[:, None]).astype(dt)  # (n, K) uniform subsets of the drawn sizes
    zc = 1.0 - z
    v = coalition_values(head, params, a, t, jnp.concatenate([z, zc]), chunk_size=chunk_size)  # (2n, B)
    v0, v1 = _ends(head, params, a, t, chunk_size)
    yz, yc = v[:n] - v0, v[n:] - v0  # (n, B)

    a_hat = 0.5 * (z.T @ z + zc.T @ zc) / n  # (K, K), shared by the batch
    b_hat = 0.5 * (z.T @ yz + zc.T @ yc) / n  # (K, B)
    ones = jnp.ones((k, 1), dt)
    kkt = jnp.block([[a_hat, ones], [ones.T, jnp.zeros((1, 1), dt)]])
    inv = jnp.linalg.pinv(kkt)
    sol = inv @ jnp.concatenate([b_hat, (v1 - v0)[None, :]], axis=0)
    phi = sol[:k]  # (K, B)

    # delta method: phi moves by C (b_i - A_i phi) per pair, C = top-left block of the KKT inverse
    c = inv[:k, :k]
    e = 0.5 * (z[:, :, None] * (yz - z @ phi)[:, None, :] + zc[:, :, None] * (yc - zc @ phi)[:, None, :])
    psi = jnp.einsum("kj,njb->nkb", c, e)  # (n, K, B)
    se = jnp.std(psi, axis=0, ddof=1) / math.sqrt(n)
    return ShapleyValues(phi.T, se.T)


# ---------------------------------------------------------------------------
# one entry point
# ---------------------------------------------------------------------------

def shap_values(head: Callable, params, activations: Array, targets: Array, *, method: str = "permutation",
                num_samples: int = 64, key=None, chunk_size: int = DEFAULT_CHUNK,
                affine: bool = True) -> ShapleyValues:
    """Shapley values of the activation maps ``(B, K)`` and their standard errors ``(B, K)``.

    Args:
      head: ``head(params, A) -> (B, C)``.
      activations: ``(B, ..., K)``: maps ``(B, h, w, K)`` or tokens ``(B, N, K)``
        (the channel game zeroes a channel at every position or token).
      targets: ``(B,)`` class per image, or one int.
      method: ``"exact"`` (enumeration, ``K <= 16``, ``num_samples`` and ``key``
        ignored, standard errors 0), ``"permutation"`` (``num_samples``
        permutations, antithetic pairs) or ``"kernel"`` (``num_samples``
        coalitions, complementary pairs).
      key: a ``jax.random`` key for the samplers.
      chunk_size: coalitions per head call.
      affine: permutation sampling through the head's affine front (same values,
        fewer operations; see :func:`permutation_shapley`).

    Example::

        vals, se = shap_values(split.head, params, A, targets, method="permutation",
                               num_samples=128, key=jax.random.PRNGKey(0))
    """
    if method == "exact":
        return exact_shapley(head, params, activations, targets, chunk_size=chunk_size)
    if method not in METHODS:
        raise UsageError(f"unknown Shapley method {method!r}; valid methods: {', '.join(METHODS)}")
    if key is None:
        raise UsageError(f"method={method!r} samples coalitions and needs a PRNG key (key=jax.random.PRNGKey(0))")
    if method == "permutation":
        return permutation_shapley(head, params, activations, targets, key, num_permutations=num_samples,
                                   chunk_size=chunk_size, affine=affine)
    return kernel_shap(head, params, activations, targets, key, num_samples=num_samples, chunk_size=chunk_size)
