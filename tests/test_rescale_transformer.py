"""DeepLIFT through what transformer heads contain: products, quotients, softmax, LayerNorm, GELU.

Exactness is proved the ways that cannot be faked: summation-to-delta in float64 (1e-9
relative), the exact two-player Shapley values of a product and a quotient, the secant slope
of GELU in closed form, the invariance of the attributions to softmax's max-shift (jax.nn.softmax
against a hand-written exp / sum), and jax.grad against central finite differences.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from liftcam_jax import lrp, rescale
from liftcam_jax.errors import LiftcamError
from liftcam_jax.lrp import NoRelevanceRule
from liftcam_jax.rescale import NoRescaleRule, deeplift, linearize


def _normal(seed, shape, dtype=jnp.float64):
    return jax.random.normal(jax.random.PRNGKey(seed), shape, dtype)


def _rel_delta(lin, x, r):
    """max |L(x - r) - (f(x) - f(r))| / max |f(x) - f(r)| over every output."""
    d = jax.tree_util.tree_map(lambda a, b: a - b, x, r)
    got, want = lin.linear(d), jax.tree_util.tree_map(lambda a, b: a - b, lin.out, lin.out_ref)
    err = max(float(jnp.max(jnp.abs(g - w))) for g, w in zip(jax.tree_util.tree_leaves(got),
                                                             jax.tree_util.tree_leaves(want)))
    return err / max(float(jnp.max(jnp.abs(w))) for w in jax.tree_util.tree_leaves(want))


# ---------------------------------------------------------------------------
# products and quotients: the exact two-player Shapley split
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("op", ["mul", "dot_general", "div"])
def test_a_product_or_quotient_of_two_inputs_gets_their_exact_shapley_values(x64, op):
    """With the two operands as the inputs, the attributions are the two-player Shapley values
    phi_a = [f(a, b') - f(a', b') + f(a, b) - f(a', b)] / 2 (and the same for b), computed here
    by enumerating the four coalitions."""
    f = {"mul": lambda a, b: a * b, "dot_general": lambda a, b: a @ b,
         "div": lambda a, b: a / (b * b + 0.5)}[op]
    shape_b = (4, 3) if op == "dot_general" else (2, 4)
    x = {"a": _normal(0, (2, 4)), "b": _normal(1, shape_b)}
    r = {"a": _normal(2, (2, 4)), "b": _normal(3, shape_b)}
    if op == "div":  # a numerator negative at the reference: the product form (not the log form)
        x["b"], r["b"] = jnp.sqrt(jnp.abs(x["b"]) + 1.0), jnp.sqrt(jnp.abs(r["b"]) + 1.0)
        r["a"] = -jnp.abs(r["a"])
        g = lambda a, b: a / b  # noqa: E731
        fun = lambda d: d["a"] / d["b"]  # noqa: E731
    else:
        g, fun = f, (lambda d: f(d["a"], d["b"]))
    lin = linearize(fun, x, r)
    assert lin.nonlinear == (op,)
    ct = _normal(4, lin.out.shape)
    m = lin.transpose(ct)
    score = lambda a, b: jnp.sum(ct * g(a, b))  # noqa: E731
    (a, b), (ar, br) = (x["a"], x["b"]), (r["a"], r["b"])
    # one coordinate at a time is not a two-player game; the two players are the operands
    phi_a = (score(a, br) - score(ar, br) + score(a, b) - score(ar, b)) / 2
    phi_b = (score(ar, b) - score(ar, br) + score(a, b) - score(a, br)) / 2
    np.testing.assert_allclose(float(jnp.sum(m["a"] * (a - ar))), float(phi_a), rtol=1e-12)
    np.testing.assert_allclose(float(jnp.sum(m["b"] * (b - br))), float(phi_b), rtol=1e-12)
    assert _rel_delta(lin, x, r) < 1e-12


def test_a_quotient_of_positive_values_is_exp_of_a_difference_of_logs(x64):
    """a / b with a, a', b, b' > 0: DeepLIFT's rules on exp(log a - log b); the numerator gets
    (q - q') (log a - log a') / (log q - log q') of the difference, the denominator the rest."""
    a, ar = jnp.exp(_normal(0, (3, 4))), jnp.exp(3.0 + _normal(1, (3, 4)))
    b, br = jnp.exp(_normal(2, (3, 4))), jnp.exp(-20.0 + _normal(3, (3, 4)))
    lin = linearize(lambda d: d["a"] / d["b"], {"a": a, "b": b}, {"a": ar, "b": br})
    m = lin.transpose(jnp.ones((3, 4)))
    q, qr = a / b, ar / br
    share = (jnp.log(a) - jnp.log(ar)) / (jnp.log(q) - jnp.log(qr))
    np.testing.assert_allclose(m["a"] * (a - ar), (q - qr) * share, rtol=1e-10)
    np.testing.assert_allclose(m["b"] * (b - br), (q - qr) * (1 - share), rtol=1e-10)


def test_products_of_two_activations_broadcast_and_keep_summation_to_delta(x64):
    """q . k of attention and (x - mean) * rsqrt(var) of LayerNorm (a (B, N, 1) factor)."""
    w1, w2 = _normal(1, (8, 8)), _normal(2, (8, 8))
    x, r = _normal(3, (2, 5, 8)), _normal(4, (2, 5, 8))

    def f(t):
        q, k = t @ w1, t @ w2
        s = jnp.einsum("bnd,bmd->bnm", q, k)
        c = t - t.mean(-1, keepdims=True)
        return s.sum(-1) + (c * jax.lax.rsqrt((c * c).mean(-1, keepdims=True) + 1e-3)).sum(-1)

    lin = linearize(f, x, r)
    assert _rel_delta(lin, x, r) < 1e-12
    assert {"dot_general", "mul", "rsqrt"} <= set(lin.nonlinear)


# ---------------------------------------------------------------------------
# elementwise functions of one value, however written: one secant
# ---------------------------------------------------------------------------

ELEMENTWISE = {
    "gelu_tanh": lambda z: jax.nn.gelu(z, approximate=True),
    "gelu_erf": lambda z: jax.nn.gelu(z, approximate=False),
    "silu": jax.nn.silu,
    "leaky_relu": lambda z: jax.nn.leaky_relu(z, 0.1),
    "elu": jax.nn.elu,
    "x_tanh_x": lambda z: z * jnp.tanh(z) + z,
}


@pytest.mark.parametrize("name", sorted(ELEMENTWISE))
def test_an_elementwise_function_of_one_value_is_one_secant(x64, name):
    """GELU is traced into mul, tanh/erf, add and pow of one value: its multipliers are its own
    secant slope (g(x) - g(r)) / (x - r), not a product split of its pieces."""
    g = ELEMENTWISE[name]
    x, r = _normal(0, (3, 7)), _normal(1, (3, 7))
    w = _normal(2, (7, 4))
    lin = linearize(lambda z: g(z) @ w, x, r)
    ct = _normal(3, (3, 4))
    secant = (g(x) - g(r)) / (x - r)
    np.testing.assert_allclose(lin.transpose(ct), secant * (ct @ w.T), rtol=1e-12, atol=1e-14)
    assert len(lin.nonlinear) == 1
    assert _rel_delta(lin, x, r) < 1e-12


def test_gelu_at_the_reference_takes_the_midpoint_derivative(x64):
    x = _normal(0, (2, 6))
    r = x.at[:, :3].set(_normal(1, (2, 3)))  # half the entries equal to the reference
    g = lambda z: jax.nn.gelu(z, approximate=False)  # noqa: E731
    m = linearize(lambda z: g(z).sum(-1), x, r).transpose(jnp.ones(2))
    np.testing.assert_allclose(m[:, 3:], jax.vmap(jax.vmap(jax.grad(g)))(x[:, 3:]), rtol=1e-12)
    np.testing.assert_allclose(m[:, :3], (g(x) - g(r))[:, :3] / (x - r)[:, :3], rtol=1e-12)


# ---------------------------------------------------------------------------
# softmax and log-sum-exp inside the head
# ---------------------------------------------------------------------------

def _hand_softmax(z):
    e = jnp.exp(z)
    return e / e.sum(-1, keepdims=True)


def test_softmax_attributions_do_not_depend_on_the_max_shift(x64):
    """jax.nn.softmax subtracts stop_gradient(max); the shift is one value shared by the input and
    the reference, and the attributions equal those of the hand-written exp / sum (no shift)."""
    x, r = 3.0 * _normal(0, (2, 5, 6)), 3.0 * _normal(1, (2, 5, 6))
    v = _normal(2, (6, 3))
    ct = _normal(3, (2, 5, 3))
    m = {}
    for name, sm in (("jax", jax.nn.softmax), ("hand", _hand_softmax), ("flax", nn.softmax)):
        lin = linearize(lambda z: sm(z) @ v, x, r)
        assert _rel_delta(lin, x, r) < 1e-12
        m[name] = lin.transpose(ct)
    np.testing.assert_allclose(m["jax"], m["hand"], rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(m["flax"], m["hand"], rtol=1e-10, atol=1e-13)


def test_logsumexp_keeps_summation_to_delta_and_is_shift_free(x64):
    x, r = 3.0 * _normal(0, (3, 6)), 3.0 * _normal(1, (3, 6))
    lin = linearize(lambda z: jax.nn.logsumexp(z, axis=-1), x, r)
    assert _rel_delta(lin, x, r) < 1e-12
    hand = linearize(lambda z: jnp.log(jnp.exp(z).sum(-1)), x, r)
    np.testing.assert_allclose(lin.transpose(jnp.ones(3)), hand.transpose(jnp.ones(3)), rtol=1e-10)


def test_logsumexp_and_softmax_of_far_apart_values_in_float32():
    """The shared shift is the larger maximum: exp never overflows. The reference's logits are
    20 below the input's, so the reference's normaliser is ~e^-20 of the input's: the quotient's
    product form would cancel terms of size e^20; the log form keeps summation-to-delta."""
    x = 80.0 + 10.0 * jax.random.normal(jax.random.PRNGKey(0), (3, 6))
    r = 60.0 + 10.0 * jax.random.normal(jax.random.PRNGKey(1), (3, 6))
    lin = linearize(lambda z: jax.nn.logsumexp(z, axis=-1, keepdims=True) * jax.nn.softmax(z), x, r)
    assert np.all(np.isfinite(lin.transpose(jnp.ones((3, 6)))))
    assert _rel_delta(lin, x, r) < 1e-3


# ---------------------------------------------------------------------------
# a softmax at the head's output
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("fun, what", [
    (jax.nn.softmax, "softmax"),
    (lambda z: _hand_softmax(z)[:, 1:], "softmax"),
    (lambda z: jnp.exp(z) / jnp.exp(z).sum(-1, keepdims=True), "softmax"),
    (jax.nn.log_softmax, "log_softmax"),
    (lambda z: jnp.log(_hand_softmax(z)), "log_softmax"),
    (lambda z: z - jax.nn.logsumexp(z, -1, keepdims=True), "log_softmax"),
])
def test_a_softmax_at_the_heads_output_is_refused_by_name(fun, what):
    x = _normal(0, (2, 5), jnp.float32)
    w = _normal(1, (5, 5), jnp.float32)
    head = lambda z: fun(z @ w)  # noqa: E731
    for err, run in ((NoRescaleRule, lambda: deeplift(head, x, None, 0)),
                     (NoRelevanceRule, lambda: lrp.lrp(head, x, 0))):
        with pytest.raises(err, match=f"a {what} at the head's output.*logits") as info:
            run()
        assert isinstance(info.value, LiftcamError) and "\n" not in str(info.value)
    # asked for by the caller (a target function of the output), it is explained
    r = deeplift(head, x, None, 1, allow_softmax_output=True)
    gap = (r.out - r.out_ref)[:, 1]
    assert float(jnp.max(jnp.abs(r.delta))) <= 1e-4 * float(jnp.max(jnp.abs(gap)))


def test_logsumexp_at_the_output_is_not_a_softmax():
    x = _normal(0, (2, 4), jnp.float32)
    r = deeplift(lambda z: jax.nn.logsumexp(z, -1), x)
    assert float(jnp.max(jnp.abs(r.delta))) < 1e-5


# ---------------------------------------------------------------------------
# LayerNorm, RMSNorm and a pre-norm transformer block
# ---------------------------------------------------------------------------

def _noisy(variables, seed, scale=0.3, dtype=jnp.float64):
    leaves, tree = jax.tree_util.tree_flatten(variables)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree_util.tree_unflatten(
        tree, [(l + scale * jax.random.normal(k, l.shape, dtype)).astype(dtype) for l, k in zip(leaves, keys)])


@pytest.mark.parametrize("norm", ["linen.LayerNorm", "nnx.LayerNorm", "linen.RMSNorm"])
def test_layer_norms_keep_summation_to_delta(x64, norm):
    x, r = _normal(0, (2, 5, 8)), 0.5 * _normal(1, (2, 5, 8))
    if norm.startswith("linen"):
        mod = nn.LayerNorm() if norm == "linen.LayerNorm" else nn.RMSNorm()
        v = _noisy(mod.init(jax.random.PRNGKey(0), x), 1)
        f = lambda z: mod.apply(v, z)  # noqa: E731
    else:
        ln = nnx.LayerNorm(8, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
        ln.scale[...] = 1.0 + _normal(2, (8,))
        ln.bias[...] = _normal(3, (8,))
        f = ln
    for ref in (r, None):
        lin = linearize(f, x, ref)
        assert _rel_delta(lin, x, jnp.zeros_like(x) if ref is None else ref) < 1e-9
    assert "rsqrt" in lin.nonlinear


def test_a_normalisation_moves_its_normaliser_first(x64):
    """LayerNorm's (x - mu) * rsqrt(var + eps) * gamma is a product whose second factor is a function of
    the first (patterns: "normalised"): the normaliser moves first, Delta(u s) = s Delta u + u' Delta s.
    At the zero reference u' = 0, so a readout c of a LayerNorm has the closed form
    x * rsqrt(var + eps) * (c gamma - mean(c gamma)) (the normaliser held at the input's value), whatever
    eps (the Shapley split gave coefficients of size 1 / sqrt(eps)); Flax's LayerNorm, jax.nn.standardize
    and a hand-written (x - mu) / sqrt(var + eps) have the same attributions at any reference."""
    x, r = _normal(0, (3, 8)), 0.5 * _normal(1, (3, 8))
    gamma, c = 1.0 + 0.3 * _normal(2, (8,)), _normal(3, (8,))
    forms = {
        "linen": lambda eps: lambda z: nn.LayerNorm(epsilon=eps).apply(
            {"params": {"scale": gamma, "bias": jnp.zeros(8)}}, z) @ c,
        "standardize": lambda eps: lambda z: (jax.nn.standardize(z, epsilon=eps) * gamma) @ c,
        "by hand": lambda eps: lambda z: ((z - z.mean(-1, keepdims=True)) / jnp.sqrt(z.var(-1, keepdims=True) + eps)
                                          * gamma) @ c,
    }
    for eps in (1e-12, 1e-6):
        cg = c * gamma
        want = x * jax.lax.rsqrt(x.var(-1, keepdims=True) + eps) * (cg - cg.mean())
        for name, form in forms.items():
            lin = linearize(form(eps), x)
            got = lin.transpose(jnp.ones(3)) * x
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12, err_msg=f"{name} eps={eps}")
    at_r = {name: linearize(form(1e-6), x, r) for name, form in forms.items()}
    for name, lin in at_r.items():
        assert _rel_delta(lin, x, r) < 1e-12, name
        np.testing.assert_allclose(lin.transpose(jnp.ones(3)), at_r["linen"].transpose(jnp.ones(3)), rtol=1e-9,
                                   err_msg=name)
    # not the Shapley split of the two factors (a user's rule for mul takes precedence: the README's)
    def shapley(xs, refs, **params):
        (a, b), (ar, br) = xs, refs
        if a is ar or b is br:
            return None
        return a * b, ar * br, lambda da, db: (b + br) / 2 * da + (a + ar) / 2 * db

    rescale.register_rule(jax.lax.mul_p, shapley)
    try:
        split = linearize(forms["linen"](1e-6), x, r)
        zero = linearize(forms["linen"](1e-6), x)
    finally:
        rescale.register_rule(jax.lax.mul_p, None)
    assert _rel_delta(split, x, r) < 1e-9
    ours, theirs = at_r["linen"].transpose(jnp.ones(3)), split.transpose(jnp.ones(3))
    assert float(jnp.max(jnp.abs(ours - theirs))) > 1e-2 * float(jnp.max(jnp.abs(ours)))
    # ... whose coefficients at the zero reference are about 1 / (2 sqrt(eps)) = 500 times the closed form's
    assert float(jnp.max(jnp.abs(zero.transpose(jnp.ones(3)) * x))) > 100 * float(jnp.max(jnp.abs(want)))


def test_lrp_takes_attnlrps_layer_norm_rule():
    """LRP through a LayerNorm holds the normaliser constant (AttnLRP's LayerNorm rule): for a readout c
    of Flax's LayerNorm (zero bias) the relevance is x * rsqrt(var + eps) * (c gamma - mean(c gamma)),
    the centring passing relevance by the epsilon rule; the same for a hand-written division."""
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 8))
    gamma = 1.0 + 0.3 * jax.random.normal(jax.random.PRNGKey(2), (8,))
    c = jax.random.normal(jax.random.PRNGKey(3), (8, 1))
    cg = c[:, 0] * gamma
    want = x * jax.lax.rsqrt(x.var(-1, keepdims=True) + 1e-6) * (cg - cg.mean())
    forms = {
        "linen": lambda z: nn.LayerNorm().apply({"params": {"scale": gamma, "bias": jnp.zeros(8)}}, z) @ c,
        "by hand": lambda z: (z - z.mean(-1, keepdims=True)) / jnp.sqrt(z.var(-1, keepdims=True) + 1e-6) * gamma @ c,
    }
    for name, f in forms.items():
        r = lrp.lrp(f, x, 0)
        np.testing.assert_allclose(r.attributions, want, rtol=1e-4, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(r.attributions.sum(-1), f(x)[:, 0], rtol=1e-4, atol=1e-5)


class Block(nn.Module):
    """A pre-norm ViT block on tokens (B, N, D), a final LayerNorm and a Dense on the mean token."""

    classes: int = 4

    @nn.compact
    def __call__(self, t):
        d = t.shape[-1]
        y = nn.LayerNorm()(t)
        t = t + nn.MultiHeadDotProductAttention(num_heads=2)(y, y)
        y = nn.Dense(2 * d)(nn.LayerNorm()(t))
        t = t + nn.Dense(d)(nn.gelu(y))
        return nn.Dense(self.classes)(nn.LayerNorm()(t).mean(1))


@pytest.fixture(scope="module")
def block():
    head = Block()
    t = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 8))
    return head, head.init(jax.random.PRNGKey(1), t)


@pytest.mark.parametrize("dtype, tol", [(jnp.float64, 1e-9), (jnp.float32, 1e-3)])
def test_a_pre_norm_transformer_block_keeps_summation_to_delta(block, dtype, tol):
    """Every primitive of the block has a rule; summation-to-delta for every class, zero and
    random references."""
    head, v = block
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", dtype == jnp.float64)
    try:
        v = _noisy(v, 2, 0.2, dtype)
        t = jax.random.normal(jax.random.PRNGKey(3), (2, 5, 8), dtype)
        f = lambda z: head.apply(v, z)  # noqa: E731

        labels = []

        def check(t, ref):
            lin = linearize(f, t, ref)
            labels.append(lin.nonlinear)
            d = t - (0.0 if ref is None else ref)
            gap = lin.out - lin.out_ref
            # each class's attributions (one transposed map each) sum to its difference
            sums = jax.vmap(lambda c: (lin.transpose(jax.nn.one_hot(jnp.full(2, c), gap.shape[1], dtype=dtype))
                                       * d).sum((1, 2)))(jnp.arange(gap.shape[1]))
            return lin.linear(d), gap, sums.T

        for ref in (None, 0.5 * jax.random.normal(jax.random.PRNGKey(4), t.shape, dtype)):
            linear, gap, sums = jax.jit(check)(t, ref)
            scale = float(jnp.max(jnp.abs(gap)))
            assert float(jnp.max(jnp.abs(linear - gap))) < tol * scale
            assert float(jnp.max(jnp.abs(sums - gap))) < tol * scale
        assert {"dot_general", "div", "rsqrt", "mul"} <= set(labels[0])
        assert "elementwise[integer_pow,tanh,mul]" in labels[0]  # nn.gelu as one secant
    finally:
        jax.config.update("jax_enable_x64", previous)


def test_lrp_refuses_attention_naming_the_primitive(block):
    head, v = block
    t = jax.random.normal(jax.random.PRNGKey(3), (2, 5, 8))
    with pytest.raises(NoRelevanceRule, match="'(mul|dot_general)' of two input-dependent values.*AttnLRP") as e:
        lrp.lrp(lambda z: head.apply(v, z), t, 0)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------
# gradients: every new rule is differentiable
# ---------------------------------------------------------------------------

def _attention_head(p, t):
    """One attention head (jax.nn.softmax), RMSNorm, a tanh-GELU MLP and a class layer."""
    q, k, v = t @ p["q"], t @ p["k"], t @ p["v"]
    a = jax.nn.softmax(jnp.einsum("bnd,bmd->bnm", q, k) / 2.0)
    h = t + jnp.einsum("bnm,bmd->bnd", a, v)
    h = h * jax.lax.rsqrt((h * h).mean(-1, keepdims=True) + 0.1)
    h = jax.nn.gelu(h @ p["w1"], approximate=True) @ p["w2"]
    return (h / (1.0 + jnp.abs(h).mean(-1, keepdims=True))).mean(1) @ p["c"]


@pytest.mark.parametrize("at_reference", [False, True])
def test_attention_attributions_have_finite_difference_gradients(x64, at_reference):
    """jax.grad of a loss on the attributions, with respect to the parameters and the tokens,
    against central differences along random directions (relative 1e-3); with one token exactly
    at the reference, its secants take the midpoint derivative (value and derivative)."""
    ks = jax.random.split(jax.random.PRNGKey(7), 6)
    p = {n: 0.5 * jax.random.normal(k, s, jnp.float64) for n, k, s in zip(
        ("q", "k", "v", "w1", "w2", "c"), ks, ((4, 4), (4, 4), (4, 4), (4, 6), (6, 4), (4, 3)))}
    t, ref = _normal(8, (2, 5, 4)), 0.3 * _normal(9, (2, 5, 4))
    if at_reference:
        t = t.at[:, 2].set(ref[:, 2])
    weights = _normal(10, t.shape)

    def loss(p, t):
        r = deeplift(lambda z: _attention_head(p, z), t, ref, jnp.array([0, 2]))
        return jnp.sum(r.attributions * weights) + jnp.sum(r.multipliers ** 2)

    loss = jax.jit(loss)
    gp, gt = jax.jit(jax.grad(loss, argnums=(0, 1)))(p, t)
    rng = np.random.default_rng(0)
    vp = jax.tree_util.tree_map(lambda a: jnp.asarray(rng.normal(size=a.shape)), p)
    vt = jnp.asarray(rng.normal(size=t.shape))
    h = 1e-6
    for grad, direction, moved in (
        (gp, vp, lambda s: (jax.tree_util.tree_map(lambda a, d: a + s * d, p, vp), t)),
        (gt, vt, lambda s: (p, t + s * vt)),
    ):
        analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree_util.tree_leaves(grad),
                                                      jax.tree_util.tree_leaves(direction)))
        fd = (loss(*moved(h)) - loss(*moved(-h))) / (2 * h)
        assert np.isfinite(float(analytic))
        np.testing.assert_allclose(float(analytic), float(fd), rtol=1e-3, atol=1e-8)
