"""Sphinx configuration of the liftcam-jax site: guide, API reference, results, benchmarks, notebooks.

Build (from the repository root, offline, warnings as errors):
    sphinx-build -W --keep-going -b html docs docs/_build/html
The notebooks are rendered from their stripped form in ``notebooks/`` and never executed here
(``tests/test_notebooks.py`` runs them).
"""
import os
import shutil
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)  # the checkout's liftcam_jax, also without an install
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import apiref  # noqa: E402

apiref.write_pages()  # api/generated/<module>.rst for every module listed in api/index.rst

project = "liftcam-jax"
author = "liftcam-jax authors"
copyright = "liftcam-jax authors"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "myst_nb",  # MyST markdown and notebooks
]

# The notebooks live in notebooks/ (outside this source folder); copy them in at every build.
_NB_SRC, _NB_DST = os.path.join(ROOT, "notebooks"), os.path.join(os.path.dirname(__file__), "notebooks")
shutil.rmtree(_NB_DST, ignore_errors=True)
shutil.copytree(_NB_SRC, _NB_DST, ignore=shutil.ignore_patterns("*.py", ".ipynb_checkpoints", "README.md"))
with open(os.path.join(_NB_SRC, "README.md"), encoding="utf-8") as f:
    _nb_readme = f.read()
_nb_names = sorted(n[: -len(".ipynb")] for n in os.listdir(_NB_DST) if n.endswith(".ipynb"))
with open(os.path.join(_NB_DST, "index.md"), "w", encoding="utf-8") as f:
    f.write(_nb_readme + "\n```{toctree}\n:hidden:\n\n" + "\n".join(_nb_names) + "\n```\n")

nb_execution_mode = "off"  # rendered as stored (stripped); CI executes them in tests/test_notebooks.py
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3  # README/results links such as benchmarks.md#shap-ground-truth
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "bench/*.md", "Thumbs.db", ".DS_Store"]

autosummary_generate = False  # the pages come from apiref.write_pages
autodoc_default_options = {"members": True, "undoc-members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # "Attributes:" as fields: no second description of dataclass fields

html_theme = "furo"
html_title = "liftcam-jax"


def _no_builtin_type_docs(app, what, name, obj, options, lines):
    """A module constant without a ``#:`` comment shows its value, not its type's docstring (``dict()``...)."""
    if what == "data" and lines and type(obj).__module__ == "builtins":
        doc = (type(obj).__doc__ or "").strip().splitlines()
        if doc and lines[0].strip() == doc[0].strip():
            lines.clear()


def setup(app):
    app.connect("autodoc-process-docstring", _no_builtin_type_docs)


# A class re-exported by several public modules (``batch`` and ``data`` both export
# ``DataOptions``) is documented on each page under that page's name; autodoc would also
# declare its defining module's name (``:canonical:``) on every page, a duplicate
# description that -W turns into an error. Each page documents the name its module gives.
try:  # Sphinx >= 9: autodoc's item properties
    from sphinx.ext.autodoc._property_types import _ClassDefProperties  # noqa: E402

    _ClassDefProperties.canonical_full_name = property(lambda self: None)
except ImportError:  # Sphinx 7 and 8
    from sphinx.ext.autodoc import ClassDocumenter  # noqa: E402

    ClassDocumenter.get_canonical_fullname = lambda self: None
