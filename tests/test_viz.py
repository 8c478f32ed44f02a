"""Colormaps, overlays, grids and PNG files of liftcam_jax.viz."""
import numpy as np
import pytest
from PIL import Image

from liftcam_jax import viz


@pytest.mark.parametrize("name", viz.CMAPS)
def test_colorize_matches_matplotlib(name):
    mpl = pytest.importorskip("matplotlib")
    x = np.concatenate([np.linspace(0, 1, 2049), [0.0, 1.0, 0.5, 1 / 256, 255 / 256, 0.99999]])
    ours = viz.colorize(x, name)
    ref = mpl.colormaps[name](x, bytes=True)[..., :3]
    np.testing.assert_array_equal(ours, ref)


def test_colorize_closed_form_jet_endpoints_and_clipping():
    # jet: 0 -> dark blue (0, 0, 127), 1 -> dark red (127, 0, 0), 0.5 -> near green
    out = viz.colorize(np.array([0.0, 1.0, -3.0, 7.0, np.nan]), "jet")
    np.testing.assert_array_equal(out[0], [0, 0, 127])
    np.testing.assert_array_equal(out[1], [127, 0, 0])
    np.testing.assert_array_equal(out[2], out[0])  # clipped
    np.testing.assert_array_equal(out[3], out[1])
    np.testing.assert_array_equal(out[4], out[0])  # NaN -> 0
    g = viz.colorize(np.linspace(0, 1, 256), "gray")
    # gray: within one level of the identity (matplotlib truncates v * 255), monotone
    assert np.abs(g[:, 0].astype(int) - np.arange(256)).max() <= 1
    assert (np.diff(g[:, 0].astype(int)) >= 0).all() and g[0, 0] == 0 and g[-1, 0] == 255
    assert viz.colorize(np.zeros((5, 7)), "jet").shape == (5, 7, 3)


def test_colorize_unknown_name():
    with pytest.raises(ValueError, match="valid colormaps: jet"):
        viz.colorize(np.zeros(3), "nope")


def test_overlay_blend_formula():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    m = rng.random((9, 11))
    for alpha in (0.0, 0.3, 1.0):
        out = viz.overlay(img, m, alpha=alpha)
        want = np.round((1 - alpha) * img + alpha * viz.colorize(m).astype(float)).astype(np.uint8)
        assert out.dtype == np.uint8 and out.shape == (9, 11, 3)
        np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(viz.overlay(img, m, alpha=0.0), img)
    np.testing.assert_array_equal(viz.overlay(img, m, alpha=1.0), viz.colorize(m))
    # gray images are accepted
    assert viz.overlay(img[..., 0], m).shape == (9, 11, 3)


def test_overlay_rejects_bad_arguments():
    img = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="differs from image size"):
        viz.overlay(img, np.zeros((5, 4)))
    with pytest.raises(ValueError, match="alpha"):
        viz.overlay(img, np.zeros((4, 4)), alpha=1.5)
    with pytest.raises(ValueError, match="uint8"):
        viz.overlay(img.astype(np.int32), np.zeros((4, 4)))


def test_grid_layout_and_labels():
    a = np.full((10, 8, 3), 10, np.uint8)
    b = np.full((6, 6), 200, np.uint8)
    out = viz.grid([[a, b], [a]], pad=2)
    assert out.dtype == np.uint8
    assert out.shape == (2 + 2 * (10 + 2), 2 + 2 * (8 + 2), 3)
    np.testing.assert_array_equal(out[2:12, 2:10], a)  # first cell at (pad, pad)
    # b is centred in its 10x8 cell: rows 2+2..2+8, cols 12+1..12+7
    np.testing.assert_array_equal(out[4:10, 13:19], np.full((6, 6, 3), 200, np.uint8))
    assert (out[14:24, 12:20] == 255).all()  # empty cell stays background
    wide = np.full((10, 60, 3), 10, np.uint8)
    labelled = viz.grid([[wide, b]], labels=[["cat", None]], pad=2)
    assert labelled.shape[0] > 2 + 10 + 2 and labelled.shape[1] == 2 + 2 * (60 + 2)
    assert (labelled[12:, 2:62] < 128).any()  # some text was drawn under the first cell
    assert (labelled[12:, 64:124] == 255).all()  # no label under the second


def test_write_png_roundtrip(tmp_path):
    img = np.random.default_rng(1).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    p = tmp_path / "sub" / "x.png"
    viz.write_png(p, img)
    np.testing.assert_array_equal(np.asarray(Image.open(p)), img)
    assert [f.name for f in p.parent.iterdir()] == ["x.png"]  # no temp file left behind
    with pytest.raises(ValueError):
        viz.write_png(tmp_path / "y.png", img.astype(np.float32))


# the float formulas the lookup tables replaced (kept here as the reference)
def _old_colorize(map01, cmap):
    m = np.nan_to_num(np.asarray(map01, np.float64), nan=0.0, posinf=1.0, neginf=0.0)
    m = np.clip(m, 0.0, 1.0)
    idx = np.minimum((m * 256).astype(np.int64), 255)
    t = np.linspace(0.0, 1.0, 256)
    chans = []
    for c in ("red", "green", "blue"):
        xs, ys = zip(*viz._SEGMENTS[cmap][c])
        chans.append(np.clip(np.interp(t, xs, ys), 0.0, 1.0))
    return (np.stack(chans, -1) * 255).astype(np.uint8)[idx], np.stack(chans, -1)[idx]


def _old_overlay(image, map01, alpha, cmap="jet"):
    heat = _old_colorize(map01, cmap)[0].astype(np.float64)
    out = (1.0 - alpha) * image.astype(np.float64) + alpha * heat
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("name", viz.CMAPS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_lookup_colormap_equals_the_float_colormap(name, dtype):
    # every one of the 256 levels (their centres and both edges), out-of-range values, NaN and infinities
    levels = np.arange(256) / 256.0
    x = np.concatenate([levels, levels + 0.5 / 256, np.nextafter(levels + 1 / 256, 0), [1.0, -2.0, 3.0, np.nan,
                                                                                         np.inf, -np.inf]])
    x = x.astype(dtype)
    old_bytes, old_float = _old_colorize(x, name)
    new = viz.colorize(x, name)
    np.testing.assert_array_equal(new, old_bytes)
    assert np.abs(new / 255.0 - old_float).max() <= 1 / 255  # within one level of the continuous map
    assert viz.colorize(np.float32(0.5), name).shape == (3,)
    ints = np.array([[0, 1, 2]], np.uint8)  # non-float maps go through float64
    np.testing.assert_array_equal(viz.colorize(ints, name), _old_colorize(ints, name)[0])


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 0.55, 1.0])
def test_lookup_overlay_equals_the_float_blend(alpha):
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (31, 17, 3), dtype=np.uint8)
    m = rng.random((31, 17)).astype(np.float32)
    m[0, :4] = [np.nan, -1, 2, 1]
    np.testing.assert_array_equal(viz.overlay(img, m, alpha=alpha), _old_overlay(img, m, alpha))
    # all 256 x 256 (image byte, heat level) pairs
    v, lv = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    img = np.repeat(v.astype(np.uint8)[..., None], 3, -1)
    m = ((lv + 0.5) / 256).astype(np.float32)
    np.testing.assert_array_equal(viz.overlay(img, m, alpha=alpha, cmap="hot"), _old_overlay(img, m, alpha, "hot"))


@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (7, 5, 1), (6, 9, 3), (4, 3, 4)])
@pytest.mark.parametrize("level", [0, 1, 9])
def test_encoded_png_decodes_to_the_same_pixels(tmp_path, shape, level):
    from liftcam_jax import files

    img = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    img[0] = 255  # wrap-around of the "Up" filter: 0 - 255 mod 256
    data = files.encode_png(img, level)
    p = tmp_path / "x.png"
    p.write_bytes(data)
    with Image.open(p) as im:
        im.load()
        back = np.asarray(im)
    np.testing.assert_array_equal(back, img[..., 0] if img.ndim == 3 and img.shape[-1] == 1 else img)
    with pytest.raises(ValueError):
        files.encode_png(np.zeros((0, 3, 3), np.uint8))


def test_ordered_writes_commit_in_order_after_their_files_and_stop_at_a_failure(tmp_path):
    import threading
    import time

    from liftcam_jax import files

    committed, written = [], set()
    lock = threading.Lock()

    def write(i, delay):
        time.sleep(delay)
        files.write_bytes(tmp_path / f"{i}.bin", b"x")
        with lock:
            written.add(i)

    def commit(i):
        assert i in written and (tmp_path / f"{i}.bin").exists()  # a line only after its file exists
        committed.append(i)

    with files.OrderedWrites(workers=3, pending=2) as w:
        for i, delay in enumerate([0.05, 0.0, 0.03, 0.0, 0.01]):  # later items finish first
            w.submit(lambda i=i, d=delay: write(i, d), lambda i=i: commit(i))
    assert committed == [0, 1, 2, 3, 4]

    committed.clear()

    def boom():
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        with files.OrderedWrites(workers=2) as w:
            w.submit(lambda: write(10, 0.0), lambda: commit(10))
            w.submit(boom, lambda: commit(11))
            w.submit(lambda: write(12, 0.0), lambda: commit(12))
    assert committed == [10]  # nothing after the failure is committed
    with pytest.raises(RuntimeError, match="stop"):
        with files.OrderedWrites(workers=1) as w:
            w.submit(lambda: write(20, 0.02), lambda: commit(20))
            raise RuntimeError("stop")
    assert committed == [10]  # no line for the write in flight when the block failed
    n = len(written)
    time.sleep(0.05)
    assert len(written) == n and not list(tmp_path.glob(".*.tmp"))  # nothing left running, no temp files


@pytest.mark.parametrize("shape", [(224, 224, 3), (5, 7, 3), (2, 5, 7, 3), (3,), (4, 1)])
def test_fast_normalize_gives_the_bits_of_the_broadcast_formula(shape):
    from liftcam_jax.image import normalize

    img = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    mean, std = (0.485, 0.456, 0.406)[: shape[-1]], (0.229, 0.224, 0.225)[: shape[-1]]
    want = (np.asarray(img, np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    got = normalize(img, mean, std)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
