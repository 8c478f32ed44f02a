r"""Layer-wise relevance propagation (LRP-epsilon) as a transformation of JAX functions.

LRP (Bach, Binder, Montavon, Klauschen, Müller & Samek, "On Pixel-Wise
Explanations for Non-Linear Classifier Decisions by Layer-Wise Relevance
Propagation", PLoS ONE 10(7) 2015) redistributes an output score backwards,
layer by layer, in proportion to each input's contribution. For an affine
operation :math:`z_j = \sum_i x_i w_{ij} + b_j` the epsilon rule is

.. math::
    R_{x_i} = x_i \sum_j w_{ij} \frac{R_{z_j}}{z_j + \epsilon\,\mathrm{sign}(z_j)}
    \quad\text{i.e.}\quad R_x = x \odot J^\top\!\Big(\frac{R_z}{\mathrm{stab}(z)}\Big),

with :math:`\mathrm{sign}(0) = +1` and :math:`\epsilon = 10^{-9}` (Captum's
``EpsilonRule``). The relevance starts at the explained output: ``one_hot(c) *
f(x)`` (the target logit). Constants added along the way (biases,
batch-norm shifts) keep their share and the stabiliser absorbs a little, so
:math:`\sum R_x = f(x)_c` up to :math:`\epsilon` exactly when no equation adds
a constant (relevance is conserved through every rule below).

This module interprets the function's jaxpr (like :mod:`liftcam_jax.rescale`,
whose primitive facts, :mod:`liftcam_jax.primitives`, it shares): a forward pass stores every value that
depends on the input, then a reverse pass applies one rule per equation:

* affine equations (``dot_general``/``conv_general_dilated`` with a constant
  kernel, ``mul``/``div`` by a constant, ``add`` of a bias, ``reduce_sum``,
  ``reduce_window_sum`` (average pooling), ...): the epsilon rule above, with
  :math:`J` the equation's Jacobian. An ``add``/``sub`` of two input-dependent
  values (a residual connection) splits the relevance in proportion to each
  summand, :math:`R_a = a \odot R_z/\mathrm{stab}(z)`, the same rule;
* max-/min-pooling (``reduce_window_max``, ``reduce_max``, ...): the epsilon
  rule with the pooling's local Jacobian (the arg-max routing), which is what
  Captum's ``EpsilonRule`` on ``MaxPool2d`` computes;
* structural equations (reshape, transpose, broadcast, slice, concatenate,
  type conversion, gather, ...): relevance moves with the transpose of the
  map, unchanged;
* elementwise nonlinearities (``max`` with a constant, ``tanh``, ``jax.nn.relu``
  and other elementwise ``custom_jvp`` functions): relevance passes through
  unchanged (Captum's rule for ``ReLU``, ``Tanh`` and ``Dropout``);
* elementwise regions, an elementwise function of one value however it is
  written (``jax.nn.gelu``, ``silu``, ``leaky_relu``:
  :func:`liftcam_jax.patterns.plan`): relevance passes through unchanged,
  as for ``tanh``;
* the max-shift of ``softmax`` and ``logsumexp``: a constant (its value at
  ``x``), so it takes no relevance;
* calls (``jit``, ``custom_vjp``, non-elementwise ``custom_jvp``, ...):
  interpreted recursively.

* LayerNorm's and RMSNorm's normalisation (:func:`liftcam_jax.patterns.plan`,
  ``"normalised"``): AttnLRP's LayerNorm rule (Achtibat et al., "AttnLRP:
  Attention-Aware Layer-Wise Relevance Propagation for Transformers", ICML
  2024; Ali et al., ICML 2022), the normaliser a constant
  (:func:`_normaliser_rule`).

A softmax or log-softmax at the head's output is refused with the advice to
explain the logits (:func:`liftcam_jax.patterns.check_output`). Any other
product or quotient of two input-dependent values (``mul``, ``dot_general`` and
``div`` in attention) raises :class:`NoRelevanceRule` naming the primitive:
relevance through them needs AttnLRP's other rules (uniform products, its
softmax rule), not implemented here; so does anything else that depends on the
input (a data-dependent index).

*Per-equation versus per-module epsilon.* Captum applies the rule once per
``nn.Module``: a ``Linear`` is one affine map with one stabiliser on its output
``Wx + b``. A Flax ``Dense`` is two equations, ``u = x W`` then ``z = u + b``,
and this module stabilises both. Composing the two rules gives
:math:`R_x = x \odot W^\top\big(\tfrac{u}{\mathrm{stab}(u)} \odot
\tfrac{R_z}{\mathrm{stab}(z)}\big)`, which is the per-module rule up to the
factor :math:`u/\mathrm{stab}(u) = 1 - \epsilon/|u|`: the two placements agree
up to :math:`\epsilon` (likewise for batch norm, written as a ``sub``, a
``mul`` and an ``add``, and for average pooling, a window sum then a division).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

from . import equations, interpreter, patterns, primitives
from .errors import LiftcamError
from .equations import bind as _bind
from .equations import eqn_fn as _eqn_fn

__all__ = [
    "DEFAULT_EPSILON",
    "Lrp",
    "NoRelevanceRule",
    "Propagation",
    "lrp",
    "propagate",
    "register_rule",
    "stabilize",
]

DEFAULT_EPSILON = 1e-9
"""Captum's ``EpsilonRule`` default (``PropagationRule.STABILITY_FACTOR``)."""


class NoRelevanceRule(LiftcamError, NotImplementedError):
    """Raised when an input-dependent primitive has no LRP rule."""


def stabilize(z, epsilon: float = DEFAULT_EPSILON):
    r"""``z + epsilon * sign(z)`` with ``sign(0) = +1`` (the LRP-epsilon denominator)."""
    return z + jnp.where(z >= 0, epsilon, -epsilon).astype(jnp.result_type(z))


class _Ctx(NamedTuple):
    epsilon: float
    table: Any = None


# ---------------------------------------------------------------------------
# rules: each returns (outputs, back) where back maps the relevance of the
# outputs (None for an output that receives none) to the relevance of the
# input-dependent operands, in operand order.
# ---------------------------------------------------------------------------

def _fill(outs, rs):
    return [jnp.zeros_like(o) if r is None else r for o, r in zip(outs, rs)]


def _structural_rule(eqn, ins, dep_idx, ctx):
    outs, vjp = jax.vjp(_eqn_fn(eqn, ins, dep_idx), *[ins[i] for i in dep_idx])

    def back(rs):
        return list(vjp(_fill(outs, rs)))

    return outs, back


def _epsilon_rule(eqn, ins, dep_idx, ctx):
    xs = [ins[i] for i in dep_idx]
    outs, vjp = jax.vjp(_eqn_fn(eqn, ins, dep_idx), *xs)

    def back(rs):
        s = [r / stabilize(o, ctx.epsilon) for o, r in zip(outs, _fill(outs, rs))]
        return [x * g for x, g in zip(xs, vjp(s))]

    return outs, back


def _pass_through_rule(eqn, ins, dep_idx, ctx):
    (i,) = dep_idx
    outs = _bind(eqn, ins)
    shape = jnp.shape(ins[i])

    def back(rs):
        # an elementwise region (liftcam_jax.patterns.plan) may have several outputs
        r = sum(_fill(outs, rs))
        if jnp.shape(r) != shape:  # a scalar operand broadcast against a constant array
            r = jnp.sum(r).reshape(shape)
        return [r]

    return outs, back


def _product_refusal(eqn, ins, dep_idx, ctx):
    raise NoRelevanceRule(
        f"no LRP rule for {primitives.label(eqn)!r} of two input-dependent values (attention's "
        "products and softmax need AttnLRP's rules, Achtibat et al., ICML 2024, of which this "
        "library implements the LayerNorm rule only; use lift-cam, or register a rule with "
        "liftcam_jax.lrp.register_rule)"
    )


def _normaliser_rule(eqn, ins, dep_idx, ctx, index):
    r"""AttnLRP's LayerNorm rule: the normaliser (operand ``index``) is a constant.

    :math:`z = u\,s` (or :math:`u / s`) with :math:`s` the normaliser
    (:func:`liftcam_jax.patterns.plan`, ``"normalised"``) takes the epsilon
    rule of a product with a constant, :math:`R_u = u \odot s\,R_z / \mathrm{stab}(z)
    \approx R_z`, and :math:`R_s = 0` (Ali et al., ICML 2022; Achtibat et al.,
    ICML 2024).
    """
    other = dep_idx[1 - index]
    outs, back = _epsilon_rule(eqn, ins, [other], ctx)

    def step(rs):
        rel = [None, None]
        rel[1 - index], rel[index] = back(rs)[0], jnp.zeros_like(ins[dep_idx[index]])
        return rel

    return outs, step


def _call(jaxpr, consts, ins, dep_idx, ctx):
    """Interpret a body on ``ins`` (its last ``len(jaxpr.invars)`` operands)."""
    args, sub_dep = equations.body_args(jaxpr, ins, dep_idx, NoRelevanceRule)
    outs, backward = _interpret(jaxpr, consts, args, set(sub_dep), ctx)

    def back(rs):
        rin = backward(rs)
        return [rin[i] for i in sub_dep]

    return outs, back


def _linear_rule(eqn, ins, dep_idx, ctx):
    # A Jacobian that only moves, copies or selects entries passes relevance
    # through its transpose (the epsilon rule would give the same up to a
    # factor x / stab(x)).
    rule = _structural_rule if primitives.facts(eqn.primitive.name).structural else _epsilon_rule
    return rule(eqn, ins, dep_idx, ctx)


def _user_rule(rule):
    """Adapt a public rule ``rule(xs, **params)`` to the interpreter."""

    def wrapped(eqn, ins, dep_idx, ctx):
        res = rule(list(ins), **eqn.params)
        if res is None:  # the rule declines: the built-in rule (or its error) applies
            return _TABLE.builtin_rule(eqn, ins, dep_idx)(eqn, ins, dep_idx, ctx)
        outs, back = res
        many = eqn.primitive.multiple_results
        outs = list(outs) if many else [outs]

        def step(rs):
            r_in = back(*_fill(outs, rs)) if many else back(_fill(outs, rs)[0])
            r_in = list(r_in) if isinstance(r_in, (list, tuple)) else [r_in]
            return [r_in[i] for i in dep_idx]

        return outs, step

    return wrapped


def register_rule(primitive, rule: Optional[Callable]):
    r"""Register an LRP rule for ``primitive`` (a ``jax.extend.core.Primitive`` or its name).

    ``rule(xs, **params) -> (y, back)`` or ``None`` (decline: the built-in
    rule, or its error, applies). ``xs`` are the equation's operands, ``y`` its
    output (a list for primitives with several outputs) and ``back(r_y)``
    returns the relevance of every operand (a list; entries of
    input-independent operands are ignored). ``rule=None`` removes the rule;
    the previous one is returned. Example, a gate ``a * g`` of an activation
    ``a`` and a gate ``g`` computed from it: all relevance to the signal, none
    to the gate (the "signal-take-all" rule of Arras et al., 2017, for LSTM
    gates)::

        def gate_rule(xs, **params):
            a, g = xs
            return a * g, lambda r: [r, jnp.zeros_like(g)]

        lj.lrp.register_rule(jax.lax.mul_p, gate_rule)
    """
    return _TABLE.register(primitive, None if rule is None else _user_rule(rule))


_TABLE = interpreter.RuleTable(
    "LRP",
    NoRelevanceRule,
    {
        "linear": _linear_rule,
        "elementwise": _pass_through_rule,
        "chooser": _epsilon_rule,
        "product": _product_refusal,
        "normaliser": _normaliser_rule,
    },
    _call,
)


# ---------------------------------------------------------------------------
# the interpreter
# ---------------------------------------------------------------------------

def _interpret(jaxpr, consts, args, dep_pos, ctx):
    """Evaluate ``jaxpr``; ``dep_pos`` are the positions of the input-dependent arguments.

    Returns the outputs and ``backward``: a function from the relevance of the
    outputs (a list, ``None`` where an output receives none) to the relevance
    of the arguments (a list, ``None`` where an argument receives none).
    """
    trace = interpreter.forward(jaxpr, consts, args, dep_pos, ctx)
    is_dep = trace.is_dep

    def backward(out_rel):
        renv = {}

        def add(v, r):
            if r is None or not is_dep(v):
                return
            renv[v] = r if v not in renv else renv[v] + r

        for v, r in zip(jaxpr.outvars, out_rel):
            add(v, r)
        for in_vars, out_vars, back in reversed(trace.steps):
            rs = [None if isinstance(v, jcore.DropVar) else renv.get(v) for v in out_vars]
            if all(r is None for r in rs):
                continue  # nothing downstream of this equation is explained
            for v, r in zip(in_vars, back(rs)):
                add(v, r)
        return [renv.get(v) if is_dep(v) else None for v in jaxpr.invars]

    return trace.outs, backward


# ---------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------

class Propagation(NamedTuple):
    """``fun(x)`` and the LRP-epsilon map from output relevance to input relevance.

    ``relevance(r_out)`` takes a pytree shaped like ``out`` (the relevance
    assigned to each output) and returns a pytree shaped like ``x``. It is
    linear in ``r_out`` (the forward values are fixed), so it can be
    ``jax.vmap``-ped over several targets.
    """

    out: Any
    relevance: Callable[[Any], Any]


def propagate(fun: Callable, x, *, epsilon: float = DEFAULT_EPSILON,
              allow_softmax_output: bool = False) -> Propagation:
    """Run ``fun`` on ``x`` and build its LRP-epsilon backward pass.

    Args:
      fun: a JAX function of one pytree argument (close over the rest, e.g.
        ``lambda a: head(params, a)``).
      x: the input (pytree of float arrays).
      epsilon: the stabiliser of the epsilon rule.
      allow_softmax_output: as in :func:`liftcam_jax.rescale.linearize`.
    """
    flat_x, tree = jax.tree_util.tree_flatten(x)
    out_tree = []

    def flat_fun(*xs):
        leaves, otree = jax.tree_util.tree_flatten(fun(jax.tree_util.tree_unflatten(tree, xs)))
        out_tree.append(otree)
        return leaves

    closed = jax.make_jaxpr(flat_fun)(*flat_x)
    if not allow_softmax_output:
        patterns.check_output(closed.jaxpr, NoRelevanceRule, "LRP")
    otree = out_tree[-1]
    outs, backward = _interpret(
        closed.jaxpr, closed.consts, list(flat_x), set(range(len(flat_x))), _Ctx(float(epsilon), _TABLE)
    )

    def relevance(r_out):
        rin = backward(list(jax.tree_util.tree_leaves(r_out)))
        rin = [jnp.zeros_like(a) if r is None else r for r, a in zip(rin, flat_x)]
        return jax.tree_util.tree_unflatten(tree, rin)

    return Propagation(jax.tree_util.tree_unflatten(otree, outs), relevance)


class Lrp(NamedTuple):
    """LRP-epsilon attributions of one target per example.

    ``attributions`` has the shape of ``x``; ``delta = out[target] -
    sum(attributions)`` per example is the relevance absorbed by biases and
    stabilisers (Captum's convergence delta).
    """

    attributions: Any
    out: Any
    delta: Any


def lrp(fun: Callable, x, targets=None, *, epsilon: float = DEFAULT_EPSILON) -> Lrp:
    """LRP-epsilon relevance of a batched classifier-like function (Bach et al., 2015).

    The relevance starts at the target output, ``one_hot(target) * fun(x)``,
    and is propagated back to ``x`` with the rules of this module.

    Args:
      fun: maps ``x`` of shape ``(B, ...)`` to ``(B, C)`` (or ``(B,)``), examples
        independent of each other.
      x: the batch of inputs.
      targets: ``(B,)`` output index per example, or one int; ``None`` takes the
        arg-max of ``fun(x)``. Ignored for ``(B,)`` outputs.

    Example::

        res = lrp(lambda a: head(params, a), activations, targets)
        phi = res.attributions.sum(axis=(1, 2))     # LRP-CAM coefficients
    """
    x = jnp.asarray(x)
    prop = propagate(fun, x, epsilon=epsilon)
    out = prop.out
    if out.ndim == 1:
        r_out = out
        score = out
    else:
        if targets is None:
            targets = jnp.argmax(out, axis=-1)
        targets = jnp.broadcast_to(jnp.asarray(targets, jnp.int32), out.shape[:1])
        r_out = jax.nn.one_hot(targets, out.shape[-1], dtype=out.dtype) * out
        score = jnp.sum(r_out, axis=-1)
    attr = prop.relevance(r_out)
    delta = score - jnp.sum(attr.reshape(attr.shape[0], -1), axis=-1)
    return Lrp(attr, out, delta)
