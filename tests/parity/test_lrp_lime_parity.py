"""Parity of LRP-CAM and LIME-CAM with Captum on torchvision VGG16 and ResNet-50 heads.

The heads are the LIFT-CAM authors' splits: VGG16 after the last conv ReLU
(``features.29``; head = max-pool -> adaptive avg-pool -> flatten -> classifier)
and ResNet-50 after ``layer4`` (head = avg-pool -> flatten -> fc). Weights are
torchvision's random initialisation with random biases; the activations are
random non-negative maps with log-normal channel scales (like real post-ReLU
maps, a few channels dominate). The same weights drive a pure JAX head.

LIME-CAM is random: with the *same* masks (fed to Captum through a
``perturb_func`` generator) the coefficients must agree up to the Lasso
solvers' tolerances; with independent masks (JAX key vs torch seed) they are
compared by Pearson correlation (two JAX keys against one Captum seed), at
least 0.9 on average.
Captum's ``Lime`` is slow here (a Python loop over 512/2048 samples): minutes.
"""
import numpy as np
import pytest

torch = pytest.importorskip(
    "torch",
    reason="parity tier needs the PyTorch reference stack (pip install torch==2.14.1 torchvision==0.29.1 timm captum grad-cam)",
)
torchvision = pytest.importorskip("torchvision", reason="parity tier needs torchvision")
captum_attr = pytest.importorskip("captum.attr", reason="parity tier needs captum")
pytest.importorskip("sklearn", reason="Captum's SkLearnLasso needs scikit-learn")

import flax.linen as fnn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from liftcam_jax.methods.lime_cam import lime_cam_coefficients  # noqa: E402
from liftcam_jax.methods.lrp_cam import lrp_cam_coefficients  # noqa: E402


# ---------------------------------------------------------------------------
# heads: torch modules Captum's LRP supports, and the same maps in JAX
# ---------------------------------------------------------------------------

class _VGGHead(torch.nn.Module):
    def __init__(self, vgg):
        super().__init__()
        self.pool = vgg.features[30]
        self.avgpool = vgg.avgpool
        self.classifier = vgg.classifier
        for m in self.classifier:
            if isinstance(m, torch.nn.ReLU):
                m.inplace = False  # Captum's backward hooks reject in-place ReLUs

    def forward(self, a):
        return self.classifier(torch.flatten(self.avgpool(self.pool(a)), 1))


class _ResNetHead(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.avgpool = net.avgpool
        self.fc = net.fc

    def forward(self, a):
        return self.fc(torch.flatten(self.avgpool(a), 1))


def _linear(m):
    return {"w": jnp.asarray(m.weight.detach().numpy().T), "b": jnp.asarray(m.bias.detach().numpy())}


def _vgg_params(head):
    lin = [m for m in head.classifier if isinstance(m, torch.nn.Linear)]
    p = [_linear(m) for m in lin]
    # torch flattens (C, 7, 7); the NHWC head flattens (7, 7, C)
    w1 = lin[0].weight.detach().numpy().reshape(-1, 512, 7, 7).transpose(2, 3, 1, 0).reshape(7 * 7 * 512, -1)
    p[0]["w"] = jnp.asarray(w1)
    return p


def vgg_head(params, a):
    a = fnn.max_pool(a, (2, 2), strides=(2, 2))
    h, w = a.shape[1] // 7, a.shape[2] // 7
    a = fnn.avg_pool(a, (h, w), strides=(h, w))  # AdaptiveAvgPool2d((7, 7)), divisible case
    a = a.reshape(a.shape[0], -1)
    for layer in params[:-1]:
        a = jax.nn.relu(a @ layer["w"] + layer["b"])  # Dropout is the identity at inference
    return a @ params[-1]["w"] + params[-1]["b"]


def resnet_head(params, a):
    return jnp.mean(a, axis=(1, 2)) @ params["w"] + params["b"]


def _activations(seed, h, k):
    g = torch.Generator().manual_seed(seed)
    a = torch.relu(torch.randn(1, k, h, h, generator=g))
    return a * torch.exp(torch.randn(1, k, 1, 1, generator=g))


@pytest.fixture(scope="module")
def vgg():
    torch.manual_seed(0)
    net = torchvision.models.vgg16(weights=None).eval()
    head = _VGGHead(net).eval()
    with torch.no_grad():
        for m in head.classifier:
            if isinstance(m, torch.nn.Linear):
                m.bias.normal_(0.0, 0.1)
    a = _activations(1, 14, 512)
    return head, _vgg_params(head), vgg_head, a


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    net = torchvision.models.resnet50(weights=None).eval()
    head = _ResNetHead(net).eval()
    with torch.no_grad():
        head.fc.weight.normal_(0.0, 0.05)  # ImageNet-like logit spread
        head.fc.bias.normal_(0.0, 0.1)
    a = _activations(2, 7, 2048)
    return head, _linear(head.fc), resnet_head, a


def _nhwc(a):
    return jnp.asarray(a.numpy().transpose(0, 2, 3, 1))


def _target(head, a):
    with torch.no_grad():
        return int(head(a).argmax())


# ---------------------------------------------------------------------------
# LRP-CAM
# ---------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("net", ["vgg", "resnet"])
def test_lrp_cam_matches_captum(net, request):
    head, params, jhead, a = request.getfixturevalue(net)
    t = _target(head, a)
    rel = captum_attr.LRP(head).attribute(a.clone().requires_grad_(True), target=t)
    expected = rel.detach().sum(dim=(2, 3))[0].numpy()
    phi, logits = jax.jit(lambda p, x: lrp_cam_coefficients(jhead, p, x, jnp.array([t])))(params, _nhwc(a))
    phi = np.asarray(phi[0])
    with torch.no_grad():
        np.testing.assert_allclose(np.asarray(logits[0]), head(a)[0].numpy(), rtol=1e-4, atol=1e-4)
    scale = np.max(np.abs(expected))
    rel_err = np.max(np.abs(phi - expected)) / scale
    print(f"\n{net}: LRP-CAM max |phi - captum| / max |captum| = {rel_err:.2e}")
    assert rel_err <= 1e-4


class _ConvHead(torch.nn.Module):
    """conv -> batch norm -> ReLU -> max-pool -> conv -> ReLU -> adaptive avg-pool -> flatten -> linear."""

    def __init__(self, k=16):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(k, 12, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(12)
        self.relu1 = torch.nn.ReLU()
        self.pool = torch.nn.MaxPool2d(2)
        self.conv2 = torch.nn.Conv2d(12, 10, 3, padding=1)
        self.relu2 = torch.nn.ReLU()
        self.avgpool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(10, 7)

    def forward(self, a):
        h = self.pool(self.relu1(self.bn(self.conv1(a))))
        h = self.avgpool(self.relu2(self.conv2(h)))
        return self.fc(torch.flatten(h, 1))


def conv_head(params, a):
    def conv(x, p):
        y = jax.lax.conv_general_dilated(x, p["w"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + p["b"]

    bn = params["bn"]
    h = conv(a, params["conv1"])
    h = (h - bn["mean"]) * (bn["scale"] / jnp.sqrt(bn["var"] + 1e-5)) + bn["bias"]
    h = fnn.max_pool(jax.nn.relu(h), (2, 2), strides=(2, 2))
    h = jnp.mean(jax.nn.relu(conv(h, params["conv2"])), axis=(1, 2))
    return h @ params["fc"]["w"] + params["fc"]["b"]


@pytest.mark.parametrize("seed", [0, 1])
def test_lrp_cam_matches_captum_on_a_conv_bn_head(seed):
    """Convolutions, batch norm (random statistics) and biases: Captum's per-module epsilon
    rule vs this module's per-equation one (conv + bias add; BN as sub, mul, add)."""
    torch.manual_seed(seed)
    head = _ConvHead().eval()
    with torch.no_grad():
        for m in (head.conv1, head.conv2, head.fc):
            m.bias.normal_(0.0, 0.1)
        head.bn.running_mean.normal_(0.0, 0.2)
        head.bn.running_var.uniform_(0.5, 1.5)
        head.bn.weight.normal_(1.0, 0.2)
        head.bn.bias.normal_(0.0, 0.1)
    conv = lambda m: {"w": jnp.asarray(m.weight.detach().numpy().transpose(2, 3, 1, 0)),
                      "b": jnp.asarray(m.bias.detach().numpy())}
    params = {
        "conv1": conv(head.conv1), "conv2": conv(head.conv2), "fc": _linear(head.fc),
        "bn": {k: jnp.asarray(getattr(head.bn, n).detach().numpy()) for k, n in
               (("mean", "running_mean"), ("var", "running_var"), ("scale", "weight"), ("bias", "bias"))},
    }
    a = _activations(10 + seed, 8, 16)
    t = _target(head, a)
    rel = captum_attr.LRP(head).attribute(a.clone().requires_grad_(True), target=t)
    expected = rel.detach().sum(dim=(2, 3))[0].numpy()
    phi, logits = jax.jit(lambda p, x: lrp_cam_coefficients(conv_head, p, x, jnp.array([t])))(params, _nhwc(a))
    with torch.no_grad():
        np.testing.assert_allclose(np.asarray(logits[0]), head(a)[0].numpy(), rtol=1e-4, atol=1e-5)
    rel_err = np.max(np.abs(np.asarray(phi[0]) - expected)) / np.max(np.abs(expected))
    print(f"\nconv/BN head (seed {seed}): LRP-CAM max |phi - captum| / max |captum| = {rel_err:.2e}")
    assert rel_err <= 1e-4


# ---------------------------------------------------------------------------
# LIME-CAM
# ---------------------------------------------------------------------------

def _captum_lime(head, a, target, seed, masks=None):
    """Captum's Lime as in the LIFT-CAM authors' code: one feature per channel,
    n_samples = K, Bernoulli(0.5), baseline 0, cosine exp kernel, SkLearnLasso(0.01)."""
    from captum._utils.models.linear_model import SkLearnLasso
    from captum.attr._core.lime import get_exp_kernel_similarity_function

    k = a.shape[1]
    kwargs = {}
    if masks is not None:
        def given(original_inp, **_):
            for m in masks:
                yield torch.as_tensor(np.asarray(m, np.int64))[None]

        kwargs["perturb_func"] = given
    torch.manual_seed(seed)
    lime = captum_attr.Lime(head, interpretable_model=SkLearnLasso(alpha=0.01),
                            similarity_func=get_exp_kernel_similarity_function("cosine", 1.0), **kwargs)
    feature_mask = torch.arange(k).view(1, k, 1, 1).expand_as(a).contiguous()
    with torch.no_grad():
        attr = lime.attribute(a, target=target, baselines=0.0, feature_mask=feature_mask, n_samples=k,
                              perturbations_per_eval=64)
    return attr[0, :, 0, 0].numpy()


def _lime_jax(jhead, params, a, target):
    return jax.jit(lambda p, x, key: lime_cam_coefficients(jhead, p, x, jnp.array([target]), key))


@pytest.mark.slow
@pytest.mark.parametrize("net", ["vgg", "resnet"])
def test_lime_cam_same_masks_matches_captum(net, request):
    head, params, jhead, a = request.getfixturevalue(net)
    t = _target(head, a)
    k = a.shape[1]
    key = jax.random.PRNGKey(0)
    phi, fit = _lime_jax(jhead, params, a, t)(params, _nhwc(a), key)
    phi = np.asarray(phi[0])
    masks = np.asarray(jax.random.bernoulli(key, 0.5, (k, k)))  # the masks lime_cam_coefficients draws
    expected = _captum_lime(head, a, t, 0, masks)
    r = np.corrcoef(phi, expected)[0, 1]
    err = np.max(np.abs(phi - expected)) / np.max(np.abs(expected))
    print(f"\n{net}: same masks: Pearson {r:.8f}, max |diff| / max |captum| {err:.1e}, "
          f"non-zero {np.sum(phi != 0)} vs {np.sum(expected != 0)} of {k}, relative gap {float(fit.gap[0]):.1e}")
    assert np.sum(expected != 0) > 10
    assert r >= 0.9999
    assert err <= 1e-3  # sklearn stops at a relative duality gap of 1e-4, this solver at 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("net", ["vgg", "resnet"])
def test_lime_cam_correlates_with_captum_across_seeds(net, request):
    head, params, jhead, a = request.getfixturevalue(net)
    t = _target(head, a)
    run = _lime_jax(jhead, params, a, t)
    ours = [np.asarray(run(params, _nhwc(a), jax.random.PRNGKey(100 + s))[0][0]) for s in range(2)]
    theirs = [_captum_lime(head, a, t, 200)]  # one Captum run: a Python loop over K samples, ~1 min for K = 2048
    cross = [np.corrcoef(o, c)[0, 1] for o in ours for c in theirs]
    ours_self = np.corrcoef(ours[0], ours[1])[0, 1]
    print(f"\n{net}: Pearson lime-cam vs Captum {np.mean(cross):.3f} (pairs {np.round(cross, 3)}), "
          f"lime-cam vs lime-cam {ours_self:.3f}")
    assert np.mean(cross) >= 0.9
