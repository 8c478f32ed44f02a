r"""Patterns found on a jaxpr before the attribution rules run, and the head's output.

:func:`plan` orders the equations for :func:`liftcam_jax.interpreter.forward`
and finds two patterns on the jaxpr: an elementwise sub-computation of one
value (GELU, SiLU, ``leaky_relu``: an *elementwise region*) takes the rule
table's elementwise rule as a whole, and the ``stop_gradient`` of a maximum
that softmax and logsumexp subtract is a *max-shift*, one value (the table's
``shift``) shared by the input and the reference. *The head's output* is
defined in :func:`softmax_at_output`; a softmax or log-softmax there is
refused by :func:`check_output` (the callers decide, e.g.
``rescale.linearize(..., allow_softmax_output=True)``).

Nothing here evaluates a rule: the patterns are read off the equations'
primitives and variables (:data:`liftcam_jax.primitives.TABLE`).
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import jax
from jax.extend import core as jcore

from . import primitives as P
from .equations import bind, body_is_elementwise, classify, read_env
from .primitives import sub_jaxpr

__all__ = [
    "Normalised",
    "Region",
    "check_output",
    "plan",
    "softmax_at_output",
]


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


_SCALE_STEPS = frozenset({"broadcast_in_dim", "reshape", "convert_element_type", "squeeze", "expand_dims",
                          "copy", "copy_p", "mul", "div", "neg"})
"""Steps a normaliser may pass through after its ``rsqrt`` / ``sqrt``: moves, casts, and (``mul``,
``div``, ``neg``) scaling by input-independent values (a LayerNorm's scale ``gamma``)."""


def _normaliser(v, root: str, producer, dep, size: int, depth=0) -> bool:
    """Whether ``v`` is a normaliser: ``root`` (``rsqrt`` or ``sqrt``) of an input-dependent value
    with fewer elements than ``size`` (one value per row, broadcast over the normalised axis),
    then moved, cast or scaled by input-independent values (:data:`_SCALE_STEPS`)."""
    e = producer.get(v)
    if e is None or depth > 16:
        return False
    name = e.primitive.name
    if name == root:
        return math.prod(_shape(e.outvars[0])) < size
    if name not in _SCALE_STEPS:
        return False
    deps = [u for u in e.invars if _is_var(u) and u in dep]
    if len(deps) != 1 or (name == "div" and e.invars[0] is not deps[0]):
        return False  # a product of two input-dependent values, or a reciprocal
    return _normaliser(deps[0], root, producer, dep, size, depth + 1)


def _normalised_operand(e, dep, producer) -> Optional[int]:
    r"""The operand index of the normaliser when ``e`` normalises its other operand, else ``None``.

    ``mul(u, s)`` / ``mul(s, u)`` with ``s`` a normaliser ending in ``rsqrt``, and ``div(u, s)``
    with ``s`` one ending in ``sqrt`` (:func:`_normaliser`), both operands input-dependent and ``u``
    not a normaliser itself: the :math:`(x - \mu)\,\mathrm{rsqrt}(\sigma^2 + \epsilon)\,\gamma`
    of LayerNorm (Flax, NNX, Haiku, Equinox, ``jax.nn.standardize``) and RMSNorm, and the
    hand-written ``(x - mu) / jnp.sqrt(var + eps)``.
    """
    name = e.primitive.name
    if name not in ("mul", "div") or len(e.invars) != 2 or not all(_is_var(u) and u in dep for u in e.invars):
        return None
    size = math.prod(_shape(e.outvars[0]))
    if name == "div":
        return 1 if _normaliser(e.invars[1], "sqrt", producer, dep, size) else None
    found = [k for k in (0, 1) if _normaliser(e.invars[k], "rsqrt", producer, dep, size)]
    return found[0] if len(found) == 1 else None


class Normalised(NamedTuple):
    """A product whose operand ``index`` normalises the other (:func:`_normalised_operand`)."""

    eqn: Any
    index: int


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


class _Marks(NamedTuple):
    """What :func:`_mark` finds on the equations, by their index in the list."""

    touched: set  # the variables computed from the input (a max-shift's output too)
    shifts: set  # the stop_gradient max-shifts
    shift_subs: set  # softmax's own max-shift, sub(x, m) (JAX 0.11+)
    group: dict  # a position-wise equation -> the root of its region
    fuse: set  # the roots of the regions taken as a whole
    normalised: dict  # a normalising product -> the operand index of its normaliser

    def fused(self, n) -> bool:
        """Whether equation ``n`` runs inside a region taken as a whole."""
        return n in self.group and self.group[n] in self.fuse


def _uses(eqns):
    """``(readers, made)``: every equation reading / making each variable (later ones too)."""
    readers, made = {}, {}
    for e in eqns:
        made.update((v, e) for v in e.outvars)
        for v in e.invars:
            if _is_var(v):
                readers.setdefault(v, []).append(e)
    return readers, made


def _mark(eqns, dep_vars, user) -> _Marks:
    """One pass in order: the max-shifts, and the position-wise equations grouped by their root.

    A region is fused (taken as a whole) when one of its equations has no rule
    of its own (:func:`_explained_alone`).
    """
    dep, touched = set(dep_vars), set(dep_vars)
    producer, root, group, fuse, shifts, shift_subs, normalised = {}, {}, {}, set(), set(), set(), {}
    readers, made = _uses(eqns)
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
        if e.primitive.name not in user:
            k = _normalised_operand(e, dep, producer)
            if k is not None:
                normalised[n] = k
                continue
        if _positionwise(e, dvars, user):
            roots = {root.get(v, v) for v in dvars}
            if len(roots) == 1:
                (r,) = roots
                group[n] = r
                root[e.outvars[0]] = r
                if not _explained_alone(e, dep):
                    fuse.add(r)
    return _Marks(touched, shifts, shift_subs, group, fuse, normalised)


def _regions(eqns, outvars, marks: _Marks) -> dict:
    """The fused regions, keyed by their first member's index; each returns what is read outside it."""
    members = {}
    for n, r in marks.group.items():
        if r in marks.fuse:
            members.setdefault(r, []).append(n)
    read_outside = set(v for v in outvars if _is_var(v))
    for n, e in enumerate(eqns):
        if not marks.fused(n):
            read_outside.update(v for v in e.invars if _is_var(v))
    first = {}
    for r, ns in members.items():
        ms = [eqns[n] for n in ns]
        outs = [e.outvars[0] for e in ms if e.outvars[0] in read_outside]
        first[ns[0]] = Region(ms, _region_eqn(ms, r, outs))
    return first


def plan(eqns, outvars, dep_vars, user=()) -> list:
    r"""The order in which :func:`liftcam_jax.interpreter.forward` interprets ``eqns``: ``[(what, eqn_or_region)]``.

    ``what`` is ``"eqn"`` (the equation's rule), ``"shift"``, ``"shift_sub"``, ``"region"``
    or ``"normalised"``:

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

    * **Normalisers.** A LayerNorm's or RMSNorm's
      :math:`u \cdot \mathrm{rsqrt}(\sigma^2 + \epsilon)\,\gamma` (or
      :math:`u / \sqrt{\sigma^2 + \epsilon}`) is a product of two
      input-dependent values where one, the normaliser, is a function of
      one statistic per row (:func:`_normalised_operand`): ``"normalised"``
      (a :class:`Normalised`), for the table's ``"normaliser"`` rule
      (:func:`liftcam_jax.rescale_rules.normaliser_rule`); a table without
      one uses its product rule.

    Equations that read nothing computed from the input come first (their
    order among themselves kept), then the others in order, a fused region at
    its first member's place (its constant operands are ready then, and every
    reader of its outputs comes after its first member).
    """
    marks = _mark(eqns, dep_vars, user)
    first = _regions(eqns, outvars, marks)
    items_free, items = [], []
    for n, e in enumerate(eqns):
        if n in first:
            items.append(("region", first[n]))
        elif marks.fused(n):
            continue
        elif n in marks.shifts:
            items.append(("shift", e))
        elif n in marks.shift_subs:
            items.append(("shift_sub", e))
        elif n in marks.normalised:
            items.append(("normalised", Normalised(e, marks.normalised[n])))
        elif any(v in marks.touched for v in e.outvars):
            items.append(("eqn", e))
        else:
            items_free.append(("eqn", e))
    return items_free + items


# ---------------------------------------------------------------------------
# the head's output: a softmax there is refused
# ---------------------------------------------------------------------------

# Functions refused by name when met as a named call (``jit[name=...]``).
SOFTMAX_NAMES = frozenset({"softmax", "log_softmax", "_softmax", "_log_softmax"})
SOFTMAX_ADVICE = (
    "a probability depends on every class through the shared normaliser, so its attributions "
    "mix in the other classes' evidence; explain the logits: end the head before the softmax"
)


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

