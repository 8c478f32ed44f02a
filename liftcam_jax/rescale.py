r"""DeepLIFT's rescale rule as a transformation of JAX functions.

DeepLIFT (Shrikumar, Greenside & Kundaje, "Learning Important Features Through
Propagating Activation Differences", ICML 2017, arXiv 1704.02685) explains the
difference of a function's output between an input ``x`` and a reference
``x_ref``. Its *rescale rule* replaces every elementwise nonlinearity ``g`` by
its secant slope between the two points,

.. math::  s = \frac{g(u) - g(u_{ref})}{u - u_{ref}}
           \quad (\text{or } g'(\tfrac{u + u_{ref}}{2}) \text{ where } |u - u_{ref}| < \varepsilon),

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
* products and quotients of two input-dependent values (``mul``,
  ``dot_general`` of queries and keys, ``div`` of softmax's normalisation):
  the exact two-player Shapley split (:mod:`liftcam_jax.rescale_rules`, with
  the max-shift of softmax and logsumexp shared by the input and the
  reference); an elementwise function of one value however it is written
  (``jax.nn.gelu``, ``silu``): one secant as a whole
  (:func:`liftcam_jax.patterns.plan`). LayerNorm and RMSNorm follow;
* max-pooling (``reduce_window_max``, ``reduce_max``): Captum's DeepLift
  max-pool rule. With ``o = max(window)`` and ``o_r`` its reference value, the
  output difference is split into ``max(o, o_r) - o_r``, routed to the actual
  arg-max, and ``o - max(o, o_r)``, routed to the reference arg-max; a
  position whose own difference is below ``eps`` takes the plain gradient;
* calls (``jit``, ``closed_call``, ``remat``, ``custom_vjp_call``, non
  elementwise ``custom_jvp_call``): interpreted recursively;
* generic ``reduce_window``/``reduce`` with a max/min/add reducer, ``scan``
  and ``cond`` with an input-independent index: rewritten into the above
  (:mod:`liftcam_jax.interpreter`, shared with LRP).

The rules are a table keyed by primitive over the interpreter of
:mod:`liftcam_jax.interpreter`; :func:`register_rule` adds a user's rule.
Anything else that depends on the input (a data-dependent branch, an integer
computed from the input, a ``while`` loop, a ``stop_gradient`` other than a
max-shift) has no rescale rule and raises :class:`NoRescaleRule` (a
:class:`~liftcam_jax.errors.LiftcamError`) naming the primitive, and so does
a softmax at the head's output unless the caller asks for it (explain the
logits); this module never falls back to gradients silently.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

from . import equations, interpreter, patterns, primitives, rescale_rules
from .errors import LiftcamError
from .equations import classify
from .rescale_rules import Pair as _Pair
from .rescale_rules import Zeros as _Zeros
from .rescale_rules import ref as _ref
from .rescale_rules import secant as _secant
from .rescale_rules import where_small as _where_small

__all__ = [
    "NoRescaleRule",
    "Linearized",
    "linearize",
    "multipliers",
    "nonlinear_primitives",
    "register_rule",
    "classify",
    "DeepLift",
    "deeplift",
    "DEFAULT_EPS",
]

DEFAULT_EPS = 1e-10
"""Below this difference a nonlinearity uses its derivative at the midpoint (Captum's DeepLift default)."""

class NoRescaleRule(LiftcamError, NotImplementedError):
    """Raised when an input-dependent primitive has no DeepLIFT rule."""


class _Ctx(NamedTuple):
    eps: float
    nonlinear: list  # names of the non-affine primitives met, in order
    table: Any = None  # the rule table (set by linearize)


# Windowed or reduced maxima/minima (kind "chooser" in liftcam_jax.primitives):
# how two candidate outputs combine.
_CROSS = {"max": jnp.maximum, "min": jnp.minimum}


# ---------------------------------------------------------------------------
# rules: each returns (outputs, tangent_fn) where tangent_fn maps the tangents of
# the input-dependent operands (in operand order) to the outputs' tangents.
# ---------------------------------------------------------------------------

def _zeros_like_out(eqn):
    return [_Zeros(tuple(v.aval.shape), v.aval.dtype) for v in eqn.outvars]


def _stays_zero(eqn, ins, dep_idx) -> bool:
    """Whether the outputs are zero when every input-dependent operand's reference is.

    Read from the primitive's ``zero`` fact (:mod:`liftcam_jax.primitives`).
    """
    if not all(isinstance(ins[i].ref, _Zeros) for i in dep_idx):
        return False
    zero = primitives.facts(eqn.primitive.name).zero
    if zero == "always":
        return True
    if zero not in ("if_constants_zero", "if_cases"):
        return False
    free = {0} if zero == "if_cases" else set()  # select_n's predicate may be anything
    return all(equations.is_known(ins[j], 0) for j in range(len(ins)) if j not in dep_idx and j not in free)


def _linear_rule(eqn, ins, dep_idx, ctx):
    f = equations.eqn_fn(eqn, ins, dep_idx)
    vals, lin = jax.linearize(f, *[ins[i].val for i in dep_idx])
    if _stays_zero(eqn, ins, dep_idx):
        refs = _zeros_like_out(eqn)
    else:
        refs = f(*[_ref(ins[i]) for i in dep_idx])
    return [_Pair(v, r) for v, r in zip(vals, refs)], lambda *t: list(lin(*t))


def _elementwise_rule(eqn, ins, dep_idx, ctx):
    """The secant rule of an elementwise function of one value (each output its own secant:
    an elementwise region, :func:`liftcam_jax.patterns.plan`, may return several)."""
    (i,) = dep_idx
    out_shape = eqn.outvars[0].aval.shape
    u = ins[i]
    if jnp.shape(u.val) != tuple(out_shape):  # a scalar operand against a constant array
        u = _Pair(jnp.broadcast_to(u.val, out_shape), jnp.broadcast_to(_ref(u), out_shape))
        expand = lambda t: jnp.broadcast_to(t, out_shape)
    else:
        expand = lambda t: t
    base = equations.eqn_fn(eqn, ins, dep_idx)
    secants = [_secant(lambda x, k=k: base(x)[k], u, ctx.eps) for k in range(len(eqn.outvars))]
    ctx.nonlinear.append(primitives.label(eqn))
    return [_Pair(val, ref) for val, ref, _ in secants], lambda t: [s * expand(t) for _, _, s in secants]


def _chooser_rule(eqn, ins, dep_idx, ctx):
    cross = _CROSS[primitives.facts(eqn.primitive.name).chooses]
    x = ins[0]
    f = lambda v: equations.bind(eqn, [v])[0]
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
    # Differentiable factors (no stop_gradient): jax.grad of an explanation is
    # its derivative away from ties; the guarded division has no NaN branch.
    to_actual = c - ref
    to_reference = val - c

    def tangent(t):
        scaled = inv * t
        return [to_actual * sel_a(scaled) + to_reference * sel_r(scaled) + sel_a(fallback * t)]

    return [_Pair(val, out_ref)], tangent


def _windows_hold_data(eqn) -> bool:
    """Every pooling window covers at least one real (not padded) element."""
    if primitives.facts(eqn.primitive.name).reduces == "axes":
        return True
    p = {k: primitives.param(eqn, k) for k in ("base_dilation", "window_dilation", "padding", "window_dimensions")}
    if any(d != 1 for d in (*p["base_dilation"], *p["window_dilation"])):
        return False
    return all(lo < k and hi < k for (lo, hi), k in zip(p["padding"], p["window_dimensions"]))


# ---------------------------------------------------------------------------
# the rule table and the interpreter
# ---------------------------------------------------------------------------

def _user_rule(rule, name):
    """Adapt a public rule ``rule(xs, x_refs, **params)`` to the interpreter."""

    def wrapped(eqn, ins, dep_idx, ctx):
        dep = set(dep_idx)
        xs = [ins[i].val if i in dep else ins[i] for i in range(len(ins))]
        refs = [_ref(ins[i]) if i in dep else ins[i] for i in range(len(ins))]
        res = rule(xs, refs, **eqn.params)
        if res is None:  # the rule declines: the built-in rule (or its error) applies
            return _TABLE.builtin_rule(eqn, ins, dep_idx)(eqn, ins, dep_idx, ctx)
        outs, out_refs, linear = res
        if not eqn.primitive.multiple_results:
            outs, out_refs = [outs], [out_refs]
        ctx.nonlinear.append(name)

        def tangent(*t):
            full = [jnp.zeros_like(x) for x in xs]
            for i, ti in zip(dep_idx, t):
                full[i] = ti
            out = linear(*full)
            return [out] if not eqn.primitive.multiple_results else list(out)

        return [_Pair(o, r) for o, r in zip(outs, out_refs)], tangent

    return wrapped


def register_rule(primitive, rule: Optional[Callable]):
    r"""Register a DeepLIFT rule for ``primitive`` (a ``jax.extend.core.Primitive`` or its name).

    ``rule(xs, x_refs, **params) -> (y, y_ref, linear)`` or ``None``:

    * ``xs`` / ``x_refs``: the equation's operands at the actual and at the
      reference input (an input-independent operand is the same in both);
      ``params``: the equation's parameters.
    * ``y`` / ``y_ref``: the output at both points (lists for primitives with
      several outputs).
    * ``linear(*dxs)``: a *linear* map from one difference per operand (zeros
      for input-independent operands) to the output difference. DeepLIFT's
      summation-to-delta needs ``linear(*(x - x_ref)) == y - y_ref``.
    * returning ``None`` declines: the built-in rule applies (or its error).

    A registered rule takes precedence over the built-in one; ``rule=None``
    removes it. Returns the rule registered before (or ``None``).

    Example, the built-in rule of a product of two activations (a
    squeeze-excitation gate ``x * sigmoid(s(x))``, :mod:`liftcam_jax.rescale_rules`)
    splits its difference exactly into :math:`\Delta(ab) = \bar b\,\Delta a + \bar a\,\Delta b`
    with the averages :math:`\bar a = (a + a_{ref})/2` (the Shapley split of a
    product of two players); written as a user's rule it reads (register a
    different split the same way, e.g. all of the difference to the signal,
    ``lambda da, db: b * da + ar * db``)::

        def product_rule(xs, refs, **params):
            (a, b), (ar, br) = xs, refs
            if a is ar or b is br:
                return None                        # one constant factor: built-in rule
            return a * b, ar * br, lambda da, db: (b + br) / 2 * da + (a + ar) / 2 * db

        lj.rescale.register_rule(jax.lax.mul_p, product_rule)
    """
    return _TABLE.register(primitive, None if rule is None else _user_rule(rule, equations.primitive_name(primitive)))


def _call(jaxpr, consts, ins, dep_idx, ctx):
    """Interpret a body on ``ins`` (its last ``len(jaxpr.invars)`` operands)."""
    args, sub_dep = equations.body_args(jaxpr, ins, dep_idx, NoRescaleRule)
    outs, program = _interpret(jaxpr, consts, args, ctx)

    def tangent(*t):
        return program(dict(zip(sub_dep, t)))

    return outs, tangent


_TABLE = interpreter.RuleTable(
    "DeepLIFT",
    NoRescaleRule,
    {
        "linear": _linear_rule,
        "elementwise": _elementwise_rule,
        "chooser": _chooser_rule,
        "product": rescale_rules.product_rule,
        "normaliser": rescale_rules.normaliser_rule,
    },
    _call,
    primal=lambda v: v.val if isinstance(v, _Pair) else v,
    depends=lambda v: isinstance(v, _Pair),
    shift=rescale_rules.shift,
)


def _interpret(jaxpr, consts, args, ctx):
    """Evaluate ``jaxpr`` on constants and ``_Pair``s.

    Returns the outputs (``_Pair`` where input-dependent) and the tangent
    program: a function from ``{input position: tangent}`` to the list of
    output tangents (``None`` for outputs that do not depend on the input).
    """
    dep_pos = {i for i, a in enumerate(args) if isinstance(a, _Pair)}
    trace = interpreter.forward(jaxpr, consts, args, dep_pos, ctx)
    invars = list(jaxpr.invars)

    def program(in_tangents: dict):
        tenv = {}
        for pos, t in in_tangents.items():
            tenv[invars[pos]] = t
        for in_vars, out_vars, tangent in trace.steps:
            touts = tangent(*[tenv[v] for v in in_vars])
            for v, t in zip(out_vars, touts):
                if not isinstance(v, jcore.DropVar):
                    tenv[v] = t
        return [None if isinstance(v, jcore.Literal) else tenv.get(v) for v in jaxpr.outvars]

    return trace.outs, program


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


def linearize(fun: Callable, x, x_ref=None, *, eps: float = DEFAULT_EPS,
              allow_softmax_output: bool = False) -> Linearized:
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
      allow_softmax_output: explain a softmax or log-softmax that is the head's
        output (:func:`liftcam_jax.patterns.softmax_at_output`). ``False``
        (the default, for class logits) refuses it with the advice to explain
        the logits; a caller explaining a target function the user wrote of
        the output (a probability asked for by name) passes ``True``.

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
    if not allow_softmax_output:
        patterns.check_output(closed.jaxpr, NoRescaleRule, "DeepLIFT")
    otree = out_tree[-1]
    ctx = _Ctx(eps, [], _TABLE)
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


def deeplift(fun: Callable, x, x_ref=None, targets=None, *, eps: float = DEFAULT_EPS,
             allow_softmax_output: bool = False) -> DeepLift:
    """DeepLIFT (rescale rule) attributions of a batched classifier-like function.

    Args:
      fun: maps ``x`` of shape ``(B, ...)`` to outputs ``(B, C)`` (or ``(B,)``),
        examples independent of each other.
      x: the batch of inputs.
      x_ref: the reference batch (default zeros), broadcastable to ``x``.
      targets: ``(B,)`` output index per example, or one int; ``None`` takes the
        arg-max of ``fun(x)``. Ignored for ``(B,)`` outputs.
      allow_softmax_output: see :func:`linearize`.

    Returns:
      :class:`DeepLift` with attributions and multipliers shaped like ``x``.
    """
    x = jnp.asarray(x)
    if x_ref is not None:
        x_ref = jnp.broadcast_to(jnp.asarray(x_ref, x.dtype), x.shape)
    lin = linearize(fun, x, x_ref, eps=eps, allow_softmax_output=allow_softmax_output)
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
