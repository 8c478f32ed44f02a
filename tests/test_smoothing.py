"""Smoothing and fusion (liftcam_jax.smoothing) against numpy references and by their properties.

* eigen_smooth: numpy's SVD of the centred weighted activations, the documented orientation
  (positive correlation with the un-smoothed weighted sum), channel and per-position weights;
* aug_smooth: the one ``6 B`` batch equals six separate explanations, flipped back with numpy and
  averaged; the identity augmentation alone is the plain explanation; per-augmentation layouts;
* fusion: ``normalize(mean_l upsample(normalize(raw_l)))`` (and ``max``) from separate per-layer
  explanations; one split is the plain explanation; jit; usage errors.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import liftcam_jax as lj
from liftcam_jax.errors import UsageError
from liftcam_jax.explanation import normalize, upsample
from liftcam_jax.model import Split
from liftcam_jax.smoothing import AUGMENTATIONS, eigen_smoothed, explain_smoothed

SIZE = 16


def _conv(x, w, stride):
    return jax.lax.conv_general_dilated(x, w, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _stage1(p, x):
    return jax.nn.relu(_conv(x, p["c1"], 2))  # 8x8x6


def _stage2(p, a):
    return jax.nn.relu(_conv(a, p["c2"], 2))  # 4x4x10


def _head(p, a):
    return jnp.tanh(jnp.mean(a, axis=(1, 2)) @ p["w1"]) @ p["w2"]


SPLITS = {
    "s1": Split(_stage1, lambda p, a: _head(p, _stage2(p, a))),
    "s2": Split(lambda p, x: _stage2(p, _stage1(p, x)), _head),
}


@pytest.fixture(scope="module")
def model():
    rng = np.random.default_rng(0)
    params = {"c1": rng.standard_normal((3, 3, 3, 6)) * 0.5, "c2": rng.standard_normal((3, 3, 6, 10)) * 0.3,
              "w1": rng.standard_normal((10, 8)), "w2": rng.standard_normal((8, 5)) * 2}
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), params)
    x = jnp.asarray(rng.standard_normal((3, SIZE, SIZE, 3)), jnp.float32)
    return params, x, jnp.array([0, 2, 4])


@pytest.mark.parametrize("method", ["grad-cam", "layer-cam", "lift-cam"])
def test_eigen_smooth_against_numpy_svd(model, method):
    params, x, t = model
    split = SPLITS["s2"]
    e = lj.explain(split, params, x, t, method=eigen_smoothed(method))
    plain = lj.methods.get(method)
    a = split.features(params, x)
    att = plain.fn(split, params, x, a, t, split.head(params, a))
    w = np.asarray(att.weights, np.float64)
    weighted = np.asarray(a, np.float64) * (w[:, None, None, :] if w.ndim == 2 else w)
    for i in range(x.shape[0]):
        m = weighted[i].reshape(-1, weighted.shape[-1])
        mc = m - m.mean(axis=0)
        v = np.linalg.svd(mc)[2][0]
        v = v if v.sum() >= 0 else -v
        proj = (mc @ v).reshape(weighted.shape[1:3])
        assert np.sum(proj * weighted[i].sum(-1)) > 0  # oriented like the un-smoothed weighted sum
        np.testing.assert_allclose(e.raw[i], np.maximum(proj, 0), rtol=1e-3, atol=1e-4 * np.abs(proj).max())
        assert np.abs(proj).max() > 0
    with pytest.raises(UsageError, match="eigen-cam is already"):
        eigen_smoothed("eigen-cam")


def test_aug_smooth_is_six_flipped_back_passes(model):
    params, x, t = model
    split = SPLITS["s2"]
    e = explain_smoothed(split, params, x, t, method="grad-cam", aug_smooth=True)
    maps, raws, coeffs = [], [], []
    for flip, factor in [(False, 0.9), (False, 1.0), (False, 1.1), (True, 0.9), (True, 1.0), (True, 1.1)]:
        xa = np.asarray(x)[:, :, ::-1] if flip else np.asarray(x)
        p = lj.explain(split, params, jnp.asarray(xa * np.float32(factor)), t, method="grad-cam")
        un = (lambda a: np.asarray(a)[..., ::-1]) if flip else np.asarray
        maps.append(un(p.maps)), raws.append(un(p.raw)), coeffs.append(np.asarray(p.coefficients))
    np.testing.assert_allclose(e.maps, np.mean(maps, axis=0), atol=1e-5)
    np.testing.assert_allclose(e.raw, np.stack(raws, axis=1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(e.coefficients, np.stack(coeffs, axis=1), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(e.logits, split(params, x), rtol=1e-6)
    assert np.abs(np.asarray(maps[0]) - np.asarray(maps[3])).max() > 0.05  # the flip matters on this model
    ident = explain_smoothed(split, params, x, t, method="grad-cam", aug_smooth=True, augmentations=[(False, 1.0)])
    plain = lj.explain(split, params, x, t, method="grad-cam")
    np.testing.assert_allclose(ident.maps, plain.maps, atol=1e-6)
    assert AUGMENTATIONS == ((False, 0.9), (False, 1.0), (False, 1.1), (True, 0.9), (True, 1.0), (True, 1.1))


def test_aug_smooth_resolves_targets_once_on_the_original(model):
    params, x, _ = model
    e = explain_smoothed(SPLITS["s2"], params, x, method="hires-cam", aug_smooth=True)
    np.testing.assert_array_equal(e.targets, np.argmax(SPLITS["s2"](params, x), axis=-1))


@pytest.mark.parametrize("fusion", ["mean", "max"])
def test_fusion_against_numpy(model, fusion):
    params, x, t = model
    es = [lj.explain(SPLITS[n], params, x, t, method="layer-cam") for n in ("s1", "s2")]
    layers = np.stack([np.asarray(upsample(normalize(e.raw), (SIZE, SIZE))) for e in es], axis=1)
    combined = layers.mean(axis=1) if fusion == "mean" else layers.max(axis=1)
    lo, hi = combined.min(axis=(1, 2), keepdims=True), combined.max(axis=(1, 2), keepdims=True)
    want = (combined - lo) / (hi - lo)
    fn = jax.jit(lambda p, z, tt: explain_smoothed([SPLITS["s1"], SPLITS["s2"]], p, z, tt, method="layer-cam",
                                                   fusion=fusion))
    f = fn(params, x, t)
    np.testing.assert_allclose(f.maps, want, atol=1e-5)
    np.testing.assert_allclose(f.raw, layers, atol=1e-5)
    assert f.coefficients.shape == (3, 6 + 10)
    np.testing.assert_allclose(f.coefficients[:, 6:], es[1].coefficients, rtol=1e-5, atol=1e-7)
    assert np.abs(want - np.asarray(es[1].maps)).max() > 0.05  # the first layer matters
    one = explain_smoothed([SPLITS["s2"]], params, x, t, method="layer-cam")
    np.testing.assert_allclose(one.maps, es[1].maps, atol=1e-6)


def test_fusion_with_aug_smooth_layout_and_errors(model):
    params, x, t = model
    f = explain_smoothed([SPLITS["s1"], SPLITS["s2"]], params, x, t, method="grad-cam", aug_smooth=True,
                         eigen_smooth=True)
    assert f.maps.shape == (3, SIZE, SIZE) and f.raw.shape == (3, 6, 2, SIZE, SIZE)
    assert f.coefficients.shape == (3, 6, 16) and np.all(np.isfinite(f.maps))
    with pytest.raises(UsageError, match="unknown fusion 'sum'; valid: mean, max"):
        explain_smoothed([SPLITS["s1"], SPLITS["s2"]], params, x, t, fusion="sum")
    with pytest.raises(UsageError, match="no splits"):
        explain_smoothed([], params, x, t)


# ---------------------------------------------------------------------------
# the CLI: --aug-smooth, --eigen-smooth, --layer a,b, --fusion
# ---------------------------------------------------------------------------

def test_cli_fusion_and_smoothing_match_the_library(tmp_path, capsys):
    import json
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import fake_zoo
    from liftcam_jax.cli import main

    x = np.random.default_rng(3).standard_normal((2, fake_zoo.SIZE, fake_zoo.SIZE, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "out"
    rc = main(["explain", str(tmp_path / "x.npy"), "--model", "tiny", "--weights", "random", "--method",
               "grad-cam", "--layer", "conv1,conv2", "--fusion", "max", "--aug-smooth", "--save", "raw",
               "--out", str(out), "--quiet"], zoo=fake_zoo)
    assert rc == 0
    c1, c2 = fake_zoo.load("tiny", "random", "conv1"), fake_zoo.load("tiny", "random", "conv2")
    want = explain_smoothed([c1.split, c2.split], c1.params, jnp.asarray(x), method="grad-cam", aug_smooth=True,
                            fusion="max")
    files = sorted(f for f in os.listdir(out) if f.endswith(".npz"))
    assert len(files) == 2
    for i, f in enumerate(files):
        z = np.load(out / f)
        np.testing.assert_allclose(z["map"], want.maps[i], atol=1e-5)
        assert z["raw"].shape == (6, 2, fake_zoo.SIZE, fake_zoo.SIZE)
        assert str(z["raw_axes"]) == "augmentation,layer,H,W" and list(z["layers"]) == ["conv1", "conv2"]
        assert z["augmentations"].shape == (6, 2)
    run = json.load(open(out / "run.json"))
    assert "smoothing" in json.dumps(run) and "conv2" in json.dumps(run)
    for argv, message in [(["--method", "eigen-cam", "--eigen-smooth"], "eigen-cam is already"),
                          (["--layer", "conv1,conv1"], "names a layer twice"),
                          (["--layer", "conv1,nope"], "unknown layer 'nope'")]:
        rc = main(["explain", str(tmp_path / "x.npy"), "--model", "tiny", "--weights", "random",
                   "--out", str(tmp_path / "o2"), "--quiet", *argv], zoo=fake_zoo)
        err = capsys.readouterr().err
        assert rc == 2 and message in err and "Traceback" not in err, err
