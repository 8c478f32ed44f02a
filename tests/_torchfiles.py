"""Write PyTorch-format checkpoint files without torch, for tests.

The pickles have the structure ``torch.save`` writes (see
``torch/serialization.py``): tensors reduce to
``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False,
OrderedDict())``, storages are persistent ids ``('storage',
torch.FloatStorage, key, 'cpu', numel)`` (legacy: plus ``view_metadata``),
protocol 2. ``Global(module, name)`` pickles as the ``GLOBAL`` opcode without
importing anything, which also lets tests write malicious references.
"""
from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

STORAGE_NAMES = {
    np.dtype(np.float64): "DoubleStorage", np.dtype(np.float32): "FloatStorage",
    np.dtype(np.float16): "HalfStorage", np.dtype(ml_dtypes.bfloat16): "BFloat16Storage",
    np.dtype(np.int64): "LongStorage", np.dtype(np.int32): "IntStorage",
    np.dtype(np.int16): "ShortStorage", np.dtype(np.int8): "CharStorage",
    np.dtype(np.uint8): "ByteStorage", np.dtype(np.bool_): "BoolStorage",
}


class Global:
    """A reference to ``module.name``, pickled as a GLOBAL opcode (never imported)."""

    def __init__(self, module, name):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle's save_reduce insists the function be callable
        raise TypeError("a Global is only a name")


class Storage:
    """A flat storage: ``data`` is a 1-D numpy array; ``key`` its name in the file."""

    def __init__(self, key, data):
        self.key, self.data = str(key), np.ascontiguousarray(np.asarray(data).reshape(-1))

    def pid(self, legacy):
        pid = ("storage", Global("torch", STORAGE_NAMES[self.data.dtype]), self.key, "cpu", self.data.size)
        return pid + (None,) if legacy else pid


class StorageView:
    """Legacy-format storage view: ``root.data[offset: offset + size]`` under its own key."""

    def __init__(self, key, root, offset, size):
        self.key, self.root, self.offset, self.size = str(key), root, offset, size

    def pid(self, legacy):
        assert legacy, "storage views exist only in the legacy format"
        base = self.root.pid(legacy)[:5]
        return base + ((self.key, self.offset, self.size),)


class Tensor:
    """``_rebuild_tensor_v2(storage, offset, size, stride, ...)`` (or a Parameter of it)."""

    def __init__(self, storage, offset, size, stride, parameter=False):
        self.storage, self.offset = storage, offset
        self.size, self.stride, self.parameter = tuple(size), tuple(stride), parameter

    def __reduce__(self):
        hooks = collections.OrderedDict()
        t = (Global("torch._utils", "_rebuild_tensor_v2"),
             (self.storage, self.offset, self.size, self.stride, False, hooks))
        if not self.parameter:
            return t
        return (Global("torch._utils", "_rebuild_parameter"), (_Reduced(t), True, hooks))

    def expected(self):
        """What the tensor holds, computed independently with numpy indexing."""
        s = self.storage
        data = s.root.data[s.offset: s.offset + s.size] if isinstance(s, StorageView) else s.data
        idx = self.offset + sum(np.arange(n).reshape((-1,) + (1,) * (len(self.size) - k - 1)) * st
                                for k, (n, st) in enumerate(zip(self.size, self.stride)))
        return data[np.asarray(idx, dtype=np.int64)] if self.size else data[self.offset]


class _Reduced:
    def __init__(self, rv):
        self.rv = rv

    def __reduce__(self):
        return self.rv


def tensor(key, array, parameter=False):
    """A contiguous tensor over its own storage."""
    a = np.ascontiguousarray(array)
    strides = tuple(s // a.itemsize for s in a.strides)
    return Tensor(Storage(key, a), 0, a.shape, strides, parameter)


class _Pickler(pickle._Pickler):
    dispatch = pickle._Pickler.dispatch.copy()

    def __init__(self, file, legacy):
        # fix_imports=False: write Python 3 module names (no builtins -> __builtin__ renaming)
        super().__init__(file, protocol=2, fix_imports=False)
        self.legacy = legacy
        self.storages = {}

    def persistent_id(self, obj):
        if isinstance(obj, (Storage, StorageView)):
            root = obj.root if isinstance(obj, StorageView) else obj
            self.storages[root.key] = root
            return obj.pid(self.legacy)
        if isinstance(obj, RawPid):
            return obj.pid
        return None

    def save_global_ref(self, obj):
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("utf-8"))
        self.memoize(obj)

    dispatch[Global] = save_global_ref


class RawPid:
    """An arbitrary persistent id (for malformed/malicious files)."""

    def __init__(self, pid):
        self.pid = pid


def dumps(obj, legacy=False):
    """(pickle bytes, {key: Storage}) in torch's layout."""
    buf = io.BytesIO()
    p = _Pickler(buf, legacy)
    p.dump(obj)
    return buf.getvalue(), p.storages


def raw_bytes(arr, order):
    """The bytes of a 1-D array in byte order ``"<"`` or ``">"`` (bfloat16 via uint16)."""
    if arr.dtype == ml_dtypes.bfloat16:
        arr = arr.view(np.uint16)
    return arr.astype(arr.dtype.newbyteorder(order)).tobytes()


def save_zip(path, obj, folder="archive", byteorder="little", pickle_bytes=None):
    """``torch.save(obj, path)`` (zip format). ``pickle_bytes`` overrides data.pkl."""
    data, storages = dumps(obj)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{folder}/data.pkl", data if pickle_bytes is None else pickle_bytes)
        if byteorder is not None:
            zf.writestr(f"{folder}/byteorder", byteorder)
        for key, s in storages.items():
            zf.writestr(f"{folder}/data/{key}", raw_bytes(s.data, ">" if byteorder == "big" else "<"))
        zf.writestr(f"{folder}/version", "3\n")


def save_legacy(path, obj, pickle_bytes=None):
    """``torch.save(obj, path, _use_new_zipfile_serialization=False)``."""
    data, storages = dumps(obj, legacy=True)
    with open(path, "wb") as f:
        for header in (LEGACY_MAGIC, 1001, {"protocol_version": 1001, "little_endian": True,
                                           "type_sizes": {"short": 2, "int": 4, "long": 4}}):
            pickle.dump(header, f, protocol=2)
        f.write(data if pickle_bytes is None else pickle_bytes)
        keys = sorted(storages)
        pickle.dump(keys, f, protocol=2)
        for key in keys:
            s = storages[key].data
            f.write(struct.pack("<q", s.size))
            f.write(raw_bytes(s, "<"))
