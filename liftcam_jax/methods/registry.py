"""The one registry of methods: CLI names -> coefficient functions.

A method is a pure function::

    method(split, params, x, activations, targets, logits, *, key=None, **options) -> Attribution

``activations = split.features(params, x)`` and ``logits = split.head(params,
activations)`` are computed once by :func:`liftcam_jax.explain` and handed in;
``targets`` is ``(B,)`` int32. It returns channel (or per-position) weights and
whatever it wants to report; the map is assembled by
:func:`liftcam_jax.explanation.assemble`, the same for every method.

Token activations ``(B, N, D)`` (a ViT's split) reach a method in one of two
ways, its ``tokens`` (:mod:`liftcam_jax.tokens`): ``"grid"`` (default) hands
it the grid activations ``(B, h, w, D)`` and a head with the prefix tokens
held at their values (pytorch-grad-cam's ``reshape_transform``); ``"all"``
hands it the tokens, the model's own head and ``split.tokens`` (the resolved
:class:`~liftcam_jax.tokens.TokenLayout`), and it sums over every token.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

from ..errors import UsageError


class UnknownMethodError(UsageError):
    """A method name that is not registered."""


@dataclasses.dataclass(frozen=True)
class Method:
    """A registered method: its CLI ``name``, its function, whether it takes a PRNG ``key``, a one-line summary,
    and how it sees token activations (``tokens``: ``"grid"`` or ``"all"``, see the module's docstring).

    A name is looked up once (:func:`get`, :func:`resolve`) and the object passed on.
    """

    name: str
    fn: Callable
    needs_key: bool = False
    summary: str = ""
    tokens: str = "grid"


_REGISTRY: Dict[str, Method] = {}


def register(name: str, *, needs_key: bool = False, summary: str = "", tokens: str = "grid"):
    """Decorator: register ``fn`` under ``name`` (e.g. ``"lift-cam"``); ``tokens``: ``"grid"`` or ``"all"``."""
    if tokens not in ("grid", "all"):
        raise ValueError(f"tokens must be 'grid' or 'all', got {tokens!r}")

    def deco(fn):
        if name in _REGISTRY and _REGISTRY[name].fn is not fn:
            raise ValueError(f"method {name!r} registered twice")
        doc = (fn.__doc__ or "").strip().splitlines()
        _REGISTRY[name] = Method(name, fn, needs_key, summary or (doc[0] if doc else ""), tokens)
        return fn

    return deco


def get(name: str) -> Method:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownMethodError(
            f"unknown method {name!r}; valid methods: {', '.join(names())}"
        ) from None


def resolve(method: Union[str, Method]) -> Method:
    """A :class:`Method` as it is, or the registered method of a name (:func:`get`)."""
    return method if isinstance(method, Method) else get(method)


def names() -> tuple:
    return tuple(_REGISTRY)


class MethodList(NamedTuple):
    """What :func:`parse_names` read: the method ``names`` (each ``NAME`` or, with options,
    ``NAME:KEY=VALUE...``), and whether they were listed one by one (``explicit``) rather
    than as ``all`` or another group."""

    names: List[str]
    explicit: bool


def parse_names(text: str, *, allow_options: bool = False,
                groups: Optional[Mapping[str, Sequence[str]]] = None) -> MethodList:
    """Parse ``"all"`` or a comma-separated list of method names (the CLI's ``--methods``).

    Every name must be registered (:class:`UnknownMethodError` names the valid
    ones); repeats are dropped, the order is kept. ``all`` is every registered
    method; ``groups`` adds other such words (e.g. ``{"default": [...]}``). With
    ``allow_options`` an item may carry options, ``NAME:KEY=VALUE[:KEY=VALUE]``,
    kept as written for :func:`parse_method_spec`; without, an
    option is a :class:`~liftcam_jax.errors.UsageError`.
    """
    groups = {"all": names(), **(groups or {})}
    words = ", ".join(repr(g) for g in groups)
    items = [p.strip() for p in str(text).split(",") if p.strip()]
    if not items:
        raise UsageError(f"no methods given; valid methods: {', '.join(names())}, or {words}")
    if len(items) == 1 and items[0] in groups:
        return MethodList(list(groups[items[0]]), False)
    for item in items:
        name, colon, _ = item.partition(":")
        if item in groups:
            raise UsageError(f"{item!r} stands alone, not in a list of methods: {text!r}")
        if colon and not allow_options:
            raise UsageError(f"method options are not taken here: {item!r}; give method names only")
        get(name.strip())  # UnknownMethodError lists the valid ones
    return MethodList(list(dict.fromkeys(items)), True)


def spec_label(name: str, options: Sequence[Tuple[str, Any]] = ()) -> str:
    """``name`` or ``name:key=value:key=value``: how a method with options is written."""
    return ":".join([name] + [f"{k}={v}" for k, v in options])


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """A method and its options, written ``name`` or ``name:key=value:key=value``; ``method`` is the
    registered :class:`Method` (resolved from ``name`` when not given)."""

    name: str
    options: Tuple[Tuple[str, Any], ...] = ()
    method: Optional[Method] = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if self.method is None:
            object.__setattr__(self, "method", get(self.name))

    @property
    def label(self) -> str:
        return spec_label(self.name, self.options)

    @property
    def kwargs(self) -> Dict[str, Any]:
        return dict(self.options)


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_method_spec(text: str) -> MethodSpec:
    """``"score-cam:chunk_size=64"`` -> ``MethodSpec("score-cam", (("chunk_size", 64),))``.

    The method must be registered and take every option as a keyword argument
    (:class:`~liftcam_jax.errors.UsageError` otherwise, naming what is valid).
    """
    name, *parts = [p.strip() for p in str(text).split(":")]
    method = get(name)  # UnknownMethodError lists the methods
    params = inspect.signature(method.fn).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    valid = [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY and n != "key"]
    options = []
    for part in parts:
        key, eq, value = part.partition("=")
        key = key.strip()
        if not eq or not key:
            raise UsageError(f"bad method option {part!r} in {text!r}: write NAME:KEY=VALUE")
        if not takes_any and key not in valid:
            raise UsageError(
                f"method {name!r} has no option {key!r}; valid options: {', '.join(valid) or 'none'}"
            )
        options.append((key, _literal(value.strip())))
    return MethodSpec(name, tuple(options), method)
