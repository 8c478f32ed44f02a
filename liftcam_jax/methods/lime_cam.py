r"""LIME-CAM: a sparse linear surrogate of the head over channel masks.

One of the baselines of LIFT-CAM (Jung & Oh, "Towards Better Explanations of
Class Activation Mapping", ICCV 2021, arXiv 2102.05228), as in the authors'
code (Captum's ``Lime`` on the head with its defaults), after LIME (Ribeiro,
Singh & Guestrin, "Why Should I Trust You?", KDD 2016):

1. ``N`` (default: as many as channels, ``K``) binary masks
   :math:`z^{(n)} \sim \mathrm{Bernoulli}(0.5)^K`;
2. the head's target logit on the masked activations (removed channels set
   to zero, the baseline), :math:`y_n = \mathrm{head}(A \odot z^{(n)})_c`
   (:func:`liftcam_jax.shap.coalition_values`);
3. sample weights from an exponential kernel of the cosine distance between
   the flattened original and masked activations,
   :math:`d_n = 1 - \cos(A, A \odot z^{(n)})`, :math:`s_n = \exp(-d_n^2 / 2\sigma^2)`
   with :math:`\sigma = 1` (Captum's ``get_exp_kernel_similarity_function
   ("cosine", 1.0)``); in closed form
   :math:`\cos = \sqrt{\sum_k z_k \|A^k\|^2 / \sum_k \|A^k\|^2}`;
4. a weighted Lasso with intercept, ``alpha = 0.01`` (:func:`weighted_lasso`);
   the coefficients are the channel weights,
   :math:`\text{map} = \mathrm{ReLU}(\sum_k \phi_k A^k)`.

The masks are drawn from the PRNG ``key`` and shared by the images of a
batch (so an image's explanation does not depend on its batch); the Lasso is
fitted per image, ``vmap``-ed.

Token activations ``(B, N, D)`` (:mod:`liftcam_jax.tokens`): a channel is
removed from every token (prefix tokens included), as in the channel game of
:mod:`liftcam_jax.shap` whose SHAP values LIFT-CAM estimates, and the cosine
kernel compares all tokens.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ..errors import UsageError, positive_int
from ..explanation import Attribution
from ..tokens import position_axes
from ..shap import DEFAULT_CHUNK, coalition_values
from .registry import register

Array = Any

DEFAULT_ALPHA = 0.01
"""Captum's ``Lime`` default interpretable model: ``SkLearnLasso(alpha=0.01)``."""


class LassoFit(NamedTuple):
    """A weighted Lasso fit: ``coef`` (K,), ``intercept`` (), the relative duality
    ``gap`` at the returned ``coef`` and the number of ``iterations``."""

    coef: Array
    intercept: Array
    gap: Array
    iterations: Array


def _power_iteration(g, steps: int = 64):
    """Largest eigenvalue of the PSD matrix ``g`` (Rayleigh quotient after ``steps`` iterations)."""
    v = jax.random.normal(jax.random.PRNGKey(0), g.shape[:1], g.dtype)

    def body(_, v):
        u = g @ v
        return u / jnp.maximum(jnp.linalg.norm(u), jnp.finfo(g.dtype).tiny)

    v = jax.lax.fori_loop(0, steps, body, v / jnp.linalg.norm(v))
    return v @ (g @ v)


def weighted_lasso(x: Array, y: Array, sample_weight: Array, alpha: float = DEFAULT_ALPHA, *,
                   tol: float = 1e-6, max_iter: int = 3000, check_every: int = 10) -> LassoFit:
    r"""Weighted Lasso with an intercept, scikit-learn's objective, fitted by FISTA.

    Minimises, over ``coef`` :math:`\beta` and ``intercept`` :math:`\beta_0`,

    .. math::
        \frac{1}{2\sum_i s_i}\sum_i s_i\,(y_i - \beta_0 - x_i^\top\beta)^2
        + \alpha\,\|\beta\|_1 ,

    which is ``sklearn.linear_model.Lasso(alpha).fit(x, y, sample_weight=s)``:
    scikit-learn rescales the sample weights to sum to ``n_samples`` and then
    minimises :math:`\frac{1}{2n}\sum_i s_i r_i^2 + \alpha\|\beta\|_1`, the same
    objective (it is invariant to the scale of ``s``). As there, the intercept
    is eliminated by centring ``x`` and ``y`` with the weighted means and is
    recovered as :math:`\beta_0 = \bar y - \bar x^\top\beta`.

    The centred problem is solved with FISTA (Beck & Teboulle, SIAM J. Imaging
    Sciences 2009) on the Gram matrix, step ``1 / L`` with ``L`` 1.05 times a
    power-iteration estimate of its largest eigenvalue, and gradient-based
    adaptive restart (O'Donoghue & Candès, 2015). It stops when the duality
    gap relative to the weighted variance of ``y`` (scikit-learn's criterion,
    whose default tolerance is ``1e-4``) falls below ``tol``, checked every
    ``check_every`` iterations, or after ``max_iter`` iterations (rounded up
    to a multiple of ``check_every``); ``gap``
    reports where it stopped. In float32 the gap bottoms out near ``1e-6`` on
    ill-conditioned problems.

    Args:
      x: ``(N, K)`` design; y: ``(N,)`` targets; sample_weight: ``(N,)`` non-negative.
    """
    x = jnp.asarray(x)
    dt = jnp.result_type(x.dtype, jnp.float32)
    x, y, s = x.astype(dt), jnp.asarray(y, dt), jnp.asarray(sample_weight, dt)
    p = s / jnp.sum(s)
    x_mean, y_mean = p @ x, p @ y
    xc, yc = x - x_mean, y - y_mean
    g = xc.T @ (p[:, None] * xc)  # (K, K)
    c = xc.T @ (p * yc)  # (K,)
    yy = p @ (yc * yc)
    norm = jnp.where(yy > 0, yy, 1.0)
    lip = jnp.maximum(1.05 * _power_iteration(g), jnp.finfo(dt).tiny)
    alpha = jnp.asarray(alpha, dt)

    def shrink(v, t):
        return jnp.sign(v) * jnp.maximum(jnp.abs(v) - t, 0.0)

    def gap(beta):
        grad = c - g @ beta  # X~^T r~
        rr = jnp.maximum(yy - 2.0 * beta @ c + beta @ (g @ beta), 0.0)
        scale = jnp.minimum(1.0, alpha / jnp.maximum(jnp.max(jnp.abs(grad)), jnp.finfo(dt).tiny))
        primal_minus_dual = 0.5 * (1.0 - scale) ** 2 * rr + alpha * jnp.sum(jnp.abs(beta)) - scale * (beta @ grad)
        return primal_minus_dual / norm

    def fista_step(_, state):
        beta, z, t = state
        new = shrink(z - (g @ z - c) / lip, alpha / lip)
        restart = (z - new) @ (new - beta) > 0
        t_new = jnp.where(restart, 1.0, 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * t * t)))
        z_new = jnp.where(restart, new, new + ((t - 1.0) / t_new) * (new - beta))
        return new, z_new, t_new

    def block(state):  # check_every steps, then the gap (no cond: cheap under vmap)
        beta, z, t, it, _ = state
        beta, z, t = jax.lax.fori_loop(0, check_every, fista_step, (beta, z, t))
        return beta, z, t, it + check_every, gap(beta)

    def cond(state):
        return (state[3] < max_iter) & (state[4] > tol)

    beta0 = jnp.zeros_like(c)
    beta, _, _, iters, _ = jax.lax.while_loop(
        cond, block, (beta0, beta0, jnp.asarray(1.0, dt), jnp.asarray(0, jnp.int32), gap(beta0))
    )
    return LassoFit(beta, y_mean - x_mean @ beta, gap(beta), iters)


def cosine_kernel_weights(activations: Array, masks: Array, kernel_width: float = 1.0) -> Array:
    r"""LIME sample weights ``(N, B)``: :math:`\exp(-d^2 / 2\sigma^2)`, ``d`` the cosine distance
    between the flattened activations and the activations with channels masked by ``masks`` ``(N, K)``."""
    energy = jnp.sum(activations * activations, axis=position_axes(activations))  # (B, K)
    total = jnp.sum(energy, axis=1)  # (B,)
    kept = masks.astype(energy.dtype) @ energy.T  # (N, B)
    cos = jnp.sqrt(jnp.maximum(kept, 0.0) / jnp.where(total > 0, total, 1.0))
    d = 1.0 - cos
    return jnp.exp(-(d * d) / (2.0 * kernel_width ** 2))


def lime_cam_coefficients(head, params, activations, targets, key, *, num_samples=None,
                          alpha: float = DEFAULT_ALPHA, kernel_width: float = 1.0,
                          chunk_size: int = DEFAULT_CHUNK, tol: float = 1e-6, max_iter: int = 3000):
    """LIME-CAM coefficients ``(B, K)`` and the per-image :class:`LassoFit`.

    Args:
      head: ``head(params, A) -> (B, C)``.
      activations: ``(B, h, w, K)`` maps or ``(B, N, K)`` tokens.
      targets: ``(B,)`` ints.
      key: PRNG key for the masks.
      num_samples: number of masks (default ``K``, as the authors).
      alpha, kernel_width: the Lasso penalty and the similarity kernel width.
      chunk_size: masks per head call.
      tol, max_iter: :func:`weighted_lasso`'s stopping rule.
    """
    if key is None:
        raise UsageError("lime-cam draws random masks and needs a PRNG key (key=jax.random.PRNGKey(0))")
    a = activations
    k = a.shape[-1]
    n = k if num_samples is None else positive_int("num_samples", num_samples, minimum=2)
    masks = jax.random.bernoulli(key, 0.5, (n, k)).astype(a.dtype)
    y = coalition_values(head, params, a, targets, masks, chunk_size=chunk_size)  # (N, B)
    w = cosine_kernel_weights(a, masks, kernel_width)  # (N, B)
    fit = jax.vmap(lambda yb, wb: weighted_lasso(masks, yb, wb, alpha, tol=tol, max_iter=max_iter),
                   in_axes=(1, 1))(y, w)
    return fit.coef, fit


@register(
    "lime-cam",
    needs_key=True,
    tokens="all",
    summary="LIME-CAM: weighted Lasso of the target logit on random channel masks (Ribeiro et al. 2016)",
)
def lime_cam(split, params, x, activations, targets, logits, *, key=None, num_samples=None,
             alpha: float = DEFAULT_ALPHA, kernel_width: float = 1.0, chunk_size: int = DEFAULT_CHUNK,
             tol: float = 1e-6, max_iter: int = 3000):
    """LIME-CAM: Lasso coefficients of the target logit on K random channel masks (as in LIFT-CAM's code)."""
    del x, logits
    phi, _ = lime_cam_coefficients(split.head, params, activations, targets, key, num_samples=num_samples,
                                   alpha=alpha, kernel_width=kernel_width, chunk_size=chunk_size, tol=tol,
                                   max_iter=max_iter)
    return Attribution(phi)
