"""LIFT-CAM and the shared explanation pipeline on small Flax models."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import flax.linen as nn

import liftcam_jax as lj
from liftcam_jax.explanation import assemble, normalize, upsample


class Features(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jax.nn.relu(nn.Conv(8, (3, 3))(x))
        return jax.nn.relu(nn.Conv(6, (3, 3), strides=(2, 2))(x))


class VggLikeHead(nn.Module):
    @nn.compact
    def __call__(self, a):
        a = nn.max_pool(a, (2, 2), (2, 2))
        a = a.reshape(a.shape[0], -1)
        a = jax.nn.relu(nn.Dense(32)(a))
        return nn.Dense(7)(a)


@pytest.fixture(scope="module")
def small():
    f, h = Features(), VggLikeHead()
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 16, 16, 3))
    pf = f.init(jax.random.PRNGKey(1), x)
    ph = h.init(jax.random.PRNGKey(2), f.apply(pf, x))
    # random biases, so the reference's hidden inputs are not zero
    ph = jax.tree_util.tree_map(lambda w: w + 0.2, ph)
    params = {"f": pf, "h": ph}
    split = lj.Split(lambda p, x: f.apply(p["f"], x), lambda p, a: h.apply(p["h"], a))
    return split, params, x


def test_explanation_fields_and_completeness(small):
    split, params, x = small
    e = lj.explain(split, params, x)
    a = split.features(params, x)
    assert e.maps.shape == (3, 16, 16) and e.raw.shape == a.shape[:3]
    assert e.coefficients.shape == (3, 6) and e.logits.shape == (3, 7)
    np.testing.assert_array_equal(e.targets, jnp.argmax(e.logits, -1))
    # sum_k phi_k = y_c(A) - y_c(0)
    gap = (e.logits - e.reference_logits)[jnp.arange(3), e.targets]
    np.testing.assert_allclose(e.coefficients.sum(-1), gap, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(e.reference_logits, split.head(params, jnp.zeros_like(a)), rtol=1e-6)
    # raw map = ReLU(sum_k phi_k A^k); maps in [0, 1]
    np.testing.assert_allclose(e.raw, jax.nn.relu(jnp.einsum("bhwk,bk->bhw", a, e.coefficients)), rtol=1e-5, atol=1e-6)
    assert float(e.maps.min()) >= 0.0 and float(e.maps.max()) <= 1.0


def test_mixed_targets_in_a_batch_equal_one_at_a_time(small):
    split, params, x = small
    targets = jnp.array([4, 0, 6])
    batch = lj.explain(split, params, x, targets)
    for i in range(3):
        one = lj.explain(split, params, x[i : i + 1], int(targets[i]))
        np.testing.assert_allclose(batch.coefficients[i], one.coefficients[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(batch.maps[i], one.maps[0], atol=1e-5)
    # and a single int applies to every image
    single = lj.explain(split, params, x, 2)
    np.testing.assert_array_equal(single.targets, [2, 2, 2])


@pytest.mark.parametrize("batch", [1, 2, 7, 64])
def test_jit_over_batch_sizes(small, batch):
    split, params, _ = small
    x = jax.random.normal(jax.random.PRNGKey(batch), (batch, 16, 16, 3))
    fn = lj.explainer(split)
    e = fn(params, x)
    gap = (e.logits - e.reference_logits)[jnp.arange(batch), e.targets]
    np.testing.assert_allclose(e.coefficients.sum(-1), gap, rtol=1e-4, atol=1e-5)
    if batch == 7:  # the batch is vmappable: explain images one by one under vmap
        per = jax.vmap(lambda xi: fn(params, xi[None]).coefficients[0])(x)
        np.testing.assert_allclose(per, e.coefficients, rtol=1e-4, atol=1e-5)


def _max_const_size(jaxpr) -> int:
    biggest = 0
    for c in jaxpr.consts:
        biggest = max(biggest, int(np.size(c)))
    for eqn in jaxpr.jaxpr.eqns:
        for v in eqn.invars:
            if hasattr(v, "val"):
                biggest = max(biggest, int(np.size(v.val)))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            biggest = max(biggest, _max_const_size(jax.extend.core.ClosedJaxpr(sub, [])))
    return biggest


def test_compiled_explain_bakes_in_no_weights(small):
    split, params, x = small
    fn = lj.explainer(split)
    closed = jax.make_jaxpr(fn)(params, x)
    smallest_weight = min(int(np.size(w)) for w in jax.tree_util.tree_leaves(params))
    assert _max_const_size(closed) < smallest_weight
    # new params, same compiled program, different answer
    params2 = jax.tree_util.tree_map(lambda w: w * 1.5, params)
    assert not np.allclose(fn(params, x).coefficients, fn(params2, x).coefficients)


def test_deeplift_shap_cam_completeness_against_mean_reference(small):
    split, params, x = small
    a = split.features(params, x)
    refs = jax.random.uniform(jax.random.PRNGKey(9), (3,) + a.shape[1:]) * 0.5
    e = lj.explain(split, params, x, method="deeplift-shap-cam", references=refs)
    mean_ref_logits = jnp.mean(jnp.stack([split.head(params, jnp.broadcast_to(r, a.shape)) for r in refs]), 0)
    np.testing.assert_allclose(e.reference_logits, mean_ref_logits, rtol=1e-5, atol=1e-6)
    gap = (e.logits - e.reference_logits)[jnp.arange(3), e.targets]
    np.testing.assert_allclose(e.coefficients.sum(-1), gap, rtol=1e-4, atol=1e-5)
    # a single zero reference is LIFT-CAM
    z = lj.explain(split, params, x, method="deeplift-shap-cam", references=jnp.zeros((1,) + a.shape[1:]))
    np.testing.assert_allclose(z.coefficients, lj.explain(split, params, x).coefficients, rtol=1e-5, atol=1e-6)
    # default references (zero + blurred copies) run and complete too
    d = lj.explain(split, params, x, method="deeplift-shap-cam")
    gap = (d.logits - d.reference_logits)[jnp.arange(3), d.targets]
    np.testing.assert_allclose(d.coefficients.sum(-1), gap, rtol=1e-4, atol=1e-5)


def _bilinear_half_pixel(img, out_h, out_w):
    """Reference implementation of PyTorch's bilinear, align_corners=False."""
    h, w = img.shape
    out = np.zeros((out_h, out_w))
    for i in range(out_h):
        sy = max((i + 0.5) * h / out_h - 0.5, 0.0)
        y0 = min(int(np.floor(sy)), h - 1)
        y1 = min(y0 + 1, h - 1)
        ly = sy - y0
        for j in range(out_w):
            sx = max((j + 0.5) * w / out_w - 0.5, 0.0)
            x0 = min(int(np.floor(sx)), w - 1)
            x1 = min(x0 + 1, w - 1)
            lx = sx - x0
            out[i, j] = ((1 - ly) * ((1 - lx) * img[y0, x0] + lx * img[y0, x1])
                         + ly * ((1 - lx) * img[y1, x0] + lx * img[y1, x1]))
    return out


def test_upsample_matches_half_pixel_bilinear():
    raw = np.random.default_rng(0).random((1, 7, 5)).astype(np.float32)
    up = np.asarray(upsample(jnp.asarray(raw), (32, 23)))[0]
    np.testing.assert_allclose(up, _bilinear_half_pixel(raw[0], 32, 23), atol=1e-5)


def test_normalize_and_constant_maps():
    m = jnp.stack([jnp.full((4, 4), 3.0), jnp.arange(16.0).reshape(4, 4)])
    n = normalize(m)
    np.testing.assert_array_equal(n[0], 0.0)
    assert float(n[1].min()) == 0.0 and float(n[1].max()) == 1.0
    maps, raw = assemble(-jnp.ones((1, 2, 2, 3)), jnp.ones((1, 3)), (4, 4))
    np.testing.assert_array_equal(raw, 0.0)
    np.testing.assert_array_equal(maps, 0.0)


def test_target_validation(small):
    split, params, x = small
    with pytest.raises(ValueError, match="out of range"):
        lj.explain(split, params, x, 7)
    with pytest.raises(ValueError, match="one per image"):
        lj.explain(split, params, x, jnp.array([1, 2]))
    with pytest.raises(lj.methods.UnknownMethodError, match="valid methods: .*lift-cam"):
        lj.explain(split, params, x, method="nope")
