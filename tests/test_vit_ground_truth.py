"""Ground truth on attention heads: the channel game of token activations, exact Shapley values
against LIFT-CAM on small ViTs (float64).

A channel of ``(B, N, D)`` tokens is one feature dimension across every token; the game
(:mod:`liftcam_jax.shap`) zeroes it in all of them. Checked against an independent
brute-force enumeration; where the head is linear in the channels (the class-token classifier
after ``norm``, mean-pooling then a Dense layer) the exact Shapley values are LIFT-CAM's
coefficients; through attention, LayerNorm and GELU LIFT-CAM's coefficients sum to the same
``v(N) - v(empty)`` as the exact Shapley values (summation-to-delta, efficiency).
"""
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import liftcam_jax as lj
from liftcam_jax import shap
from liftcam_jax.explain import explain
from models.vit import ViTConfig, vision_transformer
from models.zoo import random_params


def _vit(width, seed=0):
    """A 16x16-input ViT (4 patch tokens + the class token), 2 blocks of 2 heads, 10 classes, float64
    variables with non-zero biases and LayerNorm scales."""
    m = vision_transformer("vit_gt_test", ViTConfig(width, 2, 2, patch=8, size=16), 10)
    rng = np.random.default_rng(seed)
    params = jax.tree_util.tree_map_with_path(
        lambda path, v: np.asarray(v, np.float64) + (0.3 * rng.standard_normal(v.shape) if path[-1].key in (
            "bias", "scale") else 0.0), random_params(m, seed))
    x = jax.random.normal(jax.random.PRNGKey(seed), (2, 16, 16, 3), jnp.float64)
    return m, params, x


def _lift_cam(split, params, x):
    return jax.jit(lambda p, x: explain(split, p, x, method="lift-cam"))(params, x)


def _exact(split, params, a, t):
    return jax.jit(lambda p, a, t: shap.exact_shapley(split.head, p, a, t).values)(params, a, t)


def _brute_force(head, params, a, t):
    """Shapley values of the token game by the formula, coalition by coalition (numpy)."""
    k = a.shape[-1]
    a = np.asarray(a)
    head = jax.jit(head)

    def v(s):
        m = np.zeros(k)
        m[list(s)] = 1.0
        return np.asarray(head(params, jnp.asarray(a * m)))[np.arange(a.shape[0]), t]

    phi = np.zeros((a.shape[0], k))
    for j in range(k):
        rest = [i for i in range(k) if i != j]
        for r in range(k):
            for s in itertools.combinations(rest, r):
                phi[:, j] += math.factorial(r) * math.factorial(k - r - 1) / math.factorial(k) * (v(s + (j,)) - v(s))
    return phi


def test_exact_and_permutation_shapley_play_the_channel_game_on_tokens(x64):
    # a non-linear head on (B, N, K) tokens: softmax attention over the tokens, tanh, a class layer
    rng = np.random.default_rng(3)
    wq, wo = rng.standard_normal((4, 4)), rng.standard_normal((4, 3))

    def head(p, a):
        att = jax.nn.softmax(jnp.einsum("bnk,kj,bmj->bnm", a, p["q"], a), axis=-1)
        return jnp.tanh(jnp.einsum("bnm,bmk->bk", att, a) / a.shape[1]) @ p["o"]

    params = {"q": jnp.asarray(wq), "o": jnp.asarray(wo)}
    a = jnp.asarray(rng.standard_normal((2, 5, 4)))
    t = np.array([0, 2])
    exact = shap.exact_shapley(head, params, a, t).values
    np.testing.assert_allclose(exact, _brute_force(head, params, a, t), rtol=1e-10, atol=1e-12)
    # permutation sampling of the same game: within 5 standard errors of the exact values
    perm = jax.jit(lambda p, a: shap.permutation_shapley(head, p, a, t, jax.random.PRNGKey(0),
                                                         num_permutations=64))(params, a)
    assert np.all(np.abs(perm.values - exact) <= 5 * perm.stderr + 1e-12)


@pytest.mark.parametrize("pool", ["class-token", "mean"])
def test_exact_shapley_is_lift_cam_on_a_head_linear_in_the_channels(x64, pool):
    m, params, x = _vit(8)
    split = m.split("norm")  # head: Dense on the class token, linear in the channels
    if pool == "mean":  # mean-pooling every token, then a Dense layer of our own
        w = jnp.asarray(np.random.default_rng(1).standard_normal((8, 10)))
        split = lj.Split(split.features, lambda p, a: jnp.mean(a, axis=1) @ w + 0.5)
    a = split.features(params, x)
    e = _lift_cam(split, params, x)
    exact = _exact(split, params, a, e.targets)
    np.testing.assert_allclose(e.coefficients, exact, rtol=1e-9, atol=1e-12)
    if pool == "class-token":  # only the class token counts: the grid's map is blank, all is prefix share
        kernel = params["head"]["params"]["head"]["kernel"]
        np.testing.assert_allclose(exact, a[:, 0, :] * kernel[:, e.targets].T, rtol=1e-9)
        np.testing.assert_allclose(e.prefix_coefficients, e.coefficients, rtol=1e-12)  # the grid's share is 0
    else:
        np.testing.assert_allclose(exact, jnp.mean(a, axis=1) * w[:, e.targets].T, rtol=1e-9)


@pytest.mark.parametrize("width, layer", [(8, "blocks.0"), (4, "blocks.0.norm1")])
def test_lift_cam_sums_to_delta_through_attention_as_the_exact_shapley_values(x64, width, layer):
    # blocks.0: the head is a whole block (attention, LayerNorms, GELU) + norm + the classifier;
    # blocks.0.norm1 (2 x 4 channels: normalised and residual): attention onwards, two blocks
    m, params, x = _vit(width)
    split = m.split(layer)
    a = split.features(params, x)
    assert a.shape == (2, 5, 8)
    e = _lift_cam(split, params, x)
    rows = jnp.arange(2)
    delta = e.logits[rows, e.targets] - e.reference_logits[rows, e.targets]
    np.testing.assert_allclose(jnp.sum(e.coefficients, -1), delta, rtol=1e-9)
    exact = _exact(split, params, a, e.targets)
    np.testing.assert_allclose(jnp.sum(exact, -1), delta, rtol=1e-9)  # the same game: zero = the reference
    assert not np.allclose(exact, e.coefficients, rtol=1e-3)  # a non-linear head: an approximation
