"""LIME-CAM and its weighted Lasso.

The Lasso is checked against an independent float64 coordinate descent, its
optimality (KKT) conditions, closed forms, and scikit-learn when available;
LIME-CAM against exact recovery of a linear head and its own definition.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import liftcam_jax as lj
from liftcam_jax.errors import UsageError
from liftcam_jax.methods import registry
from liftcam_jax.methods.lime_cam import cosine_kernel_weights, lime_cam_coefficients, weighted_lasso
from liftcam_jax.model import Split
from liftcam_jax.shap import coalition_values


def _problem(n=40, k=12, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.random((n, k)) < 0.5).astype(np.float32)
    beta = rng.normal(size=k) * (rng.random(k) < 0.6)
    y = (x @ beta + 0.3 * np.tanh(x @ rng.normal(size=k)) + 1.5 + 0.05 * rng.normal(size=n)).astype(np.float32)
    w = np.exp(-rng.uniform(0.0, 0.6, n) ** 2 / 2).astype(np.float32)
    return x, y, w


def _cd_lasso(x, y, w, alpha, sweeps=20000):
    """Reference: cyclic coordinate descent in float64 on the weighted, centred problem."""
    x, y, w = (np.asarray(v, np.float64) for v in (x, y, w))
    p = w / w.sum()
    xm, ym = p @ x, p @ y
    xc, yc = x - xm, y - ym
    beta = np.zeros(x.shape[1])
    r = yc.copy()
    col = (p[:, None] * xc * xc).sum(0)
    for _ in range(sweeps):
        delta = 0.0
        for j in range(x.shape[1]):
            if col[j] == 0:
                continue
            rho = (p * xc[:, j]) @ r + col[j] * beta[j]
            new = np.sign(rho) * max(abs(rho) - alpha, 0.0) / col[j]
            r -= xc[:, j] * (new - beta[j])
            delta = max(delta, abs(new - beta[j]))
            beta[j] = new
        if delta < 1e-13:
            break
    return beta, ym - xm @ beta


fit_jit = jax.jit(weighted_lasso, static_argnames=("tol", "max_iter"))


@pytest.mark.parametrize("alpha", [0.01, 0.1])
def test_lasso_matches_coordinate_descent(alpha):
    x, y, w = _problem()
    fit = fit_jit(x, y, w, alpha)
    ref, ref0 = _cd_lasso(x, y, w, alpha)
    assert float(fit.gap) <= 1e-6
    np.testing.assert_allclose(fit.coef, ref, atol=2e-5)
    np.testing.assert_allclose(fit.intercept, ref0, atol=5e-5)
    assert 0 < np.sum(ref != 0) < x.shape[1] or alpha == 0.01  # the penalty is active


def test_lasso_kkt_conditions():
    """At the optimum the weighted correlation of each column with the residual is
    alpha * sign(beta_j) on the support and within [-alpha, alpha] off it; the
    weighted residual has mean zero (the intercept)."""
    x, y, w = _problem(seed=1)
    alpha = 0.05
    fit = fit_jit(x, y, w, alpha)
    beta = np.asarray(fit.coef, np.float64)
    p = w / w.sum()
    r = y - fit.intercept - x @ beta
    assert abs(p @ r) < 1e-5
    g = (x - p @ x).T @ (p * r)
    on = beta != 0
    assert on.any() and (~on).any()
    np.testing.assert_allclose(g[on], alpha * np.sign(beta[on]), atol=2e-5)
    assert np.all(np.abs(g[~on]) <= alpha + 2e-5)


def test_lasso_single_feature_soft_threshold():
    """One feature: beta = S(c, alpha) / v with c, v the weighted covariance and variance."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(30, 1)).astype(np.float32)
    y = (0.7 * x[:, 0] + 0.1 * rng.normal(size=30)).astype(np.float32)
    w = rng.uniform(0.2, 1.0, 30).astype(np.float32)
    p = w / w.sum()
    xc, yc = x[:, 0] - p @ x[:, 0], y - p @ y
    c, v = p @ (xc * yc), p @ (xc * xc)
    for alpha in (0.0, 0.1, 10.0):
        fit = fit_jit(x, y, w, alpha)
        np.testing.assert_allclose(fit.coef[0], np.sign(c) * max(abs(c) - alpha, 0) / v, rtol=1e-4, atol=1e-6)


def test_lasso_sample_weights_are_scale_free():
    x, y, w = _problem(seed=3)
    a, b = fit_jit(x, y, w, 0.02), fit_jit(x, y, 7.5 * w, 0.02)
    np.testing.assert_allclose(a.coef, b.coef, atol=1e-5)
    np.testing.assert_allclose(a.intercept, b.intercept, atol=1e-5)


def test_lasso_matches_sklearn():
    linear_model = pytest.importorskip("sklearn.linear_model")
    x, y, w = _problem(n=60, k=20, seed=4)
    for alpha in (0.01, 0.05):
        ref = linear_model.Lasso(alpha=alpha, tol=1e-12, max_iter=100000).fit(
            x.astype(np.float64), y.astype(np.float64), sample_weight=w.astype(np.float64))
        fit = fit_jit(x, y, w, alpha)
        np.testing.assert_allclose(fit.coef, ref.coef_, atol=2e-5)
        np.testing.assert_allclose(fit.intercept, ref.intercept_, atol=5e-5)


def test_cosine_kernel_weights_match_definition():
    a = jax.nn.relu(jax.random.normal(jax.random.PRNGKey(0), (2, 3, 3, 5)))
    masks = jnp.array([[1, 0, 1, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], jnp.float32)
    got = cosine_kernel_weights(a, masks, kernel_width=0.8)
    for n, m in enumerate(masks):
        for b in range(2):
            u, v = np.asarray(a[b]).ravel(), np.asarray(a[b] * m).ravel()
            cos = u @ v / max(np.linalg.norm(u) * np.linalg.norm(v), 1e-12)
            np.testing.assert_allclose(got[n, b], np.exp(-((1 - cos) ** 2) / (2 * 0.8 ** 2)), rtol=1e-5)


# ---------------------------------------------------------------------------
# LIME-CAM
# ---------------------------------------------------------------------------

class _GapLinear(nn.Module):
    @nn.compact
    def __call__(self, a):
        return nn.Dense(5)(jnp.mean(a, axis=(1, 2)))


class _Nonlinear(nn.Module):
    @nn.compact
    def __call__(self, a):
        h = nn.relu(nn.Conv(6, (3, 3))(a))
        return nn.Dense(5)(jnp.tanh(nn.Dense(12)(jnp.mean(h, axis=(1, 2)))))


def _setup(module, k=8, b=2, seed=0):
    a = 3.0 * jax.nn.relu(jax.random.normal(jax.random.PRNGKey(seed), (b, 4, 4, k)))
    p = module.init(jax.random.PRNGKey(seed + 1), a)
    return (lambda params, z: module.apply(params, z)), p, a


def test_lime_cam_recovers_a_linear_head():
    """The head is linear in the masks, y = b_c + sum_k z_k w_ck mean(A_k): with a vanishing
    penalty the weighted regression recovers these coefficients exactly."""
    head, p, a = _setup(_GapLinear(), k=8)
    t = jnp.array([1, 4])
    phi, fit = jax.jit(lambda p, a, key: lime_cam_coefficients(head, p, a, t, key, num_samples=64, alpha=1e-7,
                                                               tol=1e-10, max_iter=20000))(p, a, jax.random.PRNGKey(0))
    expected = p["params"]["Dense_0"]["kernel"][:, t].T * jnp.mean(a, axis=(1, 2))
    np.testing.assert_allclose(phi, expected, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(fit.intercept, p["params"]["Dense_0"]["bias"][t], atol=1e-3)


def test_lime_cam_is_its_definition():
    """Bernoulli masks from the key, head values, cosine weights, one Lasso per image.

    (32 masks for 8 channels: with as few masks as channels two mask columns can be
    complementary, and the Lasso optimum is then not unique.)"""
    head, p, a = _setup(_Nonlinear(), k=8, seed=3)
    t = jnp.array([0, 2])
    key = jax.random.PRNGKey(7)
    phi, _ = jax.jit(lambda p, a, key: lime_cam_coefficients(head, p, a, t, key, num_samples=32))(p, a, key)
    masks = jax.random.bernoulli(key, 0.5, (32, 8)).astype(jnp.float32)
    jhead = jax.jit(head)
    y = jnp.stack([jhead(p, a * m)[jnp.arange(2), t] for m in masks])
    w = cosine_kernel_weights(a, masks)
    for b in range(2):
        ref, _ = _cd_lasso(masks, y[:, b], w[:, b], 0.01)
        np.testing.assert_allclose(phi[b], ref, atol=5e-5)
    np.testing.assert_allclose(y, coalition_values(head, p, a, t, masks), rtol=1e-5, atol=1e-6)


def test_lime_cam_registered_keyed_and_batch_invariant():
    m = registry.get("lime-cam")
    assert m.needs_key
    head, p, a = _setup(_Nonlinear(), k=8, b=3, seed=5)
    split = Split(lambda params, x: x, head)
    fn = lj.explainer(split, "lime-cam", chunk_size=3)
    t = jnp.array([0, 1, 2])
    e1 = fn(p, a, t, jax.random.PRNGKey(1))
    e1b = fn(p, a, t, jax.random.PRNGKey(1))
    e2 = fn(p, a, t, jax.random.PRNGKey(2))
    np.testing.assert_array_equal(e1.coefficients, e1b.coefficients)
    assert not np.allclose(e1.coefficients, e2.coefficients)
    alone = fn(p, a[2:], t[2:], jax.random.PRNGKey(1))
    np.testing.assert_allclose(e1.coefficients[2], alone.coefficients[0], rtol=1e-4, atol=1e-5)
    assert e1.maps.shape == (3, 4, 4)


def test_lime_cam_usage_errors():
    head, p, a = _setup(_Nonlinear(), k=8)
    with pytest.raises(UsageError, match="PRNG key"):
        lime_cam_coefficients(head, p, a, jnp.array([0, 1]), None)
    with pytest.raises(UsageError, match="num_samples"):
        lime_cam_coefficients(head, p, a, jnp.array([0, 1]), jax.random.PRNGKey(0), num_samples=1)
