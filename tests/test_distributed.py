"""Several hosts for real: two processes joined by ``jax.distributed`` on 127.0.0.1.

Each test starts its own processes (``tests/fake_zoo.py``, the CLI over the tiny
model) with a bounded wait, kills only those, and compares the union of what
they wrote with a one-process run on the same inputs.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TESTS)
import fake_zoo  # noqa: E402

from liftcam_jax import batch, distributed  # noqa: E402

FAKE = os.path.join(TESTS, "fake_zoo.py")
LIMIT_S = 240


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", **extra)
    env.pop("XLA_FLAGS", None)
    return env


def _start(command, args, pid, port, n=2, **env):
    cluster = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(n), "--process-id", str(pid),
               "--init-timeout", "60"]
    return subprocess.Popen([sys.executable, FAKE, command, *map(str, args), *cluster], env=_env(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait(procs, limit=LIMIT_S):
    deadline = time.monotonic() + limit
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outs.append((p.returncode, err))
    finally:
        for p in procs:  # only what this test started
            if p.poll() is None:
                p.kill()
                p.wait()
    return outs


def _two(command, args, **env):
    port = _port()
    return _wait([_start(command, args, i, port, **env) for i in range(2)])


def _photos(folder, n):
    return fake_zoo.write_photos(folder, n)


def _done_lines(out):
    lines = []
    for name in sorted(os.listdir(out)):
        if name.startswith("manifest"):
            lines += [json.loads(x) for x in open(os.path.join(out, name), encoding="utf-8").read().splitlines()]
    return [r for r in lines if r["status"] == "done"]


def _same_outputs(one, two, ids):
    for ident in ids:
        with np.load(os.path.join(one, ident + ".npz")) as a, np.load(os.path.join(two, ident + ".npz")) as b:
            np.testing.assert_allclose(a["logits"], b["logits"], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(a["map"], b["map"], rtol=1e-5, atol=1e-5)


def test_share_is_a_partition():
    items = list(range(11))
    for count in (1, 2, 3):
        parts = [distributed.share(items, p, count) for p in range(count)]
        assert sorted(sum(parts, [])) == items and parts[0][: 2] == [0, count][: len(parts[0][:2])]
    # items of a source read in order (TFRecord): contiguous blocks
    seq = [False] * 3 + [True] * 8
    parts = [distributed.share(items, p, 2, seq) for p in range(2)]
    assert parts == [[0, 2, 3, 4, 5, 6], [1, 7, 8, 9, 10]]


def test_explain_a_folder_on_two_processes_equals_one(tmp_path):
    inputs = _photos(tmp_path / "in", 9)
    common = [inputs, "--model", "tiny", "--save", "raw", "--batch-size", "2", "--quiet"]
    outs = _two("explain", common + ["--out", tmp_path / "two"])
    assert [rc for rc, _ in outs] == [0, 0], outs
    assert fake_zoo.main(["explain", *map(str, common + ["--out", tmp_path / "one"])]) == 0
    done = _done_lines(tmp_path / "two")
    ids = sorted(r["id"] for r in done)
    assert ids == sorted(batch.read_manifests(tmp_path / "one")) and len(ids) == len(set(ids)) == 9
    # each host wrote its own manifest, with its share: 0, 2, 4, ... and 1, 3, 5, ...
    m0 = [json.loads(x)["id"] for x in open(tmp_path / "two" / "manifest-00000-of-00002.jsonl")]
    assert sorted(m0) == [f"in/p{i:02d}" for i in range(0, 9, 2)]
    _same_outputs(tmp_path / "one", tmp_path / "two", ids)
    st = batch.status(tmp_path / "two")
    assert (st["done"], st["failed"]) == (9, 0) and len(st["logs"]) == 2


def test_explain_a_tfds_split_on_two_processes(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    sys.path.insert(0, os.path.join(TESTS))
    from test_data import LiftcamTinyImages, N_TFDS

    d = tmp_path / "tfds"
    LiftcamTinyImages(data_dir=str(d), file_format="array_record").download_and_prepare()
    common = ["tfds:liftcam_tiny_images:train", "--data-dir", d, "--model", "tiny", "--save", "raw", "--quiet"]
    outs = _two("explain", common + ["--out", tmp_path / "two"])
    assert [rc for rc, _ in outs] == [0, 0], outs
    assert fake_zoo.main(["explain", *map(str, common + ["--out", tmp_path / "one"])]) == 0
    ids = sorted(r["id"] for r in _done_lines(tmp_path / "two"))
    assert ids == sorted(batch.read_manifests(tmp_path / "one")) and len(set(ids)) == N_TFDS == len(ids)
    _same_outputs(tmp_path / "one", tmp_path / "two", ids)
    assert tfds is not None


def test_evaluate_on_two_processes_equals_one(tmp_path):
    from test_evaluate import make_data

    data = make_data(tmp_path / "data")
    common = ["--data", data, "--model", "tiny", "--methods", "lift-cam,grad-cam", "--metrics", "ad,ic,deletion,epg",
              "--step", "100", "--batch-size", "3", "--quiet"]
    outs = _two("evaluate", common + ["--out", tmp_path / "two"])
    assert [rc for rc, _ in outs] == [0, 0], outs
    assert fake_zoo.main(["evaluate", *map(str, common + ["--out", tmp_path / "one"])]) == 0
    a = json.loads((tmp_path / "one" / "results.json").read_text())
    b = json.loads((tmp_path / "two" / "results.json").read_text())
    assert sorted(os.listdir(tmp_path / "two")) == sorted(
        ["curves.png", "evaluate-00000-of-00002.jsonl", "evaluate-00001-of-00002.jsonl", "grid", "grid.png",
         "results.json", "results.md", "run.json"])
    key = lambda r: (r["item"], r["method"])  # noqa: E731
    pa, pb = sorted(a["per_image"], key=key), sorted(b["per_image"], key=key)
    assert [key(r) for r in pa] == [key(r) for r in pb] and len(pa) == 8
    for ra, rb in zip(pa, pb):
        assert (ra["label"], ra["target"], ra["predicted"]) == (rb["label"], rb["target"], rb["predicted"])
        for col, v in ra["metrics"].items():
            if v is None:  # e.g. the energy pointing game of an image without a box
                assert rb["metrics"][col] is None
            else:
                np.testing.assert_allclose(rb["metrics"][col], v, rtol=1e-5, atol=1e-6)
    for m in ("lift-cam", "grad-cam"):
        for col in ("ad", "ic", "deletion", "epg"):
            for k in ("mean", "low", "high"):
                np.testing.assert_allclose(b["aggregate"][m][col][k], a["aggregate"][m][col][k], rtol=1e-5)


def test_one_process_killed_then_rerun_loses_nothing(tmp_path):
    inputs = _photos(tmp_path / "in", 10)
    args = [inputs, "--model", "tiny", "--save", "raw", "--batch-size", "1", "--quiet", "--out", tmp_path / "two"]
    port = _port()
    # one batch (one image) per second on each host; the survivor learns of the death within the heartbeat
    procs = [_start("explain", args, i, port, FAKE_ZOO_BATCH_DELAY="1", LIFTCAM_JAX_HEARTBEAT_S="10")
             for i in range(2)]
    manifest1 = tmp_path / "two" / "manifest-00001-of-00002.jsonl"
    deadline = time.monotonic() + LIMIT_S
    while time.monotonic() < deadline and procs[1].poll() is None:
        if manifest1.exists() and manifest1.read_text().count("\n") >= 1:
            break
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)
    outs = _wait(procs)
    # JAX's distributed runtime stops the survivors when a peer dies (here host 0, at its shutdown
    # barrier, after finishing its share): what matters is that nothing written is lost
    assert outs[1][0] == -signal.SIGKILL and outs[0][0] in (0, -signal.SIGABRT), outs
    before = {r["id"] for r in _done_lines(tmp_path / "two")}
    assert 1 <= len(before) < 10
    outs = _two("explain", args)  # the same command again, on both hosts
    assert [rc for rc, _ in outs] == [0, 0], outs
    done = _done_lines(tmp_path / "two")
    ids = [r["id"] for r in done]
    assert sorted(set(ids)) == [f"in/p{i:02d}" for i in range(10)] and len(ids) == len(set(ids))
    assert fake_zoo.main(["explain", *map(str, args[:-1] + [tmp_path / "one"])]) == 0
    _same_outputs(tmp_path / "one", tmp_path / "two", sorted(ids))
    # and after a change of host count, nothing is redone
    rc = fake_zoo.main(["explain", *map(str, args)])
    assert rc == 0 and len(_done_lines(tmp_path / "two")) == 10


def test_an_unreachable_coordinator_is_one_line_within_a_minute(tmp_path, capsys):
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, FAKE, "explain", str(_photos(tmp_path / "in", 1)), "--model", "tiny",
                             "--out", str(tmp_path / "o"), "--coordinator", f"127.0.0.1:{_port()}",
                             "--num-processes", "2", "--process-id", "1", "--init-timeout", "5"],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    (rc, err), = _wait([proc], limit=60)
    assert time.monotonic() - t0 < 60
    assert rc == 2 and err.strip().count("\n") == 0 and "cannot reach the coordinator" in err, err
    # and inconsistent settings are refused before anything starts
    assert fake_zoo.main(["explain", str(tmp_path / "in"), "--model", "tiny", "--out", str(tmp_path / "o2"),
                          "--num-processes", "2"]) == 2
    assert "together" in capsys.readouterr().err


def test_the_barrier_fails_in_one_line_if_jax_moves_its_runtime_client(monkeypatch):
    """The private barrier is reached in one function; if JAX moves it the error names the version."""
    import jax
    from jax._src import distributed as _dist

    from liftcam_jax import distributed
    from liftcam_jax.errors import UsageError

    monkeypatch.delattr(_dist, "global_state")
    with pytest.raises(UsageError, match=f"JAX {jax.__version__} moved its distributed runtime's barrier"):
        distributed._runtime_client()
    monkeypatch.setattr(jax, "process_count", lambda: 1)
    distributed.barrier("one process: no-op")
