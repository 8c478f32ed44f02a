"""The peer-comparison script runs (smoke mode) and compares like with like.

Speed is never asserted: the check is that the script produces its table and
that, on the same converted weights, both sides compute the same logits and
the same LIFT-CAM / Grad-CAM maps (so the timings compare the same work).
"""
import importlib.util
import json
from pathlib import Path

import pytest

torch = pytest.importorskip(
    "torch",
    reason="parity tier needs the PyTorch reference stack (pip install torch==2.14.1 torchvision==0.29.1 timm captum grad-cam)",
)
pytest.importorskip("torchvision", reason="parity tier needs torchvision")
pytest.importorskip("captum", reason="parity tier needs captum")
pytest.importorskip("pytorch_grad_cam", reason="parity tier needs grad-cam (pytorch-grad-cam)")


def _script():
    path = Path(__file__).with_name("peer_bench.py")
    spec = importlib.util.spec_from_file_location("peer_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_peer_bench_smoke(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        rc = _script().main(["--smoke", "--methods", "lift-cam,grad-cam",
                             "--out", str(tmp_path / "p.json"), "--out", str(tmp_path / "p.md")])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    out = capsys.readouterr().out
    assert (tmp_path / "p.md").read_text() == out and "| resnet18 | lift-cam | 1 |" in out
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["info"]["torch_threads"] == 2
    rows = {r["method"]: r for r in data["rows"]}
    assert set(rows) == {"lift-cam", "grad-cam"}
    for r in rows.values():
        assert r["logit_diff"] < 1e-3  # the same network on both sides
        assert r["max_map_diff"] < 1e-3  # the same maps: the timings compare the same work
        for key in ("jax_s_per_image", "peer_s_per_image", "jax_forward_s_per_image",
                    "torch_forward_s_per_image", "speedup"):
            assert r[key] > 0
