r"""What the attribution rules know about JAX primitives, in one table, and how they read jaxprs.

Every fact the rule modules (:mod:`liftcam_jax.interpreter`,
:mod:`liftcam_jax.rescale`, :mod:`liftcam_jax.lrp`, :mod:`liftcam_jax.affine`,
:mod:`liftcam_jax.methods.cams`) use about a primitive is one row of
:data:`TABLE`, keyed by the primitive's name, the way ``jax/_src/interpreters/ad.py``
keys its rules. A row (:class:`Facts`) says:

* ``kind``: which rule applies when an operand depends on the input:

  - ``linear``: linear (affine) in its input-dependent operands, the others
    constant: :math:`f(x + \delta) = f(x) + J\delta` (``add``, ``dot_general``
    and ``conv_general_dilated`` with a constant kernel, reshapes, sums, ...);
  - ``elementwise``: a nonlinearity :math:`y_i = g(u_i)` of one
    input-dependent operand (``tanh``, ``exp``, ``max`` with a constant, ...);
  - ``chooser``: a windowed or reduced maximum/minimum (max-pooling):
    :math:`y = \max_{i \in w} x_i`, each output a copy of one chosen input;
  - ``call``: carries a body that is interpreted recursively (``jit``,
    ``remat``, ``custom_vjp_call``, ...); ``custom_jvp``: a function with a
    custom derivative, one elementwise function (``relu``) or a call;
  - ``comparison``: a boolean or integer result (``gt``, ``and``, ``argmax``):
    no rule, a value computed from the input through it is not differentiable;
  - ``refused``: no rule of its own (``stop_gradient``: the interpreter
    refuses it; ``scan``, ``cond``, generic ``reduce_window`` are rewritten by
    :data:`liftcam_jax.interpreter.REWRITES`, which needs no row here).

* ``operands``: for ``linear``, which operands may depend on the input:
  ``"all"``, ``"one"`` (exactly one of two: ``mul``, ``dot_general``),
  ``"cases"`` (``select_n``: not the predicate) or a tuple of positions.
* ``product``: what the primitive is when more operands depend on the input
  than ``operands`` allows (:func:`liftcam_jax.equations.classify` then
  gives the kind ``product``): ``"bilinear"`` (``mul``, ``dot_general``,
  ``conv_general_dilated``: :math:`f(a, b)` linear in each operand) or
  ``"quotient"`` (``div``: :math:`a / b`; with only the denominator
  input-dependent it is an elementwise function of one value); rules in
  :mod:`liftcam_jax.rescale_rules`.
* ``zero``: when the output is zero at a zero input-dependent operand
  (DeepLIFT's zero reference stays symbolic through it): ``"always"``
  (:math:`f(0; c) = 0` for any constant :math:`c`), ``"if_constants_zero"``
  (the constant operands must be zero as well: ``add``, ``pad``),
  ``"if_cases"`` (``select_n``: the cases' constants zero, any predicate) or
  ``None``.
* ``structural``: the Jacobian only moves, copies or selects entries (LRP
  passes relevance through its transpose unchanged).
* ``positionwise``: output position :math:`i` reads operand position
  :math:`i` only (a ``custom_jvp`` body made of these is one elementwise
  function; :mod:`liftcam_jax.affine` keeps channels apart through them).
* ``piecewise_linear``: the derivative is piecewise constant, so second and
  higher derivatives vanish (used by the CAM baselines).
* ``reduces``: ``"axes"`` (``params["axes"]``) or ``"window"`` (a
  ``reduce_window_*``) for reductions, else ``None``.
* ``inline``: a call that is a plain function call (``jit``,
  ``closed_call``): no custom derivative, no rematerialisation.
* ``chooses``: for a ``chooser``, ``"max"`` or ``"min"``.

The second half of this module reads jaxpr *parameters*: every parameter a
rule needs goes through :func:`param` or one of the readers below, which know
the layouts of the JAX versions the library supports. A renamed parameter is
one alias here; an unknown layout is a one-line
:class:`~liftcam_jax.errors.LiftcamError` naming the JAX version and the
primitive, never a ``KeyError`` deep in a rule.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
from jax.extend import core as jcore

from .errors import LiftcamError

__all__ = [
    "Facts",
    "TABLE",
    "JaxprLayoutError",
    "custom_label",
    "facts",
    "label",
    "names",
    "param",
    "region_label",
    "sub_jaxpr",
]


class Facts(NamedTuple):
    """One primitive's row of :data:`TABLE` (see the module docstring)."""

    kind: str
    operands: Any = "all"
    zero: Optional[str] = None
    structural: bool = False
    positionwise: bool = False
    piecewise_linear: bool = False
    reduces: Optional[str] = None
    inline: bool = False
    chooses: Optional[str] = None
    product: Optional[str] = None


def _rows(names_, **facts_):
    return {n: Facts(**facts_) for n in names_.split()}


TABLE = {
    # -- linear in every operand -------------------------------------------
    # moves, copies or selects entries; zero at zero whatever the constants
    **_rows("reshape transpose broadcast_in_dim squeeze expand_dims slice rev "
            "reduce_precision sharding_constraint split squeeze_p optimization_barrier "
            "pvary mesh_cast", kind="linear", zero="always", structural=True),
    **_rows("convert_element_type copy copy_p", kind="linear", zero="always", structural=True,
            positionwise=True),
    **_rows("concatenate stack", kind="linear", zero="if_constants_zero", structural=True),
    "pad": Facts("linear", zero="if_constants_zero", structural=True),
    "dynamic_update_slice": Facts("linear", structural=True),
    # sums and differences
    **_rows("add sub", kind="linear", zero="if_constants_zero", positionwise=True),
    "add_any": Facts("linear", zero="if_constants_zero"),
    "neg": Facts("linear", zero="always", positionwise=True),
    **_rows("cumsum psum real imag conj", kind="linear", zero="always"),
    "complex": Facts("linear"),
    "reduce_sum": Facts("linear", zero="always", reduces="axes"),
    "reduce_window_sum": Facts("linear", zero="always", reduces="window"),
    # -- linear in some operands -------------------------------------------
    **_rows("mul", kind="linear", operands="one", zero="always", positionwise=True, product="bilinear"),
    **_rows("dot_general conv_general_dilated", kind="linear", operands="one", zero="always",
            product="bilinear"),
    "div": Facts("linear", operands=(0,), zero="always", positionwise=True, product="quotient"),
    "select_n": Facts("linear", operands="cases", zero="if_cases", structural=True, positionwise=True),
    **_rows("dynamic_slice gather", kind="linear", operands=(0,), zero="always", structural=True),
    **_rows("scatter-add scatter_add", kind="linear", operands=(0, 2)),
    # -- elementwise nonlinearities of one value ---------------------------
    **_rows("exp exp2 log log1p expm1 tanh logistic sin cos tan asin acos atan sinh cosh "
            "asinh acosh atanh sqrt rsqrt cbrt integer_pow pow square erf erfc erf_inv "
            "lgamma digamma atan2 rem nextafter logaddexp",
            kind="elementwise", positionwise=True),
    **_rows("max min abs sign floor ceil round clamp", kind="elementwise", positionwise=True,
            piecewise_linear=True),
    # -- max/min pooling -----------------------------------------------------
    "reduce_max": Facts("chooser", piecewise_linear=True, reduces="axes", chooses="max"),
    "reduce_min": Facts("chooser", piecewise_linear=True, reduces="axes", chooses="min"),
    "reduce_window_max": Facts("chooser", piecewise_linear=True, reduces="window", chooses="max"),
    "reduce_window_min": Facts("chooser", piecewise_linear=True, reduces="window", chooses="min"),
    # -- booleans and integers: no rule --------------------------------------
    **_rows("gt ge lt le eq ne and or not is_finite", kind="comparison", positionwise=True),
    **_rows("argmax argmin", kind="comparison", reduces="axes"),
    # -- calls ----------------------------------------------------------------
    # closed_call is named eval_jaxpr from JAX 0.11 on (the interpreter's elementwise regions are closed calls)
    **_rows("jit pjit closed_call eval_jaxpr core_call", kind="call", inline=True),
    **_rows("remat remat2 checkpoint custom_vjp_call custom_vjp_call_jaxpr custom_lin", kind="call"),
    "custom_jvp_call": Facts("custom_jvp"),
    # -- refused by the interpreter when input-dependent (softmax's max-shift) --
    # (a stop_gradient of a maximum, the max-shift of softmax and logsumexp, is a shift:
    # liftcam_jax.patterns.plan)
    "stop_gradient": Facts("refused", positionwise=True),
}
"""Primitive name -> :class:`Facts`. A primitive missing here has no rule."""

_UNKNOWN = Facts("unknown")

PIECEWISE_LINEAR_CUSTOM = frozenset({"relu", "relu6"})
"""``custom_jvp`` functions (by name) that are piecewise linear."""


def facts(name: str) -> Facts:
    """The row of ``name`` (a primitive name); an unknown primitive has kind ``"unknown"``."""
    return TABLE.get(name, _UNKNOWN)


def names(**where) -> frozenset:
    """The primitive names whose facts match every ``field=value`` given (e.g. ``kind="chooser"``)."""
    return frozenset(n for n, f in TABLE.items() if all(getattr(f, k) == v for k, v in where.items()))


# ---------------------------------------------------------------------------
# labels: how an operation is named in reports (``nonlinear_primitives``)
# ---------------------------------------------------------------------------

def custom_label(function_name: Optional[str]) -> str:
    """The label of a ``custom_jvp`` function: ``custom_jvp_call[relu]`` (or ``custom_jvp_call``)."""
    return "custom_jvp_call" if function_name is None else f"custom_jvp_call[{function_name}]"


def _custom_function_name(jaxpr) -> Optional[str]:
    """``custom_jvp_call`` names its function in the body's inner ``jit`` (``relu``, ``relu6``)."""
    for e in jaxpr.eqns:
        if "name" in e.params:
            return e.params["name"]
    return None


def region_label(jaxpr) -> str:
    """The label of an elementwise region (:func:`liftcam_jax.patterns.plan`): ``elementwise[tanh,mul]``.

    It lists, in order, the region's primitives that are not linear in the
    region's input (its first argument): its nonlinearities and its products
    of two values computed from the input.
    """
    dep, seen = {jaxpr.invars[0]}, []
    for e in jaxpr.eqns:
        n = sum(1 for v in e.invars if not isinstance(v, jcore.Literal) and v in dep)
        if not n:
            continue
        dep.update(e.outvars)
        f = facts(e.primitive.name)
        lab = label(e)
        if (f.kind != "linear" or (n > 1 and f.product)) and lab not in seen:
            seen.append(lab)
    return f"elementwise[{','.join(seen)}]"


def label(eqn) -> str:
    """The name of ``eqn``'s operation: its primitive, :func:`custom_label` of a ``custom_jvp``,
    or :func:`region_label` of an elementwise region (a ``closed_call`` the interpreter made)."""
    name = eqn.primitive.name
    if name == jcore.primitives.closed_call_p.name:
        sub = sub_jaxpr(eqn)
        return name if sub is None or not sub[0].invars else region_label(sub[0])
    if facts(name).kind != "custom_jvp":
        return name
    sub = sub_jaxpr(eqn)
    return custom_label(None if sub is None else _custom_function_name(sub[0]))


def is_piecewise_linear(op_label: str) -> bool:
    """Whether the operation labelled ``op_label`` (see :func:`label`) is piecewise linear."""
    if op_label.startswith("custom_jvp_call["):
        return op_label[len("custom_jvp_call["):-1] in PIECEWISE_LINEAR_CUSTOM
    return facts(op_label).piecewise_linear


# ---------------------------------------------------------------------------
# jaxpr parameters: the one place that knows their names in each JAX version
# ---------------------------------------------------------------------------

class JaxprLayoutError(LiftcamError, NotImplementedError):
    """A primitive's parameters are laid out in a way this library does not know (a newer JAX)."""


# Parameter -> the names it has had, newest first.
_ALIASES: dict = {}


def layout_error(eqn_or_name, what: str) -> JaxprLayoutError:
    """The one-line error for a parameter layout this library does not know."""
    name = eqn_or_name if isinstance(eqn_or_name, str) else eqn_or_name.primitive.name
    return JaxprLayoutError(
        f"cannot read {what} of primitive {name!r} under JAX {jax.__version__} "
        "(its jaxpr parameters changed); please report it with your JAX version"
    )


def param(eqn, key: str):
    """``eqn.params[key]``, under any of its known names; a :class:`JaxprLayoutError` if absent."""
    p = eqn.params
    for k in _ALIASES.get(key, (key,)):
        if k in p:
            return p[k]
    raise layout_error(eqn, f"parameter {key!r}")


def sub_jaxpr(eqn_or_params):
    """``(jaxpr, consts)`` of a call equation's body, or ``None`` if it carries none."""
    params = getattr(eqn_or_params, "params", eqn_or_params)
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        if key in params:
            j = params[key]
            if isinstance(j, jcore.ClosedJaxpr):
                return j.jaxpr, j.consts
            if isinstance(j, jcore.Jaxpr):
                return j, ()
    return None


def has_sub_jaxpr(params) -> bool:
    """Whether any parameter is a jaxpr (or a sequence holding one)."""
    jaxprs = (jcore.ClosedJaxpr, jcore.Jaxpr)
    return any(isinstance(p, jaxprs) or (isinstance(p, (tuple, list)) and any(isinstance(q, jaxprs) for q in p))
               for p in params.values())


class ScanLayout(NamedTuple):
    """A ``scan`` equation's operands ``(consts, carry, xs)`` and body."""

    length: int
    num_consts: int
    num_carry: int
    body: Any  # a ClosedJaxpr: (consts, carry, x_i) -> (carry, y_i)
    reverse: bool


def scan_layout(eqn) -> ScanLayout:
    """Read a ``scan`` equation's layout.

    JAX up to 0.10 gives the operand groups as ``num_consts`` / ``num_carry``
    and the body as a ``ClosedJaxpr``; JAX 0.12 gives them as the flat tree
    ``ft_in`` (``(consts, carry, xs)``, one leaf per operand) and the body as
    an open ``Jaxpr``.
    """
    p = eqn.params
    try:
        length, body, reverse = int(p["length"]), p["jaxpr"], bool(p["reverse"])
        if "num_consts" in p and "num_carry" in p:  # JAX <= 0.10
            num_consts, num_carry = int(p["num_consts"]), int(p["num_carry"])
        else:  # JAX 0.12: ft_in = (consts, carry, xs)
            groups = p["ft_in"].unpack()
            num_consts, num_carry = len(list(groups[0])), len(list(groups[1]))
    except (KeyError, AttributeError, TypeError, IndexError, ValueError) as e:
        raise layout_error(eqn, f"the operand layout ({type(e).__name__}: {e})") from None
    if isinstance(body, jcore.Jaxpr):
        body = jcore.ClosedJaxpr(body, ())
    if not isinstance(body, jcore.ClosedJaxpr) or num_consts + num_carry > len(eqn.invars) \
            or len(body.jaxpr.invars) != len(eqn.invars):
        raise layout_error(eqn, "the constants/carry/xs split")
    return ScanLayout(length, num_consts, num_carry, body, reverse)


def cond_branches(eqn):
    """A ``cond`` equation's branches (ClosedJaxprs); operand 0 is the index."""
    return param(eqn, "branches")


def call_name(eqn) -> Optional[str]:
    """The function name a ``jit`` equation carries (``softmax``...), or ``None``."""
    return eqn.params.get("name")
