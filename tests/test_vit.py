"""The zoo's ViTs without torch: a small ViT against a numpy transcription of the maths, every
split point, jit/vmap, ``to_torch``, and loading a timm state dict from a file (timm's key
names are listed with the other families' in ``test_convert.py``).

The numpy reference (:func:`reference`) is written from the papers' equations (module
docstring of :mod:`models.vit`), one head and one token at a time where the order matters,
so that a wrong q/k/v or head order, patch order, token order or residual would show.
timm itself is the reference of the parity tier (``tests/parity/test_vit_parity.py``)."""
import collections
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from liftcam_jax import Classifier
from liftcam_jax.errors import UsageError
from models import UnknownLayerError
from models.checkpoints import save_safetensors
from models.convert import from_torch, to_torch, torch_keys, variable_shapes
from models.vit import ViTConfig, vision_transformer
import _torchfiles  # tests/ is on sys.path (pytest's rootdir-relative imports)

TINY = {  # 32x32 inputs, 8-pixel patches: a 4x4 grid; width 16 in 2 heads; 2 blocks
    "vit_test_tiny": ViTConfig(16, 2, 2, patch=8, size=32),
    "deit_test_tiny_distilled": ViTConfig(16, 2, 2, patch=8, size=32, distilled=True),
}
CLASSES = 10


def tiny(name, seed=1):
    """A small ViT and random variables with non-trivial biases and LayerNorm scales."""
    m = vision_transformer(name, TINY[name], CLASSES)
    params = models.zoo.random_params(m, seed=seed)
    rng = np.random.default_rng(seed)
    params = jax.tree_util.tree_map_with_path(
        lambda path, v: v + np.float32(0.2) * rng.standard_normal(v.shape, np.float32)
        if path[-1].key in ("bias", "scale") else v, params)
    return m, params


# -- the maths, in numpy -------------------------------------------------------------------

def _ln(z, p):
    mu = z.mean(-1, keepdims=True)
    var = ((z - mu) ** 2).mean(-1, keepdims=True)
    return (z - mu) / np.sqrt(var + 1e-6) * p["scale"] + p["bias"]


def _dense(y, p):
    return y @ p["kernel"] + p["bias"]


_erf = np.vectorize(math.erf)


def reference(params, x, cfg):
    """``{layer: activation}`` at every split of the zoo's naming and ``"logits"``, float64."""
    p = jax.tree_util.tree_map(lambda v: np.asarray(v, np.float64), params)
    x = np.asarray(x, np.float64)
    b, s, _, c = x.shape
    n, w, d = s // cfg.patch, cfg.width, cfg.width // cfg.heads
    e = p["embed"]["params"]
    tokens = np.zeros((b, n * n, w))
    for i in range(n):  # token i * n + j is the patch in row i, column j
        for j in range(n):
            patch = x[:, i * cfg.patch:(i + 1) * cfg.patch, j * cfg.patch:(j + 1) * cfg.patch]
            tokens[:, i * n + j] = np.einsum("bhwc,hwco->bo", patch, e["proj"]["kernel"]) + e["proj"]["bias"]
    prefix = [e["cls_token"]] + ([e["dist_token"]] if cfg.distilled else [])
    z = np.concatenate([np.broadcast_to(t, (b, 1, w)) for t in prefix] + [tokens], 1) + e["pos_embed"]
    out = {"embed": z}
    for layer in range(cfg.depth):
        blk = p[f"blocks.{layer}"]["params"]
        y = _ln(z, blk["norm1"])
        out[f"blocks.{layer}.norm1"] = np.concatenate([y, z], -1)
        qkv = _dense(y, blk["attn"]["qkv"])
        heads = []
        for h in range(cfg.heads):
            q, k, v = (qkv[..., part * w + h * d: part * w + (h + 1) * d] for part in range(3))
            scores = np.einsum("bqc,bkc->bqk", q, k) / np.sqrt(d)
            a = np.exp(scores - scores.max(-1, keepdims=True))
            heads.append((a / a.sum(-1, keepdims=True)) @ v)
        u = z + _dense(np.concatenate(heads, -1), blk["attn"]["proj"])
        y = _ln(u, blk["norm2"])
        out[f"blocks.{layer}.norm2"] = np.concatenate([y, u], -1)
        hidden = _dense(y, blk["mlp"]["fc1"])
        z = u + _dense(hidden * 0.5 * (1 + _erf(hidden / np.sqrt(2))), blk["mlp"]["fc2"])
        out[f"blocks.{layer}"] = z
    out["norm"] = z = _ln(z, p["norm"]["params"])
    head = p["head"]["params"]
    logits = _dense(z[:, 0], head["head"])
    if cfg.distilled:
        logits = (logits + _dense(z[:, 1], head["head_dist"])) / 2
    out["logits"] = logits
    return out


def _rel(ours, theirs):
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


# -- the zoo's four models -----------------------------------------------------------------

ZOO = {  # name: (width, prefix tokens, mean of the preprocessing)
    "vit_tiny_patch16_224": (192, 1, (0.5, 0.5, 0.5)),
    "vit_small_patch16_224": (384, 1, (0.5, 0.5, 0.5)),
    "vit_base_patch16_224": (768, 1, (0.5, 0.5, 0.5)),
    "deit_tiny_distilled_patch16_224": (192, 2, (0.485, 0.456, 0.406)),
}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_vits_layers_tokens_and_preprocessing(name):
    width, prefix, mean = ZOO[name]
    m = models.get(name)
    assert m.default_layer == "blocks.11.norm1" and m.resolve(None) == "blocks.11.norm1"
    assert m.tokens == (prefix, (14, 14))
    assert m.layers == ("embed",) + tuple(
        n for i in range(12) for n in (f"blocks.{i}.norm1", f"blocks.{i}.norm2", f"blocks.{i}")) + ("norm",)
    # timm's eval transform: bicubic, shorter side floor(224 / 0.9), centre crop 224
    pre = m.preprocess
    assert (pre.size, pre.resize, pre.resize_to, pre.interpolation, pre.mean) == (
        224, "shorter_crop", 248, "bicubic", mean)
    assert pre.std == ((0.5,) * 3 if mean[0] == 0.5 else (0.229, 0.224, 0.225))
    if width > 192:
        return  # shapes below: the tiny ones suffice
    shapes, x = variable_shapes(m), jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    n = prefix + 14 * 14
    for layer, channels in (("blocks.10", width), ("blocks.11.norm1", 2 * width), ("norm", width)):
        split = m.split(layer)
        a = jax.eval_shape(split.features, shapes, x)
        assert a.shape == (1, n, channels), layer
        assert jax.eval_shape(split.head, shapes, a).shape == (1, 1000)


def test_no_bundled_vit_weights_says_which_timm_file_to_download():
    with pytest.raises(UsageError, match=r"huggingface\.co/timm/deit_tiny_distilled_patch16_224\.fb_in1k.*"
                                         r"--weights PATH.*--weights random"):
        models.load("deit_tiny_distilled_patch16_224")


def test_unknown_split_points_are_named():
    m = models.get("vit_tiny_patch16_224")
    with pytest.raises(UnknownLayerError, match=r"'blocks.11.norm3'.*blocks\.11\.norm1, blocks\.11\.norm2, "
                                                r"blocks\.11, norm"):
        m.split("blocks.11.norm3")
    with pytest.raises(UnknownLayerError, match="'head'"):  # the logits are not a split
        m.split("head")
    with pytest.raises(UnknownLayerError, match="'blocks.12'"):
        m.split("blocks.12")


def test_custom_vits_of_one_name_keep_their_own_shapes():
    """Variable shapes are cached per configuration, not per name; bad sizes are refused."""
    for width in (16, 24):
        m = vision_transformer("vit_custom", ViTConfig(width, 1, 2, patch=8, size=32), CLASSES)
        shapes = variable_shapes(m)
        assert shapes["norm"]["params"]["scale"].shape == (width,)
        assert shapes["embed"]["params"]["pos_embed"].shape == (1, 1 + 16, width)
    with pytest.raises(ValueError, match="width 18 must divide into 4 heads"):
        vision_transformer("vit_custom", ViTConfig(18, 1, 4, patch=8, size=32))


# -- a small ViT: the maths, every split, jit, vmap ----------------------------------------

@pytest.mark.parametrize("name", sorted(TINY))
def test_small_vit_is_the_maths_at_every_split(name, x64):
    """float64: every stage and inner point equals the numpy transcription to 1e-12, and
    ``head(features(x))`` gives the logits from every split."""
    m, params = tiny(name)
    params = jax.tree_util.tree_map(lambda v: jnp.asarray(v, jnp.float64), params)
    x = np.random.default_rng(0).standard_normal((2, 32, 32, 3))
    ref = reference(params, x, TINY[name])
    logits = np.asarray(m.apply(params, jnp.asarray(x)))
    assert logits.dtype == np.float64 and logits.shape == (2, CLASSES) and logits.std() > 0.1
    assert _rel(logits, ref["logits"]) < 1e-12
    # the attention is not uniform and the class token is not its own average: a wrong order shows
    assert np.abs(ref["blocks.0"][:, 0] - ref["blocks.0"][:, 1:].mean(1)).max() > 0.1
    assert len(m.layers) == 2 * 3 + 2
    for layer in m.layers:
        split = m.split(layer)
        a = split.features(params, jnp.asarray(x))
        assert _rel(a, ref[layer]) < 1e-12, layer
        assert _rel(split.head(params, a), ref["logits"]) < 1e-12, layer


def test_inner_points_carry_the_residual_stream(x64):
    """At ``blocks.l.norm1``: A = [LN_1(z), z] with z the block input (the previous stage's
    output, bit for bit). In the last block the head reads both halves, but a patch token's
    residual stream only through the attention: changing it there changes nothing (the reason
    the default split is inside the last block, not after it)."""
    m, params = tiny("vit_test_tiny")
    params = jax.tree_util.tree_map(lambda v: jnp.asarray(v, jnp.float64), params)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 32, 32, 3)))
    split = m.split("blocks.1.norm1")
    head = split.head
    a = np.asarray(split.features(params, x))
    np.testing.assert_array_equal(a[..., 16:], np.asarray(m.split("blocks.0").features(params, x)))
    base = np.asarray(head(params, jnp.asarray(a)))

    def change(token, channel):
        bumped = a.copy()
        bumped[:, token, channel] += 1.0
        return np.abs(np.asarray(head(params, jnp.asarray(bumped))) - base).max()

    assert change(5, 3) > 1e-2  # a patch's normalised tokens: keys and values of the attention
    assert change(0, 16 + 3) > 1e-2  # the class token's residual stream
    assert change(5, 16 + 3) == 0.0  # a patch's residual stream never reaches the class token


def test_splits_jit_and_vmap_with_params_as_arguments():
    m, params = tiny("deit_test_tiny_distilled")
    _, other = tiny("deit_test_tiny_distilled", seed=2)
    x = jax.random.normal(jax.random.PRNGKey(2), (3, 32, 32, 3))
    split = m.split("blocks.1.norm2")
    f = jax.jit(lambda p, x: split.head(p, split.features(p, x)))
    for p in (params, other):  # one compiled program, the weights are its arguments
        logits = reference(p, x, TINY["deit_test_tiny_distilled"])["logits"]
        assert _rel(f(p, x), logits) < 1e-5
    assert f._cache_size() == 1
    assert np.abs(np.asarray(f(params, x)) - np.asarray(f(other, x))).max() > 1e-2
    per_image = jax.jit(jax.vmap(lambda xi: split(params, xi[None])[0]))(x)
    np.testing.assert_allclose(np.asarray(per_image), np.asarray(f(params, x)), rtol=0, atol=1e-5)


# -- timm's state dicts ----------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(TINY))
def test_to_torch_inverts_from_torch(name):
    m, params = tiny(name)
    sd = to_torch(params, m)
    assert list(sd) == list(torch_keys(m))
    w = params["blocks.1"]["params"]["attn"]["qkv"]["kernel"]  # (in, out) -> torch's (out, in)
    np.testing.assert_array_equal(sd["blocks.1.attn.qkv.weight"], np.asarray(w).T)
    k = params["embed"]["params"]["proj"]["kernel"]  # (kh, kw, in, out) -> (out, in, kh, kw)
    assert sd["patch_embed.proj.weight"][7, 2, 1, 5] == k[1, 5, 2, 7]
    np.testing.assert_array_equal(sd["pos_embed"], params["embed"]["params"]["pos_embed"])
    back = from_torch(sd, m)
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)
    again = to_torch(back, m)
    assert all(np.array_equal(again[k], sd[k]) for k in sd)


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_load_vit_tiny_from_a_timm_state_dict_file(tmp_path, fmt):
    """``models.load(name, weights=PATH)``: a timm-named state dict in a ``.safetensors`` file or a
    ``torch.save`` zip (written here without torch), every tensor where timm keeps it."""
    name = "vit_tiny_patch16_224"
    sd = to_torch(models.zoo.random_params(models.get(name), seed=4), name)
    path = tmp_path / f"model.{fmt}"
    if fmt == "safetensors":
        save_safetensors(path, sd)
    else:
        _torchfiles.save_zip(path, collections.OrderedDict(
            (k, _torchfiles.tensor(str(i), v)) for i, (k, v) in enumerate(sd.items())))
    clf = models.load(name, weights=str(path))
    assert isinstance(clf, Classifier) and clf.layer == "blocks.11.norm1" and "blocks.10" in clf.layers
    p = clf.params
    np.testing.assert_array_equal(np.asarray(p["blocks.7"]["params"]["mlp"]["fc2"]["kernel"]),
                                  sd["blocks.7.mlp.fc2.weight"].T)
    np.testing.assert_array_equal(np.asarray(p["embed"]["params"]["cls_token"]), sd["cls_token"])
    np.testing.assert_array_equal(np.asarray(p["norm"]["params"]["scale"]), sd["norm.weight"])
    np.testing.assert_array_equal(np.asarray(p["head"]["params"]["head"]["bias"]), sd["head.bias"])
    assert clf.class_name(285) == "Egyptian cat"
