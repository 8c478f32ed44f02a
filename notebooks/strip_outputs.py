"""Strip outputs, execution counts and execution metadata from notebooks, in place.

    python notebooks/strip_outputs.py                 # every notebooks/*.ipynb
    python notebooks/strip_outputs.py path.ipynb ...

The notebooks are committed without outputs (tests/test_notebooks.py checks it).
"""
import sys
from pathlib import Path

import nbformat


def strip(path) -> bool:
    """Strip one notebook; ``True`` when it changed."""
    nb = nbformat.read(path, as_version=4)
    before = nbformat.writes(nb)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    after = nbformat.writes(nb)
    if after != before:
        Path(path).write_text(after + ("" if after.endswith("\n") else "\n"), encoding="utf-8")
    return after != before


if __name__ == "__main__":
    paths = sys.argv[1:] or sorted(str(p) for p in Path(__file__).resolve().parent.glob("*.ipynb"))
    for p in paths:
        print(("stripped " if strip(p) else "clean    ") + p)
