"""ShapleyCAM: closed forms, finite differences in float64, and the batching contract.

* A head that is homogeneous of degree ``d`` in ``A`` has ``H A = (d - 1) g`` (Euler), so
  ShapleyCAM's weights are Grad-CAM's times ``1 - (d - 1)/2``: equal for ``d = 1``, half for
  ``d = 2``, zero for ``d = 3`` (a factor or sign error in the Hessian term fails one of them).
* The Hessian-vector product against central differences of the gradient along ``A``.
* One product per batch equals one per image (the head never mixes images), mixed targets.
* The ReST score against ``y_t + log_softmax(y)_t``.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import liftcam_jax as lj
from liftcam_jax.errors import UsageError
from liftcam_jax.methods.shapley_cam import shapley_terms
from liftcam_jax.model import Split


@pytest.fixture(autouse=True)
def x64():
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


def _features(p, x):
    return x * p["s"]  # the split activations are the (scaled) input itself


def _homogeneous(degree):
    def head(p, a):
        m = jnp.mean(a, axis=(1, 2))  # (B, K)
        return jnp.einsum("bk,ck->bc", m, p["w"]) ** degree
    return head


def _tanh_head(p, a):
    return jnp.tanh(jnp.mean(a, axis=(1, 2)) @ p["w1"]) @ p["w2"]


def _setup(head, batch=3):
    rng = np.random.default_rng(0)
    params = {"s": jnp.float64(1.0), "w": jnp.asarray(rng.standard_normal((4, 5))),
              "w1": jnp.asarray(rng.standard_normal((5, 6))), "w2": jnp.asarray(rng.standard_normal((6, 4)))}
    x = jnp.asarray(rng.uniform(0.0, 1.0, (batch, 4, 4, 5)))
    return Split(_features, head), params, x


@pytest.mark.parametrize("degree,factor", [(1, 1.0), (2, 0.5), (3, 0.0)])
def test_homogeneous_heads_closed_form(degree, factor):
    split, params, x = _setup(_homogeneous(degree))
    targets = jnp.array([0, 3, 1])
    s = lj.explain(split, params, x, targets, method="shapley-cam")
    g = lj.explain(split, params, x, targets, method="grad-cam")
    np.testing.assert_allclose(s.coefficients, factor * np.asarray(g.coefficients), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("score", ["logit", "rest"])
def test_hvp_against_finite_differences_and_per_image(score):
    split, params, x = _setup(_tanh_head)
    targets = jnp.array([2, 0, 3])
    a = split.features(params, x)
    scored = lambda t: lj.targets.SCORES[score](t)  # noqa: E731  (the class score: logit or ReST)
    g, hvp = shapley_terms(split.head, params, a, scored(targets))
    eps = 1e-5
    gp, _ = shapley_terms(split.head, params, a + eps * a, scored(targets))
    gm, _ = shapley_terms(split.head, params, a - eps * a, scored(targets))
    fd = (np.asarray(gp) - np.asarray(gm)) / (2 * eps)
    np.testing.assert_allclose(hvp, fd, rtol=1e-6, atol=1e-9 * np.abs(fd).max())
    assert np.abs(hvp).max() > 0.05 * np.abs(g).max()  # the term is there to be tested
    e = lj.explain(split, params, x, targets, method="shapley-cam", score=score)
    for i in range(x.shape[0]):  # one product per batch == one per image
        gi, hi = shapley_terms(split.head, params, a[i:i + 1], scored(targets[i:i + 1]))
        np.testing.assert_allclose(e.coefficients[i], np.mean(gi - 0.5 * hi, axis=(1, 2))[0], rtol=1e-12)


def test_rest_score_is_logit_minus_cross_entropy():
    y = jnp.asarray(np.random.default_rng(1).standard_normal((3, 7)) * 4)
    t = jnp.array([6, 0, 2])
    want = y[jnp.arange(3), t] + jax.nn.log_softmax(y)[jnp.arange(3), t]
    np.testing.assert_allclose(lj.targets.rest(t)(y), want, rtol=1e-12)


def test_score_option():
    split, params, x = _setup(_tanh_head)
    with pytest.raises(UsageError, match="unknown score"):
        lj.explain(split, params, x, method="shapley-cam", score="cross")
