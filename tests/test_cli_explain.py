"""``liftcam-jax explain``: exit codes, messages, bad inputs, kill -9 and resume, 1 vs 4 devices.

Most tests use the tiny model of ``tests/fake_zoo.py`` (in process, or as a
script in a subprocess); two end-to-end tests use the real zoo
(``efficientnet_lite0``, pretrained, on the bundled photos).
"""
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TESTS)
import fake_zoo  # noqa: E402

from liftcam_jax.cli import main  # noqa: E402

FAKE = os.path.join(TESTS, "fake_zoo.py")


def cli(*argv):
    return main(["explain", *map(str, argv)], zoo=fake_zoo)


def _photos(folder, n, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (24 + i, 40, 3), dtype=np.uint8)).save(folder / f"p{i:02d}.png")
    return folder


def _lines(path):
    return [json.loads(x) for x in open(path, encoding="utf-8").read().splitlines()]


def _env(**extra):
    env = dict(os.environ)
    env.update({"JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"})
    env.pop("XLA_FLAGS", None)
    env.update(extra)
    return env


# ---------------------------------------------------------------------------
# every kind of bad input: one clear line each, the run goes on, exit 1
# ---------------------------------------------------------------------------

def _zoo_of_bad_inputs(d):
    d.mkdir()
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    (d / "zero.jpg").write_bytes(b"")
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG")
    (d / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (d / "text.jpg").write_text("not an image at all\n")
    Image.fromarray(rgb).convert("CMYK").save(d / "cmyk.jpg")
    Image.fromarray((rng.integers(0, 65536, (20, 30))).astype(np.uint16)).save(d / "g16.png")
    Image.fromarray(np.dstack([rgb, np.full((20, 30), 100, np.uint8)]), "RGBA").save(d / "rgba.png")
    p = Image.fromarray(rgb).convert("P")
    p.save(d / "ptrans.png", transparency=0)
    Image.fromarray(rgb).convert("L").save(d / "gray.png")
    Image.fromarray(rgb).convert("LA").save(d / "graya.png")
    Image.new("RGB", (1, 1), (9, 99, 199)).save(d / "tiny1x1.png")
    x = np.zeros((2, 32, 32, 3), np.float32)
    x[1, 5, 5, 1] = np.nan
    np.save(d / "arrays.npy", x)
    np.save(d / "wrongshape.npy", np.zeros((2, 32, 32), np.float32))
    np.save(d / "wrongchannels.npy", np.zeros((1, 32, 32, 1), np.float32))
    return d


def test_every_bad_input_fails_alone_with_one_line(tmp_path, capsys):
    d = _zoo_of_bad_inputs(tmp_path / "in")
    npys = [d / "arrays.npy", d / "wrongshape.npy", d / "wrongchannels.npy"]
    rc = cli(d, *npys, "--model", "tiny", "--out", tmp_path / "out", "--batch-size", "4")
    assert rc == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    rec = {r["id"]: r for r in _lines(tmp_path / "out" / "manifest.jsonl")}
    failed = {k: r["error"] for k, r in rec.items() if r["status"] == "failed"}
    assert set(failed) == {"in/zero", "in/truncated", "in/text", "arrays_1", "wrongshape", "wrongchannels"}
    assert "empty file" in failed["in/zero"]
    assert "truncated" in failed["in/truncated"]
    assert "not an image" in failed["in/text"]
    assert "NaN or Inf" in failed["arrays_1"]
    assert "expected (N, H, W, 3)" in failed["wrongshape"] and "expected (N, H, W, 3)" in failed["wrongchannels"]
    done = {k for k, r in rec.items() if r["status"] == "done"}
    assert done == {"in/cmyk", "in/g16", "in/rgba", "in/ptrans", "in/gray", "in/graya", "in/tiny1x1", "arrays_0"}
    for k in done:
        z = np.load(tmp_path / "out" / f"{k}.npz")
        assert z["map"].shape == (32, 32) and np.isfinite(z["map"]).all()
        assert Image.open(tmp_path / "out" / f"{k}.png").size == (32, 32)
    for k, msg in failed.items():  # one line per failure on stderr, naming the input
        lines = [ln for ln in err.splitlines() if ln.startswith("liftcam-jax: failed:") and msg in ln]
        assert len(lines) == 1, (k, err)
    assert "8 done, 0 skipped (already done), 6 failed of 14" in err


@pytest.mark.parametrize("argv, message", [
    (["--model", "nope"], "unknown model 'nope'; valid models: tiny"),
    (["--model", "tiny", "--method", "nope"], "unknown method 'nope'; valid methods: "),
    (["--model", "tiny", "--layer", "conv9"], "unknown layer 'conv9' for tiny; valid layers: conv1, conv2"),
    (["--model", "tiny", "--target", "10"], "target index 10 out of range"),
    (["--model", "tiny", "--target", "dog"], "bad target 'dog'"),
    (["--model", "tiny", "--batch-size", "0"], "expected a positive integer"),
    (["--model", "tiny", "--save", "pdf"], "invalid choice: 'pdf'"),
])
def test_usage_errors_exit_2_with_one_line_and_no_work(tmp_path, capsys, argv, message):
    d = _photos(tmp_path / "in", 1)
    rc = cli(d, "--out", tmp_path / "out", *argv)
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("liftcam-jax: error: ") and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "manifest.jsonl").exists()


def test_model_and_out_default_to_the_zoos_model_and_a_folder_named_in_the_summary(tmp_path, capsys, monkeypatch):
    d = _photos(tmp_path / "in", 2)
    monkeypatch.chdir(tmp_path)
    assert cli(d) == 0
    err = capsys.readouterr().err
    out = tmp_path / "liftcam-out" / "in"
    assert {r["status"] for r in _lines(out / "manifest.jsonl")} == {"done"}
    assert json.loads((out / "run.json").read_text())["model"] == "tiny"
    assert f"model: tiny; output: {os.path.join('liftcam-out', 'in')};" in err


def test_the_default_model_is_the_zoos_then_the_bundled_one():
    import types

    import models
    from liftcam_jax.commands import _args
    from liftcam_jax.errors import UsageError

    assert _args.model_name(models) == _args.BUNDLED_MODEL == "efficientnet_lite0"  # pretrained, offline
    assert _args.model_name(fake_zoo) == "tiny"  # a zoo's only model
    two = types.SimpleNamespace(names=lambda: ["a", "b"])
    with pytest.raises(UsageError, match="give --model; valid models: a, b"):
        _args.model_name(two)
    two.DEFAULT_MODEL = "b"
    assert _args.model_name(two) == "b" and _args.model_name(two, "a") == "a"
    with pytest.raises(UsageError, match="unknown model 'c'"):
        _args.model_name(two, "c")
    assert _args.default_out("photos/cat.jpg") == os.path.join("liftcam-out", "cat")
    assert _args.default_out("tfds:imagenette:validation[:500]", "-evaluate") == os.path.join(
        "liftcam-out", "imagenette-validation-500-evaluate")


def test_usage_errors_for_inputs_and_output(tmp_path, capsys):
    d = _photos(tmp_path / "in", 1)
    (tmp_path / "f").write_text("x")
    cases = [
        ([tmp_path / "missing.jpg", "--out", tmp_path / "o"], "input not found"),
        ([tmp_path / "f", "--out", tmp_path / "o2", "--data-dir", tmp_path], None),  # a non-image file: item failure
        ([d, "--out", tmp_path / "f" / "sub"], "is not writable"),
        (["tfds:no_such_dataset_xyz:train", "--out", tmp_path / "o3", "--data-dir", tmp_path], "not found"),
    ]
    for argv, message in cases:
        rc = cli(*argv, "--model", "tiny", "--quiet")
        err = capsys.readouterr().err
        if message is None:
            assert rc == 1 and "not an image" in err
        else:
            assert rc == 2 and message in err and "Traceback" not in err, err


def test_a_write_failure_stops_the_run_with_one_line_and_resumes_later(tmp_path, capsys):
    d = _photos(tmp_path / "in", 3)
    blocker = tmp_path / "out" / "in" / "p01.npz"
    blocker.mkdir(parents=True)  # a folder where an output file must go
    assert cli(d, "--model", "tiny", "--out", tmp_path / "out", "--quiet") == 2
    err = capsys.readouterr().err
    assert err.startswith("liftcam-jax: error: cannot write ") and "p01.npz" in err and "Traceback" not in err
    blocker.rmdir()
    assert cli(d, "--model", "tiny", "--out", tmp_path / "out", "--quiet") == 0
    rec = _lines(tmp_path / "out" / "manifest.jsonl")
    assert sorted(r["id"] for r in rec) == ["in/p00", "in/p01", "in/p02"]


def test_quiet_prints_nothing_and_exit_0(tmp_path, capsys):
    d = _photos(tmp_path / "in", 3)
    assert cli(d, "--model", "tiny", "--out", tmp_path / "out", "--quiet") == 0
    cap = capsys.readouterr()
    assert cap.err == "" and cap.out == ""
    assert cli(d, "--model", "tiny", "--out", tmp_path / "out") == 0  # resumed: all skipped
    assert "0 done, 3 skipped" in capsys.readouterr().err


def test_tfds_split_through_the_cli(tmp_path, capsys):
    from test_data import LiftcamTinyImages, N_TFDS

    data_dir = tmp_path / "tfds"
    LiftcamTinyImages(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    capsys.readouterr()
    rc = cli("tfds:liftcam_tiny_images:train[1:6]", "--model", "tiny", "--out", tmp_path / "out",
             "--data-dir", data_dir, "--batch-size", "2", "--quiet")
    assert rc == 0
    ids = [r["id"] for r in _lines(tmp_path / "out" / "manifest.jsonl")]
    assert ids == [f"liftcam_tiny_images/train/{i:05d}" for i in range(1, 6)]
    for i in ids:
        assert np.load(tmp_path / "out" / f"{i}.npz")["map"].shape == (32, 32)
    assert N_TFDS == 7


# ---------------------------------------------------------------------------
# subprocesses: kill -9 and resume; 1 device vs 4
# ---------------------------------------------------------------------------

def _run(args, **env):
    return subprocess.run([sys.executable, FAKE, "explain", *map(str, args)], env=_env(**env),
                          capture_output=True, text=True, timeout=600)


def _npz_tree(out):
    res = {}
    for root, _, files in os.walk(out):
        for f in files:
            if f.endswith(".npz"):
                p = os.path.join(root, f)
                with np.load(p) as z:
                    res[os.path.relpath(p, out)] = {k: z[k] for k in z.files}
    return res


def _assert_same_npz(a, b, exact=True):
    assert sorted(a) == sorted(b)
    for name in a:
        assert sorted(a[name]) == sorted(b[name])
        for k in a[name]:
            if exact:
                np.testing.assert_array_equal(a[name][k], b[name][k], err_msg=f"{name}:{k}")
            else:
                np.testing.assert_allclose(a[name][k], b[name][k], rtol=1e-5, atol=1e-6, err_msg=f"{name}:{k}")


@pytest.mark.slow
def test_kill_9_part_way_then_resume_gives_the_uninterrupted_result(tmp_path):
    d = _photos(tmp_path / "in", 40)
    out = tmp_path / "out"
    args = [d, "--model", "tiny", "--out", out, "--batch-size", "4", "--workers", "1"]
    proc = subprocess.Popen([sys.executable, FAKE, "explain", *map(str, args)], env=_env(FAKE_ZOO_SLOW="0.1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = out / "manifest.jsonl"
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if manifest.exists() and manifest.read_bytes().count(b"\n") >= 8:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    n_before = len([ln for ln in manifest.read_bytes().split(b"\n") if ln.strip()])
    assert 8 <= n_before < 40

    again = _run(args)
    assert again.returncode == 0, again.stderr
    assert "skipped (already done)" in again.stderr
    lines = _lines(manifest)  # every line parses (a torn tail was cut)
    ids = [r["id"] for r in lines]
    assert sorted(ids) == sorted(f"in/p{i:02d}" for i in range(40))  # each input exactly once
    assert all(r["status"] == "done" for r in lines)
    leftovers = [f for _, _, fs in os.walk(out) for f in fs if f.endswith(".tmp")]
    assert leftovers == []

    ref = tmp_path / "ref"
    clean = _run([d, "--model", "tiny", "--out", ref, "--batch-size", "4", "--quiet"])
    assert clean.returncode == 0, clean.stderr
    _assert_same_npz(_npz_tree(out), _npz_tree(ref))
    for r in lines:  # overlays too
        for o in r["outputs"]:
            if o.endswith(".png"):
                np.testing.assert_array_equal(np.asarray(Image.open(out / o)), np.asarray(Image.open(ref / o)))


@pytest.mark.slow
def test_one_device_and_four_devices_give_the_same_results(tmp_path):
    d = _photos(tmp_path / "in", 7)
    x = np.random.default_rng(3).normal(size=(3, 32, 32, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    common = [d, tmp_path / "x.npy", "--model", "tiny"]
    one = _run([*common, "--out", tmp_path / "one", "--batch-size", "3"])
    four = _run([*common, "--out", tmp_path / "four", "--batch-size", "6"],
                XLA_FLAGS="--xla_force_host_platform_device_count=4")
    assert one.returncode == 0, one.stderr
    assert four.returncode == 0, four.stderr
    assert "batch size 6 rounded up to 8, a multiple of the 4 devices" in four.stderr
    assert "batch 8 on 4 devices" in four.stderr and "batch 3 on 1 device" in one.stderr
    a, b = _npz_tree(tmp_path / "one"), _npz_tree(tmp_path / "four")
    assert len(a) == 10
    _assert_same_npz(a, b, exact=False)  # other batch shapes: XLA may round the last bit differently


# ---------------------------------------------------------------------------
# the real zoo, end to end
# ---------------------------------------------------------------------------

@pytest.mark.slow
def test_real_zoo_efficientnet_lite0_on_the_bundled_photos(tmp_path, capsys):
    models = pytest.importorskip("models")
    photos = models.sample_images()
    assert photos
    rc = main(["explain", *map(str, photos), "--model", "efficientnet_lite0", "--out", str(tmp_path / "out"),
               "--batch-size", "2", "--quiet"], zoo=models)
    assert rc == 0, capsys.readouterr().err
    rec = _lines(tmp_path / "out" / "manifest.jsonl")
    assert [r["id"] for r in rec] == [p.stem for p in photos]
    names = {r["id"]: r["predicted_name"] for r in rec}
    # pretrained weights: the cat photo is a cat, the coffee a cup of coffee/espresso
    if "chelsea" in names:
        assert "cat" in names["chelsea"].lower(), names
    for r in rec:
        z = np.load(tmp_path / "out" / f"{r['id']}.npz")
        assert z["map"].shape == (224, 224) and z["map"].max() == pytest.approx(1.0)
        # LIFT-CAM's summation-to-delta: coefficients sum to y_c(A) - y_c(0)
        t = int(z["target"])
        assert z["coefficients"].sum() == pytest.approx(z["logits"][t] - z["reference_logits"][t], rel=1e-3, abs=1e-3)
        assert Image.open(tmp_path / "out" / f"{r['id']}.png").size == (224, 224)


@pytest.mark.slow
def test_real_zoo_unknown_layer_is_a_usage_error(tmp_path, capsys):
    models = pytest.importorskip("models")
    rc = main(["explain", str(models.sample_images()[0]), "--model", "efficientnet_lite0", "--layer", "nope",
               "--weights", "random", "--out", str(tmp_path / "out")], zoo=models)
    assert rc == 2
    err = capsys.readouterr().err
    assert "unknown layer 'nope'" in err and "valid layers" in err and "Traceback" not in err
    assert "blocks.15.expand, blocks.15.dw, blocks.15," in err  # the points inside blocks too


@pytest.mark.slow
def test_real_zoo_lift_cam_inside_the_last_block_of_lite0(tmp_path, capsys):
    """``--layer blocks.15.dw``: 1152 post-ReLU6 maps, a non-linear head; summation-to-delta holds."""
    models = pytest.importorskip("models")
    photo = {p.stem: p for p in models.sample_images()}["chelsea"]
    rc = main(["explain", str(photo), "--model", "efficientnet_lite0", "--layer", "blocks.15.dw",
               "--out", str(tmp_path / "out"), "--quiet"], zoo=models)
    assert rc == 0, capsys.readouterr().err
    (r,) = _lines(tmp_path / "out" / "manifest.jsonl")
    assert r["status"] == "done" and "cat" in r["predicted_name"].lower()
    z = np.load(tmp_path / "out" / "chelsea.npz")
    t = int(z["target"])
    y, y0, phi = float(z["logits"][t]), float(z["reference_logits"][t]), z["coefficients"].astype(np.float64)
    assert phi.shape == (1152,) and z["raw"].shape == (7, 7)
    assert abs(phi.sum() - (y - y0)) <= 1e-5 * max(abs(y) + abs(y0), np.abs(phi).sum())
