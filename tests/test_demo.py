"""The demo: offline, pretrained EfficientNet-Lite0 on the bundled photos."""
import numpy as np
from PIL import Image

from models.cli import main


def test_demo_writes_grid_and_prints_top5(tmp_path, capsys):
    rc = main(["demo", "--out", str(tmp_path), "--methods", "lift-cam,grad-cam"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "285 Egyptian cat" in out and "967 espresso" in out
    assert "lift-cam" in out and "forward pass" in out
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    # 4 photos x (photo + 2 overlays), 224-pixel tiles
    assert grid.shape[0] > 4 * 224 and grid.shape[1] > 3 * 224


def test_demo_bad_method_is_one_line(tmp_path, capsys):
    rc = main(["demo", "--out", str(tmp_path), "--methods", "nope"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "unknown method 'nope'" in err and "lift-cam" in err
