"""The bench command and API on a tiny fake zoo: it runs, and what it reports is sane.

Speed itself is never asserted; the checks are on the fields: positive times,
ratios consistent with the raw timings, the device, both output files, and
clear one-line errors for bad arguments.
"""
import json
import statistics
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import liftcam_jax as lj
from liftcam_jax import bench as B
from liftcam_jax import cli
from liftcam_jax.errors import UsageError


class Features(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jax.nn.relu(nn.Conv(8, (3, 3))(x))
        return jax.nn.relu(nn.Conv(12, (3, 3), strides=(2, 2))(x))


class Head(nn.Module):
    @nn.compact
    def __call__(self, a):
        return nn.Dense(5)(jnp.mean(a, axis=(1, 2)))


SIZE = 16


def _tiny_classifier(name="tiny", layer=None):
    f, h = Features(), Head()
    x = jnp.zeros((1, SIZE, SIZE, 3))
    pf = f.init(jax.random.PRNGKey(1), x)
    ph = h.init(jax.random.PRNGKey(2), f.apply(pf, x))
    split = lj.Split(lambda p, x: f.apply(p["f"], x), lambda p, a: h.apply(p["h"], a))
    return lj.Classifier(
        name=name, split=split, params={"f": pf, "h": ph},
        preprocess=lj.Preprocess(size=SIZE, resize="squash"), layer=layer or "conv2", layers=("conv2",),
    )


class FakeZoo:
    """The zoo interface the CLI takes (names / load / sample_images), one tiny model."""

    def __init__(self):
        self.loads = []

    def names(self):
        return ["tiny"]

    def load(self, name, weights=None, layer=None):
        self.loads.append((name, weights, layer))
        if name != "tiny":
            raise UsageError(f"unknown model {name!r}; valid models: tiny")
        return _tiny_classifier(name, layer)

    def sample_images(self):
        return []


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    # the CLI enables a persistent compilation cache; keep it out of ~/.cache
    monkeypatch.setenv("LIFTCAM_JAX_CACHE", str(tmp_path / "cache"))


def _check_row(r, batch):
    assert r.batch_size == batch
    assert len(r.runs_s) == len(r.forward_runs_s) == 2
    assert all(t > 0 for t in r.runs_s + r.forward_runs_s)
    assert r.first_call_s > 0 and r.compile_s >= 0
    assert r.seconds_per_image == pytest.approx(statistics.median(r.runs_s) / batch)
    assert r.images_per_s == pytest.approx(1.0 / r.seconds_per_image)
    assert r.forward_seconds_per_image == pytest.approx(statistics.median(r.forward_runs_s) / batch)
    assert r.ratio == pytest.approx(statistics.median([a / b for a, b in zip(r.runs_s, r.forward_runs_s)]))
    assert r.ratio > 0
    assert len(r.cpu_runs_s) == len(r.forward_cpu_runs_s) == 2
    assert all(t >= 0 for t in r.cpu_runs_s + r.forward_cpu_runs_s)
    assert r.cpu_seconds_per_image == pytest.approx(statistics.median(r.cpu_runs_s) / batch)
    assert r.cpu_ratio >= 0
    # the first call compiled the program (the persistent cache is off by default)
    assert r.compile_detail["xla_compile_s"] > 0 and r.compile_detail["cache_hits"] == 0
    mem = r.memory_bytes
    assert mem["argument"] > 0 and mem["output"] > 0 and mem["temp"] >= 0
    assert mem["total"] == mem["temp"] + mem["argument"] + mem["output"] - mem["alias"]


def test_bench_api_fields():
    m = _tiny_classifier()
    report = B.bench(m.split, m.params, (SIZE, SIZE, 3), ["lift-cam", "deeplift-shap-cam:sigmas=(2.0,)"],
                     [1, 3], repeats=2, warmup=0, model="tiny")
    assert [(r.method, r.batch_size) for r in report.rows] == [
        ("lift-cam", 1), ("deeplift-shap-cam", 1), ("lift-cam", 3), ("deeplift-shap-cam", 3)]
    assert report.rows[1].options == {"sigmas": (2.0,)}
    assert report.rows[1].label == "deeplift-shap-cam:sigmas=(2.0,)"
    for r in report.rows:
        _check_row(r, r.batch_size)
    # the arguments of a program are the parameters plus the input batch
    nparams = sum(np.asarray(v).nbytes for v in jax.tree_util.tree_leaves(m.params))
    for f in report.forward:
        assert f.memory_bytes["argument"] == nparams + f.batch_size * SIZE * SIZE * 3 * 4
        assert f.seconds_per_image > 0 and f.first_call_s > 0
    dev = report.device
    assert dev["device_kind"] == jax.devices()[0].device_kind
    assert dev["platform"] == jax.devices()[0].platform and dev["device_count"] == len(jax.devices())
    assert report.compilation_cache == "off"
    assert report.process_peak_rss_bytes is None or report.process_peak_rss_bytes > 0
    md = report.to_markdown()
    again = B.Report.from_dict(json.loads(report.to_json()))
    assert again.to_markdown().replace("[2.0]", "(2.0,)") == md  # JSON turns tuples into lists
    assert again.rows[1].options == {"sigmas": [2.0]}
    assert "| lift-cam | 3 |" in md and "| (forward pass) | 1 |" in md and dev["device_kind"] in md
    json.loads(report.to_json())


def test_memory_grows_with_the_batch():
    m = _tiny_classifier()
    fn = lj.explainer(m.split, "lift-cam")
    small = B.program_memory(fn, m.params, jnp.zeros((1, SIZE, SIZE, 3)))
    jax.block_until_ready(fn(m.params, jnp.zeros((8, SIZE, SIZE, 3))))  # a program that ran already
    compiles = []
    count = lambda event, duration, **kw: compiles.append(event) if event == B._BACKEND else None  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(count)
    try:
        large = B.program_memory(fn, m.params, jnp.zeros((8, SIZE, SIZE, 3)))
    finally:
        jax.monitoring.unregister_event_duration_listener(count)
    # one compilation for the account: lower().compile() does not reuse the call's executable, so
    # compiling the default program too (to look for YNNPACK fusions) compiled it twice
    assert len(compiles) == 1
    assert large["source"] == ("memory_analysis, compiled without YNNPACK fusion"
                               if jax.devices()[0].platform == "cpu" else "memory_analysis")
    assert large["argument"] - small["argument"] == 7 * SIZE * SIZE * 3 * 4
    assert large["total"] > small["total"]


def test_cli_writes_json_and_markdown(tmp_path, capsys):
    zoo = FakeZoo()
    js, md = tmp_path / "out" / "b.json", tmp_path / "b.md"
    rc = cli.main(["bench", "--model", "tiny", "--methods", "lift-cam", "--batch-sizes", "1,2",
                   "--repeats", "2", "--warmup", "0", "--out", str(js), "--out", str(md), "--quiet"], zoo=zoo)
    assert rc == 0
    assert zoo.loads == [("tiny", "random", None)]  # random weights by default
    out = capsys.readouterr().out
    assert md.read_text() == out and "| lift-cam | 2 |" in out
    data = json.loads(js.read_text())
    assert data["model"] == "tiny" and data["input_shape"] == [SIZE, SIZE, 3]
    assert data["device"]["device_kind"] == jax.devices()[0].device_kind
    assert data["command"].startswith("liftcam-jax bench --model tiny")
    assert [(r["method"], r["batch_size"]) for r in data["rows"]] == [("lift-cam", 1), ("lift-cam", 2)]
    for r in data["rows"]:
        assert r["seconds_per_image"] > 0 and r["forward_seconds_per_image"] > 0 and r["ratio"] > 0
        assert r["compile_s"] >= 0 and r["memory_bytes"]["total"] > 0
        assert r["cpu_seconds_per_image"] >= 0 and r["cpu_ratio"] >= 0
    assert [f["batch_size"] for f in data["forward"]] == [1, 2]


@pytest.mark.parametrize("argv, message", [
    (["--methods", "nope"], "unknown method 'nope'; valid methods: "),
    (["--methods", "lift-cam:bogus=1"], "method 'lift-cam' has no option 'bogus'; valid options: "),
    (["--methods", "lift-cam:eps"], "write NAME:KEY=VALUE"),
    (["--batch-sizes", "0"], "--batch-sizes takes comma-separated positive integers"),
    (["--batch-sizes", "a,b"], "--batch-sizes takes comma-separated positive integers"),
    (["--repeats", "0"], "argument --repeats: expected a positive integer, got '0'"),
    (["--warmup", "-1"], "--warmup must be an integer >= 0, got -1"),
    (["--methods", ""], "no methods given; valid methods: "),
    (["--out", "table.txt"], "must end in .json or .md"),
    (["--model", "vgg99"], "unknown model 'vgg99'; valid models: tiny"),
])
def test_cli_usage_errors_are_one_line(argv, message, capsys):
    base = ["bench", "--model", "tiny", "--repeats", "1"]
    rc = cli.main(base + argv, zoo=FakeZoo())
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("liftcam-jax: error: ") and message in err and len(err.strip().splitlines()) == 1


def test_method_specs():
    s = B.parse_method_spec("lift-cam:eps=1e-6")
    assert s.name == "lift-cam" and s.kwargs == {"eps": 1e-6} and s.label == "lift-cam:eps=1e-06"
    assert B.parse_method_spec("lift-cam").options == ()


def test_compilation_cache_switch_restores_the_setting():
    before = jax.config.jax_enable_compilation_cache
    with B.compilation_cache(False):
        assert jax.config.jax_enable_compilation_cache is False
    assert jax.config.jax_enable_compilation_cache == before


def test_cli_compilation_cache_lives_beside_the_params_cache(tmp_path):
    import jax

    from liftcam_jax.cli import enable_compilation_cache

    before = jax.config.jax_compilation_cache_dir
    try:
        enable_compilation_cache()
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "cache" / "xla")
        assert (tmp_path / "cache" / "xla").is_dir()
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


def test_cli_data_measures_a_dataset_run_against_its_step(tmp_path, capsys):
    from PIL import Image

    photos = tmp_path / "in"
    photos.mkdir()
    for i in range(5):
        Image.fromarray(np.full((30 + i, 40, 3), 40 * i, np.uint8)).save(photos / f"p{i}.png")
    md = tmp_path / "d.md"
    rc = cli.main(["bench", "--model", "tiny", "--data", str(photos), "--limit", "4", "--batch-sizes", "2",
                   "--repeats", "1", "--out", str(md), "--quiet"], zoo=FakeZoo())
    assert rc == 0
    out = capsys.readouterr().out
    assert md.read_text() == out
    assert "compiled step alone" in out and "save=raw" in out and "save=both" in out and "4 images, batch 2" in out


def test_top_k_against_separate_calls(tmp_path, capsys):
    """bench --top-k: one line per method, consistent fields (speed itself is not asserted)."""
    md, js = tmp_path / "k.md", tmp_path / "k.json"
    rc = cli.main(["bench", "--model", "tiny", "--methods", "lift-cam", "--top-k", "3", "--repeats", "2",
                   "--warmup", "0", "--out", str(md), "--out", str(js)], zoo=FakeZoo())
    assert rc == 0
    out = capsys.readouterr().out
    assert out.startswith("tiny (conv2) lift-cam b=1: top_k=3 in one call") and "3 separate calls" in out
    assert md.read_text() == f"- {out}"
    report = json.loads(js.read_text())
    assert report["command"].startswith("liftcam-jax bench --model tiny") and report["command"].endswith("--top-k 3")
    (row,) = report["rows"]
    assert (row["method"], row["k"], row["batch_size"]) == ("lift-cam", 3, 1) and row["top_k_s"] > 0
    assert row["ratio_to_one"] > 0 and f"{row['ratio_to_one']:.2f}x one target" in out
    ratios = [float(w.rstrip("x")) for w in out.replace("(CPU ", " ").replace(")", "").replace(",", "").split() if w.endswith("x")]
    assert len(ratios) == 4 and all(r > 0 for r in ratios)


def test_smoothing_and_fusion_are_measured_as_explain_runs_them(capsys):
    """``--aug-smooth`` / ``--eigen-smooth`` and ``--layer a,b``: the timed program is the smoothed one
    (its output is Smoothing.explain's, not the plain method's) and each row names what was added."""
    from liftcam_jax.smoothing import Smoothing

    clf = _tiny_classifier()
    x = jax.random.normal(jax.random.PRNGKey(3), (2, SIZE, SIZE, 3))
    spec = lj.methods.parse_method_spec("grad-cam")
    for sm, named in ((Smoothing(aug_smooth=True), {"aug_smooth": True}),
                      (Smoothing(eigen_smooth=True), {"eigen_smooth": True}),
                      (Smoothing(fusion="max", layers=(("again", clf.split),)), {"fused": "again", "fusion": "max"})):
        fn, options = B._program(spec, clf.split, sm)
        assert options == named
        np.testing.assert_allclose(fn(clf.params, x).maps, sm.explain(clf.split, clf.params, x, method="grad-cam").maps,
                                   rtol=1e-4, atol=1e-5)  # compiled against op by op: float rounding only
    plain, options = B._program(spec, clf.split, Smoothing())
    assert options == {}
    assert not np.allclose(plain(clf.params, x).maps,
                           Smoothing(aug_smooth=True).explain(clf.split, clf.params, x, method="grad-cam").maps)
    rc = cli.main(["bench", "--model", "tiny", "--methods", "grad-cam", "--aug-smooth", "--eigen-smooth",
                   "--repeats", "2", "--warmup", "0", "--quiet"], zoo=FakeZoo())
    out = capsys.readouterr().out
    assert rc == 0 and "| grad-cam:aug_smooth=True:eigen_smooth=True | 1 |" in out
    rc = cli.main(["bench", "--model", "tiny", "--methods", "eigen-cam", "--eigen-smooth", "--quiet"], zoo=FakeZoo())
    assert rc == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1
