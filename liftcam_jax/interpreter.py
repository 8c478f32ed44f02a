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

Before the rules run, :func:`plan` (:mod:`liftcam_jax.patterns`) finds two
patterns on the jaxpr: *elementwise regions* (GELU, SiLU, ``leaky_relu``),
which take the table's elementwise rule as a whole, and *max-shifts*, the
maximum that softmax and logsumexp subtract, one value (the table's
``shift``) shared by the input and the reference. A softmax at the head's
output is refused by :func:`check_output`. What the rules need to know of one
equation (:func:`classify`, :func:`~liftcam_jax.equations.bind`) is in
:mod:`liftcam_jax.equations`.

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

import functools

from typing import Any, Callable, Dict, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from . import primitives as P
from .equations import (RULE_KINDS, bind, classify, is_elementwise_call, is_float, is_known,
                        primitive_name, read_env)
from .patterns import check_output, plan, softmax_at_output
from .primitives import sub_jaxpr

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
    (``jax.nn.relu``, ``relu6``, ``softplus``: :func:`~liftcam_jax.equations.is_elementwise_call`)
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
        :func:`custom_jvp_rule`; optional ``product`` (two input-dependent
        operands) and ``normaliser`` (a LayerNorm's product,
        :func:`~liftcam_jax.patterns.plan`; called with ``index=``, its
        normaliser's operand, and without it the ``product`` rule applies).
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
      an evaluator's environment (:func:`~liftcam_jax.equations.read_env` gives a placeholder).

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
        eqn = item.eqn if what in ("region", "normalised") else item
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
            if what == "region":
                rule = table.kinds["elementwise"]
            elif what == "normalised" and len(dep_idx) == 2 and "normaliser" in table.kinds:
                rule = functools.partial(table.kinds["normaliser"], index=item.index)
            else:
                rule = table.lookup(eqn, ins, dep_idx)
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
