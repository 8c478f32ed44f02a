"""The DeepLIFT rescale transformation: properties that cannot be faked."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import flax.linen as nn

from liftcam_jax import rescale
from liftcam_jax.rescale import NoRescaleRule, deeplift, linearize


class MixedHead(nn.Module):
    """Everything a CNN head meets: max-pool, BN, depthwise conv, ReLU6, residual, avg-pool, MLP."""

    @nn.compact
    def __call__(self, a):
        k = a.shape[-1]
        y = nn.Conv(k, (3, 3), padding="SAME", feature_group_count=k)(a)
        y = nn.BatchNorm(use_running_average=True, epsilon=1e-3)(y)
        y = jax.nn.relu6(y)
        y = y + nn.Conv(k, (1, 1))(a)  # residual add of two input-dependent values
        y = nn.max_pool(y, (2, 2), (2, 2))
        y = nn.avg_pool(jax.nn.relu(y), (2, 2), (1, 1))
        y = y.reshape(y.shape[0], -1)
        y = jax.nn.relu(nn.Dense(12)(y))
        y = jnp.tanh(nn.Dense(12)(y))
        return nn.Dense(5)(y)


def _random_bn(variables, key):
    """Non-trivial BN statistics and biases so the reference's hidden inputs are not zero."""
    leaves, tree = jax.tree_util.tree_flatten(variables)
    keys = jax.random.split(key, len(leaves))
    new = [l + 0.3 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)]
    new = [jnp.abs(n) + 0.5 if "var" in str(p) else n
           for n, (p, _) in zip(new, jax.tree_util.tree_flatten_with_path(variables)[0])]
    return jax.tree_util.tree_unflatten(tree, new)


@pytest.fixture(scope="module")
def mixed():
    head = MixedHead()
    a = jax.nn.relu(jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 6)))
    v = jax.jit(lambda k: _random_bn(head.init(k, a), jax.random.PRNGKey(2)))(jax.random.PRNGKey(1))  # one program
    return head, v, a


def _rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-12))


@pytest.mark.parametrize("ref_kind", ["zero", "random"])
def test_summation_to_delta_mixed_head(mixed, ref_kind):
    head, v, a = mixed
    ref = jnp.zeros_like(a) if ref_kind == "zero" else jax.random.uniform(jax.random.PRNGKey(3), a.shape)
    f = lambda z: head.apply(v, z)
    lin = linearize(f, a, ref)
    # the whole output vector, all classes at once
    assert _rel(lin.linear(a - ref), lin.out - lin.out_ref) < 1e-5
    for t in range(5):
        r = deeplift(f, a, ref, targets=t)
        gap = (r.out - r.out_ref)[:, t]
        assert float(jnp.max(jnp.abs(r.delta))) <= 1e-5 * float(jnp.max(jnp.abs(gap)))
    assert set(lin.nonlinear) >= {"custom_jvp_call[relu6]", "reduce_window_max", "tanh"}


class ZeroPathHead(nn.Module):
    """Layers that map a zero reference to zero (bias-free conv and dense, zero padding,
    padded max-pooling, slicing, concatenation, sums) before and after nonlinearities."""

    @nn.compact
    def __call__(self, a):
        y = nn.Conv(8, (3, 3), padding=1, use_bias=False)(a)
        y = jax.lax.pad(y, 0.0, ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 0)))
        y = nn.max_pool(y, (3, 3), (2, 2), padding="SAME")
        y = jnp.concatenate([y, -y[..., :2]], axis=-1) + y[..., :1]
        y = y.reshape(y.shape[0], -1)
        y = jax.nn.relu(nn.Dense(16)(y))
        return nn.Dense(5, use_bias=False)(y)


@pytest.mark.parametrize("which", ["mixed", "zero-path"])
def test_symbolic_zero_reference_equals_explicit_zeros(mixed, which):
    """``x_ref=None`` keeps the zero reference symbolic through zero-preserving layers:
    the same outputs, reference outputs, multipliers and nonlinearities as explicit zeros."""
    if which == "mixed":
        head, v, a = mixed
    else:
        head = ZeroPathHead()
        a = jax.random.normal(jax.random.PRNGKey(7), (3, 7, 7, 4))
        v = head.init(jax.random.PRNGKey(8), a)
    f = lambda z: head.apply(v, z)
    sym = linearize(f, a)
    explicit = linearize(f, a, jnp.zeros_like(a))
    np.testing.assert_allclose(sym.out_ref, explicit.out_ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(sym.out, explicit.out, rtol=1e-6, atol=1e-6)
    assert sym.nonlinear == explicit.nonlinear
    ct = jax.random.normal(jax.random.PRNGKey(9), sym.out.shape)
    np.testing.assert_allclose(sym.transpose(ct), explicit.transpose(ct), rtol=1e-5, atol=1e-6)
    assert _rel(sym.linear(a), sym.out - sym.out_ref) < 1e-5
    r = jax.jit(lambda z: deeplift(f, z, targets=1))(a)
    assert float(jnp.max(jnp.abs(r.delta))) <= 1e-5 * float(jnp.max(jnp.abs(r.out)))
    if which == "zero-path":
        # The reference pass skips every layer before the first bias: no convolution
        # or pooling is compiled for it, while explicit zeros compute them.
        def hlo(ref):
            g = jax.jit(lambda p, z: linearize(lambda q: head.apply(p, q), z, ref(z)).out_ref)
            txt = g.lower(v, a).compile().as_text()
            return txt.count("convolution("), txt.count("reduce-window(")
        assert hlo(lambda z: None) == (0, 0)
        assert hlo(jnp.zeros_like) == (1, 1)


def test_linear_map_is_linear_and_transpose_is_adjoint(mixed):
    head, v, a = mixed
    lin = linearize(lambda z: head.apply(v, z), a, jnp.zeros_like(a))
    k1, k2 = jax.random.split(jax.random.PRNGKey(5))
    d1, d2 = jax.random.normal(k1, a.shape), jax.random.normal(k2, a.shape)
    assert _rel(lin.linear(2.0 * d1 + d2), 2.0 * lin.linear(d1) + lin.linear(d2)) < 1e-5
    ct = jax.random.normal(k2, lin.out.shape)
    lhs = jnp.vdot(lin.linear(d1), ct)
    rhs = jnp.vdot(d1, lin.transpose(ct))
    assert abs(float(lhs - rhs)) <= 1e-4 * abs(float(lhs))


def test_hand_computed_two_layer_network():
    """m = W2^T diag(secant) W1^T for y = W2 relu(W1 x + b1) + b2, computed by hand in numpy."""
    rng = np.random.default_rng(0)
    w1, b1 = rng.normal(size=(7, 9)), rng.normal(size=9)
    w2, b2 = rng.normal(size=(9, 3)), rng.normal(size=3)
    x, xr = rng.normal(size=(1, 7)), rng.normal(size=(1, 7))
    f = lambda z: jax.nn.relu(z @ w1 + b1) @ w2 + b2
    u, ur = x @ w1 + b1, xr @ w1 + b1
    slope = (np.maximum(u, 0) - np.maximum(ur, 0)) / (u - ur)
    m_expected = (w1 * slope) @ w2[:, 2]  # (7,)
    r = deeplift(f, jnp.asarray(x, jnp.float32), jnp.asarray(xr, jnp.float32), targets=2)
    np.testing.assert_allclose(np.asarray(r.multipliers[0]), m_expected, rtol=1e-4, atol=1e-5)


def test_purely_linear_function_gives_gradient_times_input():
    head = nn.Sequential([nn.Conv(4, (3, 3)), lambda y: y.reshape(y.shape[0], -1), nn.Dense(3)])
    a = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 5, 3))
    v = head.init(jax.random.PRNGKey(1), a)
    f = lambda z: head.apply(v, z)
    r = deeplift(f, a, targets=jnp.array([0, 2]))
    grad = jax.vmap(lambda z, t: jax.grad(lambda q: f(q[None])[0, t])(z))(a, jnp.array([0, 2]))
    assert _rel(r.multipliers, grad) < 1e-5
    assert _rel(r.attributions, grad * a) < 1e-5
    assert rescale.nonlinear_primitives(f, a) == ()


def test_gap_linear_head_closed_form():
    head = nn.Dense(6)
    a = jax.random.uniform(jax.random.PRNGKey(0), (3, 7, 7, 10))
    v = head.init(jax.random.PRNGKey(1), a.mean((1, 2)))
    from liftcam_jax import lift_cam_coefficients

    targets = jnp.array([0, 5, 3])
    phi, out, out_ref = lift_cam_coefficients(lambda p, z: head.apply(p, z.mean((1, 2))), v, a, targets)
    w = v["params"]["kernel"]
    expected = w[:, targets].T * a.mean((1, 2))
    assert _rel(phi, expected) < 1e-5
    np.testing.assert_allclose(out_ref, jnp.broadcast_to(v["params"]["bias"], out.shape), rtol=1e-6)


def test_max_pool_routes_to_argmax_with_zero_reference():
    a = jax.nn.relu(jax.random.normal(jax.random.PRNGKey(0), (1, 4, 4, 2)))
    w = jax.random.normal(jax.random.PRNGKey(1), (8, 1))
    f = lambda z: nn.max_pool(z, (2, 2), (2, 2)).reshape(1, -1) @ w
    r = deeplift(f, a, targets=0)
    # the DeepLIFT attribution of each window goes wholly to its max: g * max
    pooled = nn.max_pool(a, (2, 2), (2, 2)).reshape(-1)
    per_window = (pooled * w[:, 0])
    got = r.attributions.reshape(1, 2, 2, 2, 2, 2).transpose(0, 1, 3, 5, 2, 4).reshape(-1, 4).sum(-1)
    np.testing.assert_allclose(np.sort(np.asarray(got)), np.sort(np.asarray(per_window)), rtol=1e-5, atol=1e-6)
    assert abs(float(r.delta[0])) < 1e-5


def test_fallback_to_derivative_where_difference_vanishes():
    # x == x_ref at some positions: contributions there are exactly zero, delta still holds
    x = jnp.array([[1.0, -2.0, 0.5, 3.0]])
    xr = jnp.array([[1.0, 1.0, 0.5, -1.0]])
    f = lambda z: jnp.sum(jax.nn.relu(z) * jnp.array([1.0, 2.0, 3.0, 4.0]), axis=-1)
    r = deeplift(f, x, xr)
    assert float(r.attributions[0, 0]) == 0.0 and float(r.attributions[0, 2]) == 0.0
    assert abs(float(r.delta[0])) < 1e-6
    assert float(r.multipliers[0, 0]) == 1.0  # relu'(1) = 1 where the secant is undefined


def test_pytree_inputs_and_outputs():
    def f(d):
        h = jax.nn.relu(d["a"] @ jnp.ones((3, 2)) + d["b"])
        return {"y": h.sum(-1, keepdims=True) * jnp.array([[1.0, -1.0]])}

    x = {"a": jnp.array([[1.0, -2.0, 3.0]]), "b": jnp.array([[0.5, -0.5]])}
    xr = jax.tree_util.tree_map(jnp.zeros_like, x)
    lin = linearize(f, x, xr)
    diff = jax.tree_util.tree_map(lambda p, q: p - q, x, xr)
    out = lin.linear(diff)
    np.testing.assert_allclose(out["y"], lin.out["y"] - lin.out_ref["y"], rtol=1e-6)
    m = lin.transpose({"y": jnp.array([[1.0, 0.0]])})
    assert set(m) == {"a", "b"}


@pytest.mark.parametrize(
    "fun, name",
    [
        (lambda a: jax.lax.stop_gradient(a).sum(-1, keepdims=True), "stop_gradient"),
        (lambda a: jnp.where(a[:, :1] > 0, a, 0.1 * a).sum(-1, keepdims=True), "gt"),
        (lambda a: jnp.maximum(a[:, :2], a[:, 2:]).sum(-1, keepdims=True), "max"),
        (lambda a: jnp.sort(a, axis=-1), "sort"),
    ],
)
def test_no_rule_is_a_clear_error_naming_the_primitive(fun, name):
    with pytest.raises(NoRescaleRule, match=repr(name)):
        deeplift(fun, jnp.ones((2, 4)))


def test_jit_and_vmap_compose(mixed):
    head, v, a = mixed

    @jax.jit
    def delta(p, z):
        return deeplift(lambda q: head.apply(p, q), z, targets=jnp.array([0, 1, 2, 3])).delta

    d = delta(v, a)
    assert float(jnp.max(jnp.abs(d))) < 1e-4
    dv = jax.vmap(delta, in_axes=(None, 0))(v, jnp.stack([a, 2.0 * a]))
    assert dv.shape == (2, 4)
    np.testing.assert_allclose(dv[0], d, atol=1e-5)


def test_calls_remat_and_custom_vjp_are_interpreted():
    @jax.custom_vjp
    def weird_identity(x):
        return x

    weird_identity.defvjp(lambda x: (x, None), lambda _, g: (10.0 * g,))  # a wrong gradient on purpose
    f = lambda a: jax.checkpoint(lambda z: jax.nn.relu(weird_identity(z)))(a).sum(-1, keepdims=True)
    x = jnp.array([[1.0, 2.0, -3.0]])
    r = deeplift(f, x)
    # DeepLIFT looks inside: the custom (wrong) backward rule is not used
    np.testing.assert_allclose(r.multipliers, [[1.0, 1.0, 0.0]])
