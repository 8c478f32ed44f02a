"""Inputs for batch explaining: decoding any image to RGB, and listing sources.

Sources (:func:`open_inputs`), each listed cheaply (names only, nothing decoded):

* an image file; a folder (searched recursively, sorted, by extension: see
  :data:`IMAGE_EXTENSIONS`);
* a ``.npy`` float array ``(N, H, W, 3)`` (or one ``(H, W, 3)`` image) of
  inputs *already preprocessed* for the model: no resizing or normalisation is
  applied; it is memory-mapped, one row read at a time;
* a TFDS split ``tfds:NAME[/CONFIG]:SPLIT`` (``SPLIT`` may be sliced,
  ``validation[:500]``, ``train[10%:20%]``) read from a local data dir. A split
  prepared as ``array_record`` is read without TensorFlow
  (``tfds.data_source``, random access); one prepared as ``tfrecord`` needs
  TensorFlow (``tfds.load(..., download=False)``, read in order). The image
  feature is ``image``, read as encoded bytes and decoded here like a file.

Every :class:`Item` has an ``id``: a relative, path-safe name (no extension)
for its outputs, unique within a run: a file given by name -> its stem; a file
found in a folder -> ``<folder name>/<relative path without extension>``;
``x.npy`` row ``i`` -> ``x_<i>``; TFDS -> ``<name>[/<config>]/<split>/<index>``
(the index in the whole split, zero-padded). Ids that still collide (the same
file name in two folders given by name, ``a.jpg`` beside ``a.png``; compared
case-insensitively) each get ``_<8 hex digits of a hash of the source>``.

Decoding (:func:`decode_image`, :func:`to_rgb`) turns every PIL mode into RGB
uint8: EXIF orientation applied; ``CMYK`` through its ICC profile when it has
one, else PIL's conversion; 16-bit (``I;16*``, ``I``) scaled by ``1/257``;
float (``F``) taken as [0, 1] when its maximum is at most 1, else [0, 255];
``1``, ``L`` and ``P`` replicated / looked up; **transparency (``RGBA``,
``LA``, ``P`` with a transparent colour) is composited on white**, as a page
shows it. Images of any size from 1x1 up are accepted (the model's
preprocessing resizes them); images with more pixels than PIL's
decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``, 89.5 Mpx by
default; raise it to allow larger) are refused with a clear message, as are
empty, truncated, corrupt and non-image files (:class:`ItemError`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import re
import threading
import warnings
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .errors import LiftcamError, UsageError, one_line

__all__ = [
    "IMAGE_EXTENSIONS",
    "Example",
    "Item",
    "ItemError",
    "Source",
    "decode_image",
    "LabelledFolder",
    "label_mapping",
    "open_labelled",
    "open_inputs",
    "to_rgb",
    "array_to_rgb",
]

IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff",
    ".webp", ".ppm", ".pgm", ".pbm", ".pnm",
)


class ItemError(LiftcamError):
    """One input cannot be used (corrupt, not an image, bad array...): the run goes on."""


@dataclasses.dataclass(frozen=True)
class Item:
    """One input: ``id`` names its outputs, ``source`` says where it came from.

    ``kind`` is ``"image"`` (decoded to uint8 RGB, then the model's
    preprocessing) or ``"array"`` (a preprocessed float ``(H, W, 3)``).
    ``error`` is set for an input known to be unusable when listed.
    """

    id: str
    source: str
    kind: str
    ref: Any = dataclasses.field(default=None, compare=False, repr=False)
    error: Optional[str] = None


# ---------------------------------------------------------------------------
# decoding
# ---------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------
# sources
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Example:
    """What reading one item gives: its pixels and, where the source has them, annotations.

    ``image``: uint8 RGB ``(H, W, 3)`` (kind ``image``) or the preprocessed float
    array (kind ``array``); ``label``: the dataset's own label index (not a
    model class: see :func:`label_mapping`); ``label_name``: its name;
    ``boxes``: ``(n, 4)`` ``xmin, ymin, xmax, ymax`` in pixels of ``image``.
    """

    image: np.ndarray
    label: Optional[int] = None
    label_name: Optional[str] = None
    boxes: Optional[np.ndarray] = None


class Source:
    """A list of :class:`Item` and a way to read them.

    ``items`` is the full listing (cheap). ``read(items)`` yields
    ``(item, fetch)`` for every item given (in that order unless the source
    reads in its storage order), where ``fetch()`` returns an :class:`Example`
    and may raise :class:`ItemError`; ``fetch`` is called in a worker thread.
    ``load(item)`` returns just the pixels.
    """

    items: List[Item]
    labels_are_classes = False  # True: an Example's label is already the model's class index

    def read(self, items: Sequence[Item]) -> Iterator[Tuple[Item, Callable[[], Example]]]:
        for it in items:
            yield it, (lambda it=it: Example(self.load(it)))

    def load(self, item: Item) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError


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
    label_names = None

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


def open_labelled(spec: str, *, data_dir: Optional[str] = None, image_key: Optional[str] = None,
                  label_key: Optional[str] = None, max_pixels: Optional[int] = -1) -> Source:
    """Labelled images for evaluation: a :class:`LabelledFolder`, or a TFDS split with a ``ClassLabel``.

    Reading either yields :class:`Example` s with ``label`` (and ``boxes`` where
    the data has them). A folder's labels are the model's class indices; a TFDS
    split's are the dataset's own, mapped with :func:`label_mapping`.
    """
    spec = os.fspath(spec)
    if spec.startswith("tfds:"):
        src = _tfds_source(spec, data_dir, False, image_key, label_key)
        src.max_pixels = max_pixels
        if src.label_key is None:
            raise UsageError(f"{spec} has no ClassLabel feature to evaluate against; name one with --label-key")
        return src
    return LabelledFolder(spec, max_pixels)


class NpySource(Source):
    """Rows of a memory-mapped ``.npy`` of preprocessed float inputs."""

    def __init__(self, path: str, items: List[Item], array=None):
        self.path = path
        self.items = items
        self._array = array

    def load(self, item: Item) -> np.ndarray:
        row = np.array(self._array[item.ref], dtype=np.float32)
        if not np.isfinite(row).all():
            bad = int(np.size(row) - np.count_nonzero(np.isfinite(row)))
            raise ItemError(f"array contains NaN or Inf ({bad} values)")
        return row


class TfdsSource(Source):
    """A TFDS split, read by example index in the split.

    ``array_record`` splits are read by random access (``tfds.data_source``, no
    TensorFlow); ``tfrecord`` splits in order with TensorFlow, each example's
    index recovered from its ``tfds_id`` (shard file and position in it), so an
    id is the example's own index in the split whatever the sharding and the
    read order (see :func:`_tfrecord_examples`). ``read`` yields
    :class:`Example` s: the image and, when the dataset has a ``ClassLabel``
    feature, its label and label name; boxes from ``objects/bbox`` or ``bbox``.
    """

    def __init__(self, spec: str, items: List[Item], reader=None, iterate=None, image_key: str = "image",
                 label_key: Optional[str] = None, label_names: Optional[Sequence[str]] = None):
        self.spec = spec
        self.items = items
        self._reader = reader
        self._iterate = iterate
        self._lock = threading.Lock()
        self.image_key = image_key
        self.label_key = label_key
        self.label_names = None if label_names is None else list(label_names)
        self.max_pixels = -1

    @property
    def random_access(self) -> bool:
        """Whether single examples can be read (:meth:`example`): array_record splits."""
        return self._reader is not None

    @property
    def sequential(self) -> bool:
        """Read in storage order (TFRecord): several hosts take contiguous blocks of it."""
        return self._iterate is not None

    def example(self, item: Item) -> dict:
        """The raw TFDS example of ``item`` (random access only); :class:`ItemError` if unreadable."""
        if self._reader is None:
            raise ItemError(f"{self.spec} is read in order only (not array_record)")
        try:
            with self._lock:
                return self._reader[item.ref]
        except Exception as e:
            raise ItemError(f"cannot read example {item.ref[1]} of split {item.ref[0]}: {one_line(e)}") from None

    def image(self, example) -> np.ndarray:
        """The RGB ``uint8`` image of a raw example (its ``image_key`` feature)."""
        if not isinstance(example, dict) or self.image_key not in example:
            keys = ", ".join(sorted(example)) if isinstance(example, dict) else type(example).__name__
            raise ItemError(f"example has no {self.image_key!r} feature (has: {keys})")
        v = example[self.image_key]
        if isinstance(v, (bytes, bytearray, memoryview)):
            return decode_image(bytes(v), max_pixels=self.max_pixels)
        v = np.asarray(v)
        if v.dtype.kind in "SO" and v.ndim == 0:
            return decode_image(bytes(v.item()), max_pixels=self.max_pixels)
        return array_to_rgb(v)

    def annotate(self, example) -> Example:
        """A raw example -> :class:`Example` (image, label and its name, boxes in image pixels)."""
        image = self.image(example)
        label = name = None
        if self.label_key is not None:
            label = int(np.asarray(example[self.label_key]))
            if self.label_names is not None and 0 <= label < len(self.label_names):
                name = str(self.label_names[label])
        boxes = None
        objects = example.get("objects") if isinstance(example.get("objects"), dict) else None
        raw = objects.get("bbox") if objects else example.get("bbox", example.get("bboxes"))
        if raw is not None:  # TFDS BBoxFeature: (ymin, xmin, ymax, xmax) in [0, 1]
            r = np.asarray(raw, np.float32).reshape(-1, 4)
            h, w = image.shape[:2]
            boxes = np.stack([r[:, 1] * w, r[:, 0] * h, r[:, 3] * w, r[:, 2] * h], -1)
        return Example(image, label, name, boxes)

    def load(self, item: Item) -> np.ndarray:
        return self.image(self.example(item))

    def read(self, items):
        if self._iterate is None:
            for it in items:
                yield it, (lambda it=it: self.annotate(self.example(it)))
            return
        wanted = {it.ref: it for it in items}
        for split in dict.fromkeys(ref[0] for ref in wanted):
            idx = [ref[1] for ref in wanted if ref[0] == split]
            # only the examples between the first and the last wanted one are read
            for ref, example in self._iterate(split, min(idx), max(idx) + 1):
                it = wanted.pop(ref, None)
                if it is not None:
                    yield it, (lambda ex=example: self.annotate(ex))
        for it in wanted.values():  # never silently missing: TFDS did not yield it
            yield it, _raiser(ItemError(f"example {it.ref[1]} of split {it.ref[0]} was not found when reading "
                                        f"{self.spec} in order"))


def _raiser(e: BaseException):
    def f():
        raise e
    return f


def _is_image_file(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _walk_images(folder: str) -> List[str]:
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
            if _is_image_file(f) and not f.startswith("."):
                out.append(os.path.join(root, f))
    return out


def _short_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogateescape")).hexdigest()[:8]


def _safe_part(text: str) -> str:
    text = re.sub(r"[\x00-\x1f/\\:*?\"<>|]+", "_", text).strip()
    return text if text not in ("", ".", "..") else "_"


def _file_id(path: str, base: Optional[str]) -> str:
    if base is None:
        return _safe_part(os.path.splitext(os.path.basename(path))[0])
    rel = os.path.relpath(path, base)
    parts = [_safe_part(p) for p in os.path.splitext(rel)[0].split(os.sep)]
    name = _safe_part(os.path.basename(os.path.abspath(base))) or "root"
    return "/".join([name] + parts)


def _npy_source(path: str, size_hint=None) -> NpySource:
    stem = _safe_part(os.path.splitext(os.path.basename(path))[0])
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


# -- TFDS --------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TfdsSpec:
    """A parsed ``tfds:NAME[/CONFIG][@VERSION]:SPLIT`` input."""

    name: str  # NAME[/CONFIG]
    version: Optional[str]
    split: str

    @property
    def tfds_name(self) -> str:
        """The name TFDS takes: ``NAME[/CONFIG][:VERSION]``."""
        return self.name if self.version is None else f"{self.name}:{self.version}"


_TFDS_SPEC = re.compile(r"^tfds:(?P<name>[\w.-]+(?:/[\w.-]+)?)(?:@(?P<version>[\w.*-]+))?:(?P<split>.+)$")


def parse_tfds_spec(spec: str) -> TfdsSpec:
    """``tfds:NAME[/CONFIG][@VERSION]:SPLIT`` -> :class:`TfdsSpec`.

    Examples: ``tfds:imagenette:validation[:500]``,
    ``tfds:imagenette/full-size-v2@1.0.0:validation[50%:]``.
    """
    m = _TFDS_SPEC.match(spec)
    if m is not None and ":" in re.sub(r"\[[^\]]*\]", "", m["split"]):  # NAME:VERSION:SPLIT
        m = None
    if m is None:
        raise UsageError(f"bad TFDS input {spec!r}; expected tfds:NAME[/CONFIG][@VERSION]:SPLIT, "
                         "e.g. tfds:imagenette:validation[:500] or tfds:imagenette/full-size-v2@1.0.0:validation")
    return TfdsSpec(m["name"], m["version"], m["split"])


def _tf_available() -> bool:
    try:
        import importlib.util

        return importlib.util.find_spec("tensorflow") is not None
    except (ImportError, ValueError):
        return False


def _feature_key(features, kind, key: Optional[str], what: str, name: str, required: bool) -> Optional[str]:
    """The top-level feature of type ``kind`` to read: ``key`` if given, else the only one.

    ``"label"`` wins when there are several ``ClassLabel`` features and one is so named.
    """
    keys = list(features.keys())
    of_kind = [k for k in keys if isinstance(features[k], kind)]
    flag = "--image-key" if what == "image" else "--label-key"
    if key is not None:
        if key not in keys or not isinstance(features[key], kind):
            raise UsageError(f"TFDS dataset {name!r} has no {what} feature {key!r}; its {what} features: "
                             f"{', '.join(of_kind) or 'none'} (all features: {', '.join(keys)})")
        return key
    if len(of_kind) == 1:
        return of_kind[0]
    if what == "label" and "label" in of_kind:
        return "label"
    if not of_kind:
        if required:
            raise UsageError(f"TFDS dataset {name!r} has no {what} feature (features: {', '.join(keys)})")
        return None
    if not required:
        return None
    raise UsageError(f"TFDS dataset {name!r} has several {what} features ({', '.join(of_kind)}); "
                     f"choose one with {flag} (Python: {what}_key=...)")


def _shard_offsets(split_info) -> dict:
    """Shard file name -> index in the split of its first example (shards are in split order)."""
    names = [os.path.basename(os.fspath(f)) for f in split_info.filenames]
    lengths = list(split_info.shard_lengths)
    if len(names) != len(lengths):  # pragma: no cover - a damaged dataset_info.json
        raise UsageError(f"TFDS split {split_info.name!r} lists {len(names)} files but {len(lengths)} shard lengths")
    return dict(zip(names, np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(int).tolist()))


def _tfrecord_examples(tfds, spec: TfdsSpec, builder, data_dir, decoders):
    """``iterate(split, lo, hi)`` over a TFRecord split: ``((split, index), example)`` for ``lo <= index < hi``.

    TFDS interleaves shard files (16 at a time, 16 examples per turn) unless told
    otherwise, so the order ``tfds.load`` yields is *not* the split's order once a
    split has several files. Files are read one after the other here
    (``interleave_cycle_length=1``), and each example's index is not counted but
    *derived* from its ``tfds_id`` (``<shard file>__<position in the file>``) and
    the split's shard lengths: an example can never be given another's index.
    """
    import tensorflow as tf  # noqa: F401  (a clear ImportError here rather than deep in TFDS)

    offsets = {s: _shard_offsets(info) for s, info in builder.info.splits.items()}
    read_config = tfds.ReadConfig(interleave_cycle_length=1, add_tfds_id=True, try_autocache=False)

    def iterate(split: str, lo: int, hi: int):
        ds = builder.as_dataset(split=f"{split}[{lo}:{hi}]", shuffle_files=False, decoders=decoders,
                                read_config=read_config)
        for ex in tfds.as_numpy(ds):
            file, _, pos = ex.pop("tfds_id").decode().rpartition("__")
            yield (split, offsets[split][file] + int(pos)), ex

    return iterate


def _prepare_hint(spec: TfdsSpec, data_dir: Optional[str]) -> str:
    dd = f", data_dir={data_dir!r}" if data_dir else ""
    return (f"prepare it once with liftcam-jax's --download, or in Python: tfds.builder({spec.tfds_name!r}{dd}, "
            f"file_format='array_record').download_and_prepare() (no TensorFlow needed); "
            f"on Colab tfds.load({spec.tfds_name!r}{dd}) prepares TFRecord files, also read here")


def _tfds_source(spec_text: str, data_dir: Optional[str], download: bool, image_key: Optional[str] = None,
                 label_key: Optional[str] = None) -> TfdsSource:
    spec = parse_tfds_spec(spec_text)
    name = spec.name
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:  # pragma: no cover - a dependency
        raise UsageError(f"TFDS input {spec_text!r} needs tensorflow-datasets (pip install tensorflow-datasets): "
                         f"{e}") from None
    where = data_dir or "the default TFDS data dir (~/tensorflow_datasets)"
    try:
        builder = tfds.builder(spec.tfds_name, data_dir=data_dir)
    except Exception as e:
        raise UsageError(f"TFDS dataset {spec.tfds_name!r} not found in {where}: {one_line(e)}") from None
    if not builder.is_prepared():
        if not download:
            raise UsageError(f"TFDS dataset {spec.tfds_name!r} is not prepared in {where}; "
                             f"{_prepare_hint(spec, data_dir)}")
        try:
            builder = tfds.builder(spec.tfds_name, data_dir=data_dir, file_format="array_record")
            builder.download_and_prepare()
        except Exception as e:
            raise UsageError(f"cannot download and prepare TFDS dataset {spec.tfds_name!r}: {one_line(e)}") from None
    try:  # what is on disk (a registered builder's code ignores formats added later, e.g. by tfds_to_array_record)
        builder = tfds.builder_from_directory(os.fspath(builder.data_dir))
    except Exception:  # pragma: no cover - an older layout: the registered builder's view
        pass
    splits = builder.info.splits
    try:
        instructions = tfds.core.ReadInstruction.from_spec(spec.split).to_absolute(splits)
    except Exception as e:
        raise UsageError(
            f"bad split {spec.split!r} for TFDS dataset {name!r} ({one_line(e)}); splits: {', '.join(sorted(splits))}"
        ) from None
    features = builder.info.features
    image_key = _feature_key(features, tfds.features.Image, image_key, "image", name, required=True)
    label_key = _feature_key(features, tfds.features.ClassLabel, label_key, "label", name, required=False)
    label_names = None if label_key is None else list(features[label_key].names)
    decoders = {image_key: tfds.decode.SkipDecoding()}
    at = "" if spec.version is None else f"@{spec.version}"
    items: List[Item] = []
    for ins in instructions:
        n = splits[ins.splitname].num_examples
        lo = 0 if ins.from_ is None else ins.from_
        hi = n if ins.to is None else ins.to
        width = max(5, len(str(max(n - 1, 0))))
        for i in range(lo, hi):
            ident = f"{name}/{ins.splitname}/{i:0{width}d}"
            items.append(Item(ident, f"tfds:{name}{at}:{ins.splitname}[{i}]", "image", ref=(ins.splitname, i)))
    formats = [builder.info.file_format] + list(getattr(builder.info, "alternative_file_formats", None) or [])
    formats = [getattr(f, "value", f) for f in formats if f is not None]
    split_names = list(dict.fromkeys(ins.splitname for ins in instructions))
    keys = dict(image_key=image_key, label_key=label_key, label_names=label_names)
    if "array_record" in formats:
        try:
            readers = {s: builder.as_data_source(split=s, decoders=decoders) for s in split_names}
        except Exception as e:
            raise UsageError(f"cannot open TFDS dataset {name!r} in {where}: {one_line(e)}") from None

        class _Reader:
            def __getitem__(self, ref):
                return readers[ref[0]][ref[1]]

        return TfdsSource(spec_text, items, reader=_Reader(), **keys)
    if not _tf_available():
        dd = data_dir or "~/tensorflow_datasets"
        raise UsageError(
            f"TFDS dataset {spec.tfds_name!r} in {where} is stored as {', '.join(formats) or 'tfrecord'}, "
            f"which needs TensorFlow to read: pip install tensorflow-cpu; or, where TensorFlow is installed, "
            f"convert it once to array_record (then read without it): "
            f"python -c \"import liftcam_jax.data as d; d.tfds_to_array_record({spec.tfds_name!r}, {dd!r})\""
        )
    return TfdsSource(spec_text, items, iterate=_tfrecord_examples(tfds, spec, builder, data_dir, decoders), **keys)


def tfds_to_array_record(name: str, data_dir: Optional[str] = None) -> str:
    """Add array_record shards to a TFDS dataset prepared as TFRecord (needs TensorFlow, once).

    ``name`` is ``NAME[/CONFIG][:VERSION]``. Both formats store the same
    serialized ``tf.train.Example`` records; each TFRecord shard is copied
    record by record, in order, into the array_record shard of the same name
    and number, and ``dataset_info.json`` lists ``array_record`` as an
    alternative format. The split's order, shard lengths and features are
    untouched, so every index names the same example, now read by random
    access without TensorFlow. (TFDS's own ``convert_format`` needs Apache
    Beam.) Returns the dataset's folder.
    """
    import json

    import tensorflow as tf
    import tensorflow_datasets as tfds
    from array_record.python import array_record_module

    from . import files as _io

    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
        raise UsageError(f"TFDS dataset {name!r} is not prepared in {data_dir or 'the default TFDS data dir'}")
    folder = os.fspath(builder.data_dir)
    fmt = getattr(builder.info.file_format, "value", builder.info.file_format)
    if fmt != "tfrecord":
        raise UsageError(f"TFDS dataset {name!r} is stored as {fmt}, not tfrecord")
    for split in builder.info.splits.values():
        for shard, length in zip(split.filenames, split.shard_lengths):
            src = os.path.join(folder, os.path.basename(os.fspath(shard)))
            dst = src.replace(".tfrecord-", ".array_record-")
            tmp = dst + ".incomplete"
            writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")  # TFDS's random-access option
            n = 0
            for record in tf.data.TFRecordDataset(src).as_numpy_iterator():
                writer.write(record)
                n += 1
            writer.close()
            if n != int(length):
                os.unlink(tmp)
                raise LiftcamError(f"{src} holds {n} records, dataset_info.json says {length}")
            os.replace(tmp, dst)
    info_path = os.path.join(folder, "dataset_info.json")
    with open(info_path, encoding="utf-8") as f:
        info = json.load(f)
    info["alternativeFileFormats"] = sorted(set(info.get("alternativeFileFormats", [])) | {"array_record"})
    _io.write_json(info_path, info)
    return folder


# ---------------------------------------------------------------------------
# listing
# ---------------------------------------------------------------------------

def open_inputs(
    inputs: Sequence[str],
    *,
    data_dir: Optional[str] = None,
    download: bool = False,
    max_pixels: Optional[int] = -1,
    image_key: Optional[str] = None,
    label_key: Optional[str] = None,
) -> List[Source]:
    """List the inputs (files, folders, ``.npy``, ``tfds:...``) as sources with unique item ids.

    ``image_key``/``label_key``: the TFDS features holding the image and the
    label (default: the only ``Image`` feature, an error listing them when
    there are several; the only ``ClassLabel`` feature, or ``label``).

    Raises :class:`UsageError` (before any work) for a path that does not
    exist, a folder without images, a missing TFDS dataset or split, or when
    nothing is left to explain. Unusable single inputs are *not* errors here:
    they fail one by one when read.
    """
    if not inputs:
        raise UsageError("no inputs given")
    sources: List[Source] = []
    seen_paths = set()
    files: List[Item] = []

    def flush_files():
        if files:
            sources.append(FileSource(list(files), max_pixels))
            files.clear()

    for spec in inputs:
        spec = os.fspath(spec)
        if spec.startswith("tfds:"):
            flush_files()
            src = _tfds_source(spec, data_dir, download, image_key, label_key)
            src.max_pixels = max_pixels
            sources.append(src)
            continue
        if not os.path.exists(spec):
            raise UsageError(f"input not found: {spec}")
        real = os.path.realpath(spec)
        if os.path.isdir(spec):
            found = _walk_images(spec)
            if not found:
                raise UsageError(
                    f"no images found in folder {spec} (extensions: {' '.join(IMAGE_EXTENSIONS)})"
                )
            for p in found:
                rp = os.path.realpath(p)
                if rp in seen_paths:
                    continue
                seen_paths.add(rp)
                files.append(Item(_file_id(p, spec), p, "image", ref=p))
        elif spec.lower().endswith(".npy"):
            if real in seen_paths:
                continue
            seen_paths.add(real)
            flush_files()
            sources.append(_npy_source(spec))
        else:
            if real in seen_paths:
                continue
            seen_paths.add(real)
            files.append(Item(_file_id(spec, None), spec, "image", ref=spec))
    flush_files()
    _make_ids_unique(sources)
    if not any(s.items for s in sources):
        raise UsageError("no inputs to explain")
    return sources


def _make_ids_unique(sources: Sequence[Source]) -> None:
    """Ids that collide (case-insensitively) get ``_<hash of the source>``; repeated until unique."""
    for _ in range(4):
        count: dict = {}
        for s in sources:
            for it in s.items:
                count[it.id.lower()] = count.get(it.id.lower(), 0) + 1
        if all(c == 1 for c in count.values()):
            return
        for s in sources:
            s.items = [
                dataclasses.replace(it, id=f"{it.id}_{_short_hash(_hash_key(it))}")
                if count[it.id.lower()] > 1 else it
                for it in s.items
            ]
    raise UsageError("cannot give the inputs unique output names")  # pragma: no cover - hash collisions


def _hash_key(item: Item) -> str:
    return item.source if item.source.startswith("tfds:") else os.path.abspath(item.source)


_WNID = re.compile(r"^n\d{8}$")


def label_mapping(label_names: Sequence[str], num_classes: int, *, class_ids: Optional[Sequence[str]] = None,
                  class_names: Optional[Sequence[str]] = None, label_map=None,
                  dataset: str = "the dataset") -> np.ndarray:
    """Dataset label index -> the model's class index (``-1``: the label has no class in the model).

    A dataset's labels are its own numbering, never silently a model's:

    * ``label_map=None`` (auto): label names that are WordNet ids
      (``n01440764``: imagenette, imagenet2012, imagenet_v2, ...) are looked up
      in the model's ``class_ids``; names equal to the model's ``class_names``
      in order map to the same index; anything else is a :class:`UsageError`.
    * ``"identity"``: label ``i`` is class ``i`` (a model trained on the dataset).
    * a dict, or the path of a JSON object: ``{label name or index: class index}``;
      labels it leaves out map to ``-1``.
    """
    names = [str(n) for n in label_names]
    out = np.full((len(names),), -1, np.int64)
    if label_map is None or label_map == "auto":
        if class_ids is not None and names and all(_WNID.match(n) for n in names):
            where = {c: i for i, c in enumerate(class_ids)}
            return np.asarray([where.get(n, -1) for n in names], np.int64)
        if class_names is not None and list(map(str, class_names)) == names:
            return np.arange(len(names), dtype=np.int64)
        shown = ", ".join(repr(n) for n in names[:3]) + (", ..." if len(names) > 3 else "")
        raise UsageError(
            f"the labels of {dataset} ({shown}) are not ImageNet WordNet ids nor the model's class names, so they "
            "cannot be mapped to its classes: pass --label-map identity if label i is the model's class i, or "
            "--label-map FILE.json ({\"label name\": class index, ...}) (Python: label_map=...)")
    if label_map == "identity":
        idx = np.arange(len(names), dtype=np.int64)
        return np.where(idx < num_classes, idx, -1)
    if isinstance(label_map, (str, os.PathLike)):
        import json

        try:
            with open(label_map, encoding="utf-8") as f:
                label_map = json.load(f)
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot read the label map {os.fspath(label_map)!r} (a JSON object "
                             f"{{\"label name\": class index}} or 'identity'): {one_line(e)}") from None
    if not isinstance(label_map, dict):
        raise UsageError(f"a label map is 'identity', a dict or a JSON file, not {type(label_map).__name__}")
    for key, cls in label_map.items():
        key = str(key)
        i = names.index(key) if key in names else (int(key) if key.isdigit() and int(key) < len(names) else None)
        if i is None:
            raise UsageError(f"label map: {key!r} is not a label of {dataset} (labels: {', '.join(names[:5])}"
                             f"{', ...' if len(names) > 5 else ''})")
        if not isinstance(cls, int) or not 0 <= cls < num_classes:
            raise UsageError(f"label map: class {cls!r} for label {key!r} is not a class index 0..{num_classes - 1}")
        out[i] = cls
    return out


def all_items(sources: Sequence[Source]) -> List[Item]:
    return [it for s in sources for it in s.items]
