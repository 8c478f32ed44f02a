r"""The equations of a jaxpr as the attribution rules see them: evaluate one, classify it.

:func:`classify` gives the *kind* of rule an equation with input-dependent
operands needs (:data:`RULE_KINDS`), from the facts of
:data:`liftcam_jax.primitives.TABLE`, with its operand positions checked;
every rule table defines one rule per kind (:class:`liftcam_jax.interpreter.RuleTable`).
:func:`bind` evaluates one equation, :func:`eqn_fn` makes it a function of
its input-dependent operands only, and :func:`read_env` reads an operand from
an evaluator's environment.

These helpers are shared by the interpreter (:mod:`liftcam_jax.interpreter`),
the pre-pass that plans a jaxpr (:mod:`liftcam_jax.patterns`), the rules
(:mod:`liftcam_jax.rescale`, :mod:`liftcam_jax.lrp`) and the affine front of
a head (:mod:`liftcam_jax.affine`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from . import primitives as P
from .primitives import sub_jaxpr

__all__ = [
    "RULE_KINDS",
    "body_args",
    "body_is_elementwise",
    "bind",
    "classify",
    "eqn_fn",
    "is_elementwise_call",
    "is_float",
    "is_known",
    "primitive_name",
    "read_env",
]

RULE_KINDS = ("linear", "elementwise", "chooser", "product", "call", "custom_jvp")
"""The kinds of :data:`liftcam_jax.primitives.TABLE` each rule table defines a rule for."""


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
    """Whether ``x`` (an array or abstract value) has a floating-point or complex dtype."""
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


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


def read_env(env, v):
    """The value of ``v`` (a Var or Literal) in ``env``; zeros of its type for a dead operand.

    :func:`~liftcam_jax.interpreter.live_equations` drops the producers of a call's operands that the
    call's body never reads; the call still takes a value for them.
    """
    if isinstance(v, jcore.Literal):
        return v.val
    if v in env:
        return env[v]
    return jnp.zeros(v.aval.shape, v.aval.dtype)


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
