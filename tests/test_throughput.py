"""liftcam_jax.throughput: a dataset run measured against its compiled step (structure and sanity, no speed bar)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import fake_zoo  # noqa: E402

from liftcam_jax import throughput  # noqa: E402
from liftcam_jax.errors import UsageError  # noqa: E402


def _photos(folder, n):
    return fake_zoo.write_photos(folder, n, first_height=40, name="p{i}.png")


def test_dataset_efficiency_measures_step_decode_and_runs(tmp_path):
    clf = fake_zoo.load("tiny")
    photos = _photos(tmp_path / "in", 7)
    out = tmp_path / "out"
    rep = throughput.dataset_efficiency(clf, [str(photos)], batch_size=4, limit=6, repeats=2, out_dir=out)
    assert (rep.model, rep.method, rep.images, rep.batch_size, rep.repeats) == ("tiny", "lift-cam", 6, 4, 2)
    assert set(rep.runs) == {"raw", "both"}
    for t in (rep.step, rep.decode, *rep.runs.values()):
        assert 0 < t.seconds < 60 and 0 <= t.cpu_seconds < 600
    for save in ("raw", "both"):
        assert 0 < rep.efficiency(save) <= 1.5
        assert rep.efficiency(save) == pytest.approx(rep.step.seconds / rep.runs[save].seconds)
    # the runs wrote what they say, into fresh folders: 6 of the 7 photos (the limit)
    for r in range(2):
        raw = sorted(p.name for p in (out / f"run-{r}-raw" / "in").iterdir())
        both = sorted(p.name for p in (out / f"run-{r}-both" / "in").iterdir())
        assert raw == [f"p{i}.npz" for i in range(6)]
        assert both == sorted([f"p{i}.npz" for i in range(6)] + [f"p{i}.png" for i in range(6)])
    md = rep.to_markdown()
    assert "compiled step alone" in md and "save=raw" in md and "save=both" in md and "6 images, batch 4" in md
    assert sum(line.startswith("|") for line in md.splitlines()) == 6  # header, rule, step, decode, 2 runs


def test_dataset_efficiency_refuses_bad_arguments(tmp_path):
    clf = fake_zoo.load("tiny")
    photos = _photos(tmp_path / "in", 1)
    with pytest.raises(UsageError, match="save mode"):
        throughput.dataset_efficiency(clf, [str(photos)], saves=("png",))
    with pytest.raises(UsageError, match="batch size"):
        throughput.dataset_efficiency(clf, [str(photos)], batch_size=0)
