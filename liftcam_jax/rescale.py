r"""DeepLIFT's rescale rule as a transformation of JAX functions.

DeepLIFT (Shrikumar, Greenside & Kundaje, "Learning Important Features Through
Propagating Activation Differences", ICML 2017, arXiv 1704.02685) explains the
difference of a function's output between an input ``x`` and a reference
``x_ref``. Its *rescale rule* replaces every elementwise nonlinearity ``g`` by
its secant slope between the two points,

.. math::  s = \frac{g(u) - g(u_{ref})}{u - u_{ref}}
           \quad (\text{or } g'(u) \text{ where } |u - u_{ref}| < \varepsilon),

and keeps the gradient of every linear or affine operation. Composing these
gives a *linear* map ``L`` with the summation-to-delta property

.. math::  L(x - x_{ref}) = f(x) - f(x_{ref}).

Its transpose ``L^T`` applied to a cotangent (a one-hot target) gives the
DeepLIFT multipliers ``m``; contributions are ``m * (x - x_ref)``.

This module builds ``L`` by interpreting the function's jaxpr, in the manner of
``jax.linearize``: every value that depends on the input carries a pair
``(actual, reference)``; a tangent program records, for each equation, a linear
map of the incoming differences:

* linear and affine primitives (``dot_general``, ``conv_general_dilated`` with
  constant kernels, ``add``, ``mul`` by a constant, reshapes, reductions by
  sum, ...): their own linearisation (``jax.linearize`` of the primitive);
* elementwise nonlinearities (``max``/``min`` with a constant, ``exp``,
  ``tanh``, ..., and ``custom_jvp`` functions such as ``jax.nn.relu``,
  ``relu6`` whose body is elementwise, treated as one function): the secant
  slope above;
* max-pooling (``reduce_window_max``, ``reduce_max``): Captum's DeepLift
  max-pool rule. With ``o = max(window)`` and ``o_r`` its reference value, the
  output difference is split into ``max(o, o_r) - o_r``, routed to the actual
  arg-max, and ``o - max(o, o_r)``, routed to the reference arg-max; a
  position whose own difference is below ``eps`` takes the plain gradient;
* calls (``jit``, ``closed_call``, ``remat``, ``custom_vjp_call``, non
  elementwise ``custom_jvp_call``): interpreted recursively.

Anything else that depends on the input (a product of two input-dependent
values, a data-dependent branch, an integer computed from the input) has no
rescale rule and raises :class:`NoRescaleRule` naming the primitive; this
module never falls back to gradients silently.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

__all__ = [
    "NoRescaleRule",
    "Linearized",
    "linearize",
    "multipliers",
    "nonlinear_primitives",
    "classify",
    "DeepLift",
    "deeplift",
    "DEFAULT_EPS",
]

DEFAULT_EPS = 1e-10
"""Below this difference a nonlinearity uses its derivative (Captum's DeepLift default)."""


class NoRescaleRule(NotImplementedError):
    """Raised when an input-dependent primitive has no DeepLIFT rule."""


class _Ctx(NamedTuple):
    eps: float
    nonlinear: list  # names of the non-affine primitives met, in order


class _Pair(NamedTuple):
    """An input-dependent value at the actual and at the reference input."""

    val: Any
    ref: Any  # an array, or a _Zeros while the reference value is known to be zero


class _Zeros(NamedTuple):
    """A reference value known to be all zeros, not materialised.

    The default reference of LIFT-CAM and DeepLIFT is zero. Through the head's
    first linear layers (``dot_general``, ``conv_general_dilated``, reshapes,
    max-pooling, ...) its value stays zero, so the reference pass skips them: on
    VGG16 that saves reading fc6's 25088 x 4096 weights a second time.
    """

    shape: tuple
    dtype: Any


def _ref(u: _Pair):
    """The reference value of ``u`` as an array (zeros materialised on demand)."""
    if isinstance(u.ref, _Zeros):
        # The barrier keeps XLA from constant-folding the reference pass when a
        # caller closes over the parameters (slow to compile, nothing gained).
        return jax.lax.optimization_barrier(jnp.zeros(u.ref.shape, u.ref.dtype))
    return u.ref


# ---------------------------------------------------------------------------
# primitive classes
# ---------------------------------------------------------------------------

# Linear in their input-dependent operands (other operands constant).
_LINEAR = {
    "add", "add_any", "sub", "neg", "reshape", "transpose", "broadcast_in_dim",
    "squeeze", "expand_dims", "reduce_sum", "reduce_window_sum", "slice",
    "concatenate", "pad", "convert_element_type", "copy", "copy_p", "rev",
    "cumsum", "reduce_precision", "real", "imag", "complex", "conj",
    "sharding_constraint", "split", "dynamic_update_slice", "squeeze_p",
    "optimization_barrier", "pvary", "mesh_cast", "psum",
}
# Linear only in some operands: name -> indices of operands that may depend on the input.
_LINEAR_IN = {
    "mul": None,  # exactly one of the two
    "dot_general": None,  # exactly one of the two
    "conv_general_dilated": None,  # exactly one of the two
    "div": (0,),
    "select_n": "cases",  # predicate (operand 0) must be constant
    "dynamic_slice": (0,),
    "gather": (0,),
    "scatter-add": (0, 2),
    "scatter_add": (0, 2),
}
# Linear with f(0) = 0 in their input-dependent operands whatever the constant
# operands are: a zero reference stays zero through them.
_HOMOGENEOUS = {
    "mul", "div", "dot_general", "conv_general_dilated", "neg", "reshape", "transpose",
    "broadcast_in_dim", "squeeze", "expand_dims", "reduce_sum", "reduce_window_sum",
    "slice", "convert_element_type", "copy", "copy_p", "rev", "cumsum",
    "reduce_precision", "real", "imag", "conj", "sharding_constraint", "split",
    "squeeze_p", "optimization_barrier", "pvary", "mesh_cast", "psum",
    "dynamic_slice", "gather",
}
# Zero at zero only when every operand is input-dependent (sums, selections).
_HOMOGENEOUS_IF_ALL = {"add", "add_any", "sub", "concatenate", "select_n"}
# Elementwise nonlinearities of one input-dependent operand.
_ELEMENTWISE = {
    "max", "min", "exp", "exp2", "log", "log1p", "expm1", "tanh", "logistic",
    "sin", "cos", "tan", "asin", "acos", "atan", "sinh", "cosh", "asinh",
    "acosh", "atanh", "sqrt", "rsqrt", "cbrt", "abs", "sign", "floor", "ceil",
    "round", "integer_pow", "pow", "square", "clamp", "erf", "erfc", "erf_inv",
    "lgamma", "digamma", "atan2", "rem", "nextafter", "is_finite", "logaddexp",
}
# Windowed or reduced maxima/minima: Captum's max-pool rule.
_CHOOSERS = {"reduce_window_max": jnp.maximum, "reduce_max": jnp.maximum,
             "reduce_window_min": jnp.minimum, "reduce_min": jnp.minimum}
# Calls whose body is interpreted recursively.
_CALLS = {"jit", "pjit", "closed_call", "core_call", "remat", "remat2",
          "checkpoint", "custom_vjp_call", "custom_vjp_call_jaxpr", "custom_lin"}
# Allowed inside a custom_jvp body for it to count as one elementwise function.
_ELEMENTWISE_BODY = _ELEMENTWISE | {
    "add", "sub", "mul", "div", "neg", "convert_element_type", "select_n",
    "gt", "ge", "lt", "le", "eq", "ne", "and", "or", "not", "stop_gradient",
    "copy", "copy_p", "pjit", "jit",
}


# ---------------------------------------------------------------------------
# evaluation helpers
# ---------------------------------------------------------------------------

def _bind(eqn, args):
    params = eqn.primitive.get_bind_params(eqn.params)
    if isinstance(params, tuple):  # older JAX: (subfuns, params)
        subfuns, params = params
        args = [*subfuns, *args]
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*args, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def _eqn_fn(eqn, ins, dep_idx):
    """The equation as a function of its input-dependent operands only."""

    def f(*deps):
        args = list(ins)
        for i, d in zip(dep_idx, deps):
            args[i] = d
        return _bind(eqn, args)

    return f


def _where_small(du, eps):
    return jnp.abs(du) < eps


def _is_float(x):
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def _sub_jaxpr(params):
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        if key in params:
            j = params[key]
            if isinstance(j, jcore.ClosedJaxpr):
                return j.jaxpr, j.consts
            if isinstance(j, jcore.Jaxpr):
                return j, ()
    return None


def _body_is_elementwise(jaxpr) -> bool:
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name in ("pjit", "jit"):
            sub = _sub_jaxpr(eqn.params)
            if sub is None or not _body_is_elementwise(sub[0]):
                return False
        elif name == "broadcast_in_dim":
            if any(getattr(v.aval, "shape", ()) != () for v in eqn.invars if not isinstance(v, jcore.Literal)):
                return False
        elif name not in _ELEMENTWISE_BODY:
            return False
    return True


# ---------------------------------------------------------------------------
# rules: each returns (outputs, tangent_fn) where tangent_fn maps the tangents of
# the input-dependent operands (in operand order) to the outputs' tangents.
# ---------------------------------------------------------------------------

def _zeros_like_out(eqn):
    return [_Zeros(tuple(v.aval.shape), v.aval.dtype) for v in eqn.outvars]


def _stays_zero(eqn, ins, dep_idx) -> bool:
    """Whether the outputs are zero when every input-dependent operand's reference is."""
    if not all(isinstance(ins[i].ref, _Zeros) for i in dep_idx):
        return False
    name = eqn.primitive.name
    if name == "select_n":  # the predicate (operand 0) is constant
        return len(dep_idx) == len(ins) - 1
    if name == "pad":  # zero padding of zeros
        return dep_idx == [0] and _is_known_zero(ins[1])
    if name in _HOMOGENEOUS_IF_ALL:
        return len(dep_idx) == len(ins)
    return name in _HOMOGENEOUS


def _is_known_zero(x) -> bool:
    """``x`` is a concrete (not traced) value equal to zero."""
    if isinstance(x, jax.core.Tracer):
        return False
    try:
        return bool(np.all(np.asarray(x) == 0))
    except Exception:  # noqa: BLE001 - anything not convertible is not a known zero
        return False


def _linear_rule(eqn, ins, dep_idx, ctx):
    f = _eqn_fn(eqn, ins, dep_idx)
    vals, lin = jax.linearize(f, *[ins[i].val for i in dep_idx])
    if _stays_zero(eqn, ins, dep_idx):
        refs = _zeros_like_out(eqn)
    else:
        refs = f(*[_ref(ins[i]) for i in dep_idx])
    return [_Pair(v, r) for v, r in zip(vals, refs)], lambda *t: list(lin(*t))


def _secant(g, u: _Pair, eps):
    """Secant slope of an elementwise ``g`` between ``u.val`` and ``u.ref``."""
    val, deriv = jax.jvp(g, (u.val,), (jnp.ones_like(u.val),))
    u_ref = _ref(u)
    ref = g(u_ref)
    du = u.val - u_ref
    small = _where_small(du, eps)
    slope = jnp.where(small, deriv, (val - ref) / jnp.where(small, 1.0, du))
    return val, ref, jax.lax.stop_gradient(slope)


def _elementwise_rule(eqn, ins, dep_idx, ctx):
    (i,) = dep_idx
    out_shape = eqn.outvars[0].aval.shape
    u = ins[i]
    if jnp.shape(u.val) != tuple(out_shape):  # a scalar operand against a constant array
        u = _Pair(jnp.broadcast_to(u.val, out_shape), jnp.broadcast_to(_ref(u), out_shape))
        expand = lambda t: jnp.broadcast_to(t, out_shape)
    else:
        expand = lambda t: t
    base = _eqn_fn(eqn, ins, dep_idx)
    val, ref, slope = _secant(lambda x: base(x)[0], u, ctx.eps)
    ctx.nonlinear.append(eqn.primitive.name)
    return [_Pair(val, ref)], lambda t: [slope * expand(t)]


def _chooser_rule(eqn, ins, dep_idx, ctx):
    cross = _CHOOSERS[eqn.primitive.name]
    x = ins[0]
    f = lambda v: _bind(eqn, [v])[0]
    val, sel_a = jax.linearize(f, x.val)
    x_ref = _ref(x)
    ref, sel_r = jax.linearize(f, x_ref)
    # The maximum of zeros stays symbolically zero for the layers after this one.
    out_ref = _zeros_like_out(eqn)[0] if isinstance(x.ref, _Zeros) and _windows_hold_data(eqn) else ref
    dx = x.val - x_ref
    small = _where_small(dx, ctx.eps)
    ctx.nonlinear.append(eqn.primitive.name)
    inv = jnp.where(small, 0.0, 1.0 / jnp.where(small, 1.0, dx))
    fallback = small.astype(dx.dtype)
    c = cross(val, ref)
    to_actual = jax.lax.stop_gradient(c - ref)
    to_reference = jax.lax.stop_gradient(val - c)
    inv, fallback = jax.lax.stop_gradient(inv), jax.lax.stop_gradient(fallback)

    def tangent(t):
        scaled = inv * t
        return [to_actual * sel_a(scaled) + to_reference * sel_r(scaled) + sel_a(fallback * t)]

    return [_Pair(val, out_ref)], tangent


def _windows_hold_data(eqn) -> bool:
    """Every pooling window covers at least one real (not padded) element."""
    if eqn.primitive.name in ("reduce_max", "reduce_min"):
        return True
    p = eqn.params
    if any(d != 1 for d in (*p.get("base_dilation", ()), *p.get("window_dilation", ()))):
        return False
    return all(lo < k and hi < k for (lo, hi), k in zip(p["padding"], p["window_dimensions"]))


def _call_rule(eqn, ins, dep_idx, ctx):
    sub = _sub_jaxpr(eqn.params)
    if sub is None:
        raise NoRescaleRule(f"cannot look inside call primitive {eqn.primitive.name!r}")
    jaxpr, consts = sub
    nconsts = len(ins) - len(jaxpr.invars)
    args = ins[nconsts:] if nconsts > 0 else ins
    outs, program = _interpret(jaxpr, consts, args, ctx)
    shift = max(nconsts, 0)
    sub_dep = [i - shift for i in dep_idx]
    if any(i < 0 for i in sub_dep):
        raise NoRescaleRule(f"input-dependent constants of {eqn.primitive.name!r}")

    def tangent(*t):
        return program(dict(zip(sub_dep, t)))

    return outs, tangent


def _custom_name(eqn, jaxpr) -> str:
    """``custom_jvp_call`` names its function in the inner ``jit`` (``relu``, ``relu6``)."""
    for e in jaxpr.eqns:
        if "name" in e.params:
            return f"custom_jvp_call[{e.params['name']}]"
    return "custom_jvp_call"


def _custom_jvp_rule(eqn, ins, dep_idx, ctx):
    jaxpr, consts = _sub_jaxpr(eqn.params)
    out_avals = [v.aval for v in eqn.outvars]
    if (
        len(dep_idx) == 1
        and len(out_avals) == 1
        and tuple(out_avals[0].shape) == tuple(jnp.shape(ins[dep_idx[0]].val))
        and _body_is_elementwise(jaxpr)
    ):
        # One elementwise function (relu, relu6, softplus...): its own secant
        # slope, and its own derivative (the custom rule) as the fallback.
        base = _eqn_fn(eqn, ins, dep_idx)
        val, ref, slope = _secant(lambda x: base(x)[0], ins[dep_idx[0]], ctx.eps)
        ctx.nonlinear.append(_custom_name(eqn, jaxpr))
        return [_Pair(val, ref)], lambda t: [slope * t]
    return _call_rule(eqn, ins, dep_idx, ctx)


def classify(eqn, ins, dep_idx, *, error=NoRescaleRule, rule: str = "DeepLIFT") -> str:
    """The kind of rule an equation with input-dependent operands ``dep_idx`` needs.

    One of ``"custom_jvp"``, ``"call"``, ``"linear"`` (affine in its
    input-dependent operands), ``"elementwise"`` (a nonlinearity of one value)
    or ``"chooser"`` (max/min pooling). Shared by every jaxpr interpreter of
    the library (DeepLIFT here, LRP in :mod:`liftcam_jax.lrp`); anything else
    raises ``error`` naming the primitive.
    """
    name = eqn.primitive.name
    if name == "custom_jvp_call":
        return "custom_jvp"
    if name in _CALLS or (_sub_jaxpr(eqn.params) is not None and name not in _LINEAR_IN):
        return "call"
    if name in _LINEAR:
        return "linear"
    if name in _LINEAR_IN:
        allowed = _LINEAR_IN[name]
        if allowed is None:
            if len(dep_idx) == 1:
                return "linear"
            raise error(
                f"no {rule} rule for {name!r} of two input-dependent values "
                "(a product of activations is not linear in the input)"
            )
        if allowed == "cases":
            allowed = tuple(range(1, len(ins)))
        if set(dep_idx) <= set(allowed):
            return "linear"
        raise error(
            f"no {rule} rule for {name!r} with an input-dependent operand in position "
            f"{sorted(set(dep_idx) - set(allowed))} (e.g. a data-dependent branch or index)"
        )
    if name in _ELEMENTWISE:
        if len(dep_idx) == 1:
            return "elementwise"
        raise error(
            f"no {rule} rule for {name!r} of {len(dep_idx)} input-dependent values "
            "(the rule is defined for elementwise functions of one value)"
        )
    if name in _CHOOSERS:
        if dep_idx == [0] and len(ins) == 1:
            return "chooser"
        raise error(f"no {rule} rule for {name!r} with these operands")
    raise error(f"no {rule} rule for primitive {name!r} applied to an input-dependent value")


def _rule_for(eqn, ins, dep_idx):
    return {
        "custom_jvp": _custom_jvp_rule,
        "call": _call_rule,
        "linear": _linear_rule,
        "elementwise": _elementwise_rule,
        "chooser": _chooser_rule,
    }[classify(eqn, ins, dep_idx)]


# ---------------------------------------------------------------------------
# the interpreter
# ---------------------------------------------------------------------------

def _interpret(jaxpr, consts, args, ctx):
    """Evaluate ``jaxpr`` on constants and ``_Pair``s.

    Returns the outputs (``_Pair`` where input-dependent) and the tangent
    program: a function from ``{input position: tangent}`` to the list of
    output tangents (``None`` for outputs that do not depend on the input).
    """
    env = {}

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    for v, c in zip(jaxpr.constvars, consts):
        env[v] = c
    for v, a in zip(jaxpr.invars, args):
        env[v] = a

    steps = []
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        dep_idx = [i for i, a in enumerate(ins) if isinstance(a, _Pair)]
        if not dep_idx:
            outs = _bind(eqn, ins)
        else:
            for i in dep_idx:
                if not _is_float(ins[i].val):
                    raise NoRescaleRule(
                        f"primitive {eqn.primitive.name!r} receives an input-dependent "
                        f"{jnp.result_type(ins[i].val)} value; DeepLIFT needs real-valued paths"
                    )
            rule = _rule_for(eqn, ins, dep_idx)
            outs, tangent = rule(eqn, ins, dep_idx, ctx)
            for o, v in zip(outs, eqn.outvars):
                if isinstance(o, _Pair) and not _is_float(o.val) and not isinstance(v, jcore.DropVar):
                    raise NoRescaleRule(
                        f"primitive {eqn.primitive.name!r} computes a {jnp.result_type(o.val)} "
                        "value from the input (a data-dependent branch or index has no rescale rule)"
                    )
            steps.append(([eqn.invars[i] for i in dep_idx], eqn.outvars, tangent))
        for v, o in zip(eqn.outvars, outs):
            if not isinstance(v, jcore.DropVar):
                env[v] = o

    outs = [read(v) for v in jaxpr.outvars]
    invars = list(jaxpr.invars)

    def program(in_tangents: dict):
        tenv = {}
        for pos, t in in_tangents.items():
            tenv[invars[pos]] = t
        for in_vars, out_vars, tangent in steps:
            touts = tangent(*[tenv[v] for v in in_vars])
            for v, t in zip(out_vars, touts):
                if not isinstance(v, jcore.DropVar):
                    tenv[v] = t
        return [
            None if isinstance(v, jcore.Literal) else tenv.get(v)
            for v in jaxpr.outvars
        ]

    return outs, program


# ---------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------

class Linearized(NamedTuple):
    """``fun`` at the input and the reference, and the rescale-rule linear map.

    ``linear(dx)`` is linear in ``dx`` (a pytree like the input) and satisfies
    ``linear(x - x_ref) == out - out_ref`` (summation-to-delta).
    ``transpose(ct)`` is its transpose: the DeepLIFT multipliers of the scalar
    ``<ct, out>`` (a pytree like the input).
    """

    out: Any
    out_ref: Any
    linear: Callable[[Any], Any]
    transpose: Callable[[Any], Any]
    nonlinear: tuple = ()


def linearize(fun: Callable, x, x_ref=None, *, eps: float = DEFAULT_EPS) -> Linearized:
    """Build DeepLIFT's rescale-rule linear map of ``fun`` between ``x_ref`` and ``x``.

    Args:
      fun: a JAX function of one pytree argument (close over anything else, e.g.
        ``lambda a: head(params, a)``; closed-over values stay arguments of any
        enclosing ``jit``).
      x: the input (pytree of float arrays).
      x_ref: the reference, same structure and shapes as ``x``; ``None`` (the
        default) is the all-zero reference, kept symbolic through the layers
        that map zero to zero so that the reference pass skips them.
      eps: differences below this use the derivative instead of the secant.

    Returns:
      A :class:`Linearized` with the outputs at both points, the linear map and
      its transpose (built with ``jax.linear_transpose``), and the names of the
    nonlinear operations met (``()`` for an affine ``fun``).
    """
    flat_x, tree = jax.tree_util.tree_flatten(x)
    if x_ref is None:
        flat_r = [_Zeros(jnp.shape(a), jnp.result_type(a)) for a in flat_x]
    else:
        flat_r, tree_r = jax.tree_util.tree_flatten(x_ref)
        if tree != tree_r:
            raise ValueError(f"input and reference differ in structure: {tree} vs {tree_r}")
        for a, b in zip(flat_x, flat_r):
            if jnp.shape(a) != jnp.shape(b):
                raise ValueError(f"input and reference differ in shape: {jnp.shape(a)} vs {jnp.shape(b)}")
        flat_r = [jnp.asarray(r, jnp.result_type(a)) for a, r in zip(flat_x, flat_r)]
        # A constant reference would let XLA constant-fold the whole reference
        # pass at compile time: slow to compile, nothing gained.
        flat_r = list(jax.lax.optimization_barrier(tuple(flat_r)))

    out_tree = []

    def flat_fun(*xs):
        out = fun(jax.tree_util.tree_unflatten(tree, xs))
        leaves, otree = jax.tree_util.tree_flatten(out)
        out_tree.append(otree)
        return leaves

    closed = jax.make_jaxpr(flat_fun)(*flat_x)
    otree = out_tree[-1]
    ctx = _Ctx(eps, [])
    outs, program = _interpret(
        closed.jaxpr, closed.consts, [_Pair(a, r) for a, r in zip(flat_x, flat_r)], ctx
    )
    vals = [o.val if isinstance(o, _Pair) else o for o in outs]
    refs = [_ref(o) if isinstance(o, _Pair) else o for o in outs]

    def linear(dx):
        leaves = jax.tree_util.tree_leaves(dx)
        touts = program(dict(enumerate(leaves)))
        touts = [jnp.zeros_like(v) if t is None else t for t, v in zip(touts, vals)]
        return jax.tree_util.tree_unflatten(otree, touts)

    transpose_flat = jax.linear_transpose(linear, x)

    def transpose(ct):
        (m,) = transpose_flat(ct)
        return m

    return Linearized(
        jax.tree_util.tree_unflatten(otree, vals),
        jax.tree_util.tree_unflatten(otree, refs),
        linear,
        transpose,
        tuple(ctx.nonlinear),
    )


def nonlinear_primitives(fun: Callable, x) -> tuple:
    """Names of the non-affine operations ``fun`` applies to ``x`` (in order).

    Empty exactly when ``fun`` is affine in ``x`` (e.g. a ``GAP -> Linear``
    head), which is what CAM requires. Raises :class:`NoRescaleRule` for an
    operation that has no DeepLIFT rule at all.
    """
    x = jax.tree_util.tree_map(jnp.asarray, x)
    return linearize(fun, x, x).nonlinear


def multipliers(fun: Callable, x, x_ref, cotangent, *, eps: float = DEFAULT_EPS):
    """DeepLIFT multipliers of ``<cotangent, fun(x)>`` with respect to ``x``."""
    return linearize(fun, x, x_ref, eps=eps).transpose(cotangent)


class DeepLift(NamedTuple):
    """DeepLIFT attributions of one target per example.

    ``attributions = multipliers * (x - x_ref)``; ``delta`` is the convergence
    delta ``sum(attributions) - (out[target] - out_ref[target])`` per example,
    zero up to rounding by summation-to-delta.
    """

    attributions: Any
    multipliers: Any
    out: Any
    out_ref: Any
    delta: Any


def deeplift(fun: Callable, x, x_ref=None, targets=None, *, eps: float = DEFAULT_EPS) -> DeepLift:
    """DeepLIFT (rescale rule) attributions of a batched classifier-like function.

    Args:
      fun: maps ``x`` of shape ``(B, ...)`` to outputs ``(B, C)`` (or ``(B,)``),
        examples independent of each other.
      x: the batch of inputs.
      x_ref: the reference batch (default zeros), broadcastable to ``x``.
      targets: ``(B,)`` output index per example, or one int; ``None`` takes the
        arg-max of ``fun(x)``. Ignored for ``(B,)`` outputs.

    Returns:
      :class:`DeepLift` with attributions and multipliers shaped like ``x``.
    """
    x = jnp.asarray(x)
    if x_ref is not None:
        x_ref = jnp.broadcast_to(jnp.asarray(x_ref, x.dtype), x.shape)
    lin = linearize(fun, x, x_ref, eps=eps)
    out, out_ref = lin.out, lin.out_ref
    if out.ndim == 1:
        ct = jnp.ones_like(out)
        gap = out - out_ref
    else:
        if targets is None:
            targets = jnp.argmax(out, axis=-1)
        targets = jnp.broadcast_to(jnp.asarray(targets, jnp.int32), out.shape[:1])
        ct = jax.nn.one_hot(targets, out.shape[-1], dtype=out.dtype)
        gap = jnp.sum(ct * (out - out_ref), axis=-1)
    m = lin.transpose(ct)
    attr = m * (x if x_ref is None else x - x_ref)
    delta = jnp.sum(attr.reshape(attr.shape[0], -1), axis=-1) - gap
    return DeepLift(attr, m, out, out_ref, delta)
