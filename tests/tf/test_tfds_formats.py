"""TFDS as users have it, read with TensorFlow installed (the TensorFlow tier; ``.ci/run`` installs it).

One dataset, built by TFDS's own ``GeneratorBasedBuilder`` twice: as TFRecord
(TFDS's default, what ``tfds.load`` prepares on Colab) forced into 4 shards of
20 examples, more than the 16 that ``tfds.load`` interleaves per file, and as
array_record in 3 shards. Every example has a unique image and a unique
``file_name``, so each id is checked against the example it must be.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

REASON = "TensorFlow tier: needs tensorflow (pip install tensorflow-cpu==2.21.0; .ci/run installs it)"
tf = pytest.importorskip("tensorflow", reason=REASON)
tfds = pytest.importorskip("tensorflow_datasets")

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, TESTS)
import fake_zoo  # noqa: E402

from liftcam_jax import batch, data  # noqa: E402
from liftcam_jax.cli import main  # noqa: E402
from liftcam_jax.errors import UsageError  # noqa: E402

N = 80
# two labels the tiny model has (classes 1 and 0 by WordNet id), one it has not
WNIDS = ["n01443537", "n01440764", "n09999999"]
NAME = "liftcam_sharded"


def example_image(i: int, config: str = "a") -> np.ndarray:
    """A 12 x 10 image unique to example ``i`` (lossless PNG round trip)."""
    rng = np.random.default_rng(1000 * (config == "b") + i)
    return rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)


def _png(a: np.ndarray) -> bytes:
    b = io.BytesIO()
    Image.fromarray(a).save(b, format="PNG")
    return b.getvalue()


class LiftcamSharded(tfds.core.GeneratorBasedBuilder):
    """80 (config a) or 24 (config b) unique images, WordNet-id labels, a unique file name each."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="a"), tfds.core.BuilderConfig(name="b")]

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(names=WNIDS),
            "file_name": tfds.features.Text(),
        }))

    def _split_generators(self, dl_manager):
        return {"validation": self._generate_examples()}

    def _generate_examples(self):
        c = self.builder_config.name
        for i in range(N if c == "a" else 24):
            yield f"{c}{i:03d}", {"image": _png(example_image(i, c)), "label": i % 3, "file_name": f"{c}{i:03d}.png"}


def _prepare(root, file_format, shards, config="a"):
    d = os.path.join(root, file_format)
    LiftcamSharded(config=config, data_dir=d, file_format=file_format).download_and_prepare(
        download_config=tfds.download.DownloadConfig(num_shards=shards))
    return d


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """(tfrecord data dir, array_record data dir) of the same dataset, 4 and 3 shards."""
    root = str(tmp_path_factory.mktemp("tfds"))
    rec, arr = _prepare(root, "tfrecord", 4), _prepare(root, "array_record", 3)
    _prepare(root, "tfrecord", 2, config="b")
    shards = LiftcamSharded(config="a", data_dir=rec).info.splits["validation"].shard_lengths
    assert list(shards) == [20, 20, 20, 20], shards
    return rec, arr


def _split_order(arr_dir):
    """file_name of each index of the split, by random access (the split's own order)."""
    ds = tfds.data_source(f"{NAME}/a", split="validation", data_dir=arr_dir)
    return [ds[i]["file_name"].decode() for i in range(len(ds))]


def _read(spec, data_dir, **kw):
    (src,) = data.open_inputs([spec], data_dir=data_dir, **kw)
    got = {it.id: fetch() for it, fetch in src.read(src.items)}
    return src, got


def test_plain_tfds_load_does_not_yield_the_split_order(twins):
    """The fixture reproduces the trap: enumerating tfds.load interleaves the 4 files."""
    rec, arr = twins
    ds = tfds.load(f"{NAME}/a", split="validation", data_dir=rec, download=False, shuffle_files=False)
    naive = [ex["file_name"].decode() for ex in tfds.as_numpy(ds)]
    order = _split_order(arr)
    assert sorted(naive) == sorted(order) and naive != order


@pytest.mark.parametrize("split", ["validation", "validation[50%:]", "validation[13:47]"])
def test_every_id_is_its_example_in_both_formats(twins, split):
    rec, arr = twins
    order = _split_order(arr)
    src_rec, got_rec = _read(f"tfds:{NAME}/a:{split}", rec)
    src_arr, got_arr = _read(f"tfds:{NAME}/a:{split}", arr)
    assert not src_rec.random_access and src_arr.random_access
    assert [it.id for it in src_rec.items] == [it.id for it in src_arr.items]
    ids = [it.id for it in src_rec.items]
    lo = {"validation": 0, "validation[50%:]": 40, "validation[13:47]": 13}[split]
    assert ids[0] == f"{NAME}/a/validation/{lo:05d}" and len(set(got_rec)) == len(ids)
    for ident in ids:
        i = int(ident.rsplit("/", 1)[1])
        want = example_image(int(order[i][1:4]))  # the image generated for the file at index i
        for got in (got_rec[ident], got_arr[ident]):
            np.testing.assert_array_equal(got.image, want)
            assert got.label == int(order[i][1:4]) % 3 and got.label_name == WNIDS[got.label]


def test_a_slice_reads_only_its_examples(twins):
    rec, _ = twins
    (src,) = data.open_inputs([f"tfds:{NAME}/a:validation[50%:]"], data_dir=rec)
    seen = []
    inner = src._iterate

    def counting(split, lo, hi):
        for ref, ex in inner(split, lo, hi):
            seen.append(ref[1])
            yield ref, ex

    src._iterate = counting
    assert len(list(src.read(src.items))) == 40
    assert seen == list(range(40, 80))
    seen.clear()
    wanted = [it for it in src.items if it.ref[1] in (45, 52, 70)]  # e.g. what a resumed run still needs
    assert [it.ref[1] for it, _ in src.read(wanted)] == [45, 52, 70]
    assert seen == list(range(45, 71))


def test_configs_versions_and_feature_keys(twins):
    rec, _ = twins
    src, got = _read(f"tfds:{NAME}/b@1.0.0:validation[2:5]", rec)
    assert [it.id for it in src.items] == [f"{NAME}/b/validation/0000{i}" for i in (2, 3, 4)]
    assert src.items[0].source == f"tfds:{NAME}/b@1.0.0:validation[2]"
    order = [ex["file_name"].decode() for ex in tfds.as_numpy(tfds.load(
        f"{NAME}/b", split="validation", data_dir=rec, download=False,
        read_config=tfds.ReadConfig(interleave_cycle_length=1)))]
    for it in src.items:
        np.testing.assert_array_equal(got[it.id].image, example_image(int(order[it.ref[1]][1:4]), "b"))
    with pytest.raises(UsageError, match=r"cannot be loaded at version 9\.9\.9, only: 1\.0\.0"):
        data.open_inputs([f"tfds:{NAME}/b@9.9.9:validation"], data_dir=rec)
    with pytest.raises(UsageError, match=r"no image feature 'photo'.*image features: image"):
        data.open_inputs([f"tfds:{NAME}/a:validation"], data_dir=rec, image_key="photo")
    with pytest.raises(UsageError, match=r"no label feature 'file_name'"):
        data.open_inputs([f"tfds:{NAME}/a:validation"], data_dir=rec, label_key="file_name")


def _explain(spec, data_dir, out, *extra):
    return main(["explain", spec, "--data-dir", str(data_dir), "--model", "tiny", "--out", str(out),
                 "--save", "raw", "--batch-size", "16", "--quiet", *extra], zoo=fake_zoo)


def _npz(out, ident):
    with np.load(os.path.join(out, ident + ".npz")) as z:
        return {k: z[k] for k in z.files}


@pytest.mark.parametrize("split", ["validation", "validation[50%:]"])
def test_explain_twins_give_the_same_results_per_id(twins, tmp_path, split):
    rec, arr = twins
    assert _explain(f"tfds:{NAME}/a:{split}", rec, tmp_path / "rec") == 0
    assert _explain(f"tfds:{NAME}/a:{split}", arr, tmp_path / "arr") == 0
    m_rec, m_arr = batch.read_manifests(tmp_path / "rec"), batch.read_manifests(tmp_path / "arr")
    assert sorted(m_rec) == sorted(m_arr) and len(m_rec) == (80 if split == "validation" else 40)
    order = _split_order(arr)
    clf = fake_zoo.load("tiny")
    for ident, r in m_rec.items():
        a, b = _npz(tmp_path / "rec", ident), _npz(tmp_path / "arr", ident)
        np.testing.assert_array_equal(a["logits"], b["logits"])
        i = int(ident.rsplit("/", 1)[1])
        x = clf.preprocess(example_image(int(order[i][1:4])))[None]
        np.testing.assert_allclose(a["logits"], np.asarray(clf.logits(x))[0], rtol=1e-5, atol=1e-6)
        assert int(a["label"]) == r["label"] == int(order[i][1:4]) % 3
        assert str(a["label_name"]) == r["label_name"] == WNIDS[r["label"]]


def test_target_label_maps_wordnet_ids_and_fails_unknown_ones(twins, tmp_path, capsys):
    rec, _ = twins
    out = tmp_path / "o"
    rc = _explain(f"tfds:{NAME}/a:validation[:12]", rec, out, "--target", "label")
    assert rc == 1  # the label the model has no class for fails, one by one
    err = capsys.readouterr().err
    recs = batch.read_manifests(out)
    for ident, r in recs.items():
        want = {"n01443537": 1, "n01440764": 0}.get(r["label_name"])
        if want is None:
            assert r["status"] == "failed" and "has no class in tiny" in r["error"]
            assert "has no class in tiny" in err
        else:
            assert r["status"] == "done" and r["target"] == want
            assert int(_npz(out, ident)["target"]) == want
    # a rerun retries only the failed ones and fails them again, with the same message
    assert _explain(f"tfds:{NAME}/a:validation[:12]", rec, out, "--target", "label") == 1


def test_resume_on_tfrecord_equals_one_run(twins, tmp_path):
    rec, _ = twins
    spec = f"tfds:{NAME}/a:validation"
    assert _explain(spec, rec, tmp_path / "one") == 0
    assert _explain(spec, rec, tmp_path / "two", "--limit", "30") == 0
    assert _explain(spec, rec, tmp_path / "two") == 0
    one, two = batch.read_manifests(tmp_path / "one"), batch.read_manifests(tmp_path / "two")
    assert sorted(one) == sorted(two) and len(one) == N
    for ident in one:
        np.testing.assert_array_equal(_npz(tmp_path / "one", ident)["logits"], _npz(tmp_path / "two", ident)["logits"])


def test_evaluate_on_tfrecord_equals_array_record(twins, tmp_path, capsys):
    rec, arr = twins
    res = {}
    for name, d in (("rec", rec), ("arr", arr)):
        out = tmp_path / name
        rc = main(["evaluate", "--data", f"tfds:{NAME}/a:validation[:20]", "--data-dir", str(d), "--model", "tiny",
                   "--methods", "lift-cam", "--metrics", "ad,ic", "--out", str(out), "--quiet", "--grid", "0"],
                  zoo=fake_zoo)
        assert rc == 1  # labels n09999999 have no class in the model: those images fail, clearly
        res[name] = json.loads((out / "results.json").read_text())
    assert "has no class in tiny" in capsys.readouterr().err
    a = {r["item"]: r for r in res["rec"]["per_image"]}
    b = {r["item"]: r for r in res["arr"]["per_image"]}
    order = _split_order(arr)
    known = [f"{NAME}/a/validation/{i:05d}" for i in range(20) if int(order[i][1:4]) % 3 != 2]
    assert sorted(a) == sorted(b) == known and 0 < len(known) < 20  # not those with the unknown label
    for k in a:
        assert a[k]["label"] == b[k]["label"] and a[k]["metrics"] == b[k]["metrics"]
        # the dataset's label, its name, and the model class it maps to by WordNet id
        assert a[k]["label_name"] == WNIDS[a[k]["dataset_label"]]
        assert a[k]["label"] == a[k]["target"] == {"n01443537": 1, "n01440764": 0}[a[k]["label_name"]]


def test_without_tensorflow_the_error_names_a_step_that_works(twins, tmp_path, monkeypatch):
    rec, arr = twins
    copy = tmp_path / "tfds"
    shutil.copytree(rec, copy)
    monkeypatch.setattr(data.tfds_prepare, "tf_available", lambda: False)
    with pytest.raises(UsageError) as e:
        data.open_inputs([f"tfds:{NAME}/a:validation"], data_dir=str(copy))
    msg = str(e.value)
    assert "\n" not in msg and "pip install tensorflow-cpu" in msg and "FileFormat" not in msg
    command = msg.split("(then read without it): ", 1)[1]
    assert command.startswith("python -c ")
    # the step the message names, run as the user would (TensorFlow installed there, once)
    subprocess.run(command.replace("python -c", f"{sys.executable} -c", 1), shell=True, check=True, cwd=TESTS,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # now read without TensorFlow, by random access: the same examples behind the same ids
    src, got = _read(f"tfds:{NAME}/a:validation", str(copy))
    assert src.random_access
    order = _split_order(arr)
    for it in src.items:
        np.testing.assert_array_equal(got[it.id].image, example_image(int(order[it.ref[1]][1:4])))
