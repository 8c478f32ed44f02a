"""The one registry of methods: CLI names -> coefficient functions.

A method is a pure function::

    method(split, params, x, activations, targets, logits, *, key=None, **options) -> Attribution

``activations = split.features(params, x)`` and ``logits = split.head(params,
activations)`` are computed once by :func:`liftcam_jax.explain` and handed in;
``targets`` is ``(B,)`` int32. It returns channel (or per-position) weights and
whatever it wants to report; the map is assembled by
:func:`liftcam_jax.explanation.assemble`, the same for every method.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict

from ..errors import UsageError


class UnknownMethodError(UsageError):
    """A method name that is not registered."""


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    fn: Callable
    needs_key: bool = False
    summary: str = ""


_REGISTRY: Dict[str, Method] = {}


def register(name: str, *, needs_key: bool = False, summary: str = ""):
    """Decorator: register ``fn`` under ``name`` (e.g. ``"lift-cam"``)."""

    def deco(fn):
        if name in _REGISTRY and _REGISTRY[name].fn is not fn:
            raise ValueError(f"method {name!r} registered twice")
        doc = (fn.__doc__ or "").strip().splitlines()
        _REGISTRY[name] = Method(name, fn, needs_key, summary or (doc[0] if doc else ""))
        return fn

    return deco


def get(name: str) -> Method:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownMethodError(
            f"unknown method {name!r}; valid methods: {', '.join(names())}"
        ) from None


def names() -> tuple:
    return tuple(_REGISTRY)
