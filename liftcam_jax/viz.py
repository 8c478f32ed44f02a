"""Pictures of explanations: colormaps, overlays, grids, PNG files (numpy + Pillow only).

* :func:`colorize`: a map in [0, 1] -> uint8 RGB through a colormap (``jet``,
  ``hot``, ``gray``), identical to matplotlib's ``cmap(x, bytes=True)``
  (same piecewise-linear segment data, 256-entry table, same quantisation).
* :func:`overlay`: ``(1 - alpha) * image + alpha * colorize(map)``, rounded,
  the blend used by the CAM papers' figures (pytorch-grad-cam's
  ``show_cam_on_image`` with ``image_weight = 1 - alpha``); both steps are
  table lookups (a dataset run draws one overlay per image).
* :func:`grid`: rows of images in one picture, with optional captions.
* :func:`write_png`: an atomic PNG write (:mod:`liftcam_jax.files`).

Maps are drawn on the image the model saw (the resized input), at the same
size: no second resampling happens here.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from .files import write_png

__all__ = ["CMAPS", "colorize", "overlay", "grid", "to_rgb_uint8", "write_png"]

# matplotlib's segment data (x, y0, y1) per channel; all three are continuous (y0 == y1).
_SEGMENTS = {
    "jet": {
        "red": ((0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)),
        "green": ((0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)),
        "blue": ((0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)),
    },
    "hot": {
        "red": ((0.0, 0.0416), (0.365079, 1.0), (1.0, 1.0)),
        "green": ((0.0, 0.0), (0.365079, 0.0), (0.746032, 1.0), (1.0, 1.0)),
        "blue": ((0.0, 0.0), (0.746032, 0.0), (1.0, 1.0)),
    },
    "gray": {
        "red": ((0.0, 0.0), (1.0, 1.0)),
        "green": ((0.0, 0.0), (1.0, 1.0)),
        "blue": ((0.0, 0.0), (1.0, 1.0)),
    },
}
CMAPS = tuple(_SEGMENTS)
_N = 256
_LUTS: dict = {}


def _lut(name: str) -> np.ndarray:
    """``(256, 3)`` uint8 table: the segments sampled at ``linspace(0, 1, 256)``, times 255, truncated."""
    if name not in _SEGMENTS:
        raise ValueError(f"unknown colormap {name!r}; valid colormaps: {', '.join(CMAPS)}")
    if name not in _LUTS:
        t = np.linspace(0.0, 1.0, _N)
        chans = []
        for c in ("red", "green", "blue"):
            xs, ys = zip(*_SEGMENTS[name][c])
            chans.append(np.clip(np.interp(t, xs, ys), 0.0, 1.0))
        _LUTS[name] = (np.stack(chans, -1) * 255).astype(np.uint8)
    return _LUTS[name]


def colorize(map01, cmap: str = "jet") -> np.ndarray:
    """A map in [0, 1] (any shape) -> uint8 RGB (shape + (3,)).

    Values are clipped to [0, 1]; NaN becomes 0. Quantisation as matplotlib:
    index ``min(floor(256 * v), 255)`` into the 256-entry table. ``256 * v``
    is exact in any binary float, so float32 maps are indexed in float32
    (no float64 copy) with the same result.
    """
    return np.take(_lut(cmap), _levels(map01), axis=0)


def _levels(map01) -> np.ndarray:
    """The colormap index of every value: uint8 ``min(floor(256 * clip(v, 0, 1)), 255)``, NaN -> 0."""
    m = np.asarray(map01)
    s = np.array(m, dtype=m.dtype if m.dtype in (np.float32, np.float64) else np.float64)  # a copy
    s *= _N  # exact: a power-of-two scaling
    np.clip(s, 0, _N - 1, out=s)  # +inf -> 255, -inf -> 0; NaN stays NaN
    s[np.isnan(s)] = 0
    return s.astype(np.uint8)  # truncation = floor on [0, 255]


_BLENDS: dict = {}


def _blend_table(alpha: float) -> np.ndarray:
    """``(256 * 256,)`` uint8: entry ``256 * h + v`` is ``round((1 - alpha) * v + alpha * h)``.

    The blend of :func:`overlay` for every pair (heat-map byte ``h``, image
    byte ``v``), computed once per ``alpha`` in float64 exactly as the
    per-pixel formula, so looking it up gives the same bytes at a fraction of
    the cost (one gather instead of five float64 passes over the image).
    """
    a = float(alpha)
    if a not in _BLENDS:
        h, v = np.meshgrid(np.arange(256.0), np.arange(256.0), indexing="ij")
        table = np.clip(np.round((1.0 - a) * v + a * h), 0, 255).astype(np.uint8).ravel()
        if len(_BLENDS) >= 16:
            _BLENDS.clear()
        _BLENDS[a] = table
    return _BLENDS[a]


def to_rgb_uint8(image) -> np.ndarray:
    """An image for display -> uint8 ``(H, W, 3)``.

    uint8 (or bool) ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)``
    (alpha dropped); float arrays are taken as values in [0, 1].
    """
    a = np.asarray(image)
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif a.dtype.kind == "f":
        a = np.clip(np.round(np.nan_to_num(a) * 255.0), 0, 255).astype(np.uint8)
    elif a.dtype != np.uint8:
        raise ValueError(f"images must be uint8, bool or float in [0, 1], got {a.dtype}")
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
        raise ValueError(f"images must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got shape {a.shape}")
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    return np.ascontiguousarray(a[..., :3])


def overlay(image_uint8, map01, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """The map drawn over the image: ``round((1 - alpha) * image + alpha * colorize(map))``.

    Computed with lookup tables (the colormap's, then :func:`_blend_table`),
    byte for byte equal to the float formula.

    Args:
      image_uint8: ``(H, W, 3)`` uint8 (gray or RGBA accepted, see :func:`to_rgb_uint8`).
      map01: ``(H, W)`` saliency in [0, 1] (an ``Explanation.maps[i]``).
      alpha: weight of the heat map, in [0, 1].
      cmap: a name in :data:`CMAPS`.

    Returns:
      uint8 ``(H, W, 3)``.
    """
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    img = to_rgb_uint8(image_uint8)
    m = np.asarray(map01)
    if m.ndim == 3 and m.shape[-1] == 1:
        m = m[..., 0]
    if m.shape != img.shape[:2]:
        raise ValueError(
            f"map shape {m.shape} differs from image size {img.shape[:2]}: draw the map on the image "
            "the model saw (Preprocess.resize_image(image), or Preprocess.denormalize(x))"
        )
    index = colorize(m, cmap).astype(np.uint16)
    index <<= 8
    index |= img
    return np.take(_blend_table(alpha), index)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _fit(draw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..." if text else ""


def grid(
    rows: Sequence[Sequence],
    labels: Optional[Sequence[Sequence[Optional[str]]]] = None,
    *,
    pad: int = 4,
    background: int = 255,
    font_size: int = 12,
) -> np.ndarray:
    """Images laid out in rows -> one uint8 RGB picture.

    Args:
      rows: a list of rows, each a list of images (uint8 or float [0, 1];
        gray, RGB or RGBA; sizes may differ: every cell is as large as the
        largest image, smaller ones are centred).
      labels: ``None``, or captions shaped like ``rows`` (a row's list may be
        shorter, ``None`` entries draw nothing); drawn under each cell,
        shortened with "..." to the cell's width.
      pad: pixels between and around cells.
      background: gray level of the background (255 = white).
      font_size: caption size in pixels.
    """
    from PIL import Image, ImageDraw

    rows = [[to_rgb_uint8(im) for im in row] for row in rows]
    if not rows or not any(rows):
        raise ValueError("grid needs at least one image")
    if labels is not None and len(labels) > len(rows):
        raise ValueError(f"{len(labels)} label rows for {len(rows)} image rows")
    cell_h = max(im.shape[0] for row in rows for im in row)
    cell_w = max(im.shape[1] for row in rows for im in row)
    ncols = max(len(row) for row in rows)
    has_text = labels is not None and any(t for row in labels for t in (row or ()))
    font = _font(font_size) if has_text else None
    text_h = 0
    if has_text:
        probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        box = probe.textbbox((0, 0), "Ag", font=font)
        text_h = box[3] - box[1] + 4
    H = pad + len(rows) * (cell_h + text_h + pad)
    W = pad + ncols * (cell_w + pad)
    canvas = Image.new("RGB", (W, H), (background,) * 3)
    draw = ImageDraw.Draw(canvas)
    ink = (0, 0, 0) if background >= 128 else (255, 255, 255)
    for r, row in enumerate(rows):
        y0 = pad + r * (cell_h + text_h + pad)
        for c, im in enumerate(row):
            x0 = pad + c * (cell_w + pad)
            h, w = im.shape[:2]
            canvas.paste(Image.fromarray(im), (x0 + (cell_w - w) // 2, y0 + (cell_h - h) // 2))
            if has_text and r < len(labels) and labels[r] is not None and c < len(labels[r]):
                text = labels[r][c]
                if text:
                    text = _fit(draw, str(text), font, cell_w)
                    tw = draw.textlength(text, font=font)
                    draw.text((x0 + (cell_w - tw) / 2, y0 + cell_h + 2), text, fill=ink, font=font)
    return np.asarray(canvas, dtype=np.uint8)
