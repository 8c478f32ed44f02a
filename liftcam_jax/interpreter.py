r"""One jaxpr interpreter for the library's attribution rules (DeepLIFT and LRP).

A rule transformation (:mod:`liftcam_jax.rescale`, :mod:`liftcam_jax.lrp`)
is a :class:`RuleTable`: rules keyed by primitive, the way
``jax/_src/interpreters/ad.py`` keys transposes (``primitive_transposes[p] =
rule``). :func:`forward` walks a jaxpr once, in order:

* an equation none of whose operands depends on the input is evaluated as is;
* otherwise its primitive's rule runs: ``rule(eqn, ins, dep_idx, ctx) ->
  (outs, step)``, where ``ins`` are the operands (the table's own values for
  input-dependent ones, e.g. DeepLIFT's (actual, reference) pairs),
  ``dep_idx`` the positions of the input-dependent operands, and ``step`` what
  the transformation replays afterwards (DeepLIFT: a linear map of the
  operands' differences, run forwards; LRP: a relevance redistribution, run
  backwards).

The rule of a primitive is found in this order: the table's per-primitive
entries (rules users register with ``register_rule``, then the built-in
rewrites and refusals below), then its *kind* (:func:`classify`: ``linear``,
``elementwise``, ``chooser``, ``product``, ``call``, ``custom_jvp``), whose
rule each table defines. A primitive with no rule raises the table's error
naming it; nothing falls back to gradients.

*Patterns* found on the jaxpr before the rules run (:func:`plan`): an
elementwise sub-computation of one value (GELU, SiLU, ``leaky_relu``: an
*elementwise region*) takes the table's elementwise rule as a whole, and the
``stop_gradient`` of a maximum that softmax and logsumexp subtract is a
*max-shift*, one value (the table's ``shift``) shared by the input and the
reference. *The head's output* is defined in :func:`softmax_at_output`; a
softmax or log-softmax there is refused by :func:`check_output` (the callers
decide, e.g. ``rescale.linearize(..., allow_softmax_output=True)``).

*Rewrites* shared by every table. Some primitives are rewritten into an
equivalent jaxpr of primitives that have rules, which is then interpreted as a
call (the rewritten function is traced from the operands' abstract values, so
nothing is computed twice):

* ``reduce_window`` / ``reduce`` with a one-equation ``max``, ``min`` or
  ``add`` reducer (what ``lax.reduce_window(x, init, lambda a, b: ...)``
  produces): pad with ``init`` (``lax.pad``, linear), the specialised window
  reduction without padding, then combine with ``init``:
  :math:`\max(\mathrm{init}, \max_w x)` or :math:`\mathrm{init} + \sum_w x`;
* ``scan`` with a static length (``lax.scan``, ``lax.fori_loop`` with static
  bounds): unrolled, :math:`c_{i+1}, y_i = \mathrm{body}(c_i, x_i)`, the
  ``y_i`` stacked (at most :data:`MAX_UNROLL` steps);
* ``cond`` with an input-independent index (``lax.cond``, ``lax.switch``):
  every branch evaluated and the outputs selected by the index
  (``select_n``), so each transformation sees exactly the chosen branch's
  rule; a concrete index takes its branch only.

Refused with the primitive named: ``while`` (a trip count decided by values),
``stop_gradient`` of an input-dependent value that is not a max-shift, and
any other primitive that carries a jaxpr but is not a known call.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from . import primitives as P

__all__ = [
    "MAX_UNROLL",
    "live_equations",
    "RuleTable",
    "check_output",
    "classify",
    "forward",
    "plan",
    "primitive_name",
    "softmax_at_output",
]

MAX_UNROLL = 1024
"""The longest ``scan`` the interpreters unroll; a longer one is refused."""

# ---------------------------------------------------------------------------
# primitive classes (the facts live in liftcam_jax.primitives)
# ---------------------------------------------------------------------------

RULE_KINDS = ("linear", "elementwise", "chooser", "product", "call", "custom_jvp")
"""The kinds of :data:`liftcam_jax.primitives.TABLE` each rule table defines a rule for."""

# Functions refused by name when met as a named call (``jit[name=...]``).
SOFTMAX_NAMES = frozenset({"softmax", "log_softmax", "_softmax", "_log_softmax"})
SOFTMAX_ADVICE = (
    "a probability depends on every class through the shared normaliser, so its attributions "
    "mix in the other classes' evidence; explain the logits: end the head before the softmax"
)


def primitive_name(primitive) -> str:
    """The table key of ``primitive``: a ``jax.extend.core.Primitive`` or its name."""
    if isinstance(primitive, str):
        return primitive
    name = getattr(primitive, "name", None)
    if not isinstance(name, str):
        raise TypeError(f"expected a JAX primitive or its name, got {primitive!r}")
    return name


# ---------------------------------------------------------------------------
# evaluation helpers
# ---------------------------------------------------------------------------

def bind(eqn, args):
    """Evaluate one equation on ``args`` (a list of its outputs)."""
    params = eqn.primitive.get_bind_params(eqn.params)
    if isinstance(params, tuple):  # older JAX: (subfuns, params)
        subfuns, params = params
        args = [*subfuns, *args]
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*args, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def eqn_fn(eqn, ins, dep_idx):
    """The equation as a function of its input-dependent operands only."""

    def f(*deps):
        args = list(ins)
        for i, d in zip(dep_idx, deps):
            args[i] = d
        return bind(eqn, args)

    return f


def is_float(x) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


sub_jaxpr = P.sub_jaxpr


def body_is_elementwise(jaxpr) -> bool:
    """Whether a ``custom_jvp`` body is one elementwise function (relu, relu6, softplus, ...).

    Every equation is position-wise (:data:`liftcam_jax.primitives.TABLE`), a
    broadcast of a scalar, or a plain call whose body is.
    """
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        f = P.facts(name)
        if f.inline:
            sub = sub_jaxpr(eqn)
            if sub is None or not body_is_elementwise(sub[0]):
                return False
        elif name == "broadcast_in_dim":
            if any(getattr(v.aval, "shape", ()) != () for v in eqn.invars if not isinstance(v, jcore.Literal)):
                return False
        elif not f.positionwise:
            return False
    return True


def is_elementwise_call(eqn, shape_of_dep, dep_idx) -> bool:
    """Whether a ``custom_jvp`` equation applies one elementwise function to its one input-dependent operand."""
    sub = sub_jaxpr(eqn)
    return (
        sub is not None
        and len(dep_idx) == 1
        and len(eqn.outvars) == 1
        and tuple(eqn.outvars[0].aval.shape) == tuple(shape_of_dep)
        and body_is_elementwise(sub[0])
    )


def is_known(x, value) -> bool:
    """``x`` is a concrete (not traced) value equal to ``value`` everywhere."""
    if isinstance(x, jax.core.Tracer):
        return False
    try:
        return bool(np.all(np.asarray(x) == value))
    except Exception:  # noqa: BLE001 - anything not convertible is not known
        return False


def body_args(jaxpr, ins, dep_idx, error):
    """A call's operands as its body's arguments: ``(args, dep_idx in the body)``.

    A call's leading operands beyond the body's arguments are its constants;
    they may not depend on the input.
    """
    shift = max(len(ins) - len(jaxpr.invars), 0)
    sub_dep = [i - shift for i in dep_idx]
    if any(i < 0 for i in sub_dep):
        raise error("input-dependent constants of a call")
    return ins[shift:], sub_dep


# ---------------------------------------------------------------------------
# classification
# ---------------------------------------------------------------------------

def classify(eqn, ins, dep_idx, *, error=NotImplementedError, rule: str = "DeepLIFT") -> str:
    """The kind of rule an equation with input-dependent operands ``dep_idx`` needs.

    One of ``"custom_jvp"``, ``"call"``, ``"linear"`` (affine in its
    input-dependent operands), ``"elementwise"`` (a nonlinearity of one value,
    also ``c / b`` with only ``b`` input-dependent), ``"chooser"`` (max/min
    pooling) or ``"product"`` (a bilinear primitive or a quotient with two
    input-dependent operands: :data:`liftcam_jax.primitives.Facts.product`),
    looked up by primitive name; the operand positions are checked. Anything
    else raises ``error`` naming the primitive.
    """
    name = eqn.primitive.name
    f = P.facts(name)
    kind = f.kind
    register = f"(register one with liftcam_jax.{'rescale' if rule == 'DeepLIFT' else 'lrp'}.register_rule)"
    if kind not in RULE_KINDS:
        what = "a primitive with a body" if P.has_sub_jaxpr(eqn.params) else "primitive"
        raise error(f"no {rule} rule for {what} {name!r} applied to an input-dependent value {register}")
    if kind == "linear" and f.operands != "all":
        allowed = f.operands
        if allowed == "one":
            if len(dep_idx) == 1:
                return kind
            if f.product:
                return "product"
            raise error(
                f"no {rule} rule for {name!r} of two input-dependent values "
                f"(a product of activations is not linear in the input) {register}"
            )
        if allowed == "cases":
            allowed = tuple(range(1, len(ins)))
        if set(dep_idx) <= set(allowed):
            return kind
        if f.product == "quotient":  # a / b with b computed from the input
            return "elementwise" if dep_idx == [1] else "product"
        raise error(
            f"no {rule} rule for {name!r} with an input-dependent operand in position "
            f"{sorted(set(dep_idx) - set(allowed))} (e.g. a data-dependent branch or index)"
        )
    if kind == "elementwise" and len(dep_idx) != 1:
        raise error(
            f"no {rule} rule for {name!r} of {len(dep_idx)} input-dependent values "
            f"(the rule is defined for elementwise functions of one value) {register}"
        )
    if kind == "chooser" and not (dep_idx == [0] and len(ins) == 1):
        raise error(f"no {rule} rule for {name!r} with these operands")
    return kind


# ---------------------------------------------------------------------------
# rewrites: an equation as an equivalent jaxpr of primitives with rules
# ---------------------------------------------------------------------------

def _reducer(eqn) -> Optional[str]:
    """``"max"``, ``"min"`` or ``"add"`` for a one-operand reduction with that reducer."""
    sub = sub_jaxpr(eqn)
    j = None if sub is None else sub[0]
    if j is None or len(eqn.invars) != 2 or len(j.eqns) != 1:
        return None
    (e,) = j.eqns
    if e.primitive.name not in ("max", "min", "add") or list(j.outvars) != list(e.outvars):
        return None
    if set(map(id, e.invars)) != set(map(id, j.invars)) or len(j.invars) != 2:
        return None
    return e.primitive.name


def _checked_reducer(eqn, dep_idx, error, rule) -> str:
    op = _reducer(eqn)
    if op is None or dep_idx != [0]:
        raise error(
            f"no {rule} rule for primitive {eqn.primitive.name!r} with this reducer "
            "(rules exist for one operand reduced by max, min or add with a constant init)"
        )
    return op


_IDENTITY = {"max": -np.inf, "min": np.inf, "add": 0.0}
_COMBINE = {"max": jnp.maximum, "min": jnp.minimum, "add": jnp.add}
_WINDOWED = {"max": jax.lax.reduce_window_max_p, "min": jax.lax.reduce_window_min_p,
             "add": jax.lax.reduce_window_sum_p}


def _reduce_window_fn(eqn, ins, dep_idx, error, rule):
    op = _checked_reducer(eqn, dep_idx, error, rule)
    p = {k: P.param(eqn, k) for k in ("window_dimensions", "window_strides", "padding", "base_dilation",
                                      "window_dilation")}
    nd = len(p["window_dimensions"])
    cfg = [(lo, hi, d - 1) for (lo, hi), d in zip(p["padding"], p["base_dilation"])]
    pads = any(c != (0, 0, 0) for c in cfg)
    identity_init = is_known(ins[1], _IDENTITY[op])

    def fn(x, init):
        init = init.astype(x.dtype)
        if pads:
            x = jax.lax.pad(x, init, cfg)
        r = _WINDOWED[op].bind(x, window_dimensions=tuple(p["window_dimensions"]),
                               window_strides=tuple(p["window_strides"]), padding=((0, 0),) * nd,
                               base_dilation=(1,) * nd, window_dilation=tuple(p["window_dilation"]))
        return [r if identity_init else _COMBINE[op](r, init)]

    return fn


def _reduce_fn(eqn, ins, dep_idx, error, rule):
    op = _checked_reducer(eqn, dep_idx, error, rule)
    axes = tuple(P.param(eqn, "dimensions"))
    identity_init = is_known(ins[1], _IDENTITY[op])
    reduce = {"max": jnp.max, "min": jnp.min, "add": jnp.sum}[op]

    def fn(x, init):
        r = reduce(x, axis=axes)
        return [r if identity_init else _COMBINE[op](r, init.astype(x.dtype))]

    return fn


def _scan_fn(eqn, ins, dep_idx, error, rule):
    layout = P.scan_layout(eqn)
    n, nc, ncar = layout.length, layout.num_consts, layout.num_carry
    if n > MAX_UNROLL:
        raise error(
            f"no {rule} rule for primitive 'scan' of length {n} (the interpreters unroll "
            f"scans of at most {MAX_UNROLL} steps; write a shorter loop)"
        )
    body = jcore.jaxpr_as_fun(layout.body)
    out_avals = [v.aval for v in eqn.outvars]

    def fn(*args):
        consts, carry, xs = args[:nc], list(args[nc:nc + ncar]), args[nc + ncar:]
        ys = []
        for i in (reversed(range(n)) if layout.reverse else range(n)):
            out = body(*consts, *carry, *[x[i] for x in xs])
            carry, y = list(out[:ncar]), out[ncar:]
            ys.append(y)
        if layout.reverse:
            ys = ys[::-1]
        stacked = [
            jnp.concatenate([y[k][None] for y in ys]) if ys else jnp.zeros(a.shape, a.dtype)
            for k, a in enumerate(out_avals[ncar:])
        ]
        return [*carry, *stacked]

    return fn


def _cond_fn(eqn, ins, dep_idx, error, rule):
    if 0 in dep_idx:
        raise error(f"no {rule} rule for primitive 'cond' whose branch index depends on the input")
    branches = [jcore.jaxpr_as_fun(b) for b in P.cond_branches(eqn)]
    index = ins[0]
    chosen = None
    if not isinstance(index, jax.core.Tracer):
        try:
            chosen = int(np.clip(np.asarray(index), 0, len(branches) - 1))
        except Exception:  # noqa: BLE001 - not concrete
            chosen = None

    def fn(idx, *ops):
        if chosen is not None:
            return list(branches[chosen](*ops))
        outs = [branches[b](*ops) for b in range(len(branches))]
        idx = jnp.clip(idx, 0, len(branches) - 1).astype(jnp.int32)
        return [jax.lax.select_n(idx, *[o[k] for o in outs]) for k in range(len(outs[0]))]

    return fn


def _while_refusal(eqn, ins, dep_idx, error, rule):
    raise error(
        f"no {rule} rule for primitive 'while' (a loop whose trip count is decided at run "
        "time); write it as a Python loop or lax.scan/fori_loop with static bounds"
    )


def _stop_gradient_refusal(eqn, ins, dep_idx, error, rule):
    raise error(
        f"no {rule} rule for primitive 'stop_gradient' of an input-dependent value other than a "
        "max-shift (a stop_gradient of a maximum, as softmax and logsumexp subtract): it would hide "
        "its value's difference from every rule"
    )


REWRITES = {
    "reduce_window": _reduce_window_fn,
    "reduce": _reduce_fn,
    "scan": _scan_fn,
    "cond": _cond_fn,
    "while": _while_refusal,
    "stop_gradient": _stop_gradient_refusal,
}
"""Primitive name -> ``maker(eqn, ins, dep_idx, error, rule) -> fn`` (or raises)."""


def _rewrite_rule(maker):
    def rule(eqn, ins, dep_idx, ctx):
        table = ctx.table
        fn = maker(eqn, ins, dep_idx, table.error, table.rule_name)
        avals = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in eqn.invars]
        closed = jax.make_jaxpr(fn)(*avals)
        return table.call(closed.jaxpr, closed.consts, ins, dep_idx, ctx)

    return rule


# ---------------------------------------------------------------------------
# the plan: elementwise regions and max-shifts, found on the jaxpr
# ---------------------------------------------------------------------------

def _is_var(v) -> bool:
    return not isinstance(v, jcore.Literal)


def _shape(v):
    return tuple(getattr(v.aval, "shape", ()))


def _positionwise(eqn, dep_vars, user) -> bool:
    """Whether ``eqn`` may be a member of an elementwise region (see :func:`plan`).

    Its output position :math:`i` reads position :math:`i` of its
    input-dependent operands only, all of the output's shape: a position-wise
    primitive (:data:`liftcam_jax.primitives.TABLE`; not ``stop_gradient``),
    or a call or ``custom_jvp`` whose body is one elementwise function. A
    primitive with a user's rule stays out, so that its rule is used.
    """
    name = eqn.primitive.name
    if name in user or name == "stop_gradient" or len(eqn.outvars) != 1:
        return False
    f = P.facts(name)
    if f.kind in ("call", "custom_jvp"):
        sub = sub_jaxpr(eqn)
        if sub is None or not body_is_elementwise(sub[0]):
            return False
    elif not f.positionwise:
        return False
    out = _shape(eqn.outvars[0])
    return all(_shape(v) == out for v in dep_vars)


def _explained_alone(eqn, dep_vars) -> bool:
    """Whether ``eqn``'s own rule applies: linear, or elementwise of one value, or a call."""
    dep_idx = [i for i, v in enumerate(eqn.invars) if _is_var(v) and v in dep_vars]
    try:
        kind = classify(eqn, [v.aval for v in eqn.invars], dep_idx, error=ValueError)
    except Exception:  # noqa: BLE001 - no rule of its own (a comparison, a branch on the input)
        return False
    return kind in ("linear", "elementwise", "call", "custom_jvp")


def _reaches_max(v, producer, dep, depth=0) -> bool:
    """Whether ``v`` is computed from a maximum (``reduce_max``) of the input by position-wise
    or structural steps only (``max(-inf, m)``, ``where(is_finite(m), m, 0)``, broadcasts)."""
    e = producer.get(v)
    if e is None or depth > 16:
        return False
    name = e.primitive.name
    if name == "reduce_max":
        return True
    f = P.facts(name)
    if name == "stop_gradient" or not (f.positionwise or f.structural):
        return False
    deps = [u for u in e.invars if _is_var(u) and u in dep]
    return bool(deps) and all(_reaches_max(u, producer, dep, depth + 1) for u in deps)


def _softmax_shift(e, dep, producer, readers, made) -> bool:
    """Whether ``e`` is ``sub(x, m)`` of a softmax: ``m`` input-dependent and computed from a
    ``reduce_max`` (:func:`_reaches_max`), ``x - m`` read only by an ``exp`` whose value is read only by
    a ``reduce_sum`` and a ``div`` of it by that sum (moved by structural steps). Softmax does not
    depend on ``m`` (``jax.nn.softmax``'s own body from JAX 0.11 on, which has no ``stop_gradient``)."""
    if e.primitive.name != "sub" or len(e.invars) != 2:
        return False
    m = e.invars[1]
    if not (_is_var(m) and m in dep and _reaches_max(m, producer, dep)):
        return False
    ex = readers.get(e.outvars[0], [])
    if len(ex) != 1 or ex[0].primitive.name != "exp":
        return False
    w = ex[0].outvars[0]
    after = readers.get(w, [])
    sums = [r for r in after if r.primitive.name == "reduce_sum"]
    divs = [r for r in after if r.primitive.name == "div" and r.invars[0] is w]
    if len(sums) != 1 or len(divs) != 1 or len(after) != 2:
        return False
    total, d = sums[0].outvars[0], divs[0].invars[1]
    for _ in range(8):  # the denominator: the sum, moved by structural steps (broadcast, reshape)
        if d is total:
            return True
        p = made.get(d)
        if p is None or not P.facts(p.primitive.name).structural or not p.invars or not _is_var(p.invars[0]):
            return False
        d = p.invars[0]
    return False


class Region(NamedTuple):
    """An elementwise region: its equations (in order) and the ``closed_call`` equation that runs them."""

    members: list
    eqn: Any


def _region_eqn(members, root, outputs):
    """A ``closed_call`` equation computing ``outputs`` from ``root`` and the members' other operands."""
    inside = {v for e in members for v in e.outvars}
    consts = []
    for e in members:
        for v in e.invars:
            if _is_var(v) and v is not root and v not in inside and v not in consts:
                consts.append(v)
    ins = [root, *consts]

    def body(*args):
        env = dict(zip(ins, args))
        for e in members:
            outs = bind(e, [read_env(env, v) for v in e.invars])
            env.update(zip(e.outvars, outs))
        return [env[v] for v in outputs]

    closed = jax.make_jaxpr(body)(*[jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in ins])
    return jcore.new_jaxpr_eqn(ins, list(outputs), jcore.primitives.closed_call_p,
                               {"call_jaxpr": closed}, jcore.no_effects)


def plan(eqns, outvars, dep_vars, user=()) -> list:
    r"""The order in which :func:`forward` interprets ``eqns``: ``[(what, eqn_or_region)]``.

    ``what`` is ``"eqn"`` (the equation's rule), ``"shift"`` or ``"region"``:

    * **Max-shifts.** ``jax.nn.softmax``, ``log_softmax`` and ``logsumexp``
      subtract ``stop_gradient(max(x))`` for floating-point range; the
      function does not depend on the shift. A ``stop_gradient`` of an
      input-dependent value computed from a ``reduce_max`` by position-wise or
      structural steps is such a shift: the table's ``shift`` gives one value
      shared by the input and the reference (DeepLIFT: the larger of the two
      maxima), an input-independent constant from there on. A shift computed
      separately at the input and at the reference would change the
      attributions: the difference of ``x - m`` would carry ``m - m_ref``,
      which the ``stop_gradient`` hides from every rule. Any other
      ``stop_gradient`` of an input-dependent value is refused. From JAX 0.11
      on ``jax.nn.softmax`` is a ``custom_jvp`` whose body subtracts the max
      without a ``stop_gradient``; there ``sub(x, m)`` (``what`` =
      ``"shift_sub"``), ``m`` computed from a ``reduce_max``, read only by an
      ``exp`` whose value is divided by its own sum, is the same shift
      (softmax does not depend on ``m``): :func:`_softmax_shift`.
    * **Elementwise regions.** ``jax.nn.gelu`` is traced into ``mul``,
      ``tanh``, ``add`` and ``integer_pow`` of one value ``x``; ``silu`` into
      ``x * logistic(x)``; ``leaky_relu`` into ``select_n(x >= 0, ...)``. A
      region is a connected set of position-wise equations
      (:func:`_positionwise`) whose only input-dependent operand from outside
      is one value, its *root*, all of the root's shape; it ends where a
      non-elementwise operation or a second input-dependent value comes in.
      The region is one elementwise function :math:`y = g(x)` of its root, so
      it takes the table's elementwise rule as a whole (DeepLIFT: the secant
      slope of :math:`g`, exact for each output), when one of its equations
      has no rule of its own (a product of two values of the region, a
      comparison, a ``select_n`` on one). Otherwise its equations keep their
      own rules (a chain of secants is the secant of the chain).

    Equations that read nothing computed from the input come first (their
    order among themselves kept), then the others in order, a fused region at
    its first member's place (its constant operands are ready then, and every
    reader of its outputs comes after its first member).
    """
    dep, touched = set(dep_vars), set(dep_vars)
    producer, root, group, fuse, shifts, shift_subs = {}, {}, {}, set(), set(), set()
    readers, made = {}, {}  # every equation reading / making each variable (later ones too)
    for e in eqns:
        made.update((v, e) for v in e.outvars)
        for v in e.invars:
            if _is_var(v):
                readers.setdefault(v, []).append(e)
    for n, e in enumerate(eqns):
        for v in e.outvars:
            producer[v] = e
        if not any(_is_var(v) and v in touched for v in e.invars):
            continue
        touched.update(e.outvars)
        dvars = [v for v in e.invars if _is_var(v) and v in dep]
        if not dvars:
            continue
        if e.primitive.name == "stop_gradient" and _reaches_max(dvars[0], producer, dep):
            shifts.add(n)
            continue
        dep.update(e.outvars)
        if _softmax_shift(e, dep, producer, readers, made):
            shift_subs.add(n)
            continue
        if _positionwise(e, dvars, user):
            roots = {root.get(v, v) for v in dvars}
            if len(roots) == 1:
                (r,) = roots
                group[n] = r
                root[e.outvars[0]] = r
                if not _explained_alone(e, dep):
                    fuse.add(r)
    members = {}
    for n, r in group.items():
        if r in fuse:
            members.setdefault(r, []).append(n)
    read_outside = set(v for v in outvars if _is_var(v))
    for n, e in enumerate(eqns):
        if not (n in group and group[n] in fuse):
            read_outside.update(v for v in e.invars if _is_var(v))
    first = {}
    for r, ns in members.items():
        ms = [eqns[n] for n in ns]
        outs = [e.outvars[0] for e in ms if e.outvars[0] in read_outside]
        first[ns[0]] = Region(ms, _region_eqn(ms, r, outs))
    items_free, items = [], []
    for n, e in enumerate(eqns):
        if n in first:
            items.append(("region", first[n]))
        elif n in group and group[n] in fuse:
            continue
        elif n in shifts:
            items.append(("shift", e))
        elif n in shift_subs:
            items.append(("shift_sub", e))
        elif any(v in touched for v in e.outvars):
            items.append(("eqn", e))
        else:
            items_free.append(("eqn", e))
    return items_free + items


# ---------------------------------------------------------------------------
# the head's output: a softmax there is refused
# ---------------------------------------------------------------------------

_PASS_THROUGH = frozenset({"reshape", "squeeze", "expand_dims", "broadcast_in_dim", "transpose", "slice",
                           "convert_element_type", "copy", "copy_p", "reduce_precision", "rev",
                           "sharding_constraint", "optimization_barrier"})
"""Single-operand moves and copies that keep a value "the head's output" (``out[:, 1:]``, a reshape)."""


def _back(v, producer):
    """Follow ``v`` back through :data:`_PASS_THROUGH` equations: ``(v, its producer or None)``."""
    for _ in range(64):
        e = producer.get(v)
        if e is None or e.primitive.name not in _PASS_THROUGH:
            return v, e
        v = e.invars[0]
        if not _is_var(v):
            return v, None
    return v, None


def _producer_map(jaxpr):
    return {v: e for e in jaxpr.eqns for v in e.outvars}


def _exp_of(v, producer):
    """The argument of ``exp`` when ``v`` is (moved) ``exp(z)``, else ``None``."""
    _, e = _back(v, producer)
    return e.invars[0] if e is not None and e.primitive.name == "exp" else None


def _is_exp_sum(v, producer, of=None) -> bool:
    """Whether ``v`` is (moved) ``sum(exp(z))``; with ``of``, also ``of = exp(z)`` for the same ``z``."""
    _, e = _back(v, producer)
    if e is None or e.primitive.name != "reduce_sum" or not _is_var(e.invars[0]):
        return False
    z = _exp_of(e.invars[0], producer)
    return z is not None and (of is None or _exp_of(of, producer) is z)


def _is_log_sum_exp(v, producer) -> bool:
    """Whether ``v`` is (moved) ``log(sum(exp(z)))``, or that plus a shift, or of ``abs`` of the sum
    (``jax.nn.logsumexp``), also as the output of a call that computes it (a ``custom_jvp`` from JAX 0.11 on)."""
    v, e = _back(v, producer)
    if e is not None and P.facts(e.primitive.name).kind in ("call", "custom_jvp"):  # JAX 0.11+: a custom_jvp
        sub = sub_jaxpr(e)
        if sub is None or len(sub[0].outvars) != len(e.outvars) or not _is_var(sub[0].outvars[list(e.outvars).index(v)]):
            return False
        return _is_log_sum_exp(sub[0].outvars[list(e.outvars).index(v)], _producer_map(sub[0]))
    if e is not None and e.primitive.name == "add":
        return any(_is_var(u) and _is_log_sum_exp(u, producer) for u in e.invars)
    if e is None or e.primitive.name != "log" or not _is_var(e.invars[0]):
        return False
    u, a = _back(e.invars[0], producer)
    if a is not None and a.primitive.name == "abs" and _is_var(a.invars[0]):
        u = a.invars[0]
    return _is_exp_sum(u, producer)


def softmax_at_output(jaxpr, index: int) -> Optional[str]:
    r"""``"softmax"`` or ``"log_softmax"`` when output ``index`` of ``jaxpr`` is one, else ``None``.

    *The head's output* is a value returned by the head, followed back
    through moves and copies (:data:`_PASS_THROUGH`: reshapes, slices,
    transposes, casts) and into the calls that return it. Once traced,
    a softmax is no longer one named call; it is one of:

    * a call named ``softmax`` / ``log_softmax`` (older JAX);
    * a normalised exponential, ``div(e, sum(e))`` with ``e = exp(...)``
      (``jax.nn.softmax``, with or without its max-shift, and the
      hand-written ``exp(x) / exp(x).sum()``), or the ``log`` of one;
    * ``sub(z, lse)`` with ``lse = log(sum(exp(...)))`` (+ a shift):
      ``jax.nn.log_softmax`` and ``x - logsumexp(x)``.
    """
    return _softmax_of(jaxpr.outvars[index], _producer_map(jaxpr))


def _softmax_of(v, producer) -> Optional[str]:
    v, e = _back(v, producer)
    if e is None:
        return None
    name = e.primitive.name
    if P.facts(name).kind in ("call", "custom_jvp"):
        cname = P.call_name(e)
        if cname in SOFTMAX_NAMES:
            return "log_softmax" if "log" in cname else "softmax"
        sub = sub_jaxpr(e)
        if sub is None or len(sub[0].outvars) != len(e.outvars):
            return None
        return _softmax_of(sub[0].outvars[list(e.outvars).index(v)], _producer_map(sub[0]))
    if name == "log" and _is_var(e.invars[0]):
        return "log_softmax" if _softmax_of(e.invars[0], producer) == "softmax" else None
    if name == "div" and all(_is_var(u) for u in e.invars):
        num, den = e.invars
        if _is_exp_sum(den, producer, of=num):
            return "softmax"
    if name == "sub" and _is_var(e.invars[1]) and _is_log_sum_exp(e.invars[1], producer):
        return "log_softmax"
    return None


def check_output(jaxpr, error, rule: str) -> None:
    """Raise ``error`` (one line, :data:`SOFTMAX_ADVICE`) when an output of ``jaxpr`` is a softmax."""
    for i, v in enumerate(jaxpr.outvars):
        what = softmax_at_output(jaxpr, i) if _is_var(v) else None
        if what is not None:
            raise error(f"no {rule} rule for a {what} at the head's output: {SOFTMAX_ADVICE}")


# ---------------------------------------------------------------------------
# rule tables and the interpreter
# ---------------------------------------------------------------------------

def call_rule(eqn, ins, dep_idx, ctx):
    """The rule of a call (``jit``, ``remat``, ``custom_vjp_call``, ...): interpret its body.

    The body runs through the same table (``ctx.table.call``), so a call is
    transparent: its rule is the composition of its equations' rules.
    """
    sub = sub_jaxpr(eqn)
    if sub is None:
        raise ctx.table.error(f"cannot look inside call primitive {eqn.primitive.name!r}")
    return ctx.table.call(*sub, ins, dep_idx, ctx)


def custom_jvp_rule(eqn, ins, dep_idx, ctx):
    r"""The rule of a ``custom_jvp`` function: one elementwise function, else a call.

    A body that is one elementwise function of its one input-dependent operand
    (``jax.nn.relu``, ``relu6``, ``softplus``: :func:`is_elementwise_call`)
    takes the table's ``elementwise`` rule as a whole, :math:`y_i = g(u_i)`
    (DeepLIFT: its secant slope, with the custom derivative as the fallback);
    any other body is interpreted like a call.
    """
    table = ctx.table
    if dep_idx and is_elementwise_call(eqn, jnp.shape(table.primal(ins[dep_idx[0]])), dep_idx):
        return table.kinds["elementwise"](eqn, ins, dep_idx, ctx)
    return call_rule(eqn, ins, dep_idx, ctx)


class RuleTable:
    """Rules keyed by primitive name, plus one rule per kind (see :func:`classify`).

    Args:
      rule_name: what the rules are called in errors (``"DeepLIFT"``, ``"LRP"``).
      error: the exception raised for a primitive without a rule.
      kinds: ``{kind: rule}`` for ``linear``, ``elementwise`` and ``chooser``;
        ``call`` and ``custom_jvp`` default to :func:`call_rule` and
        :func:`custom_jvp_rule`.
      call: ``call(jaxpr, consts, ins, dep_idx, ctx) -> (outs, step)``, how this
        transformation interprets a body (used by calls and rewrites).
      primal: the array a dependent value stands for (for dtype checks).
      depends: whether a rule's output value depends on the input.
      shift: ``shift(u) -> array``, the one value a max-shift (:func:`plan`)
        of the dependent value ``u`` takes, from there on a constant.
    """

    def __init__(self, rule_name: str, error, kinds: Dict[str, Callable], call: Callable,
                 primal: Callable = lambda v: v, depends: Callable = lambda v: True,
                 shift: Callable = lambda v: v):
        self.rule_name = rule_name
        self.error = error
        self.kinds = {"call": call_rule, "custom_jvp": custom_jvp_rule, **kinds}
        missing = set(RULE_KINDS) - set(self.kinds)
        if missing:
            raise TypeError(f"a rule table needs a rule for every kind; missing {sorted(missing)}")
        self.call = call
        self.primal = primal
        self.depends = depends
        self.shift = shift
        self.builtin: Dict[str, Callable] = {name: _rewrite_rule(m) for name, m in REWRITES.items()}
        self.user: Dict[str, Callable] = {}

    def register(self, primitive, rule: Optional[Callable]):
        """Set (or with ``None`` remove) the rule of ``primitive``; returns the previous one."""
        name = primitive_name(primitive)
        previous = self.user.pop(name, None)
        if rule is not None:
            if not callable(rule):
                raise TypeError(f"a rule must be callable, got {rule!r}")
            self.user[name] = rule
        return previous

    def builtin_rule(self, eqn, ins, dep_idx) -> Callable:
        name = eqn.primitive.name
        if name in self.builtin:
            return self.builtin[name]
        return self.kinds[classify(eqn, ins, dep_idx, error=self.error, rule=self.rule_name)]

    def lookup(self, eqn, ins, dep_idx) -> Callable:
        user = self.user.get(eqn.primitive.name)
        return user if user is not None else self.builtin_rule(eqn, ins, dep_idx)


class Trace(NamedTuple):
    """What :func:`forward` returns: outputs, the rules' steps, and the dependence test."""

    outs: list
    steps: list  # (input-dependent in_vars, out_vars, step) per interpreted equation
    is_dep: Callable[[Any], bool]


def _body_uses(eqn, used_outputs):
    """Which operands of ``eqn`` its outputs ``used_outputs`` read, looking inside call bodies.

    A call (``jit``, ``remat``, ``custom_jvp_call``, ``custom_vjp_call``, ...)
    reads only the operands its body's live equations read (its leading
    operands beyond the body's arguments, constants, count as read); a
    ``cond`` reads its index and what any branch reads. Any other equation
    reads all its operands.
    """
    n = len(eqn.invars)
    if P.facts(eqn.primitive.name).kind in ("call", "custom_jvp"):
        sub = sub_jaxpr(eqn)
        if sub is not None and len(sub[0].outvars) == len(eqn.outvars) and len(sub[0].invars) <= n:
            _, body_used = live_equations(sub[0], used_outputs)
            return [True] * (n - len(body_used)) + body_used
    if eqn.primitive.name == "cond":
        branches = P.cond_branches(eqn)
        if all(len(b.jaxpr.invars) == n - 1 and len(b.jaxpr.outvars) == len(eqn.outvars) for b in branches):
            uses = [live_equations(b.jaxpr, used_outputs)[1] for b in branches]
            return [True] + [any(u[i] for u in uses) for i in range(n - 1)]
    return [True] * n


def live_equations(jaxpr, used_outputs=None, *, known=()):
    """Dead-code elimination: the equations the used outputs need, and which inputs they read.

    Args:
      jaxpr: a ``jax.extend.core.Jaxpr``.
      used_outputs: one bool per output (default: all used).
      known: variables whose values the caller already has: their producers
        are not needed.

    Returns:
      ``(eqns, used_inputs)``: the equations to evaluate, in order (those whose
      outputs are needed, and effectful ones), and one bool per
      ``jaxpr.invars``: whether any of them reads it. Call bodies are looked
      into (:func:`_body_uses`), so a call keeps only the operands its body
      really uses; a kept call's operand that is not read may be missing from
      an evaluator's environment (:func:`read_env` gives a placeholder).

    A split's head built by running the whole model on a placeholder input
    (:mod:`liftcam_jax.flax_split`) leaves the front dead: it is not
    evaluated, and the input is unused exactly when no connection goes around
    the cut.
    """
    if used_outputs is None:
        used_outputs = [True] * len(jaxpr.outvars)
    known = set(known)
    live = {v for v, u in zip(jaxpr.outvars, used_outputs) if u and not isinstance(v, jcore.Literal)}
    kept = []
    for eqn in reversed(jaxpr.eqns):
        outs_used = [not isinstance(v, jcore.DropVar) and v in live and v not in known for v in eqn.outvars]
        if not (eqn.effects or any(outs_used)):
            continue
        kept.append(eqn)
        reads = [True] * len(eqn.invars) if eqn.effects else _body_uses(eqn, outs_used)
        live.update(v for v, r in zip(eqn.invars, reads) if r and not isinstance(v, jcore.Literal))
    return kept[::-1], [v in live for v in jaxpr.invars]


def read_env(env, v):
    """The value of ``v`` (a Var or Literal) in ``env``; zeros of its type for a dead operand.

    :func:`live_equations` drops the producers of a call's operands that the
    call's body never reads; the call still takes a value for them.
    """
    if isinstance(v, jcore.Literal):
        return v.val
    if v in env:
        return env[v]
    return jnp.zeros(v.aval.shape, v.aval.dtype)


def forward(jaxpr, consts, args, dep_pos, ctx) -> Trace:
    """Evaluate ``jaxpr`` with ``ctx.table``'s rules; ``dep_pos``: input-dependent argument positions."""
    table: RuleTable = ctx.table
    env, dep = {}, set()

    def read(v):
        return read_env(env, v)

    def is_dep(v):
        return not isinstance(v, jcore.Literal) and v in dep

    for v, c in zip(jaxpr.constvars, consts):
        env[v] = c
    for i, (v, a) in enumerate(zip(jaxpr.invars, args)):
        env[v] = a
        if i in dep_pos:
            dep.add(v)

    steps = []
    for what, item in plan(live_equations(jaxpr)[0], jaxpr.outvars, dep, table.user):
        eqn = item.eqn if what == "region" else item
        ins = [read(v) for v in eqn.invars]
        dep_idx = [i for i, v in enumerate(eqn.invars) if is_dep(v)]
        if what == "shift_sub":  # softmax's own max-shift (no stop_gradient): one value, then a plain sub
            ins[1] = table.shift(ins[1])
            dep_idx, what = [i for i in dep_idx if i != 1], "eqn"
        if not dep_idx:
            outs = bind(eqn, ins)
        elif what == "shift":
            outs = [table.shift(ins[dep_idx[0]])]
        else:
            name = eqn.primitive.name
            for i in dep_idx:
                if not is_float(table.primal(ins[i])):
                    raise table.error(
                        f"primitive {name!r} receives an input-dependent "
                        f"{jnp.result_type(table.primal(ins[i]))} value; {table.rule_name} needs real-valued paths"
                    )
            if what == "region":
                for m in item.members:
                    v = m.outvars[0]
                    if v in eqn.outvars and not jnp.issubdtype(v.aval.dtype, jnp.inexact):
                        raise table.error(
                            f"primitive {m.primitive.name!r} computes a {v.aval.dtype} value from the input "
                            f"(a data-dependent branch or index has no {table.rule_name} rule)"
                        )
            rule = table.kinds["elementwise"] if what == "region" else table.lookup(eqn, ins, dep_idx)
            outs, step = rule(eqn, ins, dep_idx, ctx)
            for o, v in zip(outs, eqn.outvars):
                if isinstance(v, jcore.DropVar) or not table.depends(o):
                    continue
                if not is_float(table.primal(o)):
                    raise table.error(
                        f"primitive {name!r} computes a {jnp.result_type(table.primal(o))} value "
                        f"from the input (a data-dependent branch or index has no {table.rule_name} rule)"
                    )
                dep.add(v)
            steps.append(([eqn.invars[i] for i in dep_idx], eqn.outvars, step))
        for v, o in zip(eqn.outvars, outs):
            if not isinstance(v, jcore.DropVar):
                env[v] = o

    return Trace([read(v) for v in jaxpr.outvars], steps, is_dep)
