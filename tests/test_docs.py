"""The API reference documents every public module and every name in its ``__all__``.

Sphinx does not warn about a public name nobody documented, so these tests do: the module list
in ``docs/api/index.rst`` must cover every public module of ``liftcam_jax``, and the built
site's inventory (``objects.inv``) must hold every name of every listed module's ``__all__``.
The build runs offline with warnings as errors, as the README's docs command does; set
``LIFTCAM_DOCS_HTML`` to an existing build (``docs/_build/html``) to check that one instead.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import pathlib
import pkgutil
import types

import pytest

import liftcam_jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("apiref", ROOT / "docs" / "apiref.py")
apiref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(apiref)  # the module list and public names the API pages are built from
# Modules that are not API: the command line (documented in the guide) and ``explain``,
# whose two functions are re-exported (and documented) at the top level.
NOT_API = {"cli", "commands", "explain"}


def test_every_public_module_is_listed():
    found = {f"liftcam_jax.{m.name}" for m in pkgutil.iter_modules(liftcam_jax.__path__)
             if not m.name.startswith("_") and m.name not in NOT_API}
    missing = sorted(found - set(apiref.listed_modules()) - {"liftcam_jax"})
    assert not missing, f"public modules missing from docs/api/index.rst: {missing}"


def test_module_list_has_no_stale_entries():
    for name in apiref.listed_modules():
        importlib.import_module(name)  # ModuleNotFoundError names a listed module that is gone


@pytest.fixture(scope="module")
def inventory(tmp_path_factory) -> set[str]:
    pytest.importorskip("sphinx", reason="the docs extra is not installed (pip install -e '.[docs]')")
    pytest.importorskip("myst_nb", reason="the docs extra is not installed (pip install -e '.[docs]')")
    from sphinx.util.inventory import InventoryFile

    html = os.environ.get("LIFTCAM_DOCS_HTML")
    if html:
        out = pathlib.Path(html)
    else:
        from sphinx.cmd.build import build_main

        out = tmp_path_factory.mktemp("html")
        rc = build_main(["-W", "--keep-going", "-q", "-b", "html", "-d", str(out / ".doctrees"),
                         str(ROOT / "docs"), str(out)])
        assert rc == 0, "sphinx-build -W failed (warnings above)"
    with open(out / "objects.inv", "rb") as f:
        inv = InventoryFile.load(f, "", os.path.join)
    return {name for entries in inv.values() for name in entries}


def test_every_name_in_all_is_documented(inventory):
    missing = []
    for module_name in apiref.listed_modules():
        module = importlib.import_module(module_name)
        for name in apiref.public_names(module):
            obj = getattr(module, name)
            full = obj.__name__ if isinstance(obj, types.ModuleType) else f"{module_name}.{name}"
            if full not in inventory:
                missing.append(full)
    assert not missing, f"public names missing from the API reference: {missing}"
