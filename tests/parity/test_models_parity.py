"""The Flax zoo against torchvision 0.29 and timm on identical weights.

Every stage's output and the logits are compared; relative error =
``max|ours - theirs| / max|theirs|`` per tensor, tolerance 1e-4. Torchvision
models have random weights with random biases and BatchNorm statistics;
EfficientNet-Lite0 and Lite1 run the bundled pretrained weights on a real photo
against timm's ``tf_efficientnet_lite0/1`` holding the same tensors. The split
points inside blocks are checked against the same networks' activations.
"""
import numpy as np
import pytest

REASON = ("parity tier needs the PyTorch reference stack "
          "(pip install torch==2.14.1 torchvision==0.29.1 timm captum grad-cam)")
torch = pytest.importorskip("torch", reason=REASON)
torchvision = pytest.importorskip("torchvision", reason=REASON)
timm = pytest.importorskip("timm", reason=REASON)

import jax  # noqa: E402
from PIL import Image  # noqa: E402

import models  # noqa: E402
from models.checkpoints import load_state_dict  # noqa: E402
from models.convert import from_torch, torch_keys  # noqa: E402

torch.set_num_threads(2)
TOL = 1e-4


def _nhwc(t):
    t = t.detach().numpy()
    return t.transpose(0, 2, 3, 1) if t.ndim == 4 else t.reshape(t.shape[0], -1)


def _torch_calls(net, modules, x_nhwc):
    """``({name: [outputs of modules[name], in call order]}, logits)`` of ``net`` on ``x``
    via forward hooks (a module may run several times, e.g. a Bottleneck's one ``relu``)."""
    outs, hooks = {}, []
    for name, mod in modules.items():
        hooks.append(mod.register_forward_hook(
            lambda m, i, o, name=name: outs.setdefault(name, []).append(_nhwc(o.clone()))))
    try:
        with torch.no_grad():
            logits = net(torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))))
    finally:
        for h in hooks:
            h.remove()
    return outs, logits.numpy()


def _torch_outputs(net, modules, x_nhwc):
    """``{stage: output}`` of ``net`` on ``x`` via forward hooks on ``modules[stage]``, and the logits."""
    outs, logits = _torch_calls(net, modules, x_nhwc)
    return {stage: calls[-1] for stage, calls in outs.items()}, logits


def _resnet_modules(net, model):
    mods = {"stem": net.relu, "maxpool": net.maxpool, "avgpool": net.avgpool, "fc": net.fc}
    for stage in model.stage_names:
        if stage.startswith("layer"):
            layer, block = stage.split(".")
            mods[stage] = getattr(net, layer)[int(block)]
    return mods


def _vgg_modules(net, model):
    mods, convs, pools = {}, [], []
    for m in net.features:
        if isinstance(m, torch.nn.ReLU):
            convs.append(m)
        elif isinstance(m, torch.nn.MaxPool2d):
            pools.append(m)
    conv_stages = [s for s in model.stage_names if s.startswith("conv")]
    pool_stages = [s for s in model.stage_names if s.startswith("pool")]
    assert len(convs) == len(conv_stages) and len(pools) == len(pool_stages)
    mods.update(zip(conv_stages, convs))
    mods.update(zip(pool_stages, pools))
    mods.update(avgpool=net.avgpool, fc6=net.classifier[1], fc7=net.classifier[4], fc8=net.classifier[6])
    return mods


def _timm_lite_modules(net, model):
    blocks = [b for stage in net.blocks for b in stage]
    mods = {"stem": net.bn1, "head_conv": net.bn2, "pool": net.global_pool, "fc": net.classifier}
    mods.update({f"blocks.{i}": b for i, b in enumerate(blocks)})
    assert set(mods) == set(model.stage_names)
    return mods


def _compare(model, params, net, modules, x, rel):
    with jax.default_matmul_precision("float32"):
        ours = jax.jit(model.stage_outputs)(jax.device_put(params), x)  # compiled once, not op by op
    theirs, logits = _torch_outputs(net, modules, x)
    for stage, value in theirs.items():  # torch's (B, C, 1, 1) global pools vs our (B, C)
        if np.ndim(ours[stage]) == 2:
            theirs[stage] = value.reshape(value.shape[0], -1)
    errors = {stage: rel(ours[stage], theirs[stage]) for stage in model.stage_names}
    errors["logits"] = rel(ours[model.stage_names[-1]], logits)
    worst = max(errors, key=errors.get)
    print(f"\n{model.name}: max relative error {errors[worst]:.2e} ({worst}); "
          f"logits {errors['logits']:.2e}; {len(model.stage_names)} stages")
    bad = {s: e for s, e in errors.items() if not e <= TOL}
    assert not bad, f"{model.name}: stages over {TOL}: {bad}"
    return errors


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "vgg16", "vgg16_bn"])
def test_torchvision_stage_outputs_and_logits(name, torchvision_pair, rel_error):
    net, params = torchvision_pair(name)
    model = models.get(name)
    x = np.random.default_rng(0).standard_normal((1, 224, 224, 3)).astype(np.float32)
    modules = (_resnet_modules if name.startswith("resnet") else _vgg_modules)(net, model)
    _compare(model, params, net, modules, x, rel_error)


@pytest.mark.parametrize("name", [n for n in models.names() if n.startswith(("resnet", "vgg"))])
def test_converter_knows_every_torchvision_key(name):
    with torch.device("meta"):
        net = torchvision.models.get_model(name, weights=None)
    theirs = {k: tuple(v.shape) for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    ours = {k: shape for k, (_, shape) in torch_keys(models.get(name)).items()}
    assert ours == theirs


def _timm_to_effnet_pytorch(sd):
    """timm ``tf_efficientnet_lite*`` keys -> EfficientNet-PyTorch keys (by name)."""
    top = {"conv_stem": "_conv_stem", "bn1": "_bn0", "conv_head": "_conv_head", "bn2": "_bn1",
           "classifier": "_fc"}
    ds = {"conv_dw": "_depthwise_conv", "bn1": "_bn1", "conv_pw": "_project_conv", "bn2": "_bn2"}
    ir = {"conv_pw": "_expand_conv", "bn1": "_bn0", "conv_dw": "_depthwise_conv", "bn2": "_bn1",
          "conv_pwl": "_project_conv", "bn3": "_bn2"}
    index, out = {}, {}
    for k, v in sd.items():
        parts = k.split(".")
        if parts[0] == "blocks":
            n = index.setdefault((parts[1], parts[2]), len(index))
            table = ds if (parts[1], parts[2]) == ("0", "0") else ir
            out[".".join([f"_blocks.{n}", table[parts[3]]] + parts[4:])] = v
        else:
            out[".".join([top[parts[0]]] + parts[1:])] = v
    return out


def _pretrained_lite_pair(name, num_keys):
    """timm's ``tf_`` architecture holding the packaged checkpoint of ``name``, and our params."""
    path = models.zoo.PRETRAINED[name]()
    ours = load_state_dict(path)  # numpy, read without torch
    net = timm.create_model("tf_" + name, pretrained=False).eval()
    timm_keys = list(net.state_dict())
    assert len(timm_keys) == len(ours) == num_keys
    # both list the same tensors in the same order
    by_position = {tk: torch.from_numpy(np.array(v)) for tk, v in zip(timm_keys, ours.values())}
    net.load_state_dict(by_position)
    # the by-name mapping agrees with the by-position one
    assert list(_timm_to_effnet_pytorch(dict.fromkeys(timm_keys))) == list(ours)
    return net, from_torch(ours, name)


def _photo(name):
    return np.asarray(Image.open(dict((p.stem, p) for p in models.sample_images())[name]).convert("RGB"))


@pytest.mark.parametrize("name, num_keys, size", [("efficientnet_lite0", 296, 224),
                                                  ("efficientnet_lite1", 386, 240)])
def test_efficientnet_lite_pretrained_on_a_photo(name, num_keys, size, rel_error):
    net, params = _pretrained_lite_pair(name, num_keys)
    model = models.get(name)
    x = model.preprocess(_photo("chelsea"))[None]
    assert x.shape == (1, size, size, 3)  # timm's input size for the variant
    errors = _compare(model, params, net, _timm_lite_modules(net, model), x, rel_error)
    logits = np.asarray(jax.jit(model.apply)(jax.device_put(params), x))
    assert int(logits.argmax()) == 285 and errors["logits"] <= TOL


def test_lite0_points_inside_blocks_are_timms_activations(rel_error):
    """``blocks.N.expand`` / ``blocks.N.dw`` on the pretrained Lite0 and a photo: the leading
    channels of A are timm's post-activation tensors (``bn1``/``bn2`` with their ReLU6); the
    head continues to the same logits."""
    net, params = _pretrained_lite_pair("efficientnet_lite0", 296)
    model = models.get("efficientnet_lite0")
    x = model.preprocess(_photo("coffee"))[None]
    blocks = [b for stage in net.blocks for b in stage]
    modules = {}
    for i, b in enumerate(blocks):
        if hasattr(b, "conv_pwl"):  # InvertedResidual: bn1 after the expand conv, bn2 after the dw
            modules[f"blocks.{i}.expand"], modules[f"blocks.{i}.dw"] = b.bn1, b.bn2
        else:  # DepthwiseSeparable (block 0): bn1 after the dw
            modules[f"blocks.{i}.dw"] = b.bn1
    assert set(modules) == set(model.inner_layers())
    theirs, logits = _torch_calls(net, modules, x)
    p = jax.device_put(params)
    worst = 0.0
    with jax.default_matmul_precision("float32"):
        for layer, (t,) in theirs.items():
            split = model.split(layer)
            a = np.asarray(split.features(p, x))
            worst = max(worst, rel_error(a[..., : t.shape[-1]], t))
            assert rel_error(np.asarray(split.head(p, a)), logits) <= TOL, layer
    print(f"\nlite0 inner points: max relative error {worst:.2e} over {len(theirs)} points")
    assert worst <= TOL


def test_resnet50_points_inside_blocks_are_torchvisions_relus(torchvision_pair, rel_error):
    """``layerX.Y.relu1`` / ``relu2``: torchvision's Bottleneck calls its one ``relu`` three times;
    the first two outputs are our points' leading channels."""
    net, params = torchvision_pair("resnet50")
    model = models.get("resnet50")
    x = np.random.default_rng(1).standard_normal((1, 160, 160, 3)).astype(np.float32)
    modules = {stage: getattr(net, stage.split(".")[0])[int(stage.split(".")[1])].relu
               for stage in model.stage_names if stage.startswith("layer")}
    theirs, logits = _torch_calls(net, modules, x)
    p = jax.device_put(params)
    checked = 0
    with jax.default_matmul_precision("float32"):
        for layer, (stage, point) in model.inner_layers().items():
            t = theirs[stage][int(point[-1]) - 1]
            split = model.split(layer)
            a = np.asarray(split.features(p, x))
            assert rel_error(a[..., : t.shape[-1]], t) <= TOL, layer
            if stage.startswith("layer4") or stage.endswith(".0"):
                assert rel_error(np.asarray(split.head(p, a)), logits) <= TOL, layer
            checked += 1
    assert checked == 32


@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_efficientnet_lite_random_weights(name, randomize, rel_error):
    torch.manual_seed(0)
    net = randomize(timm.create_model("tf_" + name, pretrained=False).eval(), seed=1)
    # Halve the projection BN's scale: with timm's init, activations otherwise grow to
    # ~60 over 20+ residual blocks and float32 rounding of either side (~1e-3 absolute)
    # dominates the relative error where ReLU6 caps the head at 6.
    with torch.no_grad():
        for block in (b for stage in net.blocks for b in stage):
            if hasattr(block, "bn3"):
                block.bn3.weight.mul_(0.5)
    sd = _timm_to_effnet_pytorch({k: v.numpy() for k, v in net.state_dict().items()})
    model = models.get(name)
    params = from_torch(sd, model)
    s = model.preprocess.size
    x = np.random.default_rng(0).standard_normal((1, s, s, 3)).astype(np.float32)
    _compare(model, params, net, _timm_lite_modules(net, model), x, rel_error)
