"""The shared jaxpr interpreter: rewrites (generic reduce_window, scan, cond), refusals, user rules."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import liftcam_jax as lj
from liftcam_jax import lrp, rescale
from liftcam_jax.errors import LiftcamError
from liftcam_jax.lrp import NoRelevanceRule
from liftcam_jax.rescale import NoRescaleRule, deeplift

KEY = jax.random.PRNGKey(0)


def _x(shape=(2, 6, 6, 3), seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), shape)


def _dense(x, seed=1, out=4):
    w = jax.random.normal(jax.random.PRNGKey(seed), (x.shape[-1], out))
    return x @ w


def _pool_head(pool):
    return lambda a: _dense(jax.nn.relu(pool(a) - 0.3).reshape(a.shape[0], -1), out=4)


def _generic_max(a, init=-jnp.inf, padding=((0, 0), (1, 1), (1, 1), (0, 0))):
    return lax.reduce_window(a, init, lambda u, v: jnp.maximum(u, v), (1, 3, 3, 1), (1, 2, 2, 1), padding)


def _flax_max(a):
    return nn.max_pool(a, (3, 3), (2, 2), padding=((1, 1), (1, 1)))


def test_generic_reduce_window_max_is_the_max_pool_rule():
    """A max-pool written with a jaxpr reducer gets exactly the max-pool's rules."""
    a, ref = _x(), 0.5 * _x(seed=3)
    generic = deeplift(_pool_head(_generic_max), a, ref, 1)
    special = deeplift(_pool_head(_flax_max), a, ref, 1)
    np.testing.assert_allclose(generic.attributions, special.attributions, rtol=1e-5, atol=1e-6)
    assert float(jnp.max(jnp.abs(generic.delta))) < 1e-4
    g, s = lrp.lrp(_pool_head(_generic_max), a, 1), lrp.lrp(_pool_head(_flax_max), a, 1)
    np.testing.assert_allclose(g.attributions, s.attributions, rtol=1e-5, atol=1e-6)


def test_generic_reduce_window_with_a_finite_init_and_a_sum():
    a = _x()
    # init 0: max(0, max(window, padded with 0)) == max(relu(maxpool padded with -inf), 0)
    f = _pool_head(lambda z: _generic_max(z, 0.0))
    g = _pool_head(lambda z: jnp.maximum(_flax_max(z), 0.0))
    np.testing.assert_allclose(deeplift(f, a, None, 2).attributions, deeplift(g, a, None, 2).attributions,
                               rtol=1e-5, atol=1e-6)
    s = lambda z: lax.reduce_window(z, 0.0, lambda u, v: u + v, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    t = lambda z: nn.avg_pool(z, (2, 2), (2, 2)) * 4.0
    r1, r2 = deeplift(_pool_head(s), a, None, 0), deeplift(_pool_head(t), a, None, 0)
    np.testing.assert_allclose(r1.attributions, r2.attributions, rtol=1e-5, atol=1e-6)


def test_scan_and_fori_loop_are_unrolled():
    ws = jax.random.normal(KEY, (3, 4, 4)) * 0.7

    def loop(a):
        for w in ws:
            a = jnp.tanh(a @ w)
        return a

    def scanned(a):
        return lax.scan(lambda c, w: (jnp.tanh(c @ w), None), a, ws)[0]

    def fori(a):
        return lax.fori_loop(0, 3, lambda i, c: jnp.tanh(c @ ws[i]), a)

    a = _x((5, 4))
    want = deeplift(loop, a, None, 1)
    for f in (scanned, fori):
        got = deeplift(f, a, None, 1)
        np.testing.assert_allclose(got.attributions, want.attributions, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lrp.lrp(scanned, a, 1).attributions, lrp.lrp(loop, a, 1).attributions,
                               rtol=1e-5, atol=1e-6)


def test_scan_stacks_its_outputs_in_order():
    def f(a):
        _, ys = lax.scan(lambda c, x: (c + x, jax.nn.relu(c * 2.0 - x)), a[:, 0], jnp.moveaxis(a, 1, 0),
                         reverse=True)
        return ys.sum(0)

    def g(a):
        c, ys = a[:, 0], []
        for i in reversed(range(a.shape[1])):
            ys.append(jax.nn.relu(c * 2.0 - a[:, i]))
            c = c + a[:, i]
        return sum(ys)

    a = _x((3, 4, 2))
    np.testing.assert_allclose(deeplift(f, a, None, 0).attributions, deeplift(g, a, None, 0).attributions,
                               rtol=1e-5, atol=1e-6)


def test_cond_with_a_traced_input_independent_index_takes_its_branch():
    def head(flag, a):
        return lax.cond(flag, lambda z: jax.nn.relu(z) @ jnp.ones((4, 3)), lambda z: jnp.tanh(z) @ jnp.ones((4, 3)), a)

    a = _x((2, 4))
    explain = jax.jit(lambda flag, z: deeplift(lambda q: head(flag, q), z, None, 0).attributions)
    relu = deeplift(lambda z: jax.nn.relu(z) @ jnp.ones((4, 3)), a, None, 0).attributions
    tanh = deeplift(lambda z: jnp.tanh(z) @ jnp.ones((4, 3)), a, None, 0).attributions
    np.testing.assert_allclose(explain(True, a), relu, rtol=1e-6)
    np.testing.assert_allclose(explain(False, a), tanh, rtol=1e-6)
    np.testing.assert_allclose(deeplift(lambda q: head(True, q), a, None, 0).attributions, relu, rtol=1e-6)


@pytest.mark.parametrize("fun, name", [
    (lambda a: jax.nn.softmax(_dense(a)), "softmax"),
    (lambda a: jax.nn.log_softmax(_dense(a)), "log_softmax"),
    (lambda a: nn.softmax(_dense(a)), "softmax"),
    (lambda a: lax.while_loop(lambda c: c[1] < 3, lambda c: (jnp.tanh(c[0]), c[1] + 1), (a, 0))[0], "'while'"),
    (lambda a: lax.reduce_window(a, 1.0, lambda u, v: u * v, (1, 2), (1, 2), "VALID"), "'reduce_window'"),
    (lambda a: lax.scan(lambda c, x: (jnp.maximum(c, x), c), a[:, 0], a.T)[1].T, "'max'"),
    (lambda a: jnp.where(a[:, :1] > 0, a, 0.0), "gt"),
])
def test_refused_primitives_are_one_line_errors_naming_them(fun, name):
    a = _x((2, 4))
    for err, run in ((NoRescaleRule, lambda: deeplift(fun, a, None, 0)),
                     (NoRelevanceRule, lambda: lrp.lrp(fun, a, 0))):
        with pytest.raises(err, match=name) as info:
            run()
        assert isinstance(info.value, LiftcamError)
        assert "\n" not in str(info.value)
    if "softmax" in name:
        assert "logits" in str(info.value)


class SEHead(nn.Module):
    """A squeeze-excitation gate, then GAP and a linear classifier."""

    @nn.compact
    def __call__(self, a):
        s = jnp.mean(a, axis=(1, 2), keepdims=True)
        g = jax.nn.sigmoid(nn.Dense(a.shape[-1])(jax.nn.relu(nn.Dense(4)(s))))
        y = jax.nn.relu(a * g)
        return nn.Dense(5)(jnp.mean(y, axis=(1, 2)))


def product_rule(xs, refs, **params):
    (a, b), (ar, br) = xs, refs
    if a is ar or b is br:
        return None  # one constant factor: the built-in rule
    return a * b, ar * br, lambda da, db: (b + br) / 2 * da + (a + ar) / 2 * db


def signal_takes_all(xs, refs, **params):
    """A different exact split: all of a * g - a' * g' to the signal a (the gate held at g)."""
    (a, g), (ar, gr) = xs, refs
    if a is ar or g is gr:
        return None
    return a * g, ar * gr, lambda da, dg: g * da + ar * dg


def test_the_built_in_product_rule_is_the_readme_example_and_a_registered_rule_wins():
    """A squeeze-excitation gate a * sigmoid(s(a)): the built-in Shapley split equals the README's
    registered ``product_rule``; a different registered rule takes precedence (and is exact too)."""
    head = SEHead()
    a = jax.nn.relu(_x((2, 4, 4, 8)))
    v = head.init(KEY, a)
    f = lambda z: head.apply(v, z)
    targets = jnp.array([1, 3])
    built_in = deeplift(f, a, None, targets)
    assert float(jnp.max(jnp.abs(built_in.delta))) < 1e-5
    try:
        assert rescale.register_rule(jax.lax.mul_p, product_rule) is None
        r = deeplift(f, a, None, targets)
        np.testing.assert_allclose(r.attributions, built_in.attributions, rtol=1e-5, atol=1e-7)
        # the user's rule declines products by a constant (BN-like scales): the built-in rule
        g = deeplift(lambda z: f(z * 2.0), a, None, 1)
        assert float(jnp.max(jnp.abs(g.delta))) < 1e-5
        rescale.register_rule(jax.lax.mul_p, signal_takes_all)
        other = deeplift(f, a, None, targets)
        assert float(jnp.max(jnp.abs(other.delta))) < 1e-5
        assert float(jnp.max(jnp.abs(other.attributions - built_in.attributions))) > 1e-3
        e = jax.jit(lj.explainer(lj.Split(lambda p, x: x, lambda p, z: head.apply(p, z))))(v, a)
        np.testing.assert_allclose(e.coefficients.sum(-1), e.logits[jnp.arange(2), e.targets]
                                   - e.reference_logits[jnp.arange(2), e.targets], rtol=1e-4, atol=1e-5)
    finally:
        rescale.register_rule("mul", None)
    np.testing.assert_allclose(deeplift(f, a, None, targets).attributions, built_in.attributions, rtol=1e-6)


def test_a_registered_lrp_rule():
    def f(z):
        return _dense(z * jax.nn.sigmoid(_dense(z, seed=2)))

    a = _x((2, 4))
    with pytest.raises(NoRelevanceRule, match="'mul'"):
        lrp.lrp(f, a, 0)

    def gate_rule(xs, **params):
        x, g = xs
        if not isinstance(x, jax.Array) or not isinstance(g, jax.Array) or jnp.shape(x) != jnp.shape(g):
            return None
        return x * g, lambda r: [r, jnp.zeros_like(g)]

    try:
        lrp.register_rule(jax.lax.mul_p, gate_rule)
        res = lrp.lrp(f, a, 0)
        # all relevance to the signal: the same as explaining z -> dense(z * const gate)
        gate = jax.nn.sigmoid(_dense(a, seed=2))
        want = lrp.lrp(lambda z: _dense(z * gate), a, 0)
        np.testing.assert_allclose(res.attributions, want.attributions, rtol=1e-5)
    finally:
        lrp.register_rule(jax.lax.mul_p, None)


def test_generic_reduce_with_a_max_reducer_is_reduce_max():
    x = _x((3, 5))
    f = lambda a: _dense(lax.reduce(a, -jnp.inf, lambda u, v: jnp.maximum(u, v), (1,))[:, None], out=2)
    g = lambda a: _dense(jnp.max(a, axis=1)[:, None], out=2)
    np.testing.assert_allclose(deeplift(f, x, None, 1).attributions, deeplift(g, x, None, 1).attributions, rtol=1e-6)
    np.testing.assert_allclose(lrp.lrp(f, x, 1).attributions, lrp.lrp(g, x, 1).attributions, rtol=1e-6)


def test_live_equations_looks_inside_call_bodies():
    """DCE keeps only the operands a call's body reads (jit, remat, custom_jvp, custom_vjp)."""
    from liftcam_jax.interpreter import live_equations

    @jax.custom_jvp
    def first(a, b):
        return a * 2.0

    first.defjvp(lambda primals, tangents: (first(*primals), tangents[0] * 2.0))

    @jax.custom_vjp
    def first_vjp(a, b):
        return jnp.sin(a)

    first_vjp.defvjp(lambda a, b: (jnp.sin(a), a), lambda a, g: (jnp.cos(a) * g, None))

    calls = {
        "jit": jax.jit(lambda a, b: a + 1.0),
        "remat": jax.checkpoint(lambda a, b: a + 1.0),
        "custom_jvp": first,
        "custom_vjp": first_vjp,
    }
    for name, call in calls.items():
        jaxpr = jax.make_jaxpr(lambda x, y: call(jnp.tanh(x), jnp.exp(y)))(1.0, 2.0).jaxpr
        eqns, used = live_equations(jaxpr)
        assert used == [True, False], name
        assert "exp" not in [e.primitive.name for e in eqns], name
    # an unused output: its producers are dead, its inputs unread
    jaxpr = jax.make_jaxpr(jax.jit(lambda x, y: (jnp.sin(x), jnp.cos(y))))(1.0, 2.0).jaxpr
    assert live_equations(jaxpr, [False, True])[1] == [False, True]
