r"""DeepLIFT rules for what transformer heads contain: products, quotients, softmax's shift.

The values of DeepLIFT's interpreter (:mod:`liftcam_jax.rescale`) are pairs
``(actual, reference)`` (:class:`Pair`); a rule returns the output pairs and a
*linear* map of the operands' differences whose value at the true differences
is the output's difference (summation-to-delta). This module holds that pair
algebra, the secant slope every elementwise rule uses, and the rules for two
input-dependent operands; :mod:`liftcam_jax.patterns` finds the patterns
(elementwise regions, max-shifts, a softmax at the head's output) on the jaxpr.

**Products of two input-dependent values** (``mul``, ``dot_general`` of queries
and keys or of attention weights and values, ``conv_general_dilated`` of two
activations; :data:`liftcam_jax.primitives.Facts.product` ``"bilinear"``).
The difference of :math:`f(a, b)` between the input and the reference
:math:`(a', b')` is split between the two operands by their two-player Shapley
values,

.. math::
    f(a, b) - f(a', b') = \tfrac12\big[f(a, b') - f(a', b') + f(a, b) - f(a', b)\big]
                        + \tfrac12\big[f(a', b) - f(a', b') + f(a, b) - f(a, b')\big],

which for a bilinear :math:`f` is the linear map of :math:`(\Delta a, \Delta b)`

.. math::  \Delta f = f(\Delta a, \bar b) + f(\bar a, \Delta b), \qquad
           \bar a = \tfrac{a + a'}{2},\ \bar b = \tfrac{b + b'}{2},

exact (expand :math:`f(a, b) - f(a', b')` by bilinearity), symmetric in the two
operands, and :math:`f`'s own linearisation at the midpoint
(``jax.linearize`` of the primitive at :math:`(\bar a, \bar b)`), so any
bilinear primitive and any broadcasting it does is handled by JAX. Why this
split: DeepLIFT's rescale rule is defined for functions of one input; the
Shapley split is the unique symmetric, exact one for two, and with a constant
factor it reduces to the linear rule. This is the rule the README's
``product_rule`` example registers; a rule registered with
:func:`liftcam_jax.rescale.register_rule` still takes precedence.

**Quotients** (``div`` with an input-dependent denominator):
:math:`a / b = a \cdot c` with :math:`c = 1/b`, the product above composed
with the reciprocal's secant, which is exact and closed-form,

.. math::  \frac{1/b - 1/b'}{b - b'} = -\frac{1}{b\,b'}, \qquad
           \Delta\frac{a}{b} = \bar c\,\Delta a - \frac{\bar a}{b\,b'}\,\Delta b,
           \quad \bar c = \tfrac12\big(\tfrac1b + \tfrac1{b'}\big),

defined wherever :math:`b, b' \ne 0` (also at :math:`b = b'`: no fallback
needed, and differentiable). These are the exact Shapley values of the two
operands, but they can be large and cancel: with a denominator far smaller at
the reference (a softmax whose reference logits are 20 below the input's),
:math:`a / b'` is huge, and float32 loses the difference. So where all four
of :math:`a, a', b, b'` are positive (softmax's normalisation, a norm's
``x / sqrt(...)`` of a positive ``x``), the quotient is taken as
:math:`\exp(\log a - \log b)` through DeepLIFT's own rules: log's secants
:math:`s_a = \frac{\log a - \log a'}{a - a'}` and :math:`s_b`, the linear
difference, and exp's secant :math:`s_q = \frac{q - q'}{\log q - \log q'}`,

.. math::  \Delta\frac{a}{b} = s_q\,(s_a\,\Delta a - s_b\,\Delta b),

as exact (a composition of secants), with terms of the size of the result's
difference: through :math:`a = e^{x}`, :math:`s_a\,\Delta a = \Delta x`.
Elements of other signs take the product form; the choice is per element, so
the map stays linear and exact. With only the denominator input-dependent,
:math:`c / b` is an elementwise function of one value (its secant). A softmax
inside the head, :math:`e_i / \sum_j e_j` with :math:`e = \exp(x - s)`, is then
exp's secant, a linear sum and this quotient rule: exact. Its attributions do
not depend on a shift :math:`s` shared by the input and the reference
(:func:`liftcam_jax.patterns.plan`, :func:`shift`): :math:`e \to k e`
scales :math:`\Delta a, \bar a, b, b'` by :math:`k = e^{-s}` and leaves both
terms unchanged (in the log form below, :math:`\log k` cancels in
:math:`\log a - \log b` and in the log secants' differences); so ``jax.nn.softmax`` and ``exp(x) / exp(x).sum()`` have the
same attributions. Likewise :math:`\log \sum_j e^{x_j - s} + s`
(``jax.nn.logsumexp``): log's secant scales by :math:`1/k`.

**Max-shifts** (:func:`shift`): the one shared value is the larger of the two
maxima, :math:`s = \max(m, m')`, so that :math:`e^{x - s} \le 1` at both
points (no overflow).

**LayerNorm and RMSNorm.** The mean is linear, the variance a square (one
input) and a sum, ``rsqrt`` an elementwise function of one value; what remains
is the product :math:`u\,s` of the centred input :math:`u = x - \mu` and the
*normaliser* :math:`s = \mathrm{rsqrt}(\sigma^2 + \epsilon)\,\gamma`, a function
of one statistic per row (found on the jaxpr: :func:`liftcam_jax.patterns.plan`,
``"normalised"``). The two factors are not independent players: :math:`s` is
a function of :math:`u`. Their Shapley split would go through the state
:math:`(u, s')`, the input's centred values under the reference's normaliser,
which the normalisation cannot produce. Where the reference row is constant
(zero tokens, the default reference; zero biases) :math:`\sigma'^2 = 0` and
:math:`s' = \gamma/\sqrt\epsilon = 10^3\gamma` for :math:`\epsilon = 10^{-6}`,
so the two Shapley terms :math:`\tfrac12 u (s + s')` and
:math:`\tfrac12 u (s - s')` are each about :math:`1/(2\sqrt\epsilon)` times the
result and cancel: coefficients that scale as :math:`1/\sqrt\epsilon`, and each
such LayerNorm multiplies the rounding error by as much (measured before this
rule: summation-to-delta 1.8e-2 relative in float64 through six LayerNorms).
So the normaliser moves first (:func:`normaliser_rule`),

.. math::  \Delta(u\,s) = s\,\Delta u + u'\,\Delta s,

the ordering of the two-player game in which :math:`s` changes while :math:`u`
is at the reference: exact for every reference, and continuous in it. Where
the reference row is constant, :math:`u' = 0`, and the whole difference goes
to :math:`u` with the normaliser held at the input's value: LayerNorm's rule
in Ali et al. (ICML 2022, "XAI for Transformers: better explanations through
conservative propagation") and in AttnLRP (Achtibat et al., ICML 2024), which
take the normaliser as a constant. Its terms are of the size of the output's
whenever the reference row varies less than the input's (:math:`s \le s'`
gives :math:`|u' s| \le |u' s'|`). A hand-written
``(x - mu) / jnp.sqrt(var + eps)`` takes the same ordering,
:math:`\Delta(u/s) = \Delta u / s - u' \Delta s / (s\,s')`. A softmax's
division by its own sum is not a normaliser (no square root): the quotient
rule above. **GELU, SiLU** and
any elementwise function of one value however it is written are one secant as a
whole (elementwise regions, :func:`liftcam_jax.patterns.plan`;
:func:`secant` here).

Every slope here is a differentiable value (no ``stop_gradient``); a division by
a difference is guarded by a double ``jnp.where`` so that the branch not taken
has no NaN gradient (``tests/test_rescale_transformer.py`` checks ``jax.grad``
against finite differences).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from . import equations, primitives

__all__ = ["Pair", "Zeros", "ref", "secant", "product_rule", "normaliser_rule", "shift"]


class Pair(NamedTuple):
    """An input-dependent value at the actual and at the reference input."""

    val: Any
    ref: Any  # an array, or a Zeros while the reference value is known to be zero


class Zeros(NamedTuple):
    """A reference value known to be all zeros, not materialised.

    The default reference of LIFT-CAM and DeepLIFT is zero. Through the head's
    first linear layers (``dot_general``, ``conv_general_dilated``, reshapes,
    max-pooling, ...) its value stays zero, so the reference pass skips them: on
    VGG16 that saves reading fc6's 25088 x 4096 weights a second time.
    """

    shape: tuple
    dtype: Any


def ref(u: Pair):
    """The reference value of ``u`` as an array (zeros materialised on demand)."""
    if isinstance(u.ref, Zeros):
        # The barrier keeps XLA from constant-folding the reference pass when a
        # caller closes over the parameters (slow to compile, nothing gained).
        return jax.lax.optimization_barrier(jnp.zeros(u.ref.shape, u.ref.dtype))
    return u.ref


def where_small(du, eps):
    return jnp.abs(du) < eps


def secant(g, u: Pair, eps):
    r"""Secant slope of an elementwise ``g`` between ``u.val`` and ``u.ref``, differentiable.

    .. math::  s = \frac{g(u) - g(u_{ref})}{u - u_{ref}}, \qquad
               s = g'\big(\tfrac{u + u_{ref}}{2}\big) \text{ where } |u - u_{ref}| < \varepsilon.

    The midpoint derivative has the secant's value up to
    :math:`O(\Delta^2)` and its derivative, :math:`\partial s/\partial u =
    g''/2` per side, so ``jax.grad`` of an explanation is the derivative of
    the explanation (no ``stop_gradient``). The division is guarded by a
    second ``where`` so that the branch not taken has no NaN gradient.
    """
    u_ref = ref(u)
    val, r = g(u.val), g(u_ref)
    du = u.val - u_ref
    small = where_small(du, eps)
    mid = (u.val + u_ref) / 2
    _, deriv = jax.jvp(g, (mid,), (jnp.ones_like(mid),))
    slope = jnp.where(small, deriv, (val - r) / jnp.where(small, 1.0, du))
    return val, r, slope


def _bilinear(eqn, ins, dep_idx):
    f = equations.eqn_fn(eqn, ins, dep_idx)
    a, b = (ins[i] for i in dep_idx)
    vals = f(a.val, b.val)
    if isinstance(a.ref, Zeros) and isinstance(b.ref, Zeros):
        refs = [Zeros(tuple(v.aval.shape), v.aval.dtype) for v in eqn.outvars]  # f(0, 0) = 0
    else:
        refs = f(ref(a), ref(b))
    # f(da, b_mid) + f(a_mid, db): f's linearisation at the midpoint
    _, lin = jax.linearize(f, (a.val + ref(a)) / 2, (b.val + ref(b)) / 2)
    return [Pair(v, r) for v, r in zip(vals, refs)], lambda da, db: list(lin(da, db))


def _quotient(eqn, ins, dep_idx, eps):
    a, b = ins[0], ins[1]
    a_r, b_r = ref(a), ref(b)
    (out,) = equations.bind(eqn, [a.val, b.val])
    (out_r,) = equations.bind(eqn, [a_r, b_r])
    shape = tuple(eqn.outvars[0].aval.shape)
    # a * (1 / b): the product split composed with the reciprocal's exact secant
    c_mid = (1 / b.val + 1 / b_r) / 2
    a_mid = (a.val + a_r) / 2
    recip_slope = -1 / (b.val * b_r)
    # positive operands: exp(log a - log b), log's and exp's secants (the same sum, well conditioned)
    positive = (a.val > 0) & (a_r > 0) & (b.val > 0) & (b_r > 0)
    one = lambda u: jnp.where(positive, u, 1.0)  # noqa: E731  (no NaN in the branch not taken)
    _, _, log_a = secant(jnp.log, Pair(one(a.val), one(a_r)), eps)
    _, _, log_b = secant(jnp.log, Pair(one(b.val), one(b_r)), eps)
    q, q_r = one(a.val) / one(b.val), one(a_r) / one(b_r)
    _, _, exp_q = secant(jnp.exp, Pair(jnp.log(q), jnp.log(q_r)), eps)
    coef_a = jnp.where(positive, exp_q * log_a, c_mid)
    coef_b = jnp.where(positive, -exp_q * log_b, a_mid * recip_slope)

    def tangent(da, db):
        return [jnp.broadcast_to(coef_a * da + coef_b * db, shape)]

    return [Pair(out, out_r)], tangent


def product_rule(eqn, ins, dep_idx, ctx):
    r"""The rule of a product or quotient of two input-dependent values (module docstring)."""
    ctx.nonlinear.append(primitives.label(eqn))
    if primitives.facts(eqn.primitive.name).product == "quotient":
        return _quotient(eqn, ins, dep_idx, ctx.eps)
    return _bilinear(eqn, ins, dep_idx)


def normaliser_rule(eqn, ins, dep_idx, ctx, index):
    r"""The rule of a normalisation, :math:`u \cdot s` or :math:`u / s` with ``s`` (operand ``index``) the normaliser.

    The normaliser's ordering of the two-player game (module docstring, "LayerNorm and RMSNorm"):

    .. math::  \Delta(u s) = s\,\Delta u + u'\,\Delta s, \qquad
               \Delta\frac{u}{s} = \frac{\Delta u}{s} - \frac{u'}{s\,s'}\,\Delta s,

    the product's linearisation at :math:`(u', s)` (``jax.linearize``, so any broadcasting is
    JAX's), and the reciprocal's exact secant for the quotient.
    """
    ctx.nonlinear.append(primitives.label(eqn))
    k = index  # both operands are input-dependent: dep_idx == [0, 1]
    pairs = [ins[i] for i in dep_idx]
    u, s = pairs[1 - k], pairs[k]
    if primitives.facts(eqn.primitive.name).product == "quotient":
        (out,) = equations.bind(eqn, [u.val, s.val])
        u_r, s_r = ref(u), ref(s)
        (out_r,) = equations.bind(eqn, [u_r, s_r])
        shape = tuple(eqn.outvars[0].aval.shape)
        coef_u, coef_s = 1 / s.val, -u_r / (s.val * s_r)
        return [Pair(out, out_r)], lambda du, ds: [jnp.broadcast_to(coef_u * du + coef_s * ds, shape)]
    f = equations.eqn_fn(eqn, ins, dep_idx)
    point = [None, None]
    point[k], point[1 - k] = s.val, ref(u)
    vals = f(*(p.val for p in pairs))
    if isinstance(u.ref, Zeros):
        refs = [Zeros(tuple(v.aval.shape), v.aval.dtype) for v in eqn.outvars]  # 0 * s' = 0
    else:
        refs = f(*(ref(p) for p in pairs))
    _, lin = jax.linearize(f, *point)
    return [Pair(v, r) for v, r in zip(vals, refs)], lambda *d: list(lin(*d))


def shift(u: Pair):
    r"""The one value of a max-shift at the input and the reference: :math:`\max(m, m')`."""
    return jnp.maximum(u.val, ref(u))
