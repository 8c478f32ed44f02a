"""``liftcam-jax evaluate`` end to end on the fake zoo, checked against the metrics called directly.

The pipeline (labels.csv / boxes.csv, decoding, preprocessing, box geometry,
padding of the last batch, targets, the log, aggregation) is compared with
:func:`liftcam_jax.explain` and :mod:`liftcam_jax.metrics` applied by hand to
the same images, so it cannot change a number unnoticed.
"""
import io
import json
import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
import fake_zoo  # noqa: E402

from liftcam_jax import explain, metrics  # noqa: E402
from liftcam_jax import evaluation as ev  # noqa: E402
from liftcam_jax import methods as lj_methods  # noqa: E402
from liftcam_jax.data import decode_image  # noqa: E402

SHAPES = [(40, 50), (36, 36), (60, 45), (32, 40)]
LABELS = [3, 0, 7, 9]


def make_data(folder, boxes=True):
    rng = np.random.default_rng(0)
    (folder / "imgs").mkdir(parents=True)
    rows = ["file,imagenet_index,class_name"]
    brows = ["file,xmin,ymin,xmax,ymax,synset"]
    for i, (h, w) in enumerate(SHAPES):
        a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        a[h // 4: h // 2, w // 3: w - 4] //= 3  # some structure
        Image.fromarray(a).save(folder / "imgs" / f"im{i}.png")
        rows.append(f"imgs/im{i}.png,{LABELS[i]},thing{i}")
        if i == 3:
            continue  # no box: localisation undefined for this image
        brows.append(f"imgs/im{i}.png,{4 + i},{6},{w - 10},{h - 8 - i},n0")
        if i == 0:
            brows.append(f"imgs/im{i}.png,0,0,5,4,n0")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    if boxes:
        (folder / "boxes.csv").write_text("\n".join(brows) + "\n")
    return folder


def cli(argv, capsys):
    rc = fake_zoo.main(["evaluate"] + [str(a) for a in argv])
    return rc, capsys.readouterr().err


def log_lines(out):
    return (out / ev.LOG).read_bytes().splitlines()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))


METHODS = "lift-cam,grad-cam,score-cam"


@pytest.fixture(scope="module")
def first_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    rc = fake_zoo.main(["evaluate", "--data", str(data), "--model", "tiny", "--methods", METHODS,
                        "--metrics", "all", "--out", str(out), "--batch-size", "3", "--step", "100",
                        "--shap-samples", "4", "--quiet"])
    assert rc == 0
    return out


def test_outputs_and_table(first_run):
    out = first_run
    res = json.loads((out / "results.json").read_text())
    assert res["images"] == 4
    assert len(res["per_image"]) == 4 * 3
    for m in METHODS.split(","):
        agg = res["aggregate"][m]
        assert agg["images"] == 4
        for col in ("ad", "ic", "deletion", "insertion", "shap_cosine", "shap_spearman", "shap_topk"):
            assert agg[col]["n"] == 4, (m, col)
            assert agg[col]["low"] <= agg[col]["mean"] <= agg[col]["high"]
        for col in ("epg", "pointing"):  # im3 has no box: left out
            assert agg[col]["n"] == 3
        assert len(agg["mean_deletion_curve"]) == len(res["config"]["fractions"]) == 12  # ceil(1024/100)+1
    assert res["notes"] == ["epg, pointing: scored on 3 of 4 images; the others have no box in view (n/a)."]
    md = (out / "results.md").read_text()
    for m in METHODS.split(","):
        assert f"| {m} |" in md
    assert "Student-t 95%" in md and "Deletion AUC" in md
    for name in ("curves.png", "grid.png"):
        with Image.open(out / name) as im:
            assert im.size[0] > 100


def test_numbers_match_the_metrics_applied_by_hand(first_run, data):
    clf = fake_zoo.load("tiny")
    pre = clf.preprocess
    imgs = [decode_image(str(data / "imgs" / f"im{i}.png")) for i in range(4)]
    x = jnp.asarray(np.stack([pre(im) for im in imgs]))
    t = jnp.asarray(LABELS, jnp.int32)
    exp = explain(clf.split, clf.params, x, t, method="lift-cam")
    dele = metrics.deletion(clf.split, clf.params, x, exp.maps, t, metrics.CurveConfig(step=100))
    ins = metrics.insertion(clf.split, clf.params, x, exp.maps, t, metrics.CurveConfig(step=100))
    cc = metrics.confidence_change(clf.split, clf.params, x, exp.maps, t)
    boxes = np.zeros((4, 2, 4), np.float32)
    valid = np.zeros((4, 2), bool)
    for line in (data / "boxes.csv").read_text().splitlines()[1:]:
        f, *b = line.split(",")[:5]
        i = int(f[-5])
        j = int(valid[i].sum())
        boxes[i, j] = metrics.boxes_to_input(np.asarray([b], float), SHAPES[i], pre)[0]
        valid[i, j] = True
    epg = metrics.energy_pointing_game(exp.maps, jnp.asarray(boxes), jnp.asarray(valid))
    pg = metrics.pointing_game(exp.maps, jnp.asarray(boxes), jnp.asarray(valid))
    recs = {r["item"]: r for r in map(json.loads, log_lines(first_run)) if r.get("method") == "lift-cam"}
    for i in range(4):
        r = recs[f"imgs/im{i}.png"]
        assert r["target"] == LABELS[i] and r["label"] == LABELS[i]
        got = r["metrics"]
        np.testing.assert_allclose(got["deletion"], dele.auc[i], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(got["insertion"], ins.auc[i], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(r["curves"]["deletion"], dele.scores[i], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(got["ad"], cc.drop[i], rtol=1e-4, atol=1e-5)
        assert got["ic"] == float(cc.increase[i])
        if i == 3:
            assert got["epg"] is None and got["pointing"] is None
        else:
            np.testing.assert_allclose(got["epg"], epg[i], rtol=1e-5)
            assert got["pointing"] == float(pg[i])
    # the aggregate is the mean of the per-image values
    res = json.loads((first_run / "results.json").read_text())
    np.testing.assert_allclose(res["aggregate"]["lift-cam"]["deletion"]["mean"], float(np.mean(dele.auc)), rtol=1e-4)


def test_lift_cam_matches_exact_shap_on_a_linear_head(first_run):
    # tiny's default head is GAP -> Dense: LIFT-CAM's coefficients are the exact SHAP values,
    # and every permutation sample is exact, so cosine and Spearman are 1 up to rounding.
    res = json.loads((first_run / "results.json").read_text())
    agg = res["aggregate"]["lift-cam"]
    assert agg["shap_cosine"]["mean"] > 0.9999
    assert agg["shap_spearman"]["mean"] > 0.999
    assert agg["shap_topk"]["mean"] == 1.0


def test_rerun_skips_everything_and_resumes_after_a_crash(first_run, data, capsys, tmp_path):
    out = first_run
    before = log_lines(out)
    args = ["--data", data, "--model", "tiny", "--methods", METHODS, "--metrics", "all", "--out", out,
            "--batch-size", "3", "--step", "100", "--shap-samples", "4"]
    rc, err = cli(args, capsys)
    assert rc == 0
    assert "0 images evaluated, 4 skipped" in err
    assert log_lines(out) == before
    # --redo evaluates one method again, and nothing else
    rc, err = cli(args + ["--redo", "grad-cam"], capsys)
    assert rc == 0 and "4 images evaluated, 0 skipped" in err
    redone = [json.loads(x) for x in log_lines(out)[len(before):]]
    assert sorted(r["item"] for r in redone) == [f"imgs/im{i}.png" for i in range(4)]
    assert {r["method"] for r in redone} == {"grad-cam"}
    old = {r["item"]: r for r in map(json.loads, before) if r.get("method") == "grad-cam"}
    for r in redone:
        np.testing.assert_allclose(r["metrics"]["deletion"], old[r["item"]]["metrics"]["deletion"], rtol=1e-6)
    rc, err = cli(args + ["--redo", "eigen-cam"], capsys)
    assert rc == 2 and "not among the evaluated methods" in err
    before = log_lines(out)[: len(before)]
    # a crash part-way: the log lost its last pairs and has a torn line
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    for name in ("run.json",):
        (crashed / name).write_bytes((out / name).read_bytes())
    (crashed / ev.LOG).write_bytes(b"\n".join(before[:5]) + b"\n" + before[5][:20])
    args[args.index(out)] = crashed
    rc, err = cli(args, capsys)
    assert rc == 0
    assert "skipped" in err
    a = json.loads((out / "results.json").read_text())
    b = json.loads((crashed / "results.json").read_text())
    for m in METHODS.split(","):
        for col in ("deletion", "insertion", "ad", "epg", "shap_cosine"):
            np.testing.assert_allclose(a["aggregate"][m][col]["mean"], b["aggregate"][m][col]["mean"], rtol=1e-5)


def test_all_methods_skip_cam_where_the_head_is_not_linear(data, capsys, tmp_path):
    out = tmp_path / "o"
    rc, err = cli(["--data", data, "--model", "tiny", "--layer", "conv1", "--methods", "all", "--metrics", "ad",
                   "--limit", "1", "--out", out, "--grid", "1"], capsys)
    assert rc == 0, err
    res = json.loads((out / "results.json").read_text())
    assert "cam" not in res["aggregate"]
    assert set(res["aggregate"]) == set(m for m in lj_methods.names() if m != "cam")
    assert "cam skipped" in (out / "results.md").read_text()
    n = len(res["aggregate"])  # the report counts the methods evaluated, not the ones asked for
    assert f"({n} methods); cam skipped: the head after conv1 is not GAP + Linear." in err, err
    rc, err = cli(["--data", data, "--model", "tiny", "--layer", "conv1", "--methods", "cam", "--metrics", "ad",
                   "--out", tmp_path / "o2"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "cam does not apply" in err


@pytest.mark.parametrize("argv,message", [
    (["--metrics", "ad,foo"], "unknown metric 'foo'; valid metrics: ad, ic, deletion, insertion, epg, pointing, shap"),
    (["--metrics", "all", "--methods", "nope"], "unknown method 'nope'"),
    (["--metrics", "ad", "--step", "4", "--num-steps", "3"], "not both"),
    (["--metrics", "shap", "--shap-method", "magic"], "unknown --shap-method 'magic'; valid: exact, permutation, kernel"),
    (["--metrics", "shap", "--shap-samples", "5"], "must be even"),
])
def test_usage_errors_are_one_line(data, capsys, tmp_path, argv, message):
    rc, err = cli(["--data", data, "--model", "tiny", "--out", tmp_path / "o"] + argv, capsys)
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("liftcam-jax: error: ") and message in err
    assert not (tmp_path / "o" / ev.LOG).exists()


def test_data_errors(tmp_path, capsys):
    d = tmp_path / "d"
    d.mkdir()
    rc, err = cli(["--data", d, "--model", "tiny", "--metrics", "ad", "--out", tmp_path / "o"], capsys)
    assert rc == 2 and "no labels.csv" in err
    (d / "labels.csv").write_text("file,label\na.png,3\n")
    rc, err = cli(["--data", d, "--model", "tiny", "--metrics", "ad", "--out", tmp_path / "o"], capsys)
    assert rc == 2 and "no column 'imagenet_index'" in err


def test_missing_image_and_bad_label_fail_alone(tmp_path, capsys):
    d = make_data(tmp_path / "d", boxes=False)
    with open(d / "labels.csv", "a") as f:
        f.write("imgs/missing.png,1,x\nimgs/im1.png2,1,x\n")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(d / "imgs" / "big.png")
    with open(d / "labels.csv", "a") as f:
        f.write("imgs/big.png,12,x\n")  # the fake zoo has 10 classes
    out = tmp_path / "o"
    # box metrics asked for by name on data without boxes: one line, before any work
    rc, err = cli(["--data", d, "--model", "tiny", "--methods", "lift-cam", "--metrics", "ad,epg", "--out", out,
                   "--quiet"], capsys)
    assert rc == 2 and "--metrics epg need boxes" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    rc, err = cli(["--data", d, "--model", "tiny", "--methods", "lift-cam", "--metrics", "ad", "--out", out,
                   "--quiet"], capsys)
    assert rc == 1
    assert "missing.png" in err and "out of range" in err
    res = json.loads((out / "results.json").read_text())
    assert res["aggregate"]["lift-cam"]["images"] == 4
    # a different configuration into the same folder is refused
    rc, err = cli(["--data", d, "--model", "tiny", "--methods", "lift-cam", "--metrics", "ad", "--out", out,
                   "--substrate", "mean"], capsys)
    assert rc == 2 and "different run" in err


def test_random_tie_break_is_the_metric_with_the_seed(data, capsys, tmp_path):
    """``--tie-break random --seed 3``: deletion/insertion as the metrics compute them with
    ``tie_break="random", key=PRNGKey(3)``; recorded in the configuration; different from raster
    where the maps have ties (LIFT-CAM's zeros after the ReLU)."""
    import jax

    out = tmp_path / "o"
    rc, err = cli(["--data", data, "--model", "tiny", "--methods", "lift-cam", "--metrics", "deletion,insertion",
                   "--out", out, "--step", "100", "--tie-break", "random", "--seed", "3", "--quiet"], capsys)
    assert rc == 0, err
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["tie_break"] == "random"
    clf = fake_zoo.load("tiny")
    x = jnp.asarray(np.stack([clf.preprocess(decode_image(str(data / "imgs" / f"im{i}.png"))) for i in range(4)]))
    t = jnp.asarray(LABELS, jnp.int32)
    exp = explain(clf.split, clf.params, x, t, method="lift-cam")
    assert int(jnp.sum(exp.maps == 0)) > 0  # ties to break
    curve, key = metrics.CurveConfig(step=100, tie_break="random"), jax.random.PRNGKey(3)
    dele = metrics.deletion(clf.split, clf.params, x, exp.maps, t, curve, key=key)
    ins = metrics.insertion(clf.split, clf.params, x, exp.maps, t, curve, key=key)
    raster = metrics.deletion(clf.split, clf.params, x, exp.maps, t, metrics.CurveConfig(step=100))
    recs = {r["item"]: r for r in map(json.loads, log_lines(out))}
    for i in range(4):
        got = recs[f"imgs/im{i}.png"]["metrics"]
        np.testing.assert_allclose(got["deletion"], dele.auc[i], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(got["insertion"], ins.auc[i], rtol=1e-4, atol=1e-6)
    assert not np.allclose(dele.auc, raster.auc, rtol=1e-4, atol=1e-6)
    # the default is recorded too, and a folder of one order refuses the other
    rc, err = cli(["--data", data, "--model", "tiny", "--methods", "lift-cam", "--metrics", "deletion",
                   "--out", out, "--step", "100", "--seed", "3"], capsys)
    assert rc == 2 and "tie_break 'random' (now None)" in err


# ---------------------------------------------------------------------------
# TFDS input: labels and boxes from the features
# ---------------------------------------------------------------------------

tfds = pytest.importorskip("tensorflow_datasets")


def _png(a):
    b = io.BytesIO()
    Image.fromarray(a).save(b, format="PNG")
    return b.getvalue()


class EvaluateTinyBoxes(tfds.core.GeneratorBasedBuilder):
    """Three images with labels and normalised boxes (no TensorFlow needed to prepare)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(num_classes=10),
            "objects": tfds.features.Sequence({"bbox": tfds.features.BBoxFeature()}),
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        rng = np.random.default_rng(1)
        for i in range(3):
            img = rng.integers(0, 256, (40, 30 + 4 * i, 3), dtype=np.uint8)
            yield i, {"image": _png(img), "label": 2 * i,
                      "objects": {"bbox": [tfds.features.BBox(0.1, 0.15 * j, 0.5, 0.15 * j + 0.3)
                                           for j in range(i + 1)]}}


def test_tfds_split_with_labels_and_boxes(tmp_path, capsys):
    tdir = tmp_path / "tfds"
    EvaluateTinyBoxes(data_dir=str(tdir), file_format="array_record").download_and_prepare()
    out = tmp_path / "o"
    args = ["--data", "tfds:evaluate_tiny_boxes:train", "--data-dir", tdir, "--model", "tiny",
            "--methods", "lift-cam", "--metrics", "epg,pointing", "--out", out, "--quiet"]
    # labels '0', '1', ... are neither WordNet ids nor the model's class names: never reused silently
    rc, err = cli(args, capsys)
    assert rc == 2 and "--label-map identity" in err and len(err.strip().splitlines()[-1]) < 400
    rc, err = cli(args + ["--label-map", "identity"], capsys)
    assert rc == 0, err
    recs = [json.loads(x) for x in log_lines(out)]
    assert sorted(r["label"] for r in recs) == [0, 2, 4]
    # boxes (ymin, xmin, ymax, xmax) = (0.1, 0.2, 0.5, 0.6) of a 40 x W image, through the preprocessing
    clf = fake_zoo.load("tiny")
    ds = tfds.data_source("evaluate_tiny_boxes", split="train", data_dir=str(tdir))
    for r in recs:
        idx = int(r["item"].rsplit("/", 1)[1])
        img = np.asarray(ds[idx]["image"])
        h, w = img.shape[:2]
        x = jnp.asarray(clf.preprocess(img))[None]
        exp = explain(clf.split, clf.params, x, jnp.asarray([r["label"]]), method="lift-cam")
        # every box of the image (idx + 1 of them, all different) counts
        box = metrics.boxes_to_input(np.array([[0.15 * j * w, 0.1 * h, (0.15 * j + 0.3) * w, 0.5 * h]
                                               for j in range(idx + 1)]), (h, w), clf.preprocess)
        want = metrics.energy_pointing_game(exp.maps, jnp.asarray(box)[None], jnp.ones((1, idx + 1), bool))
        np.testing.assert_allclose(r["metrics"]["epg"], want[0], rtol=1e-5)


def test_the_library_api_gives_what_the_command_writes(first_run, data, tmp_path):
    """evaluation.evaluate from Python: the same numbers as the command, a Results object, no argv."""
    clf = fake_zoo.load("tiny")
    cfg = ev.EvalConfig(step=100, shap_samples=4, batch_size=3)
    res = ev.evaluate(clf, data, METHODS.split(","), "all", out_dir=tmp_path / "lib", config=cfg)
    assert isinstance(res, ev.Results) and res.summary["done"] == 4 and res.summary["failed"] == 0
    cli_res = ev.Results.load(first_run)
    for m in METHODS.split(","):
        for col in ("ad", "ic", "deletion", "insertion", "epg", "shap_cosine"):
            np.testing.assert_allclose(res.aggregate[m][col]["mean"], cli_res.aggregate[m][col]["mean"], rtol=1e-5)
    assert json.loads((tmp_path / "lib" / "results.json").read_text())["aggregate"] == res.to_json()["aggregate"]
    md = res.to_markdown()
    assert "| lift-cam |" in md and md == (tmp_path / "lib" / "results.md").read_text()
    assert res.curves_figure() is not None
    # a rerun is all skipped, and returns the same results
    again = ev.evaluate(clf, data, METHODS.split(","), "all", out_dir=tmp_path / "lib", config=cfg)
    assert again.summary["done"] == 0 and again.summary["skipped"] == 4
    assert again.aggregate == res.aggregate


def test_metrics_are_a_registry():
    assert list(ev.METRICS) == ["ad", "ic", "deletion", "insertion", "epg", "pointing", "shap"]
    assert ev.parse_metrics("ad, shap") == ["ad", "shap"] and ev.parse_metrics(["all"]) == list(ev.METRICS)
    with pytest.raises(Exception, match="unknown metric 'foo'"):
        ev.parse_metrics("foo")


def test_cosine_ceiling_predicts_the_cosine_of_a_noisy_estimate():
    """Simulated Shapley estimates with known standard errors: the ceiling is their cosine with the truth."""
    from liftcam_jax.evaluation import cosine_ceiling

    rng = np.random.default_rng(0)
    for noise in (0.05, 0.3, 1.0):
        phi = rng.standard_normal(1000) * rng.exponential(1.0, 1000)
        s = noise * np.abs(phi).mean() * rng.uniform(0.5, 1.5, 1000)
        est = phi + s * rng.standard_normal(1000)
        truth = float(est @ phi / np.linalg.norm(est) / np.linalg.norm(phi))
        assert abs(cosine_ceiling(est, s) - truth) < 0.02, (noise, cosine_ceiling(est, s), truth)
    assert cosine_ceiling(np.ones(4), np.zeros(4)) == 1.0
    assert cosine_ceiling(np.ones(4), 10 * np.ones(4)) == 0.0


def test_paired_differences_are_computed_image_by_image(first_run):
    """Each method minus LIFT-CAM on the same images; an image without a value for either is left out."""
    from scipy.stats import t as student

    res = ev.Results.load(first_run)
    diffs = res.paired()
    assert sorted(diffs) == ["grad-cam", "score-cam"]  # lift-cam is the baseline
    per = {(r["item"], r["method"]): r["metrics"] for r in res.per_image}
    items = sorted({r["item"] for r in res.per_image})
    for m in diffs:
        for col, n in (("ad", 4), ("deletion", 4), ("epg", 3), ("shap_cosine", 4)):
            d = np.array([per[i, m][col] - per[i, "lift-cam"][col] for i in items
                          if per[i, m][col] is not None and per[i, "lift-cam"][col] is not None])
            half = student.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
            e = diffs[m][col]
            assert e["n"] == n == len(d)
            np.testing.assert_allclose([e["mean"], e["low"], e["high"]], [d.mean(), d.mean() - half, d.mean() + half],
                                       rtol=1e-9, atol=1e-12)
    assert res.paired("grad-cam")["lift-cam"]["ad"]["mean"] == pytest.approx(-diffs["grad-cam"]["ad"]["mean"])
    md = (first_run / "results.md").read_text()
    assert "Each method minus lift-cam" in md and "| grad-cam | " in res.paired_table()
    with pytest.raises(ev.UsageError, match="not evaluated"):
        res.paired("eigen-cam")


def test_replication_table_gives_each_runs_verdict():
    """Verdicts from the paired intervals, per run; a method or column missing from a run is left out."""
    rng = np.random.default_rng(0)

    def run(diffs, metrics=("ad", "insertion"), extra=()):
        rows = []
        for i in range(12):
            base = {"ad": float(rng.uniform(10, 50)), "insertion": float(rng.uniform(0.3, 0.6)), "epg": 0.5}
            rows.append({"item": f"im{i}", "method": "lift-cam", "metrics": base})
            for m, d in diffs.items():
                rows.append({"item": f"im{i}", "method": m,
                             "metrics": {c: None if d[c] is None else base[c] + d[c][i % len(d[c])] for c in base}})
        methods = ["lift-cam", *diffs, *extra]
        return ev.Results({}, methods, list(metrics), 12, {}, rows)

    up, down, zero = [0.9, 1.0, 1.1], [-0.9, -1.0, -1.1], [-1.0, 1.0]
    a = run({"grad-cam": {"ad": up, "insertion": [0.1, 0.11], "epg": zero},
             "score-cam": {"ad": zero, "insertion": None, "epg": zero}}, metrics=("ad", "insertion", "epg"))
    b = run({"grad-cam": {"ad": down, "insertion": [0.1, 0.12], "epg": zero},
             "score-cam": {"ad": zero, "insertion": zero, "epg": zero}}, extra=["eigen-cam"])
    md = ev.replication_table({"Lite0": a, "Lite1": b})
    lines = md.splitlines()
    assert lines[0] == "Each method against lift-cam, in Lite0 / Lite1:"
    assert lines[2] == "| Method | Average Drop % ↓ | Insertion AUC ↑ |"  # epg: not scored in Lite1
    assert lines[4] == "| grad-cam | worse / better | better |"  # AD higher = worse; insertion higher = better
    assert lines[5] == "| score-cam | tie | n/a / tie |"
    assert len(lines) == 6  # eigen-cam: only in Lite1
    assert ev.replication_table({"x": a}, baseline="grad-cam").splitlines()[4] == "| lift-cam | better | worse | tie |"
    with pytest.raises(ev.UsageError, match="not evaluated"):
        ev.replication_table({"x": a, "y": b}, baseline="eigen-cam")


def test_one_image_gives_no_verdict():
    """A single paired image has no interval: no better/worse from its difference alone."""
    rows = [{"item": "im0", "method": "lift-cam", "metrics": {"ad": 30.0}},
            {"item": "im0", "method": "grad-cam", "metrics": {"ad": 40.0}}]
    one = ev.Results({}, ["lift-cam", "grad-cam"], ["ad"], 1, {}, rows)
    assert one.paired()["grad-cam"]["ad"]["n"] == 1
    assert ev.replication_table({"x": one}).splitlines()[4] == "| grad-cam | n/a |"
    assert one.paired_table().splitlines()[2] == "| grad-cam | +10.00 (1 image, no interval) |"


def test_rest_score_is_explained_and_is_the_shap_game(data, capsys, tmp_path):
    """``--score rest``: every method explains ReST (2 y_c - LSE(y)) of the label, and the SHAP
    values the shap metric compares with are those of the ReST game, not of the logit's."""
    from liftcam_jax import shap, targets

    out = tmp_path / "rest"
    rc, err = cli(["--data", data, "--model", "tiny", "--methods", "lift-cam,shapley-cam", "--metrics", "shap,ad",
                   "--out", out, "--batch-size", "4", "--shap-samples", "4", "--score", "rest", "--quiet"], capsys)
    assert rc == 0, err
    clf = fake_zoo.load("tiny")
    x = jnp.asarray(np.stack([clf.preprocess(decode_image(str(data / "imgs" / f"im{i}.png"))) for i in range(4)]))
    t = jnp.asarray(LABELS, jnp.int32)
    a = clf.split.features(clf.params, x)
    import jax

    game = {s: shap.shap_values(clf.split.head, clf.params, a, targets.SCORES[s](t), method="permutation",
                                num_samples=4, key=jax.random.PRNGKey(0)).values for s in ("rest", "logit")}
    recs = {(r["item"], r["method"]): r for r in map(json.loads, log_lines(out)) if r.get("status") == "done"}
    for m in ("lift-cam", "shapley-cam"):
        exp = explain(clf.split, clf.params, x, t, method=m, score="rest")
        logit_exp = explain(clf.split, clf.params, x, t, method=m)
        got = np.array([recs[(f"imgs/im{i}.png", m)]["metrics"]["shap_cosine"] for i in range(4)])
        np.testing.assert_allclose(got, metrics.cosine_similarity(exp.coefficients, game["rest"]), atol=1e-5)
        wrong = {(e, g): np.asarray(metrics.cosine_similarity(c.coefficients, game[g]))
                 for e, c in (("rest", exp), ("logit", logit_exp)) for g in ("rest", "logit")
                 if (e, g) != ("rest", "rest")}
        if m == "lift-cam":  # on this linear head LIFT-CAM is exact SHAP in either game: cosine 1 both
            del wrong[("logit", "logit")]
        for k, w in wrong.items():  # a method or a game of the wrong score would show
            assert np.max(np.abs(got - w)) > 1e-3, (m, k, got, w)
    # LIFT-CAM of ReST: summation-to-delta for the ReST value
    exp = explain(clf.split, clf.params, x, t, method="lift-cam", score="rest")
    rest = targets.rest(t)
    gap = rest(clf.split.head(clf.params, a)) - rest(clf.split.head(clf.params, jnp.zeros_like(a)))
    np.testing.assert_allclose(exp.coefficients.sum(-1), gap, rtol=1e-4, atol=1e-5)
    assert json.loads((out / "results.json").read_text())["config"]["score"] == "rest"
