"""LIFT-CAM on the zoo's real architectures: summation-to-delta at several splits.

sum_k phi_k = y_c(A) - y_c(0) must hold to float32 rounding (<= 1e-5 relative)
for any head: VGG's (max-pool + MLP), ResNet's (GAP + Linear, or residual blocks
when split earlier) and EfficientNet-Lite's (depthwise convs, BN, ReLU6).

"Relative" is relative to the magnitudes involved: the two logits being
subtracted, |y_c(A)| + |y_c(0)|, or the contributions being summed,
sum_k |phi_k|, whichever is larger. In float32, y_c(A) - y_c(0) and sum_k phi_k
themselves carry rounding errors of those orders, so dividing by a (possibly
tiny) difference would measure cancellation, not the transformation.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import liftcam_jax as lj
import models


@jax.jit  # one program per model (eagerly, every op on every distinct leaf shape compiles its own)
def _randomise(params, seed):
    """Random biases, BN scales, shifts and running statistics (variances positive)."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    keys = jax.random.split(jax.random.PRNGKey(seed), len(flat))
    out = {}
    for (path, leaf), k in zip(flat, keys):
        name = "/".join(str(getattr(p, "key", p)) for p in path)
        noise = jax.random.normal(k, leaf.shape, leaf.dtype)
        if name.endswith("var"):
            new = 0.5 + jax.random.uniform(k, leaf.shape, leaf.dtype)
        elif name.endswith("scale"):
            new = 1.0 + 0.2 * noise
        elif name.endswith(("bias", "mean")):
            new = 0.1 * noise
        else:
            new = leaf
        out[name] = new
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), [out[n] for n in out])


def _completeness(split, params, x, targets=None):
    e = lj.explainer(split)(params, x, targets)
    rows = jnp.arange(x.shape[0])
    y, y0 = e.logits[rows, e.targets], e.reference_logits[rows, e.targets]
    scale = jnp.maximum(jnp.abs(y) + jnp.abs(y0), jnp.abs(e.coefficients).sum(-1))
    err = jnp.abs(e.coefficients.sum(-1) - (y - y0)) / scale
    return float(jnp.max(err)), e


@pytest.mark.parametrize(
    "name, layer",
    [
        ("vgg16", None), ("vgg16", "conv4_3"),
        ("vgg16_bn", None), ("vgg16_bn", "conv4_3"),
        ("resnet18", None), ("resnet18", "layer3"),
        ("resnet50", None), ("resnet50", "layer3"),
        # inside blocks: non-linear heads that start from non-negative maps, the shortcut carried
        ("resnet18", "layer4.0.relu1"), ("resnet50", "layer4.2.relu2"), ("resnet50", "layer4.0.relu1"),
    ],
)
def test_summation_to_delta_random_weights(name, layer):
    model = models.get(name)
    params = _randomise(models.zoo.random_params(model), seed=1)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 224, 224, 3))
    err, e = _completeness(model.split(layer), params, x, jnp.array([3, 997]))
    assert err <= 1e-5, f"{name} at {layer or model.default_layer}: relative completeness error {err:.2e}"


@pytest.fixture(scope="module")
def lite0():
    return models.load("efficientnet_lite0")


@pytest.mark.parametrize("layer", [None, "stage6", "blocks.10"])
def test_summation_to_delta_pretrained_efficientnet_lite0(lite0, layer):
    model = models.get("efficientnet_lite0")
    images = [np.asarray(Image.open(p).convert("RGB")) for p in models.sample_images()[:2]]
    x = jnp.stack([lite0.preprocess(im) for im in images])
    err, e = _completeness(model.split(layer), lite0.params, x)
    assert err <= 1e-5, f"lite0 at {layer}: relative completeness error {err:.2e}"
    if layer is not None:  # an intermediate block: the head is nonlinear (ReLU6, depthwise convs)
        head = lambda a: model.split(layer).head(lite0.params, a)
        a = jax.jit(model.split(layer).features)(lite0.params, x)
        assert "custom_jvp_call[relu6]" in lj.rescale.nonlinear_primitives(head, a)


def test_default_split_heads_have_the_expected_closed_form(lite0):
    """EfficientNet-Lite's default head (GAP + Linear): phi_k = w_ck * mean(A^k)."""
    images = [np.asarray(Image.open(p).convert("RGB")) for p in models.sample_images()[:2]]
    x = jnp.stack([lite0.preprocess(im) for im in images])
    e = lj.explain(lite0.split, lite0.params, x)
    a = jax.jit(lite0.features)(lite0.params, x)
    assert lj.rescale.nonlinear_primitives(lambda z: lite0.head(lite0.params, z), a) == ()
    jac = jax.jit(jax.vmap(lambda ai, t: jax.grad(lambda q: lite0.head(lite0.params, q[None])[0, t])(ai)))(a, e.targets)
    w = jac.sum(axis=(1, 2))  # the class weights w_ck (the gradient is uniform over positions)
    np.testing.assert_allclose(e.coefficients, w * a.mean(axis=(1, 2)), rtol=1e-4, atol=1e-6)


def test_summation_to_delta_inside_the_last_block_of_pretrained_lite0(lite0):
    """``blocks.15.dw``: after the last block's depthwise BN + ReLU6 (1152 non-negative maps,
    no shortcut); the head is projection, BN, head conv, BN, ReLU6, pool, fc."""
    model = models.get("efficientnet_lite0")
    x = jnp.stack([lite0.preprocess(np.asarray(Image.open(p).convert("RGB")))
                   for p in models.sample_images()])
    split = model.split("blocks.15.dw")
    a = jax.jit(split.features)(lite0.params, x)
    assert a.shape == (4, 7, 7, 1152) and float(a.min()) >= 0.0
    err, e = _completeness(split, lite0.params, x)
    np.testing.assert_allclose(np.asarray(e.logits), np.asarray(lite0.logits(x)), rtol=1e-5, atol=1e-4)
    assert err <= 1e-5, f"lite0 at blocks.15.dw: relative completeness error {err:.2e}"
    # non-linear head: the coefficients are not the gradient times the maps
    grad = jax.jit(jax.grad(lambda a: split.head(lite0.params, a)[0, e.targets[0]]))(a[:1])
    assert not np.allclose(np.asarray((grad * a[:1]).sum((1, 2))[0]), np.asarray(e.coefficients[0]),
                           rtol=1e-3, atol=1e-3)
