"""A run's output folder: its identity (``run.json``), one JSON-lines log per process, resume, status.

Every command names its logs the same way (:func:`log_name`): ``<stem>.jsonl``
for one process, ``<stem>-<p>-of-<P>.jsonl`` for process ``p`` of ``P``
(``explain``'s stem is ``manifest``, ``evaluate``'s ``evaluate``: :data:`LOG_STEMS`).
A folder reads every log of its stem, so records written by other hosts, or
by an earlier host count, count as done. Each record is keyed by ``id`` and
names its input in ``item`` when the key is not the input's id.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Dict, Optional, Sequence

from .. import files
from ..errors import UsageError

__all__ = ["LOG_STEMS", "RunFolder", "check_run_identity", "log_name", "manifest_name", "merged_records",
           "read_manifests", "status"]

LOG_STEMS = {"explain": "manifest", "evaluate": "evaluate"}


def log_name(stem: str, process_index: int = 0, process_count: int = 1) -> str:
    """``<stem>.jsonl`` for one process, ``<stem>-<p>-of-<P>.jsonl`` for process ``p`` of ``P``."""
    if process_count <= 1:
        return f"{stem}.jsonl"
    return f"{stem}-{process_index:05d}-of-{process_count:05d}.jsonl"


def manifest_name(process_index: int = 0, process_count: int = 1) -> str:
    """``explain``'s log: ``manifest.jsonl``, or ``manifest-<p>-of-<P>.jsonl`` for host ``p`` of ``P``."""
    return log_name(LOG_STEMS["explain"], process_index, process_count)


def _logs(out_dir, stem: str):
    return sorted(glob.glob(os.path.join(glob.escape(os.fspath(out_dir)), f"{stem}*.jsonl")))


def merged_records(paths: Sequence[str], key: str = "id") -> Dict[str, dict]:
    """The last record per ``key`` in each log, merged over the logs: where one host's log says ``done``
    and another's (an earlier host count) says ``failed``, the input is done."""
    out: Dict[str, dict] = {}
    for p in paths:
        for k, r in files.latest(files.read_jsonl(p), key).items():
            if k not in out or r.get("status") == "done" or out[k].get("status") != "done":
                out[k] = r
    return out


def read_manifests(out_dir) -> Dict[str, dict]:
    """The last record per item id over every ``explain`` manifest in ``out_dir`` (see :func:`merged_records`)."""
    return merged_records(_logs(out_dir, LOG_STEMS["explain"]))


def _remove_stale_temp_files(out_dir: str) -> None:
    """Delete temporary files left by an interrupted atomic write (one writer only)."""
    for root, _, names in os.walk(out_dir):
        for f in names:
            if f.startswith(".") and f.endswith(".tmp"):
                try:
                    os.unlink(os.path.join(root, f))
                except OSError:
                    pass


def check_run_identity(out_dir: str, identity: dict) -> None:
    """Record ``identity`` (model, weights, method, options...) in ``out_dir/run.json``, or
    refuse with a :class:`UsageError` when the folder holds a run with a different one:
    resuming must never mix two configurations in one output."""
    path = os.path.join(out_dir, "run.json")
    try:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
    except FileNotFoundError:
        old = None
    except (OSError, ValueError):
        old = None  # a damaged run.json (older crash): rewrite it
    if isinstance(old, dict):
        keys = list(identity) + [k for k in old if k not in identity]  # a key either side lacks differs too
        diff = [f"{k} {old.get(k)!r} (now {identity.get(k)!r})" for k in keys if old.get(k) != identity.get(k)]
        if diff:
            raise UsageError(
                f"{out_dir} holds results of a different run ({'; '.join(diff)}); "
                "choose another --out, or remove that folder"
            )
        return
    files.write_json(path, identity)


class RunFolder:
    """An output folder: the run's identity (``run.json``), its JSON-lines log(s), and resume.

    ``command`` (a key of :data:`LOG_STEMS`) names the logs; this process
    appends to ``log_path`` (:func:`log_name`) and reads every log of the
    command, so records of other hosts count. ``previous`` holds the last
    record of every key at the start; ``done(key)`` says whether it is ``done``.
    """

    def __init__(self, out_dir, identity: dict, command: str = "explain", process_index: int = 0,
                 process_count: int = 1):
        self.path = os.fspath(out_dir)
        try:
            files.check_writable(self.path)
        except OSError as e:
            raise UsageError(f"output folder {self.path} is not writable: {e.strerror or e}") from None
        check_run_identity(self.path, identity)
        if process_count == 1:  # with several writers, another host's temporary file may be in flight
            _remove_stale_temp_files(self.path)
        self.stem = LOG_STEMS[command]
        self.previous: Dict[str, dict] = self.records()
        self.log_path = os.path.join(self.path, log_name(self.stem, process_index, process_count))
        self._log: Optional[files.Manifest] = None

    def records(self) -> Dict[str, dict]:
        """The last record of every key over all the logs; a ``done`` one wins over another log's failure."""
        return merged_records(_logs(self.path, self.stem))

    def done(self, key: str) -> bool:
        rec = self.previous.get(key)
        return bool(rec) and rec.get("status") == "done"

    def append(self, record: dict) -> None:
        if self._log is None:
            self._log = files.Manifest(self.log_path)
        self._log.append(record)

    def close(self) -> None:
        if self._log is not None:
            self._log.close()


def status(out_dir, ids: Optional[Sequence[str]] = None) -> dict:
    """The merged state of a run folder (every host's log, of ``explain`` or ``evaluate``).

    Returns ``{"command", "total", "done", "failed", "pending", "failed_ids": {id: error}, "logs": [...]}``;
    an input is done when each of its records is (``evaluate`` has one per
    method). ``ids`` are the run's inputs when known (else ``total`` counts what the logs name).
    """
    out = os.fspath(out_dir)
    try:
        with open(os.path.join(out, "run.json"), encoding="utf-8") as f:
            identity = json.load(f)
    except (OSError, ValueError):
        raise UsageError(f"{out} holds no run (no readable run.json)") from None
    command = identity.get("command", "explain")
    logs = _logs(out, LOG_STEMS.get(command, LOG_STEMS["explain"]))
    state: Dict[str, str] = {}
    errors: Dict[str, str] = {}
    for key, r in merged_records(logs).items():
        item = r.get("item") or key
        if r.get("status") == "done":
            state.setdefault(item, "done")
        else:
            state[item] = "failed"
            errors[item] = r.get("error") or ""
    names = list(ids) if ids is not None else list(state)
    done = sum(state.get(i) == "done" for i in names)
    failed = sum(state.get(i) == "failed" for i in names)
    return {"command": command, "total": len(names), "done": done, "failed": failed,
            "pending": len(names) - done - failed, "failed_ids": {i: errors[i] for i in names if i in errors},
            "logs": [os.path.basename(p) for p in logs]}
