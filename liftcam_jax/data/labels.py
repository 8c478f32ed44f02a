"""A dataset's labels -> a model's classes (:func:`label_mapping`): never silently the same numbering."""
from __future__ import annotations

import os
import re
from typing import Optional, Sequence

import numpy as np

from ..errors import UsageError, one_line

__all__ = ["label_mapping"]

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
