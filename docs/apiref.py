"""The API reference's pages, one per public module, written before each Sphinx build.

The list of modules is ``api/index.rst``'s autosummary (one line per module). Each page is
``automodule`` over the module's ``__all__`` (or, where it has none, the public names it
defines), plus an ``autodata`` entry for each plain value (a tuple of names, a constant):
autodoc alone documents a module's data only where it has a ``#:`` comment.
``tests/test_docs.py`` uses the same two functions to check the built site.
"""
from __future__ import annotations

import importlib
import inspect
import os
import re
import types

HERE = os.path.dirname(os.path.abspath(__file__))
INDEX = os.path.join(HERE, "api", "index.rst")
PAGES = os.path.join(HERE, "api", "generated")


def listed_modules() -> list[str]:
    """The modules named in ``api/index.rst``, in order."""
    with open(INDEX, encoding="utf-8") as f:
        return re.findall(r"^\s+(liftcam_jax(?:\.\w+)*)\s*$", f.read(), flags=re.M)


def public_names(module: types.ModuleType) -> list[str]:
    """``__all__``, or the public names a module defines itself where it has none."""
    names = getattr(module, "__all__", None)
    if names is not None:
        return list(names)
    return [n for n, v in vars(module).items()
            if not n.startswith("_") and not inspect.ismodule(v)
            and getattr(v, "__module__", module.__name__) == module.__name__]


def _is_data(value) -> bool:
    return not (inspect.isclass(value) or inspect.ismodule(value) or callable(value))


def write_pages() -> None:
    os.makedirs(PAGES, exist_ok=True)
    for name in listed_modules():
        module = importlib.import_module(name)
        data = [n for n in public_names(module) if _is_data(getattr(module, n))]
        title = name.replace("_", r"\_")
        lines = [title, "=" * len(title), "", f".. automodule:: {name}"]
        if data:
            lines.append(f"   :exclude-members: {', '.join(data)}")
            for n in data:  # a long value (a registry of functions) is left to the docstring
                lines += ["", f".. autodata:: {name}.{n}"]
                if len(repr(getattr(module, n))) > 100:
                    lines.append("   :no-value:")
        text = "\n".join(lines) + "\n"
        path = os.path.join(PAGES, f"{name}.rst")
        if not os.path.exists(path) or open(path, encoding="utf-8").read() != text:
            with open(path, "w", encoding="utf-8") as f:  # rewritten only when changed: incremental builds
                f.write(text)
