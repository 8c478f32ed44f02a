"""Bring your own model: linen and NNX models explained at a named layer, no hand-written split."""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import liftcam_jax as lj
from liftcam_jax.errors import UsageError

KEY = jax.random.PRNGKey(0)


def _completeness(e):
    idx = jnp.arange(e.targets.shape[0])
    gap = e.logits[idx, e.targets] - e.reference_logits[idx, e.targets]
    np.testing.assert_allclose(e.coefficients.sum(-1), gap, rtol=1e-5, atol=1e-5)


def _randomize_stats(variables, seed=0):
    """Non-trivial batch-norm statistics, so that eval-mode BN is not the identity."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = str(path[-1])
        if "var" in name:
            return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), leaf.dtype)
        if "mean" in name or "bias" in name:
            return jnp.asarray(0.1 * rng.standard_normal(leaf.shape), leaf.dtype)
        return leaf

    return jax.tree_util.tree_map_with_path(draw, variables)


# ---------------------------------------------------------------------------
# a user's linen CNN
# ---------------------------------------------------------------------------

class Block(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x, train: bool = False):
        y = nn.Conv(self.features, (3, 3), strides=2)(x)
        y = nn.BatchNorm(use_running_average=not train)(y)
        return nn.relu(y)


class UserNet(nn.Module):
    """backbone (stage1, stage2, stage3) -> max-pool -> GAP -> MLP head with tanh."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = Backbone(name="backbone")(x, train)
        x = nn.max_pool(x, (2, 2), (1, 1), padding="SAME")
        x = x.mean((1, 2))
        x = jnp.tanh(nn.Dense(16, name="fc1")(x))
        return nn.Dense(5, name="fc2")(x)


class Backbone(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = Block(8, name="stage1")(x, train)
        x = Block(16, name="stage2")(x, train)
        return Block(16, name="stage3")(x, train)


@pytest.fixture(scope="module")
def user_net():
    net = UserNet()
    x = jax.random.normal(KEY, (3, 32, 32, 3))
    v = _randomize_stats(net.init(jax.random.PRNGKey(1), x))
    return net, v, x


def _hand_split(net, v_unused=None):
    """The split a user would write by hand, at backbone/stage2."""

    def features(v, x):
        b = v["params"]["backbone"]
        s = v["batch_stats"]["backbone"]
        x = Block(8).apply({"params": b["stage1"], "batch_stats": s["stage1"]}, x)
        return Block(16).apply({"params": b["stage2"], "batch_stats": s["stage2"]}, x)

    def head(v, a):
        b, s = v["params"]["backbone"], v["batch_stats"]["backbone"]
        x = Block(16).apply({"params": b["stage3"], "batch_stats": s["stage3"]}, a)
        x = nn.max_pool(x, (2, 2), (1, 1), padding="SAME").mean((1, 2))
        x = jnp.tanh(nn.Dense(16).apply({"params": v["params"]["fc1"]}, x))
        return nn.Dense(5).apply({"params": v["params"]["fc2"]}, x)

    return lj.Split(features, head)


def test_linen_split_equals_the_hand_written_split(user_net):
    net, v, x = user_net
    split = lj.linen_split(net, "backbone/stage2", train=False)
    hand = _hand_split(net)
    np.testing.assert_allclose(split.features(v, x), hand.features(v, x), rtol=1e-6)
    np.testing.assert_allclose(split(v, x), net.apply(v, x), rtol=1e-5, atol=1e-6)
    for method in ("lift-cam", "grad-cam", "lrp-cam"):
        e = lj.explainer(split, method)(v, x, jnp.array([0, 3, 4]))
        h = lj.explainer(hand, method)(v, x, jnp.array([0, 3, 4]))
        np.testing.assert_allclose(e.coefficients, h.coefficients, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(e.maps, h.maps, atol=1e-5)
        if method == "lift-cam":
            _completeness(e)


def test_linen_split_vmaps_and_takes_params_as_arguments(user_net):
    net, v, x = user_net
    split = lj.linen_split(net, "backbone/stage2")
    fn = lj.explainer(split)
    v2 = jax.tree_util.tree_map(lambda a: a * 1.1, v)
    a, b = fn(v, x), fn(v2, x)  # new parameter values reach the compiled program
    assert not np.allclose(a.coefficients, b.coefficients)
    per_image = jax.vmap(lambda z: lj.explain(split, v, z[None]).coefficients[0])(x)
    np.testing.assert_allclose(per_image, a.coefficients, rtol=1e-4, atol=1e-5)


def test_linen_split_errors(user_net):
    net, v, x = user_net
    with pytest.raises(lj.SplitError, match="valid layers: .*backbone/stage2"):
        lj.linen_split(net, "backbone/stage9").features(v, x)
    with pytest.raises(lj.SplitError, match="input shape"):
        lj.linen_split(net, "backbone/stage2").head(v, jnp.zeros((1, 8, 8, 16)))

    class Shared(nn.Module):
        @nn.compact
        def __call__(self, x):
            block = nn.Conv(3, (3, 3), name="shared")
            x = nn.relu(block(nn.relu(block(x))))
            return nn.Dense(4)(x.mean((1, 2)))

    m = Shared()
    vs = m.init(KEY, x)
    with pytest.raises(lj.SplitError, match="called 2 times.*call_index"):
        lj.linen_split(m, "shared").features(vs, x)
    second = lj.linen_split(m, "shared", call_index=1)
    first = lj.linen_split(m, "shared", call_index=0)
    np.testing.assert_allclose(second(vs, x), m.apply(vs, x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(first(vs, x), m.apply(vs, x), rtol=1e-5, atol=1e-6)
    _completeness(lj.explain(second, vs, x))

    class Skip(nn.Module):
        @nn.compact
        def __call__(self, x):
            y = nn.Conv(3, (3, 3), name="body")(x)
            return nn.Dense(4)((y + x).mean((1, 2)))  # a connection around "body"

    s = Skip()
    vk = s.init(KEY, x)
    with pytest.raises(lj.SplitError, match="around it"):
        lj.explain(lj.linen_split(s, "body"), vk, x)


def test_targets_are_checked_and_traced_ones_give_nan(user_net):
    net, v, x = user_net
    split = lj.linen_split(net, "backbone/stage2")
    for method in ("lift-cam", "grad-cam"):
        fn = lj.explainer(split, method)
        for bad in (5000, -1, jnp.array([0, 1, 5]), np.array([0, 1, 2, 3])):
            with pytest.raises(UsageError) as info:
                fn(v, x, bad)
            assert "\n" not in str(info.value)
        with pytest.raises(UsageError, match="out of range for 5 classes"):
            lj.explain(split, v, x, 5000, method=method)
        traced = jax.jit(lambda p, z, t: lj.explain(split, p, z, t, method=method))(v, x, jnp.array([1, 7, -1]))
        assert np.isfinite(np.asarray(traced.maps[0])).all()
        assert np.isnan(np.asarray(traced.maps[1:])).all() and np.isnan(np.asarray(traced.coefficients[1:])).all()


def test_a_softmax_head_is_refused_by_name(user_net):
    net, v, x = user_net

    class Probs(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.softmax(UserNet(name="net")(x))

    p = Probs()
    vp = {"params": {"net": v["params"]}, "batch_stats": {"net": v["batch_stats"]}}
    with pytest.raises(lj.NoRescaleRule, match="softmax.*logits"):
        lj.explainer(lj.linen_split(p, "net/backbone/stage2"))(vp, x)


def test_jitted_head_does_not_compute_the_front(user_net):
    net, v, x = user_net
    split = lj.linen_split(net, "backbone/stage2")
    a = split.features(v, x)
    hlo = jax.jit(split.head).lower(v, a).compile().as_text()
    full = jax.jit(lambda p, z: split(p, z)).lower(v, x).compile().as_text()
    n_head, n_full = hlo.count("convolution("), full.count("convolution(")
    assert n_full >= 3  # the count sees the model's convolutions
    assert n_head == 1  # stage3 only: stage1 and stage2 were removed as dead code


# ---------------------------------------------------------------------------
# an NNX model
# ---------------------------------------------------------------------------

class NNXBlock(nnx.Module):
    def __init__(self, cin, cout, *, rngs):
        self.conv = nnx.Conv(cin, cout, (3, 3), strides=2, rngs=rngs)
        self.bn = nnx.BatchNorm(cout, use_running_average=True, rngs=rngs)

    def __call__(self, x):
        return nnx.relu(self.bn(self.conv(x)))


class NNXNet(nnx.Module):
    def __init__(self, *, rngs):
        self.blocks = nnx.List([NNXBlock(3, 8, rngs=rngs), NNXBlock(8, 16, rngs=rngs),
                                NNXBlock(16, 16, rngs=rngs)])
        self.fc = nnx.Linear(16, 6, rngs=rngs)

    def __call__(self, x):
        for b in self.blocks:
            x = b(x)
        return self.fc(nnx.max_pool(x, (2, 2), (1, 1), padding="SAME").mean((1, 2)))


def test_nnx_split_equals_the_hand_written_split():
    model = NNXNet(rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    state = _randomize_stats(state)
    model = nnx.merge(graphdef, state)
    x = jax.random.normal(KEY, (2, 32, 32, 3))
    split, st = lj.nnx_split(model, "blocks/1")

    def features(s, z):
        m = nnx.merge(graphdef, s)
        return m.blocks[1](m.blocks[0](z))

    def head(s, a):
        m = nnx.merge(graphdef, s)
        return m.fc(nnx.max_pool(m.blocks[2](a), (2, 2), (1, 1), padding="SAME").mean((1, 2)))

    hand = lj.Split(features, head)
    np.testing.assert_allclose(split(st, x), model(x), rtol=1e-5, atol=1e-6)
    e = lj.explainer(split)(st, x, jnp.array([2, 5]))
    h = lj.explainer(hand)(st, x, jnp.array([2, 5]))
    np.testing.assert_allclose(e.coefficients, h.coefficients, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(e.maps, h.maps, atol=1e-5)
    _completeness(e)
    with pytest.raises(lj.SplitError, match="valid layers: .*blocks/1/conv"):
        lj.nnx_split(model, "blocks/7")


# ---------------------------------------------------------------------------
# a Flax zoo from PyPI: flaxmodels' ResNet-50 against the repo's zoo, same weights
# ---------------------------------------------------------------------------

_FM_BLOCK = {"conv1": "Conv_0", "bn1": "BatchNorm_0", "conv2": "Conv_1", "bn2": "BatchNorm_1",
             "conv3": "Conv_2", "bn3": "BatchNorm_2", "downsample_conv": "Conv_3",
             "downsample_bn": "BatchNorm_3"}


def flaxmodels_variables(zoo_params):
    """The repo zoo's ResNet-50 variables in flaxmodels' tree (same weights)."""
    out = {"params": {}, "batch_stats": {}}

    def put(dst, src, names):
        for coll in ("params", "batch_stats"):
            for ours, theirs in names.items():
                if ours in src.get(coll, {}):
                    dst[coll][theirs] = src[coll][ours]
        return dst

    stem = put({"params": {}, "batch_stats": {}}, zoo_params["stem"], {"conv1": "Conv_0", "bn1": "BatchNorm_0"})
    out["params"].update(stem["params"])
    out["batch_stats"].update(stem["batch_stats"])
    blocks = [k for k in zoo_params if k.startswith("layer") and "." in k]
    for i, name in enumerate(sorted(blocks, key=lambda s: tuple(int(p) for p in s[5:].split(".")))):
        b = put({"params": {}, "batch_stats": {}}, zoo_params[name], _FM_BLOCK)
        out["params"][f"Bottleneck_{i}"] = b["params"]
        out["batch_stats"][f"Bottleneck_{i}"] = b["batch_stats"]
    out["params"]["Dense_0"] = zoo_params["fc"]["params"]
    return out


@pytest.fixture(scope="module")
def resnet50_pair():
    fm = pytest.importorskip("flaxmodels")
    import models

    clf = models.load("resnet50", weights="random")
    params = _randomize_stats(clf.params, seed=3)
    net = fm.ResNet50(output="logits", pretrained=None, normalize=False, num_classes=1000)
    return net, flaxmodels_variables(params), clf, params


def test_flaxmodels_resnet50_at_its_last_stage_equals_the_zoo_split(resnet50_pair):
    net, fv, clf, params = resnet50_pair
    x = jax.random.normal(KEY, (2, 64, 64, 3))
    split = lj.linen_split(net, "Bottleneck_15", train=False)
    zoo = clf.split  # layer4
    np.testing.assert_allclose(split.features(fv, x), zoo.features(params, x), rtol=1e-4, atol=1e-4)
    e = lj.explainer(split)(fv, x, jnp.array([3, 999]))
    z = lj.explainer(zoo)(params, x, jnp.array([3, 999]))
    np.testing.assert_allclose(e.logits, z.logits, rtol=1e-4, atol=1e-4)
    scale = float(jnp.max(jnp.abs(z.coefficients)))
    np.testing.assert_allclose(e.coefficients, z.coefficients, atol=1e-5 * max(scale, 1.0))
    _completeness(e)
    hlo = jax.jit(split.head).lower(fv, split.features(fv, x)).compile().as_text()
    assert hlo.count("convolution(") == 0  # GAP + Dense only: the 53 front convolutions are dead code

    softmax = type(net)(**{**{f: getattr(net, f) for f in ("pretrained", "normalize", "num_classes",
                                                             "architecture", "block")}, "output": "softmax"})
    with pytest.raises(lj.NoRescaleRule, match="softmax"):
        lj.explainer(lj.linen_split(softmax, "Bottleneck_15", train=False))(fv, x)


class _CutInside(nn.Module):
    """A block holding the cut ``block/cut``; after it a jitted (or rematerialised) function
    that receives the block's input too and reads it only when there is a connection around
    the cut."""

    around: bool
    call: Any = jax.jit

    @nn.compact
    def __call__(self, x):
        y = nn.relu(nn.Conv(3, (3, 3), name="cut")(x))
        y = nn.Conv(3, (1, 1), name="after")(y)
        combine = self.call(lambda y, x: y + x if self.around else jnp.tanh(y))
        return combine(y, x)


def _wrapped_model(call, around):
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = _CutInside(around, call, name="block")(x)
            return nn.Dense(4)(h.mean((1, 2)))

    return Net()


@pytest.mark.parametrize("call", [jax.jit, jax.checkpoint], ids=["jit", "remat"])
def test_a_cut_inside_a_jitted_or_rematerialised_block_is_judged_by_the_block_body(call):
    """The skip-connection check looks inside call bodies: a call (``jit``, ``remat``) that
    gets the model's input but does not read it does not make the head depend on it."""
    x = jax.random.normal(KEY, (2, 8, 8, 3))
    good = _wrapped_model(call, around=False)
    vg = good.init(KEY, x)
    split = lj.linen_split(good, "block/cut")
    np.testing.assert_allclose(split(vg, x), good.apply(vg, x), rtol=1e-5, atol=1e-6)
    _completeness(lj.explain(split, vg, x))

    bad = _wrapped_model(call, around=True)
    vb = bad.init(KEY, x)
    with pytest.raises(lj.SplitError, match="around it"):
        lj.explain(lj.linen_split(bad, "block/cut"), vb, x)
