"""PyTorch state dict -> Flax variables, without torch: layouts, key names, errors, loading."""
import numpy as np
import pytest

import models
from liftcam_jax.errors import UsageError
from models.checkpoints import save_safetensors
from models.convert import from_torch, torch_keys


def _state_dict(name, seed=0):
    """Random numpy tensors under every key the converter expects, torchvision-style."""
    rng = np.random.default_rng(seed)
    sd = {k: rng.standard_normal(shape).astype(np.float32)
          for k, (_, shape) in torch_keys(models.get(name)).items()}
    for k in sd:
        if k.endswith("running_var"):
            sd[k] = np.abs(sd[k]) + 0.5
    return sd


# Key names and shapes of torchvision 0.29's / EfficientNet-PyTorch's / timm's state dicts,
# written out by hand (independent of the converter's own key listing).
KNOWN_KEYS = {
    "resnet18": {
        "conv1.weight": (64, 3, 7, 7),
        "bn1.running_mean": (64,),
        "layer1.0.conv1.weight": (64, 64, 3, 3),
        "layer2.0.downsample.0.weight": (128, 64, 1, 1),
        "layer2.0.downsample.1.running_var": (128,),
        "layer4.1.bn2.bias": (512,),
        "fc.weight": (1000, 512),
        "fc.bias": (1000,),
    },
    "resnet50": {
        "layer1.0.conv3.weight": (256, 64, 1, 1),
        "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "layer3.5.bn3.weight": (1024,),
        "layer4.0.conv2.weight": (512, 512, 3, 3),
        "fc.weight": (1000, 2048),
    },
    "vgg16": {
        "features.0.weight": (64, 3, 3, 3),
        "features.2.weight": (64, 64, 3, 3),
        "features.5.bias": (128,),
        "features.28.weight": (512, 512, 3, 3),
        "classifier.0.weight": (4096, 25088),
        "classifier.3.weight": (4096, 4096),
        "classifier.6.bias": (1000,),
    },
    "vgg16_bn": {
        "features.1.running_mean": (64,),
        "features.3.weight": (64, 64, 3, 3),
        "features.7.weight": (128, 64, 3, 3),
        "features.41.running_var": (512,),
        "classifier.6.weight": (1000, 4096),
    },
    "efficientnet_lite0": {
        "_conv_stem.weight": (32, 3, 3, 3),
        "_bn0.running_var": (32,),
        "_blocks.0._depthwise_conv.weight": (32, 1, 3, 3),
        "_blocks.0._project_conv.weight": (16, 32, 1, 1),
        "_blocks.1._expand_conv.weight": (96, 16, 1, 1),
        "_blocks.15._bn2.bias": (320,),
        "_conv_head.weight": (1280, 320, 1, 1),
        "_bn1.running_mean": (1280,),
        "_fc.weight": (1000, 1280),
    },
    "vit_tiny_patch16_224": {  # timm 1.0
        "cls_token": (1, 1, 192), "pos_embed": (1, 197, 192),
        "patch_embed.proj.weight": (192, 3, 16, 16), "patch_embed.proj.bias": (192,),
        "blocks.0.norm1.weight": (192,), "blocks.0.attn.qkv.weight": (576, 192),
        "blocks.0.attn.qkv.bias": (576,), "blocks.5.attn.proj.weight": (192, 192),
        "blocks.11.norm2.bias": (192,), "blocks.11.mlp.fc1.weight": (768, 192),
        "blocks.11.mlp.fc2.weight": (192, 768), "norm.weight": (192,), "head.weight": (1000, 192),
        "head.bias": (1000,),
    },
    "deit_tiny_distilled_patch16_224": {
        "cls_token": (1, 1, 192), "dist_token": (1, 1, 192), "pos_embed": (1, 198, 192),
        "head.weight": (1000, 192), "head_dist.weight": (1000, 192), "head_dist.bias": (1000,),
    },
}
# number of tensors in the state dicts, without num_batches_tracked; ViTs: 4 embedding tensors
# (+ dist_token), 12 per block, norm's 2, head's 2 (+ head_dist's 2)
KEY_COUNTS = {"resnet18": 102, "resnet50": 267, "vgg16": 32, "vgg16_bn": 84,
              "efficientnet_lite0": 247, "vit_tiny_patch16_224": 4 + 12 * 12 + 2 + 2,
              "deit_tiny_distilled_patch16_224": 5 + 12 * 12 + 2 + 4}


@pytest.mark.parametrize("name", sorted(KNOWN_KEYS))
def test_expected_keys(name):
    keys = torch_keys(models.get(name))
    assert len(keys) == KEY_COUNTS[name]
    for k, shape in KNOWN_KEYS[name].items():
        assert keys[k][1] == shape, k
    if name == "efficientnet_lite0":
        assert "_blocks.0._expand_conv.weight" not in keys  # expansion ratio 1
    if name.startswith("vit"):
        assert "dist_token" not in keys and "head_dist.weight" not in keys


def test_resnet_tensors_land_transposed_in_place():
    sd = _state_dict("resnet18")
    p = from_torch(sd, "resnet18")
    w = sd["conv1.weight"]  # (O, I, kh, kw) -> (kh, kw, I, O)
    k = np.asarray(p["stem"]["params"]["conv1"]["kernel"])
    assert k.shape == (7, 7, 3, 64) and k[2, 5, 1, 40] == w[40, 1, 2, 5]
    np.testing.assert_array_equal(k, w.transpose(2, 3, 1, 0))
    ds = p["layer2.0"]
    np.testing.assert_array_equal(ds["params"]["downsample_conv"]["kernel"][0, 0],
                                  sd["layer2.0.downsample.0.weight"][:, :, 0, 0].T)
    np.testing.assert_array_equal(ds["params"]["downsample_bn"]["scale"], sd["layer2.0.downsample.1.weight"])
    np.testing.assert_array_equal(ds["batch_stats"]["downsample_bn"]["var"],
                                  sd["layer2.0.downsample.1.running_var"])
    np.testing.assert_array_equal(p["layer3.1"]["batch_stats"]["bn2"]["mean"], sd["layer3.1.bn2.running_mean"])
    np.testing.assert_array_equal(p["fc"]["params"]["kernel"], sd["fc.weight"].T)
    np.testing.assert_array_equal(p["fc"]["params"]["bias"], sd["fc.bias"])
    assert p["maxpool"] == {} and p["avgpool"] == {}


def test_vgg_bn_indices():
    sd = _state_dict("vgg16_bn")
    p = from_torch(sd, "vgg16_bn")
    # conv, bn, relu (x2), pool: conv1_2 is features.3, conv2_1 features.7, conv5_3 features.40
    np.testing.assert_array_equal(p["conv1_2"]["params"]["conv"]["kernel"],
                                  sd["features.3.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(p["conv2_1"]["params"]["conv"]["bias"], sd["features.7.bias"])
    np.testing.assert_array_equal(p["conv5_3"]["params"]["bn"]["bias"], sd["features.41.bias"])
    np.testing.assert_array_equal(p["conv5_3"]["batch_stats"]["bn"]["mean"], sd["features.41.running_mean"])
    np.testing.assert_array_equal(p["fc7"]["params"]["fc"]["kernel"], sd["classifier.3.weight"].T)
    np.testing.assert_array_equal(p["fc8"]["params"]["fc"]["bias"], sd["classifier.6.bias"])


def test_efficientnet_lite_names():
    sd = _state_dict("efficientnet_lite0")
    p = from_torch(sd, "efficientnet_lite0")
    dw = np.asarray(p["blocks.0"]["params"]["depthwise_conv"]["kernel"])
    assert dw.shape == (3, 3, 1, 32)
    assert dw[0, 2, 0, 7] == sd["_blocks.0._depthwise_conv.weight"][7, 0, 0, 2]
    np.testing.assert_array_equal(p["blocks.1"]["params"]["expand_conv"]["kernel"][0, 0],
                                  sd["_blocks.1._expand_conv.weight"][:, :, 0, 0].T)
    np.testing.assert_array_equal(p["blocks.1"]["batch_stats"]["bn0"]["var"], sd["_blocks.1._bn0.running_var"])
    np.testing.assert_array_equal(p["stem"]["params"]["bn0"]["scale"], sd["_bn0.weight"])
    np.testing.assert_array_equal(p["head_conv"]["batch_stats"]["bn1"]["mean"], sd["_bn1.running_mean"])
    np.testing.assert_array_equal(p["fc"]["params"]["kernel"], sd["_fc.weight"].T)


def _correlate_nchw(x, w, stride, pad):
    """PyTorch's conv2d (cross-correlation, zero padding) in plain numpy."""
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    o, _, kh, kw = w.shape
    oh, ow = (x.shape[2] - kh) // stride + 1, (x.shape[3] - kw) // stride + 1
    y = np.zeros((x.shape[0], o, oh, ow))
    for i in range(oh):
        for j in range(ow):
            patch = x[:, :, i * stride:i * stride + kh, j * stride:j * stride + kw]
            y[:, :, i, j] = np.einsum("bchw,ochw->bo", patch, w)
    return y


def test_converted_stem_computes_pytorchs_convolution():
    sd = _state_dict("resnet18", seed=3)
    p = from_torch(sd, "resnet18")
    stem = dict(models.get("resnet18").stages)["stem"]
    x = np.random.default_rng(1).standard_normal((1, 3, 9, 10)).astype(np.float32)
    y = np.asarray(stem.apply(p["stem"], x.transpose(0, 2, 3, 1))).transpose(0, 3, 1, 2)
    z = _correlate_nchw(x.astype(np.float64), sd["conv1.weight"], stride=2, pad=3)
    z = (z - sd["bn1.running_mean"][:, None, None]) / np.sqrt(sd["bn1.running_var"][:, None, None] + 1e-5)
    z = np.maximum(z * sd["bn1.weight"][:, None, None] + sd["bn1.bias"][:, None, None], 0)
    assert y.shape == (1, 64, 5, 5)
    np.testing.assert_allclose(y, z, rtol=1e-4, atol=1e-4)


def test_num_batches_tracked_is_ignored_and_torch_like_values_accepted():
    sd = _state_dict("resnet18")
    sd["bn1.num_batches_tracked"] = np.array(7, np.int64)
    sd["layer1.0.bn1.num_batches_tracked"] = np.array(7, np.int64)
    sd["fc.weight"] = sd["fc.weight"].astype(np.float64)
    p = from_torch(sd, models.get("resnet18"))
    assert p["fc"]["params"]["kernel"].dtype == np.float32


def test_missing_extra_and_misshaped_keys_are_named():
    sd = _state_dict("resnet18")
    bad = dict(sd)
    del bad["layer1.0.bn1.running_mean"]
    with pytest.raises(UsageError, match=r"missing 1 key\(s\): 'layer1.0.bn1.running_mean' \(expected shape \(64,\)\)"):
        from_torch(bad, "resnet18")
    bad = dict(sd, **{"layer5.0.conv1.weight": np.zeros((3, 3, 3, 3), np.float32)})
    with pytest.raises(UsageError, match="unexpected key.*layer5.0.conv1.weight"):
        from_torch(bad, "resnet18")
    bad = dict(sd, **{"fc.weight": np.zeros((10, 512), np.float32)})
    with pytest.raises(UsageError, match=r"'fc.weight' has shape \(10, 512\), expected \(1000, 512\)"):
        from_torch(bad, "resnet18")
    # an EfficientNet checkpoint is not a ResNet one: the message names the first missing key
    with pytest.raises(UsageError, match=r"missing 102 key\(s\): 'bn1.running_mean' \(expected shape \(64,\)\).*conv1.weight"):
        from_torch(_state_dict("efficientnet_lite0"), "resnet18")


def test_load_from_a_checkpoint_file(tmp_path):
    sd = _state_dict("resnet18", seed=5)
    path = tmp_path / "resnet18.safetensors"
    save_safetensors(path, sd)
    clf = models.load("resnet18", weights=str(path), layer="layer3")
    np.testing.assert_array_equal(np.asarray(clf.params["layer3.0"]["params"]["conv2"]["kernel"]),
                                  sd["layer3.0.conv2.weight"].transpose(2, 3, 1, 0))
    assert clf.layer == "layer3" and clf.name == "resnet18"
    with pytest.raises(UsageError, match="missing"):
        save_safetensors(tmp_path / "bad.safetensors", {"fc.weight": sd["fc.weight"]})
        models.load("resnet18", weights=tmp_path / "bad.safetensors")
