"""Metrics on cases with known answers: closed forms, independent numpy/scipy computations."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from liftcam_jax import metrics
from liftcam_jax.metrics import CurveConfig
from liftcam_jax.image import gaussian_kernel1d
from liftcam_jax.model import Preprocess

H = W = 8
HW = H * W


def region_model(region, total=None):
    """Two classes with p(class 0) = S_R / T exactly, S_R = mean-over-channels sum of x inside ``region``.

    ``softmax([log S, log(T - S)])_0 = S / T``, so the score is linear in the
    pixels inside the region and blind to everything else.
    """
    r = jnp.asarray(region, jnp.float32)[None, :, :, None]
    t = float(np.sum(region)) if total is None else float(total)

    def model(params, x):
        s = jnp.sum(x * r, axis=(1, 2, 3)) / x.shape[-1] * params["scale"]
        return jnp.stack([jnp.log(s), jnp.log(jnp.maximum(t - s, 0.0))], axis=-1)

    return model


def inout_model(region):
    """p(class 0) = S_in / (S_in + S_out): masking the outside raises the score."""
    r = jnp.asarray(region, jnp.float32)[None, :, :, None]

    def model(params, x):
        s_in = jnp.sum(x * r, axis=(1, 2, 3))
        s_out = jnp.sum(x * (1 - r), axis=(1, 2, 3))
        return jnp.stack([jnp.log(s_in), jnp.log(s_out)], axis=-1)

    return model


PARAMS = {"scale": jnp.float32(1.0)}


def first_pixels(n):
    """A region made of the first ``n`` pixels in row-major order."""
    r = np.zeros(HW, np.float32)
    r[:n] = 1
    return r.reshape(H, W)


def scattered_region(n, seed=0):
    r = np.zeros(HW, np.float32)
    r[np.random.default_rng(seed).permutation(HW)[:n]] = 1
    return r.reshape(H, W)


def numpy_auc(p, counts):
    f = np.asarray(counts, np.float64) / HW
    p = np.asarray(p, np.float64)
    return float(np.sum(0.5 * (p[1:] + p[:-1]) * np.diff(f)))


# --------------------------------------------------------------------------- counts / rank

def test_step_counts_divisible_and_not():
    np.testing.assert_array_equal(metrics.step_counts(64, step=16), [0, 16, 32, 48, 64])
    np.testing.assert_array_equal(metrics.step_counts(64, step=5), list(range(0, 61, 5)) + [64])
    np.testing.assert_array_equal(metrics.step_counts(10, num_steps=4), [0, 2, 5, 7, 10])
    np.testing.assert_array_equal(metrics.step_counts(50176, step=224)[-2:], [49952, 50176])
    with pytest.raises(ValueError):
        metrics.step_counts(64)
    with pytest.raises(ValueError):
        metrics.step_counts(64, step=0)


def test_saliency_rank_is_stable_descending():
    m = jnp.asarray([[[0.5, 1.0], [1.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    r = np.asarray(metrics.saliency_rank(m))
    np.testing.assert_array_equal(r[0], [[2, 0], [1, 3]])  # ties: lower flat index first
    np.testing.assert_array_equal(r[1], [[0, 1], [2, 3]])


def test_random_tie_break_permutes_equal_pixels_by_the_seed():
    flat = jnp.full((2, H, W), 0.25)
    ranks = {seed: np.asarray(metrics.saliency_rank(flat, "random", jax.random.PRNGKey(seed)))
             for seed in (0, 1)}
    for r in ranks.values():  # a permutation of 0 .. HW-1, the same for every image
        np.testing.assert_array_equal(np.sort(r[0].ravel()), np.arange(HW))
        np.testing.assert_array_equal(r[0], r[1])
    again = np.asarray(metrics.saliency_rank(flat, "random", jax.random.PRNGKey(0)))
    np.testing.assert_array_equal(again, ranks[0])  # fixed by the seed
    assert not np.array_equal(ranks[0], ranks[1])  # and depends on it
    raster = np.arange(HW).reshape(H, W)
    np.testing.assert_array_equal(np.asarray(metrics.saliency_rank(flat)[0]), raster)
    assert not np.array_equal(ranks[0][0], raster)
    # partial ties: the strict order between values is kept, only the tied pixels move
    m = np.asarray(np.random.default_rng(0).integers(0, 3, (1, H, W)), np.float32)
    r = np.asarray(metrics.saliency_rank(jnp.asarray(m), "random", jax.random.PRNGKey(3)))[0]
    for v, lo in ((2, 0), (1, int((m == 2).sum())), (0, int((m >= 1).sum()))):
        np.testing.assert_array_equal(np.sort(r[m[0] == v]), lo + np.arange(int((m == v).sum())))


def test_random_tie_break_changes_nothing_without_ties():
    maps = jnp.asarray(np.random.default_rng(7).permutation(2 * HW).reshape(2, H, W), jnp.float32)
    np.testing.assert_array_equal(np.asarray(metrics.saliency_rank(maps, "random", jax.random.PRNGKey(5))),
                                  np.asarray(metrics.saliency_rank(maps)))
    region = scattered_region(16, seed=1)
    model = region_model(region)
    x, t = jnp.ones((2, H, W, 3)), jnp.zeros((2,), jnp.int32)
    for fn in (metrics.deletion, metrics.insertion):
        a = fn(model, PARAMS, x, maps, t, CurveConfig(step=5))
        b = fn(model, PARAMS, x, maps, t, CurveConfig(step=5, tie_break="random"), key=jax.random.PRNGKey(5))
        np.testing.assert_array_equal(np.asarray(a.scores), np.asarray(b.scores))


def test_random_tie_break_in_deletion_of_a_flat_map():
    # the region is the first 16 pixels: raster order deletes it first, a random order does not
    region = first_pixels(16)
    model = region_model(region)
    x, t, flat = jnp.ones((1, H, W, 3)), jnp.zeros((1,), jnp.int32), jnp.zeros((1, H, W))
    raster = metrics.deletion(model, PARAMS, x, flat, t, CurveConfig(step=4))
    np.testing.assert_allclose(raster.auc, [16 / (2 * HW)], atol=1e-6)
    aucs = [float(metrics.deletion(model, PARAMS, x, flat, t, CurveConfig(step=4, tie_break="random"),
                                   key=jax.random.PRNGKey(s)).auc[0]) for s in range(3)]
    assert all(a > 0.2 for a in aucs) and len(set(aucs)) == 3
    with pytest.raises(ValueError, match="needs key"):
        metrics.deletion(model, PARAMS, x, flat, t, CurveConfig(tie_break="random"))
    with pytest.raises(ValueError, match="unknown tie_break 'lexical'"):
        metrics.insertion(model, PARAMS, x, flat, t, CurveConfig(tie_break="lexical"), key=jax.random.PRNGKey(0))


# --------------------------------------------------------------------------- deletion / insertion

@pytest.mark.parametrize("step", [4, 5, 7])
def test_deletion_ideal_map_closed_form_and_ordering(step):
    n_r = 16
    region = scattered_region(n_r, seed=1)
    model = region_model(region)
    x = jnp.ones((1, H, W, 3))
    ideal = jnp.asarray(region)[None]
    inverted = 1.0 - ideal
    rand = jnp.asarray(np.random.default_rng(3).random((1, H, W)), jnp.float32)
    targets = jnp.zeros((1,), jnp.int32)
    counts = metrics.step_counts(HW, step=step)
    res = {}
    for name, m in [("ideal", ideal), ("inverted", inverted), ("random", rand)]:
        res[name] = metrics.deletion(model, PARAMS, x, m, targets, CurveConfig(step=step, chunk=3))
    # ideal: the region's pixels go first -> p(n) = max(0, 1 - n / |R|)
    p_ideal = np.maximum(0.0, 1.0 - counts / n_r)
    np.testing.assert_allclose(res["ideal"].scores[0], p_ideal, atol=1e-6)
    np.testing.assert_allclose(res["ideal"].auc[0], numpy_auc(p_ideal, counts), atol=1e-6)
    # inverted: the region goes last -> p(n) = min(1, (HW - n) / |R|)
    p_inv = np.minimum(1.0, (HW - counts) / n_r)
    np.testing.assert_allclose(res["inverted"].scores[0], p_inv, atol=1e-6)
    # random: p(n) = 1 - (#region pixels among the first n by rank) / |R|
    order = np.argsort(-np.asarray(rand[0]).ravel(), kind="stable")
    in_r = np.asarray(region).ravel()[order]
    p_rand = 1.0 - np.concatenate([[0], np.cumsum(in_r)])[counts] / n_r
    np.testing.assert_allclose(res["random"].scores[0], p_rand, atol=1e-6)
    assert res["ideal"].auc[0] < res["random"].auc[0] < res["inverted"].auc[0]
    np.testing.assert_allclose(res["ideal"].fractions, counts / HW, atol=1e-7)


def test_deletion_analytic_auc_when_steps_divide_region():
    # p falls linearly from 1 to 0 over the first |R| pixels, then stays 0: AUC = |R| / (2 HW) exactly.
    n_r = 24
    region = first_pixels(n_r)
    model = region_model(region)
    x = jnp.ones((2, H, W, 3))
    maps = jnp.stack([jnp.asarray(region), jnp.asarray(region) * 0.5])
    out = metrics.deletion(model, PARAMS, x, maps, jnp.zeros((2,), jnp.int32), CurveConfig(step=4))
    np.testing.assert_allclose(out.auc, [n_r / (2 * HW)] * 2, atol=1e-6)
    # the inverted map: AUC = 1 - |R| / (2 HW)
    out = metrics.deletion(model, PARAMS, x[:1], 1 - maps[:1], jnp.zeros((1,), jnp.int32), CurveConfig(num_steps=16))
    np.testing.assert_allclose(out.auc, [1 - n_r / (2 * HW)], atol=1e-6)


def test_deletion_mean_substrate():
    # with x = 1 in the region and 3 outside, the per-channel mean is (|R| + 3 (HW - |R|)) / HW
    n_r = 16
    region = first_pixels(n_r)
    x = jnp.asarray(np.where(region > 0, 1.0, 3.0), jnp.float32)[None, :, :, None] * jnp.ones((1, 1, 1, 3))
    mean = (n_r + 3.0 * (HW - n_r)) / HW
    model = region_model(region, total=n_r * max(mean, 1.0) + 1.0)
    out = metrics.deletion(model, PARAMS, x, jnp.asarray(region)[None], jnp.zeros((1,), jnp.int32),
                           CurveConfig(step=16, substrate="mean"))
    t = n_r * max(mean, 1.0) + 1.0
    np.testing.assert_allclose(out.scores[0, 0], n_r / t, atol=1e-6)
    np.testing.assert_allclose(out.scores[0, 1], n_r * mean / t, atol=1e-6)
    with pytest.raises(ValueError, match="substrate"):
        metrics.deletion(model, PARAMS, x, jnp.asarray(region)[None], jnp.zeros((1,), jnp.int32), CurveConfig(substrate="noise"))


def test_insertion_from_zeros_closed_form():
    # causal_curve with start = 0, finish = x: p(n) = min(1, n / |R|) for the ideal map
    n_r = 16
    region = scattered_region(n_r, seed=2)
    model = region_model(region)
    x = jnp.ones((1, H, W, 3))
    counts = tuple(int(c) for c in metrics.step_counts(HW, step=6))
    ideal = metrics.causal_curve(model, PARAMS, jnp.zeros_like(x), x, jnp.asarray(region)[None],
                                 jnp.zeros((1,), jnp.int32), counts=counts, chunk=5)
    p = np.minimum(1.0, np.asarray(counts) / n_r)
    np.testing.assert_allclose(ideal.scores[0], p, atol=1e-6)
    np.testing.assert_allclose(ideal.auc[0], numpy_auc(p, counts), atol=1e-6)


def test_insertion_starts_blurred_and_prefers_ideal_map():
    n_r = 16
    region = first_pixels(n_r)
    # image: the region bright, the rest dark; the blur leaks brightness out of the region
    x = jnp.asarray(np.where(region > 0, 1.0, 0.01), jnp.float32)[None, :, :, None] * jnp.ones((1, 1, 1, 3))
    model = region_model(region, total=n_r * 2.0)
    targets = jnp.zeros((1,), jnp.int32)
    blurred = metrics.gaussian_blur(x, metrics.RISE_BLUR_SIGMA, metrics.RISE_BLUR_TRUNCATE)
    assert gaussian_kernel1d(metrics.RISE_BLUR_SIGMA, metrics.RISE_BLUR_TRUNCATE).shape == (11,)  # RISE: klen 11
    ideal = metrics.insertion(model, PARAMS, x, jnp.asarray(region)[None], targets, CurveConfig(step=4))
    inv = metrics.insertion(model, PARAMS, x, 1 - jnp.asarray(region)[None], targets, CurveConfig(step=4))
    p0 = float(jax.nn.softmax(model(PARAMS, blurred))[0, 0])
    np.testing.assert_allclose(ideal.scores[0, 0], p0, rtol=1e-5)
    np.testing.assert_allclose(ideal.scores[0, -1], 0.5, atol=1e-6)  # the image itself: S_R / T = 1/2
    assert ideal.scores[0, 0] < 0.5
    assert ideal.auc[0] > inv.auc[0]


def test_causal_curve_chunking_and_batching_agree():
    region = scattered_region(20, seed=4)
    model = region_model(region)
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.random((3, H, W, 3)) + 0.5, jnp.float32)
    maps = jnp.asarray(rng.random((3, H, W)), jnp.float32)
    model = region_model(region, total=100.0)
    t = jnp.asarray([0, 1, 0], jnp.int32)
    a = metrics.deletion(model, PARAMS, x, maps, t, CurveConfig(step=7, chunk=1))
    b = metrics.deletion(model, PARAMS, x, maps, t, CurveConfig(step=7, chunk=4))
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-6)
    for i in range(3):  # image by image == batched
        c = metrics.deletion(model, PARAMS, x[i:i + 1], maps[i:i + 1], t[i:i + 1], CurveConfig(step=7, chunk=4))
        np.testing.assert_allclose(c.scores[0], a.scores[i], atol=1e-6)
    # params are arguments: a different scale changes the scores without recompiling constants in
    d = metrics.deletion(model, {"scale": jnp.float32(0.5)}, x, maps, t, CurveConfig(step=7))
    assert not np.allclose(d.scores, a.scores)


# --------------------------------------------------------------------------- AD / IC

def test_confidence_change_known_scores():
    n_r = 16
    region = first_pixels(n_r)
    model = inout_model(region)
    x = jnp.ones((3, H, W, 3))
    r = jnp.asarray(region)
    maps = jnp.stack([r, 0.5 * r + (1 - r), jnp.ones((H, W))])
    out = metrics.confidence_change(model, PARAMS, x, maps, jnp.zeros((3,), jnp.int32))
    y = n_r / HW
    o = np.array([1.0, 0.5 * n_r / (0.5 * n_r + HW - n_r), y])
    np.testing.assert_allclose(out.base, [y] * 3, rtol=1e-6)
    np.testing.assert_allclose(out.masked, o, rtol=1e-6)
    np.testing.assert_allclose(out.drop, [0.0, 100 * (y - o[1]) / y, 0.0], atol=1e-4)
    np.testing.assert_allclose(out.increase, [100.0, 0.0, 0.0])


# --------------------------------------------------------------------------- localisation

def _boxes(*bs):
    boxes = np.zeros((1, 3, 4), np.float32)
    valid = np.zeros((1, 3), bool)
    for i, b in enumerate(bs):
        boxes[0, i] = b
        valid[0, i] = True
    return jnp.asarray(boxes), jnp.asarray(valid)


def test_map_equal_to_mask_scores_one():
    boxes, valid = _boxes((2, 1, 5, 4), (6, 6, 8, 8))
    mask = metrics.box_mask(boxes, valid, (H, W))
    expected = np.zeros((H, W), bool)
    expected[1:4, 2:5] = True
    expected[6:8, 6:8] = True
    np.testing.assert_array_equal(mask[0], expected)
    maps = mask.astype(jnp.float32)
    np.testing.assert_allclose(metrics.energy_pointing_game(maps, boxes, valid), [1.0])
    np.testing.assert_allclose(metrics.pointing_game(maps, boxes, valid), [1.0])
    np.testing.assert_allclose(metrics.energy_pointing_game(1.0 - maps, boxes, valid), [0.0])
    half = jnp.ones((1, H, W))
    np.testing.assert_allclose(metrics.energy_pointing_game(half, boxes, valid), [expected.mean()], rtol=1e-6)


def test_pointing_game_tolerance_and_undefined():
    boxes, valid = _boxes((0, 0, 2, 2))
    size = 40
    m = np.zeros((1, size, size), np.float32)
    m[0, 0, 16] = 1.0  # centre (16.5, 0.5): 14.5 px right of the box
    assert float(metrics.pointing_game(jnp.asarray(m), boxes, valid)[0]) == 1.0
    assert float(metrics.pointing_game(jnp.asarray(m), boxes, valid, tolerance=14)[0]) == 0.0
    m = np.zeros((1, size, size), np.float32)
    m[0, 13, 13] = 1.0  # centre (13.5, 13.5): sqrt(2) * 11.5 = 16.3 px from the corner
    assert float(metrics.pointing_game(jnp.asarray(m), boxes, valid)[0]) == 0.0
    assert float(metrics.pointing_game(jnp.asarray(m), boxes, valid, tolerance=17)[0]) == 1.0
    # no (non-empty) box: undefined
    eb, ev = _boxes((5, 5, 5, 9))
    assert np.isnan(metrics.pointing_game(jnp.asarray(m), eb, ev)[0])
    assert np.isnan(metrics.energy_pointing_game(jnp.asarray(m), eb, ev)[0])
    nb, nv = _boxes()
    assert np.isnan(metrics.pointing_game(jnp.asarray(m), nb, nv)[0])
    # an all-zero map has no energy in the box
    assert float(metrics.energy_pointing_game(jnp.zeros((1, size, size)), boxes, valid)[0]) == 0.0


@pytest.mark.parametrize("pre,shape", [
    (Preprocess(size=32, resize="squash"), (40, 60)),
    (Preprocess(size=32, resize="shorter_crop", resize_to=36), (40, 60)),
    (Preprocess(size=32, resize="shorter_crop", resize_to=36), (70, 45)),
])
def test_boxes_follow_the_preprocessing(pre, shape):
    """Draw a box on an image, preprocess it, and compare with the mapped box's mask."""
    h, w = shape
    box = np.array([[11.0, 7.0, 35.0, 29.0]])
    img = np.zeros((h, w, 3), np.uint8)
    img[7:29, 11:35] = 255
    pre_nearest = Preprocess(size=pre.size, resize=pre.resize, resize_to=pre.resize_to, interpolation="nearest")
    seen = pre_nearest.resize_image(img)[..., 0] > 127
    mapped = metrics.boxes_to_input(box, (h, w), pre)
    mask = np.asarray(metrics.box_mask(jnp.asarray(mapped)[None], jnp.ones((1, 1), bool), (pre.size, pre.size))[0])
    # nearest resampling and box edges can disagree by at most one pixel row/column per side
    assert np.sum(seen != mask) <= 2 * (pre.size + pre.size)
    assert np.sum(seen & mask) >= 0.8 * seen.sum()
    ys, xs = np.nonzero(seen)
    x0, y0, x1, y1 = mapped[0]
    assert abs(xs.min() - x0) <= 1 and abs(xs.max() + 1 - x1) <= 1
    assert abs(ys.min() - y0) <= 1 and abs(ys.max() + 1 - y1) <= 1


def test_box_outside_the_crop_is_empty():
    pre = Preprocess(size=32, resize="shorter_crop", resize_to=36)
    mapped = metrics.boxes_to_input(np.array([[0.0, 0.0, 3.0, 10.0]]), (40, 80), pre)  # left edge, cropped away
    assert mapped[0, 2] <= mapped[0, 0]


# --------------------------------------------------------------------------- SHAP agreement

def test_agreement_metrics_match_numpy_and_scipy():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 50)).astype(np.float32)
    b = (a + rng.normal(size=(6, 50))).astype(np.float32)
    ties_a = rng.integers(0, 5, size=(4, 30)).astype(np.float32)
    ties_b = rng.integers(0, 5, size=(4, 30)).astype(np.float32)
    cos = np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    np.testing.assert_allclose(metrics.cosine_similarity(jnp.asarray(a), jnp.asarray(b)), cos, rtol=1e-5)
    for x, y in [(a, b), (ties_a, ties_b)]:
        want = [scipy.stats.spearmanr(x[i], y[i]).statistic for i in range(x.shape[0])]
        np.testing.assert_allclose(metrics.spearman(jnp.asarray(x), jnp.asarray(y)), want, atol=1e-5)
        np.testing.assert_allclose(metrics.average_ranks(jnp.asarray(x)),
                                   scipy.stats.rankdata(x, axis=-1), atol=1e-6)
    for k in (1, 5, 17):
        want = [len(set(np.argsort(-a[i])[:k]) & set(np.argsort(-b[i])[:k])) / k for i in range(6)]
        np.testing.assert_allclose(metrics.topk_overlap(jnp.asarray(a), jnp.asarray(b), k=k), want)
        want = [len(set(np.argsort(-abs(a[i]))[:k]) & set(np.argsort(-abs(b[i]))[:k])) / k for i in range(6)]
        np.testing.assert_allclose(metrics.topk_overlap(jnp.asarray(a), jnp.asarray(b), k=k, absolute=True), want)
    np.testing.assert_allclose(metrics.topk_overlap(jnp.asarray(a), jnp.asarray(a), k=5), 1.0)
    assert np.isnan(metrics.cosine_similarity(jnp.zeros((1, 4)), jnp.ones((1, 4)))[0])
    assert np.isnan(metrics.spearman(jnp.ones((1, 4)), jnp.arange(4.0)[None])[0])


def test_mean_ci_is_the_t_interval():
    v = np.array([1.0, 2.0, 4.0, 7.0, np.nan])
    s = metrics.mean_ci(v)
    lo, hi = scipy.stats.t.interval(0.95, 3, loc=np.mean(v[:4]), scale=scipy.stats.sem(v[:4]))
    assert s.n == 4 and s.mean == pytest.approx(3.5)
    assert s.low == pytest.approx(lo) and s.high == pytest.approx(hi)
    assert metrics.mean_ci([2.0]) == (2.0, 2.0, 2.0, 1)
    assert metrics.mean_ci([np.nan]).n == 0
