"""Decoding any image to RGB ``uint8``.

:func:`decode_image` (encoded bytes or a path) and :func:`to_rgb` (a PIL
image) turn every PIL mode into RGB uint8: EXIF orientation applied; ``CMYK``
through its ICC profile when it has one, else PIL's conversion; 16-bit
(``I;16*``, ``I``) scaled by ``1/257``; float (``F``) taken as [0, 1] when its
maximum is at most 1, else [0, 255]; ``1``, ``L`` and ``P`` replicated / looked
up; **transparency (``RGBA``, ``LA``, ``P`` with a transparent colour) is
composited on white**, as a page shows it. Images of any size from 1x1 up are
accepted (the model's preprocessing resizes them); images with more pixels
than PIL's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``, 89.5 Mpx
by default; raise it to allow larger) are refused with a clear message, as are
empty, truncated, corrupt and non-image files (:class:`ItemError`).
:func:`array_to_rgb` does the same for an already decoded array (TFDS).
"""
from __future__ import annotations

import io
import os
import warnings
from typing import Optional

import numpy as np

from ..errors import one_line
from .base import ItemError

__all__ = ["array_to_rgb", "decode_image", "to_rgb"]

_BOMB_WARNING_SILENCED = False


def _silence_bomb_warning():
    """PIL warns between 1x and 2x its pixel limit; we refuse those images ourselves."""
    global _BOMB_WARNING_SILENCED
    if not _BOMB_WARNING_SILENCED:
        from PIL import Image

        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
        _BOMB_WARNING_SILENCED = True


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    rgb = rgba[..., :3].astype(np.float32)
    a = rgba[..., 3:4].astype(np.float32) / 255.0
    return np.clip(np.round(rgb * a + 255.0 * (1.0 - a)), 0, 255).astype(np.uint8)


def _gray_to_rgb(g: np.ndarray) -> np.ndarray:
    return np.repeat(g[..., None], 3, axis=-1)


def _to_uint8_levels(a: np.ndarray, mode: str) -> np.ndarray:
    if mode == "F":
        a = np.nan_to_num(a.astype(np.float64), nan=0.0)
        scale = 255.0 if a.size and a.max() <= 1.0 else 1.0
        return np.clip(np.round(a * scale), 0, 255).astype(np.uint8)
    # 16-bit (I;16*) and 32-bit (I) integers: 16-bit levels -> 8-bit (x / 257)
    a = a.astype(np.float64)
    return np.clip(np.round(a / 257.0), 0, 255).astype(np.uint8)


def to_rgb(img) -> np.ndarray:
    """A PIL image of any mode -> uint8 RGB ``(H, W, 3)`` (see the module doc for the rules)."""
    from PIL import Image

    mode = img.mode
    if mode == "RGB":
        return np.asarray(img, dtype=np.uint8)
    if mode in ("RGBA", "RGBa", "LA", "La", "PA") or (mode == "P" and "transparency" in img.info):
        return _composite_on_white(np.asarray(img.convert("RGBA"), dtype=np.uint8))
    if mode in ("L", "1", "P"):
        if mode == "P":
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
        return _gray_to_rgb(np.asarray(img.convert("L"), dtype=np.uint8))
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _gray_to_rgb(_to_uint8_levels(np.asarray(img), mode))
    if mode == "CMYK":
        icc = img.info.get("icc_profile")
        if icc:
            try:
                from PIL import ImageCms

                src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
                dst = ImageCms.createProfile("sRGB")
                return np.asarray(ImageCms.profileToProfile(img, src, dst, outputMode="RGB"), dtype=np.uint8)
            except Exception:  # a broken profile: fall back to the plain conversion
                pass
        return np.asarray(img.convert("RGB"), dtype=np.uint8)
    try:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (ValueError, OSError) as e:
        raise ItemError(f"unsupported image mode {mode!r} ({e})") from None


def array_to_rgb(a) -> np.ndarray:
    """A decoded image array (uint8 ``(H, W)``, ``(H, W, 1|3|4)``) -> uint8 RGB."""
    a = np.asarray(a)
    if a.dtype != np.uint8:
        if a.dtype == np.uint16:
            a = _to_uint8_levels(a, "I;16")
        elif a.dtype.kind == "f":
            a = _to_uint8_levels(a, "F")
        else:
            raise ItemError(f"image array has dtype {a.dtype}; expected uint8")
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4) or a.shape[0] < 1 or a.shape[1] < 1:
        raise ItemError(f"image array has shape {a.shape}; expected (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)")
    if a.shape[-1] == 1:
        return _gray_to_rgb(a[..., 0])
    if a.shape[-1] == 4:
        return _composite_on_white(a)
    return np.ascontiguousarray(a)


def _broken(e: BaseException) -> ItemError:
    msg = one_line(e)
    if "truncat" in msg.lower() or isinstance(e, EOFError):
        return ItemError(f"truncated image: {msg}")
    return ItemError(f"corrupt image: {msg}")


def decode_image(data, *, max_pixels: Optional[int] = -1) -> np.ndarray:
    """Encoded image bytes, or a path -> uint8 RGB ``(H, W, 3)``; :class:`ItemError` if unusable.

    ``max_pixels``: refuse larger images (decompression-bomb guard); ``-1``
    (default) means PIL's ``Image.MAX_IMAGE_PIXELS`` at call time, ``None`` no
    check of ours (PIL still refuses images over twice its limit: raise
    ``PIL.Image.MAX_IMAGE_PIXELS`` to allow them).
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    _silence_bomb_warning()
    if max_pixels == -1:
        max_pixels = Image.MAX_IMAGE_PIXELS
    if isinstance(data, (bytes, bytearray, memoryview)):
        if len(data) == 0:
            raise ItemError("empty data (0 bytes)")
        f = io.BytesIO(data)
    else:
        path = os.fspath(data)
        try:
            size = os.path.getsize(path)
        except OSError as e:
            raise ItemError(f"cannot read file: {e.strerror or e}") from None
        if size == 0:
            raise ItemError("empty file (0 bytes)")
        try:
            with open(path, "rb") as fh:
                f = io.BytesIO(fh.read())
        except OSError as e:
            raise ItemError(f"cannot read file: {e.strerror or e}") from None
    try:
        img = Image.open(f)
    except Image.DecompressionBombError as e:
        raise ItemError(f"image too large (decompression-bomb guard): {e}") from None
    except UnidentifiedImageError:
        raise ItemError("not an image, or an unsupported image format") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise _broken(e) from None
    with img:
        w, h = img.size
        if w < 1 or h < 1:
            raise ItemError(f"image has no pixels ({w}x{h})")
        if max_pixels is not None and w * h > max_pixels:
            raise ItemError(
                f"image too large: {w}x{h} = {w * h} pixels exceeds the decompression-bomb limit of "
                f"{max_pixels} pixels (PIL.Image.MAX_IMAGE_PIXELS)"
            )
        try:
            img.load()
        except Image.DecompressionBombError as e:
            raise ItemError(f"image too large (decompression-bomb guard): {e}") from None
        except (OSError, ValueError, SyntaxError, EOFError) as e:
            raise _broken(e) from None
        try:
            img = ImageOps.exif_transpose(img)
        except Exception:  # unreadable EXIF: keep the stored orientation
            pass
        return to_rgb(img)
