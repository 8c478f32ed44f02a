"""The Flax zoo without torch: architecture facts, stage splits, layers, pretrained Lite0."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import models
from liftcam_jax import Classifier
from liftcam_jax.errors import UsageError
from models import UnknownLayerError
from models.convert import variable_shapes
import flax.linen as nn

from models.layers import DepthwiseConv, adaptive_avg_pool, conv, same_padding

# Parameter counts published by torchvision 0.29 (weights docs) and timm 1.0
# (tf_efficientnet_lite*, vit_*, deit_*): an independent check of every layer's shape.
PARAM_COUNTS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "vgg11": 132_863_336,
    "vgg11_bn": 132_868_840,
    "vgg13": 133_047_848,
    "vgg13_bn": 133_053_736,
    "vgg16": 138_357_544,
    "vgg16_bn": 138_365_992,
    "vgg19": 143_667_240,
    "vgg19_bn": 143_678_248,
    "efficientnet_lite0": 4_652_008,
    "efficientnet_lite1": 5_416_680,
    "efficientnet_lite2": 6_092_072,
    "vit_tiny_patch16_224": 5_717_416,
    "vit_small_patch16_224": 22_050_664,
    "vit_base_patch16_224": 86_567_656,
    "deit_tiny_distilled_patch16_224": 5_910_800,
}


def test_names():
    assert sorted(models.names()) == sorted(PARAM_COUNTS)


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_parameter_count(name):
    shapes = variable_shapes(models.get(name))
    n = sum(math.prod(l.shape) for s in shapes.values()
            for l in jax.tree_util.tree_leaves(s.get("params", {})))
    assert n == PARAM_COUNTS[name]


@pytest.mark.parametrize("name, shape", [
    ("resnet18", (1, 7, 7, 512)),
    ("resnet50", (1, 7, 7, 2048)),
    ("vgg16", (1, 14, 14, 512)),
    ("vgg19_bn", (1, 14, 14, 512)),
    ("efficientnet_lite0", (1, 7, 7, 1280)),
])
def test_default_split_shape_at_224(name, shape):
    m = models.get(name)
    params = variable_shapes(m)
    x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    split = m.split()
    a = jax.eval_shape(split.features, params, x)
    assert a.shape == shape
    assert jax.eval_shape(split.head, params, a).shape == (1, 1000)


def test_stage_names_and_aliases():
    vgg16 = models.get("vgg16")
    convs = [s for s in vgg16.stage_names if s.startswith("conv")]
    assert convs == ["conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3",
                     "conv4_1", "conv4_2", "conv4_3", "conv5_1", "conv5_2", "conv5_3"]
    assert vgg16.stage_names[-4:] == ("avgpool", "fc6", "fc7", "fc8")
    assert vgg16.stage_names.index("pool4") == vgg16.stage_names.index("conv4_3") + 1
    assert vgg16.default_layer == "conv5_3"
    assert models.get("vgg19").default_layer == "conv5_4"
    assert models.get("vgg11_bn").default_layer == "conv5_2"

    r50 = models.get("resnet50")
    blocks = [s for s in r50.stage_names if s.startswith("layer")]
    assert [sum(b.startswith(f"layer{i}.") for b in blocks) for i in (1, 2, 3, 4)] == [3, 4, 6, 3]
    assert r50.stage_names[:2] == ("stem", "maxpool") and r50.stage_names[-2:] == ("avgpool", "fc")
    assert r50.resolve("layer4") == "layer4.2" and r50.resolve(None) == "layer4.2"
    assert r50.resolve("layer3") == "layer3.5"

    lite = models.get("efficientnet_lite0")
    assert [s for s in lite.stage_names if s.startswith("blocks.")] == [f"blocks.{i}" for i in range(16)]
    assert [lite.resolve(f"stage{i}") for i in range(1, 8)] == [
        "blocks.0", "blocks.2", "blocks.4", "blocks.7", "blocks.10", "blocks.14", "blocks.15"]
    assert lite.stage_names[-3:] == ("head_conv", "pool", "fc") and lite.default_layer == "head_conv"
    # Lite1/2: first and last stage keep one block, the others scale by ceil(r * depth)
    n1 = sum(s.startswith("blocks.") for s in models.get("efficientnet_lite1").stage_names)
    assert n1 == 1 + 3 + 3 + 4 + 4 + 5 + 1


def test_unknown_names():
    with pytest.raises(UsageError, match="unknown model 'resnet19'.*resnet18.*efficientnet_lite0"):
        models.get("resnet19")
    with pytest.raises(UnknownLayerError, match="unknown layer 'layer5'.*layer4.1.*layer4"):
        models.get("resnet18").split("layer5")
    with pytest.raises(UnknownLayerError, match="valid layers: conv1_1"):
        models.load("vgg11", "random", layer="conv6_1")
    with pytest.raises(UnknownLayerError):  # the last stage is not a split
        models.get("resnet18").split("fc")


def test_no_bundled_weights_says_what_to_download():
    with pytest.raises(UsageError, match=r"resnet18-f37072fd\.pth.*--weights PATH.*--weights random"):
        models.load("resnet18")
    with pytest.raises(UsageError, match="weights file not found"):
        models.load("resnet18", "/nonexistent/resnet18.pth")
    with pytest.raises(UsageError, match="weights must be"):
        models.load("resnet18", 3)


# -- stage splitting ------------------------------------------------------------------

@pytest.mark.parametrize("name, size", [
    ("resnet18", 64),
    ("vgg11", 32),
    ("vgg11_bn", 32),
    ("efficientnet_lite0", 64),
])
def test_head_of_features_is_the_model_at_every_split(name, size):
    m = models.get(name)
    params = models.zoo.random_params(m, seed=1)
    # non-trivial batch statistics so that every BN does something
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map_with_path(
        lambda path, v: v + 0.2 * rng.random(v.shape, np.float32) if path[1].key == "batch_stats" else v,
        params)
    params = jax.device_put(params)  # numpy leaves would be copied to the device at every eager op
    x = jax.random.normal(jax.random.PRNGKey(2), (2, size, size, 3))
    logits = np.asarray(m.apply(params, x))
    outs = m.stage_outputs(params, x)
    assert np.all(np.isfinite(logits)) and logits.std() > 0
    np.testing.assert_array_equal(np.asarray(outs[m.stage_names[-1]]), logits)
    inner = m.inner_layers()
    for layer in m.layers:
        if layer in inner:  # inside a block: head(features) and A checked by the test below
            assert m.resolve(layer) == layer
            continue
        split = m.split(layer)
        a = split.features(params, x)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(outs[m.resolve(layer)]))
        np.testing.assert_allclose(np.asarray(split.head(params, a)), logits, rtol=1e-6, atol=1e-6)


def _inner_params(name, seed=1):
    m = models.get(name)
    params = models.zoo.random_params(m, seed=seed)
    rng = np.random.default_rng(seed)
    return m, jax.device_put(jax.tree_util.tree_map_with_path(
        lambda path, v: v + 0.2 * rng.random(v.shape, np.float32) if path[1].key in ("batch_stats",)
        or path[-1].key == "bias" else v, params))


@pytest.mark.parametrize("name, size", [("efficientnet_lite0", 64), ("resnet50", 32), ("resnet18", 32)])
def test_inner_split_points_are_post_activation_and_carry_the_shortcut(name, size):
    """At ``<block>.<point>``: A = [the inner activation, then the shortcut the rest of the
    block adds]; the activation is a ReLU's (ReLU6's) output, the carried shortcut is the
    block input where it is the identity; head(features) is the model to 1e-5 relative."""
    m, params = _inner_params(name)
    x = jax.random.normal(jax.random.PRNGKey(3), (2, size, size, 3))
    logits = np.asarray(m.apply(params, x))
    outs = m.stage_outputs(params, x)
    stages = dict(m.stages)
    inner = m.inner_layers()
    lite = name.startswith("efficientnet")
    expected = {"efficientnet_lite0": 16 + 15, "resnet50": 16 * 2, "resnet18": 8}[name]
    assert len(inner) == expected
    if lite:
        assert "blocks.0.expand" not in inner and "blocks.0.dw" in inner and "blocks.15.expand" in inner
    for layer, (stage, point) in inner.items():
        block = stages[stage]
        before = np.asarray(outs[m.stage_names[m.stage_names.index(stage) - 1]])
        split = m.split(layer)
        a = np.asarray(split.features(params, x))
        rel = np.abs(np.asarray(split.head(params, jnp.asarray(a))) - logits).max() / np.abs(logits).max()
        assert rel <= 1e-5, (layer, rel)
        mid = (block.in_features * block.expand) if lite else block.features
        act, carried = a[..., :mid], a[..., mid:]
        assert act.min() >= 0 and act.max() > 0 and (not lite or act.max() <= 6), layer
        residual = block.residual if lite else True
        if not residual:
            assert carried.shape[-1] == 0, layer
        elif lite or (point == "relu1" and name == "resnet50") or not block.downsample:
            np.testing.assert_array_equal(carried, before, err_msg=layer)  # the block input
        else:  # the projection shortcut, at the output resolution
            assert carried.shape[:3] == act.shape[:3] and carried.shape[-1] == outs[stage].shape[-1]
    assert inner["layer4.2.relu2" if name == "resnet50" else "layer4.1.relu1"
                 if name == "resnet18" else "blocks.15.dw"] == (
        ("layer4.2", "relu2") if name == "resnet50" else ("layer4.1", "relu1")
        if name == "resnet18" else ("blocks.15", "dw"))


def test_inner_split_names_in_layers_and_errors():
    lite = models.get("efficientnet_lite0")
    assert lite.layers.index("blocks.15.expand") < lite.layers.index("blocks.15.dw") < lite.layers.index("blocks.15")
    assert models.load("efficientnet_lite0", "random", layer="blocks.15.dw").layers == lite.layers
    with pytest.raises(UnknownLayerError, match=r"unknown layer 'blocks.0.expand'.*blocks\.0\.dw, blocks\.0, "
                                                r"blocks\.1\.expand"):
        lite.split("blocks.0.expand")
    r50 = models.get("resnet50")
    assert {"layer4.2.relu1", "layer4.2.relu2", "layer1.0.relu2"} <= set(r50.layers)
    with pytest.raises(UnknownLayerError, match=r"'layer4.2.relu3'.*layer4\.2\.relu2"):
        r50.split("layer4.2.relu3")
    with pytest.raises(UnknownLayerError, match="'layer4.relu1'"):  # aliases name blocks, not points
        r50.split("layer4.relu1")
    assert "layer4.1.relu2" not in models.get("resnet18").layers


def test_split_jits_and_vmaps():
    m = models.get("resnet18")
    params = jax.device_put(models.zoo.random_params(m))
    x = jax.random.normal(jax.random.PRNGKey(2), (3, 32, 32, 3))
    logits = np.asarray(m.apply(params, x))
    tol = 1e-5 * np.abs(logits).max()
    split = m.split("layer3")
    f = jax.jit(lambda p, x: split.head(p, split.features(p, x)))
    np.testing.assert_allclose(np.asarray(f(params, x)), logits, rtol=0, atol=tol)
    per_image = jax.jit(jax.vmap(lambda xi: split(params, xi[None])[0]))(x)
    np.testing.assert_allclose(np.asarray(per_image), logits, rtol=0, atol=tol)


def test_random_weights_are_deterministic():
    a = models.load("resnet18", "random")
    b = models.load("resnet18", "random", layer="layer3")
    assert isinstance(a, Classifier) and a.layer == "layer4" and b.layer == "layer3"
    k1 = a.params["layer2.0"]["params"]["conv1"]["kernel"]
    np.testing.assert_array_equal(np.asarray(k1), np.asarray(b.params["layer2.0"]["params"]["conv1"]["kernel"]))
    assert a.class_name(285) == "Egyptian cat" and "layer4.1" in a.layers and "layer4" in a.layers


# -- layers ---------------------------------------------------------------------------

def _adaptive_pool_reference(x, out):
    """PyTorch's adaptive average pooling, loop by loop (NHWC)."""
    _, h, w, _ = x.shape
    y = np.zeros((x.shape[0], out, out, x.shape[3]), np.float64)
    for i in range(out):
        h0, h1 = (i * h) // out, math.ceil((i + 1) * h / out)
        for j in range(out):
            w0, w1 = (j * w) // out, math.ceil((j + 1) * w / out)
            y[:, i, j] = x[:, h0:h1, w0:w1].mean(axis=(1, 2))
    return y


@pytest.mark.parametrize("h, w", [(1, 1), (2, 3), (5, 9), (7, 7), (10, 13), (14, 14), (15, 8)])
def test_adaptive_avg_pool_matches_pytorch_definition(h, w):
    x = np.random.RandomState(h * 31 + w).randn(2, h, w, 3).astype(np.float32)
    y = np.asarray(adaptive_avg_pool(jnp.asarray(x), (7, 7)))
    np.testing.assert_allclose(y, _adaptive_pool_reference(x, 7), rtol=1e-6, atol=1e-6)
    if (h, w) == (7, 7):
        np.testing.assert_array_equal(y, x)


def test_same_padding_is_tensorflows():
    # out = ceil(n / s); pad = (out - 1) s + k - n, extra pixel after
    assert same_padding(224, 3, 2) == (0, 1)
    assert same_padding(225, 3, 2) == (1, 1)
    assert same_padding(112, 5, 2) == (1, 2)
    assert same_padding(56, 5, 1) == (2, 2)
    assert same_padding(7, 1, 1) == (0, 0)
    assert same_padding(1, 3, 2) == (1, 1)


@pytest.mark.parametrize("kernel,stride,padding,size", [
    (3, 1, ((1, 1), (1, 1)), 14), (5, 2, ((1, 2), (1, 2)), 28),
    (3, 2, ((0, 1), (0, 1)), 15), (5, 1, ((2, 2), (2, 2)), 7), (3, 1, ((0, 0), (0, 0)), 9)])
def test_depthwise_conv_is_the_grouped_convolution(kernel, stride, padding, size):
    """Same parameter tree and, up to float rounding, same output as nn.Conv with one
    group per channel, for odd/even sizes, strides and asymmetric SAME padding."""
    x = jax.random.normal(jax.random.key(0), (2, size, size, 12))
    dw = conv(12, kernel, stride, padding, groups=12)
    assert isinstance(dw, DepthwiseConv)
    params = dw.init(jax.random.key(1), x)
    grouped = nn.Conv(12, (kernel, kernel), strides=(stride, stride), padding=padding,
                      feature_group_count=12, use_bias=False)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(
        jnp.shape, grouped.init(jax.random.key(1), x))
    expected = grouped.apply(params, x)
    got = dw.apply(params, x)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # Linear in x: the same map under the rescale rule as under autodiff.
    jac = jax.jacobian(lambda v: dw.apply(params, v).sum())(x)
    jac_ref = jax.jacobian(lambda v: grouped.apply(params, v).sum())(x)
    np.testing.assert_allclose(jac, jac_ref, rtol=1e-5, atol=1e-5)


def test_resnet_maxpool_pads_with_minus_infinity():
    pool = dict(models.get("resnet18").stages)["maxpool"]
    x = -1.0 - jax.random.uniform(jax.random.PRNGKey(0), (1, 6, 6, 2))
    y = np.asarray(pool.apply({}, x))
    assert y.shape == (1, 3, 3, 2) and np.all(y < -1.0)  # zero padding would give 0 at borders
    np.testing.assert_array_equal(y[0, 0, 0], np.asarray(x[0, :2, :2].max(axis=(0, 1))))


def test_vgg_flattens_in_channel_height_width_order():
    fc6 = dict(models.get("vgg11").stages)["fc6"]
    c, h, w = 512, 7, 7
    kernel = jnp.arange(c * h * w, dtype=jnp.float32)[:, None] * jnp.ones((1, 4096))
    params = {"params": {"fc": {"kernel": kernel, "bias": jnp.zeros(4096)}}}
    x = np.zeros((1, h, w, c), np.float32)
    x[0, 3, 5, 17] = 1.0  # NHWC position (h=3, w=5, c=17)
    y = np.asarray(fc6.apply(params, jnp.asarray(x)))
    assert y[0, 0] == 17 * h * w + 3 * w + 5


# -- the bundled pretrained EfficientNet-Lite0 ---------------------------------------

@pytest.fixture(scope="module")
def lite0(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LIFTCAM_JAX_CACHE", str(cache))
        clf = models.load("efficientnet_lite0")
    return clf, cache


def _top1(clf, path):
    x = clf.preprocess(np.asarray(Image.open(path).convert("RGB")))[None]
    p = np.asarray(jax.nn.softmax(clf.logits(jnp.asarray(x)), axis=-1))[0]
    return int(p.argmax()), float(p.max())


def test_sample_images_are_bundled():
    names = sorted(p.stem for p in models.sample_images())
    assert names == ["astronaut", "chelsea", "coffee", "rocket"]
    for p in models.sample_images():
        assert Image.open(p).size[0] >= 256


def test_pretrained_lite0_recognises_the_cat_and_the_espresso(lite0):
    clf, _ = lite0
    imgs = {p.stem: p for p in models.sample_images()}
    cls, prob = _top1(clf, imgs["chelsea"])
    print(f"chelsea: top-1 {cls} ({clf.class_name(cls)}) p={prob:.4f}")
    assert cls == 285 and 0.65 < prob < 0.9  # 0.773 on the original PNG
    cls, prob = _top1(clf, imgs["coffee"])
    print(f"coffee: top-1 {cls} ({clf.class_name(cls)}) p={prob:.4f}")
    assert cls == 967 and 0.8 < prob < 0.97  # 0.902 on the original PNG
    assert clf.layer == "head_conv" and clf.preprocess.resize == "squash"


def test_pretrained_cache_is_used_and_a_corrupt_one_rebuilt(lite0, monkeypatch):
    clf, cache = lite0
    files = list((cache / "params").glob("*.npz"))
    assert len(files) == 1
    monkeypatch.setenv("LIFTCAM_JAX_CACHE", str(cache))
    ref = np.asarray(clf.params["fc"]["params"]["kernel"])
    # the cache is what load reads: a marked cached value shows through
    with np.load(files[0]) as z:
        arrays = dict(z)
    arrays["fc/params/bias"] = arrays["fc/params/bias"] + 1.0
    np.savez(files[0], **arrays)
    again = models.load("efficientnet_lite0")
    np.testing.assert_array_equal(np.asarray(again.params["fc"]["params"]["bias"]),
                                  np.asarray(clf.params["fc"]["params"]["bias"]) + 1.0)
    # a corrupt cache is rebuilt from the checkpoint
    files[0].write_bytes(b"not a zip file")
    rebuilt = models.load("efficientnet_lite0")
    np.testing.assert_array_equal(np.asarray(rebuilt.params["fc"]["params"]["kernel"]), ref)
    with np.load(files[0]) as z:
        np.testing.assert_array_equal(z["fc/params/kernel"], ref)
    assert not list((cache / "params").glob("*.tmp"))


# -- the bundled pretrained EfficientNet-Lite1 ---------------------------------------

def test_pretrained_lite1_at_240_recognises_the_cat_and_the_espresso(tmp_path, monkeypatch):
    monkeypatch.setenv("LIFTCAM_JAX_CACHE", str(tmp_path))
    clf = models.load("efficientnet_lite1", layer="blocks.20.dw")
    assert clf.preprocess.size == 240 and clf.preprocess.interpolation == "bicubic"
    assert [f.name for f in (tmp_path / "params").glob("*.npz")] == ["efficientnet-lite1-77cc7160.npz"]
    imgs = {p.stem: p for p in models.sample_images()}
    cls, prob = _top1(clf, imgs["chelsea"])
    assert cls == 285 and 0.7 < prob < 0.88  # 0.788
    cls, prob = _top1(clf, imgs["coffee"])
    assert cls == 967 and 0.6 < prob < 0.8  # 0.708
    a = jax.eval_shape(clf.features, clf.params, jnp.zeros((1, 240, 240, 3)))
    assert a.shape == (1, 8, 8, 1152)  # the last block's depthwise output, 8x8 at 240
