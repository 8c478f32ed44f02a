"""The zoo's ViTs against timm 1.0 on identical random weights, and Grad-CAM on a ViT against
pytorch-grad-cam with its ``reshape_transform``.

timm models get random biases and LayerNorm affine parameters (``randomize_torch_model`` of
``conftest.py``) and class/distillation tokens drawn like the position embedding, N(0, 0.02),
so no layer is an identity by accident. The weights reach the zoo through a file, as a user's
would: ``torch.save(net.state_dict())`` (``.pth``) or ``.safetensors``, read by
``models.load(name, weights=PATH)``. Compared, per tensor, with ``max|ours - timm| / max|timm|
<= 1e-4``: the embedding (timm's ``norm_pre`` output), every block's output, the final ``norm``,
the logits, and inside every block ``A = [norm1(z), z]`` and ``[norm2(u), u]`` (the
LayerNorm's output and its input, from forward hooks) with the head continuing from there to
the logits.
"""
import numpy as np
import pytest

REASON = ("parity tier needs the PyTorch reference stack "
          "(pip install torch==2.14.1 torchvision==0.29.1 timm captum grad-cam)")
torch = pytest.importorskip("torch", reason=REASON)
timm = pytest.importorskip("timm", reason=REASON)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from PIL import Image  # noqa: E402

import liftcam_jax as lj  # noqa: E402
import models  # noqa: E402
from models.checkpoints import save_safetensors  # noqa: E402
from models.convert import from_torch, to_torch, torch_keys  # noqa: E402
from models.vit import ViTConfig, vision_transformer  # noqa: E402
from conftest import cli_maps  # noqa: E402

torch.set_num_threads(2)
TOL = 1e-4
SMALL = ViTConfig(32, 3, 4, patch=8, size=48)  # a 6x6 grid, 8-channel heads, three blocks


def timm_vit(name, randomize, seed=0, **kwargs):
    """A timm ViT (``eval()``) with random biases, LayerNorms and tokens."""
    torch.manual_seed(seed)
    net = randomize(timm.create_model(name, pretrained=False, **kwargs).eval(), seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for token in ("cls_token", "dist_token"):
            if getattr(net, token, None) is not None:
                getattr(net, token).copy_(0.02 * torch.randn(getattr(net, token).shape, generator=gen))
    return net


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def timm_activations(net, x):
    """``({layer: timm's tensor in the zoo's layout}, logits)``: stages and inner points."""
    acts, hooks = {}, []

    def keep(name, inner=False):
        def hook(module, inputs, output):
            acts[name] = (torch.cat([output, inputs[0]], -1) if inner else output).numpy()
        return hook

    hooks.append(net.norm_pre.register_forward_hook(keep("embed")))
    hooks.append(net.norm.register_forward_hook(keep("norm")))
    for i, block in enumerate(net.blocks):
        hooks.append(block.register_forward_hook(keep(f"blocks.{i}")))
        hooks.append(block.norm1.register_forward_hook(keep(f"blocks.{i}.norm1", inner=True)))
        hooks.append(block.norm2.register_forward_hook(keep(f"blocks.{i}.norm2", inner=True)))
    try:
        with torch.no_grad():
            logits = net(nchw(x)).numpy()
    finally:
        for h in hooks:
            h.remove()
    return acts, logits


def compare(model, params, net, x, rel_error, full_splits=(), inner=True):
    """Every stage and (``inner``) inner point of ``model`` against ``net``; from each ``norm1``
    the rest of its block, and from ``full_splits`` (the whole ``split`` API) the head to the
    logits. Returns the worst relative error."""
    theirs, logits = timm_activations(net, x)
    p = jax.device_put(params)
    stages = dict(model.stages)
    errors = {}
    with jax.default_matmul_precision("float32"):
        ours = model.stage_outputs(p, x)
        errors["logits"] = rel_error(ours["head"], logits)
        for stage in model.stage_names[:-1]:
            errors[stage] = rel_error(ours[stage], theirs[stage])
        names = model.stage_names
        for layer, (stage, point) in (model.inner_layers() if inner else {}).items():
            before = ours[names[names.index(stage) - 1]]
            a = stages[stage].apply(p[stage], before, stop=point)
            errors[layer] = rel_error(a, theirs[layer])
            if point == "norm1":  # the block's rest from A, then the model's rest
                z = stages[stage].apply(p[stage], a, start=point)
                errors[f"{layer} -> {stage}"] = rel_error(z, theirs[stage])
        for layer in full_splits:
            split = model.split(layer)
            errors[f"head({layer})"] = rel_error(split.head(p, split.features(p, x)), logits)
    worst = max(errors, key=errors.get)
    print(f"\n{model.name}: max relative error {errors[worst]:.2e} ({worst}); logits {errors['logits']:.2e}; "
          f"{len(errors)} tensors")
    bad = {k: e for k, e in errors.items() if not e <= TOL}
    assert not bad, f"{model.name}: over {TOL}: {bad}"
    assert len(errors) == (1 + (len(model.stage_names) - 1) + 3 * len(model.inner_layers()) // 2 * inner
                           + len(full_splits))
    return errors[worst]


def images(batch, size, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, size, size, 3)).astype(np.float32)


@pytest.mark.parametrize("name, fmt", [("vit_tiny_patch16_224", "pth"),
                                       ("deit_tiny_distilled_patch16_224", "safetensors")])
def test_zoo_vit_loaded_from_a_timm_file_is_timm_at_every_block(name, fmt, tmp_path, randomize, rel_error):
    net = timm_vit(name, randomize)
    path = tmp_path / f"{name}.{fmt}"
    if fmt == "pth":
        torch.save(net.state_dict(), path)
    else:
        save_safetensors(path, {k: v.numpy() for k, v in net.state_dict().items()})
    clf = models.load(name, weights=path)
    assert clf.layer == "blocks.11.norm1"
    compare(models.get(name), clf.params, net, images(2, 224), rel_error,
            full_splits=("blocks.11.norm1", "blocks.10", "norm"))


def test_small_custom_vit_is_timm(randomize, rel_error):
    """A 3-block ViT at 48x48 (timm's ``VisionTransformer`` with the same sizes): the zoo's
    builder at any width, depth, head count, patch and image size."""
    c = SMALL
    net = timm_vit("vit_tiny_patch16_224", randomize, seed=3, img_size=c.size, patch_size=c.patch,
                   embed_dim=c.width, depth=c.depth, num_heads=c.heads, num_classes=7)
    model = vision_transformer("vit_parity_small", c, num_classes=7)
    params = from_torch({k: v.numpy() for k, v in net.state_dict().items()}, model)
    compare(model, params, net, images(3, c.size, seed=1), rel_error, full_splits=("blocks.2.norm1", "embed"))


def test_vit_base_logits_and_every_block(randomize, rel_error):
    """ViT-B/16 (86M parameters, one image): every stage and the logits; the inner points are the
    same code at another width, checked on the tiny models above."""
    net = timm_vit("vit_base_patch16_224", randomize, seed=2)
    model = models.get("vit_base_patch16_224")
    params = from_torch({k: v.numpy() for k, v in net.state_dict().items()}, model)
    compare(model, params, net, images(1, 224, seed=2), rel_error, inner=False)


@pytest.mark.parametrize("name", [n for n in models.names() if n.startswith(("vit_", "deit_"))])
def test_converter_knows_every_timm_key(name):
    with torch.device("meta"):
        net = timm.create_model(name, pretrained=False)
    theirs = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    ours = {k: shape for k, (_, shape) in torch_keys(models.get(name)).items()}
    assert ours == theirs
    assert list(to_torch(models.zoo.random_params(models.get(name)), name)) == list(ours)


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_preprocessing_is_timms_eval_transform(name):
    """timm's own transform from the model's ``pretrained_cfg`` on a bundled photo (resize of the
    shorter side, centre crop, normalisation) gives the zoo's input to float rounding."""
    with torch.device("meta"):
        net = timm.create_model(name, pretrained=False)
    config = timm.data.resolve_data_config({}, model=net)
    transform = timm.data.create_transform(**config)
    photo = Image.open(dict((p.stem, p) for p in models.sample_images())["chelsea"]).convert("RGB")
    theirs = transform(photo).numpy().transpose(1, 2, 0)
    ours = models.get(name).preprocess(np.asarray(photo))
    assert ours.shape == theirs.shape == (224, 224, 3)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)


# -- Grad-CAM on a ViT: the library's token maps against pytorch-grad-cam -----------------------

@pytest.fixture(scope="module")
def grad_cam_vit(tmp_path_factory, randomize):
    """vit_tiny (timm, random weights, logits rescaled to standard deviation 8), a timm state dict
    file, two images, and pytorch-grad-cam's Grad-CAM at ``blocks.10`` with the ViT
    ``reshape_transform`` of its documentation (drop the class token, tokens -> 14 x 14 maps)."""
    pgc = pytest.importorskip("pytorch_grad_cam", reason=REASON)
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    net = timm_vit("vit_tiny_patch16_224", randomize, seed=5)
    x = images(2, 224, seed=5)
    with torch.no_grad():
        scale = 8.0 / float(net(nchw(x)).std())
        net.head.weight.mul_(scale)
        net.head.bias.mul_(scale)
        logits = net(nchw(x)).numpy()
    targets = [int(t) for t in logits.argmax(1)]

    def reshape_transform(t, height=14, width=14):
        return t[:, 1:, :].reshape(t.size(0), height, width, t.size(2)).permute(0, 3, 1, 2)

    with pgc.GradCAM(model=net, target_layers=[net.blocks[10]], reshape_transform=reshape_transform) as cam:
        ref = cam(input_tensor=nchw(x), targets=[ClassifierOutputTarget(t) for t in targets])
    assert np.all(ref.max(axis=(1, 2)) > 0.99), "degenerate reference map: the comparison would prove nothing"
    weights = tmp_path_factory.mktemp("vit") / "vit_tiny.pth"
    torch.save(net.state_dict(), weights)
    return weights, x, targets, logits, ref


def test_grad_cam_by_hand_on_the_zoo_split_is_pytorch_grad_cams(grad_cam_vit):
    """The zoo's ``blocks.10`` split carries timm's activations and gradients: Grad-CAM written
    out on it (gradients averaged over the 14 x 14 patch tokens only, as pytorch-grad-cam's
    ``reshape_transform`` drops the class token first; map on the grid; the library's one
    upsampling and normalisation) gives pytorch-grad-cam's maps. With the class token's gradient
    in the average the maps are others: the token layout decides the result."""
    from liftcam_jax.explanation import Attribution, from_attribution

    weights, x, targets, logits, ref = grad_cam_vit
    clf = models.load("vit_tiny_patch16_224", weights=weights, layer="blocks.10")
    split, p = clf.split, clf.params
    a = split.features(p, jnp.asarray(x))
    t = jnp.asarray(targets)
    grads = jax.grad(lambda a: jnp.sum(split.head(p, a)[jnp.arange(len(targets)), t]))(a)
    grid = a[:, 1:].reshape(len(x), 14, 14, a.shape[-1])
    errors = {}
    for name, w in (("grid", grads[:, 1:].mean(1)), ("all tokens", grads.mean(1))):
        e = from_attribution(grid, Attribution(w), (224, 224), split.head(p, a), t)
        errors[name] = float(np.abs(np.asarray(e.maps) - ref).max())
    print(f"\nvit_tiny blocks.10 grad-cam by hand: max abs error {errors}")
    assert errors["grid"] < 1e-3 and errors["all tokens"] > 0.1


def test_grad_cam_on_vit_tiny_at_blocks_10_is_pytorch_grad_cams(grad_cam_vit):
    weights, x, targets, logits, ref = grad_cam_vit
    clf = models.load("vit_tiny_patch16_224", weights=weights, layer="blocks.10")
    e = lj.explain(clf.split, clf.params, jnp.asarray(x), jnp.asarray(targets), method="grad-cam")
    np.testing.assert_allclose(np.asarray(e.logits), logits, rtol=0, atol=1e-4 * np.abs(logits).max())
    err = np.abs(np.asarray(e.maps) - ref).max()
    print(f"\nparity vit_tiny blocks.10 grad-cam: max abs error {err:.2e}")
    assert err < 1e-3


def test_cli_grad_cam_on_vit_tiny_at_blocks_10_is_pytorch_grad_cams(grad_cam_vit, tmp_path):
    """``liftcam-jax explain X.npy --model vit_tiny_patch16_224 --weights W --layer blocks.10
    --method grad-cam`` (the predicted class, as pytorch-grad-cam's default target)."""
    weights, x, targets, _, ref = grad_cam_vit
    got = cli_maps(tmp_path, x, "vit_tiny_patch16_224", weights, "--layer", "blocks.10", "--method", "grad-cam")
    for i, (target, m) in enumerate(got):
        assert target == targets[i]
        err = np.abs(m - ref[i]).max()
        print(f"\nCLI vit_tiny blocks.10 grad-cam image {i}: max abs error {err:.2e}")
        assert err < 1e-3
