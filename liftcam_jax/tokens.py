r"""Token activations: a split whose activations are ``(B, N, D)`` tokens (a ViT block's output).

A Vision Transformer's activations at a split are ``N`` tokens of ``D``
channels: first ``P`` *prefix* tokens (a class token, a distillation token,
register tokens), then the patch tokens of an ``h x w`` grid in row-major
order (``N = P + h w``), as timm, big_vision and Flax's examples lay them out.
Maps are formed on the grid: the grid tokens reshaped to ``(B, h, w, D)`` are
the activation maps ``A^k`` of a CNN.

**The layout** is a :class:`TokenLayout`, given on the split
(``Split(features, head, tokens=TokenLayout(prefix=1, grid=(14, 14)))``,
``linen_split(..., tokens=...)``; ``--tokens 1,14x14`` in the CLI) or inferred
by one rule, :func:`infer_layout`: the fewest prefix tokens
``0 <= P <=`` :data:`MAX_PREFIX` (and fewer than the grid tokens) such that
``N - P`` tokens form an ``h x w`` grid of square patches of a whole number of
pixels ``s`` tiling the input, ``H = s h`` and ``W = s w`` (so the grid has
the input's aspect ratio). ``N = 197`` at 224x224 is ``1 + 14 x 14``
(``s = 16``), not ``28 + 13 x 13``. Where no layout fits, the explicit layout
is required (a one-line :class:`~liftcam_jax.errors.UsageError` says so).

**Two ways a method sees tokens** (a method's ``tokens`` attribute in the
registry, :func:`liftcam_jax.methods.register`):

* ``"grid"`` (default): the method sees the grid activations ``(B, h, w, D)``
  and a head with the prefix tokens held at their values, :func:`grid_view`.
  Its gradients are the grid tokens' gradients of the model's head, so the
  method is exactly pytorch-grad-cam's with its ``reshape_transform`` (which
  drops the prefix tokens from the activations and the gradients and reshapes
  them to the grid before the method's formula).
* ``"all"``: the method sees the ``(B, N, D)`` tokens and the model's own head,
  and ``split.tokens`` is the resolved layout.

Method by method, and why:

* Grad-CAM, Grad-CAM++, XGrad-CAM, LayerCAM, HiResCAM (``"grid"``): as
  pytorch-grad-cam with ``reshape_transform`` (``tests/parity``). The prefix
  tokens have no place on the map, and their gradients do not enter the
  formulas (Grad-CAM's weights average the grid tokens' gradients).
* Eigen-CAM (``"grid"``): the principal direction of the grid tokens, as
  pytorch-grad-cam with ``reshape_transform``.
* CAM (``"all"``): the head must pool the grid tokens and be linear
  (:func:`liftcam_jax.methods.cams.check_cam_head` reads its gradient on the
  grid tokens); a head that reads only the class token has no class weights
  and is refused in one line.
* LIFT-CAM, DeepLIFT-SHAP-CAM, LRP-CAM (``"all"``): a channel is a channel of
  every token and the reference is taken on every token, so the coefficients
  sum over all tokens (:func:`position_axes`) and summation-to-delta
  (conservation for LRP) holds over all tokens; the prefix tokens' share is
  reported (:func:`prefix_share`, ``Explanation.prefix_coefficients``), not
  dropped.
* LIME-CAM (``"all"``): a removed channel is zero on every token, the channel
  game of :mod:`liftcam_jax.shap` (the SHAP values LIFT-CAM estimates).
* Ablation-CAM (``"all"``): a channel is ablated on every token, as
  pytorch-grad-cam's ``AblationLayerVit``: removing a channel from the head's
  input means removing it wherever it is carried.
* Score-CAM (``"all"``): the masks are the grid tokens' maps (a prefix token
  has no position in the image to mask); the whole model scores the masked
  inputs.

In every case the one map assembly
(:func:`liftcam_jax.explanation.from_attribution`) draws
:math:`\mathrm{ReLU}(\sum_k \phi_k A^k_{\mathrm{grid}})` on the grid tokens only.
"""
from __future__ import annotations

import re
from typing import NamedTuple, Optional, Tuple

import jax.numpy as jnp

from .errors import UsageError


__all__ = ["MAX_PREFIX", "TokenLayout", "grid_view", "infer_layout", "method_inputs", "parse_layout",
           "position_axes", "prefix_share", "resolve", "to_grid"]

MAX_PREFIX = 32
"""The most prefix tokens :func:`infer_layout` considers (class, distillation and register tokens)."""

OPTION = "tokens=lj.TokenLayout(prefix=P, grid=(h, w)) on the split (--tokens P,hxw in the CLI)"


class TokenLayout(NamedTuple):
    """``prefix`` tokens (class, distillation, registers), then an ``h x w`` ``grid`` of patch tokens, row-major."""

    prefix: int
    grid: Tuple[int, int]

    @property
    def tokens(self) -> int:
        """``N = prefix + h * w``."""
        return self.prefix + self.grid[0] * self.grid[1]

    def __str__(self) -> str:
        return f"{self.prefix},{self.grid[0]}x{self.grid[1]}"


def _shape(a) -> tuple:
    return tuple(int(d) for d in jnp.shape(a))


def _check(layout) -> TokenLayout:
    try:
        p, (h, w) = int(layout[0]), (int(layout[1][0]), int(layout[1][1]))
        ok = p >= 0 and h >= 1 and w >= 1 and len(layout[1]) == 2
    except (TypeError, ValueError, IndexError):
        ok = False
    if not ok:
        raise UsageError(f"tokens must be TokenLayout(prefix=P >= 0, grid=(h >= 1, w >= 1)), got {layout!r}")
    return TokenLayout(p, (h, w))


def parse_layout(text: str) -> TokenLayout:
    """``"1,14x14"`` -> ``TokenLayout(prefix=1, grid=(14, 14))`` (the CLI's ``--tokens P,HxW``)."""
    m = re.fullmatch(r"\s*(\d+)\s*,\s*(\d+)\s*[xX]\s*(\d+)\s*", str(text))
    if not m or int(m.group(2)) < 1 or int(m.group(3)) < 1:
        raise UsageError(f"--tokens must be P,HxW (prefix tokens, then the grid, e.g. 1,14x14), got {text!r}")
    return TokenLayout(int(m.group(1)), (int(m.group(2)), int(m.group(3))))


def infer_layout(n: int, size) -> Optional[TokenLayout]:
    """The layout of ``n`` tokens for an input of ``size = (H, W)`` pixels, or ``None`` when none fits.

    The rule: the fewest prefix tokens ``p`` (``0 <= p <= MAX_PREFIX``, ``p < h w``)
    such that ``n - p = h w`` with ``H = s h``, ``W = s w`` for a whole patch size
    ``s``: square patches that tile the input, so the grid has the input's
    aspect ratio. ``infer_layout(197, (224, 224)) == TokenLayout(1, (14, 14))``.
    """
    big, small = int(size[0]), int(size[1])
    grids = {}
    for s in range(1, min(big, small) + 1):
        if big % s == 0 and small % s == 0:
            grids[(big // s) * (small // s)] = (big // s, small // s)
    for p in range(0, min(MAX_PREFIX, int(n)) + 1):
        g = grids.get(int(n) - p)
        if g is not None and p < g[0] * g[1]:
            return TokenLayout(p, g)
    return None


def resolve(activations, size, tokens=None) -> Optional[TokenLayout]:
    """The token layout of the activations at a split, or ``None`` for ``(B, h, w, K)`` maps.

    ``tokens``: the split's explicit layout (checked against ``N``), else
    :func:`infer_layout` from ``size``, the input's ``(H, W)``. Any other rank or
    an ``N`` no layout fits is a one-line :class:`~liftcam_jax.errors.UsageError`
    naming the shape and the option to pass.
    """
    shape = _shape(activations)
    if len(shape) == 4 and tokens is None:
        return None
    if len(shape) == 4:
        raise UsageError(f"tokens={tokens!r} given, but the activations at the split are (B, h, w, K) maps of shape "
                         f"{shape}; tokens=lj.TokenLayout(...) (--tokens P,hxw in the CLI) is for (B, N, D) tokens")
    if len(shape) != 3:
        raise UsageError(f"activations of shape {shape} at the split: expected (B, h, w, K) maps, or (B, N, D) "
                         f"tokens with {OPTION}")
    if tokens is not None:
        layout = _check(tokens)
        if layout.tokens != shape[1]:
            raise UsageError(f"tokens={str(layout)!r} has {layout.tokens} tokens but the activations at the split "
                             f"have shape {shape}; pass {OPTION}")
        return layout
    layout = infer_layout(shape[1], size)
    if layout is None:
        raise UsageError(f"token activations of shape {shape} for {int(size[0])}x{int(size[1])} inputs fit no layout "
                         f"of at most {MAX_PREFIX} prefix tokens + a patch grid of the input's aspect ratio; pass {OPTION}")
    return layout


def position_axes(a) -> tuple:
    """The axes between the batch and the channels: ``(1, 2)`` for maps, ``(1,)`` for tokens."""
    return tuple(range(1, jnp.ndim(a) - 1))


def to_grid(a, layout: TokenLayout):
    """``(B, N, D)`` tokens -> ``(B, h, w, D)``: the grid tokens, prefix dropped (pytorch-grad-cam's ``reshape_transform``)."""
    h, w = layout.grid
    return jnp.reshape(a[:, layout.prefix:], (a.shape[0], h, w) + tuple(a.shape[2:]))


def prefix_share(contributions, layout: Optional[TokenLayout]):
    """``(coefficients, prefix part)`` of per-position contributions ``(B, *positions, K)``.

    ``coefficients`` sums over every position (all tokens); the prefix part
    sums over the prefix tokens only (``None`` for maps, no layout).
    """
    total = jnp.sum(contributions, axis=position_axes(contributions))
    if layout is None:
        return total, None
    return total, jnp.sum(contributions[:, :layout.prefix], axis=1)


def grid_view(split, activations, layout: TokenLayout):
    """``(view, grid)``: the split as the gradient family sees it, and the grid activations ``(B, h, w, D)``.

    ``view.head(params, g)`` is the model's head at the tokens whose prefix is
    the actual prefix of ``activations`` and whose grid is ``g``; so
    :math:`\\partial\\, \\mathrm{view.head} / \\partial g` is the grid tokens'
    gradient of the head, and ``view.head(params, grid) == split.head(params,
    activations)``. ``view.features`` returns grid activations. The view is
    for the batch of ``activations``.
    """
    prefix = activations[:, :layout.prefix]

    def features(params, x):
        return to_grid(split.features(params, x), layout)

    def head(params, g):
        tokens = jnp.reshape(g, (g.shape[0], -1) + tuple(g.shape[3:])).astype(prefix.dtype)
        return split.head(params, jnp.concatenate([jnp.broadcast_to(prefix, (g.shape[0],) + prefix.shape[1:]),
                                                   tokens], axis=1))

    return split._replace(features=features, head=head, tokens=None), to_grid(activations, layout)


def method_inputs(split, activations, layout: Optional[TokenLayout], kind: str):
    """``(split, activations, layout)`` a method of token ``kind`` (``"grid"`` or ``"all"``) is handed,
    and the layout the map assembly then needs.

    Maps (``layout is None``): unchanged. ``"grid"``: :func:`grid_view` (the
    assembly sees maps: no layout). ``"all"``: the tokens, with ``split.tokens``
    set to the resolved layout.
    """
    if layout is None:
        return split, activations, None
    if kind == "grid":
        view, grid = grid_view(split, activations, layout)
        return view, grid, None
    return split._replace(tokens=layout), activations, layout
