"""Several hosts: one process per host, joined by ``jax.distributed``; each explains its share.

A TPU pod slice or a GPU cluster runs the same command on every host. Each
process joins JAX's distributed runtime (:func:`initialize`), explains or
evaluates its share of the inputs on its own local devices (:func:`share`)
and writes its own log into the shared output folder; explaining needs no
communication, and evaluation meets once at the end (:func:`barrier`) so that
process 0 writes the one set of results.

How the processes find each other, in order:

* explicit: ``coordinator`` (``HOST:PORT`` of process 0), ``num_processes`` and
  ``process_id`` (``--coordinator``, ``--num-processes``, ``--process-id``);
* the environment: ``JAX_COORDINATOR_ADDRESS`` (JAX's own), ``JAX_NUM_PROCESSES``
  and ``JAX_PROCESS_ID``;
* JAX's cluster auto-detection (Cloud TPU pod slices, SLURM, Open MPI, ...)
  when nothing is given (``--distributed``).

JAX aborts the whole process when the coordinator cannot be reached, so a
process other than 0 first waits for the coordinator's port itself, at most
``timeout`` seconds, and fails with a one-line :class:`UsageError` instead.
"""
from __future__ import annotations

import os
import socket
import time
from typing import List, Optional, Sequence, Tuple

from .errors import UsageError

__all__ = ["barrier", "initialize", "share"]


def _parse_address(address: str) -> Tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UsageError(f"bad coordinator address {address!r}; expected HOST:PORT, e.g. 10.0.0.1:1234")
    return host.strip("[]"), int(port)


def _wait_for(host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(2.0, max(0.1, timeout))):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise UsageError(
                    f"cannot reach the coordinator {host}:{port} within {timeout:g} s ({e.strerror or e}); start "
                    "process 0 with the same --coordinator, or check the address and the firewall") from None
            time.sleep(0.25)


def initialize(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, *, timeout: float = 60.0) -> Tuple[int, int]:
    """Join the distributed runtime (``jax.distributed.initialize``); returns ``(process_index, process_count)``.

    Arguments left ``None`` come from the environment, then from JAX's cluster
    detection. Bad or missing settings, and a coordinator that cannot be
    reached within ``timeout`` seconds, are one-line :class:`UsageError` s.
    ``LIFTCAM_JAX_HEARTBEAT_S`` (default 100, JAX's) is how long the others wait
    for a silent process before the runtime stops them.
    """
    import jax

    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    env = {k: os.environ.get(f"JAX_{k.upper()}") for k in ("num_processes", "process_id")}
    try:
        if num_processes is None and env["num_processes"]:
            num_processes = int(env["num_processes"])
        if process_id is None and env["process_id"]:
            process_id = int(env["process_id"])
    except ValueError:
        raise UsageError(f"JAX_NUM_PROCESSES / JAX_PROCESS_ID must be integers, got {env}") from None
    given = [v is not None for v in (coordinator, num_processes, process_id)]
    if any(given) and not all(given):
        raise UsageError("give the coordinator (HOST:PORT), the number of processes and this process's id "
                         "together (--coordinator, --num-processes, --process-id), or none of them to let JAX "
                         "detect the cluster")
    if all(given):
        if not 0 <= process_id < num_processes:
            raise UsageError(f"process id {process_id} out of range for {num_processes} processes")
        host, port = _parse_address(coordinator)
        if process_id != 0:
            _wait_for(host, port, timeout)
    try:
        heartbeat = int(os.environ.get("LIFTCAM_JAX_HEARTBEAT_S") or 100)
    except ValueError:
        raise UsageError(f"LIFTCAM_JAX_HEARTBEAT_S must be an integer (seconds), got "
                         f"{os.environ['LIFTCAM_JAX_HEARTBEAT_S']!r}") from None
    try:
        jax.distributed.initialize(coordinator, num_processes, process_id,
                                   initialization_timeout=max(1, int(timeout)), heartbeat_timeout_seconds=heartbeat)
    except Exception as e:  # no cluster detected, bad settings
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"cannot join the distributed runtime: {first} (give --coordinator HOST:PORT "
                         "--num-processes N --process-id I)") from None
    return jax.process_index(), jax.process_count()


def _runtime_client():
    """The distributed runtime's client (``jax._src.distributed.global_state.client``).

    JAX has no public barrier for processes: ``jax.distributed`` exposes
    ``initialize``/``shutdown`` only, and
    ``jax.experimental.multihost_utils.sync_global_devices`` is a device
    all-reduce with no timeout (on CPU it needs a collectives backend such as
    gloo). The runtime's own key-value barrier is private; this is the one
    place that reaches it, and it fails with one line naming the JAX version
    if it moves.
    """
    import jax

    try:
        from jax._src import distributed as _dist

        client = _dist.global_state.client
        wait = None if client is None else client.wait_at_barrier
    except (ImportError, AttributeError) as e:
        raise UsageError(
            f"JAX {jax.__version__} moved its distributed runtime's barrier "
            f"(jax._src.distributed.global_state.client.wait_at_barrier: {e}); "
            "liftcam-jax cannot synchronise processes with this JAX version"
        ) from None
    if client is None:  # pragma: no cover - several processes without jax.distributed
        raise UsageError("several processes but no jax.distributed client to meet at a barrier")
    return wait


def barrier(name: str, timeout: float = 24 * 3600.0) -> None:
    """Wait until every process has reached ``barrier(name)`` (no-op for one process)."""
    import jax

    if jax.process_count() == 1:
        return
    _runtime_client()(name, int(timeout * 1000))


def share(items: Sequence, index: int, count: int, sequential: Sequence[bool] = ()) -> List:
    """The items of process ``index`` of ``count``: ``index, index + count, ...`` of the listing.

    Where ``sequential[k]`` is true (item ``k`` comes from a source read in order,
    a TFRecord split), the process takes a contiguous block of that source's
    items instead, so that it reads only its own part of the files.
    """
    if count == 1:
        return list(items)
    seq = list(sequential) or [False] * len(items)
    out, runs, k = [], [], 0
    while k < len(items):  # runs of consecutive sequential items (one source each)
        if seq[k]:
            j = k
            while j < len(items) and seq[j]:
                j += 1
            runs.append((k, j))
            k = j
        else:
            k += 1
    in_run = set()
    for lo, hi in runs:
        n = hi - lo
        a, b = lo + n * index // count, lo + n * (index + 1) // count
        in_run.update(range(lo, hi))
        out.extend((i, items[i]) for i in range(a, b))
    out.extend((i, items[i]) for i in range(index, len(items), count) if i not in in_run)
    return [it for _, it in sorted(out, key=lambda p: p[0])]
