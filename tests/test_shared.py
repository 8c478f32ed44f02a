"""The shared small pieces: the method-list parser, integer checks, one-line reasons, the
cache root, the console script's zoo lookup and the CLI's plain help text."""
import importlib.metadata
import os
import sys
import types
from pathlib import Path

import pytest

from liftcam_jax import cli, errors, files, methods
from liftcam_jax.errors import UsageError


# --- methods.parse_names ------------------------------------------------------

def test_parse_names_all_list_and_groups():
    assert methods.parse_names("all") == (list(methods.names()), False)
    assert methods.parse_names(" grad-cam , lift-cam,grad-cam ,") == (["grad-cam", "lift-cam"], True)
    assert methods.parse_names("fast", groups={"fast": ["lift-cam"]}) == (["lift-cam"], False)


@pytest.mark.parametrize("text, message", [
    ("", "no methods given; valid methods: lift-cam"),
    (" , ", "no methods given"),
    ("nope", "unknown method 'nope'; valid methods: lift-cam"),
    ("lift-cam,all", "'all' stands alone"),
    ("score-cam:chunk_size=8", "method options are not taken here: 'score-cam:chunk_size=8'"),
])
def test_parse_names_errors_name_what_is_valid(text, message):
    with pytest.raises(UsageError) as info:
        methods.parse_names(text)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_parse_names_with_options_keeps_them_and_checks_the_name():
    got = methods.parse_names("score-cam:chunk_size=8,score-cam:chunk_size=16", allow_options=True)
    assert got.names == ["score-cam:chunk_size=8", "score-cam:chunk_size=16"] and got.explicit
    with pytest.raises(methods.UnknownMethodError, match="unknown method 'nope'"):
        methods.parse_names("nope:x=1", allow_options=True)


# --- errors.positive_int / one_line --------------------------------------------

def test_positive_int_accepts_integers_only():
    import numpy as np

    assert errors.positive_int("n", 3) == 3 and type(errors.positive_int("n", np.int64(3))) is int
    assert errors.positive_int("n", 0, minimum=0) == 0
    assert errors.positive_int("n", 4, minimum=4, even=True) == 4
    for bad in (0, -1, True, 2.0, "3", None):
        with pytest.raises(UsageError, match=r"^n must be a positive integer, got "):
            errors.positive_int("n", bad)
    with pytest.raises(UsageError, match=r"^k must be an integer >= 4 and even, got 2$"):
        errors.positive_int("k", 2, minimum=4, even=True)
    with pytest.raises(UsageError, match=r"^k must be even, got 5$"):
        errors.positive_int("k", 5, minimum=4, even=True)


def test_argparse_positive_int_wraps_it():
    import argparse

    from liftcam_jax.commands._args import positive_int

    assert positive_int("7") == 7
    for bad in ("0", "-2", "x", "1.5"):
        with pytest.raises(argparse.ArgumentTypeError, match=f"expected a positive integer, got '{bad}'"):
            positive_int(bad)


def test_one_line():
    assert errors.one_line(ValueError("first\nsecond")) == "first"
    assert errors.one_line(KeyError()) == "KeyError"
    assert errors.one_line(OSError("  \n")) == "OSError"


# --- files.cache_root ---------------------------------------------------------

def test_cache_root_is_the_one_cache(monkeypatch, tmp_path):
    import models.zoo

    monkeypatch.setenv("LIFTCAM_JAX_CACHE", str(tmp_path))
    assert files.cache_root() == str(tmp_path) and files.cache_root("xla") == str(tmp_path / "xla")
    assert models.zoo.cache_dir() == tmp_path / "params"
    monkeypatch.delenv("LIFTCAM_JAX_CACHE")
    assert files.cache_root("params") == os.path.join(os.path.expanduser("~"), ".cache", "liftcam-jax", "params")


def test_zoo_cache_write_is_atomic_and_readable(monkeypatch, tmp_path):
    import numpy as np

    from models import zoo

    file = tmp_path / "sub" / "w.npz"
    zoo._write_cache(file, {"stem": {"conv": {"kernel": np.ones((2, 3), np.float32)}}})
    with np.load(file) as z:
        assert z.files == ["stem/conv/kernel"] and z["stem/conv/kernel"].shape == (2, 3)
    assert [p.name for p in file.parent.iterdir()] == ["w.npz"]  # no temporary left behind


def test_no_module_shadows_the_standard_library():
    import importlib.util
    import pathlib

    root = pathlib.Path(importlib.util.find_spec("liftcam_jax").origin).parent
    assert not (root / "io.py").exists() and (root / "files.py").exists()


# --- the console script ---------------------------------------------------------

def _entry_points(monkeypatch, eps):
    def fake(*, group):
        assert group == "liftcam_jax.zoos"
        return [importlib.metadata.EntryPoint(n, v, group) for n, v in eps]

    monkeypatch.setattr(importlib.metadata, "entry_points", fake)


def test_pyproject_declares_the_console_script_and_the_zoo():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["liftcam-jax"] == "liftcam_jax.cli:console_main"
    assert project["entry-points"]["liftcam_jax.zoos"] == {"models": "models"}


def test_find_zoo_loads_the_declared_zoo(monkeypatch):
    zoo = types.ModuleType("my_test_zoo")
    monkeypatch.setitem(sys.modules, "my_test_zoo", zoo)
    _entry_points(monkeypatch, [("mine", "my_test_zoo")])
    monkeypatch.delenv("LIFTCAM_JAX_ZOO", raising=False)
    assert cli.find_zoo() is zoo


def test_find_zoo_chooses_among_several(monkeypatch):
    zoo = types.ModuleType("my_test_zoo")
    monkeypatch.setitem(sys.modules, "my_test_zoo", zoo)
    _entry_points(monkeypatch, [("a", "my_test_zoo"), ("b", "json")])
    monkeypatch.delenv("LIFTCAM_JAX_ZOO", raising=False)
    with pytest.raises(UsageError, match=r"several model zoos are installed \(a, b\); choose one with LIFTCAM_JAX_ZOO"):
        cli.find_zoo()
    monkeypatch.setenv("LIFTCAM_JAX_ZOO", "a")
    assert cli.find_zoo() is zoo
    monkeypatch.setenv("LIFTCAM_JAX_ZOO", "c")
    with pytest.raises(UsageError, match="LIFTCAM_JAX_ZOO='c' is not an installed model zoo; installed: a, b"):
        cli.find_zoo()


def test_console_main_without_a_zoo_is_one_line(monkeypatch, capsys):
    _entry_points(monkeypatch, [])
    assert cli.console_main(["--help"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("liftcam-jax: error: no model zoo is installed") and len(err.strip().splitlines()) == 1


def test_console_main_with_a_broken_zoo_is_one_line(monkeypatch, capsys):
    _entry_points(monkeypatch, [("broken", "no_such_module_for_liftcam_tests")])
    monkeypatch.delenv("LIFTCAM_JAX_ZOO", raising=False)
    assert cli.console_main(["--help"]) == 2
    err = capsys.readouterr().err
    assert "cannot load model zoo 'broken'" in err and len(err.strip().splitlines()) == 1


def test_console_main_runs_the_cli_over_the_zoo(monkeypatch, capsys):
    import models

    _entry_points(monkeypatch, [("models", "models")])
    monkeypatch.delenv("LIFTCAM_JAX_ZOO", raising=False)
    assert cli.console_main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == "liftcam-jax 0.1.0"


# --- help text --------------------------------------------------------------------

@pytest.mark.parametrize("argv", [["--help"]] + [[c, "--help"] for c in cli.COMMANDS])
def test_help_has_no_rest_markup(argv, capsys):
    assert cli.main(argv, zoo=types.SimpleNamespace()) == 0  # help needs no model
    out = capsys.readouterr().out
    assert "usage: liftcam-jax" in out and "``" not in out and ":func:" not in out and ":mod:" not in out


def test_plain():
    assert cli.plain("the ``liftcam-jax`` CLI, :func:`~liftcam_jax.explain` and :mod:`x.y`") == \
        "the liftcam-jax CLI, liftcam_jax.explain and x.y"
