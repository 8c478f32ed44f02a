"""Listing the inputs of a run: :func:`open_inputs` (explain) and :func:`open_labelled` (evaluate).

Every :class:`~liftcam_jax.data.Item` gets an ``id``: a relative, path-safe
name (no extension) for its outputs, unique within a run (see
:mod:`liftcam_jax.data.local` and :mod:`liftcam_jax.data.tfds` for each kind).
Ids that still collide (the same file name in two folders given by name,
``a.jpg`` beside ``a.png``; compared case-insensitively) each get
``_<8 hex digits of a hash of the source>``.
"""
from __future__ import annotations

import dataclasses
import os
from typing import List, Optional, Sequence

from ..errors import UsageError
from .base import DataOptions, Item, Source
from .local import IMAGE_EXTENSIONS, FileSource, LabelledFolder, file_id, npy_source, short_hash, walk_images
from .tfds import tfds_source

__all__ = ["open_inputs", "open_labelled"]


def open_inputs(
    inputs: Sequence[str],
    *,
    data_dir: Optional[str] = None,
    download: bool = False,
    max_pixels: Optional[int] = -1,
    image_key: Optional[str] = None,
    label_key: Optional[str] = None,
    options: Optional[DataOptions] = None,
) -> List[Source]:
    """List the inputs (files, folders, ``.npy``, ``tfds:...``) as sources with unique item ids.

    ``options`` (a :class:`~liftcam_jax.data.DataOptions`) or the keyword
    arguments of the same names, not both: ``data_dir``/``download`` for
    ``tfds:`` inputs; ``image_key``/``label_key``: the TFDS features holding the
    image and the label (default: the only ``Image`` feature, an error listing
    them when there are several; the only ``ClassLabel`` feature, or
    ``label``); ``max_pixels``: the decompression-bomb limit.

    Raises :class:`UsageError` (before any work) for a path that does not
    exist, a folder without images, a missing TFDS dataset or split, or when
    nothing is left to explain. Unusable single inputs are *not* errors here:
    they fail one by one when read.
    """
    opts = DataOptions.of(options, data_dir=data_dir, download=download, max_pixels=max_pixels,
                          image_key=image_key, label_key=label_key)
    if not inputs:
        raise UsageError("no inputs given")
    sources: List[Source] = []
    seen_paths = set()
    files: List[Item] = []

    def flush_files():
        if files:
            sources.append(FileSource(list(files), opts.max_pixels))
            files.clear()

    def first_time(path: str) -> bool:
        real = os.path.realpath(path)
        new = real not in seen_paths
        seen_paths.add(real)
        return new

    for spec in map(os.fspath, inputs):
        if spec.startswith("tfds:"):
            flush_files()
            sources.append(tfds_source(spec, opts))
        elif not os.path.exists(spec):
            raise UsageError(f"input not found: {spec}")
        elif os.path.isdir(spec):
            found = walk_images(spec)
            if not found:
                raise UsageError(f"no images found in folder {spec} (extensions: {' '.join(IMAGE_EXTENSIONS)})")
            files.extend(Item(file_id(p, spec), p, "image", ref=p) for p in found if first_time(p))
        elif not first_time(spec):
            continue
        elif spec.lower().endswith(".npy"):
            flush_files()
            sources.append(npy_source(spec))
        else:
            files.append(Item(file_id(spec, None), spec, "image", ref=spec))
    flush_files()
    _make_ids_unique(sources)
    if not any(s.items for s in sources):
        raise UsageError("no inputs to explain")
    return sources


def open_labelled(spec: str, *, data_dir: Optional[str] = None, image_key: Optional[str] = None,
                  label_key: Optional[str] = None, max_pixels: Optional[int] = -1,
                  options: Optional[DataOptions] = None) -> Source:
    """Labelled images for evaluation: a :class:`~liftcam_jax.data.LabelledFolder`, or a TFDS split with a ``ClassLabel``.

    Reading either yields :class:`~liftcam_jax.data.Example` s with ``label``
    (and ``boxes`` where the data has them). A folder's labels are the model's
    class indices; a TFDS split's are the dataset's own, mapped with
    :func:`~liftcam_jax.data.label_mapping`. ``options`` or the keyword
    arguments, as for :func:`open_inputs` (a dataset is never downloaded here).
    """
    opts = DataOptions.of(options, data_dir=data_dir, image_key=image_key, label_key=label_key,
                          max_pixels=max_pixels)
    spec = os.fspath(spec)
    if spec.startswith("tfds:"):
        src = tfds_source(spec, dataclasses.replace(opts, download=False))
        if src.label_key is None:
            raise UsageError(f"{spec} has no ClassLabel feature to evaluate against; name one with --label-key")
        return src
    return LabelledFolder(spec, opts.max_pixels)


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
                dataclasses.replace(it, id=f"{it.id}_{short_hash(_hash_key(it))}")
                if count[it.id.lower()] > 1 else it
                for it in s.items
            ]
    raise UsageError("cannot give the inputs unique output names")  # pragma: no cover - hash collisions


def _hash_key(item: Item) -> str:
    return item.source if item.source.startswith("tfds:") else os.path.abspath(item.source)
