"""LRP-epsilon as a jaxpr transformation, and LRP-CAM.

Checked against an independent NumPy implementation of the per-layer rule,
closed forms (a linear head; conservation without biases), and the errors for
operations without a rule.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import liftcam_jax as lj
from liftcam_jax import lrp as L
from liftcam_jax.methods import registry
from liftcam_jax.methods.lift_cam import lift_cam_coefficients
from liftcam_jax.methods.lrp_cam import lrp_cam_coefficients
from liftcam_jax.model import Split

EPS = 1e-9


def _stab(z):
    return z + np.where(z >= 0, EPS, -EPS)


# ---------------------------------------------------------------------------
# an independent NumPy LRP-epsilon (per layer, float64)
# ---------------------------------------------------------------------------

def _np_linear(x, w, b, r_out):
    z = x @ w + b
    return x * ((r_out / _stab(z)) @ w.T)


def _np_maxpool2(x):
    """2x2/2 max-pool of (B, H, W, C) and the arg-max one-hot mask."""
    b, h, w, c = x.shape
    win = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4).reshape(b, h // 2, w // 2, c, 4)
    idx = win.argmax(-1)
    mask = np.eye(4)[idx]  # (b, h/2, w/2, c, 4)
    return win.max(-1), mask


def _np_maxpool2_lrp(x, r_out):
    z, mask = _np_maxpool2(x)
    s = (r_out / _stab(z))[..., None] * mask
    b, h2, w2, c, _ = s.shape
    g = s.reshape(b, h2, w2, c, 2, 2).transpose(0, 1, 4, 2, 5, 3).reshape(b, 2 * h2, 2 * w2, c)
    return x * g


class _PoolMLP(nn.Module):
    """max-pool -> flatten -> Dense -> ReLU -> Dense (a small VGG-like head)."""

    @nn.compact
    def __call__(self, a):
        a = nn.max_pool(a, (2, 2), strides=(2, 2))
        a = a.reshape(a.shape[0], -1)
        a = nn.relu(nn.Dense(12)(a))
        return nn.Dense(6)(a)


def _random_biases(params, key, scale=0.3):
    leaves, tree = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(key, len(leaves))
    new = [
        scale * jax.random.normal(k, v.shape) if "bias" in jax.tree_util.keystr(p) else v
        for (p, v), k in zip(leaves, keys)
    ]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), new)


@pytest.fixture(scope="module")
def pool_mlp():
    m = _PoolMLP()
    a = jax.nn.relu(jax.random.normal(jax.random.PRNGKey(0), (3, 6, 6, 4)))
    p = _random_biases(m.init(jax.random.PRNGKey(1), a), jax.random.PRNGKey(2))
    return m, p, a


def _np_pool_mlp_lrp(p, a, t):
    p = jax.tree_util.tree_map(lambda v: np.asarray(v, np.float64), p)["params"]
    a = np.asarray(a, np.float64)
    pooled, _ = _np_maxpool2(a)
    x0 = pooled.reshape(a.shape[0], -1)
    z1 = x0 @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
    x1 = np.maximum(z1, 0)
    z2 = x1 @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]
    r2 = np.eye(z2.shape[1])[t] * z2
    r1 = _np_linear(x1, p["Dense_1"]["kernel"], p["Dense_1"]["bias"], r2)  # ReLU passes r1 through
    r0 = _np_linear(x0, p["Dense_0"]["kernel"], p["Dense_0"]["bias"], r1)
    return _np_maxpool2_lrp(a, r0.reshape(pooled.shape)), z2


def test_matches_numpy_reference(pool_mlp):
    m, p, a = pool_mlp
    t = np.array([0, 3, 5])
    res = L.lrp(lambda z: m.apply(p, z), a, t)
    ref, logits = _np_pool_mlp_lrp(p, a, t)
    np.testing.assert_allclose(res.out, logits, rtol=1e-5, atol=1e-6)
    # per-equation epsilon (Dense = dot + bias add) vs per-layer: equal up to epsilon
    np.testing.assert_allclose(res.attributions, ref, rtol=1e-4, atol=1e-6 * np.abs(ref).max())
    assert np.abs(ref).max() > 0.0
    np.testing.assert_allclose(res.delta, logits[np.arange(3), t] - ref.reshape(3, -1).sum(1), atol=1e-4)


def test_default_target_is_argmax(pool_mlp):
    m, p, a = pool_mlp
    f = lambda z: m.apply(p, z)
    res = L.lrp(f, a)
    np.testing.assert_allclose(res.attributions, L.lrp(f, a, jnp.argmax(f(a), -1)).attributions)


class _NoBias(nn.Module):
    """conv -> tanh -> max-pool -> avg-pool -> residual add -> GAP -> Dense, all bias-free."""

    @nn.compact
    def __call__(self, a):
        h = jnp.tanh(nn.Conv(5, (3, 3), use_bias=False)(a))
        h = nn.max_pool(h, (2, 2), strides=(2, 2))
        h = nn.avg_pool(h, (2, 2), strides=(1, 1), padding="SAME")
        h = h + nn.Dense(5, use_bias=False)(nn.avg_pool(a, (2, 2), strides=(2, 2)))  # residual
        return nn.Dense(4, use_bias=False)(jnp.mean(h, axis=(1, 2)))


def test_conservation_without_biases():
    """Without biases, relevance is conserved to the input: sum R = y_c (up to epsilon)."""
    m = _NoBias()
    a = jax.random.normal(jax.random.PRNGKey(3), (2, 8, 8, 3))
    p = m.init(jax.random.PRNGKey(4), a)
    res = L.lrp(lambda z: m.apply(p, z), a, jnp.array([1, 2]))
    score = res.out[jnp.arange(2), jnp.array([1, 2])]
    np.testing.assert_allclose(res.attributions.reshape(2, -1).sum(1), score, rtol=2e-5)
    np.testing.assert_allclose(res.delta, 0.0, atol=2e-5 * float(jnp.max(jnp.abs(score))))


def test_residual_add_splits_in_proportion():
    """z = a*u + v*b with a, b input-dependent: R_a : R_b = contribution of each summand."""
    u, v = 2.0, -0.5
    x = jnp.array([[1.5, 3.0]])

    def f(x):
        return (u * x[:, :1] + v * x[:, 1:]).reshape(1, 1)

    r = L.lrp(f, x, 0).attributions
    z = u * 1.5 + v * 3.0
    np.testing.assert_allclose(r, [[u * 1.5, v * 3.0]], rtol=1e-6)
    np.testing.assert_allclose(r.sum(), z, rtol=1e-6)


def test_stabilizer_sign_of_zero_is_positive():
    z = jnp.array([-2.0, 0.0, 3.0])
    np.testing.assert_array_equal(L.stabilize(z, 0.5), [-2.5, 0.5, 3.5])


def test_epsilon_absorbs_relevance():
    """One linear unit: R_x = x w z / (z + eps sign z), so a large eps shrinks the total."""
    x = jnp.array([[1.0, 2.0]])
    w = jnp.array([[0.5], [0.25]])
    z = 1.0
    for eps in (1e-9, 0.5):
        r = L.lrp(lambda v: v @ w, x, 0, epsilon=eps).attributions
        np.testing.assert_allclose(r, x * w.T * z / (z + eps), rtol=1e-6)


def test_jit_sub_functions_and_custom_vjp_are_interpreted():
    @jax.custom_vjp
    def double(v):
        return 2.0 * v

    double.defvjp(lambda v: (2.0 * v, None), lambda _, g: (2.0 * g,))

    w = jnp.array([[1.0, -2.0], [0.5, 1.0], [-1.0, 0.3]])

    @jax.jit
    def inner(v):
        return jax.nn.relu(v @ w)

    f = lambda v: double(inner(v))
    x = jnp.array([[1.0, 0.5, 0.25]])
    r = L.lrp(f, x, 0).attributions
    z = (x @ w)[0, 0]
    assert z > 0
    # R_out = 2z; the custom_vjp doubling passes it on, the ReLU too, the dot splits it
    np.testing.assert_allclose(r, x * w[:, 0] * (2 * z) / z, rtol=1e-6)


def test_no_rule_names_the_primitive():
    x = jnp.ones((2, 3))
    with pytest.raises(L.NoRelevanceRule, match="'mul'"):
        L.lrp(lambda v: v[:, :1] * v, x, 0)
    with pytest.raises(L.NoRelevanceRule, match="'sort'"):
        L.lrp(lambda v: jnp.sort(v, axis=-1), x, 0)
    with pytest.raises(L.NoRelevanceRule, match="argmax|integer|int32"):
        L.lrp(lambda v: v + jnp.argmax(v, axis=-1, keepdims=True), x, 0)


# ---------------------------------------------------------------------------
# LRP-CAM
# ---------------------------------------------------------------------------

class _GapLinear(nn.Module):
    @nn.compact
    def __call__(self, a):
        return nn.Dense(7)(jnp.mean(a, axis=(1, 2)))


def test_lrp_cam_equals_lift_cam_for_a_linear_head():
    """GAP -> Linear: the bias absorbs exactly its share, phi_k = w_ck mean(A_k) (= LIFT-CAM)."""
    m = _GapLinear()
    a = jax.nn.relu(jax.random.normal(jax.random.PRNGKey(5), (2, 5, 5, 6)))
    p = _random_biases(m.init(jax.random.PRNGKey(6), a), jax.random.PRNGKey(7), scale=1.0)
    head = lambda params, z: m.apply(params, z)
    t = jnp.array([2, 6])
    phi, logits = lrp_cam_coefficients(head, p, a, t)
    lift, _, _ = lift_cam_coefficients(head, p, a, t)
    np.testing.assert_allclose(phi, lift, rtol=1e-5, atol=1e-7)
    w = p["params"]["Dense_0"]["kernel"]
    np.testing.assert_allclose(phi, w[:, t].T * jnp.mean(a, axis=(1, 2)), rtol=1e-5, atol=1e-7)


def test_lrp_cam_is_registered_and_jits(pool_mlp):
    m, p, a = pool_mlp
    assert "lrp-cam" in registry.names()
    assert not registry.get("lrp-cam").needs_key
    split = Split(lambda params, x: x, lambda params, z: m.apply(params, z))
    exp = lj.explainer(split, "lrp-cam")(p, a, jnp.array([1, 2, 3]))
    ref = L.lrp(lambda z: m.apply(p, z), a, jnp.array([1, 2, 3])).attributions.sum(axis=(1, 2))
    np.testing.assert_allclose(exp.coefficients, ref, rtol=1e-5, atol=1e-7)
    assert exp.maps.shape == (3, 6, 6)


def test_lrp_cam_batch_and_several_targets(pool_mlp):
    m, p, a = pool_mlp
    head = lambda params, z: m.apply(params, z)
    targets = jnp.array([[0, 1, 2], [5, 4, 3]])
    phi, _ = lrp_cam_coefficients(head, p, a, targets)
    assert phi.shape == (2, 3, 4)
    for ti in range(2):
        for b in range(3):
            one, _ = lrp_cam_coefficients(head, p, a[b : b + 1], targets[ti, b : b + 1])
            np.testing.assert_allclose(phi[ti, b], one[0], rtol=1e-5, atol=1e-7)
