"""CAM baselines against pytorch-grad-cam 1.5.7 on identical random weights.

A random-weight torchvision VGG16 and ResNet-50 (the shared ``torchvision_pair``
randomisation of ``conftest.py``: random biases and BN statistics; plus
non-in-place ReLUs, and the last layer rescaled to logits of standard deviation
8) are converted to the zoo's Flax models; both sides explain the same images for
the same (mixed) targets. Normalised maps must agree within 1e-3.

Documented deliberate differences (see the method docstrings):

* pytorch-grad-cam min-max normalises the map, resizes it, and normalises again
  (with +1e-7 guards); the library normalises once after upsampling. Both are
  the same map up to the guards.
* Eigen-CAM: the singular vector's sign. pytorch-grad-cam keeps numpy's; the
  library orients it so that ``sum_k v_k >= 0``. When the two disagree the
  reference is compared with the opposite orientation of our projection.
* Score-CAM: pytorch-grad-cam upsamples activation maps with
  ``torch.nn.UpsamplingBilinear2d`` (``align_corners=True``); the library's one
  upsampling uses half-pixel centres. The reference runs with that one class
  swapped for ``torch.nn.Upsample(mode="bilinear", align_corners=False)``.

Cost control (2 CPU cores): gradient methods and Eigen-CAM at 224x224 with a
batch of 2; Score-CAM (one full forward per channel) at 64x64, batch 1, split
after the first pooling (64 channels); Ablation-CAM at 224x224, batch 1, at the
default split, with the reference given the split activations directly (a
``Tail`` module whose target layer is an identity in front of the rest of the
network: pytorch-grad-cam's own ablation code runs unchanged, it just does not
recompute the layers before the split for every ablated channel). ResNet-50
ablates all 2048 channels; VGG16 (a 120M multiply-add head) the 128 channels
pytorch-grad-cam itself picks with ``ratio_channels_to_ablate=0.125``, passed
to the library's ``channels`` option.
"""
import numpy as np
import pytest

REASON = "parity tier needs the PyTorch reference stack (pip install torch==2.14.1 torchvision==0.29.1 timm captum grad-cam)"
torch = pytest.importorskip("torch", reason=REASON)
torchvision = pytest.importorskip("torchvision", reason=REASON)
pgc = pytest.importorskip("pytorch_grad_cam", reason=REASON)

import jax.numpy as jnp  # noqa: E402

import liftcam_jax as lj  # noqa: E402
import models  # noqa: E402
from liftcam_jax.explanation import Attribution, from_attribution, normalize  # noqa: E402
from pytorch_grad_cam.ablation_layer import AblationLayer  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputReST, ClassifierOutputTarget  # noqa: E402
from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection  # noqa: E402
from conftest import cli_maps  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

TOL = 1e-3
GRADIENT_METHODS = {
    "grad-cam": pgc.GradCAM,
    "grad-cam++": pgc.GradCAMPlusPlus,
    "xgrad-cam": pgc.XGradCAM,
    "layer-cam": pgc.LayerCAM,
    "hires-cam": pgc.HiResCAM,
    "eigen-cam": pgc.EigenCAM,
}


class Tail(torch.nn.Module):
    """``rest(anchor(a))``: the network after the split, fed the split activations."""

    def __init__(self, rest):
        super().__init__()
        self.anchor = torch.nn.Identity()
        self.rest = rest

    def forward(self, a):
        return self.rest(self.anchor(a))


class Pair:
    """The same random network in PyTorch and in the Flax zoo (the shared ``torchvision_pair``
    randomisation), with non-in-place ReLUs (hooks then see the activations, not a tensor
    rewritten in place) and the last layer rescaled so the logits have standard deviation
    about 8 (Score-CAM's softmax over channels is then far from uniform)."""

    def __init__(self, name, torchvision_pair):
        tm, _ = torchvision_pair(name)
        for m in tm.modules():
            if isinstance(m, torch.nn.ReLU):
                m.inplace = False
        with torch.no_grad():
            if name == "vgg16":
                last = tm.classifier[6]
                self.layer = tm.features[29]  # conv5_3's ReLU = the zoo's default split
                self.front = tm.features[:30]
                self.rest = torch.nn.Sequential(tm.features[30], tm.avgpool, torch.nn.Flatten(1), tm.classifier)
                self.score_layer, self.score_split = tm.features[4], "pool1"
            else:
                last = tm.fc
                self.layer = tm.layer4
                self.front = torch.nn.Sequential(tm.conv1, tm.bn1, tm.relu, tm.maxpool,
                                                 tm.layer1, tm.layer2, tm.layer3, tm.layer4)
                self.rest = torch.nn.Sequential(tm.avgpool, torch.nn.Flatten(1), tm.fc)
                self.score_layer, self.score_split = tm.maxpool, "maxpool"
            scale = 8.0 / float(tm(to_torch(images(2, 64, seed=9))).std())
            last.weight.mul_(scale)
            last.bias.mul_(scale)
        self.torch = tm
        self.flax = models.get(name)
        self.params = models.convert.from_torch({k: v.numpy() for k, v in tm.state_dict().items()}, self.flax)
        self.split = self.flax.split()

    def logits(self, x):
        with torch.no_grad():
            return self.torch(to_torch(x)).numpy()


def to_torch(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def images(batch, size, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, size, size, 3)).astype(np.float32)


def mixed_targets(logits):
    """Image 0: its top class; image 1: its second class (each image its own target)."""
    order = np.argsort(logits, axis=1)
    return [int(order[i, -1 - (i % 2)]) for i in range(logits.shape[0])]


def reference(cam_class, model, layer, x, targets, target_class=ClassifierOutputTarget, **kwargs):
    with cam_class(model=model, target_layers=[layer], **kwargs) as cam:
        return cam(input_tensor=x, targets=[target_class(t) for t in targets])


@pytest.fixture(scope="module", params=["vgg16", "resnet50"])
def pair(request, torchvision_pair):
    return Pair(request.param, torchvision_pair)


@pytest.fixture(scope="module")
def batch224(pair):
    x = images(2, 224)
    logits = pair.logits(x)
    ours = np.asarray(pair.split(pair.params, jnp.asarray(x)))
    np.testing.assert_allclose(ours, logits, atol=1e-3 * max(1.0, np.abs(logits).max()))
    return x, mixed_targets(logits)


@pytest.mark.parametrize("method", list(GRADIENT_METHODS))
def test_gradient_methods_and_eigen_cam(pair, batch224, method):
    x, targets = batch224
    ref = reference(GRADIENT_METHODS[method], pair.torch, pair.layer, to_torch(x), targets)
    assert np.all(ref.max(axis=(1, 2)) > 0.99), "degenerate reference map: the comparison would prove nothing"
    e = lj.explain(pair.split, pair.params, jnp.asarray(x), jnp.asarray(targets), method=method)
    maps = np.asarray(e.maps)
    if method == "eigen-cam":
        # orient our projection like numpy's singular vector (the documented sign difference)
        with torch.no_grad():
            acts = pair.front(to_torch(x)).numpy()
        theirs = get_2d_projection(acts)
        a = pair.split.features(pair.params, jnp.asarray(x))
        att = lj.methods.get("eigen-cam").fn(pair.split, pair.params, x, a, None, None)
        proj = np.asarray(jnp.einsum("bhwk,bk->bhw", a, att.weights) + att.bias[:, None, None])
        np.testing.assert_allclose(np.abs(proj), np.abs(theirs), rtol=1e-3, atol=1e-3 * np.abs(theirs).max())
        flip = np.sign(np.sum(proj * theirs, axis=(1, 2)))
        print(f"\neigen-cam {pair.flax.name}: numpy sign vs ours per image {flip}")
        if np.any(flip < 0):
            flipped = Attribution(att.weights * flip[:, None], bias=att.bias * flip)
            maps = np.asarray(from_attribution(a, flipped, x.shape[1:3], e.logits, e.targets).maps)
    err = np.abs(maps - ref).max()
    print(f"\nparity {pair.flax.name} {method}: max abs error {err:.2e}")
    assert err < TOL, f"{method}: max abs error {err:.2e}"


def test_shapley_cam_rest(pair, batch224):
    """ShapleyCAM with pytorch-grad-cam's ReST target (logit minus cross-entropy): ``score="rest"``.
    The zoo's heads are piecewise linear, so the Hessian term is the log-sum-exp's alone. (With the
    logit the term is zero and ShapleyCAM is Grad-CAM, tested above; about 20 s per model here, so
    the logit score is tested on the tiny net of test_shapley_cam_parity.py only.)"""
    x, targets = batch224
    ref = reference(pgc.ShapleyCAM, pair.torch, pair.layer, to_torch(x), targets, ClassifierOutputReST)
    assert np.all(ref.max(axis=(1, 2)) > 0.99)
    e = lj.explain(pair.split, pair.params, jnp.asarray(x), jnp.asarray(targets), method="shapley-cam", score="rest")
    err = np.abs(np.asarray(e.maps) - ref).max()
    print(f"\nparity {pair.flax.name} shapley-cam score=rest: max abs error {err:.2e}")
    assert err < TOL, f"shapley-cam rest: max abs error {err:.2e}"


@pytest.mark.parametrize("score", ["logit", "rest"])
def test_cli_shapley_cam_is_pytorch_grad_cams(pair, batch224, score, tmp_path):
    """``liftcam-jax explain X.npy --model resnet50|vgg16 --weights W --method shapley-cam
    [--score rest]``: the predicted class (pytorch-grad-cam's default target), its ShapleyCAM with
    ``ClassifierOutputTarget`` / ``ClassifierOutputReST`` on the same weights (a torchvision
    state dict file), map by map."""
    x, _ = batch224
    targets = [int(t) for t in pair.logits(x).argmax(1)]
    target_class = ClassifierOutputReST if score == "rest" else ClassifierOutputTarget
    ref = reference(pgc.ShapleyCAM, pair.torch, pair.layer, to_torch(x), targets, target_class)
    assert np.all(ref.max(axis=(1, 2)) > 0.99)
    weights = tmp_path / f"{pair.flax.name}.pth"
    torch.save(pair.torch.state_dict(), weights)
    got = cli_maps(tmp_path, x, pair.flax.name, weights, "--method", "shapley-cam", "--score", score)
    for i, (target, m) in enumerate(got):
        assert target == targets[i]
        err = np.abs(m - ref[i]).max()
        print(f"\nCLI {pair.flax.name} shapley-cam --score {score}, image {i}: max abs error {err:.2e}")
        assert err < 1e-3


@pytest.fixture(scope="module")
def half_pixel_score_cam():
    """pytorch-grad-cam's ScoreCAM with half-pixel upsampling (the one documented difference)."""
    import pytorch_grad_cam.score_cam as sc

    class HalfPixel(torch.nn.Upsample):
        def __init__(self, size):
            super().__init__(size=size, mode="bilinear", align_corners=False)

    class Namespace:
        def __getattr__(self, name):
            return HalfPixel if name == "UpsamplingBilinear2d" else getattr(torch.nn, name)

    class Torch:
        nn = Namespace()

        def __getattr__(self, name):
            return getattr(torch, name)

    saved = sc.torch
    sc.torch = Torch()
    try:
        yield pgc.ScoreCAM
    finally:
        sc.torch = saved


def test_score_cam(pair, half_pixel_score_cam):
    x = images(1, 64, seed=1)
    targets = mixed_targets(pair.logits(x))
    split = pair.flax.split(pair.score_split)
    ref = reference(half_pixel_score_cam, pair.torch, pair.score_layer, to_torch(x), targets)
    e = lj.explain(split, pair.params, jnp.asarray(x), jnp.asarray(targets), method="score-cam", chunk_size=16)
    assert ref.max() > 0.99
    # the scores matter: with uniform weights the map would be far from the reference
    a = split.features(pair.params, jnp.asarray(x))
    uniform = from_attribution(a, Attribution(jnp.ones_like(e.coefficients)), x.shape[1:3], e.logits, e.targets)
    gap = np.abs(np.asarray(uniform.maps) - ref).max()
    print(f"\nscore-cam {pair.flax.name}: uniform weights would be off by {gap:.2e}")
    assert gap > 20 * TOL, "the softmax weights would not be tested"
    err = np.abs(np.asarray(e.maps) - ref).max()
    print(f"\nparity {pair.flax.name} score-cam: max abs error {err:.2e}")
    assert err < TOL, f"score-cam: max abs error {err:.2e}"


def test_ablation_cam(pair):
    x = images(1, 224, seed=2)
    targets = mixed_targets(pair.logits(x))
    with torch.no_grad():
        acts = pair.front(to_torch(x))
    tail = Tail(pair.rest).eval()
    options = {}
    if pair.flax.name == "vgg16":
        # VGG16's head is 120M multiply-adds: ablate the channels pytorch-grad-cam picks with
        # ratio_channels_to_ablate=0.125 (64 highest- and 64 lowest-scoring of 512) on both sides;
        # the others get weight (y - y)/y = 0 there and 0 here.
        ratio = 0.125
        channels = AblationLayer().activations_to_be_ablated(acts[0].numpy(), ratio)
        assert len(set(channels.tolist())) == 128
        options = {"channels": channels}
    else:
        ratio = 1.0
    ref = reference(pgc.AblationCAM, tail, tail.anchor, acts, targets, batch_size=8,
                    ratio_channels_to_ablate=ratio)  # (1, h, w)
    e = lj.explain(pair.split, pair.params, jnp.asarray(x), jnp.asarray(targets), method="ablation-cam",
                   **options)
    assert ref.max() > 0.99
    ours = np.asarray(normalize(e.raw))  # the reference was made at feature resolution
    err = np.abs(ours - ref).max()
    print(f"\nparity {pair.flax.name} ablation-cam: max abs error {err:.2e}")
    assert err < TOL, f"ablation-cam: max abs error {err:.2e}"
