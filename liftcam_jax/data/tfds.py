"""TFDS splits as sources: ``tfds:NAME[/CONFIG][@VERSION]:SPLIT`` read from a local data dir.

``SPLIT`` may be sliced (``validation[:500]``, ``train[10%:20%]``). A split
prepared as ``array_record`` is read without TensorFlow (``tfds.data_source``,
random access); one prepared as ``tfrecord`` needs TensorFlow
(``tfds.load(..., download=False)``, read in order, each example's index
derived from its ``tfds_id``). The image feature (``image`` unless told) is
read as encoded bytes and decoded like a file (:func:`~liftcam_jax.data.decode_image`).
Item ids are ``<name>[/<config>]/<split>/<index>``, the index in the whole
split, zero-padded.

Every mistake is one line that names a step that works
(:mod:`liftcam_jax.data.tfds_prepare`): a misspelt name keeps TFDS's own
"did you mean"; a dataset that is not prepared says how to prepare it, and for
one that needs a manual download (imagenet2012) where its files go and TFDS's
instructions; a split stored as TFRecord without TensorFlow installed names the
one-off conversion :func:`tfds_to_array_record`.
"""
from __future__ import annotations

import dataclasses
import os
import re
import threading
from typing import List, Optional, Sequence

import numpy as np

from ..errors import LiftcamError, UsageError, one_line
from .base import DataOptions, Example, Item, ItemError, Source
from .decode import array_to_rgb, decode_image
from . import tfds_prepare
from .tfds_prepare import absl_quiet, prepared_builder

__all__ = ["TfdsSource", "TfdsSpec", "parse_tfds_spec", "tfds_source", "tfds_to_array_record"]


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
                 label_key: Optional[str] = None, label_names: Optional[Sequence[str]] = None,
                 has_boxes: bool = False, max_pixels: Optional[int] = -1):
        self.spec = spec
        self.items = items
        self._reader = reader
        self._iterate = iterate
        self._lock = threading.Lock()
        self.image_key = image_key
        self.label_key = label_key
        self.label_names = None if label_names is None else list(label_names)
        self.has_boxes = has_boxes
        self.max_pixels = max_pixels

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


def _tfrecord_examples(tfds, builder, decoders):
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


def _import_tfds(spec_text: str):
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:  # pragma: no cover - a dependency
        raise UsageError(f"TFDS input {spec_text!r} needs tensorflow-datasets (pip install tensorflow-datasets): "
                         f"{e}") from None
    return tfds


def _split_items(spec: TfdsSpec, instructions, splits) -> List[Item]:
    """One :class:`Item` per example the (sliced) split names, id ``<name>/<split>/<index in the split>``."""
    at = "" if spec.version is None else f"@{spec.version}"
    items: List[Item] = []
    for ins in instructions:
        n = splits[ins.splitname].num_examples
        lo = 0 if ins.from_ is None else ins.from_
        hi = n if ins.to is None else ins.to
        width = max(5, len(str(max(n - 1, 0))))
        for i in range(lo, hi):
            ident = f"{spec.name}/{ins.splitname}/{i:0{width}d}"
            items.append(Item(ident, f"tfds:{spec.name}{at}:{ins.splitname}[{i}]", "image", ref=(ins.splitname, i)))
    return items


def _has_boxes(features) -> bool:
    """Whether examples carry ``objects/bbox`` or ``bbox`` (what :meth:`TfdsSource.annotate` reads)."""
    objects = features["objects"] if "objects" in features.keys() else None
    return "bbox" in features.keys() or "bboxes" in features.keys() or (
        objects is not None and hasattr(objects, "keys") and "bbox" in objects.keys())


def _formats(info) -> List[str]:
    formats = [info.file_format] + list(getattr(info, "alternative_file_formats", None) or [])
    return [getattr(f, "value", f) for f in formats if f is not None]


def tfds_source(spec_text: str, options: Optional[DataOptions] = None) -> TfdsSource:
    """The TFDS split ``spec_text`` (``tfds:NAME[/CONFIG][@VERSION]:SPLIT``) as a :class:`TfdsSource`.

    array_record splits are read by random access without TensorFlow; TFRecord
    ones in order with TensorFlow. :class:`UsageError` (one line, naming a step
    that works) for an unknown or unprepared dataset, a bad split or feature,
    or TFRecord files without TensorFlow.
    """
    options = options or DataOptions()
    spec = parse_tfds_spec(spec_text)
    tfds = _import_tfds(spec_text)
    name, where = spec.name, options.data_dir or "the default TFDS data dir (~/tensorflow_datasets)"
    with absl_quiet():
        builder = prepared_builder(tfds, spec, options)
        splits = builder.info.splits
        try:
            instructions = tfds.core.ReadInstruction.from_spec(spec.split).to_absolute(splits)
        except Exception as e:
            raise UsageError(f"bad split {spec.split!r} for TFDS dataset {name!r} ({one_line(e)}); "
                             f"splits: {', '.join(sorted(splits))}") from None
        features = builder.info.features
        image_key = _feature_key(features, tfds.features.Image, options.image_key, "image", name, required=True)
        label_key = _feature_key(features, tfds.features.ClassLabel, options.label_key, "label", name, required=False)
        keys = dict(image_key=image_key, label_key=label_key, has_boxes=_has_boxes(features),
                    label_names=None if label_key is None else list(features[label_key].names),
                    max_pixels=options.max_pixels)
        items = _split_items(spec, instructions, splits)
        decoders = {image_key: tfds.decode.SkipDecoding()}
        formats = _formats(builder.info)
        split_names = list(dict.fromkeys(ins.splitname for ins in instructions))
        if "array_record" in formats:
            try:
                readers = {s: builder.as_data_source(split=s, decoders=decoders) for s in split_names}
            except Exception as e:
                raise UsageError(f"cannot open TFDS dataset {name!r} in {where}: {one_line(e)}") from None
            return TfdsSource(spec_text, items, reader=_SplitReader(readers), **keys)
        if not tfds_prepare.tf_available():
            dd = options.data_dir or "~/tensorflow_datasets"
            raise UsageError(
                f"TFDS dataset {spec.tfds_name!r} in {where} is stored as {', '.join(formats) or 'tfrecord'}, "
                f"which needs TensorFlow to read: pip install tensorflow-cpu; or, where TensorFlow is installed, "
                f"convert it once to array_record (then read without it): "
                f"python -c \"import liftcam_jax.data as d; d.tfds_to_array_record({spec.tfds_name!r}, {dd!r})\""
            )
        return TfdsSource(spec_text, items, iterate=_tfrecord_examples(tfds, builder, decoders), **keys)


class _SplitReader:
    """``reader[(split, index)]``: one TFDS data source per split."""

    def __init__(self, readers: dict):
        self._readers = readers

    def __getitem__(self, ref):
        return self._readers[ref[0]][ref[1]]

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

    from .. import files

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
    files.write_json(info_path, info)
    return folder
