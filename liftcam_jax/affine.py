r"""The affine front of a function: where a head stops being affine in its input.

Most heads begin with affine layers: a split after a ReLU6 hands the head
convolutions and inference-mode batch norms before its next nonlinearity.
Write the head as :math:`h(A) = g(L(A))`, with :math:`L` the largest affine
front (every equation from ``A`` up to the first nonlinearity) and :math:`g`
the rest. Since :math:`L` is affine,

.. math::  L(A \odot \mathbb 1_S) = L(0) + \sum_{k \in S} \big(L(A \odot e_k) - L(0)\big) = L(0) + \sum_{k\in S} d_k ,

so once the ``K`` channel contributions :math:`d_k` are known, the value of any
coalition costs one sum and one evaluation of :math:`g`, and the nested
coalitions of a permutation cost one cumulative sum
(:func:`liftcam_jax.shap.permutation_shapley`). The identity is exact: the
values differ from evaluating the head on masked maps only by float rounding.

:func:`affine_front` finds the split on the function's jaxpr, the way
``jax.linear_transpose`` reads one: calls (``jit``, ``closed_call``) are
inlined; an equation whose input-dependent operands are all in the front and
whose primitive is linear in them (:func:`liftcam_jax.interpreter.classify`:
``add``, ``conv_general_dilated`` with a constant kernel, ``mul`` by a
constant, ...) joins the front; anything else (``max``, ``custom_jvp_call``
of ``relu6``, a product of two activations) does not, and the front's values
it reads form the *frontier*, :math:`L`'s outputs. The split is always
correct; it saves work only when the frontier is not ``A`` itself
(:attr:`AffineFront.saves`).
"""
from __future__ import annotations

from typing import Any, Callable, List, NamedTuple

import jax
import numpy as np
from jax.extend import core as jcore

from . import interpreter as I

__all__ = ["AffineFront", "affine_front"]

_INLINE = frozenset({"jit", "pjit", "closed_call", "core_call"})


class AffineFront(NamedTuple):
    """``h(params, a) = rest(params, front(params, a))`` with ``front`` affine in ``a``.

    ``front(params, a)`` returns the frontier, a list of arrays;
    ``rest(params, frontier)`` the function's outputs (a list). ``saves``:
    whether the frontier is more than ``a`` itself (the head starts with at
    least one affine equation whose output every nonlinearity reads).
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
            sub = I.sub_jaxpr(eqn.params) if eqn.primitive.name in _INLINE else None
            outs = run(sub[0], sub[1], *ins[len(ins) - len(sub[0].invars):]) if sub else I.bind(eqn, ins)
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
    need = {v for v in outvars if not isinstance(v, jcore.Literal) and v not in env}
    eqns = []
    for eqn in reversed(jaxpr.eqns):
        if any(v in need for v in eqn.outvars if not isinstance(v, jcore.DropVar)):
            eqns.append(eqn)
            need.update(v for v in eqn.invars if not isinstance(v, jcore.Literal) and v not in env)
    for eqn in reversed(eqns):
        outs = I.bind(eqn, [v.val if isinstance(v, jcore.Literal) else env[v] for v in eqn.invars])
        env.update((v, o) for v, o in zip(eqn.outvars, outs) if not isinstance(v, jcore.DropVar))
    return [v.val if isinstance(v, jcore.Literal) else env[v] for v in outvars]


def affine_front(fn: Callable, params, a) -> AffineFront:
    """The affine front of ``fn(params, a)`` in ``a`` (arrays or ``jax.ShapeDtypeStruct`` of them).

    The returned functions take ``params`` with the structure given here and
    ``a`` (or the frontier) of the shapes given here; they jit and vmap.
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    closed = _flat(jax.make_jaxpr(lambda ps, x: fn(jax.tree_util.tree_unflatten(treedef, ps), x))(leaves, a))
    jaxpr, consts = closed.jaxpr, closed.consts
    x_var = jaxpr.invars[-1]
    param_vars = jaxpr.invars[:-1]

    dep, affine = {x_var}, {x_var}
    frontier: List[Any] = []

    def to_frontier(v):
        if v in affine and v not in frontier:
            frontier.append(v)

    for eqn in jaxpr.eqns:
        dep_idx = [i for i, v in enumerate(eqn.invars) if not isinstance(v, jcore.Literal) and v in dep]
        if not dep_idx:
            continue
        outs = [v for v in eqn.outvars if not isinstance(v, jcore.DropVar)]
        dep.update(outs)
        try:
            linear = I.classify(eqn, [v.aval for v in eqn.invars], dep_idx) == "linear"
        except Exception:  # noqa: BLE001 - no linear rule: the front ends here
            linear = False
        floats = all(np.issubdtype(v.aval.dtype, np.inexact) for v in outs)  # a cast to int is not affine
        if linear and floats and all(eqn.invars[i] in affine for i in dep_idx):
            affine.update(outs)
        else:
            for i in dep_idx:
                to_frontier(eqn.invars[i])
    for v in jaxpr.outvars:
        if not isinstance(v, jcore.Literal):
            to_frontier(v)

    def front(params, x):
        ps = jax.tree_util.tree_leaves(params)
        return _evaluate(jaxpr, consts, {**dict(zip(param_vars, ps)), x_var: x}, frontier)

    def rest(params, values):
        ps = jax.tree_util.tree_leaves(params)
        return _evaluate(jaxpr, consts, {**dict(zip(param_vars, ps)), **dict(zip(frontier, values))}, jaxpr.outvars)

    size = int(sum(np.prod(v.aval.shape, dtype=np.int64) for v in frontier))
    return AffineFront(front, rest, frontier != [x_var], size)
