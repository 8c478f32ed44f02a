"""Local inputs: image files, folders of them (plain or labelled) and ``.npy`` arrays.

* an image file; a folder (searched recursively, sorted, by extension: see
  :data:`IMAGE_EXTENSIONS`; symlinked folders followed, each real folder once);
* a :class:`LabelledFolder`: images with ``labels.csv`` (and ``boxes.csv``), for
  evaluation;
* a ``.npy`` float array ``(N, H, W, 3)`` (or one ``(H, W, 3)`` image) of
  inputs *already preprocessed* for the model: no resizing or normalisation is
  applied; it is memory-mapped, one row read at a time (:class:`NpySource`).

Ids: a file given by name -> its stem; a file found in a folder ->
``<folder name>/<relative path without extension>``; ``x.npy`` row ``i`` ->
``x_<i>`` (:func:`file_id`, :func:`npy_source`).
"""
from __future__ import annotations

import hashlib
import os
import re
from typing import List, Optional, Sequence

import numpy as np

from ..errors import UsageError, one_line
from .base import Example, Item, ItemError, Source
from .decode import decode_image

__all__ = ["IMAGE_EXTENSIONS", "FileSource", "LabelledFolder", "NpySource"]

IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff",
    ".webp", ".ppm", ".pgm", ".pbm", ".pnm",
)



class FileSource(Source):
    """Image files: given by name, or found in folders."""

    def __init__(self, items: List[Item], max_pixels: Optional[int] = -1):
        self.items = items
        self.max_pixels = max_pixels

    def load(self, item: Item) -> np.ndarray:
        return decode_image(item.ref, max_pixels=self.max_pixels)


class LabelledFolder(FileSource):
    """A folder of images with ``labels.csv`` (``file``, ``imagenet_index``) and optionally ``boxes.csv``.

    ``labels.csv``: ``file`` is a path relative to the folder, ``imagenet_index``
    the class, *already the model's class index* (``labels_are_classes``); other
    columns are ignored; items keep its order. ``boxes.csv``: ``file, xmin, ymin,
    xmax, ymax`` in pixels of the stored image, several rows per file allowed;
    without it, boxes are ``None`` (localisation undefined, not zero). Ids are the
    ``file`` column with ``/`` separators.
    """

    labels_are_classes = True

    def __init__(self, folder: str, max_pixels: Optional[int] = -1):
        labels_path = os.path.join(folder, "labels.csv")
        if not os.path.isdir(folder):
            raise UsageError(f"data folder not found: {folder}")
        if not os.path.isfile(labels_path):
            raise UsageError(f"{folder} has no labels.csv (columns file,imagenet_index)")
        rows = _read_csv(labels_path, ("file", "imagenet_index"))
        if not rows:
            raise UsageError(f"{labels_path} lists no images")
        boxes: dict = {}
        boxes_path = os.path.join(folder, "boxes.csv")
        self.has_boxes = os.path.isfile(boxes_path)
        if self.has_boxes:
            for n, row in enumerate(_read_csv(boxes_path, ("file", "xmin", "ymin", "xmax", "ymax")), start=2):
                try:
                    b = [float(row[k]) for k in ("xmin", "ymin", "xmax", "ymax")]
                except ValueError:
                    raise UsageError(f"{boxes_path} line {n}: box coordinates must be numbers") from None
                boxes.setdefault(row["file"], []).append(b)
        items, self.labels, self.boxes, seen = [], {}, {}, set()
        for n, row in enumerate(rows, start=2):
            rel = row["file"]
            try:
                label = int(row["imagenet_index"])
            except ValueError:
                raise UsageError(f"{labels_path} line {n}: imagenet_index {row['imagenet_index']!r} "
                                 "is not an integer") from None
            if not rel or rel in seen:
                raise UsageError(f"{labels_path} line {n}: {'empty' if not rel else 'repeated'} file name {rel!r}")
            seen.add(rel)
            item = Item(rel.replace(os.sep, "/"), os.path.join(folder, rel), "image", ref=os.path.join(folder, rel))
            items.append(item)
            self.labels[item.id] = label
            if self.has_boxes:
                self.boxes[item.id] = np.asarray(boxes.get(rel, []), np.float32).reshape(-1, 4)
        super().__init__(items, max_pixels)
        self.spec = folder

    def read(self, items):
        for it in items:
            yield it, (lambda it=it: Example(self.load(it), self.labels[it.id], None, self.boxes.get(it.id)))


def _read_csv(path: str, required: Sequence[str]) -> List[dict]:
    import csv

    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            cols = [c.strip() for c in (reader.fieldnames or [])]
            missing = [c for c in required if c not in cols]
            if missing:
                raise UsageError(f"{path} has no column {missing[0]!r} (columns: {', '.join(cols) or 'none'}; "
                                 f"needed: {', '.join(required)})")
            return [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except UnicodeDecodeError as e:
        raise UsageError(f"{path} is not UTF-8 text: {e}") from None


class NpySource(Source):
    """Rows of a memory-mapped ``.npy`` of preprocessed float inputs."""

    def __init__(self, path: str, items: List[Item], array=None):
        self.path = self.spec = path
        self.items = items
        self._array = array

    def load(self, item: Item) -> np.ndarray:
        row = np.array(self._array[item.ref], dtype=np.float32)
        if not np.isfinite(row).all():
            bad = int(np.size(row) - np.count_nonzero(np.isfinite(row)))
            raise ItemError(f"array contains NaN or Inf ({bad} values)")
        return row


def is_image_file(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def walk_images(folder: str) -> List[str]:
    """Image files below ``folder``, sorted; symlinked folders are followed, each real folder once (no loops)."""
    out = []
    seen = {os.path.realpath(folder)}
    for root, dirs, files in os.walk(folder, followlinks=True):
        keep = []
        for d in sorted(dirs):
            real = os.path.realpath(os.path.join(root, d))
            if real not in seen:
                seen.add(real)
                keep.append(d)
        dirs[:] = keep
        for f in sorted(files):
            if is_image_file(f) and not f.startswith("."):
                out.append(os.path.join(root, f))
    return out


def short_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogateescape")).hexdigest()[:8]


def safe_part(text: str) -> str:
    text = re.sub(r"[\x00-\x1f/\\:*?\"<>|]+", "_", text).strip()
    return text if text not in ("", ".", "..") else "_"


def file_id(path: str, base: Optional[str]) -> str:
    if base is None:
        return safe_part(os.path.splitext(os.path.basename(path))[0])
    rel = os.path.relpath(path, base)
    parts = [safe_part(p) for p in os.path.splitext(rel)[0].split(os.sep)]
    name = safe_part(os.path.basename(os.path.abspath(base))) or "root"
    return "/".join([name] + parts)


def npy_source(path: str) -> NpySource:
    stem = safe_part(os.path.splitext(os.path.basename(path))[0])
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        return NpySource(path, [Item(stem, path, "array", error=f"cannot read .npy: {one_line(e)}")])
    if not isinstance(arr, np.ndarray):
        return NpySource(path, [Item(stem, path, "array", error="not a single .npy array")])
    if arr.dtype.kind != "f":
        return NpySource(path, [Item(stem, path, "array", error=(
            f"array has dtype {arr.dtype}; expected floats already preprocessed for the model "
            "(pass image files for raw pixels)"))])
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        return NpySource(path, [Item(stem, path, "array", error=(
            f"array has shape {tuple(np.shape(arr))}; expected (N, H, W, 3) preprocessed inputs"))])
    if arr.shape[0] == 0:
        return NpySource(path, [Item(stem, path, "array", error="array holds no inputs (N = 0)")])
    items = [Item(f"{stem}_{i}", f"{path}[{i}]", "array", ref=i) for i in range(arr.shape[0])]
    return NpySource(path, items, arr)
