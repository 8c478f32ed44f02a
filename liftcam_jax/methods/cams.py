r"""The gradient-based CAM family, and Eigen-CAM, as pytorch-grad-cam 1.5.7 defines them.

Notation: ``A`` are the activations ``(B, h, w, K)`` at the split,
``y^c = head(A)_c`` the logit of the explained class (each image its own
``c``), and

.. math::  g_{ijk} = \frac{\partial y^c}{\partial A_{ijk}}

the gradients of the target logit, computed by :func:`target_gradients`: ONE
``jax.vjp`` of the head per batch, with a one-hot cotangent per image (the
head treats images independently, so image ``b``'s cotangent only reaches
image ``b``'s activations). Every method returns channel weights ``w_k`` (or
per-position weights ``w_{ijk}``); the shared assembly
(:func:`liftcam_jax.explanation.assemble`) makes the map
``normalize(upsample(ReLU(sum_k w_k A^k)))``.

pytorch-grad-cam normalises the rectified map (min-max, ``+1e-7`` in the
denominator), resizes it with ``cv2.resize`` (bilinear, half-pixel centres),
then min-max normalises again. Min-max is an affine map per image and bilinear
resizing is linear and preserves constants, so both give the same map as
``normalize(upsample(ReLU(.)))`` up to the ``1e-7`` guards; the library does
not reproduce the double normalisation.

Methods (registry names): ``cam``, ``grad-cam``, ``grad-cam++``,
``xgrad-cam``, ``layer-cam``, ``hires-cam``, ``eigen-cam``.

Token activations ``(B, N, D)`` (:mod:`liftcam_jax.tokens`): every method
here but CAM sees the grid tokens, ``A`` and ``g`` reshaped to
``(B, h, w, D)`` with the prefix tokens dropped from both (the head still
reads the prefix tokens, at their values): pytorch-grad-cam with its
``reshape_transform``. CAM sees the tokens, to check the head: it must pool
the grid tokens (a head that reads only the class token has no CAM).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .. import primitives, rescale, tokens as _tokens
from ..errors import UsageError, positive_int
from ..explanation import Attribution
from .registry import register

SPATIAL = (1, 2)



def target_gradients(head, params, activations, targets):
    r"""``(g, logits)``: :math:`g_{bijk} = \partial y_b^{t_b} / \partial A_{bijk}` for every image.

    One ``jax.vjp`` of ``head(params, .)`` at ``activations`` with the
    cotangent ``one_hot(targets)`` (``(B, C)``): each image gets the gradient
    of its own target logit (the rows of the head's output are independent).
    """
    logits, vjp = jax.vjp(lambda a: head(params, a), activations)
    ct = jax.nn.one_hot(targets, logits.shape[-1], dtype=logits.dtype)
    (grads,) = vjp(ct)
    return grads, logits


def _spatial_sum(a, keepdims=False):
    return jnp.sum(a, axis=SPATIAL, keepdims=keepdims)


# ---------------------------------------------------------------------------
# CAM
# ---------------------------------------------------------------------------

def _probe_params(params):
    """Random positive parameters shaped like ``params`` (concrete, for a structural check).

    Drawn with numpy: ``jax.random`` would compile one program per distinct
    leaf shape (a whole model's parameters: tens of seconds).
    """
    rng = np.random.default_rng(20160627)

    def draw(leaf):
        shape, dtype = jnp.shape(leaf), jnp.result_type(leaf)
        if jnp.issubdtype(dtype, jnp.inexact):
            return rng.uniform(0.5, 1.5, shape).astype(dtype)
        return np.ones(shape, dtype)

    return jax.tree_util.tree_map(draw, params)


def check_cam_head(head, params, activations, *, rtol: float = 1e-4, tokens=None) -> None:
    r"""Raise :class:`UsageError` unless ``head`` is global average pooling + a linear layer.

    CAM is defined for ``y_c = \sum_k w_{ck} \frac{1}{hw}\sum_{ij} A_{ijk} + b_c``,
    i.e. heads that are (1) affine in ``A`` and (2) read ``A`` only through its
    spatial means. Both are decided at trace time, for the head's structure
    (not for particular parameter values, which are tracers under ``jit``):

    1. :func:`liftcam_jax.rescale.nonlinear_primitives` of the head at ``A``
       must be empty (the head applies no ReLU, max-pooling, ...).
    2. An affine head's gradient does not depend on ``A``; it is spatially
       uniform for every parameter value exactly when the head pools
       globally. The head's gradient (for a random cotangent over the
       classes) is evaluated once, eagerly at trace time, with random positive
       parameters of the same shapes at random activations of the same shape;
       it must be constant over ``(i, j)`` up to ``rtol`` of its largest
       entry. A flatten + Linear head (position-dependent weights) fails
       this for generic parameters; GAP + Linear passes for any parameters.

    For token activations (``tokens``, a :class:`~liftcam_jax.tokens.TokenLayout`)
    the gradient must be uniform over the grid tokens and not zero there (a
    head that pools the grid tokens; the prefix tokens may be pooled too, or
    not). A head that reads only the class token is refused.
    """
    try:
        nonlinear = rescale.nonlinear_primitives(lambda a: head(params, a), activations)
    except rescale.NoRescaleRule as e:
        nonlinear = (str(e),)
    if nonlinear:
        raise UsageError(
            "CAM needs a head that is global average pooling + a linear layer; this head applies "
            f"{', '.join(dict.fromkeys(nonlinear))} after the split (use grad-cam, CAM's "
            "generalisation, or split the model right before the global pooling)"
        )
    shape = (1,) + tuple(activations.shape[1:])
    dtype = jnp.result_type(activations)
    with jax.ensure_compile_time_eval():
        probe = _probe_params(params)
        rng = np.random.default_rng(2016)
        a = rng.uniform(0.0, 1.0, shape).astype(dtype)
        out, vjp = jax.vjp(lambda z: head(probe, z), a)
        (g,) = vjp(rng.standard_normal(out.shape).astype(out.dtype))
        g = np.asarray(g)
    if tokens is not None:
        g = np.asarray(_tokens.to_grid(g, tokens))
        if not np.any(g):
            raise UsageError(
                "CAM needs a head that pools the grid tokens; this head reads none of them (e.g. only the class "
                "token), so it has no class weights w_ck (use grad-cam at an earlier block, or lift-cam)"
            )
    spread = np.max(np.abs(g - g.mean(axis=SPATIAL, keepdims=True)))
    scale = np.max(np.abs(g))
    if not np.isfinite(spread) or spread > rtol * scale:
        raise UsageError(
            "CAM needs a head that is global average pooling + a linear layer; this head is affine "
            "but weights the positions of each activation map differently (e.g. flatten + linear), "
            "so it has no class weights w_ck (use grad-cam or hires-cam)"
        )


@register("cam", tokens="all", summary="CAM: the linear layer's class weights after global average pooling (Zhou et al., CVPR 2016)")
def cam(split, params, x, activations, targets, logits, *, key=None):
    r"""CAM (Zhou, Khosla, Lapedriza, Oliva & Torralba, "Learning Deep Features
    for Discriminative Localization", CVPR 2016).

    For a head ``y_c = \sum_k w_{ck} \mathrm{GAP}(A^k) + b_c`` the map is
    :math:`\mathrm{ReLU}(\sum_k w_{ck} A^k)`. The class weights are read off
    the gradient, which for such a head is spatially uniform:

    .. math::  w_{ck} = h\,w\,\frac{\partial y_c}{\partial A_{ijk}}
               = \sum_{ij} \frac{\partial y_c}{\partial A_{ijk}}.

    Any other head is a :class:`~liftcam_jax.errors.UsageError`; see
    :func:`check_cam_head` for how that is decided. For tokens the weights sum
    the gradient over the grid tokens (a head pooling all tokens gives
    weights ``w_ck hw / N``, the same map).
    """
    del logits, key
    layout = _tokens.resolve(activations, x.shape[1:3], split.tokens)
    check_cam_head(split.head, params, activations, tokens=layout)
    grads, _ = target_gradients(split.head, params, activations, targets)
    return Attribution(_spatial_sum(grads if layout is None else _tokens.to_grid(grads, layout)))


# ---------------------------------------------------------------------------
# Grad-CAM and relatives
# ---------------------------------------------------------------------------

@register("grad-cam", summary="Grad-CAM: spatially averaged gradients as channel weights (Selvaraju et al., ICCV 2017)")
def grad_cam(split, params, x, activations, targets, logits, *, key=None):
    r"""Grad-CAM (Selvaraju, Cogswell, Das, Vedantam, Parikh & Batra, "Grad-CAM:
    Visual Explanations from Deep Networks via Gradient-based Localization",
    ICCV 2017).

    .. math::  w_k = \frac{1}{hw} \sum_{ij} \frac{\partial y^c}{\partial A_{ijk}}, \qquad
               L = \mathrm{ReLU}\Big(\sum_k w_k A^k\Big).

    For a GAP + Linear head, ``w_k = w_{ck} / (hw)``: the map is CAM's.
    """
    del x, logits, key
    grads, _ = target_gradients(split.head, params, activations, targets)
    return Attribution(jnp.mean(grads, axis=SPATIAL))


GRAD_CAM_PP_EPS = 1e-6  # pytorch-grad-cam's guard in the denominator


def grad_cam_pp_diagonals(head, params, activations, targets, *, chunk_size: int = 64):
    r"""Exact diagonal second and third derivatives of the target logit.

    Returns ``(h2, h3)``, both ``(B, h, w, K)``:

    .. math::  h2_{ijk} = \frac{\partial^2 y^c}{\partial A_{ijk}^2}, \qquad
               h3_{ijk} = \frac{\partial^3 y^c}{\partial A_{ijk}^3}.

    For each position ``n = (i, j, k)`` a probe ``e_n`` (one at ``n`` in every
    image of the batch) is pushed forward twice through the reverse-mode
    gradient ``G = \nabla_A \sum_b y_b^{t_b}`` (forward-over-reverse):
    ``jax.jvp(G, (A,), (e_n,))`` gives the Hessian-vector product ``H e_n``,
    whose entry ``n`` is ``h2_n``; a second ``jax.jvp`` of
    ``A -> <e_n, H(A) e_n>`` along ``e_n`` gives ``h3_n = D^3 y[e_n, e_n, e_n]``.
    Images do not interact in the head, so one probe serves the whole batch
    exactly (the cross-image blocks of the Hessian are zero).

    Cost: ``h * w * K`` probes (25088 for a 7x7x512 split), each about four
    head forward+backward passes on the batch, run ``chunk_size`` probes at a
    time (``jax.lax.map`` over ``vmap``-ed chunks; memory grows with
    ``chunk_size``). This is exact but expensive for large dense heads.
    """
    a = activations
    b, h, w, k = a.shape
    classes = jax.eval_shape(lambda z: head(params, z), a).shape[-1]
    ct = jax.nn.one_hot(targets, classes, dtype=a.dtype)

    def total(z):
        return jnp.sum(head(params, z) * ct)

    grad = jax.grad(total)

    def probe(n):
        e = jnp.broadcast_to(jax.nn.one_hot(n, h * w * k, dtype=a.dtype).reshape(1, h, w, k), a.shape)

        def second(z):
            _, hv = jax.jvp(grad, (z,), (e,))
            return jnp.sum(hv * e, axis=(1, 2, 3))  # (B,) = e_n^T H_b e_n

        return jax.jvp(second, (a,), (e,))  # ((B,), (B,))

    h2, h3 = jax.lax.map(probe, jnp.arange(h * w * k), batch_size=_chunk(chunk_size))
    return h2.T.reshape(a.shape), h3.T.reshape(a.shape)


def _is_piecewise_linear(head, params, activations) -> bool:
    try:
        ops = rescale.nonlinear_primitives(lambda z: head(params, z), activations)
    except rescale.NoRescaleRule:
        return False
    return all(primitives.is_piecewise_linear(op) for op in ops)


def _chunk(chunk_size) -> int:
    return positive_int("chunk_size", chunk_size)


@register("grad-cam++", summary="Grad-CAM++: higher-order pixel weighting of positive gradients (Chattopadhay et al., WACV 2018)")
def grad_cam_pp(split, params, x, activations, targets, logits, *, key=None, exact: bool = False,
                chunk_size: int = 64):
    r"""Grad-CAM++ (Chattopadhay, Sarkar, Howlader & Balasubramanian, "Grad-CAM++:
    Generalized Gradient-based Visual Explanations for Deep Convolutional
    Networks", WACV 2018, arXiv 1710.11063).

    .. math::  w_k = \sum_{ij} \alpha_{ijk}\, \mathrm{ReLU}(g_{ijk}).

    The paper explains the score :math:`S = \exp(y^c)`. Its eq. (10) for ``S``,
    with ``g, h2, h3`` the first, second and third derivatives of ``y^c`` with
    respect to ``A_{ijk}`` (diagonal terms) and
    :math:`\Sigma_k = \sum_{ab} A_{abk}`, is

    .. math::  \alpha_{ijk} = \frac{g^2 + h2}
               {2 (g^2 + h2) + \Sigma_k (g^3 + 3 g\, h2 + h3)}.

    * ``exact=False`` (default, pytorch-grad-cam's formula, eq. 19 of the
      paper): the network is taken to be piecewise linear, ``h2 = h3 = 0``:
      :math:`\alpha = g^2 / (2 g^2 + \Sigma_k g^3 + 10^{-6})`, and ``alpha = 0``
      where ``g = 0``.
    * ``exact=True``: ``h2`` and ``h3`` computed exactly with ``jax.jvp``
      (forward-over-reverse; :func:`grad_cam_pp_diagonals` says what exactly
      is computed and what it costs: ``h*w*K`` probes, ``chunk_size`` at a
      time). When every nonlinearity of the head is piecewise linear (ReLU,
      max-pooling: see :func:`liftcam_jax.primitives.is_piecewise_linear`), ``h2 = h3 = 0`` identically,
      the probes are skipped and the result equals the default.

    The common positive factor ``exp(y^c)`` of ``dS/dA`` is dropped (the map is
    normalised), as in the paper and pytorch-grad-cam.
    """
    del x, logits, key
    chunk_size = _chunk(chunk_size)
    a = activations
    g, _ = target_gradients(split.head, params, a, targets)
    total = _spatial_sum(a, keepdims=True)
    g2 = g * g
    if exact and not _is_piecewise_linear(split.head, params, a):
        h2, h3 = grad_cam_pp_diagonals(split.head, params, a, targets, chunk_size=chunk_size)
        num = g2 + h2
        den = 2.0 * num + total * (g2 * g + 3.0 * g * h2 + h3) + GRAD_CAM_PP_EPS
    else:
        num = g2
        den = 2.0 * g2 + total * g2 * g + GRAD_CAM_PP_EPS
    alpha = jnp.where(g != 0, num / jnp.where(den == 0, 1.0, den), 0.0)
    return Attribution(_spatial_sum(jax.nn.relu(g) * alpha))


XGRAD_CAM_EPS = 1e-7  # pytorch-grad-cam's guard


@register("xgrad-cam", summary="XGrad-CAM: activation-weighted gradients (Fu et al., BMVC 2020)")
def xgrad_cam(split, params, x, activations, targets, logits, *, key=None):
    r"""XGrad-CAM (Fu, Hu, Dong, Guo, Gao & Li, "Axiom-based Grad-CAM: Towards
    Accurate Visualization and Explanation of CNNs", BMVC 2020).

    .. math::  w_k = \sum_{ij} \frac{A_{ijk}}{\sum_{ab} A_{abk} + 10^{-7}}\, g_{ijk}.
    """
    del x, logits, key
    a = activations
    g, _ = target_gradients(split.head, params, a, targets)
    return Attribution(_spatial_sum(g * a / (_spatial_sum(a, keepdims=True) + XGRAD_CAM_EPS)))


@register("layer-cam", summary="LayerCAM: positive gradients as per-position weights (Jiang et al., TIP 2021)")
def layer_cam(split, params, x, activations, targets, logits, *, key=None):
    r"""LayerCAM (Jiang, Zhang, Hou, Cheng & Wei, "LayerCAM: Exploring
    Hierarchical Class Activation Maps for Localization", IEEE TIP 2021).

    Per-position weights :math:`w_{ijk} = \mathrm{ReLU}(g_{ijk})`:
    :math:`L = \mathrm{ReLU}(\sum_k \mathrm{ReLU}(g^k) \odot A^k)`.
    """
    del x, logits, key
    g, _ = target_gradients(split.head, params, activations, targets)
    return Attribution(jax.nn.relu(g))


@register("hires-cam", summary="HiResCAM: gradients times activations, summed over channels (Draelos & Carin, 2020)")
def hires_cam(split, params, x, activations, targets, logits, *, key=None):
    r"""HiResCAM (Draelos & Carin, "Use HiResCAM instead of Grad-CAM for faithful
    explanations of convolutional neural networks", arXiv 2011.08891, 2020).

    Per-position weights :math:`w_{ijk} = g_{ijk}`:
    :math:`L = \mathrm{ReLU}(\sum_k g^k \odot A^k)`. For a GAP + Linear head
    the gradient is spatially uniform and the map is Grad-CAM's (and CAM's).
    """
    del x, logits, key
    g, _ = target_gradients(split.head, params, activations, targets)
    return Attribution(g)


# ---------------------------------------------------------------------------
# Eigen-CAM
# ---------------------------------------------------------------------------

def eigen_direction(activations):
    r"""``(v, mean)``: first right singular vector of the centred activations, and the channel means.

    ``M`` is ``A`` reshaped to ``(h*w, K)``, ``mean = M.mean(0)``, and ``v`` is
    the first row of ``V^T`` in ``M - mean = U S V^T``, oriented so that
    ``sum_k v_k >= 0``. It is computed from the eigendecomposition of the
    smaller Gram matrix, which is exact for the first singular direction
    (``v = Mc^T u / |Mc^T u|`` with ``u`` the top eigenvector of ``Mc Mc^T``
    when ``h*w <= K``, else ``v`` the top eigenvector of ``Mc^T Mc``) and, on
    CPU, some 400 times faster than XLA's SVD of a 49x2048 matrix. A constant
    activation tensor (``Mc = 0``) gives ``v = 0``.
    """
    b, h, w, k = activations.shape
    hi = jax.lax.Precision.HIGHEST
    m = activations.reshape(b, h * w, k)
    mean = jnp.mean(m, axis=1)
    mc = m - mean[:, None, :]
    if h * w <= k:
        vals, u = jnp.linalg.eigh(jnp.einsum("bnk,bmk->bnm", mc, mc, precision=hi))
        v = jnp.einsum("bnk,bn->bk", mc, u[..., -1], precision=hi)
        norm = jnp.linalg.norm(v, axis=-1, keepdims=True)
        v = v / jnp.where(norm > 0, norm, 1.0)
    else:
        vals, vecs = jnp.linalg.eigh(jnp.einsum("bnk,bnl->bkl", mc, mc, precision=hi))
        v = vecs[..., -1]
    v = jnp.where(vals[..., -1:] > 0, v, 0.0)  # S_0 = 0: no direction, a zero map
    v = v * jnp.where(jnp.sum(v, axis=-1, keepdims=True) < 0, -1.0, 1.0).astype(v.dtype)
    return v, mean


@register("eigen-cam", summary="Eigen-CAM: projection on the first principal component of the activations (Muhammad & Yeasin, IJCNN 2020)")
def eigen_cam(split, params, x, activations, targets, logits, *, key=None):
    r"""Eigen-CAM (Muhammad & Yeasin, "Eigen-CAM: Class Activation Map using
    Principal Components", IJCNN 2020, arXiv 2008.00299). Class-agnostic.

    With ``M`` the activations as an ``(h*w, K)`` matrix and :math:`\mu` its
    column (channel) means, pytorch-grad-cam centres before the SVD,
    :math:`M - \mathbf{1}\mu^T = U S V^T`, and the map is the projection on
    the first principal direction :math:`v = V^T_{0,:}`
    (:func:`eigen_direction`):

    .. math::  L = \mathrm{ReLU}\big((M - \mathbf{1}\mu^T) v\big)
               = \mathrm{ReLU}\Big(\sum_k v_k A^k - \mu^T v\Big),

    i.e. channel weights ``v`` and the affine shift ``bias = -mu . v``.

    The sign of a singular vector is arbitrary; pytorch-grad-cam keeps
    whatever ``numpy.linalg.svd`` returns. Here ``v`` is oriented so that
    ``sum_k v_k >= 0``, which is the same as asking the projection to
    correlate positively with the total activation map ``sum_k A^k`` (their
    inner product is ``S_0^2 sum_k v_k``, since ``Mc^T Mc v = S_0^2 v`` and
    ``Mc^T 1 = 0``): the map highlights where the network is active. Where
    numpy's sign is the other one, pytorch-grad-cam's map is
    ``ReLU(-projection)`` instead.
    """
    del x, params, split, targets, logits, key
    v, mean = eigen_direction(activations)
    return Attribution(v, bias=-jnp.sum(mean * v, axis=-1))
