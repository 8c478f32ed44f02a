"""Token activations (B, N, D): the layout rule, one-line errors, maps on the patch grid, every method.

A tiny linen ViT built here (patch conv 4x4 on 16x16 inputs: a 4x4 grid, a class
token, one pre-norm block with attention, LayerNorm and GELU) is split at its
block's output. The heads after the split contain no product of two
input-dependent values (LIFT-CAM's DeepLIFT rules for those are another
change): ``mixed`` (token-wise Dense + ReLU, then the class token and the mean
of the grid tokens into a Dense), ``affine`` (the same without the ReLU: DeepLIFT
is then exactly gradient x input, an independent check of every index),
``mean`` (GAP over the grid tokens + Dense: CAM's head) and ``cls`` (the class
token into a Dense). Float64 throughout where exactness is tested.
"""
import argparse
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import liftcam_jax as lj
from liftcam_jax import tokens as T
from liftcam_jax.errors import UsageError
from liftcam_jax.methods.perturbation import score_cam
from liftcam_jax.model import Classifier, Preprocess

D, CLASSES, SIZE = 8, 5, 16


@pytest.fixture(scope="module", autouse=True)
def x64():
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


# ---------------------------------------------------------------------------
# the layout rule
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("n, size, layout", [
    (197, (224, 224), (1, (14, 14))),   # class token: 1 + 14x14, not 28 + 13x13
    (196, (224, 224), (0, (14, 14))),   # no prefix (global-pool ViT without class token)
    (198, (224, 224), (2, (14, 14))),   # DeiT distilled: class + distillation tokens
    (201, (224, 224), (5, (14, 14))),   # class token + 4 registers
    (257, (224, 224), (1, (16, 16))),   # patch 14 (DINOv2)
    (393, (224, 448), (1, (14, 28))),   # non-square input: the grid keeps the aspect ratio
    (17, (32, 32), (1, (4, 4))),
    (33, (32, 64), (1, (4, 8))),
    (29, (48, 32), (5, (6, 4))),
    (100, (224, 224), None),            # 64 = 8x8 would need 36 prefix tokens: no layout
    (300, (224, 224), None),
    (2, (32, 32), None),                # 1 + 1x1: a prefix as large as the grid is refused
])
def test_infer_layout(n, size, layout):
    got = T.infer_layout(n, size)
    assert (None if got is None else (got.prefix, got.grid)) == layout
    if got is not None:
        assert got.tokens == n and got.grid[0] * size[1] == got.grid[1] * size[0]


def _one_line_usage(fn, *words):
    with pytest.raises(UsageError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)
    return msg


def test_unsupported_shapes_and_layouts_are_one_line_errors_naming_the_shape_and_the_option():
    option = ("tokens=lj.TokenLayout(", "--tokens P,hxw")
    _one_line_usage(lambda: T.resolve(jnp.zeros((2, 100, 8)), (224, 224)), "(2, 100, 8)", *option)
    _one_line_usage(lambda: T.resolve(jnp.zeros((2, 8)), (224, 224)), "(2, 8)", *option)
    _one_line_usage(lambda: T.resolve(jnp.zeros((2, 3, 4, 5, 6)), (224, 224)), "(2, 3, 4, 5, 6)", *option)
    _one_line_usage(lambda: T.resolve(jnp.zeros((2, 17, 8)), (32, 32), T.TokenLayout(1, (5, 5))),
                    "(2, 17, 8)", "26 tokens", *option)
    _one_line_usage(lambda: T.resolve(jnp.zeros((2, 4, 4, 8)), (32, 32), T.TokenLayout(0, (4, 4))),
                    "(2, 4, 4, 8)", *option)
    _one_line_usage(lambda: T.resolve(jnp.zeros((2, 17, 8)), (32, 32), (1, (4,))), "TokenLayout")
    assert T.resolve(jnp.zeros((2, 4, 4, 8)), (32, 32)) is None  # maps stay maps
    assert T.resolve(jnp.zeros((2, 17, 8)), (32, 32), (0, (1, 17))) == T.TokenLayout(0, (1, 17))
    assert T.parse_layout(" 1, 14x14 ") == T.TokenLayout(1, (14, 14)) and str(T.TokenLayout(2, (3, 4))) == "2,3x4"
    for bad in ("1,14", "x,14x14", "1,0x14", "-1,2x2"):
        _one_line_usage(lambda: T.parse_layout(bad), "P,HxW")


def test_explain_refuses_an_unfit_token_count_in_one_line_not_a_raw_crash():
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((D, CLASSES)))
    head = lambda p, a: jnp.mean(a, axis=1) @ p
    split = lj.Split(lambda p, x: jnp.tile(x.reshape(x.shape[0], -1, 3), (1, 1, 3))[..., :D][:, :100], head)
    x = jnp.asarray(rng.standard_normal((2, 32, 32, 3)))
    for method in ("lift-cam", "grad-cam"):
        _one_line_usage(lambda: lj.explain(split, w, x, method=method), "(2, 100, 8)", "tokens=lj.TokenLayout(")
    flat = lj.Split(lambda p, x: jnp.mean(x, axis=(1, 2)) @ jnp.ones((3, D)), lambda p, a: a @ p)
    _one_line_usage(lambda: lj.explain(flat, w, x), "(2, 8)", "tokens=lj.TokenLayout(")


# ---------------------------------------------------------------------------
# a tiny linen ViT
# ---------------------------------------------------------------------------

class Block(nn.Module):
    @nn.compact
    def __call__(self, t):
        y = nn.LayerNorm()(t)
        t = t + nn.MultiHeadDotProductAttention(num_heads=2)(y, y)
        y = nn.LayerNorm()(t)
        return t + nn.Dense(D)(nn.gelu(nn.Dense(2 * D)(y)))


class Head(nn.Module):
    kind: str

    @nn.compact
    def __call__(self, t):
        if self.kind == "mean":
            return nn.Dense(CLASSES)(jnp.mean(t[:, 1:], axis=1))
        if self.kind == "cls":
            return nn.Dense(CLASSES)(t[:, 0])
        h = nn.Dense(D)(t)
        h = nn.relu(h) if self.kind == "mixed" else h
        return nn.Dense(CLASSES)(jnp.concatenate([h[:, 0], jnp.mean(h[:, 1:], axis=1)], axis=-1))


class TinyViT(nn.Module):
    head: str = "mixed"

    @nn.compact
    def __call__(self, x):
        p = nn.Conv(D, (4, 4), strides=(4, 4), name="patch")(x)
        b, h, w, d = p.shape
        cls = self.param("cls", nn.initializers.normal(1.0), (1, 1, d))
        t = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)), p.reshape(b, h * w, d)], axis=1)
        t = t + self.param("pos", nn.initializers.normal(0.5), (1, 1 + h * w, d))
        t = Block(name="block0")(t)
        return Head(self.head, name="head")(t)


def _vit(head):
    net = TinyViT(head)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, SIZE, SIZE, 3), jnp.float64)
    variables = jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.float64), net.init(jax.random.PRNGKey(0), x))
    return net, variables, x


@pytest.fixture(scope="module")
def mixed():
    return _vit("mixed")


def _split(net, **kw):
    return lj.linen_split(net, "block0", input_dtype=jnp.float64, **kw)


def _targets(logits):
    """Image 0: its top class; image 1: its second class."""
    order = np.argsort(np.asarray(logits), axis=1)
    return jnp.asarray([order[0, -1], order[1, -2]])


def test_lift_cam_on_tokens_sums_to_delta_over_all_tokens_and_reports_the_prefix_share(mixed):
    net, v, x = mixed
    split = _split(net)
    e = lj.explain(split, v, x, _targets(net.apply(v, x)))
    rows = jnp.arange(2)
    delta = e.logits[rows, e.targets] - e.reference_logits[rows, e.targets]
    np.testing.assert_allclose(jnp.sum(e.coefficients, -1), delta, rtol=1e-9)
    np.testing.assert_allclose(e.reference_logits, split.head(v, jnp.zeros((2, 17, D))), rtol=1e-12)
    assert e.maps.shape == (2, SIZE, SIZE) and e.raw.shape == (2, 4, 4)
    assert e.prefix_coefficients.shape == (2, D) and float(jnp.max(jnp.abs(e.prefix_coefficients))) > 1e-3
    a = split.features(v, x)
    np.testing.assert_allclose(e.raw, jax.nn.relu(jnp.einsum("bhwk,bk->bhw", a[:, 1:].reshape(2, 4, 4, D),
                                                             e.coefficients)), rtol=1e-12, atol=1e-14)


def test_lift_cam_on_an_affine_head_is_gradient_times_input_token_by_token():
    """DeepLIFT of an affine head is exact: phi_k = sum_n g_nk A_nk, the prefix part from token 0 only."""
    net, v, x = _vit("affine")
    split = _split(net, tokens=lj.TokenLayout(prefix=1, grid=(4, 4)))
    assert split.tokens == lj.TokenLayout(1, (4, 4))
    e = lj.explain(split, v, x, jnp.asarray([3, 1]))
    a = split.features(v, x)
    g = jax.grad(lambda z: jnp.sum(split.head(v, z)[jnp.arange(2), e.targets]))(a)
    np.testing.assert_allclose(e.coefficients, jnp.sum(g * a, axis=1), rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(e.prefix_coefficients, g[:, 0] * a[:, 0], rtol=1e-10, atol=1e-13)
    lrp = lj.explain(split, v, x, e.targets, method="lrp-cam")
    r = lj.lrp.lrp(lambda z: split.head(v, z), a, e.targets).attributions  # (B, N, D) relevance per token
    np.testing.assert_allclose(lrp.coefficients, jnp.sum(r, axis=1), rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(lrp.prefix_coefficients, r[:, 0], rtol=1e-10, atol=1e-13)


def _hand_reshape_transform(split, v, x, targets, prefix=1, grid=(4, 4)):
    """pytorch-grad-cam's recipe: drop the prefix tokens of the activations AND the gradients, reshape to the grid."""
    a = split.features(v, x)
    g = jax.grad(lambda z: jnp.sum(split.head(v, z)[jnp.arange(2), targets]))(a)
    to_grid = lambda t: t[:, prefix:].reshape((2,) + grid + (D,))
    return to_grid(a), to_grid(g)


def test_gradient_family_is_the_reshape_transform_computation(mixed):
    net, v, x = mixed
    split = _split(net)
    t = _targets(net.apply(v, x))
    a, g = _hand_reshape_transform(split, v, x, t)
    hand = {
        "grad-cam": jnp.einsum("bhwk,bk->bhw", a, g.mean(axis=(1, 2))),
        "hires-cam": jnp.sum(g * a, axis=-1),
        "layer-cam": jnp.sum(jax.nn.relu(g) * a, axis=-1),
        "xgrad-cam": jnp.einsum("bhwk,bk->bhw", a, jnp.sum(g * a / (a.sum(axis=(1, 2), keepdims=True) + 1e-7),
                                                              axis=(1, 2))),
    }
    explicit = _split(net, tokens=lj.TokenLayout(1, (4, 4)))
    for method, raw in hand.items():
        e = lj.explain(split, v, x, t, method=method)
        np.testing.assert_allclose(e.raw, jax.nn.relu(raw), rtol=1e-10, atol=1e-13, err_msg=method)
        assert e.maps.shape == (2, SIZE, SIZE) and e.prefix_coefficients is None
    np.testing.assert_array_equal(lj.explain(explicit, v, x, t, method="grad-cam").raw,
                                  lj.explain(split, v, x, t, method="grad-cam").raw)
    jitted = lj.explainer(split, "grad-cam")(v, x, t)
    np.testing.assert_allclose(jitted.raw, jax.nn.relu(hand["grad-cam"]), rtol=1e-10, atol=1e-13)


def test_eigen_and_score_cam_see_the_grid_and_ablation_ablates_every_token(mixed):
    net, v, x = mixed
    split = _split(net)
    t = _targets(net.apply(v, x))
    a = split.features(v, x)
    grid = a[:, 1:].reshape(2, 4, 4, D)
    logits = split.head(v, a)
    # Score-CAM: masks from the grid tokens' maps, the whole model scores the masked input
    e = lj.explain(split, v, x, t, method="score-cam")
    ref = score_cam(lj.Split(split.features, split.head), v, x, grid, t, logits)
    np.testing.assert_allclose(e.coefficients, ref.weights, rtol=1e-12)
    # Eigen-CAM: the grid's principal direction
    eig = lj.explain(split, v, x, method="eigen-cam")
    ref = lj.explain(lj.Split(lambda p, z: grid, lambda p, g: logits), v, x, method="eigen-cam")
    np.testing.assert_allclose(eig.raw, ref.raw, rtol=1e-10, atol=1e-13)
    # Ablation-CAM: channel k set to the ablation value on ALL tokens (pytorch-grad-cam's AblationLayerVit)
    abl = lj.explain(split, v, x, t, method="ablation-cam")
    value = jnp.min(a, axis=(1, 2)) - 1e7
    y = logits[jnp.arange(2), t]
    for k in (0, D - 1):
        yk = split.head(v, a.at[..., k].set(value[:, None]))[jnp.arange(2), t]
        np.testing.assert_allclose(abl.coefficients[:, k], (y - yk) / y, rtol=1e-9)


def test_cam_on_tokens_needs_a_head_pooling_the_grid_tokens(mixed):
    net, v, x = mixed
    a = _split(net).features(v, x)
    w = jnp.asarray(np.random.default_rng(2).standard_normal((D, CLASSES)))
    features = lambda p, z: a
    mean = lj.Split(features, lambda p, t: jnp.mean(t[:, 1:], axis=1) @ p)  # GAP over the grid tokens + Linear
    e = lj.explain(mean, w, x, jnp.asarray([0, 4]), method="cam")
    np.testing.assert_allclose(e.coefficients, w[:, jnp.asarray([0, 4])].T, rtol=1e-12)  # w_ck, the class weights
    np.testing.assert_allclose(e.maps, lj.explain(mean, w, x, jnp.asarray([0, 4]), method="grad-cam").maps, atol=1e-9)
    every = lj.Split(features, lambda p, t: jnp.mean(t, axis=1) @ p)  # GAP over all tokens: the same map
    np.testing.assert_allclose(lj.explain(every, w, x, jnp.asarray([0, 4]), method="cam").maps, e.maps, atol=1e-9)
    cls = lj.Split(features, lambda p, t: t[:, 0] @ p)
    _one_line_usage(lambda: lj.explain(cls, w, x, method="cam"), "class token")


def test_the_other_methods_run_on_tokens(mixed):
    net, v, x = mixed
    split = _split(net)
    t = _targets(net.apply(v, x))
    lift = lj.explain(split, v, x, t)
    zero = lj.explain(split, v, x, t, method="deeplift-shap-cam", references=jnp.zeros((1, 17, D)))
    np.testing.assert_allclose(zero.coefficients, lift.coefficients, rtol=1e-12)
    np.testing.assert_allclose(zero.prefix_coefficients, lift.prefix_coefficients, rtol=1e-12)
    a = split.features(v, x)
    refs = jnp.stack([jnp.zeros_like(a), 0.5 * a])  # (R, B, N, D)
    for method, kw in (("grad-cam++", {}), ("lime-cam", {"num_samples": 16}), ("deeplift-shap-cam", {"references": refs})):
        e = lj.explain(split, v, x, t, method=method, **kw)
        assert e.maps.shape == (2, SIZE, SIZE) and bool(jnp.all(jnp.isfinite(e.maps))), method
        assert e.coefficients.shape == (2, D)


def test_flax_splits_take_tokens():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Linear(3, D, rngs=rngs)
            self.fc = nnx.Linear(D, CLASSES, rngs=rngs)

        def __call__(self, x):
            t = self.embed(x.reshape(x.shape[0], -1, 3))
            return self.fc(t.mean(axis=1))

    layout = lj.TokenLayout(0, (SIZE, SIZE))
    split, state = lj.nnx_split(Net(nnx.Rngs(0)), "embed", tokens=layout)
    assert split.tokens == layout and lj.nnx_split(Net(nnx.Rngs(0)), "embed")[0].tokens is None
    x = jnp.ones((1, SIZE, SIZE, 3), jnp.float32)
    assert lj.explain(split, state, x, method="grad-cam").maps.shape == (1, SIZE, SIZE)


# ---------------------------------------------------------------------------
# the CLI: --tokens P,HxW
# ---------------------------------------------------------------------------

def _zoo(mixed):
    net, v, _ = mixed
    split = lj.linen_split(net, "block0")
    params = jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.float32), v)

    def load(name, weights=None, layer=None):
        return Classifier("vit", split, params, Preprocess(size=SIZE, resize="squash"), "block0",
                          layers=("block0",))

    return types.SimpleNamespace(names=lambda: ["vit"], load=load)


def test_cli_tokens(mixed, tmp_path, capsys):
    from liftcam_jax.cli import main
    from liftcam_jax.commands import _args

    assert _args.token_layout("2,3x4") == lj.TokenLayout(2, (3, 4))
    with pytest.raises(argparse.ArgumentTypeError, match="P,HxW"):
        _args.token_layout("1,14")
    zoo = _zoo(mixed)
    npy = tmp_path / "x.npy"
    np.save(npy, np.asarray(mixed[2], np.float32))
    rc = main(["explain", str(npy), "--tokens", "1,4x4", "--out", str(tmp_path / "out"), "--quiet",
               "--save", "raw"], zoo=zoo)
    assert rc == 0
    z = np.load(sorted((tmp_path / "out").rglob("*.npz"))[0])
    assert z["map"].shape == (SIZE, SIZE) and z["prefix_coefficients"].shape == (D,)
    rc = main(["explain", str(npy), "--tokens", "1,14", "--out", str(tmp_path / "bad"), "--quiet"], zoo=zoo)
    err = capsys.readouterr().err
    assert rc == 2 and "P,HxW" in err
    rc = main(["explain", str(npy), "--tokens", "1,5x5", "--out", str(tmp_path / "bad2"), "--quiet"], zoo=zoo)
    err = capsys.readouterr().err
    assert rc != 0 and "26 tokens" in err and "Traceback" not in err, err
