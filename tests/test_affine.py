"""The affine front of a head, and permutation SHAP through it.

The split must reproduce the head exactly (``rest(front(a)) == head(a)``), the
front must be affine (coalition values are sums of channel contributions), the
fast permutation estimator must equal the plain one for the same permutations,
and a head that mixes channels nonlinearly at once must not be split. Per-channel
operations (depthwise convolution, batch norm, ReLU6) before the first channel
mixing join the front: the contributions stay additive.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from liftcam_jax import affine, shap


class _BnHead(nn.Module):
    """conv -> BN -> conv -> ReLU6 -> GAP -> Dense: the shape of EfficientNet-Lite's head after a block."""

    @nn.compact
    def __call__(self, a):
        h = nn.BatchNorm(use_running_average=True)(nn.Conv(6, (1, 1))(a))
        h = jax.nn.relu6(nn.Conv(8, (3, 3))(h) + 0.5)
        return nn.Dense(5)(jnp.mean(h, axis=(1, 2)))


_SETUPS = {}


def _setup(module, k=7, b=2, seed=0):
    # built once per module and shape, in one compiled program (eagerly, the init and the
    # randomisation below compile ~80 one-op programs); the tests never change p or a
    key = (type(module).__name__, k, b, seed)
    if key not in _SETUPS:
        def make():
            a = jax.nn.relu(jax.random.normal(jax.random.PRNGKey(seed), (b, 5, 5, k)))
            p = module.init(jax.random.PRNGKey(seed + 1), a)
            # non-trivial batch statistics
            leaves, tree = jax.tree_util.tree_flatten(p)
            keys = jax.random.split(jax.random.PRNGKey(seed + 2), len(leaves))
            leaves = [jnp.abs(l) + 0.5 * jax.random.uniform(kk, l.shape) for l, kk in zip(leaves, keys)]
            return jax.tree_util.tree_unflatten(tree, leaves), a

        _SETUPS[key] = jax.jit(make)()
    p, a = _SETUPS[key]
    return (lambda params, z: module.apply(params, z)), p, a


def test_front_reproduces_the_head_and_is_affine():
    head, p, a = _setup(_BnHead())
    split = affine.affine_front(head, p, a)
    assert split.saves and split.frontier_size == 2 * 5 * 5 * 8  # the pre-activation of the second conv
    front, rest = jax.jit(split.front), jax.jit(split.rest)
    np.testing.assert_allclose(rest(p, front(p, a))[0], head(p, a), rtol=1e-5, atol=1e-6)
    # L(A * 1_S) = L(0) + sum_{k in S} (L(A * e_k) - L(0))
    f0 = front(p, jnp.zeros_like(a))[0]
    mask = jnp.array([1, 0, 1, 1, 0, 0, 1], a.dtype)
    parts = sum(front(p, a * jnp.eye(7)[k])[0] - f0 for k in range(7) if mask[k])
    np.testing.assert_allclose(front(p, a * mask)[0], f0 + parts, rtol=1e-5, atol=1e-5)


def test_front_stops_at_channel_mixing_nonlinearities_and_products():
    """A max over channels is not split; a product of two channel-mixed values ends the front."""
    max_first = lambda params, z: jnp.mean(jnp.max(z, axis=-1, keepdims=True) * params, axis=(1, 2))
    a = jnp.ones((1, 3, 3, 4))
    split = affine.affine_front(max_first, jnp.ones(4), a)
    assert not split.saves and split.frontier_size == a.size
    cast = lambda params, z: jnp.sum((2.0 * z).astype(jnp.int32) * params, axis=(1, 2))  # rounds: not affine
    split = affine.affine_front(cast, jnp.ones(4, jnp.int32), a)
    assert split.frontier_size == a.size  # 2z is affine; the int cast and everything after it are not
    np.testing.assert_array_equal(split.rest(jnp.ones(4, jnp.int32), split.front(jnp.ones(4, jnp.int32), 1.3 * a))[0],
                                  cast(jnp.ones(4, jnp.int32), 1.3 * a))
    square = lambda params, z: jnp.sum((2.0 * z) * (z[..., ::-1] + params), axis=(1, 2))  # channel c times 3 - c
    split = affine.affine_front(square, jnp.ones(4), a)
    assert split.saves and split.frontier_size == 2 * a.size  # 2z and rev(z) + p, both read by the product
    np.testing.assert_allclose(split.rest(jnp.ones(4), split.front(jnp.ones(4), 3 * a))[0],
                               square(jnp.ones(4), 3 * a), rtol=1e-6)


def test_per_channel_functions_join_the_front():
    """ReLU, a product of a channel with itself and a comparison mask act channel by channel."""
    a = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 3, 4))
    w = jax.random.normal(jax.random.PRNGKey(1), (4, 3))
    relu_first = lambda params, z: jnp.mean(jax.nn.relu(z) * params, axis=(1, 2)) @ w
    split = affine.affine_front(relu_first, jnp.ones(4), a)
    assert split.saves and split.frontier_size == 2 * 3  # the whole function: ReLU per channel, then affine
    swish = lambda params, z: jnp.tanh(jnp.mean(z * jax.nn.sigmoid(z + params), axis=(1, 2)) @ w)
    split = affine.affine_front(swish, jnp.ones(4), a)
    assert split.frontier_size == 2 * 3  # up to the tanh of the mixed channels
    np.testing.assert_allclose(split.rest(jnp.ones(4), split.front(jnp.ones(4), a))[0], swish(jnp.ones(4), a),
                               rtol=1e-5, atol=1e-6)
    # a comparison mask is per channel, but a boolean cannot be on the frontier: affine front only
    gated = lambda params, z: jnp.tanh(jnp.where(z > 0, z @ params, 0.0))
    split = affine.affine_front(gated, jnp.eye(4), a)
    assert split.frontier_size == 2 * a.size  # z (for the comparison) and z @ p
    np.testing.assert_allclose(split.rest(jnp.eye(4), split.front(jnp.eye(4), a))[0], gated(jnp.eye(4), a),
                               rtol=1e-6)


class _DwHead(nn.Module):
    """depthwise conv -> BN -> ReLU6 -> 1x1 conv -> BN -> ReLU6 -> GAP -> Dense: a split before a depthwise conv."""

    @nn.compact
    def __call__(self, a):
        k = a.shape[-1]
        h = nn.BatchNorm(use_running_average=True)(nn.Conv(k, (3, 3), feature_group_count=k, use_bias=False)(a))
        h = jax.nn.relu6(h)
        h = nn.max_pool(h, (2, 2), strides=(1, 1), padding="SAME")  # per channel too
        h = jax.nn.relu6(nn.BatchNorm(use_running_average=True)(nn.Conv(6, (1, 1))(h)) - 1.0)
        return nn.Dense(5)(jnp.mean(h, axis=(1, 2)))


def test_depthwise_front_is_additive_and_the_fast_estimator_agrees():
    head, p, a = _setup(_DwHead())
    split = affine.affine_front(head, p, a)
    assert split.saves and split.frontier_size == 2 * 5 * 5 * 6  # after the 1x1 conv and its BN
    front, rest = jax.jit(split.front), jax.jit(split.rest)
    np.testing.assert_allclose(rest(p, front(p, a))[0], head(p, a), rtol=1e-5, atol=1e-6)
    f0 = front(p, jnp.zeros_like(a))[0]
    mask = jnp.array([0, 1, 1, 0, 1, 0, 1], a.dtype)
    parts = sum(front(p, a * jnp.eye(7)[k])[0] - f0 for k in range(7) if mask[k])
    np.testing.assert_allclose(front(p, a * mask)[0], f0 + parts, rtol=1e-5, atol=1e-5)
    t = jnp.array([2, 0])
    run = jax.jit(lambda p, a, aff: shap.permutation_shapley(head, p, a, t, jax.random.PRNGKey(3),
                                                             num_permutations=10, chunk_size=4, affine=aff),
                  static_argnums=2)
    fast, plain = run(p, a, True), run(p, a, False)
    scale = float(jnp.max(jnp.abs(plain.values)))
    np.testing.assert_allclose(fast.values, plain.values, atol=1e-4 * scale)
    np.testing.assert_allclose(fast.stderr, plain.stderr, atol=1e-4 * scale)


@pytest.mark.parametrize("chunk", [3, 64])
def test_fast_permutation_shapley_equals_the_plain_estimator(chunk):
    head, p, a = _setup(_BnHead())
    t = jnp.array([1, 4])
    run = jax.jit(lambda p, a, aff: shap.permutation_shapley(head, p, a, t, jax.random.PRNGKey(5),
                                                             num_permutations=12, chunk_size=chunk, affine=aff),
                  static_argnums=2)
    fast, plain = run(p, a, True), run(p, a, False)
    scale = float(jnp.max(jnp.abs(plain.values)))
    np.testing.assert_allclose(fast.values, plain.values, atol=1e-4 * scale)
    np.testing.assert_allclose(fast.stderr, plain.stderr, atol=1e-4 * scale)
    # efficiency holds exactly through the front too
    rows = jnp.arange(2)
    np.testing.assert_allclose(fast.values.sum(1), head(p, a)[rows, t] - head(p, jnp.zeros_like(a))[rows, t],
                               rtol=1e-4, atol=1e-5)
    # and it converges to the exact values like the plain one (K = 7: enumeration)
    exact = jax.jit(lambda p, a: shap.exact_shapley(head, p, a, t).values)(p, a)
    many = jax.jit(lambda p, a: shap.permutation_shapley(head, p, a, t, jax.random.PRNGKey(6),
                                                         num_permutations=400, chunk_size=chunk))(p, a)
    z = np.abs(np.asarray(many.values - exact)) / np.maximum(np.asarray(many.stderr), 1e-7)
    assert np.mean(z <= 4.0) >= 0.9


@pytest.mark.parametrize("score", ["logit", "rest"])
def test_memory_budget_goes_image_by_image_then_to_the_plain_path(monkeypatch, score):
    """The three paths agree, for the class logit and for ReST (2 y_c - LSE(y)): image by image, each
    image's game is its own class's score (a wrong cut would give another image's class, or the logit)."""
    from liftcam_jax import targets

    head, p, a = _setup(_BnHead())
    t = targets.SCORES[score](jnp.array([1, 4]))
    run = lambda aff: jax.jit(lambda p, a: shap.permutation_shapley(  # noqa: E731
        head, p, a, t, jax.random.PRNGKey(5), num_permutations=8, affine=aff))(p, a)
    plain = run(False)
    per_batch = 7 * 2 * 5 * 5 * 8 * 4  # K x frontier x float32 bytes
    seen, real = [], shap._prefix_values
    monkeypatch.setattr(shap, "_prefix_values", lambda split, p, a, *r: seen.append(a.shape[0]) or real(split, p, a, *r))
    for budget, batches in ((per_batch, [2]), (per_batch // 2, [1]), (per_batch // 4, [])):  # batch, per image, plain
        monkeypatch.setattr(shap, "AFFINE_BYTES", budget)
        seen.clear()
        got = run(True)
        assert seen == batches
        np.testing.assert_allclose(got.values, plain.values, atol=1e-4 * float(jnp.max(jnp.abs(plain.values))))
        np.testing.assert_allclose(got.stderr, plain.stderr, atol=1e-4 * float(jnp.max(jnp.abs(plain.values))))


def test_zoo_post_activation_split_front_reaches_the_head_norm():
    """EfficientNet-Lite0 at blocks.15.dw and .expand: the front ends after the head conv's BN (7x7x1280 per image)."""
    import models

    clf = models.load("efficientnet_lite0", weights="random", layer="blocks.15.dw")
    split_head = clf.split.head
    a = jax.ShapeDtypeStruct((1, 7, 7, 1152), jnp.float32)
    split = affine.affine_front(split_head, clf.params, a)
    assert split.saves and split.frontier_size == 7 * 7 * 1280
    # one step earlier, before the depthwise conv: depthwise conv, BN and ReLU6 act per channel, so the
    # front goes on through the projection to the same place
    clf = models.load("efficientnet_lite0", weights="random", layer="blocks.15.expand")
    split = affine.affine_front(clf.split.head, clf.params, a)
    assert split.saves and split.frontier_size == 7 * 7 * 1280
