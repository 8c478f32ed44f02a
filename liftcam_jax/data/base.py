"""What every input source gives: :class:`Item` (one input, listed), :class:`Example` (one read) and :class:`Source`."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import LiftcamError

__all__ = ["DataOptions", "Example", "Item", "ItemError", "Source"]


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


@dataclasses.dataclass(frozen=True)
class Example:
    """What reading one item gives: its pixels and, where the source has them, annotations.

    ``image``: uint8 RGB ``(H, W, 3)`` (kind ``image``) or the preprocessed float
    array (kind ``array``); ``label``: the dataset's own label index (not a
    model class: see :func:`~liftcam_jax.data.label_mapping`), or the model's
    class where the source's ``labels_are_classes``; ``label_name``: its name;
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

    What callers may ask of every source (declared here, with their defaults):

    * ``spec``: the input as the user named it (a folder, a ``.npy``, a
      ``tfds:...`` split), ``None`` for loose files;
    * ``label_names``: the dataset's label names, index ``i`` naming label
      ``i`` (``None``: no labels, or labels that are already the model's classes);
    * ``labels_are_classes``: an :class:`Example`'s label is already the
      model's class index (no :func:`~liftcam_jax.data.label_mapping`);
    * ``has_boxes``: examples carry bounding boxes (``False``: localisation is
      undefined for this source, not zero);
    * ``sequential``: read in storage order only (TFRecord): several hosts take
      contiguous blocks of it (:func:`liftcam_jax.distributed.share`);
    * ``random_access``: one item can be read alone (``load``) cheaply;
    * ``max_pixels``: the decompression-bomb limit images are decoded with
      (:func:`~liftcam_jax.data.decode_image`; ``-1``: PIL's limit).
    """

    items: List[Item]
    spec: Optional[str] = None
    label_names: Optional[List[str]] = None
    labels_are_classes: bool = False
    has_boxes: bool = False
    sequential: bool = False
    random_access: bool = True
    max_pixels: Optional[int] = -1

    def read(self, items: Sequence[Item]) -> Iterator[Tuple[Item, Callable[[], Example]]]:
        for it in items:
            yield it, (lambda it=it: Example(self.load(it)))

    def load(self, item: Item) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class DataOptions:
    """How inputs are opened (:func:`~liftcam_jax.data.open_inputs`, :func:`~liftcam_jax.data.open_labelled`).

    ``data_dir``: the TFDS data dir (``None``: TFDS's default,
    ``~/tensorflow_datasets``); ``download``: let TFDS download and prepare a
    missing dataset; ``image_key`` / ``label_key``: the TFDS features holding
    the image and the label (``None``: the only ``Image`` feature; the only
    ``ClassLabel`` feature, or ``label``); ``max_pixels``: the
    decompression-bomb limit of :func:`~liftcam_jax.data.decode_image`
    (``-1``: PIL's ``Image.MAX_IMAGE_PIXELS``; ``None``: no check of ours);
    ``label_map``: dataset labels -> the model's classes, for runs that explain
    or evaluate the labelled class (:func:`~liftcam_jax.data.label_mapping`:
    ``None`` by WordNet id or equal names, ``"identity"``, or a dict / JSON
    file); opening inputs does not read it.
    """

    data_dir: Optional[str] = None
    download: bool = False
    image_key: Optional[str] = None
    label_key: Optional[str] = None
    max_pixels: Optional[int] = -1
    label_map: Any = None

    @classmethod
    def of(cls, options: Optional["DataOptions"], **fields) -> "DataOptions":
        """``options``, or one made of ``fields`` (keyword arguments kept for callers of the old signatures).

        Both at once is a ``TypeError`` unless every field is at its default:
        one way to say each thing.
        """
        if options is None:
            return cls(**fields)
        default = cls()
        given = sorted(k for k, v in fields.items() if v != getattr(default, k))
        if given:
            raise TypeError(f"pass either options= or {', '.join(given)}=, not both")
        return options
