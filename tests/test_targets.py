"""Targets: functions of the head's output, several targets per image (liftcam_jax.targets).

Tiny models, float64 where exactness is tested: summation-to-delta for a function target,
top_k equal to T separate calls, the named scores against closed forms and Shapley linearity.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import liftcam_jax as lj
from liftcam_jax import shap
from liftcam_jax import targets as T
from liftcam_jax.errors import UsageError
from liftcam_jax.model import Split


@pytest.fixture(autouse=True, scope="module")
def x64():
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


def _conv(x, w, stride=1):
    return jax.lax.conv_general_dilated(x, w, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _features(p, x):
    return jax.nn.relu(_conv(x, p["f"], 2))  # (B, 8, 8, K)


def _classifier_head(p, a):  # non-linear: ReLU, max-pool, tanh
    z = jax.nn.relu(_conv(a, p["c"]) + p["cb"])
    z = jax.lax.reduce_window(z, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    return jnp.tanh(z.mean((1, 2))) @ p["w"]


def _segmentation_head(p, a):  # per-pixel logits (B, 8, 8, C)
    return _conv(jnp.tanh(_conv(a, p["c"]) + p["cb"]), p["s"])


K, C = 4, 7


def _params(seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    n = lambda k, s, scale=1.0: scale * jax.random.normal(k, s, jnp.float64)  # noqa: E731
    return {"f": n(ks[0], (3, 3, 3, K), 0.6), "c": n(ks[1], (3, 3, K, 5), 0.5), "cb": n(ks[2], (5,), 0.3),
            "w": n(ks[3], (5, C)), "s": n(ks[4], (1, 1, 5, C))}


@pytest.fixture(scope="module")
def model():
    x = jax.random.normal(jax.random.PRNGKey(7), (3, 16, 16, 3), jnp.float64)
    return Split(_features, _classifier_head), _params(), x


def test_segmentation_target_sums_to_its_delta(model):
    """LIFT-CAM of a mask-summed segmentation class: sum_k phi_k = s(head(A)) - s(head(0))."""
    _, p, x = model
    split = Split(_features, _segmentation_head)
    mask = (jax.random.uniform(jax.random.PRNGKey(1), (3, 8, 8)) > 0.5).astype(jnp.float64)
    target = T.segmentation(jnp.array([2, 5, 0]), mask)
    e = lj.explain(split, p, x, target, method="lift-cam")
    a = split.features(p, x)
    delta = target(split.head(p, a)) - target(split.head(p, jnp.zeros_like(a)))
    assert e.coefficients.shape == (3, K) and e.maps.shape == (3, 16, 16) and e.targets.shape == (3,)
    np.testing.assert_array_equal(e.targets, -1)  # a function: no class index
    np.testing.assert_allclose(e.coefficients.sum(-1), delta, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(target(e.logits) - target(e.reference_logits), delta, rtol=1e-12)
    assert float(jnp.max(jnp.abs(delta))) > 1e-2  # not a vacuous delta
    # the mask enters: a complementary mask gives another explanation
    other = lj.explain(split, p, x, T.segmentation(jnp.array([2, 5, 0]), 1.0 - mask), method="lift-cam")
    assert float(jnp.max(jnp.abs(other.coefficients - e.coefficients))) > 1e-3


@pytest.mark.parametrize("method", ["lift-cam", "grad-cam", "score-cam"])
def test_top_k_equals_separate_calls(model, method):
    split, p, x = model
    explain = lj.explainer(split, method, top_k=5)
    e = explain(p, x)
    out = split(p, x)
    np.testing.assert_array_equal(e.targets, jax.lax.top_k(out, 5)[1])
    assert e.maps.shape == (3, 5, 16, 16) and e.raw.shape == (3, 5, 8, 8) and e.coefficients.shape == (3, 5, K)
    one = lj.explainer(split, method)
    for t in range(5):
        s = one(p, x, np.asarray(e.targets[:, t]))
        np.testing.assert_allclose(e.maps[:, t], s.maps, atol=1e-6)
        np.testing.assert_allclose(e.coefficients[:, t], s.coefficients, atol=1e-6)
        np.testing.assert_allclose(e.raw[:, t], s.raw, atol=1e-6)
    # (B, T) class indices are the same call as top_k; the reference logits are the one target's
    same = lj.explain(split, p, x, np.asarray(e.targets), method=method)
    np.testing.assert_allclose(same.coefficients, e.coefficients, atol=1e-12)
    if method == "lift-cam":
        np.testing.assert_allclose(e.reference_logits, s.reference_logits, atol=1e-12)


def test_a_function_of_several_targets(model):
    """fn(out) -> (B, T): T explanations, each the one of its column."""
    split, p, x = model
    fn = lambda out: jnp.stack([out[:, 1] - out[:, 2], out[:, 4]], axis=1)  # noqa: E731
    e = lj.explain(split, p, x, fn, method="lift-cam")
    assert e.coefficients.shape == (3, 2, K) and e.targets.shape == (3, 2)
    a = lj.explain(split, p, x, T.logit_difference(1, 2), method="lift-cam")
    b = lj.explain(split, p, x, 4, method="lift-cam")
    np.testing.assert_allclose(e.coefficients[:, 0], a.coefficients, atol=1e-12)
    np.testing.assert_allclose(e.coefficients[:, 1], b.coefficients, atol=1e-12)
    # DeepLIFT of a difference of logits: the difference of the logits' (the score is linear)
    c = lj.explain(split, p, x, 2, method="lift-cam")
    d = lj.explain(split, p, x, 1, method="lift-cam")
    np.testing.assert_allclose(a.coefficients, d.coefficients - c.coefficients, atol=1e-12)


def test_rest_with_gradients_is_its_closed_form(model):
    """grad of 2 y_c - LSE(y) = 2 g_c - sum_j softmax_j g_j: Grad-CAM's weights are linear in the gradient."""
    split, p, x = model
    out = split(p, x)
    e = lj.explain(split, p, x, score="rest", method="grad-cam")
    c = np.asarray(jnp.argmax(out, -1))
    np.testing.assert_array_equal(e.targets, c)
    per_class = jnp.stack([lj.explain(split, p, x, j, method="grad-cam").coefficients for j in range(C)], 1)
    want = 2 * per_class[jnp.arange(3), c] - jnp.einsum("bj,bjk->bk", jax.nn.softmax(out, -1), per_class)
    np.testing.assert_allclose(e.coefficients, want, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(T.rest(c)(out), 2 * out[jnp.arange(3), c] - jax.nn.logsumexp(out, -1))


def test_lift_cam_takes_rest_and_cosine_similarity_with_summation_to_delta(model):
    """ReST (a log-sum-exp of the logits) and the cosine similarity (products and a quotient of
    activations) go through the rescale rules for transformer heads: sum of coefficients =
    s(y(A)) - s(y(0)) for the score's value."""
    split, p, x = model
    a = split.features(p, x)
    ref = jnp.arange(C, dtype=jnp.float64) - 3.0
    for fn in (T.rest(1), T.rest(jnp.array([0, 2, 6])), T.cosine_similarity(ref)):
        e = lj.explain(split, p, x, fn, method="lift-cam")
        delta = fn(split.head(p, a)) - fn(split.head(p, jnp.zeros_like(a)))
        np.testing.assert_allclose(np.sum(e.coefficients, -1), delta, rtol=1e-9, atol=1e-12)
        assert np.all(np.abs(delta) > 1e-3)  # a real difference to split
    # the gradient family takes the cosine similarity: Grad-CAM's weights are the mean gradient
    e = lj.explain(split, p, x, T.cosine_similarity(ref), method="grad-cam")
    g = jax.grad(lambda z: jnp.sum(T.cosine_similarity(ref)(split.head(p, z))))(a)
    np.testing.assert_allclose(e.coefficients, g.mean((1, 2)), rtol=1e-10)


def test_shapley_values_of_a_logit_difference_are_the_difference(model):
    """The Shapley value is linear in the game: phi(y_1 - y_2) = phi(y_1) - phi(y_2)."""
    split, p, x = model
    a = split.features(p, x)
    diff = shap.exact_shapley(split.head, p, a, T.logit_difference(1, 2)).values
    one = shap.exact_shapley(split.head, p, a, 1).values
    two = shap.exact_shapley(split.head, p, a, 2).values
    np.testing.assert_allclose(diff, one - two, atol=1e-12)
    np.testing.assert_allclose(diff.sum(-1), T.logit_difference(1, 2)(split.head(p, a))
                               - T.logit_difference(1, 2)(split.head(p, 0 * a)), atol=1e-12)


def test_a_head_returning_a_pytree(model):
    _, p, x = model

    def head(p, a):
        logits = _classifier_head(p, a)
        return {"logits": logits, "pooled": a.mean((1, 2))}

    split = Split(_features, head)
    e = lj.explain(split, p, x, lambda out: out["logits"][:, 3], method="lift-cam")
    plain = lj.explain(Split(_features, _classifier_head), p, x, 3, method="lift-cam")
    np.testing.assert_allclose(e.coefficients, plain.coefficients, atol=1e-12)
    assert set(e.logits) == {"logits", "pooled"}
    with pytest.raises(UsageError, match="target function"):
        lj.explain(split, p, x, 3)


def test_compiled_explainer_takes_partials_at_call_time_and_functions_where_built(model):
    split, p, x = model
    explain = lj.explainer(split, "grad-cam")
    for c in (1, 4):
        got = explain(p, x, T.logit_difference(c, 0))
        want = lj.explain(split, p, x, T.logit_difference(c, 0), method="grad-cam")
        np.testing.assert_allclose(got.coefficients, want.coefficients, atol=1e-12)
    fixed = lj.explainer(split, "grad-cam", target=lambda out: out[:, 4] - out[:, 0])
    np.testing.assert_allclose(fixed(p, x).coefficients, got.coefficients, atol=1e-12)
    with pytest.raises(UsageError, match="Partial"):
        explain(p, x, lambda out: out[:, 4])
    with pytest.raises(UsageError, match="without targets"):
        fixed(p, x, 1)


@pytest.mark.parametrize("kwargs, match", [
    (dict(targets=1, top_k=2), "not both"),
    (dict(top_k=C + 1), "more than"),
    (dict(top_k=0), "positive"),
    (dict(targets=lambda out: out[:, 1], top_k=2), "already says"),
    (dict(targets=lambda out: out, score="rest"), "already says"),
    (dict(targets=lambda out: out[0], ), "one score per image"),
    (dict(score="logits"), "unknown score"),
    (dict(targets=np.zeros((3, 2, 1), np.int32)), "several per image"),
    (dict(targets=np.array([[0, C]])), "shape"),
    (dict(targets=np.array([[0, C], [1, 1], [2, 2]])), "out of range"),
])
def test_usage_errors(model, kwargs, match):
    split, p, x = model
    with pytest.raises(UsageError, match=match):
        lj.explain(split, p, x, method="grad-cam", **kwargs)


def test_lime_cam_says_it_cannot_be_differentiated(model):
    split, p, x = model
    explain = lj.explainer(split, "lime-cam", num_samples=8, max_iter=20)
    explain(p, x)  # runs forwards
    with pytest.raises(UsageError, match="lime-cam cannot be differentiated") as info:
        jax.grad(lambda p: jnp.sum(explain(p, x, 1).coefficients))(p)
    assert "\n" not in str(info.value)


def _conv_shapes(jaxpr):
    shapes = []
    for e in jaxpr.eqns:
        if e.primitive.name == "conv_general_dilated":
            shapes.append(tuple(e.outvars[0].aval.shape))
        for v in e.params.values():
            inner = getattr(v, "jaxpr", v)
            if hasattr(inner, "eqns"):
                shapes += _conv_shapes(inner)
    return shapes


@pytest.mark.parametrize("method", ["lift-cam", "grad-cam"])
def test_several_targets_share_the_front_and_the_head(model, method):
    """Traced program: top_k=5 has the convolutions of one target, and only the transposed (backward)
    one carries the 5 targets (batch 5 * B); the front and the head's forward pass run once."""
    split, p, x = model
    one = _conv_shapes(jax.make_jaxpr(lambda p, x: lj.explain(split, p, x, method=method))(p, x).jaxpr)
    five = _conv_shapes(jax.make_jaxpr(lambda p, x: lj.explain(split, p, x, method=method, top_k=5))(p, x).jaxpr)
    b = x.shape[0]
    assert len(five) == len(one) and five[:-1] == one[:-1] and all(s[0] == b for s in one)
    assert five[-1] == (5 * b,) + one[-1][1:]
