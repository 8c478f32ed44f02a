"""``liftcam-jax explain --target topK|285,281|auto --score logit|rest`` on the tiny fake zoo."""
import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TESTS)
import fake_zoo  # noqa: E402

from liftcam_jax.cli import main  # noqa: E402


def cli(*argv):
    return main(["explain", *map(str, argv)], zoo=fake_zoo)


def _lines(path):
    return [json.loads(x) for x in open(path, encoding="utf-8").read().splitlines()]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    d = tmp_path_factory.mktemp("in")
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (30 + i, 40, 3), dtype=np.uint8)).save(d / f"p{i}.png")
    return d


def test_top_k_writes_one_npz_with_every_map_and_one_overlay_per_target(tmp_path, photos, capsys):
    out = tmp_path / "top"
    assert cli(photos, "--model", "tiny", "--target", "top3", "--out", out, "--quiet") == 0
    records = {r["id"].split("/")[-1]: r for r in _lines(out / "manifest.jsonl")}
    assert json.loads((out / "run.json").read_text())["target"] == "top3"
    for k in ("p0", "p1"):
        i = records[k]["id"]
        z = np.load(out / f"{i}.npz")
        assert z["map"].shape == (3, 32, 32) and z["raw"].shape == (3, 16, 16)
        assert z["coefficients"].shape == (3, 16) and z["target"].shape == (3,)
        np.testing.assert_array_equal(z["target"], np.argsort(-z["logits"])[:3])  # the top 3, best first
        assert records[k]["target"] == [int(t) for t in z["target"]]
        assert records[k]["target_name"] == [f"class{int(t)}" for t in z["target"]]
        assert sorted(records[k]["outputs"]) == [f"{i}.npz", f"{i}.t0.png", f"{i}.t1.png", f"{i}.t2.png"]
        # each target's map is the one a run for that class alone writes
        for t in range(3):
            one = tmp_path / f"one-{k}-{t}"
            cls = int(z["target"][t])
            assert cli(photos / f"{k}.png", "--model", "tiny", "--target", cls, "--out", one, "--quiet") == 0
            o = np.load(one / f"{k}.npz")
            assert o["map"].shape == (32, 32) and int(o["target"]) == cls  # one target: the format of before
            np.testing.assert_allclose(z["map"][t], o["map"], atol=1e-5)
            np.testing.assert_allclose(z["coefficients"][t], o["coefficients"], rtol=1e-5, atol=1e-6)
            assert (Image.open(out / f"{i}.t{t}.png").tobytes() == Image.open(one / f"{k}.png").tobytes())
    assert cli(photos, "--model", "tiny", "--target", "top3", "--out", out) == 0  # resumes: all done
    assert "0 done, 2 skipped" in capsys.readouterr().err


def test_several_classes_scored_by_rest(tmp_path, photos):
    import jax.numpy as jnp

    import liftcam_jax as lj

    out = tmp_path / "rest"
    assert cli(photos, "--model", "tiny", "--target", "3,5", "--score", "rest", "--method", "grad-cam",
               "--out", out, "--quiet", "--save", "raw") == 0
    assert json.loads((out / "run.json").read_text())["score"] == "rest"
    model = fake_zoo.load("tiny")
    for r in _lines(out / "manifest.jsonl"):
        k = r["id"].split("/")[-1]
        z = np.load(out / f"{r['id']}.npz")
        np.testing.assert_array_equal(z["target"], [3, 5])
        x = model.preprocess(np.asarray(Image.open(photos / f"{k}.png").convert("RGB")))[None]
        want = lj.explain(model.split, model.params, jnp.asarray(x), np.array([[3, 5]]), score="rest",
                          method="grad-cam")
        np.testing.assert_allclose(z["coefficients"], want.coefficients[0], rtol=1e-4, atol=1e-6)
        plain = lj.explain(model.split, model.params, jnp.asarray(x), np.array([[3, 5]]), method="grad-cam")
        assert float(np.max(np.abs(plain.coefficients[0] - want.coefficients[0]))) > 1e-6  # the score matters


def test_auto_is_the_predicted_class_for_unlabelled_inputs(tmp_path, photos):
    out = tmp_path / "auto"
    assert cli(photos, "--model", "tiny", "--target", "auto", "--out", out, "--quiet", "--save", "raw") == 0
    for r in _lines(out / "manifest.jsonl"):
        assert r["target"] == r["predicted"]


@pytest.mark.parametrize("argv, message", [
    (["--score", "nope"], "unknown score 'nope'; valid scores: logit, rest"),
    (["--target", "top0"], "bad target 'top0'"),
    (["--target", "top11"], "only 10 classes"),
    (["--target", "3,10"], "target index 10 out of range"),
    (["--target", "3,x"], "bad target '3,x'"),
])
def test_usage_errors(tmp_path, photos, capsys, argv, message):
    rc = cli(photos, "--model", "tiny", "--out", tmp_path / "out", *argv)
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("liftcam-jax: error: ") and message in err and len(err.strip().splitlines()) == 1
