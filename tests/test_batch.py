"""Batch explaining (liftcam_jax.batch.run) and crash-safe files (liftcam_jax.files), in process.

The outputs are checked against :func:`liftcam_jax.explain` called directly on
the same preprocessed inputs, so the pipeline (decode, preprocess, pad,
shard, unpad, write) cannot change a result unnoticed.
"""
import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
import fake_zoo  # noqa: E402

from liftcam_jax import batch, explain, files as lio, viz  # noqa: E402
from liftcam_jax.errors import UsageError  # noqa: E402


@pytest.fixture(scope="module")
def clf():
    return fake_zoo.load("tiny")


def _photos(folder, n, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = folder / f"img{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, (30 + 3 * i, 40, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def _direct(clf, images_uint8, target=None):
    x = np.stack([clf.preprocess(im) for im in images_uint8])
    return explain(clf.split, clf.params, x, target), x


def _manifest(out):
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def test_outputs_equal_direct_explain_and_padding_is_never_written(tmp_path, clf):
    paths = _photos(tmp_path / "in", 5)
    out = tmp_path / "out"
    s = batch.run(clf, [str(tmp_path / "in")], out_dir=out, batch_size=4, quiet=True)  # 4 + 1 padded to 4
    assert (s.done, s.skipped, s.failed, s.total) == (5, 0, 0, 5)
    images = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    want, _ = _direct(clf, images)
    for i, p in enumerate(paths):
        z = np.load(out / "in" / f"img{i:02d}.npz")
        assert set(z.files) == {"map", "raw", "coefficients", "logits", "target", "predicted", "reference_logits"}
        np.testing.assert_allclose(z["map"], want.maps[i], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(z["raw"], want.raw[i], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(z["coefficients"], want.coefficients[i], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(z["logits"], want.logits[i], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(z["reference_logits"], want.reference_logits[i], rtol=1e-5, atol=1e-6)
        assert int(z["target"]) == int(want.targets[i]) == int(z["predicted"])
        # the overlay is the map on the image the model saw
        shown = clf.preprocess.resize_image(images[i])
        png = np.asarray(Image.open(out / "in" / f"img{i:02d}.png"))
        np.testing.assert_array_equal(png, viz.overlay(shown, z["map"]))
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == ["in/" + f"img{i:02d}.{e}" for i in range(5) for e in ("npz", "png")] + [
        "manifest.jsonl", "run.json"]
    lines = _manifest(out)
    assert [r["id"] for r in lines] == [f"in/img{i:02d}" for i in range(5)]
    r = lines[0]
    assert r["status"] == "done" and r["error"] is None and r["source"] == str(paths[0])
    assert r["outputs"] == ["in/img00.npz", "in/img00.png"]
    assert r["predicted_name"] == f"class{r['predicted']}" and r["target"] == r["predicted"]


def test_npy_inputs_are_not_preprocessed_again(tmp_path, clf):
    x = np.random.default_rng(1).normal(size=(3, 32, 32, 3)).astype(np.float32)
    x[2, 0, 0, 0] = np.inf
    np.save(tmp_path / "batch.npy", x)
    np.save(tmp_path / "small.npy", np.zeros((1, 16, 16, 3), np.float32))
    out = tmp_path / "out"
    s = batch.run(clf, [str(tmp_path / "batch.npy"), str(tmp_path / "small.npy")], out_dir=out,
                  batch_size=2, target=3, quiet=True)
    assert (s.done, s.failed) == (2, 2)
    want = explain(clf.split, clf.params, x[:2], 3)
    for i in range(2):
        z = np.load(out / f"batch_{i}.npz")
        np.testing.assert_allclose(z["map"], want.maps[i], rtol=1e-5, atol=1e-6)
        assert int(z["target"]) == 3
        png = np.asarray(Image.open(out / f"batch_{i}.png"))
        np.testing.assert_array_equal(png, viz.overlay(clf.preprocess.denormalize(x[i]), z["map"]))
    rec = {r["id"]: r for r in _manifest(out)}
    assert rec["batch_2"]["status"] == "failed" and "NaN or Inf" in rec["batch_2"]["error"]
    assert rec["small_0"]["status"] == "failed" and "(16, 16, 3)" in rec["small_0"]["error"]
    assert not (out / "batch_2.npz").exists()


def test_tiny_images_are_upscaled_and_extreme_strips_refused(tmp_path, clf):
    d = tmp_path / "in"
    d.mkdir()
    Image.new("RGB", (1, 1), (200, 10, 10)).save(d / "dot.png")
    Image.new("L", (60000, 1)).save(d / "strip.png")  # 36 x 2.16 M pixels once resized: refused
    s = batch.run(clf, [str(d)], out_dir=tmp_path / "out", quiet=True)
    assert (s.done, s.failed) == (1, 1)
    rec = batch.read_manifests(tmp_path / "out")
    assert "aspect ratio too extreme" in rec["in/strip"]["error"]
    png = np.asarray(Image.open(tmp_path / "out" / "in" / "dot.png"))
    assert png.shape == (32, 32, 3)


def test_save_modes_and_explicit_target(tmp_path, clf):
    _photos(tmp_path / "in", 2)
    s = batch.run(clf, [str(tmp_path / "in")], out_dir=tmp_path / "raw", save="raw", target=7, quiet=True)
    assert s.done == 2
    assert sorted(p.suffix for p in (tmp_path / "raw" / "in").iterdir()) == [".npz", ".npz"]
    assert all(r["target"] == 7 and r["target_name"] == "class7" for r in _manifest(tmp_path / "raw"))
    batch.run(clf, [str(tmp_path / "in")], out_dir=tmp_path / "ov", save="overlay", quiet=True)
    assert sorted(p.suffix for p in (tmp_path / "ov" / "in").iterdir()) == [".png", ".png"]


def test_resume_skips_done_redoes_missing_and_survives_a_torn_line(tmp_path, clf):
    _photos(tmp_path / "in", 6)
    out = tmp_path / "out"
    batch.run(clf, [str(tmp_path / "in")], out_dir=out, batch_size=4, quiet=True)
    ref = {p.name: np.load(p)["map"] for p in (out / "in").glob("*.npz")}
    os.remove(out / "in" / "img03.npz")  # an output lost after its line was written
    with open(out / "manifest.jsonl", "ab") as f:
        f.write(b'{"id": "in/img05", "status": "do')  # a torn last line (crash mid-append)
    s = batch.run(clf, [str(tmp_path / "in")], out_dir=out, batch_size=4, quiet=True)
    assert (s.done, s.skipped, s.failed) == (1, 5, 0)
    text = (out / "manifest.jsonl").read_text()
    assert text.endswith("\n") and '"status": "do' + "\n" not in text
    latest = batch.read_manifests(out)
    assert len(latest) == 6 and all(r["status"] == "done" for r in latest.values())
    for name, m in ref.items():
        if name == "img03.npz":  # explained again, in a batch of another size: XLA may round differently
            np.testing.assert_allclose(np.load(out / "in" / name)["map"], m, rtol=1e-5, atol=1e-6)
        else:  # skipped: the file is the first run's, untouched
            np.testing.assert_array_equal(np.load(out / "in" / name)["map"], m)
    # everything done: a third run does nothing
    s = batch.run(clf, [str(tmp_path / "in")], out_dir=out, quiet=True)
    assert (s.done, s.skipped) == (0, 6)
    # asking for overlays only: also already there
    assert batch.run(clf, [str(tmp_path / "in")], out_dir=out, save="overlay", quiet=True).skipped == 6


def test_failed_items_are_retried_on_rerun(tmp_path, clf):
    d = tmp_path / "in"
    _photos(d, 1)
    (d / "late.png").write_bytes(b"")
    out = tmp_path / "out"
    assert batch.run(clf, [str(d)], out_dir=out, quiet=True).failed == 1
    Image.new("RGB", (8, 8)).save(d / "late.png")  # fixed in the meantime
    s = batch.run(clf, [str(d)], out_dir=out, quiet=True)
    assert (s.done, s.skipped, s.failed) == (1, 1, 0)
    assert batch.read_manifests(out)["in/late"]["status"] == "done"


def test_a_different_run_in_the_same_folder_is_refused(tmp_path, clf):
    _photos(tmp_path / "in", 1)
    out = tmp_path / "out"
    batch.run(clf, [str(tmp_path / "in")], out_dir=out, quiet=True)
    with pytest.raises(UsageError, match="different run.*target 'auto' \\(now 2\\)"):
        batch.run(clf, [str(tmp_path / "in")], out_dir=out, target=2, quiet=True)
    with pytest.raises(UsageError, match="different run.*layer 'conv2' \\(now 'conv1'\\)"):
        batch.run(fake_zoo.load("tiny", layer="conv1"), [str(tmp_path / "in")], out_dir=out, quiet=True)


def test_usage_errors_come_before_any_output(tmp_path, clf):
    _photos(tmp_path / "in", 1)
    inp = [str(tmp_path / "in")]
    out = tmp_path / "out"
    with pytest.raises(UsageError, match="target index 10 out of range .*10 classes"):
        batch.run(clf, inp, out_dir=out, target=10)
    with pytest.raises(UsageError, match="unknown method 'nope'; valid methods: .*lift-cam"):
        batch.run(clf, inp, out_dir=out, method="nope")
    with pytest.raises(UsageError, match="unknown save mode"):
        batch.run(clf, inp, out_dir=out, save="pdf")
    assert not out.exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="not writable"):
        batch.run(clf, inp, out_dir=tmp_path / "file" / "sub")
    with pytest.raises(UsageError, match="input not found"):
        batch.run(clf, [str(tmp_path / "missing")], out_dir=out)


def test_hosts_split_the_work_and_resume_together(tmp_path, clf):
    _photos(tmp_path / "in", 5)
    out = tmp_path / "out"
    s0 = batch.run(clf, [str(tmp_path / "in")], out_dir=out, process_index=0, process_count=2, quiet=True)
    s1 = batch.run(clf, [str(tmp_path / "in")], out_dir=out, process_index=1, process_count=2, quiet=True)
    assert (s0.done, s1.done) == (3, 2)
    m0 = lio.read_jsonl(out / "manifest-00000-of-00002.jsonl")
    m1 = lio.read_jsonl(out / "manifest-00001-of-00002.jsonl")
    assert [r["id"] for r in m0] == ["in/img00", "in/img02", "in/img04"]
    assert [r["id"] for r in m1] == ["in/img01", "in/img03"]
    s = batch.run(clf, [str(tmp_path / "in")], out_dir=out, quiet=True)  # one host afterwards
    assert (s.done, s.skipped) == (0, 5)


def test_limit_and_batch_rounding_note(tmp_path, clf, capsys):
    import jax

    _photos(tmp_path / "in", 4)
    s = batch.run(clf, [str(tmp_path / "in")], out_dir=tmp_path / "out", limit=3, batch_size=3,
                  devices=jax.local_devices()[:1])
    assert (s.done, s.total, s.batch_size) == (3, 3, 3)
    err = capsys.readouterr().err
    assert "3 done, 0 skipped (already done), 0 failed of 3" in err


# ---------------------------------------------------------------------------
# liftcam_jax.files
# ---------------------------------------------------------------------------

def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    p = tmp_path / "f.bin"
    lio.write_bytes(p, b"old")
    with pytest.raises(RuntimeError):
        with lio.atomic_write(p) as f:
            f.write(b"half of the new conte")
            raise RuntimeError("crash")
    assert p.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["f.bin"]  # no temp file left
    lio.write_npz(tmp_path / "a" / "x.npz", m=np.arange(3), skipped=None)
    assert np.load(tmp_path / "a" / "x.npz").files == ["m"]


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_written_files_respect_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        lio.write_bytes(tmp_path / "f.bin", b"x")
        lio.write_npz(tmp_path / "sub" / "x.npz", m=np.arange(3))
    finally:
        os.umask(old)
    for p in (tmp_path / "f.bin", tmp_path / "sub" / "x.npz"):
        assert os.stat(p).st_mode & 0o777 == 0o666 & ~mask, oct(os.stat(p).st_mode)


def test_a_short_batch_is_padded_only_to_a_bucket():
    assert [batch.padded_size(n, 32, 1) for n in (1, 2, 3, 5, 17, 32)] == [1, 2, 4, 8, 32, 32]
    assert [batch.padded_size(n, 32, 4) for n in (1, 4, 5, 9, 31)] == [4, 4, 8, 16, 32]
    assert batch.padded_size(7, 24, 8) == 8 and batch.padded_size(17, 24, 8) == 24


def test_one_image_runs_at_its_own_size(clf, tmp_path, monkeypatch):
    """One photo with the default batch size: the compiled step sees one row, not 32."""
    _photos(tmp_path / "in", 1)
    shapes = []
    from liftcam_jax.runs import explain as runs_explain

    real = runs_explain.compiled_step

    def spy(*a, **k):
        step, data, repl = real(*a, **k)
        return (lambda p, x, t, key: (shapes.append(x.shape[0]), step(p, x, t, key))[1]), data, repl

    monkeypatch.setattr(runs_explain, "compiled_step", spy)
    s = batch.run(clf, [str(tmp_path / "in")], out_dir=tmp_path / "out", quiet=True)
    assert s.done == 1 and shapes == [1]


def test_manifest_cuts_a_torn_tail_and_latest_wins(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_bytes(b'{"id": "a", "status": "failed"}\n{"id": "b", "sta')
    assert [r["id"] for r in lio.read_jsonl(p)] == ["a"]
    with lio.Manifest(p) as m:
        m.append({"id": "a", "status": "done"})
    assert p.read_text() == '{"id": "a", "status": "failed"}\n{"id": "a", "status": "done"}\n'
    assert lio.Manifest(p).latest() == {"a": {"id": "a", "status": "done"}}
    q = tmp_path / "only_torn.jsonl"
    q.write_bytes(b'{"id": "x"')
    with lio.Manifest(q) as m:
        m.append({"id": "y"})
    assert q.read_text() == '{"id": "y"}\n'


def test_submodules_load_on_attribute_access():
    import subprocess

    code = "import liftcam_jax as lj; print(lj.batch.run.__name__, lj.data.open_inputs.__name__, lj.metrics.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["run", "open_inputs", "liftcam_jax.metrics"]
