"""Users' own Vision Transformers, from other codebases, explained at a block with linen_split / nnx_split.

* big_vision's linen ViT (``tests/big_vision_vit.py``, vendored): returns ``(logits, out)`` and its
  blocks ``(x, out)``, so the split takes ``output=`` and ``layer_output=``; class-token (``tok``) and
  mean-token (``gap``) pooling.
* Bonsai's NNX ViT (``tests/bonsai_vit.py``, vendored from jax-ml/bonsai): ``model.eval()``, the call's
  ``rngs=None`` passed through ``nnx_split``.

End to end: LIFT-CAM's summation-to-delta over all tokens (1e-9 relative in float64, 1e-3 in float32),
maps at the input size, the token layout inferred (1 + 4x4 or 0 + 4x4 at 32x32 with patch 8), and
Grad-CAM equal to a hand-written pytorch-grad-cam ``reshape_transform`` Grad-CAM whose head is built
from the model's own submodules (not from the split).

Known limits measured here (see the module's tests): JAX's fused ``jax.nn.dot_product_attention``
(which ``nnx.MultiHeadAttention`` calls without dropout) computes the softmax in float32 even for
float64 inputs. A LayerNorm whose reference input has zero variance (the zero reference at the
first LayerNorm of the head, every LayerNorm with zero biases) takes the normaliser's rule: attributions
that do not depend on its ``eps``, and summation-to-delta exact through a freshly initialised model.
"""
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.nnx.nn import attention as nnx_attention

import liftcam_jax as lj

sys.path.insert(0, os.path.dirname(__file__))
import big_vision_vit as bv  # noqa: E402
import bonsai_vit as bz  # noqa: E402

KEY = jax.random.PRNGKey(0)
B, SIZE, PATCH, WIDTH = 2, 32, 8, 16


def _noisy(tree, dtype, seed=0, scale=0.3):
    """Every float leaf plus N(0, scale^2) noise (non-zero biases: a reference that is not a fixed point), cast."""
    rng = np.random.default_rng(seed)

    def noisy(a):
        base = np.zeros(a.shape) if isinstance(a, jax.ShapeDtypeStruct) else np.asarray(a)
        return jnp.asarray(base + scale * rng.standard_normal(base.shape), dtype)

    return jax.tree_util.tree_map(noisy, tree)


def _gap(e):
    idx = jnp.arange(e.targets.shape[0])
    return e.logits[idx, e.targets] - e.reference_logits[idx, e.targets]


def _check_lift_cam(e, layout, tol):
    """Summation-to-delta over all tokens (grid + prefix share), relative to the target's gap; maps at the input size."""
    gap = _gap(e)
    assert float(jnp.max(jnp.abs(e.coefficients.sum(-1) - gap) / jnp.abs(gap))) < tol
    assert e.maps.shape == (B, SIZE, SIZE) and e.raw.shape == (B,) + layout.grid
    assert e.prefix_coefficients.shape == e.coefficients.shape
    if layout.prefix == 0:
        np.testing.assert_array_equal(e.prefix_coefficients, 0)


def _hand_grad_cam(tokens, head, targets, layout):
    """pytorch-grad-cam's Grad-CAM with ``reshape_transform``: prefix tokens dropped from the activations and
    the gradients, the grid reshaped, weights = the grid's mean gradient, ReLU, bilinear upsampling (half-pixel
    centres), per-image min-max."""
    grads = jax.grad(lambda t: jnp.sum(head(t)[jnp.arange(B), targets]))(tokens)
    h, w = layout.grid
    grid = lambda t: t[:, layout.prefix:].reshape(B, h, w, t.shape[-1])  # noqa: E731
    a, g = grid(tokens), grid(grads)
    raw = jax.nn.relu(jnp.einsum("bhwk,bk->bhw", a, g.mean(axis=(1, 2))))
    up = jax.image.resize(raw, (B, SIZE, SIZE), method="bilinear", antialias=False)
    lo, hi = up.min(axis=(1, 2), keepdims=True), up.max(axis=(1, 2), keepdims=True)
    return raw, (up - lo) / (hi - lo)


# ---------------------------------------------------------------------------
# big_vision (linen)
# ---------------------------------------------------------------------------

def _big_vision(pool, dtype):
    net = bv.Model(num_classes=5, width=WIDTH, depth=2, mlp_dim=32, num_heads=2, patch_size=(PATCH, PATCH),
                   pool_type=pool, dtype_mm=jnp.dtype(dtype).name)
    x = jax.random.normal(KEY, (B, SIZE, SIZE, 3), dtype)
    return net, _noisy(jax.eval_shape(net.init, KEY, x), dtype), x


def _bv_split(net):
    return lj.linen_split(net, "Transformer/encoderblock_0", output=lambda out: out[0],
                          layer_output=lambda out: out[0])


@pytest.mark.parametrize("pool, layout", [("tok", lj.TokenLayout(1, (4, 4))), ("gap", lj.TokenLayout(0, (4, 4)))])
def test_big_vision_vit_lift_cam_and_grad_cam(x64, pool, layout):
    """At the first block's output (the head: a whole block, the final LayerNorm, the pooling, the Dense)."""
    net, v, x = _big_vision(pool, jnp.float64)
    split = _bv_split(net)
    logits, out = net.apply(v, x)
    e = lj.explainer(split)(v, x)
    np.testing.assert_allclose(e.logits, logits, rtol=1e-12)
    _check_lift_cam(e, layout, 1e-9)
    # the head by hand from big_vision's own modules: block 1, the encoder's LayerNorm, the pooling, the Dense
    p = v["params"]
    block = bv.Encoder1DBlock(mlp_dim=32, num_heads=2, dtype_mm="float64")
    norm = nn.LayerNorm()
    dense = nn.Dense(5)

    def head(t):
        t, _ = block.apply({"params": p["Transformer"]["encoderblock_1"]}, t)
        t = norm.apply({"params": p["Transformer"]["encoder_norm"]}, t)
        return dense.apply({"params": p["head"]}, t[:, 0] if pool == "tok" else t.mean(1))

    tokens = out["encoder"]["block00"]["+mlp"]
    np.testing.assert_allclose(head(tokens), logits, rtol=1e-12)
    raw, maps = _hand_grad_cam(tokens, head, e.targets, layout)
    g = lj.explainer(split, "grad-cam")(v, x, e.targets)
    np.testing.assert_allclose(g.raw, raw, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(g.maps, maps, rtol=1e-10, atol=1e-12)


def test_big_vision_vit_in_float32():
    net, v, x = _big_vision("tok", jnp.float32)
    e = lj.explainer(_bv_split(net))(v, x)
    _check_lift_cam(e, lj.TokenLayout(1, (4, 4)), 1e-3)
    g = lj.explainer(_bv_split(net), "grad-cam")(v, x, e.targets)
    assert g.maps.shape == (B, SIZE, SIZE) and bool(jnp.all(jnp.isfinite(g.maps)))


# ---------------------------------------------------------------------------
# Bonsai (NNX)
# ---------------------------------------------------------------------------

def _unfused_attention(query, key, value, bias=None, mask=None, *, dtype=None, precision=None, **_):
    """Flax's own attention (the weights, then their sum of values): the softmax in the inputs' dtype.

    ``nnx.MultiHeadAttention`` without dropout calls ``jax.nn.dot_product_attention``, which casts the
    logits to float32 for the softmax whatever their dtype (JAX's ``_dot_product_attention_core``).
    """
    weights = nnx_attention.dot_product_attention_weights(query, key, bias, mask, dtype=dtype, precision=precision)
    return jnp.einsum("...hqk,...khd->...qhd", weights, value, precision=precision)


def _bonsai(dtype, eps=1e-6, fused=True, noise=0.3):
    cfg = bz.ModelConfig(image_size=(SIZE, SIZE), patch_size=(PATCH, PATCH), num_channels=3, hidden_dim=WIDTH,
                         attn_dropout_prob=0.0, dropout_prob=0.0, num_heads=2, mlp_dim=32, eps=eps, num_layers=2,
                         num_labels=5)
    model = bz.ViTClassificationModel(cfg, rngs=nnx.Rngs(0))
    model.eval()
    if not fused:
        for layer in model.layers:
            layer.attention.attention_fn = _unfused_attention
    graphdef, state = nnx.split(model)
    model = nnx.merge(graphdef, _noisy(state, dtype, scale=noise))
    return model, jax.random.normal(KEY, (B, SIZE, SIZE, 3), dtype)


def test_bonsai_nnx_vit_lift_cam_and_grad_cam(x64):
    """At the first block's output; float64 with Flax's unfused attention (the fused one is float32 inside)."""
    model, x = _bonsai(jnp.float64, fused=False)
    split, state = lj.nnx_split(model, "layers/0", rngs=None)
    layout = lj.TokenLayout(1, (4, 4))
    logits = model(x, rngs=None)
    e = lj.explainer(split)(state, x)
    np.testing.assert_allclose(e.logits, logits, rtol=1e-12)
    _check_lift_cam(e, layout, 1e-9)

    def head(t):  # Bonsai's own modules: block 1, the LayerNorm, the class token, the classifier
        return model.classifier(model.ln(model.layers[1](t, rngs=None))[:, 0])

    tokens = model.layers[0](model.pos_embeddings(x, rngs=None), rngs=None)
    np.testing.assert_allclose(head(tokens), logits, rtol=1e-12)
    raw, maps = _hand_grad_cam(tokens, head, e.targets, layout)
    g = lj.explainer(split, "grad-cam")(state, x, e.targets)
    np.testing.assert_allclose(g.raw, raw, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(g.maps, maps, rtol=1e-10, atol=1e-12)


def test_bonsai_nnx_vit_in_float32_unchanged():
    """The model as Bonsai builds it (fused attention), float32, jitted."""
    model, x = _bonsai(jnp.float32)
    split, state = lj.nnx_split(model, "layers/0", rngs=None)
    e = lj.explainer(split)(state, x)
    np.testing.assert_allclose(e.logits, model(x, rngs=None), rtol=1e-5, atol=1e-6)
    _check_lift_cam(e, lj.TokenLayout(1, (4, 4)), 1e-3)
    g = lj.explainer(split, "grad-cam")(state, x, e.targets)
    assert g.maps.shape == (B, SIZE, SIZE) and bool(jnp.all(jnp.isfinite(g.maps)))


def test_fused_attention_is_float32_inside(x64):
    """Why the float64 check swaps the attention: with JAX's fused attention the model itself rounds the
    softmax to float32, and summation-to-delta holds to float32's precision, not 1e-9."""
    model, x = _bonsai(jnp.float64)
    split, state = lj.nnx_split(model, "layers/0", rngs=None)
    rel = lambda e: float(jnp.max(jnp.abs(e.coefficients.sum(-1) - _gap(e)) / jnp.abs(_gap(e))))  # noqa: E731
    err = rel(lj.explain(split, state, x))
    assert 1e-9 < err < 1e-5, err


def test_layer_norm_eps_does_not_set_the_attributions(x64):
    """The zero reference gives the head's first LayerNorm an input of zero variance, where
    rsqrt(var + eps) = 1 / sqrt(eps). The two-player Shapley split of (x - mu) * rsqrt(var + eps)
    gave each player about |x - mu| / (2 sqrt(eps)), cancelling only in the sum (max |coefficient| / |gap|
    1.4e3 at eps 1e-6, 1.4e6 at 1e-12). The normaliser's rule (``rescale_rules.normaliser_rule``) holds
    the normaliser at the input's value there: coefficients of the size of the gap, the same at both eps."""
    coefficients = []
    for eps in (1e-6, 1e-12):
        model, x = _bonsai(jnp.float64, eps=eps, fused=False)
        split, state = lj.nnx_split(model, "layers/1", rngs=None)
        e = lj.explainer(split)(state, x)
        _check_lift_cam(e, lj.TokenLayout(1, (4, 4)), 1e-12)
        assert float(jnp.max(jnp.abs(e.coefficients) / jnp.abs(_gap(e))[:, None])) < 10
        coefficients.append(np.asarray(e.coefficients))
    np.testing.assert_allclose(coefficients[1], coefficients[0], rtol=1e-4, atol=1e-6 * np.abs(coefficients[0]).max())


@pytest.mark.parametrize("dtype, tol", [(jnp.float64, 1e-9), (jnp.float32, 1e-3)])
def test_freshly_initialised_vit_sums_to_delta(x64, dtype, tol):
    """Zero biases and identity LayerNorms (the model as Bonsai initialises it): every LayerNorm of the
    head (three after ``layers/0``: the block's two and the final one) sees a constant row at the zero
    reference. With the Shapley split of the normalisation float64 kept 2 to 6 digits through such
    heads (docs/results.md); with the normaliser's rule the sum is exact to the dtype's rounding."""
    model, x = _bonsai(dtype, fused=False, noise=0.0)
    split, state = lj.nnx_split(model, "layers/0", rngs=None)
    e = lj.explainer(split)(state, x)
    _check_lift_cam(e, lj.TokenLayout(1, (4, 4)), tol)
