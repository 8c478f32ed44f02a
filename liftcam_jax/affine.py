r"""The additive front of a function: where a head stops being additive over its input's channels.

Most heads begin with layers that keep channel contributions apart: a split
after a ReLU6 hands the head convolutions and inference-mode batch norms
(affine maps) before its next nonlinearity, and a split before a depthwise
convolution hands it per-channel operations (depthwise convolution, batch
norm, ReLU6: each output channel a function of one input channel) followed
by a 1x1 convolution. Write the head as :math:`h(A) = g(L(A))`, with
:math:`L = M \circ P` the largest front where :math:`P` acts on each channel
separately (:math:`P(A)_c = p_c(A_c)`) and :math:`M` is affine, and
:math:`g` the rest. Masking a channel sets it to zero, so
:math:`P(A \odot \mathbb 1_S)_c` is :math:`p_c(A_c)` for :math:`c \in S` and
:math:`p_c(0)` otherwise, and since :math:`M` is affine,

.. math::  L(A \odot \mathbb 1_S) = L(0) + \sum_{k \in S} \big(L(A \odot e_k) - L(0)\big) = L(0) + \sum_{k\in S} d_k ,

so once the ``K`` channel contributions :math:`d_k` are known, the value of any
coalition costs one sum and one evaluation of :math:`g`, and the nested
coalitions of a permutation cost one cumulative sum
(:func:`liftcam_jax.shap.permutation_shapley`). The identity is exact: the
values differ from evaluating the head on masked maps only by float rounding.

:func:`affine_front` finds the split on the function's jaxpr, the way
``jax.linear_transpose`` reads one: calls (``jit``, ``closed_call``) are
inlined. A value is *per-channel* when its last axis is the input's channel
axis, whole and in order, and its channel ``c`` depends on the input's
channel ``c`` alone: the input itself, and the outputs of an equation whose
input-dependent operands are all per-channel and which keeps channels apart
(elementwise primitives and elementwise ``custom_jvp`` functions such as
``relu6``, depthwise ``conv_general_dilated``, ``pad``/``slice``/``squeeze``
and reductions that leave the last axis alone). A value is *additive* when it
is per-channel, or the output of an equation linear in its input-dependent
operands (:func:`liftcam_jax.equations.classify`: ``add``,
``conv_general_dilated`` with a constant kernel, ``mul`` by a constant, ...),
all of them additive. Anything else (``max`` of channel-mixed values, a
product of two mixed activations) ends the front, and the additive values it
reads form the *frontier*, :math:`L`'s outputs. The split is always correct;
it saves work only when the frontier is not ``A`` itself
(:attr:`AffineFront.saves`).
"""
from __future__ import annotations

from typing import Any, Callable, List, NamedTuple

import jax
import numpy as np
from jax.extend import core as jcore

from . import equations as E
from . import interpreter as I
from . import primitives as P

__all__ = ["AffineFront", "affine_front"]

_INLINE = P.names(inline=True)


class AffineFront(NamedTuple):
    """``h(params, a) = rest(params, front(params, a))`` with ``front`` additive over ``a``'s channels.

    ``front(params, a)`` returns the frontier, a list of arrays;
    ``rest(params, frontier)`` the function's outputs (a list). ``saves``:
    whether the frontier is more than ``a`` itself (the head starts with at
    least one per-channel or affine equation whose output every later
    nonlinearity reads).
    """

    front: Callable
    rest: Callable
    saves: bool
    frontier_size: int  # elements in the frontier


def _flat(closed):
    """The jaxpr with its calls inlined (one level of equations)."""

    def run(jaxpr, consts, *args):
        env = {}

        def read(v):
            return v.val if isinstance(v, jcore.Literal) else env[v]

        env.update(zip(jaxpr.constvars, consts))
        env.update(zip(jaxpr.invars, args))
        for eqn in jaxpr.eqns:
            ins = [read(v) for v in eqn.invars]
            sub = P.sub_jaxpr(eqn.params) if eqn.primitive.name in _INLINE else None
            outs = run(sub[0], sub[1], *ins[len(ins) - len(sub[0].invars):]) if sub else E.bind(eqn, ins)
            for v, o in zip(eqn.outvars, outs):
                if not isinstance(v, jcore.DropVar):
                    env[v] = o
        return [read(v) for v in jaxpr.outvars]

    args = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in closed.jaxpr.invars]
    return jax.make_jaxpr(lambda *a: run(closed.jaxpr, closed.consts, *a))(*args)


def _evaluate(jaxpr, consts, bound: dict, outvars) -> list:
    """Evaluate what ``outvars`` need, starting from the values in ``bound`` (var -> value)."""
    env = dict(zip(jaxpr.constvars, consts))
    env.update(bound)
    eqns, _ = I.live_equations(jaxpr.replace(outvars=list(outvars)), known=env)
    for eqn in eqns:
        outs = E.bind(eqn, [E.read_env(env, v) for v in eqn.invars])
        env.update((v, o) for v, o in zip(eqn.outvars, outs) if not isinstance(v, jcore.DropVar))
    return [E.read_env(env, v) for v in outvars]


# Primitives that act position by position (shapes broadcast only over size-1 axes).
_ELEMENTWISE = P.names(positionwise=True) | P.names(kind="custom_jvp")
_REDUCTIONS = P.names(reduces="axes")
_WINDOWS = P.names(reduces="window")


def _keeps_channels(eqn, dep_idx, k: int) -> bool:
    """Whether ``eqn`` maps per-channel operands (last axis = the ``k`` channels) to per-channel outputs."""
    ins = [v.aval for v in eqn.invars]
    outs = [v.aval for v in eqn.outvars]
    if not outs or any(len(o.shape) == 0 or o.shape[-1] != k for o in outs):
        return False
    last = len(ins[dep_idx[0]].shape) - 1
    name = eqn.primitive.name
    prm = lambda key: P.param(eqn, key)  # noqa: E731
    if name in _ELEMENTWISE:
        if P.facts(name).kind == "custom_jvp":
            sub = P.sub_jaxpr(eqn)
            if sub is None or not E.body_is_elementwise(sub[0]):
                return False
        return all(len(ins[i].shape) == len(outs[0].shape) for i in dep_idx)
    if len(dep_idx) != 1 or dep_idx[0] != 0:
        return False
    if name == "pad":
        return tuple(prm("padding_config")[last]) == (0, 0, 0)
    if name == "slice":
        strides = prm("strides")
        return prm("start_indices")[last] == 0 and prm("limit_indices")[last] == k and (
            strides is None or strides[last] == 1)
    if name in ("squeeze", "rev"):
        return last not in prm("dimensions")
    if name == "transpose":
        return prm("permutation")[-1] == last
    if name in _REDUCTIONS:
        return last not in prm("axes")
    if name in _WINDOWS:
        return (prm("window_dimensions")[last] == 1 and prm("window_strides")[last] == 1
                and tuple(prm("padding")[last]) == (0, 0) and prm("base_dilation")[last] == 1
                and prm("window_dilation")[last] == 1)
    if name == "conv_general_dilated":  # depthwise: one input channel per output channel, in order
        lhs, _, out = prm("dimension_numbers")
        return (lhs[1] == last and out[1] == len(outs[0].shape) - 1 and prm("batch_group_count") == 1
                and prm("feature_group_count") == k == ins[0].shape[-1])
    return False


def _frontier(jaxpr, x_var, per_channel: bool) -> list:
    """The additive values read beyond the front (see the module docstring), in order of first use."""
    k = x_var.aval.shape[-1] if x_var.aval.shape else -1
    dep, additive, aligned = {x_var}, {x_var}, ({x_var} if per_channel else set())
    frontier: List[Any] = []

    def to_frontier(v):
        if v in additive and v not in frontier:
            frontier.append(v)

    for eqn in jaxpr.eqns:
        dep_idx = [i for i, v in enumerate(eqn.invars) if not isinstance(v, jcore.Literal) and v in dep]
        if not dep_idx:
            continue
        outs = [v for v in eqn.outvars if not isinstance(v, jcore.DropVar)]
        dep.update(outs)
        if all(eqn.invars[i] in aligned for i in dep_idx) and _keeps_channels(eqn, dep_idx, k):
            aligned.update(outs)
            additive.update(outs)
            continue
        try:
            linear = E.classify(eqn, [v.aval for v in eqn.invars], dep_idx) == "linear"
        except Exception:  # noqa: BLE001 - no linear rule: the front ends here
            linear = False
        floats = all(np.issubdtype(v.aval.dtype, np.inexact) for v in outs)  # a cast to int is not affine
        if linear and floats and all(eqn.invars[i] in additive for i in dep_idx):
            additive.update(outs)
        else:
            for i in dep_idx:
                to_frontier(eqn.invars[i])
    for v in jaxpr.outvars:
        if not isinstance(v, jcore.Literal):
            to_frontier(v)
    return frontier


def affine_front(fn: Callable, params, a) -> AffineFront:
    """The additive front of ``fn(params, a)`` in ``a`` (arrays or ``jax.ShapeDtypeStruct`` of them).

    The front is per-channel operations followed by affine ones (module
    docstring); where a per-channel value that is not a float (a comparison's
    mask, an integer cast) would be on the frontier, the front is affine
    operations only. The returned functions take ``params`` with the structure
    given here and ``a`` (or the frontier) of the shapes given here; they jit
    and vmap.
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    closed = _flat(jax.make_jaxpr(lambda ps, x: fn(jax.tree_util.tree_unflatten(treedef, ps), x))(leaves, a))
    jaxpr, consts = closed.jaxpr, closed.consts
    x_var = jaxpr.invars[-1]
    param_vars = jaxpr.invars[:-1]
    frontier = _frontier(jaxpr, x_var, per_channel=True)
    if not all(np.issubdtype(v.aval.dtype, np.inexact) for v in frontier):  # d_k needs differences
        frontier = _frontier(jaxpr, x_var, per_channel=False)

    def front(params, x):
        ps = jax.tree_util.tree_leaves(params)
        return _evaluate(jaxpr, consts, {**dict(zip(param_vars, ps)), x_var: x}, frontier)

    def rest(params, values):
        ps = jax.tree_util.tree_leaves(params)
        return _evaluate(jaxpr, consts, {**dict(zip(param_vars, ps)), **dict(zip(frontier, values))}, jaxpr.outvars)

    size = int(sum(np.prod(v.aval.shape, dtype=np.int64) for v in frontier))
    return AffineFront(front, rest, frontier != [x_var], size)
