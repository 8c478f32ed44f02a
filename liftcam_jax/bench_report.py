r"""The report of :func:`liftcam_jax.bench.bench`: its rows, a JSON round trip, and the Markdown table.

A :class:`Report` holds the settings, the device (:func:`liftcam_jax.bench.device_info`),
one :class:`ForwardRow` per batch size (the yardstick: the model's own forward
pass) and one :class:`Row` per method and batch size; what each figure means
(compile time, steady state, ratio to the forward pass, CPU time, memory) is
in :mod:`liftcam_jax.bench`. :func:`markdown` renders it, with the definitions
under the table.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Dict, List, Mapping, Optional, Tuple

from .methods import spec_label

__all__ = ["ForwardRow", "Report", "Row", "markdown"]


@dataclasses.dataclass
class Row:
    """One method at one batch size, next to the forward pass at that batch size."""

    method: str
    options: Dict[str, Any]
    batch_size: int
    first_call_s: float
    compile_s: float
    compile_detail: Dict[str, Any]
    seconds_per_image: float
    images_per_s: float
    forward_seconds_per_image: float
    forward_images_per_s: float
    ratio: float
    cpu_seconds_per_image: float
    forward_cpu_seconds_per_image: float
    cpu_ratio: float
    memory_bytes: Dict[str, Any]
    forward_memory_bytes: Dict[str, Any]
    device_peak_bytes: Optional[int]
    runs_s: List[float]
    forward_runs_s: List[float]
    cpu_runs_s: List[float]
    forward_cpu_runs_s: List[float]

    @property
    def label(self) -> str:
        return spec_label(self.method, tuple(self.options.items()))


@dataclasses.dataclass
class ForwardRow:
    """The forward pass's own compile time and memory at one batch size."""

    batch_size: int
    first_call_s: float
    compile_s: float
    compile_detail: Dict[str, Any]
    seconds_per_image: float
    cpu_seconds_per_image: float
    memory_bytes: Dict[str, Any]


@dataclasses.dataclass
class Report:
    """Everything one :func:`~liftcam_jax.bench.bench` call measured, with the settings and the device."""

    model: str
    layer: Optional[str]
    weights: Optional[str]
    input_shape: Tuple[int, int, int]
    repeats: int
    warmup: int
    compilation_cache: str
    device: Dict[str, Any]
    forward: List[ForwardRow]
    rows: List[Row]
    command: Optional[str] = None
    started: str = ""
    wall_s: float = 0.0
    process_peak_rss_bytes: Optional[int] = None

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["input_shape"] = list(self.input_shape)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Report":
        """The inverse of :meth:`to_dict` (e.g. to re-render a saved JSON report)."""
        d = dict(d)
        d["input_shape"] = tuple(d["input_shape"])
        d["forward"] = [ForwardRow(**f) for f in d["forward"]]
        d["rows"] = [Row(**r) for r in d["rows"]]
        return cls(**d)

    def to_markdown(self) -> str:
        return markdown(self)


def _mib(n: Optional[int]) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f}"


def _fmt_s(t: float) -> str:
    if t == 0:
        return "0"
    if t >= 100:
        return f"{t:,.0f}"
    if t >= 1:
        return f"{t:.2f}"
    if t >= 0.01:
        return f"{t:.3f}"
    return f"{t:.3g}"


def _build_s(detail: Mapping[str, Any]) -> float:
    """Trace + lowering + XLA compile seconds of a first call (JAX's monitoring events)."""
    return float(detail.get("trace_s", 0.0) + detail.get("lower_s", 0.0) + detail.get("xla_compile_s", 0.0))


def markdown(report: Report) -> str:
    """The report as a markdown header and table."""
    dev = report.device
    h, w, c = report.input_shape
    lines = [
        f"**{report.model}** (layer {report.layer or 'default'}, weights {report.weights or 'default'}), "
        f"input {h}x{w}x{c}, random normal",
        "",
        f"Device: {dev['device_kind']} (platform {dev['platform']}, {dev['device_count']} device(s), "
        f"{dev['cpu_count']} CPU core(s) visible), JAX {dev['jax']}. "
        f"Steady state: median of {report.repeats} calls after {report.warmup} warm-up call(s), "
        f"forward pass interleaved. Compilation cache: {report.compilation_cache}.",
    ]
    if report.command:
        lines += ["", f"Command: `{report.command}`"]
    lines += [
        "",
        "| method | batch | compile s | trace+lower+XLA s | s / image | images / s | forward s / image "
        "| ratio to forward | CPU s / image | forward CPU s / image | CPU ratio | temp MiB | total MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for f in report.forward:
        lines.append(
            f"| (forward pass) | {f.batch_size} | {_fmt_s(f.compile_s)} | {_fmt_s(_build_s(f.compile_detail))} "
            f"| {_fmt_s(f.seconds_per_image)} "
            f"| {_fmt_s(1.0 / f.seconds_per_image)} | {_fmt_s(f.seconds_per_image)} | 1.00 "
            f"| {_fmt_s(f.cpu_seconds_per_image)} | {_fmt_s(f.cpu_seconds_per_image)} | 1.00 "
            f"| {_mib(f.memory_bytes.get('temp'))} | {_mib(f.memory_bytes.get('total'))} |"
        )
    for r in report.rows:
        lines.append(
            f"| {r.label} | {r.batch_size} | {_fmt_s(r.compile_s)} | {_fmt_s(_build_s(r.compile_detail))} "
            f"| {_fmt_s(r.seconds_per_image)} "
            f"| {_fmt_s(r.images_per_s)} | {_fmt_s(r.forward_seconds_per_image)} | {r.ratio:.2f} "
            f"| {_fmt_s(r.cpu_seconds_per_image)} | {_fmt_s(r.forward_cpu_seconds_per_image)} | {r.cpu_ratio:.2f} "
            f"| {_mib(r.memory_bytes.get('temp'))} | {_mib(r.memory_bytes.get('total'))} |"
        )
    peaks = [r for r in report.rows if r.device_peak_bytes is not None]
    if peaks:
        lines += ["", "Device peak bytes in use since start (allocator statistics): "
                  + ", ".join(f"{r.label} b{r.batch_size}: {_mib(r.device_peak_bytes)} MiB" for r in peaks)]
    sources = sorted({r.memory_bytes.get("source", "") for r in report.rows} |
                     {f.memory_bytes.get("source", "") for f in report.forward} - {""})
    lines += [
        "",
        "compile = first call minus one steady call (noisy when the machine is shared: a single "
        "steady call is subtracted from one first call); trace+lower+XLA = the durations JAX's "
        "monitoring events report for that first call; ratio = median of (method / forward) over "
        "interleaved pairs, in wall-clock and in process CPU time; memory = the compiled program's buffer assignment "
        f"({'; '.join(sources) or 'memory_analysis'}): temp = scratch buffers, "
        "total = temp + arguments (parameters and input) + outputs. "
        f"Whole process peak RSS: {_mib(report.process_peak_rss_bytes)} MiB.",
    ]
    return "\n".join(lines) + "\n"
