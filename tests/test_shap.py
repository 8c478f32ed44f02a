"""Shapley values of activation maps: enumeration, permutation sampling, Kernel SHAP.

Properties that cannot be faked: an independent brute-force enumeration,
efficiency, LIFT-CAM's closed form for a linear head, symmetric and dummy
players, and convergence of both samplers to the exact values within their
standard errors (with calibrated standard errors).
"""
import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from liftcam_jax import shap
from liftcam_jax.errors import UsageError
from liftcam_jax.methods.lift_cam import lift_cam_coefficients

K = 10


class _Head(nn.Module):
    """A small nonlinear head: conv -> ReLU -> GAP -> Dense -> tanh -> Dense."""

    @nn.compact
    def __call__(self, a):
        h = nn.relu(nn.Conv(8, (3, 3))(a))
        h = jnp.mean(h, axis=(1, 2))
        h = jnp.tanh(nn.Dense(16)(h))
        return nn.Dense(5)(h)


def _randomise(params, key, scale=0.5):
    leaves = jax.tree_util.tree_leaves_with_path(params)
    keys = jax.random.split(key, len(leaves))
    new = [
        scale * jax.random.normal(k, v.shape) if "bias" in jax.tree_util.keystr(p) else 2.0 * v
        for (p, v), k in zip(leaves, keys)
    ]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), new)


def _game(k=K, b=2, seed=0):
    m = _Head()
    a = jax.nn.relu(jax.random.normal(jax.random.PRNGKey(seed), (b, 5, 5, k))) * 2.0
    p = _randomise(m.init(jax.random.PRNGKey(seed + 1), a), jax.random.PRNGKey(seed + 2))
    return (lambda params, z: m.apply(params, z)), p, a


@pytest.fixture(scope="module")
def game():
    head, p, a = _game()
    t = jnp.array([1, 3])
    exact = jax.jit(lambda p, a: shap.exact_shapley(head, p, a, t))(p, a)
    return head, p, a, t, exact


def _ends(head, p, a, t):
    rows = jnp.arange(a.shape[0])
    return head(p, jnp.zeros_like(a))[rows, t], head(p, a)[rows, t]


def test_exact_matches_brute_force_enumeration():
    """An independent implementation: the Shapley formula over itertools subsets, float64."""
    head, p, a = _game(k=5, b=2, seed=7)
    t = jnp.array([0, 4])
    got = jax.jit(lambda p, a: shap.exact_shapley(head, p, a, t).values)(p, a)
    k = 5
    jhead = jax.jit(head)
    cache = {}

    def v(s, b):
        if (s, b) not in cache:
            mask = np.zeros(k, np.float32)
            mask[list(s)] = 1.0
            cache[s, b] = float(jhead(p, a[b : b + 1] * mask)[0, t[b]])
        return cache[s, b]

    for b in range(2):
        for j in range(k):
            others = [i for i in range(k) if i != j]
            phi = 0.0
            for r in range(k):
                for s in itertools.combinations(others, r):
                    w = math.factorial(r) * math.factorial(k - r - 1) / math.factorial(k)
                    phi += w * (v(s + (j,), b) - v(s, b))
            np.testing.assert_allclose(got[b, j], phi, rtol=1e-4, atol=1e-6)


def test_efficiency(game):
    head, p, a, t, exact = game
    v0, v1 = _ends(head, p, a, t)
    scale = float(jnp.max(jnp.abs(exact.values)))
    np.testing.assert_allclose(exact.values.sum(1), v1 - v0, atol=1e-5 * K * scale)
    assert np.all(exact.stderr == 0)
    for method, n in (("permutation", 16), ("kernel", 64)):
        r = jax.jit(lambda p, a: shap.shap_values(head, p, a, t, method=method, num_samples=n,
                                                  key=jax.random.PRNGKey(1)))(p, a)
        np.testing.assert_allclose(r.values.sum(1), v1 - v0, atol=1e-5 * K * scale)


def test_exact_equals_lift_cam_for_a_linear_head():
    """GAP -> Linear: phi_k = w_ck mean(A_k), LIFT-CAM's coefficients."""
    m = nn.Dense(6)
    head = lambda params, z: m.apply(params, jnp.mean(z, axis=(1, 2)))
    a = jax.nn.relu(jax.random.normal(jax.random.PRNGKey(3), (3, 4, 4, 8)))
    p = _randomise(m.init(jax.random.PRNGKey(4), jnp.zeros((1, 8))), jax.random.PRNGKey(5))
    t = jnp.array([0, 2, 5])
    exact = jax.jit(lambda p, a: shap.exact_shapley(head, p, a, t).values)(p, a)
    lift, _, _ = jax.jit(lambda p, a: lift_cam_coefficients(head, p, a, t))(p, a)
    np.testing.assert_allclose(exact, lift, rtol=1e-4, atol=1e-6)


def test_symmetric_and_dummy_players():
    """Channels 0 and 1 are interchangeable (same maps, same weights); channel 2 is never used."""
    m = _Head()
    a = jax.nn.relu(jax.random.normal(jax.random.PRNGKey(8), (1, 5, 5, 8))) * 2.0
    a = a.at[..., 1].set(a[..., 0])
    p = _randomise(m.init(jax.random.PRNGKey(9), a), jax.random.PRNGKey(10))
    kern = p["params"]["Conv_0"]["kernel"]  # (3, 3, in, out)
    kern = kern.at[:, :, 1, :].set(kern[:, :, 0, :]).at[:, :, 2, :].set(0.0)
    p = {"params": {**p["params"], "Conv_0": {**p["params"]["Conv_0"], "kernel": kern}}}
    head = lambda params, z: m.apply(params, z)
    t = jnp.array([2])
    run = jax.jit(
        lambda p, a, method, n: shap.shap_values(head, p, a, t, method=method, num_samples=n,
                                                 key=jax.random.PRNGKey(0)),
        static_argnums=(2, 3),
    )
    exact = run(p, a, "exact", 0).values[0]
    assert abs(float(exact[0])) > 1e-3
    np.testing.assert_allclose(exact[0], exact[1], rtol=1e-4)
    assert abs(float(exact[2])) < 1e-6
    perm = run(p, a, "permutation", 32)
    assert abs(float(perm.values[0, 2])) < 1e-6 and float(perm.stderr[0, 2]) < 1e-6
    ker = run(p, a, "kernel", 256)
    assert abs(float(ker.values[0, 2])) <= 4 * float(ker.stderr[0, 2]) + 1e-6
    assert abs(float(ker.values[0, 0] - ker.values[0, 1])) <= 4 * float(ker.stderr[0, 0] + ker.stderr[0, 1])


@pytest.mark.parametrize("method, small, large", [("permutation", 32, 512), ("kernel", 128, 2048)])
def test_samplers_converge_to_exact(game, method, small, large):
    head, p, a, t, exact = game
    f = jax.jit(
        lambda p, a, key, n: shap.shap_values(head, p, a, t, method=method, num_samples=n, key=key),
        static_argnums=3,
    )
    errs, zs = {}, []
    for n in (small, large):
        rmse = []
        for s in range(8):
            r = f(p, a, jax.random.PRNGKey(100 + s), n)
            rmse.append(float(jnp.sqrt(jnp.mean((r.values - exact.values) ** 2))))
            z = (r.values - exact.values) / r.stderr
            zs.append(np.asarray(z))
            assert float(jnp.mean(jnp.abs(z) <= 4.0)) >= 0.9  # within 4 SE for most channels
        errs[n] = np.mean(rmse)
    # 16x the samples: the error shrinks (about 4x for a root-n estimator)
    assert errs[large] < 0.5 * errs[small], errs
    # calibrated standard errors: z-scores have unit spread
    zs = np.concatenate([z.ravel() for z in zs])
    assert 0.6 < np.std(zs) < 1.5, np.std(zs)


def test_batch_invariance_and_chunking(game):
    """An image's estimate does not depend on the batch, nor on the chunk size."""
    head, p, a, t, exact = game
    key = jax.random.PRNGKey(3)
    run = jax.jit(
        lambda p, a, t, method, n, c: shap.shap_values(head, p, a, t, method=method, num_samples=n, key=key,
                                                       chunk_size=c),
        static_argnums=(3, 4, 5),
    )
    for method, n in (("permutation", 8), ("kernel", 64)):
        both = run(p, a, t, method, n, 7)
        one = run(p, a[1:], t[1:], method, n, 64)
        np.testing.assert_allclose(both.values[1], one.values[0], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(both.stderr[1], one.stderr[0], rtol=1e-3, atol=1e-6)
    masks = (jax.random.uniform(jax.random.PRNGKey(0), (13, K)) < 0.5).astype(jnp.float32)
    values = jax.jit(lambda p, a, c: shap.coalition_values(head, p, a, t, masks, chunk_size=c), static_argnums=2)
    v1, v5 = values(p, a, 1), values(p, a, 5)
    np.testing.assert_allclose(v1, v5, rtol=1e-5, atol=1e-6)
    direct = jax.vmap(lambda m: jax.jit(head)(p, a * m)[jnp.arange(2), t])(masks)
    np.testing.assert_allclose(v5, direct, rtol=1e-5, atol=1e-6)


def test_usage_errors(game):
    head, p, a, t, _ = game
    big = jnp.ones((1, 2, 2, 17))
    with pytest.raises(UsageError, match="at most 16"):
        shap.exact_shapley(lambda params, z: z.sum((1, 2)), None, big, 0)
    with pytest.raises(UsageError, match="even"):
        shap.shap_values(head, p, a, t, method="permutation", num_samples=7, key=jax.random.PRNGKey(0))
    with pytest.raises(UsageError, match="PRNG key"):
        shap.shap_values(head, p, a, t, method="kernel", num_samples=8)
    with pytest.raises(UsageError, match="valid methods: exact, permutation, kernel"):
        shap.shap_values(head, p, a, t, method="banzhaf", num_samples=8, key=jax.random.PRNGKey(0))
    with pytest.raises(UsageError, match="chunk_size"):
        shap.coalition_values(head, p, a, t, jnp.ones((2, K)), chunk_size=0)
