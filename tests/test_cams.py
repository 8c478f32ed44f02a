"""CAM baselines (CAM, Grad-CAM family, Eigen-CAM, Score-CAM, Ablation-CAM) on small Flax models.

Closed forms and identities that hold by construction, independent re-computations
(numpy SVD, explicit per-channel loops, brute-force derivatives), and the
batching contract (mixed targets, jit, vmap, chunk sizes).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import liftcam_jax as lj
from liftcam_jax.errors import UsageError
from liftcam_jax.explanation import from_attribution, normalize
from liftcam_jax.methods import cams, perturbation

CAMS = ("cam", "grad-cam", "grad-cam++", "xgrad-cam", "layer-cam", "hires-cam", "eigen-cam", "score-cam", "ablation-cam")
NONLINEAR_HEAD_CAMS = tuple(m for m in CAMS if m != "cam")


class Features(nn.Module):
    relu: bool = True

    @nn.compact
    def __call__(self, x):
        x = jax.nn.relu(nn.Conv(8, (3, 3))(x))
        x = nn.Conv(6, (3, 3), strides=(2, 2))(x)
        return jax.nn.relu(x) if self.relu else x


class GapHead(nn.Module):
    @nn.compact
    def __call__(self, a):
        return nn.Dense(7, name="fc")(jnp.mean(a, axis=(1, 2)))


class VggLikeHead(nn.Module):
    @nn.compact
    def __call__(self, a):
        a = nn.max_pool(a, (2, 2), (2, 2))
        a = a.reshape(a.shape[0], -1)
        a = jax.nn.relu(nn.Dense(32)(a))
        return nn.Dense(7)(a)


class FlattenHead(nn.Module):
    @nn.compact
    def __call__(self, a):
        return nn.Dense(7)(a.reshape(a.shape[0], -1))


class SmoothHead(nn.Module):
    @nn.compact
    def __call__(self, a):
        a = jnp.tanh(nn.Dense(12)(a.reshape(a.shape[0], -1)))
        return nn.Dense(7)(jax.nn.softplus(a) * 3.0)


_MADE = {}


def make(head, features=None, size=16, batch=3, seed=0):
    """``(split, params, x)``, built once per configuration (its arrays are immutable; the init
    program takes seconds to compile)."""
    f = features or Features()
    key = (repr(head), repr(f), size, batch, seed)
    if key not in _MADE:
        _MADE[key] = _make(head, f, size, batch, seed)
    return _MADE[key]


def _make(head, f, size, batch, seed):

    @jax.jit  # one program (eagerly, each initialiser op compiles a program of its own)
    def init():
        x = jax.random.normal(jax.random.PRNGKey(seed), (batch, size, size, 3))
        pf = f.init(jax.random.PRNGKey(seed + 1), x)
        ph = head.init(jax.random.PRNGKey(seed + 2), f.apply(pf, x))
        ph = jax.tree_util.tree_map(lambda w: w + 0.1, ph)  # non-zero biases
        return x, pf, ph

    x, pf, ph = init()
    split = lj.Split(lambda p, x: f.apply(p["f"], x), lambda p, a: head.apply(p["h"], a))
    return split, {"f": pf, "h": ph}, x


@pytest.fixture(scope="module")
def gap():
    return make(GapHead())


@pytest.fixture(scope="module")
def vgg():
    return make(VggLikeHead())


# ---------------------------------------------------------------------------
# CAM
# ---------------------------------------------------------------------------

def test_cam_is_the_closed_form(gap):
    split, params, x = gap
    targets = jnp.array([0, 5, 3])
    e = lj.explain(split, params, x, targets, method="cam")
    w = np.asarray(params["h"]["params"]["fc"]["kernel"])  # (K, C)
    np.testing.assert_allclose(e.coefficients, w[:, targets].T, rtol=1e-5, atol=1e-6)
    a = np.asarray(split.features(params, x))
    raw = np.maximum(np.einsum("bhwk,bk->bhw", a, w[:, targets].T), 0)
    np.testing.assert_allclose(e.raw, raw, rtol=1e-5, atol=1e-5)
    # the map and the logit agree: y_c = sum_k w_ck mean(A^k) + b_c = mean(unrectified map) + b_c
    b = np.asarray(params["h"]["params"]["fc"]["bias"])
    y = np.einsum("bhwk,bk->bhw", a, w[:, targets].T).mean(axis=(1, 2)) + b[targets]
    np.testing.assert_allclose(np.asarray(e.logits)[np.arange(3), targets], y, rtol=1e-5, atol=1e-5)


def test_cam_refuses_heads_that_are_not_gap_linear():
    split, params, x = make(VggLikeHead())
    with pytest.raises(UsageError, match="global average pooling.*(max|relu)"):
        lj.explain(split, params, x, method="cam")
    with pytest.raises(UsageError, match="global average pooling"):  # also when traced under jit
        lj.explainer(split, "cam")(params, x)
    split, params, x = make(FlattenHead())  # affine, but positions weighted differently
    with pytest.raises(UsageError, match="weights the positions"):
        lj.explain(split, params, x, method="cam")
    with pytest.raises(UsageError, match="weights the positions"):
        lj.explainer(split, "cam")(params, x)


def test_cam_accepts_gap_linear_with_any_parameters_under_jit(gap):
    split, params, x = gap
    fn = lj.explainer(split, "cam")
    e1 = fn(params, x)
    params2 = jax.tree_util.tree_map(lambda p: p * -0.7, params)
    e2 = fn(params2, x)  # same program, new parameters (not constants of the program)
    w2 = -0.7 * np.asarray(params["h"]["params"]["fc"]["kernel"])
    np.testing.assert_allclose(e2.coefficients, w2[:, np.asarray(e2.targets)].T, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(e1.maps, lj.explain(split, params, x, method="cam").maps, atol=1e-5)


# ---------------------------------------------------------------------------
# identities on a GAP + Linear head
# ---------------------------------------------------------------------------

def test_gap_linear_identities(gap):
    """The gradient is uniform, g_ijk = w_ck / hw, so Grad-CAM, HiResCAM and
    XGrad-CAM (non-negative A) give CAM's map; LayerCAM gives CAM with the
    negative weights clipped; Grad-CAM++ has a closed form in w_ck."""
    split, params, x = gap
    targets = jnp.array([1, 6, 2])
    a = np.asarray(split.features(params, x))
    assert a.min() >= 0
    hw = a.shape[1] * a.shape[2]
    w = np.asarray(params["h"]["params"]["fc"]["kernel"])[:, targets].T  # (B, K)
    e = {m: lj.explain(split, params, x, targets, method=m) for m in CAMS if m not in ("eigen-cam",)}
    for m in ("grad-cam", "hires-cam", "xgrad-cam"):
        np.testing.assert_allclose(e[m].maps, e["cam"].maps, atol=2e-5, err_msg=m)
    np.testing.assert_allclose(e["grad-cam"].coefficients, w / hw, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(e["grad-cam"].raw * hw, e["cam"].raw, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(e["hires-cam"].raw, e["grad-cam"].raw, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(e["xgrad-cam"].coefficients, w / hw, rtol=1e-4, atol=1e-7)
    # LayerCAM = CAM with relu(w)
    maps, _ = lj.assemble(jnp.asarray(a), jnp.asarray(np.maximum(w, 0)), x.shape[1:3])
    np.testing.assert_allclose(e["layer-cam"].maps, maps, atol=2e-5)
    # Grad-CAM++: w_k = sum_ij relu(c) c^2 / (2 c^2 + S_k c^3 + eps), c = w_ck / hw, S_k = sum A^k
    c, s = w / hw, a.sum(axis=(1, 2))
    pp = hw * np.maximum(c, 0) * c**2 / (2 * c**2 + s * c**3 + 1e-6)
    np.testing.assert_allclose(e["grad-cam++"].coefficients, pp, rtol=1e-4, atol=1e-8)
    # Ablation-CAM: zeroing channel k removes w_ck mean(A^k) from y_c
    y = np.asarray(e["cam"].logits)[np.arange(3), targets]
    abl = w * a.mean(axis=(1, 2)) / y[:, None]
    np.testing.assert_allclose(e["ablation-cam"].coefficients, abl, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------
# batching contract
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("method", NONLINEAR_HEAD_CAMS)
def test_mixed_targets_equal_one_at_a_time(vgg, method):
    split, params, x = vgg
    targets = jnp.array([4, 0, 6])
    batch = lj.explain(split, params, x, targets, method=method)
    for i in range(3):
        one = lj.explain(split, params, x[i : i + 1], int(targets[i]), method=method)
        np.testing.assert_allclose(batch.coefficients[i], one.coefficients[0], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(batch.maps[i], one.maps[0], atol=1e-5)
    np.testing.assert_array_equal(batch.targets, targets)


@pytest.mark.parametrize("method", CAMS)
def test_jit_and_vmap(gap, vgg, method):
    split, params, x = gap if method == "cam" else vgg
    targets = jnp.array([2, 5, 0])
    eager = lj.explain(split, params, x, targets, method=method)
    fn = lj.explainer(split, method)
    jitted = fn(params, x, targets)
    np.testing.assert_allclose(jitted.maps, eager.maps, atol=1e-5)
    np.testing.assert_allclose(jitted.coefficients, eager.coefficients, rtol=1e-4, atol=1e-6)
    per = jax.vmap(lambda xi, ti: fn(params, xi[None], ti).maps[0])(x, targets)
    np.testing.assert_allclose(per, eager.maps, atol=1e-5)


def test_gradients_are_each_images_own(vgg):
    split, params, x = vgg
    targets = jnp.array([3, 3, 1])
    a = split.features(params, x)
    g, logits = cams.target_gradients(split.head, params, a, targets)
    for i in range(3):
        gi = jax.grad(lambda z: split.head(params, z)[0, targets[i]])(a[i : i + 1])
        np.testing.assert_allclose(g[i], gi[0], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(logits, split.head(params, a), rtol=1e-6)


# ---------------------------------------------------------------------------
# Grad-CAM++: default formula vs exact higher-order terms
# ---------------------------------------------------------------------------

class PolyHead(nn.Module):
    """y_c = sum_n U_nc A_n^2 + V_nc A_n^3: g = 2UA + 3VA^2, h2 = 2U + 6VA, h3 = 6V."""

    @nn.compact
    def __call__(self, a):
        flat = a.reshape(a.shape[0], -1)
        u = self.param("u", nn.initializers.normal(0.3), (flat.shape[1], 5))
        v = self.param("v", nn.initializers.normal(0.3), (flat.shape[1], 5))
        return flat**2 @ u + flat**3 @ v


def test_exact_diagonals_closed_form():
    split, params, x = make(PolyHead(), size=8)
    targets = jnp.array([0, 4, 2])
    a = split.features(params, x)
    h2, h3 = cams.grad_cam_pp_diagonals(split.head, params, a, targets, chunk_size=7)
    u = np.asarray(params["h"]["params"]["u"])[:, targets].T.reshape(a.shape)
    v = np.asarray(params["h"]["params"]["v"])[:, targets].T.reshape(a.shape)
    np.testing.assert_allclose(h2, 2 * u + 6 * v * np.asarray(a), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(h3, 6 * v, rtol=1e-4, atol=1e-5)


def test_exact_diagonals_match_brute_force_on_a_smooth_head():
    split, params, x = make(SmoothHead(), size=8, batch=2)
    targets = jnp.array([1, 3])
    a = split.features(params, x)  # (2, 4, 4, 6): 96 positions
    h2, h3 = cams.grad_cam_pp_diagonals(split.head, params, a, targets, chunk_size=40)
    y = lambda z, t: split.head(params, z.reshape((1,) + a.shape[1:]))[0, t]  # noqa: E731
    # compiled once for both images (eagerly, the nested derivatives compile hundreds of one-op programs)
    hessian, third_derivative = jax.jit(jax.hessian(y)), jax.jit(jax.jacfwd(jax.hessian(y)))
    for b in range(2):
        flat = a[b].reshape(-1)
        hess = hessian(flat, targets[b])
        np.testing.assert_allclose(h2[b].reshape(-1), np.diag(hess), rtol=1e-4, atol=1e-6)
        third = third_derivative(flat, targets[b])
        n = flat.size
        np.testing.assert_allclose(h3[b].reshape(-1), np.asarray(third)[np.arange(n), np.arange(n), np.arange(n)],
                                   rtol=1e-3, atol=1e-6)
    assert float(jnp.abs(h2).max()) > 1e-4 and float(jnp.abs(h3).max()) > 1e-5


def test_grad_cam_pp_exact_equals_default_on_piecewise_linear_heads(vgg):
    """ReLU and max-pooling heads: the higher derivatives vanish, the paper's eq. 19 is exact."""
    split, params, x = vgg
    targets = jnp.array([1, 2, 3])
    a = split.features(params, x)
    h2, h3 = cams.grad_cam_pp_diagonals(split.head, params, a, targets)  # computed, not skipped
    assert float(jnp.abs(h2).max()) == 0.0 and float(jnp.abs(h3).max()) == 0.0
    d = lj.explain(split, params, x, targets, method="grad-cam++")
    e = lj.explain(split, params, x, targets, method="grad-cam++", exact=True)
    np.testing.assert_allclose(e.coefficients, d.coefficients, rtol=1e-6)


def test_grad_cam_pp_exact_on_a_smooth_head():
    split, params, x = make(SmoothHead(), size=8, batch=2)
    targets = jnp.array([1, 3])
    a = split.features(params, x)
    d = lj.explain(split, params, x, targets, method="grad-cam++")
    e = lj.explain(split, params, x, targets, method="grad-cam++", exact=True, chunk_size=33)
    g, _ = cams.target_gradients(split.head, params, a, targets)
    h2, h3 = cams.grad_cam_pp_diagonals(split.head, params, a, targets)
    g, h2, h3, an = (np.asarray(t, np.float64) for t in (g, h2, h3, a))
    s = an.sum(axis=(1, 2), keepdims=True)
    alpha = (g**2 + h2) / (2 * (g**2 + h2) + s * (g**3 + 3 * g * h2 + h3) + 1e-6)
    want = np.sum(np.maximum(g, 0) * np.where(g != 0, alpha, 0), axis=(1, 2))
    np.testing.assert_allclose(e.coefficients, want, rtol=1e-3, atol=1e-7)
    assert not np.allclose(e.coefficients, d.coefficients, rtol=1e-2)  # the terms matter here


# ---------------------------------------------------------------------------
# Eigen-CAM
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("relu_features,size", [(True, 16), (False, 16), (True, 4)])
def test_eigen_cam_against_numpy_svd(relu_features, size):
    """8x8x6 (more positions than channels: covariance path) and 2x2x6 (Gram path)."""
    split, params, x = make(FlattenHead(), features=Features(relu=relu_features), size=size)
    e = lj.explain(split, params, x, method="eigen-cam")
    a = np.asarray(split.features(params, x), np.float64)
    for i in range(a.shape[0]):
        m = a[i].reshape(-1, a.shape[-1])
        mc = m - m.mean(axis=0)
        _, _, vt = np.linalg.svd(mc, full_matrices=True)
        v = vt[0] if vt[0].sum() >= 0 else -vt[0]
        proj = (mc @ v).reshape(a.shape[1:3])
        np.testing.assert_allclose(e.coefficients[i], v, rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(e.raw[i], np.maximum(proj, 0), rtol=1e-3, atol=1e-4 * np.abs(proj).max())
        # the orientation: the projection correlates positively with the total activation map
        assert np.sum(proj * a[i].sum(-1)) > 0


def test_eigen_cam_constant_activations_give_a_zero_map():
    a = jnp.ones((2, 3, 3, 4)) * jnp.arange(1.0, 5.0)
    v, mean = cams.eigen_direction(a)
    np.testing.assert_array_equal(v, 0.0)
    np.testing.assert_allclose(mean, jnp.broadcast_to(jnp.arange(1.0, 5.0), (2, 4)))


def test_eigen_cam_ignores_targets(vgg):
    split, params, x = vgg
    e1 = lj.explain(split, params, x, 0, method="eigen-cam")
    e2 = lj.explain(split, params, x, 5, method="eigen-cam")
    np.testing.assert_array_equal(e1.maps, e2.maps)


# ---------------------------------------------------------------------------
# Score-CAM and Ablation-CAM
# ---------------------------------------------------------------------------

def _bilinear_matrix(n_in, n_out):
    """Half-pixel-centre bilinear interpolation weights, edge-clamped (independent of jax.image)."""
    m = np.zeros((n_out, n_in))
    for o in range(n_out):
        s = max((o + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(np.floor(s)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        t = s - i0
        m[o, i0] += 1 - t
        m[o, i1] += t
    return m


def _score_cam_loop(split, params, x, targets):
    """Score-CAM coefficients, one forward pass per image and channel (numpy masks);
    a map constant before upsampling gives the zero mask."""
    a = np.asarray(split.features(params, x), np.float64)
    (b, h, w, k), (H, W) = a.shape, x.shape[1:3]
    mh, mw = _bilinear_matrix(h, H), _bilinear_matrix(w, W)
    out = np.zeros((b, k))
    for i in range(b):
        scores = []
        for c in range(k):
            up = mh @ a[i, :, :, c] @ mw.T
            span = up.max() - up.min()
            if a[i, :, :, c].max() == a[i, :, :, c].min():
                span = 0.0
            mask = (up - up.min()) / span if span > 0 else np.zeros_like(up)
            logits = split(params, x[i : i + 1] * jnp.asarray(mask, jnp.float32)[None, :, :, None])
            scores.append(float(logits[0, targets[i]]))
        want = np.exp(scores - np.max(scores))
        out[i] = want / want.sum()
    return out


def test_score_cam_against_a_per_channel_loop(vgg):
    split, params, x = vgg
    targets = np.array([1, 4, 6])
    e = lj.explain(split, params, x, targets, method="score-cam", chunk_size=4)
    np.testing.assert_allclose(e.coefficients, _score_cam_loop(split, params, x, targets), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 2, 64])
def test_score_cam_constant_maps_score_the_zero_image(vgg, chunk):
    """Dead channels (zero maps), a saturated one (0.7 everywhere) and a spatially
    constant one whose value depends on the image: every constant map masks the input
    to zeros, and skipping their forward passes changes nothing."""
    split, params, x = vgg
    keep = jnp.asarray([0, 1, 0, 0, 1, 1], jnp.float32)
    fill = jnp.asarray([0, 0, 0.7, 0, 0, 0], jnp.float32)

    def features(p, v):
        a = split.features(p, v)
        a = a.at[..., 4].set(jnp.mean(a[..., 4], axis=(1, 2), keepdims=True))
        return a * keep + fill

    masked = lj.Split(features, split.head)
    targets = np.array([2, 0, 5])
    e = lj.explain(masked, params, x, targets, method="score-cam", chunk_size=chunk)
    np.testing.assert_allclose(e.coefficients, _score_cam_loop(masked, params, x, targets), rtol=1e-4, atol=1e-6)
    # the four constant channels share the zero image's score, so one weight
    np.testing.assert_allclose(e.coefficients[:, [2, 3, 4]], e.coefficients[:, [0, 0, 0]], rtol=1e-6)
    # all maps constant: equal weights
    flat = lj.Split(lambda p, v: jnp.mean(split.features(p, v), axis=(1, 2), keepdims=True) + 0 * split.features(p, v),
                    split.head)
    e = lj.explain(flat, params, x, targets, method="score-cam", chunk_size=chunk)
    np.testing.assert_allclose(e.coefficients, np.full((3, 6), 1 / 6), rtol=1e-6)


@pytest.mark.parametrize("relu_features", [True, False])
def test_ablation_cam_against_a_per_channel_loop(relu_features):
    split, params, x = make(VggLikeHead(), features=Features(relu=relu_features))
    targets = np.array([0, 2, 5])
    e = lj.explain(split, params, x, targets, method="ablation-cam", chunk_size=5)
    a = np.asarray(split.features(params, x))
    for i in range(a.shape[0]):
        value = 0.0 if a[i].min() == 0 else a[i].min() - 1e7
        assert (value == 0.0) == relu_features
        y = float(split.head(params, a[i : i + 1])[0, targets[i]])
        for c in range(a.shape[-1]):
            ab = a[i : i + 1].copy()
            ab[..., c] = value
            yk = float(split.head(params, jnp.asarray(ab))[0, targets[i]])
            np.testing.assert_allclose(e.coefficients[i, c], (y - yk) / y, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["score-cam", "ablation-cam"])
def test_chunk_size_does_not_change_the_result(vgg, method):
    split, params, x = vgg
    ref = lj.explain(split, params, x, 3, method=method, chunk_size=6)  # all 6 channels at once
    for chunk in (1, 4, 64):  # one by one, a remainder chunk, more than the channels
        e = lj.explain(split, params, x, 3, method=method, chunk_size=chunk)
        np.testing.assert_allclose(e.coefficients, ref.coefficients, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(e.maps, ref.maps, atol=1e-6)


def test_channel_subsets(vgg):
    split, params, x = vgg
    sub = [4, 1]
    full = lj.explain(split, params, x, 2, method="ablation-cam")
    part = lj.explain(split, params, x, 2, method="ablation-cam", channels=sub)
    np.testing.assert_allclose(part.coefficients[:, sub], full.coefficients[:, sub], rtol=1e-5, atol=1e-7)
    assert float(jnp.abs(jnp.delete(part.coefficients, np.array(sub), axis=1)).max()) == 0.0
    full = lj.explain(split, params, x, 2, method="score-cam")
    part = lj.explain(split, params, x, 2, method="score-cam", channels=sub)
    # the softmax over the subset renormalises the full softmax restricted to it
    restricted = full.coefficients[:, sub] / full.coefficients[:, sub].sum(-1, keepdims=True)
    np.testing.assert_allclose(part.coefficients[:, sub], restricted, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(part.coefficients.sum(-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("options,match", [
    ({"method": "score-cam", "chunk_size": 0}, "chunk_size"),
    ({"method": "ablation-cam", "chunk_size": 2.5}, "chunk_size"),
    ({"method": "grad-cam++", "exact": True, "chunk_size": -1}, "chunk_size"),
    ({"method": "ablation-cam", "channels": [0, 6]}, "out of range"),
    ({"method": "score-cam", "channels": [1, 1]}, "repeat"),
    ({"method": "score-cam", "channels": []}, "channels"),
])
def test_usage_errors(options, match):
    split, params, x = make(SmoothHead(), size=8, batch=1)
    with pytest.raises(UsageError, match=match):
        lj.explain(split, params, x, **options)


def test_methods_are_registered():
    for m in CAMS:
        assert lj.methods.get(m).summary
