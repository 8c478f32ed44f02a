"""LIFT-CAM against the authors' method: Captum's DeepLift on the same head, zero baseline.

The authors' code (Jung & Oh, ICCV 2021) runs Captum's ``DeepLift`` on the
part of the network after the target layer with an all-zero baseline, sums the
attributions over positions (phi_k), forms ReLU(sum_k phi_k A^k), upsamples
bilinearly (align_corners=False) and min-max normalises. Here it runs on
torchvision VGG16 and ResNet-50 with random weights and random biases, and
liftcam-jax runs on the same weights converted by ``models.convert``.
Relative error = max|ours - theirs| / max|theirs|, per tensor.
"""
import numpy as np
import pytest

from conftest import REASON, relative_error as _rel

torch = pytest.importorskip("torch", reason=REASON)
captum_attr = pytest.importorskip("captum.attr", reason=REASON)

import jax.numpy as jnp  # noqa: E402

import liftcam_jax as lj  # noqa: E402
import models  # noqa: E402

TOL = 1e-4


def _no_inplace(module):
    """Captum's hooks need out-of-place ReLUs (torchvision's are in place)."""
    for name, child in module.named_children():
        if isinstance(child, torch.nn.ReLU):
            setattr(module, name, torch.nn.ReLU(inplace=False))
        else:
            _no_inplace(child)
    return module


def _split(net, name):
    """The torch model's (features, head) at the authors' split."""
    _no_inplace(net)
    if name.startswith("vgg"):
        features = net.features[:30]  # up to the ReLU of conv5_3
        head = torch.nn.Sequential(net.features[30], net.avgpool, torch.nn.Flatten(), net.classifier)
    else:
        features = torch.nn.Sequential(*list(net.children())[:-2])  # up to layer4
        head = torch.nn.Sequential(net.avgpool, torch.nn.Flatten(), net.fc)
    return features.eval(), head.eval()


def _authors_lift_cam(features, head, x, targets):
    with torch.no_grad():
        a = features(x)
    attr = captum_attr.DeepLift(head).attribute(a, baselines=torch.zeros_like(a), target=targets)
    phi = attr.sum(dim=(2, 3)).detach()
    raw = torch.relu((phi[:, :, None, None] * a).sum(1))
    up = torch.nn.functional.interpolate(raw[:, None], size=x.shape[2:], mode="bilinear", align_corners=False)[:, 0]
    lo = up.flatten(1).min(1)[0][:, None, None]
    hi = up.flatten(1).max(1)[0][:, None, None]
    maps = (up - lo) / (hi - lo)
    return phi.numpy(), raw.numpy(), maps.numpy()


@pytest.mark.parametrize("name", ["vgg16", "resnet50"])
def test_lift_cam_matches_captum_deeplift(name, torchvision_pair):
    net, params = torchvision_pair(name)
    features, head = _split(net, name)
    split = models.get(name).split()
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 3, 224, 224)).astype(np.float32)
    xj = jnp.asarray(x.transpose(0, 2, 3, 1))
    with torch.no_grad():
        predicted = head(features(torch.from_numpy(x))).argmax(1).tolist()
    compared = 0
    for targets in ([7, 912], predicted):  # each image its own target
        phi_t, raw_t, maps_t = _authors_lift_cam(features, head, torch.from_numpy(x), targets)
        e = lj.explain(split, params, xj, jnp.array(targets))
        errs = {"coefficients": _rel(e.coefficients, phi_t), "raw": _rel(e.raw, raw_t)}
        # Deliberate difference: where ReLU leaves nothing (an all-zero raw map) the
        # authors' min-max divides 0 by 0 (NaN); liftcam-jax returns an all-zero map.
        flat = np.isnan(maps_t).reshape(len(targets), -1).any(1)
        for i in np.flatnonzero(flat):
            assert np.all(raw_t[i] == 0) and np.all(np.asarray(e.maps[i]) == 0)
        keep = np.flatnonzero(~flat)
        compared += len(keep)
        if len(keep):
            errs["maps"] = _rel(np.asarray(e.maps)[keep], maps_t[keep])
        print(f"\n{name} LIFT-CAM vs Captum DeepLift, targets {targets}, relative errors: "
              + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
        assert all(v <= TOL for v in errs.values()), errs
    assert compared >= 2
