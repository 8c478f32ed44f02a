"""Decoding every image mode to RGB, refusing bad inputs clearly, listing sources, TFDS."""
import io
import os

import numpy as np
import pytest
from PIL import Image

from liftcam_jax import data
from liftcam_jax.data import ItemError, decode_image, open_inputs
from liftcam_jax.errors import UsageError


def _png_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _rng_rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------
# modes
# ---------------------------------------------------------------------------

def test_rgb_png_is_lossless(tmp_path):
    a = _rng_rgb(5, 7)
    p = tmp_path / "a.png"
    Image.fromarray(a).save(p)
    out = decode_image(p)
    assert out.dtype == np.uint8 and out.shape == (5, 7, 3)
    np.testing.assert_array_equal(out, a)
    np.testing.assert_array_equal(decode_image(p.read_bytes()), a)


def test_cmyk_jpeg_decodes_to_the_right_colours(tmp_path):
    colours = np.array([[200, 30, 40], [20, 180, 60], [30, 40, 220], [250, 250, 250]], np.uint8)
    a = np.repeat(np.repeat(colours[None], 16, axis=0), 16, axis=1)  # 4 flat blocks of 16x16
    p = tmp_path / "cmyk.jpg"
    Image.fromarray(a).convert("CMYK").save(p, quality=95)
    assert Image.open(p).mode == "CMYK"
    out = decode_image(p)
    assert out.shape == a.shape
    # block centres keep their colour up to JPEG loss
    centres = out[8, 8::16].astype(int)
    assert np.abs(centres - colours.astype(int)).max() <= 6, centres


def test_16_bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    levels = np.arange(256, dtype=np.uint16).reshape(16, 16)
    p = tmp_path / "g16.png"
    Image.fromarray(levels * 257).save(p)  # 16-bit PNG, full range
    assert Image.open(p).mode.startswith("I")
    out = decode_image(p)
    np.testing.assert_array_equal(out, np.repeat(levels.astype(np.uint8)[..., None], 3, -1))


def test_32_bit_int_and_float_modes():
    i = Image.fromarray(np.full((2, 3), 65535, np.int32), mode="I")
    np.testing.assert_array_equal(data.to_rgb(i), np.full((2, 3, 3), 255, np.uint8))
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), mode="F")
    np.testing.assert_array_equal(data.to_rgb(f)[0, :, 0], [0, 128, 255])


def test_rgba_is_composited_on_white(tmp_path):
    a = np.zeros((1, 3, 4), np.uint8)
    a[0, 0] = [10, 20, 30, 0]  # transparent -> white
    a[0, 1] = [10, 20, 30, 255]  # opaque -> itself
    a[0, 2] = [0, 100, 200, 128]  # half -> c * a + 255 * (1 - a)
    p = tmp_path / "rgba.png"
    Image.fromarray(a, "RGBA").save(p)
    out = decode_image(p)
    al = 128 / 255
    want = np.array([[[255, 255, 255], [10, 20, 30],
                      np.round(np.array([0, 100, 200]) * al + 255 * (1 - al))]], np.float64)
    np.testing.assert_array_equal(out, want.astype(np.uint8))


def test_palette_with_transparency(tmp_path):
    img = Image.new("P", (3, 1))
    img.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    img.putdata([0, 1, 2])
    p = tmp_path / "p.png"
    img.save(p, transparency=1)  # green is transparent
    reread = Image.open(p)
    assert reread.mode == "P" and "transparency" in reread.info
    np.testing.assert_array_equal(decode_image(p)[0], [[255, 0, 0], [255, 255, 255], [0, 0, 255]])
    img.save(p)  # no transparency: plain palette lookup
    np.testing.assert_array_equal(decode_image(p)[0], [[255, 0, 0], [0, 255, 0], [0, 0, 255]])


def test_gray_modes(tmp_path):
    g = np.array([[0, 77, 255]], np.uint8)
    p = tmp_path / "l.png"
    Image.fromarray(g, "L").save(p)
    np.testing.assert_array_equal(decode_image(p), np.repeat(g[..., None], 3, -1))
    la = np.array([[[77, 255], [77, 0]]], np.uint8)
    Image.fromarray(la, "LA").save(p)
    np.testing.assert_array_equal(decode_image(p)[0], [[77, 77, 77], [255, 255, 255]])
    one = Image.new("1", (2, 1))
    one.putpixel((1, 0), 1)
    one.save(p)
    np.testing.assert_array_equal(decode_image(p)[0], [[0, 0, 0], [255, 255, 255]])


def test_one_pixel_image(tmp_path):
    p = tmp_path / "px.png"
    Image.new("RGB", (1, 1), (1, 2, 3)).save(p)
    np.testing.assert_array_equal(decode_image(p), [[[1, 2, 3]]])


def test_exif_orientation_is_applied(tmp_path):
    a = np.zeros((2, 4, 3), np.uint8)
    a[0, 0] = [255, 0, 0]  # a red top-left corner
    img = Image.fromarray(a)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    p = tmp_path / "rot.png"
    img.save(p, exif=exif.tobytes())
    out = decode_image(p)
    np.testing.assert_array_equal(out, np.rot90(a, k=-1))
    assert out.shape == (4, 2, 3)


# ---------------------------------------------------------------------------
# bad files
# ---------------------------------------------------------------------------

def test_zero_byte_file(tmp_path):
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    with pytest.raises(ItemError, match="empty file"):
        decode_image(p)


def test_truncated_jpeg(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(_rng_rgb(64, 64)).save(buf, format="JPEG")
    p = tmp_path / "cut.jpg"
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ItemError, match="truncated"):
        decode_image(p)


def test_text_file_named_jpg(tmp_path):
    p = tmp_path / "text.jpg"
    p.write_text("this is not an image\n")
    with pytest.raises(ItemError, match="not an image"):
        decode_image(p)


def test_corrupt_png(tmp_path):
    raw = bytearray(_png_bytes(Image.fromarray(_rng_rgb(16, 16))))
    raw[60:80] = b"\x00" * 20  # inside the IDAT chunk: CRC / zlib failure
    p = tmp_path / "bad.png"
    p.write_bytes(bytes(raw))
    with pytest.raises(ItemError, match="corrupt|truncated"):
        decode_image(p)


def test_unreadable_path(tmp_path):
    with pytest.raises(ItemError, match="cannot read"):
        decode_image(tmp_path / "missing.png")
    with pytest.raises(ItemError, match="cannot read"):
        decode_image(tmp_path)  # a folder


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("limit", [300, 100])  # 400 px: between 1x and 2x (PIL warns), above 2x (PIL raises)
def test_decompression_bomb(tmp_path, monkeypatch, limit):
    p = tmp_path / "big.png"
    Image.new("RGB", (20, 20)).save(p)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with pytest.raises(ItemError, match="too large.*decompression-bomb"):
        decode_image(p)
    if limit == 300:  # below PIL's own hard limit (2x), our check can be lifted
        assert decode_image(p, max_pixels=None).shape == (20, 20, 3)


def test_array_to_rgb():
    np.testing.assert_array_equal(data.array_to_rgb(np.full((2, 2, 1), 9, np.uint8)), np.full((2, 2, 3), 9))
    with pytest.raises(ItemError, match="shape"):
        data.array_to_rgb(np.zeros((2, 2, 5), np.uint8))


# ---------------------------------------------------------------------------
# listing and ids
# ---------------------------------------------------------------------------

def _img(path, seed=0, size=(6, 5)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_rng_rgb(size[1], size[0], seed)).save(path)
    return path


def _ids(sources):
    return [it.id for s in sources for it in s.items]


def test_folder_listing_is_recursive_sorted_and_keeps_structure(tmp_path):
    d = tmp_path / "photos"
    for rel in ["b.png", "a.jpg", "sub/c.png", "sub/deeper/d.bmp"]:
        _img(d / rel)
    (d / "notes.txt").write_text("x")
    (d / ".hidden.png").write_bytes(b"")
    ids = _ids(open_inputs([str(d)]))
    assert ids == ["photos/a", "photos/b", "photos/sub/c", "photos/sub/deeper/d"]


def test_same_name_in_two_folders_never_collides(tmp_path):
    a = _img(tmp_path / "x" / "cat.png", 1)
    b = _img(tmp_path / "y" / "cat.png", 2)
    srcs = open_inputs([str(a), str(b)])
    ids = _ids(srcs)
    assert len(set(ids)) == 2 and all(i.startswith("cat_") and len(i) == len("cat_") + 8 for i in ids)
    assert _ids(open_inputs([str(a), str(b)])) == ids  # deterministic (resumable)
    # two folders with the same base name
    srcs = open_inputs([str(tmp_path / "x"), str(tmp_path / "y")])
    assert len(set(_ids(srcs))) == 2
    # stems that differ only by extension or case
    _img(tmp_path / "z" / "Dog.jpg")
    _img(tmp_path / "z" / "dog.png")
    ids = _ids(open_inputs([str(tmp_path / "z")]))
    assert len({i.lower() for i in ids}) == 2


def test_duplicates_are_listed_once(tmp_path):
    a = _img(tmp_path / "a.png")
    assert _ids(open_inputs([str(a), str(a), str(tmp_path)])) == ["a"]


def test_usage_errors_before_any_work(tmp_path):
    with pytest.raises(UsageError, match="input not found"):
        open_inputs([str(tmp_path / "nope.jpg")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no images found"):
        open_inputs([str(tmp_path / "empty")])
    with pytest.raises(UsageError, match="no inputs"):
        open_inputs([])


def test_npy_rows_nan_and_bad_shapes(tmp_path):
    x = np.random.default_rng(0).normal(size=(3, 8, 8, 3)).astype(np.float32)
    x[1, 2, 2, 0] = np.nan
    np.save(tmp_path / "good.npy", x)
    np.save(tmp_path / "chan4.npy", np.zeros((2, 8, 8, 4), np.float32))
    np.save(tmp_path / "flat.npy", np.zeros((8, 8), np.float32))
    np.save(tmp_path / "ints.npy", np.zeros((1, 8, 8, 3), np.uint8))
    np.save(tmp_path / "one.npy", np.ones((8, 8, 3), np.float64))
    (tmp_path / "junk.npy").write_bytes(b"\x93NUMPY garbage")
    srcs = open_inputs([str(tmp_path / n) for n in
                        ["good.npy", "chan4.npy", "flat.npy", "ints.npy", "one.npy", "junk.npy"]])
    items = {it.id: (s, it) for s in srcs for it in s.items}
    assert list(items) == ["good_0", "good_1", "good_2", "chan4", "flat", "ints", "one_0", "junk"]
    s, it = items["good_0"]
    np.testing.assert_array_equal(s.load(it), x[0])
    with pytest.raises(ItemError, match="NaN or Inf"):
        s.load(items["good_1"][1])
    assert "shape (2, 8, 8, 4)" in items["chan4"][1].error
    assert "shape (8, 8)" in items["flat"][1].error
    assert "dtype uint8" in items["ints"][1].error
    assert "cannot read .npy" in items["junk"][1].error
    s, it = items["one_0"]
    assert s.load(it).dtype == np.float32 and s.load(it).shape == (8, 8, 3)


# ---------------------------------------------------------------------------
# TFDS, without TensorFlow: a tiny dataset really prepared as array_record
# ---------------------------------------------------------------------------

tfds = pytest.importorskip("tensorflow_datasets")
N_TFDS = 7


def _tfds_image(i):
    return np.full((6 + i, 5, 3), 10 * i, np.uint8)


class LiftcamTinyImages(tfds.core.GeneratorBasedBuilder):
    """Seven flat images, value 10 * label (encoded as PNG bytes: no TensorFlow needed)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "label": tfds.features.ClassLabel(num_classes=N_TFDS),
            }),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(N_TFDS):
            yield i, {"image": _png_bytes(Image.fromarray(_tfds_image(i))), "label": i}


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tfds")
    LiftcamTinyImages(data_dir=str(d), file_format="array_record").download_and_prepare()
    return str(d)


def test_tfds_array_record_without_tensorflow(tfds_dir):
    srcs = open_inputs(["tfds:liftcam_tiny_images:train[2:5]"], data_dir=tfds_dir)
    (src,) = srcs
    assert [it.id for it in src.items] == [f"liftcam_tiny_images/train/0000{i}" for i in (2, 3, 4)]
    assert [it.source for it in src.items] == [f"tfds:liftcam_tiny_images:train[{i}]" for i in (2, 3, 4)]
    # the same examples as reading the whole split at those indices
    full = tfds.data_source("liftcam_tiny_images", split="train", data_dir=tfds_dir)
    for it, fetch in src.read(src.items):
        got = fetch()
        ex = full[it.ref[1]]
        np.testing.assert_array_equal(got.image, _tfds_image(int(ex["label"])))
        assert got.label == int(ex["label"]) and got.label_name == str(int(ex["label"]))


def test_tfds_percent_slices_and_whole_split(tfds_dir):
    (src,) = open_inputs(["tfds:liftcam_tiny_images:train"], data_dir=tfds_dir)
    assert len(src.items) == N_TFDS
    (src,) = open_inputs(["tfds:liftcam_tiny_images:train[:50%]"], data_dir=tfds_dir)
    assert 1 <= len(src.items) < N_TFDS


def test_tfds_errors_are_usage_errors(tfds_dir, tmp_path):
    with pytest.raises(UsageError, match="not found"):
        open_inputs(["tfds:no_such_dataset_xyz:train"], data_dir=tfds_dir)
    with pytest.raises(UsageError, match="not prepared.*--download"):
        open_inputs(["tfds:liftcam_tiny_images:train"], data_dir=str(tmp_path))
    with pytest.raises(UsageError, match="bad split"):
        open_inputs(["tfds:liftcam_tiny_images:validation"], data_dir=tfds_dir)
    with pytest.raises(UsageError, match="expected tfds:NAME"):
        open_inputs(["tfds:liftcam_tiny_images"], data_dir=tfds_dir)


def test_sources_declare_what_callers_ask_and_max_pixels_is_given_when_opened(tfds_dir, tmp_path):
    from liftcam_jax.data import DataOptions, Source

    _img(tmp_path / "a.png", size=(20, 20))
    np.save(tmp_path / "x.npy", np.zeros((1, 4, 4, 3), np.float32))
    files, arr, split = open_inputs([str(tmp_path / "a.png"), str(tmp_path / "x.npy"),
                                     "tfds:liftcam_tiny_images:train[:1]"], data_dir=tfds_dir, max_pixels=100)
    for s in (files, arr, split):
        assert isinstance(s, Source) and not s.sequential and s.random_access and not s.has_boxes
    assert (files.spec, arr.spec, split.spec) == (None, str(tmp_path / "x.npy"), "tfds:liftcam_tiny_images:train[:1]")
    assert files.label_names is None and split.label_names == [str(i) for i in range(N_TFDS)]
    assert files.max_pixels == split.max_pixels == 100  # a 400-pixel file, TFDS images of 30 to 60 pixels
    with pytest.raises(ItemError, match="too large"):
        files.load(files.items[0])
    assert split.load(split.items[0]).shape[1:] == (5, 3)
    (small,) = open_inputs(["tfds:liftcam_tiny_images:train[:1]"], options=DataOptions(data_dir=tfds_dir, max_pixels=20))
    with pytest.raises(ItemError, match="too large"):
        small.load(small.items[0])
    with pytest.raises(TypeError, match="not both"):
        open_inputs([str(tmp_path / "a.png")], data_dir=tfds_dir, options=DataOptions())


# ---------------------------------------------------------------------------
# TFDS messages: one line, a step that works (no network: builders defined here)
# ---------------------------------------------------------------------------

MANUAL_FILE = "liftcam_levels.txt"


class LiftcamManualImages(tfds.core.GeneratorBasedBuilder):
    """Images whose levels are read from a file the user downloads by hand (like imagenet2012's archives)."""

    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Download liftcam_levels.txt from the lab's share
      and put it in the manual dir.
    """

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(names=["dark", "light"]),
        }))

    def _split_generators(self, dl_manager):
        return {"validation": self._generate_examples(os.path.join(dl_manager.manual_dir, MANUAL_FILE))}

    def _generate_examples(self, path):
        with open(path) as f:
            for i, level in enumerate(int(v) for v in f.read().split()):
                yield i, {"image": _png_bytes(Image.fromarray(np.full((3, 4, 3), level, np.uint8))),
                          "label": int(level > 127)}


def _usage_error(*args, **kw) -> str:
    with pytest.raises(UsageError) as e:
        open_inputs(*args, **kw)
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def test_a_misspelt_dataset_keeps_tfds_suggestion(tfds_dir):
    msg = _usage_error(["tfds:liftcam_tiny_imagez:train[2:5]"], data_dir=tfds_dir)
    assert "not found" in msg and "did you mean 'liftcam_tiny_images'" in msg, msg
    step = msg.split("(input ", 1)[1].rstrip(")")
    assert step == "tfds:liftcam_tiny_images:train[2:5]"
    assert len(open_inputs([step], data_dir=tfds_dir)[0].items) == 3  # the suggested input works
    msg = _usage_error(["tfds:liftcam_tiny_images@9.9.9:train"], data_dir=tfds_dir)
    assert "9.9.9" in msg and "1.0.0" in msg and "Failed to construct" not in msg, msg


def test_a_manual_download_says_where_and_how_then_prepares(tmp_path, capsys):
    data_dir = str(tmp_path / "tfds")
    manual = os.path.join(data_dir, "downloads", "manual")
    spec = "tfds:liftcam_manual_images:validation"
    msg = _usage_error([spec], data_dir=data_dir)
    assert "not prepared" in msg and f"put its files in {manual} " in msg, msg
    assert "(TFDS: Download liftcam_levels.txt from the lab's share and put it in the manual dir.)" in msg, msg
    assert "--download" in msg and "(no TensorFlow needed)" in msg and "tfds.load" not in msg, msg
    msg = _usage_error([spec], data_dir=data_dir, download=True)  # TFDS cannot download it: said before trying
    assert f"put its files in {manual} " in msg and "then run again with --download" in msg, msg
    os.makedirs(manual)
    with open(os.path.join(manual, MANUAL_FILE), "w") as f:
        f.write("0 200 90")
    (src,) = open_inputs([spec], data_dir=data_dir, download=True)  # the step the message names
    got = [fetch() for _, fetch in src.read(src.items)]
    assert sorted((int(g.image[0, 0, 0]), g.label_name) for g in got) == [(0, "dark"), (90, "dark"), (200, "light")]
    assert "Traceback" not in capsys.readouterr().err


def test_which_builders_need_tensorflow_to_prepare(tmp_path, monkeypatch):
    """TFDS's catalog builders use TensorFlow to prepare (imagenet2012: tf.io.gfile); one yielding bytes does not."""
    from liftcam_jax.data import tfds_prepare

    data_dir = str(tmp_path)
    assert not tfds_prepare.needs_tensorflow(LiftcamTinyImages(data_dir=data_dir))
    assert tfds_prepare.needs_tensorflow(tfds.builder("imagenet2012", data_dir=data_dir))
    assert tfds_prepare.needs_tensorflow(tfds.builder("imagenette", data_dir=data_dir))
    monkeypatch.setattr(tfds_prepare, "tf_available", lambda: False)
    msg = _usage_error(["tfds:imagenet2012:validation[:10]"], data_dir=data_dir)
    manual = os.path.join(data_dir, "downloads", "manual")
    assert f"put its files in {manual} " in msg and "ILSVRC2012_img_val.tar" in msg, msg
    assert "pip install tensorflow-cpu" in msg and "no TensorFlow needed" not in msg, msg
    os.makedirs(manual)
    open(os.path.join(manual, "ILSVRC2012_img_val.tar"), "wb").close()
    msg = _usage_error(["tfds:imagenet2012:validation[:10]"], data_dir=data_dir, download=True)
    assert "uses TensorFlow" in msg and "pip install tensorflow-cpu" in msg, msg


def test_no_absl_lines_before_an_error_and_none_hidden_otherwise(tmp_path, capsys, caplog):
    from absl import logging as absl_logging

    from liftcam_jax.data.tfds_prepare import absl_quiet

    os.makedirs(tmp_path / "liftcam_tiny_images" / "1.0.0")  # TFDS warns: "Variant folder ... has no dataset_info"
    caplog.set_level("WARNING")
    msg = _usage_error(["tfds:liftcam_tiny_images:train"], data_dir=str(tmp_path))
    assert "not prepared" in msg
    assert not [r for r in caplog.records if r.name == "absl"] and "absl" not in capsys.readouterr().err
    with pytest.raises(RuntimeError):
        with absl_quiet():
            absl_logging.warning("dropped: an error follows")
            raise RuntimeError("x")
    with absl_quiet():
        absl_logging.warning("kept: no error")
    assert [r.getMessage() for r in caplog.records if r.name == "absl"] == ["kept: no error"]


# ---------------------------------------------------------------------------
# dataset labels -> model classes
# ---------------------------------------------------------------------------

def test_label_mapping_by_wordnet_id_identity_dict_and_file(tmp_path):
    from liftcam_jax.data import label_mapping

    ids = ["n01440764", "n01443537", "n01484850", "n03417042"]  # a model's classes 0..3
    # imagenette-like names, in the dataset's own order: mapped by name, unknown ones to -1
    got = label_mapping(["n03417042", "n01440764", "n09999999"], 4, class_ids=ids)
    assert got.tolist() == [3, 0, -1]
    # a model whose class names are the dataset's label names, in order
    assert label_mapping(["cat", "dog"], 2, class_names=["cat", "dog"]).tolist() == [0, 1]
    assert label_mapping(["0", "1", "2", "3", "4"], 4, label_map="identity").tolist() == [0, 1, 2, 3, -1]
    assert label_mapping(["cat", "dog"], 10, label_map={"dog": 7}).tolist() == [-1, 7]
    assert label_mapping(["cat", "dog"], 10, label_map={"0": 5}).tolist() == [5, -1]
    f = tmp_path / "map.json"
    f.write_text('{"cat": 2, "dog": 3}')
    assert label_mapping(["cat", "dog"], 10, label_map=str(f)).tolist() == [2, 3]
    # never a silent reuse of the dataset's numbering
    with pytest.raises(UsageError, match="--label-map identity"):
        label_mapping(["cat", "dog"], 10, class_ids=ids, class_names=["tench", "goldfish"])
    with pytest.raises(UsageError, match="not a label"):
        label_mapping(["cat", "dog"], 10, label_map={"cow": 1})
    with pytest.raises(UsageError, match="not a class index"):
        label_mapping(["cat", "dog"], 10, label_map={"cat": 10})
    with pytest.raises(UsageError, match="cannot read the label map"):
        label_mapping(["cat"], 10, label_map=str(tmp_path / "missing.json"))


def test_tfds_spec_with_config_and_version():
    from liftcam_jax.data import parse_tfds_spec

    s = parse_tfds_spec("tfds:imagenette/full-size-v2@1.0.0:validation[:500]")
    assert (s.name, s.version, s.split, s.tfds_name) == (
        "imagenette/full-size-v2", "1.0.0", "validation[:500]", "imagenette/full-size-v2:1.0.0")
    assert parse_tfds_spec("tfds:mnist:train[10%:20%]").tfds_name == "mnist"
    with pytest.raises(UsageError, match=r"NAME\[/CONFIG\]\[@VERSION\]:SPLIT"):
        parse_tfds_spec("tfds:imagenette:1.0.0:validation")


def test_symlinked_folders_are_followed_once_without_loops(tmp_path):
    root = tmp_path / "photos"
    (root / "a").mkdir(parents=True)
    other = tmp_path / "elsewhere"
    other.mkdir()
    for p in (root / "a" / "x.png", other / "y.png"):
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(p)
    os.symlink(other, root / "linked")          # a folder kept elsewhere
    os.symlink(root, root / "a" / "loop")       # a link back up: must not loop
    os.symlink(root / "a", root / "again")      # the same folder twice: listed once
    (src,) = open_inputs([str(root)])
    assert sorted(it.id for it in src.items) == ["photos/a/x", "photos/linked/y"]
