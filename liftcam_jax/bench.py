r"""Speed and memory of the CAM methods, measured next to the model's own forward pass.

For a split model ``f = head . features``, a method ``m`` and a batch size ``B``,
:func:`bench` measures the jit-compiled explainer
``liftcam_jax.explainer(split, m)(params, x)`` and the yardstick, the
jit-compiled forward pass ``split(params, x)``, on random normal inputs
``x ~ N(0, 1)^{B x S x S x 3}`` (speed does not depend on the pixels):

* **compile** ``c = t_first - t_steady``: the first call (trace, lower, XLA
  compile, one run) minus the steady-state time of one call. Trace, lowering
  and XLA-compile durations are also recorded separately from JAX's
  monitoring events (``/jax/core/compile/*``). The persistent compilation
  cache is switched off for the measurement by default (a cache hit would
  report a load time as a compile time); with it on, the persistent-cache
  hits of each first call are counted and reported.
* **steady state**: after ``warmup`` untimed calls, ``repeats`` timed calls of
  the method, each preceded by one timed call of the forward pass (interleaved,
  so both see the same machine load). Every call ends with
  ``jax.block_until_ready``. Seconds per image ``= median(t) / B``;
  images per second ``= B / median(t)``.
* **ratio** ``= median_i (t_method,i / t_forward,i)`` over the interleaved
  pairs: the cost of an explanation in forward passes. On a quiet machine it
  equals the ratio of the medians; under load it is the more robust of the two.
* **CPU time**: the same calls are also timed with ``time.process_time()``
  (CPU seconds of all the process's threads), with its own median per image
  and its own ratio. On a machine shared with other busy processes the wall
  clock measures the scheduler as much as the program (here, with two cores
  and five other busy processes, a call got ~20% of a core on average and
  wall-clock ratios swung by +-30% between identical pairs), while CPU time
  measures the work done: its ratios stayed within a few percent. On a quiet
  machine, wall ~ CPU / threads.
* **memory**: the compiled program's own account,
  ``executable.memory_analysis()``: ``temp`` (scratch buffers), ``argument``
  (parameters and input), ``output``, and ``total = temp + argument + output -
  alias`` bytes. It does not depend on what else ran before or on the
  allocator (a process's RSS delta does: freed pages stay resident and are
  reused, so per-call RSS deltas measured here varied from 0 to 2x between
  identical calls). On CPU, XLA hands chains of convolutions to YNNPACK as
  opaque fusions whose scratch memory it does not account for; on CPU, programs
  are measured compiled without YNNPACK fusion, one extra compilation each
  (see :func:`program_memory`).
  The process's peak RSS (``getrusage``) is reported once for the whole run.
  Where the device keeps allocator statistics (GPU, TPU),
  ``device_peak_bytes`` is also reported: ``memory_stats()['peak_bytes_in_use']``
  after the row, the peak *since the process started* (so it never decreases
  from one row to the next).

The device is ``jax.devices()[0]``: its ``device_kind``, ``platform`` and the
number of devices are part of the report.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import platform as _platform
import statistics
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from .errors import UsageError, positive_int
from .explain import explainer
from .methods import MethodSpec, parse_method_spec
from .bench_report import ForwardRow, Report, Row, markdown  # noqa: F401  (bench.markdown(report))
from .model import Split

__all__ = [
    "BenchConfig",
    "MethodSpec",
    "Row",
    "Report",
    "TopKCost",
    "bench",
    "bench_top_k",
    "compilation_cache",
    "device_info",
    "parse_method_spec",
    "program_memory",
]

_TRACE = "/jax/core/compile/jaxpr_trace_duration"
_LOWER = "/jax/core/compile/jaxpr_to_mlir_module_duration"
_BACKEND = "/jax/core/compile/backend_compile_duration"
_CACHE_REQUESTS = "/jax/compilation_cache/compile_requests_use_cache"
_CACHE_HITS = "/jax/compilation_cache/cache_hits"


# ---------------------------------------------------------------------------
# what runs where
# ---------------------------------------------------------------------------

def device_info() -> Dict[str, Any]:
    """The device the benchmark runs on, and the software that runs it."""
    devices = jax.devices()
    d = devices[0]
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count()
    return {
        "device_kind": d.device_kind,
        "platform": d.platform,
        "device_count": len(devices),
        "cpu_count": cpus,
        "processor": _platform.processor() or _platform.machine(),
        "jax": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


@contextlib.contextmanager
def compilation_cache(enabled: bool):
    """Switch JAX's persistent compilation cache on or off inside the block.

    Off (the benchmark's default) makes every first call a real compilation.
    The previous setting is restored on exit.
    """
    from jax.experimental.compilation_cache import compilation_cache as cc

    before = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", bool(enabled))
    cc.reset_cache()  # the cache decides once whether it is used; ask again
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", before)
        cc.reset_cache()


def _cache_description(enabled: bool) -> str:
    if not enabled:
        return "off"
    path = jax.config.jax_compilation_cache_dir
    return f"on ({path})" if path else "on (no cache directory set: nothing is cached)"


class _CompileEvents:
    """Collects JAX's compile-duration and persistent-cache events while active."""

    def __init__(self):
        self.durations: Dict[str, float] = {}
        self.counts: Dict[str, int] = {}
        self._on = False

    def _duration(self, event, duration, **kwargs):
        if self._on and event in (_TRACE, _LOWER, _BACKEND):
            self.durations[event] = self.durations.get(event, 0.0) + float(duration)

    def _event(self, event, **kwargs):
        if self._on and event in (_CACHE_REQUESTS, _CACHE_HITS):
            self.counts[event] = self.counts.get(event, 0) + 1

    @contextlib.contextmanager
    def listening(self):
        jax.monitoring.register_event_duration_secs_listener(self._duration)
        jax.monitoring.register_event_listener(self._event)
        try:
            yield self
        finally:
            jax.monitoring.unregister_event_duration_listener(self._duration)
            jax.monitoring.unregister_event_listener(self._event)

    @contextlib.contextmanager
    def record(self):
        """Count only what happens inside this block (starting from zero)."""
        self.durations, self.counts, self._on = {}, {}, True
        try:
            yield
        finally:
            self._on = False

    def summary(self) -> Dict[str, Any]:
        requests = self.counts.get(_CACHE_REQUESTS, 0)
        return {
            "trace_s": self.durations.get(_TRACE, 0.0),
            "lower_s": self.durations.get(_LOWER, 0.0),
            "xla_compile_s": self.durations.get(_BACKEND, 0.0),
            "cache_requests": requests,
            "cache_hits": self.counts.get(_CACHE_HITS, 0),
        }


_NO_YNN = {"xla_cpu_experimental_ynn_fusion_type": ""}


def program_memory(jitted, *args) -> Dict[str, Any]:
    """Bytes of a jitted function's compiled program for these arguments (``memory_analysis``).

    ``total = temp + argument + output - alias``. On CPU, XLA hands chains of
    convolutions to YNNPACK as one fusion whose intermediate buffers XLA's
    buffer assignment does not see (a VGG-16 forward pass reports ~0 temp
    bytes); so on CPU the memory is read from the program compiled with
    YNNPACK fusion off (``xla_cpu_experimental_ynn_fusion_type=""``), whose
    buffer assignment holds every intermediate. A program without such a
    fusion is the same program either way. ``source`` says which was read.

    One compilation: ``jitted.lower(*args).compile()`` does not reuse the
    executable that calling ``jitted`` compiled (it compiles again), so the
    default program is compiled here only where the YNNPACK switch does not
    apply (another platform, or an XLA without that option).
    """
    lowered = jitted.lower(*args)
    compiled = None
    if jax.devices()[0].platform == "cpu":
        try:
            compiled = lowered.compile(compiler_options=_NO_YNN)
            source = "memory_analysis, compiled without YNNPACK fusion"
        except RuntimeError as e:  # an XLA without the option: its CPU programs have no YNNPACK fusion either
            if "No such compile option" not in str(e):
                raise
    if compiled is None:
        compiled = lowered.compile()
        source = "memory_analysis"
    m = compiled.memory_analysis()
    if m is None:
        return {"source": "unavailable"}
    get = lambda name: int(getattr(m, name, 0) or 0)
    out: Dict[str, Any] = {
        "temp": get("temp_size_in_bytes"),
        "argument": get("argument_size_in_bytes"),
        "output": get("output_size_in_bytes"),
        "alias": get("alias_size_in_bytes"),
    }
    out["total"] = out["temp"] + out["argument"] + out["output"] - out["alias"]
    out["source"] = source
    return out


def _device_peak_bytes() -> Optional[int]:
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:
        return None
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return int(stats["peak_bytes_in_use"])


def _process_peak_rss() -> Optional[int]:
    """The whole process's peak resident memory so far (``getrusage``), or ``None``."""
    try:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)
    except Exception:
        return None


# ---------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------

def _timed(fn, *args) -> Tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call, waited for with ``block_until_ready``."""
    c0, t0 = time.process_time(), time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0, time.process_time() - c0


def _median_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    return statistics.median([x / y if y > 0 else float("inf") for x, y in zip(a, b)])


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """How :func:`bench` measures, and what the report records.

    repeats: timed calls per row (the median is reported); warmup: untimed
    calls after the first (compiling) call; seed: of the random inputs; cache:
    use the persistent compilation cache (default off: honest compile times);
    model / layer / weights / command: recorded in the report; log: called
    with one progress line per measurement (e.g. ``print`` to stderr);
    smoothing: a :class:`liftcam_jax.smoothing.Smoothing` (aug_smooth,
    eigen_smooth, layer fusion) applied to every method, whose rows then name it
    in their options.
    """

    repeats: int = 5
    warmup: int = 1
    seed: int = 0
    cache: bool = False
    model: str = "model"
    layer: Optional[str] = None
    weights: Optional[str] = None
    command: Optional[str] = None
    log: Optional[Callable[[str], None]] = None
    smoothing: Optional[Any] = None


class _Measured(NamedTuple):
    """One function measured: its first call, JAX's compile events for it, and the timed calls."""

    first: float
    detail: Dict[str, Any]
    runs: List[float]  # wall seconds per timed call
    cpu: List[float]  # process CPU seconds per timed call
    partner_runs: List[float]  # the same for the interleaved partner (the forward pass), if any
    partner_cpu: List[float]


def _measure(fn, params, x, events: _CompileEvents, warmup: int, repeats: int, partner=None) -> _Measured:
    """Time ``fn(params, x)``: the first (compiling) call, ``warmup`` untimed calls, then ``repeats`` timed
    calls, each preceded by a timed call of ``partner`` when given (interleaved: both see the same load)."""
    with events.record():
        first, _ = _timed(fn, params, x)
    detail = events.summary()
    for _ in range(warmup):
        _timed(fn, params, x)
    m = _Measured(first, detail, [], [], [], [])
    for _ in range(repeats):
        if partner is not None:
            t, c = _timed(partner, params, x)
            m.partner_runs.append(t)
            m.partner_cpu.append(c)
        t, c = _timed(fn, params, x)
        m.runs.append(t)
        m.cpu.append(c)
    return m


def _forward_row(forward, params, x, events, cfg: BenchConfig) -> ForwardRow:
    b = x.shape[0]
    m = _measure(forward, params, x, events, max(cfg.warmup, 1), cfg.repeats)
    med, cpu = statistics.median(m.runs), statistics.median(m.cpu)
    return ForwardRow(b, m.first, max(m.first - med, 0.0), m.detail, med / b, cpu / b,
                      program_memory(forward, params, x))


def _program(spec: MethodSpec, split, smoothing) -> Tuple[Callable, Dict[str, Any]]:
    """The compiled ``fn(params, x)`` a row measures, and the options its row names (the method's, and
    the smoothing's: ``aug_smooth``, ``eigen_smooth``, ``fused`` layers and ``fusion``)."""
    if smoothing is None or not smoothing.active:
        return explainer(split, spec.method, **spec.kwargs), dict(spec.kwargs)
    options = dict(spec.kwargs)
    options.update({k: True for k in ("aug_smooth", "eigen_smooth") if getattr(smoothing, k)})
    if smoothing.layers:
        options.update(fused="+".join(n for n, _ in smoothing.layers), fusion=smoothing.fusion)
    return jax.jit(lambda p, x: smoothing.explain(split, p, x, method=spec.method, **spec.kwargs)), options


def _method_row(spec: MethodSpec, split, params, x, forward, forward_row: ForwardRow, events,
                cfg: BenchConfig) -> Row:
    b = x.shape[0]
    fn, options = _program(spec, split, cfg.smoothing)
    m = _measure(fn, params, x, events, cfg.warmup, cfg.repeats, partner=forward)
    med, fmed = statistics.median(m.runs), statistics.median(m.partner_runs)
    return Row(
        method=spec.name,
        options=options,
        batch_size=b,
        first_call_s=m.first,
        compile_s=max(m.first - med, 0.0),
        compile_detail=m.detail,
        seconds_per_image=med / b,
        images_per_s=b / med,
        forward_seconds_per_image=fmed / b,
        forward_images_per_s=b / fmed,
        ratio=_median_ratio(m.runs, m.partner_runs),
        cpu_seconds_per_image=statistics.median(m.cpu) / b,
        forward_cpu_seconds_per_image=statistics.median(m.partner_cpu) / b,
        cpu_ratio=_median_ratio(m.cpu, m.partner_cpu),
        memory_bytes=program_memory(fn, params, x),
        forward_memory_bytes=forward_row.memory_bytes,
        device_peak_bytes=_device_peak_bytes(),
        runs_s=m.runs,
        forward_runs_s=m.partner_runs,
        cpu_runs_s=m.cpu,
        forward_cpu_runs_s=m.partner_cpu,
    )


def bench(split: Split, params, input_shape: Sequence[int], methods: Sequence[Any] = ("lift-cam",),
          batch_sizes: Sequence[int] = (1,), config: Optional[BenchConfig] = None, **options) -> Report:
    """Measure each method at each batch size next to the jit-compiled forward pass.

    Args:
      split, params: the model (``params`` are arguments of every compiled program).
      input_shape: ``(H, W, 3)`` of one image.
      methods: method names or ``"name:key=value"`` specs or :class:`MethodSpec`.
      batch_sizes: batch sizes to measure.
      config: a :class:`BenchConfig`; ``options`` override its fields (``repeats=``, ``warmup=``,
        ``seed=``, ``cache=``, ``model=``, ``layer=``, ``weights=``, ``command=``, ``log=``).

    Returns:
      a :class:`Report`.
    """
    cfg = dataclasses.replace(config or BenchConfig(), **options)
    specs = [m if isinstance(m, MethodSpec) else parse_method_spec(m) for m in methods]
    if not specs:
        raise UsageError("no methods to benchmark")
    if not batch_sizes:
        raise UsageError("no batch sizes to benchmark")
    batch_sizes = [positive_int("batch size", b) for b in batch_sizes]
    cfg = dataclasses.replace(cfg, repeats=positive_int("repeats", cfg.repeats),
                              warmup=positive_int("warmup", cfg.warmup, minimum=0))
    input_shape = tuple(int(s) for s in input_shape)
    log = cfg.log or (lambda s: None)
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    t_start = time.perf_counter()
    events = _CompileEvents()
    forward_rows: List[ForwardRow] = []
    rows: List[Row] = []
    with compilation_cache(cfg.cache), events.listening():
        cache_text = _cache_description(cfg.cache)
        forward = jax.jit(lambda p, x: split(p, x))
        for b in batch_sizes:
            x = jax.block_until_ready(jax.random.normal(jax.random.PRNGKey(cfg.seed), (b,) + input_shape, jnp.float32))
            frow = _forward_row(forward, params, x, events, cfg)
            forward_rows.append(frow)
            log(f"forward b={b}: first call {frow.first_call_s:.2f} s, {frow.seconds_per_image:.4g} s/image")
            for spec in specs:
                row = _method_row(spec, split, params, x, forward, frow, events, cfg)
                rows.append(row)
                log(f"{spec.label} b={b}: compile {row.compile_s:.2f} s, {row.seconds_per_image:.4g} s/image, "
                    f"{row.ratio:.3f}x forward (CPU time: {row.cpu_ratio:.3f}x)")
    return Report(model=cfg.model, layer=cfg.layer, weights=cfg.weights, input_shape=input_shape,
                  repeats=cfg.repeats, warmup=cfg.warmup, compilation_cache=cache_text, device=device_info(),
                  forward=forward_rows, rows=rows, command=cfg.command, started=started,
                  wall_s=time.perf_counter() - t_start, process_peak_rss_bytes=_process_peak_rss())


@dataclasses.dataclass
class TopKCost:
    """:func:`bench_top_k`: ``k`` targets per image in one call against ``k`` separate calls.

    Seconds are medians over the repeats, per batch; ``ratio_to_one`` = top-k call / one
    single-target call, ``ratio_to_separate`` = top-k call / the ``k`` separate calls
    (medians of the interleaved ratios, wall clock and process CPU time)."""

    method: str
    k: int
    batch_size: int
    top_k_s: float
    one_s: float
    separate_s: float
    ratio_to_one: float
    ratio_to_separate: float
    cpu_ratio_to_one: float
    cpu_ratio_to_separate: float

    def line(self) -> str:
        return (f"{self.method} b={self.batch_size}: top_k={self.k} in one call {self.top_k_s:.4g} s = "
                f"{self.ratio_to_one:.2f}x one target (CPU {self.cpu_ratio_to_one:.2f}x), "
                f"{self.ratio_to_separate:.2f}x {self.k} separate calls (CPU {self.cpu_ratio_to_separate:.2f}x)")


def bench_top_k(split: Split, params, input_shape: Sequence[int], method: Any = "lift-cam", k: int = 5,
                batch_size: int = 1, config: Optional[BenchConfig] = None, **options) -> TopKCost:
    """The cost of ``k`` targets per image (``explainer(split, method, top_k=k)``) against one
    target and against ``k`` separate single-target calls (each a class index of the top ``k``).

    Random normal inputs as :func:`bench`; after the compiling calls and ``warmup`` untimed
    rounds, ``repeats`` rounds each time the top-k call, one single-target call and the ``k``
    separate calls one after the other (interleaved: all see the same load). ``options``
    override ``config``'s fields.
    """
    cfg = dataclasses.replace(config or BenchConfig(), **options)
    spec = method if isinstance(method, MethodSpec) else parse_method_spec(method)
    k = positive_int("k", k)
    b = positive_int("batch size", batch_size)
    repeats, warmup = positive_int("repeats", cfg.repeats), positive_int("warmup", cfg.warmup, minimum=0)
    x = jax.random.normal(jax.random.PRNGKey(cfg.seed), (b,) + tuple(int(s) for s in input_shape), jnp.float32)
    many = explainer(split, spec.method, top_k=k, **spec.kwargs)
    one = explainer(split, spec.method, **spec.kwargs)
    with compilation_cache(cfg.cache):
        classes = jax.block_until_ready(many(params, x).targets)
        columns = [jax.device_put(classes[:, t]) for t in range(k)]
        separate = lambda p, z: [one(p, z, c) for c in columns]  # noqa: E731
        _timed(separate, params, x)
        for _ in range(warmup):
            _timed(many, params, x), _timed(one, params, x, columns[0]), _timed(separate, params, x)
        runs = {"many": [], "one": [], "separate": []}
        for _ in range(repeats):
            runs["many"].append(_timed(many, params, x))
            runs["one"].append(_timed(one, params, x, columns[0]))
            runs["separate"].append(_timed(separate, params, x))
    wall = {n: [t for t, _ in r] for n, r in runs.items()}
    cpu = {n: [c for _, c in r] for n, r in runs.items()}
    return TopKCost(spec.label, k, b, statistics.median(wall["many"]), statistics.median(wall["one"]),
                    statistics.median(wall["separate"]), _median_ratio(wall["many"], wall["one"]),
                    _median_ratio(wall["many"], wall["separate"]), _median_ratio(cpu["many"], cpu["one"]),
                    _median_ratio(cpu["many"], cpu["separate"]))
