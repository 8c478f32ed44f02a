"""Models as research code writes them: outputs that are not one array, and train mode.

Each failure is one line naming the option or flag to pass; each fix is checked to give the model's own output.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import liftcam_jax as lj

KEY = jax.random.PRNGKey(0)
X = jax.random.normal(KEY, (2, 16, 16, 3))


def _refused(fn, *words):
    """``fn()`` raises a one-line SplitError containing every word; returns the message."""
    with pytest.raises(lj.SplitError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, (w, msg)
    return msg


def _completeness(e):
    idx = jnp.arange(e.targets.shape[0])
    gap = e.logits[idx, e.targets] - e.reference_logits[idx, e.targets]
    np.testing.assert_allclose(e.coefficients.sum(-1), gap, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# outputs that are not one array
# ---------------------------------------------------------------------------

class BigVisionStyle(nn.Module):
    """Returns ``(logits, out)`` as big_vision's ViT does: ``out`` holds activations from before the cut."""

    @nn.compact
    def __call__(self, x, *, train=False):
        out = {}
        y = out["stem"] = nn.relu(nn.Conv(4, (3, 3), name="stem")(x))
        y = out["block"] = nn.relu(nn.Conv(4, (3, 3), name="block")(y))
        out["pre_logits"] = y.mean((1, 2))
        return nn.Dense(3, name="head")(out["pre_logits"]), out


@pytest.fixture(scope="module")
def bv():
    net = BigVisionStyle()
    return net, net.init(KEY, X)


def test_a_tuple_output_names_the_selector(bv):
    net, v = bv
    msg = _refused(lambda: lj.explain(lj.linen_split(net, "block"), v, X),
                   "tuple of 2", "output=lambda out: out[0]", "method=", "target function")
    assert "around it" not in msg  # the output is judged before the skip-connection check


def test_the_selector_is_applied_before_the_skip_check(bv):
    """``out`` holds the stem's activations (before the cut): with ``output=`` / ``method=`` selecting
    the logits the cut separates; a selector that picks ``out["stem"]`` still depends on the input
    around the cut, and is refused as such."""
    net, v = bv
    logits, out = net.apply(v, X)
    for split in (lj.linen_split(net, "block", output=lambda o: o[0]),
                  lj.linen_split(net, "block", method=lambda m, x, **kw: m(x, **kw)[0], train=False)):
        np.testing.assert_allclose(nn.relu(split.features(v, X)), out["block"], rtol=1e-6)  # the conv, then relu
        np.testing.assert_allclose(split(v, X), logits, rtol=1e-5, atol=1e-6)
        _completeness(lj.explain(split, v, X))
    bridged = lj.linen_split(net, "block", output=lambda o: o[0] + o[1]["stem"].mean((1, 2, 3))[:, None])
    _refused(lambda: lj.explain(bridged, v, X), "around it")


def test_a_dict_output_and_an_nnx_tuple_name_their_selectors(bv):
    net, v = bv

    class Dict(nn.Module):
        @nn.compact
        def __call__(self, x):
            logits, out = BigVisionStyle(name="vit")(x)
            return {"hidden": out["block"], "logits": logits}

    d = Dict()
    vd = {"params": {"vit": v["params"]}}
    _refused(lambda: lj.explain(lj.linen_split(d, "vit/block"), vd, X), "dict with keys hidden, logits",
             "output=lambda out: out['logits']")
    split = lj.linen_split(d, "vit/block", output=lambda o: o["logits"])
    np.testing.assert_allclose(split(vd, X), net.apply(v, X)[0], rtol=1e-5, atol=1e-6)

    class Pair(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
            self.fc = nnx.Linear(4, 3, rngs=rngs)

        def __call__(self, x):
            a = nnx.relu(self.conv(x))
            return self.fc(a.mean((1, 2))), a

    model = Pair(nnx.Rngs(0))
    split, state = lj.nnx_split(model, "conv")
    msg = _refused(lambda: lj.explain(split, state, X), "nnx_split (output=)", "output=lambda out: out[0]")
    assert "method=" not in msg
    split, state = lj.nnx_split(model, "conv", output=lambda o: o[0])
    np.testing.assert_allclose(split(state, X), model(X)[0], rtol=1e-5, atol=1e-6)

    class Block(nnx.Module):  # returns (x, out) as big_vision's blocks do
        def __init__(self, rngs):
            self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)

        def __call__(self, x):
            y = nnx.relu(self.conv(x))
            return y, {"pre": x, "y": y}

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.block = Block(rngs)
            self.fc = nnx.Linear(4, 3, rngs=rngs)

        def __call__(self, x):
            y, out = self.block(x)
            return self.fc(y.mean((1, 2))) + 0.0 * out["y"].sum()

    net = Net(nnx.Rngs(1))
    split, state = lj.nnx_split(net, "block")
    _refused(lambda: split.features(state, X), "layer 'block' returns a tuple of 2", "layer_output=lambda out: out[0]")
    split, state = lj.nnx_split(net, "block", layer_output=lambda o: o[0])
    a = split.features(state, X)
    np.testing.assert_allclose(split.head(state, a), net(X), rtol=1e-5, atol=1e-6)
    # out["y"] is the picked array itself: replaced with it, so the skip check accepts the cut
    np.testing.assert_allclose(split.head(state, 2 * a), net.fc((2 * a).mean((1, 2))), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# train mode: linen
# ---------------------------------------------------------------------------

class ImageNetStyle(nn.Module):
    """Flax's ImageNet example: ``train`` defaults to True and BatchNorm reduces over ``axis_name='batch'``."""

    @nn.compact
    def __call__(self, x, train: bool = True):
        y = nn.Conv(4, (3, 3), name="conv")(x)
        y = nn.relu(nn.BatchNorm(use_running_average=not train, axis_name="batch", name="bn")(y))
        return nn.Dense(3)(y.mean((1, 2)))


class WithDropout(nn.Module):
    @nn.compact
    def __call__(self, x, deterministic: bool = False):
        y = nn.relu(nn.Conv(4, (3, 3), name="conv")(x))
        return nn.Dense(3)(nn.Dropout(0.5)(y.mean((1, 2)), deterministic=deterministic))


def test_linen_train_mode_names_the_flag():
    bn = ImageNetStyle()
    vb = bn.init(KEY, X, train=False)
    # without the flag: Flax/JAX's 'unbound axis name: batch' before; now the flag
    _refused(lambda: lj.explain(lj.linen_split(bn, "conv"), vb, X),
             "'bn' is in train mode", "use_running_average=False", "pass train=False to linen_split")
    _refused(lambda: lj.linen_split(bn, "conv").features(vb, X), "pass train=False")  # features too
    split = lj.linen_split(bn, "conv", train=False)
    np.testing.assert_allclose(split(vb, X), bn.apply(vb, X, train=False), rtol=1e-5, atol=1e-6)
    _refused(lambda: lj.linen_split(bn, "conv", train=False, mutable=["batch_stats"]), "drop mutable=")

    dr = WithDropout()
    vd = dr.init(KEY, X, deterministic=True)
    _refused(lambda: lj.explain(lj.linen_split(dr, "conv"), vd, X),
             "deterministic=False", "random mask", "pass deterministic=True to linen_split")
    _refused(lambda: lj.linen_split(dr, "conv", rngs={"dropout": KEY}), "drop rngs=", "deterministic=True")
    split = lj.linen_split(dr, "conv", deterministic=True)
    np.testing.assert_allclose(split(vd, X), dr.apply(vd, X, deterministic=True), rtol=1e-5, atol=1e-6)


def test_linen_state_writes_and_rng_draws_of_custom_modules_name_the_flag():
    """Modules other than BatchNorm and Dropout: Flax's own errors are turned into the one line."""

    class Counter(nn.Module):
        @nn.compact
        def __call__(self, x, train=True):
            y = nn.Conv(4, (3, 3), name="conv")(x)
            seen = self.variable("batch_stats", "seen", jnp.zeros, ())
            if train:
                seen.value = seen.value + 1
            return nn.Dense(3)(y.mean((1, 2)))

    class Noisy(nn.Module):
        @nn.compact
        def __call__(self, x, training=True):
            y = nn.Conv(4, (3, 3), name="conv")(x)
            if training:
                y = y + jax.random.normal(self.make_rng("noise"), y.shape)
            return nn.Dense(3)(y.mean((1, 2)))

    c = Counter()
    vc = c.init(KEY, X, train=False)
    _refused(lambda: lj.linen_split(c, "conv").features(vc, X), "writes its 'batch_stats'", "pass train=False")
    n = Noisy()
    vn = n.init(KEY, X, training=False)
    _refused(lambda: lj.linen_split(n, "conv").features(vn, X), "'noise' stream", "pass training=False")


# ---------------------------------------------------------------------------
# train mode: NNX
# ---------------------------------------------------------------------------

class NNXNet(nnx.Module):
    def __init__(self, rngs, rate=0.5):
        self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)  # NNX's defaults: train mode
        self.drop = nnx.Dropout(rate, rngs=rngs)
        self.fc = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        return self.fc(self.drop(nnx.relu(self.bn(self.conv(x)))).mean((1, 2)))


def test_nnx_train_mode_names_model_eval():
    model = NNXNet(nnx.Rngs(0))
    # before: TraceContextError 'Cannot mutate BatchStat from a different trace level', and eager
    # features silently normalised with the batch's statistics
    _refused(lambda: lj.nnx_split(model, "conv"), "BatchNorm 'bn'", "use_running_average=False", "model.eval()")
    model.eval()
    model.drop.deterministic = False
    _refused(lambda: lj.nnx_split(model, "conv"), "Dropout 'drop'", "deterministic=False", "model.eval()")
    model.eval()
    split, state = lj.nnx_split(model, "conv")
    np.testing.assert_allclose(split(state, X), model(X), rtol=1e-5, atol=1e-6)
    model.train()
    _refused(lambda: lj.nnx_split(model, "conv"), "train mode", "model.eval()")
    zero = NNXNet(nnx.Rngs(0), rate=0.0)
    zero.bn.use_running_average = True
    lj.nnx_split(zero, "conv")  # a dropout of rate 0 draws nothing: accepted


def test_nnx_state_change_while_running_names_model_eval():
    class Counting(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
            self.fc = nnx.Linear(4, 3, rngs=rngs)
            self.seen = nnx.BatchStat(jnp.zeros(()))

        def __call__(self, x):
            self.seen[...] = self.seen[...] + 1  # no train flag to detect: the trace catches it
            return self.fc(self.conv(x).mean((1, 2)))

    split, state = lj.nnx_split(Counting(nnx.Rngs(0)), "conv")
    _refused(lambda: lj.explain(split, state, X), "changes its state", "model.eval()")


# ---------------------------------------------------------------------------
# a cut inside a Flax lifted transformation (nn.jit, nn.remat)
# ---------------------------------------------------------------------------

class _Inner(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Conv(3, (1, 1), name="after")(nn.relu(nn.Conv(3, (3, 3), name="cut")(x)))


@pytest.mark.parametrize("lift", [nn.jit, nn.remat], ids=["nn.jit", "nn.remat"])
def test_a_cut_inside_a_lifted_transformation_is_one_line(lift):
    """Before: the features leaked a tracer of the transformation (nn.jit then said the layer
    was not called at all, from its cached trace)."""
    wrapped = lift(_Inner)

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(4)(wrapped(name="block")(x).mean((1, 2)))

    net = Net()
    v = net.init(KEY, X)
    for layer in ("block/cut", "block/cut", "block"):  # twice: nn.jit's second run is its cached trace
        _refused(lambda: lj.linen_split(net, layer).features(v, X), "Flax transformation", "nn.remat",
                 "cut at a module outside it")
    split = lj.linen_split(net, "Dense_0")  # outside the transformation: a split as usual
    np.testing.assert_allclose(split(v, X), net.apply(v, X), rtol=1e-6)


# ---------------------------------------------------------------------------
# big_vision's ViT (vendored verbatim): (logits, out), blocks returning (x, out)
# ---------------------------------------------------------------------------

def test_big_vision_vit_at_a_block():
    """big_vision's ``_Model`` returns ``(logits, out)`` and its ``Encoder1DBlock`` returns ``(x, out)``;
    ``out`` holds activations from before the cut (``stem``, earlier blocks). With ``output=`` and
    ``layer_output=`` the split reproduces the model and the skip-connection check accepts the cut."""
    import os
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    import big_vision_vit as bv

    x = jax.random.normal(KEY, (2, 32, 32, 3))
    rng = np.random.default_rng(0)

    def init(model):  # random variables without running the initialisers (each a compile, eagerly)
        shapes = jax.eval_shape(model.init, KEY, x)
        return jax.tree_util.tree_map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype), shapes)

    net = bv.Model(num_classes=5, width=16, depth=2, mlp_dim=32, num_heads=2, patch_size=(8, 8), pool_type="tok")
    v = init(net)
    logits, out = net.apply(v, x)
    layer = "Transformer/encoderblock_1"
    _refused(lambda: lj.linen_split(net, layer).features(v, x), "returns a tuple of 2, not one array",
             "layer_output=lambda out: out[0]")
    pick = dict(layer_output=lambda o: o[0])
    unselected = lj.linen_split(net, layer, **pick)
    _refused(lambda: unselected.head(v, unselected.features(v, x)), "output=lambda out: out[0]", "method=")
    for split in (lj.linen_split(net, layer, output=lambda o: o[0], train=False, **pick),
                  lj.linen_split(net, layer, method=lambda m, z: m(z)[0], **pick)):
        a = split.features(v, x)
        np.testing.assert_array_equal(a, out["encoder"]["block01"]["+mlp"])  # (B, 1 + 4 x 4 tokens, 16)
        assert a.shape == (2, 17, 16)
        np.testing.assert_allclose(split.head(v, a), logits, rtol=1e-5, atol=1e-6)  # the skip check passed
        b = a + jax.random.normal(KEY, a.shape)  # the head reads its argument, not the recorded activation
        assert not np.allclose(split.head(v, b), logits, atol=1e-3)
    earlier = lj.linen_split(net, layer, output=lambda o: o[1]["encoder"]["block00"]["+mlp"], **pick)
    _refused(lambda: earlier.head(v, earlier.features(v, x)), "around it")  # a value from before the cut
    computed = lj.linen_split(net, layer, output=lambda o: o[0], layer_output=lambda o: o[0] * 1.0)
    _refused(lambda: computed.head(v, computed.features(v, x)), "layer_output must return one array")

    scanned = bv.Model(num_classes=5, width=16, depth=2, mlp_dim=32, num_heads=2, patch_size=(8, 8), scan=True)
    vs = init(scanned)
    _refused(lambda: lj.linen_split(scanned, "Transformer/encoderblock", output=lambda o: o[0], **pick)
             .features(vs, x), "Flax transformation", "nn.scan")
