"""Read PyTorch checkpoints and safetensors into numpy, safely, without torch.

``torch.load`` unpickles, and unpickling can call any Python function the file
names. This module never imports torch and never runs code from a file: the
pickle is read by a restricted :class:`pickle.Unpickler` whose ``find_class``
only hands out this module's own stand-ins for an explicit allow-list of
globals (:data:`ALLOWED_GLOBALS`: ``collections.OrderedDict``, torch's
``_rebuild_tensor``/``_v2``/``_v3``, ``_rebuild_parameter`` (``_with_state``),
``_rebuild_from_type_v2``, the ``torch.*Storage`` types, ``torch.<dtype>``,
``torch.Size``, ``torch.device``, ``torch.Tensor``/``Parameter`` as type tags,
and ``_codecs.encode`` for latin-1 bytes). Anything else -- ``os.system``,
``builtins.eval``, ``subprocess.Popen``, a pickled ``nn.Module`` class -- is
refused with a :class:`~liftcam_jax.errors.UsageError` naming the global,
before anything is called. ``persistent_load`` accepts only the ``('storage',
...)`` tuples torch writes, and every tensor view is bounds-checked against its
storage before numpy touches memory.

The three formats (detected from the content, not the file name):

* **zip** (``torch.save`` default since torch 1.6): a zip archive with one
  top-level folder (``archive/``, or the file's stem) holding ``data.pkl``
  (the pickled object), ``data/<key>`` (one raw file per storage) and
  ``byteorder`` (``little`` if absent). A tensor in the pickle is
  ``_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)``
  where ``storage`` is the persistent id ``('storage', torch.FloatStorage,
  key, location, numel)``. Dtypes new in torch 2.x (uint16, float8, ...) use
  ``_rebuild_tensor_v3(..., dtype)`` over a ``torch.UntypedStorage`` whose
  ``numel`` counts bytes.
* **legacy** (``_use_new_zipfile_serialization=False``, torch < 1.6): five
  pickles back to back -- the magic number ``0x1950a86a20f9469cfc6c``, the
  protocol version 1001, a sys-info dict, the object (persistent ids carry a
  sixth field ``view_metadata = None | (view_key, offset, size)`` for storage
  views), and the sorted list of storage keys -- followed, for each key, by an
  8-byte little-endian element count and the raw little-endian storage bytes.
* **safetensors**: an 8-byte little-endian header length, a JSON header
  ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__":
  {...}}``, then the raw little-endian data.

Tensors become C-contiguous numpy arrays (views and shared storages are
copied out, so no two arrays alias); bfloat16 and float8 use ``ml_dtypes``.

:func:`load_state_dict` then unwraps the state dict, see its docstring.
"""
from __future__ import annotations

import collections
import json
import os
import pickle
import struct
import zipfile
from typing import Any, Dict, Mapping, Optional

import ml_dtypes
import numpy as np

from liftcam_jax.errors import UsageError

__all__ = ["load_state_dict", "load_checkpoint", "save_safetensors", "ALLOWED_GLOBALS"]

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

# torch storage class name -> element dtype (UntypedStorage counts bytes).
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "ComplexFloatStorage": np.complex64,
    "ComplexDoubleStorage": np.complex128,
    "UntypedStorage": np.uint8,
}

# torch.<dtype> attribute name -> numpy dtype (for _rebuild_tensor_v3).
_TORCH_DTYPES = {
    "float64": np.float64, "double": np.float64,
    "float32": np.float32, "float": np.float32,
    "float16": np.float16, "half": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
    "int64": np.int64, "long": np.int64,
    "int32": np.int32, "int": np.int32,
    "int16": np.int16, "short": np.int16,
    "int8": np.int8,
    "uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64,
    "bool": np.bool_,
    "complex64": np.complex64, "cfloat": np.complex64,
    "complex128": np.complex128, "cdouble": np.complex128,
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn, "float8_e5m2": ml_dtypes.float8_e5m2,
    "float8_e4m3fnuz": ml_dtypes.float8_e4m3fnuz, "float8_e5m2fnuz": ml_dtypes.float8_e5m2fnuz,
}

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}


class _Corrupt(Exception):
    """Internal: the file is malformed; turned into a UsageError naming the path."""


# --------------------------------------------------------------------------
# Stand-ins the restricted unpickler hands out instead of torch objects.
# --------------------------------------------------------------------------


class _Marker:
    """Base of the stand-ins: inert, and refusing pickle BUILD (``__setstate__``)."""

    __slots__ = ()

    def __setstate__(self, state):
        raise _Corrupt(f"unexpected state for {self!r}")


class _StorageType(_Marker):
    __slots__ = ("name", "dtype")

    def __init__(self, name, dtype):
        self.name, self.dtype = name, np.dtype(dtype)

    def __repr__(self):
        return f"torch.{self.name}"


class _DType(_Marker):
    __slots__ = ("name", "dtype")

    def __init__(self, name, dtype):
        self.name, self.dtype = name, np.dtype(dtype)

    def __repr__(self):
        return f"torch.{self.name}"


class _TypeTag(_Marker):
    """``torch.Tensor`` / ``torch.nn.Parameter`` as used by ``_rebuild_from_type_v2``."""

    __slots__ = ("name",)

    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return self.name


class _Storage(_Marker):
    """A storage named by a persistent id; ``raw`` (bytes) is filled in after unpickling.

    ``base = (root, element_offset)`` for a legacy-format storage view.
    """

    __slots__ = ("key", "dtype", "numel", "base", "raw")

    def __init__(self, key, dtype, numel, base=None):
        self.key, self.dtype, self.numel, self.base, self.raw = key, dtype, numel, base, None

    @property
    def nbytes(self):
        return self.numel * self.dtype.itemsize

    def __repr__(self):
        return f"<storage {self.key!r} {self.dtype} x{self.numel}>"


class _Tensor(_Marker):
    """``storage[offset + sum(i_k * stride_k)]`` for ``i`` in ``size``, as ``dtype``."""

    __slots__ = ("storage", "offset", "size", "stride", "dtype")

    def __init__(self, storage, offset, size, stride, dtype=None):
        if not isinstance(storage, _Storage):
            raise _Corrupt(f"tensor rebuilt from {type(storage).__name__}, not a storage")
        size, stride = _int_tuple(size, "size"), _int_tuple(stride, "stride")
        if not _is_int(offset) or offset < 0 or len(size) != len(stride):
            raise _Corrupt(f"bad tensor geometry offset={offset!r} size={size} stride={stride}")
        if dtype is not None and not isinstance(dtype, _DType):
            raise _Corrupt(f"bad tensor dtype {dtype!r}")
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride
        self.dtype = storage.dtype if dtype is None else dtype.dtype


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _int_tuple(xs, what):
    if not isinstance(xs, (tuple, list)) or not all(_is_int(x) and x >= 0 for x in xs):
        raise _Corrupt(f"bad tensor {what} {xs!r}")
    return tuple(xs)


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _Tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    return _Tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       dtype, metadata=None):
    return _Tensor(storage, storage_offset, size, stride, dtype)


def _rebuild_parameter(data, requires_grad, backward_hooks):
    if not isinstance(data, _Tensor):
        raise _Corrupt(f"parameter rebuilt from {type(data).__name__}, not a tensor")
    return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    return _rebuild_parameter(data, requires_grad, backward_hooks)


_REBUILDERS = (_rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3,
               _rebuild_parameter, _rebuild_parameter_with_state)


def _rebuild_from_type_v2(func, new_type, args, state):
    if func not in _REBUILDERS or not isinstance(new_type, _TypeTag) or not isinstance(args, tuple):
        raise _Corrupt("_rebuild_from_type_v2 with an unexpected function or type")
    return func(*args)


def _torch_size(dims=()):
    return _int_tuple(dims, "torch.Size")


def _torch_device(kind, index=None):
    if not isinstance(kind, str) or not (index is None or _is_int(index)):
        raise _Corrupt(f"bad torch.device({kind!r}, {index!r})")
    return kind if index is None else f"{kind}:{index}"


def _codecs_encode(text, encoding="utf-8"):
    # Protocol-2 pickles store bytes as _codecs.encode(str, "latin1").
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Corrupt("_codecs.encode used for something other than latin-1 bytes")
    return text.encode("latin1")


def _allow_list():
    allowed = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
        ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
        ("torch._tensor", "Tensor"): _TypeTag("torch.Tensor"),
        ("torch", "Tensor"): _TypeTag("torch.Tensor"),
        ("torch.nn.parameter", "Parameter"): _TypeTag("torch.nn.Parameter"),
        ("torch", "Size"): _torch_size,
        ("torch", "device"): _torch_device,
        ("_codecs", "encode"): _codecs_encode,
    }
    for name, dtype in _STORAGE_DTYPES.items():
        for module in ("torch", "torch.cuda", "torch.storage"):
            allowed[(module, name)] = _StorageType(name, dtype)
    for name, dtype in _TORCH_DTYPES.items():
        allowed[("torch", name)] = _DType(name, dtype)
    return allowed


_ALLOWED = _allow_list()

#: The ``module.name`` globals a checkpoint pickle may reference; all else is refused.
ALLOWED_GLOBALS = frozenset(f"{m}.{n}" for m, n in _ALLOWED)


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves globals only from the allow-list and storages only by key."""

    def __init__(self, file, path, storages: Optional[Dict[str, _Storage]] = None, legacy=False):
        super().__init__(file)
        self.path, self.storages, self.legacy = path, storages, legacy

    def find_class(self, module, name):
        found = _ALLOWED.get((module, name))
        if found is None:
            hint = ("it is a TorchScript archive (torch.jit.save); torch.save(model.state_dict()) instead"
                    if module.startswith("__torch__") else
                    "save a plain state dict (torch.save(model.state_dict(), path)) or a .safetensors file")
            raise UsageError(
                f"refusing to load {self.path}: its pickle references the global '{module}.{name}', "
                f"which is not on the allow-list of checkpoint types (tensors, storages, dtypes, "
                f"OrderedDict); nothing from the file was run; {hint}")
        return found

    def persistent_load(self, pid):
        if self.storages is None:
            raise _Corrupt(f"unexpected persistent id {pid!r}")
        if not (isinstance(pid, tuple) and len(pid) == (6 if self.legacy else 5) and pid[0] == "storage"):
            raise UsageError(
                f"refusing to load {self.path}: persistent id {_short(pid)} is not a torch "
                f"('storage', type, key, location, numel) reference")
        stype, key, _location, numel = pid[1:5]
        if not (isinstance(stype, _StorageType) and isinstance(key, str) and _is_int(numel) and numel >= 0):
            raise _Corrupt(f"bad storage reference {_short(pid)}")
        root = self.storages.get(key)
        if root is None:
            root = self.storages[key] = _Storage(key, stype.dtype, numel)
        elif root.dtype != stype.dtype or root.numel != numel:
            raise _Corrupt(f"storage {key!r} declared twice with different types or sizes")
        view = pid[5] if self.legacy else None
        if view is None:
            return root
        if not (isinstance(view, tuple) and len(view) == 3 and isinstance(view[0], str)
                and _is_int(view[1]) and _is_int(view[2]) and view[1] >= 0 and view[2] >= 0
                and view[1] + view[2] <= numel):
            raise _Corrupt(f"bad storage view {_short(view)}")
        view_key, offset, size = view
        found = self.storages.get(view_key)
        if found is None:
            found = self.storages[view_key] = _Storage(view_key, root.dtype, size, base=(root, offset))
        return found


def _short(obj, limit=80):
    text = repr(obj)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------
# Turning stand-ins into numpy.
# --------------------------------------------------------------------------


def _swap_bytes(raw: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Big-endian bytes -> native: swap within each scalar (each half of a complex)."""
    unit = dtype.itemsize // 2 if dtype in (np.complex64, np.complex128) else dtype.itemsize
    if unit == 1:
        return raw
    return raw.view(np.dtype(f"u{unit}")).byteswap().view(np.uint8)


def _tensor_array(t: _Tensor, big_endian=False) -> np.ndarray:
    raw = t.storage.raw
    itemsize = t.dtype.itemsize
    if big_endian:
        raw = _swap_bytes(raw[: raw.size // itemsize * itemsize], t.dtype)
    # as_strided goes through __array_interface__, which cannot spell ml_dtypes
    # (float8): stride over opaque itemsize-byte records, then reinterpret.
    data = raw[: raw.size // itemsize * itemsize].view(np.dtype((np.void, itemsize)))
    if 0 in t.size:
        return np.zeros(t.size, t.dtype)
    last = t.offset + sum((n - 1) * s for n, s in zip(t.size, t.stride))
    if last >= data.size:
        raise _Corrupt(f"tensor of size {t.size}, stride {t.stride}, offset {t.offset} reads past the "
                       f"end of storage {t.storage.key!r} ({data.size} elements)")
    view = np.lib.stride_tricks.as_strided(
        data[t.offset:], shape=t.size, strides=tuple(s * itemsize for s in t.stride), writeable=False)
    return np.array(view, order="C").view(t.dtype)


def _to_numpy(obj, big_endian=False):
    """Replace stand-ins by arrays/strings in a tree of dicts, lists and tuples."""
    on_path = set()

    def walk(x):
        if isinstance(x, _Tensor):
            return _tensor_array(x, big_endian)
        if isinstance(x, _Storage):  # a bare storage saved as an object
            return _tensor_array(_Tensor(x, 0, (x.numel,), (1,)), big_endian)
        if isinstance(x, _Marker):
            return repr(x)
        if isinstance(x, (dict, list, tuple, set, frozenset)):
            if id(x) in on_path:
                raise _Corrupt("the pickled object contains itself")
            on_path.add(id(x))
            try:
                if isinstance(x, dict):
                    return {k: walk(v) for k, v in x.items()}
                return type(x)(walk(v) for v in x)
            finally:
                on_path.discard(id(x))
        return x

    return walk(obj)


# --------------------------------------------------------------------------
# The three formats.
# --------------------------------------------------------------------------


def _load_zip(path):
    with zipfile.ZipFile(path) as zf:
        pkls = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise _Corrupt(f"expected one '<folder>/data.pkl' in the zip archive, found {len(pkls)}")
        prefix = pkls[0][: -len("data.pkl")]
        names = set(zf.namelist())
        order = "little"
        if prefix + "byteorder" in names:
            order = zf.read(prefix + "byteorder").decode("ascii", "replace").strip()
            if order not in ("little", "big"):
                raise _Corrupt(f"unknown byteorder {order!r}")
        storages: Dict[str, _Storage] = {}
        with zf.open(pkls[0]) as f:
            obj = _RestrictedUnpickler(f, path, storages).load()
        for s in storages.values():
            name = f"{prefix}data/{s.key}"
            if name not in names:
                raise _Corrupt(f"storage file {name!r} is missing")
            if zf.getinfo(name).file_size < s.nbytes:
                raise _Corrupt(f"storage file {name!r} holds {zf.getinfo(name).file_size} bytes, "
                               f"expected {s.nbytes}")
            s.raw = np.frombuffer(zf.read(name), np.uint8)[: s.nbytes]
    return _to_numpy(obj, big_endian=(order == "big"))


def _read_exact(f, n, what):
    data = f.read(n)
    if len(data) != n:
        raise _Corrupt(f"file ends inside {what} (wanted {n} bytes, got {len(data)})")
    return data


def _load_legacy(path):
    with open(path, "rb") as f:
        try:
            magic = _RestrictedUnpickler(f, path).load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError) as e:
            if isinstance(e, UsageError):
                raise
            magic = None
        if magic != LEGACY_MAGIC:
            raise UsageError(f"unknown checkpoint format: {path} is a pickle but not a torch.save file "
                             f"(no magic number); expected a PyTorch zip/legacy checkpoint or .safetensors")
        protocol = _RestrictedUnpickler(f, path).load()
        if protocol != LEGACY_PROTOCOL:
            raise _Corrupt(f"unsupported legacy protocol version {protocol!r}")
        sys_info = _RestrictedUnpickler(f, path).load()
        if not isinstance(sys_info, dict):
            raise _Corrupt("bad sys-info record")
        storages: Dict[str, _Storage] = {}
        obj = _RestrictedUnpickler(f, path, storages, legacy=True).load()
        keys = _RestrictedUnpickler(f, path).load()
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise _Corrupt("bad storage key list")
        for key in keys:
            s = storages.get(key)
            if s is None or s.base is not None:
                raise _Corrupt(f"storage {key!r} is listed but not referenced by the pickle")
            (count,) = struct.unpack("<q", _read_exact(f, 8, f"storage {key!r} header"))
            if count != s.numel:
                raise _Corrupt(f"storage {key!r} holds {count} elements, expected {s.numel}")
            s.raw = np.frombuffer(_read_exact(f, s.nbytes, f"storage {key!r}"), np.uint8)
    for s in storages.values():
        if s.base is not None:
            root, offset = s.base
            if root.raw is None:
                raise _Corrupt(f"storage {root.key!r} is referenced but not stored")
            start = offset * s.dtype.itemsize
            s.raw = root.raw[start: start + s.nbytes]
        elif s.raw is None:
            raise _Corrupt(f"storage {s.key!r} is referenced but not stored")
    return _to_numpy(obj)


def _load_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise _Corrupt(f"header length {n} exceeds the file size")
    try:
        header = json.loads(data[8: 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _Corrupt(f"bad JSON header ({e})") from None
    if not isinstance(header, dict):
        raise _Corrupt("header is not a JSON object")
    header.pop("__metadata__", None)
    buf = memoryview(data)[8 + n:]
    out = {}
    for name, info in header.items():
        try:
            dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
            shape = _int_tuple(info["shape"], "shape")
            begin, end = info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise _Corrupt(f"bad header entry for {name!r}: {_short(info)}") from None
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if not (_is_int(begin) and _is_int(end) and 0 <= begin <= end <= len(buf) and end - begin == nbytes):
            raise _Corrupt(f"tensor {name!r} has data_offsets {[begin, end]} inconsistent with "
                           f"shape {shape} {info['dtype']} and {len(buf)} data bytes")
        out[name] = np.frombuffer(buf[begin:end], dtype.newbyteorder("<") if dtype.itemsize > 1
                                  and dtype.kind != "V" else dtype).astype(dtype).reshape(shape)
    return out


def _sniff(path, head: bytes):
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if head.startswith((b"\x80", b"\x8a\x0a", b"L%d" % LEGACY_MAGIC)):  # pickle protocol >= 2, 1, 0
        return "legacy"
    if len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < os.path.getsize(path):
        return "safetensors"
    return None


def load_checkpoint(path) -> Any:
    """The whole checkpoint object, with tensors as numpy arrays.

    Dicts (``OrderedDict`` included) become plain dicts in file order, lists
    and tuples stay, tensors and ``nn.Parameter`` become C-contiguous numpy
    arrays, dtypes and devices become strings. A safetensors file gives a
    dict of arrays. See the module docstring for formats and the allow-list.

    Raises:
      UsageError: missing file, unknown format, truncated or corrupt file, or a
        pickle that references a global outside :data:`ALLOWED_GLOBALS`.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UsageError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        raise UsageError(f"checkpoint path is a directory, not a file: {path}")
    with open(path, "rb") as f:
        head = f.read(32)
    if not head:
        raise UsageError(f"checkpoint file is empty: {path}")
    kind = _sniff(path, head)
    if kind is None:
        raise UsageError(f"unknown checkpoint format: {path} is neither a PyTorch checkpoint "
                         f"(zip or legacy torch.save) nor a .safetensors file")
    loader = {"zip": _load_zip, "legacy": _load_legacy, "safetensors": _load_safetensors}[kind]
    what = {"zip": "PyTorch zip", "legacy": "legacy PyTorch", "safetensors": "safetensors"}[kind]
    try:
        return loader(path)
    except UsageError:
        raise
    except _Corrupt as e:
        raise UsageError(f"corrupt {what} checkpoint {path}: {e}") from None
    except (EOFError, pickle.UnpicklingError, zipfile.BadZipFile, zipfile.LargeZipFile,
            struct.error, ValueError, TypeError, KeyError, IndexError, AttributeError,
            UnicodeDecodeError, OverflowError, MemoryError, RecursionError) as e:
        raise UsageError(f"truncated or corrupt {what} checkpoint {path}: "
                         f"{type(e).__name__}: {e}") from None


#: Keys under which training checkpoints commonly nest the model's state dict,
#: in the order they are tried by :func:`load_state_dict`.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net")


def _is_state_dict(obj):
    return isinstance(obj, dict) and all(isinstance(k, str) and isinstance(v, np.ndarray)
                                         for k, v in obj.items())


def _describe(obj):
    if not isinstance(obj, dict):
        return f"a {type(obj).__name__}"
    keys = ", ".join(f"{k!r} ({type(v).__name__})" for k, v in list(obj.items())[:12])
    return f"a dict with keys {keys}" + (", ..." if len(obj) > 12 else "")


def load_state_dict(path, *, key: Optional[str] = None) -> Dict[str, np.ndarray]:
    """A flat ``{name: np.ndarray}`` state dict from a checkpoint, in file order.

    What is unwrapped, exactly:

    * a dict whose values are all tensors is the state dict;
    * otherwise ``key`` if given (e.g. ``key="state_dict_ema"``), else the first
      of :data:`WRAPPER_KEYS` (``state_dict``, ``model_state_dict``, ``model``,
      ``net``) holding a dict is descended into, up to three levels deep
      (``{"model": {"state_dict": {...}}}``);
    * if then every key starts with ``module.`` (``nn.DataParallel`` /
      ``DistributedDataParallel``), that prefix is stripped.

    Nothing else is guessed: a checkpoint without a recognisable state dict is
    a :class:`UsageError` that lists its top-level keys. Errors of
    :func:`load_checkpoint` apply.
    """
    obj = load_checkpoint(path)
    if key is not None:
        if not isinstance(obj, dict) or key not in obj:
            raise UsageError(f"checkpoint {path} has no entry {key!r}; it is {_describe(obj)}")
        obj = obj[key]
    for _ in range(3):
        if _is_state_dict(obj) or not isinstance(obj, dict):
            break
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not _is_state_dict(obj):
        raise UsageError(f"no state dict found in {path}: expected a dict of tensors (possibly under "
                         f"one of {list(WRAPPER_KEYS)}), got {_describe(obj)}; pass key=... to choose")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def save_safetensors(path, tensors: Mapping[str, Any], metadata: Optional[Mapping[str, str]] = None):
    """Write ``{name: array}`` as a .safetensors file (little-endian, in the given order).

    Handy to turn a trusted ``torch.load``-ed state dict into a file that needs
    no pickle at all: ``save_safetensors(p, {k: v.numpy() for k, v in sd.items()})``
    (bfloat16: ``v.view(torch.int16).numpy().view(ml_dtypes.bfloat16)``).
    """
    codes = {np.dtype(v): k for k, v in _SAFETENSORS_DTYPES.items()}
    header: Dict[str, Any] = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise UsageError("safetensors metadata must map str to str")
        header["__metadata__"] = dict(metadata)
    blobs, offset = [], 0
    for name, value in tensors.items():
        arr = np.asarray(value)
        if not isinstance(name, str):
            raise UsageError(f"safetensors tensor names must be strings, got {name!r}")
        native = arr.dtype.newbyteorder("=") if arr.dtype.kind != "V" else arr.dtype
        if native not in codes:
            raise UsageError(f"cannot store {name!r} of dtype {arr.dtype} in safetensors; "
                             f"supported: {sorted(str(d) for d in codes)}")
        blob = np.ascontiguousarray(arr.astype(native.newbyteorder("<") if native.kind != "V" else native))
        blob = blob.tobytes()
        header[name] = {"dtype": codes[native], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for blob in blobs:
            f.write(blob)
