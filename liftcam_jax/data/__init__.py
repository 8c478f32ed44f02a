"""Inputs for batch explaining and evaluation: decoding any image to RGB, and listing sources.

Sources (:func:`open_inputs`), each listed cheaply (names only, nothing decoded):

* an image file; a folder (searched recursively, sorted, by extension: see
  :data:`IMAGE_EXTENSIONS`);
* a ``.npy`` float array ``(N, H, W, 3)`` (or one ``(H, W, 3)`` image) of
  inputs *already preprocessed* for the model: no resizing or normalisation is
  applied; it is memory-mapped, one row read at a time;
* a TFDS split ``tfds:NAME[/CONFIG][@VERSION]:SPLIT`` (``SPLIT`` may be sliced,
  ``validation[:500]``, ``train[10%:20%]``) read from a local data dir. A split
  prepared as ``array_record`` is read without TensorFlow
  (``tfds.data_source``, random access); one prepared as ``tfrecord`` needs
  TensorFlow (``tfds.load(..., download=False)``, read in order). The image
  feature is ``image``, read as encoded bytes and decoded here like a file.

Labelled sources for evaluation (:func:`open_labelled`): a
:class:`LabelledFolder` (``labels.csv``, optional ``boxes.csv``) or a TFDS
split with a ``ClassLabel``; a dataset's labels become a model's classes with
:func:`label_mapping`.

Every :class:`Item` has an ``id``: a relative, path-safe name (no extension)
for its outputs, unique within a run: a file given by name -> its stem; a file
found in a folder -> ``<folder name>/<relative path without extension>``;
``x.npy`` row ``i`` -> ``x_<i>``; TFDS -> ``<name>[/<config>]/<split>/<index>``
(the index in the whole split, zero-padded). Ids that still collide (the same
file name in two folders given by name, ``a.jpg`` beside ``a.png``; compared
case-insensitively) each get ``_<8 hex digits of a hash of the source>``.

Decoding (:func:`decode_image`, :func:`to_rgb`, :func:`array_to_rgb`) turns
every PIL mode into RGB uint8 (see :mod:`liftcam_jax.data.decode` for the rules:
EXIF orientation, CMYK through ICC, 16-bit and float scaling, transparency
composited on white, the decompression-bomb limit).

Modules: :mod:`~liftcam_jax.data.base` (:class:`Item`, :class:`Example`,
:class:`ItemError`, :class:`Source`, :class:`DataOptions`),
:mod:`~liftcam_jax.data.decode`, :mod:`~liftcam_jax.data.local` (files,
folders, ``.npy``, labelled folders), :mod:`~liftcam_jax.data.tfds` (TFDS
splits, the TFRecord reader, :func:`tfds_to_array_record`),
:mod:`~liftcam_jax.data.tfds_prepare` (finding and preparing a TFDS dataset,
its one-line errors), :mod:`~liftcam_jax.data.labels`
(:func:`label_mapping`), :mod:`~liftcam_jax.data.inputs` (:func:`open_inputs`,
:func:`open_labelled`).
"""
from .base import DataOptions, Example, Item, ItemError, Source
from .decode import array_to_rgb, decode_image, to_rgb
from .inputs import open_inputs, open_labelled
from .labels import label_mapping
from .local import IMAGE_EXTENSIONS, FileSource, LabelledFolder, NpySource
from .tfds import TfdsSource, TfdsSpec, parse_tfds_spec, tfds_source, tfds_to_array_record

__all__ = [
    "IMAGE_EXTENSIONS",
    "DataOptions",
    "Example",
    "FileSource",
    "Item",
    "ItemError",
    "LabelledFolder",
    "NpySource",
    "Source",
    "TfdsSource",
    "TfdsSpec",
    "array_to_rgb",
    "decode_image",
    "label_mapping",
    "open_inputs",
    "open_labelled",
    "parse_tfds_spec",
    "tfds_source",
    "tfds_to_array_record",
    "to_rgb",
]
