"""aug_smooth, eigen_smooth and layer fusion against pytorch-grad-cam 1.5.7 (the tiny net of ``tiny_net.py``).

Two 32x32 images with mixed targets, identical random weights, the gradient methods that
pytorch-grad-cam and the library share (and Eigen-CAM for aug_smooth, its reference oriented
like the library's projection). Maps must agree within 1e-3:

* aug_smooth: pytorch-grad-cam's six ttach passes (flip x 0.9/1/1.1), maps flipped back and
  averaged without renormalisation;
* eigen_smooth: the projection on the first principal component of the weighted activations,
  up to its sign (per image, the reference must equal our map or the map of the opposite
  orientation; which one is printed);
* fusion: target layers ``block1`` (16x16x8) and ``block2`` (8x8x16), pytorch-grad-cam's
  mean aggregation; also with aug_smooth. (pytorch-grad-cam 1.5.7's ShapleyCAM cannot take
  several target layers: its first Hessian-vector product frees the graph the second needs.)
"""
import numpy as np
import pytest

REASON = "parity tier needs the PyTorch reference stack (pip install torch torchvision timm captum grad-cam)"
torch = pytest.importorskip("torch", reason=REASON)
pgc = pytest.importorskip("pytorch_grad_cam", reason=REASON)

import jax.numpy as jnp  # noqa: E402

import liftcam_jax as lj  # noqa: E402
import tiny_net  # noqa: E402
from liftcam_jax.explanation import Attribution, from_attribution  # noqa: E402
from liftcam_jax.smoothing import eigen_smoothed, explain_smoothed  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

TOL = 1e-3
METHODS = {
    "grad-cam": pgc.GradCAM,
    "grad-cam++": pgc.GradCAMPlusPlus,
    "xgrad-cam": pgc.XGradCAM,
    "layer-cam": pgc.LayerCAM,
    "hires-cam": pgc.HiResCAM,
    "shapley-cam": pgc.ShapleyCAM,
}


@pytest.fixture(scope="module")
def setup():
    net, params = tiny_net.make("tanh", seed=4)
    x = tiny_net.images(2, 32, seed=5)
    with torch.no_grad():
        logits = net(tiny_net.to_torch(x)).numpy()
    return net, params, x, tiny_net.mixed_targets(logits)


def reference(cam_class, net, layers, x, targets, **flags):
    with cam_class(model=net, target_layers=[net[tiny_net.STAGES.index(n)] for n in layers]) as cam:
        out = cam(input_tensor=tiny_net.to_torch(x), targets=[ClassifierOutputTarget(t) for t in targets], **flags)
    assert np.all(out.max(axis=(1, 2)) > 0.5), "degenerate reference map"
    return out


@pytest.fixture
def oriented_eigen_cam(monkeypatch):
    """pytorch-grad-cam's EigenCAM with each projection oriented as the library's (the one documented
    difference, see test_cams_parity): flipped where it correlates negatively with the centred channel
    sum, which is where numpy's singular vector has ``sum_k v_k < 0``."""
    import pytorch_grad_cam.eigen_cam as ec

    real = ec.get_2d_projection

    def oriented(acts):
        proj = real(acts)
        total = acts.sum(axis=1)
        total = total - total.mean(axis=(1, 2), keepdims=True)
        return proj * np.where(np.sum(proj * total, axis=(1, 2)) < 0, -1.0, 1.0)[:, None, None].astype(proj.dtype)

    monkeypatch.setattr(ec, "get_2d_projection", oriented)
    return pgc.EigenCAM


@pytest.mark.parametrize("method", list(METHODS) + ["eigen-cam"])
def test_aug_smooth(setup, method, oriented_eigen_cam):
    net, params, x, targets = setup
    cls = oriented_eigen_cam if method == "eigen-cam" else METHODS[method]
    ref = reference(cls, net, ["block2"], x, targets, aug_smooth=True)
    e = explain_smoothed(tiny_net.split("block2"), params, jnp.asarray(x), jnp.asarray(targets), method=method,
                         aug_smooth=True)
    err = np.abs(np.asarray(e.maps) - ref).max()
    plain = lj.explain(tiny_net.split("block2"), params, jnp.asarray(x), jnp.asarray(targets), method=method)
    gap = np.abs(np.asarray(plain.maps) - ref).max()
    print(f"\naug_smooth {method}: max abs error {err:.2e} (unsmoothed map off by {gap:.2e})", end="")
    assert gap > 20 * TOL, "the augmentations would not be tested"
    assert err < TOL


@pytest.mark.parametrize("method", list(METHODS))
def test_eigen_smooth(setup, method):
    net, params, x, targets = setup
    ref = reference(METHODS[method], net, ["block2"], x, targets, eigen_smooth=True)
    split = tiny_net.split("block2")
    xj, tj = jnp.asarray(x), jnp.asarray(targets)
    e = lj.explain(split, params, xj, tj, method=eigen_smoothed(method))
    a = split.features(params, xj)
    att = eigen_smoothed(method).fn(split, params, xj, a, tj, e.logits)
    flipped = from_attribution(a, Attribution(-att.weights, bias=-att.bias), x.shape[1:3], e.logits, e.targets)
    errs = [np.abs(np.asarray(m) - ref).max(axis=(1, 2)) for m in (e.maps, flipped.maps)]
    plain = lj.explain(split, params, xj, tj, method=method)
    gap = np.abs(np.asarray(plain.maps) - ref).max()
    print(f"\neigen_smooth {method}: max abs error {np.minimum(*errs).max():.2e}, numpy's sign "
          f"{['ours' if a_ <= b_ else 'opposite' for a_, b_ in zip(*errs)]} (unsmoothed off by {gap:.2e})", end="")
    assert gap > 20 * TOL, "the projection would not be tested"
    assert np.minimum(*errs).max() < TOL


@pytest.mark.parametrize("method,aug", [("grad-cam", False), ("layer-cam", False), ("grad-cam++", False),
                                        ("grad-cam", True)])
def test_layer_fusion(setup, method, aug):
    net, params, x, targets = setup
    ref = reference(METHODS[method], net, ["block1", "block2"], x, targets, aug_smooth=aug)
    splits = [tiny_net.split("block1"), tiny_net.split("block2")]
    e = explain_smoothed(splits, params, jnp.asarray(x), jnp.asarray(targets), method=method, aug_smooth=aug)
    err = np.abs(np.asarray(e.maps) - ref).max()
    one = explain_smoothed(splits[1:], params, jnp.asarray(x), jnp.asarray(targets), method=method, aug_smooth=aug)
    gap = np.abs(np.asarray(one.maps) - ref).max()
    print(f"\nfusion block1+block2 {method}{' aug_smooth' if aug else ''}: max abs error {err:.2e} "
          f"(block2 alone off by {gap:.2e})", end="")
    assert gap > 20 * TOL, "the fusion would not be tested"
    assert err < TOL
