"""ShapleyCAM against pytorch-grad-cam 1.5.7 on identical random weights (the tiny net of ``tiny_net.py``).

Both heads (``linear``: GAP + Linear, piecewise linear; ``tanh``: GAP, Linear, tanh,
Linear, smooth) and both scores (the logit, ``ClassifierOutputTarget``; ReST,
``ClassifierOutputReST``: the logit minus the cross-entropy), two images with mixed
targets, 32x32 inputs, split after ``block2`` (8x8x16) and after ``block1`` (16x16x8:
the Hessian then also runs through a conv, BN and ReLU stage).

Compared: the normalised maps (max abs error < 1e-3), and the Hessian term
``-1/2 H A`` itself (relative error < 1e-4): pytorch-grad-cam's ``hvp`` is caught by
wrapping the ``torch.autograd.grad`` its ``shapley_cam`` module calls. The linear
head with the logit has no Hessian term (asserted zero on both sides); every other case
must have one large enough to matter, so a wrong Hessian term cannot pass.
"""
import numpy as np
import pytest

REASON = "parity tier needs the PyTorch reference stack (pip install torch torchvision timm captum grad-cam)"
torch = pytest.importorskip("torch", reason=REASON)
pgc = pytest.importorskip("pytorch_grad_cam", reason=REASON)

import jax.numpy as jnp  # noqa: E402

import liftcam_jax as lj  # noqa: E402
import tiny_net  # noqa: E402
from liftcam_jax.methods.shapley_cam import shapley_terms  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputReST, ClassifierOutputTarget  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

TARGETS = {"logit": ClassifierOutputTarget, "rest": ClassifierOutputReST}


@pytest.fixture
def captured_hvp(monkeypatch):
    """pytorch-grad-cam's ShapleyCAM with every Hessian-vector product it computes recorded."""
    import pytorch_grad_cam.shapley_cam as sc

    seen = []
    real = torch.autograd.grad

    class Autograd:
        @staticmethod
        def grad(*args, **kwargs):
            out = real(*args, **kwargs)
            seen.append(None if out[0] is None else out[0].detach().numpy().copy())
            return out

    class Torch:
        autograd = Autograd()

        def __getattr__(self, name):
            return getattr(torch, name)

    monkeypatch.setattr(sc, "torch", Torch())
    return seen


@pytest.mark.parametrize("layer", ["block2", "block1"])
@pytest.mark.parametrize("score", ["logit", "rest"])
@pytest.mark.parametrize("head", ["linear", "tanh"])
def test_shapley_cam_parity(head, score, layer, captured_hvp):
    net, params = tiny_net.make(head)
    split = tiny_net.split(layer)
    x = tiny_net.images(2, 32, seed=3)
    with torch.no_grad():
        logits = net(tiny_net.to_torch(x)).numpy()
    targets = tiny_net.mixed_targets(logits)
    np.testing.assert_allclose(np.asarray(split(params, jnp.asarray(x))), logits, atol=1e-4)

    with pgc.ShapleyCAM(model=net, target_layers=[net[tiny_net.STAGES.index(layer)]]) as cam:
        ref = cam(input_tensor=tiny_net.to_torch(x), targets=[TARGETS[score](t) for t in targets])
    assert np.all(ref.max(axis=(1, 2)) > 0.99), "degenerate reference map"
    e = lj.explain(split, params, jnp.asarray(x), jnp.asarray(targets), method="shapley-cam", score=score)
    err = np.abs(np.asarray(e.maps) - ref).max()

    a = split.features(params, jnp.asarray(x))
    _, hvp = shapley_terms(split.head, params, a, lj.targets.SCORES[score](jnp.asarray(targets)))
    ours = -0.5 * np.asarray(hvp)
    (theirs,) = captured_hvp
    theirs = np.zeros_like(ours) if theirs is None else -0.5 * theirs.transpose(0, 2, 3, 1)
    g, _ = shapley_terms(split.head, params, a, lj.targets.SCORES[score](jnp.asarray(targets)))
    size = np.abs(theirs).max() / np.abs(np.asarray(g)).max()
    print(f"\nshapley-cam {head} head, {score}, {layer}: maps max abs error {err:.2e}; "
          f"|1/2 H A| / |g| = {size:.2e}", end="")
    assert err < 1e-3
    if head == "linear" and score == "logit":
        assert np.abs(ours).max() == 0.0 and np.abs(theirs).max() == 0.0
        return
    assert size > 1e-2, "the Hessian term is too small for this test to prove anything"
    rel = np.abs(ours - theirs).max() / np.abs(theirs).max()
    print(f"; -1/2 H A relative error {rel:.2e}", end="")
    assert rel < 1e-4
