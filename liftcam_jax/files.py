"""Crash-safe files: atomic writes and an append-only JSON-lines manifest.

The one place for writing results to disk (``explain`` and ``evaluate`` share
it). A file is written to a temporary name in its own folder, flushed and
``fsync``-ed, then renamed over the final name (``os.replace`` is atomic on
POSIX and Windows), and the folder is ``fsync``-ed: after a crash, even
``kill -9`` or a power cut, a result file is either absent or complete.

The one cache folder, :func:`cache_root` (``$LIFTCAM_JAX_CACHE``, default
``~/.cache/liftcam-jax``), holds the zoo's converted parameters and the CLI's
compilation cache.

The manifest (:class:`Manifest`) is one JSON object per line, appended and
``fsync``-ed *after* the files it names exist. Reading it tolerates a torn last
line (a crash in the middle of an append): unparsable lines are ignored, and
the writer cuts a torn tail off before appending again.

Writing is cheap on purpose (a dataset run writes one or two files per image
beside a compiled step that already uses every core): ``.npz`` files are
stored, not deflated (float maps barely compress), and PNGs are encoded here
with the "Up" filter and zlib level 1 (about 2.5x faster than Pillow's
default, files about 10% larger). :class:`OrderedWrites` writes on a few
threads (zlib and the file system release the GIL) and still appends each
manifest line only after its files exist, in order.
"""
from __future__ import annotations

import collections
import concurrent.futures as futures
import contextlib
import io
import json
import os
import struct
import tempfile
import zlib
from typing import Callable, Dict, Iterable, Iterator, List

import numpy as np

__all__ = [
    "Manifest",
    "OrderedWrites",
    "atomic_write",
    "encode_png",
    "cache_root",
    "read_jsonl",
    "write_bytes",
    "write_json",
    "write_npz",
    "write_png",
    "check_writable",
    "latest",
]


def cache_root(*parts: str) -> str:
    """The cache folder ``$LIFTCAM_JAX_CACHE`` (default ``~/.cache/liftcam-jax``), joined with ``parts``.

    Nothing is created; ``cache_root("params")`` is where the zoo keeps converted
    parameters, ``cache_root("xla")`` the CLI's persistent compilation cache.
    """
    root = os.environ.get("LIFTCAM_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "liftcam-jax")
    return os.path.join(root, *parts)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    """The process's umask (read where the OS allows it without changing it, else set and restored)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb") -> Iterator:
    """Context manager: a file object whose contents appear at ``path`` only on success.

    The temporary file lives in the destination folder (same file system, so
    the rename is atomic); on an exception it is removed and ``path`` is left
    untouched. Parent folders are created.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        # mkstemp makes 0600 files; a result gets the mode any new file gets (0666 less the umask)
        with contextlib.suppress(OSError, AttributeError):
            os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)


def write_bytes(path, data: bytes) -> None:
    """Atomically write ``data`` to ``path``."""
    with atomic_write(path, "wb") as f:
        f.write(data)


def write_json(path, obj, **kwargs) -> None:
    """Atomically write ``obj`` as JSON (indented, sorted keys by default)."""
    kwargs.setdefault("indent", 2)
    kwargs.setdefault("sort_keys", True)
    write_bytes(path, (json.dumps(obj, **kwargs) + "\n").encode("utf-8"))


def write_npz(path, compress: bool = False, **arrays) -> None:
    """Atomically write arrays to an ``.npz`` (``None`` values are left out).

    Stored (``np.savez``) by default: deflating float32 maps costs ~4x the
    rest of the write and saves a few percent; ``compress=True`` deflates.
    """
    buf = io.BytesIO()
    arrays = {k: np.asarray(v) for k, v in arrays.items() if v is not None}
    (np.savez_compressed if compress else np.savez)(buf, **arrays)
    write_bytes(path, buf.getvalue())


_PNG_COLOR_TYPE = {1: 0, 3: 2, 4: 6}  # channels -> PNG colour type (gray, RGB, RGBA)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(image, level: int = 1) -> bytes:
    """A uint8 ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)`` image -> PNG file bytes (lossless).

    8 bits per channel, no interlacing; every scanline uses PNG filter 2
    ("Up": each byte minus the byte above it, mod 256; PNG spec section 9.2),
    which suits photographs and smooth heat maps, and the filtered rows are
    deflated with zlib at ``level`` (0-9; 1 is fast, 9 small). Decodes to
    exactly ``image`` in any PNG reader.
    """
    a = np.asarray(image)
    if a.dtype != np.uint8:
        raise ValueError(f"write_png needs a uint8 image, got {a.dtype}")
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in _PNG_COLOR_TYPE or a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"write_png needs a non-empty (H, W), (H, W, 3) or (H, W, 4) image, got shape {a.shape}")
    h, w, c = a.shape
    rows = np.empty((h, 1 + w * c), np.uint8)
    rows[:, 0] = 2  # filter type "Up"; the row above the first one is zeros
    flat = a.reshape(h, w * c)
    rows[0, 1:] = flat[0]
    np.subtract(flat[1:], flat[:-1], out=rows[1:, 1:])  # uint8 arithmetic wraps mod 256, as PNG wants
    header = struct.pack(">IIBBBBB", w, h, 8, _PNG_COLOR_TYPE[c], 0, 0, 0)
    return b"".join((b"\x89PNG\r\n\x1a\n", _png_chunk(b"IHDR", header),
                     _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), level)), _png_chunk(b"IEND", b"")))


def write_png(path, image, level: int = 1) -> None:
    """Atomically write a uint8 ``(H, W)``, ``(H, W, 3)`` or ``(H, W, 4)`` image as PNG (:func:`encode_png`)."""
    write_bytes(path, encode_png(image, level))


class OrderedWrites:
    """Write files on a few threads; run each item's ``commit`` in submission order, after its files exist.

    ``submit(write, commit)`` starts ``write()`` on a worker thread; ``commit()``
    (e.g. appending the item's manifest line) runs on the calling thread, in
    the order items were submitted, once that item's ``write`` has returned:
    so a manifest line still always means "its files exist", and a crash
    leaves at most some written but uncommitted files (redone on resume).
    At most ``pending`` items are in flight; ``flush()`` commits them all. As
    a context manager, leaving the block flushes; leaving it by an exception
    commits nothing more and waits for the started writes. The first failed
    ``write`` raises its exception from ``submit``/``flush``, and nothing after
    it is committed.
    """

    def __init__(self, workers: int = 2, pending: int = 64):
        self._pool = futures.ThreadPoolExecutor(max(1, int(workers)), thread_name_prefix="liftcam-write")
        self._queue: "collections.deque" = collections.deque()
        self.pending = max(1, int(pending))

    def submit(self, write: Callable[[], None], commit: Callable[[], None]) -> None:
        self._queue.append((self._pool.submit(write), commit))
        while len(self._queue) > self.pending:
            self._commit_one()

    def _commit_one(self) -> None:
        fut, commit = self._queue.popleft()
        fut.result()
        commit()

    def flush(self) -> None:
        while self._queue:
            self._commit_one()

    def close(self, commit: bool = True) -> None:
        try:
            if commit:
                self.flush()
        finally:
            self._queue.clear()
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        self.close(commit=exc_type is None)


def check_writable(folder) -> None:
    """Create ``folder`` and prove it is writable (a probe file), else ``OSError``."""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".write-probe.", dir=folder)
    os.close(fd)
    os.unlink(tmp)


def read_jsonl(path) -> List[dict]:
    """The JSON objects of a JSON-lines file; torn or corrupt lines are skipped."""
    out: List[dict] = []
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return out
    for line in data.split(b"\n"):
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            continue
        if isinstance(obj, dict):
            out.append(obj)
    return out


class Manifest:
    """An append-only JSON-lines log of results, one object per line, crash-safe.

    ``append(record)`` writes one line and ``fsync``-s it: call it only after
    the files the record names are written (so a line always means "done").
    :meth:`latest` gives the last record per ``id`` (a later line wins, so
    a retried item's new status replaces its old one).
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        self._f = None

    # -- reading ---------------------------------------------------------
    def records(self) -> List[dict]:
        return read_jsonl(self.path)

    def latest(self, key: str = "id") -> Dict[str, dict]:
        return latest(self.records(), key)

    # -- writing ---------------------------------------------------------
    def _open(self):
        if self._f is None:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)) or ".", exist_ok=True)
            self._f = open(self.path, "ab+")
            self._cut_torn_tail()
        return self._f

    def _cut_torn_tail(self) -> None:
        f = self._f
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size == 0:
            return
        # find the last newline; everything after it is a torn line
        block = 4096
        pos = size
        while pos > 0:
            start = max(0, pos - block)
            f.seek(start)
            chunk = f.read(pos - start)
            i = chunk.rfind(b"\n")
            if i >= 0:
                keep = start + i + 1
                break
            pos = start
        else:
            keep = 0
        if keep != size:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
        f.seek(0, os.SEEK_END)

    def append(self, record: dict) -> None:
        f = self._open()
        line = json.dumps(record, sort_keys=True, ensure_ascii=False).encode("utf-8") + b"\n"
        f.write(line)
        f.flush()
        os.fsync(f.fileno())

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def latest(records: Iterable[dict], key: str = "id") -> Dict[str, dict]:
    """The last record per ``record[key]`` (records without the key are ignored)."""
    out: Dict[str, dict] = {}
    for r in records:
        k = r.get(key)
        if isinstance(k, str):
            out[k] = r
    return out
