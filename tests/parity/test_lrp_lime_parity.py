"""Parity of LRP-CAM (and LIME-CAM) with Captum on torchvision VGG16 and ResNet-50 heads.

The heads are the LIFT-CAM authors' splits: VGG16 after the last conv ReLU
(``features.29``; head = max-pool -> adaptive avg-pool -> flatten -> classifier)
and ResNet-50 after ``layer4`` (head = avg-pool -> flatten -> fc). Weights are
torchvision's random initialisation with random biases; the activations are
random non-negative maps with log-normal channel scales (like real post-ReLU
maps, a few channels dominate). The same weights drive a pure JAX head.
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
