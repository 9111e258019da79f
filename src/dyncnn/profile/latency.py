"""Wall-clock latency: median of repeated runs after warm-up, with a fixed thread count.

``backend="onnxruntime"`` exports the model once and times ONNX Runtime, which is what a deployed mobile
network runs on (eager PyTorch is several times slower on depthwise convolutions).

One timing policy for every command (``profile``, ``bench``, the demo): :data:`DEFAULT_THREADS` intra-op threads,
warm-up, the median of repeated runs with the interquartile range beside it, and :func:`spread_warning` when the
spread says the machine was busy.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from ..errors import check_image_batch


DEFAULT_THREADS = 2        # the thread count of `dyncnn profile`, `dyncnn bench` and the demo
NOISY_SPREAD = 0.5         # an IQR above this fraction of the median: the figure is not to be trusted


def spread_warning(rows: Iterable) -> str | None:
    """One warning line when any timing in ``rows`` has an interquartile range above ``NOISY_SPREAD`` x its
    median (another process competed for the CPU), else None. ``rows``: :class:`LatencyStats` or dicts with
    ``median_ms`` and ``spread_ms`` (and optionally ``backend``, ``precision``, ``batch``/``batch_size``,
    ``mode``, ``config`` to name the row)."""
    noisy = []
    for r in rows:
        r = r.as_dict() if isinstance(r, LatencyStats) else r
        median, spread = float(r["median_ms"]), float(r["spread_ms"])
        if median > 0 and spread > NOISY_SPREAD * median:
            what = " ".join(str(r[k]) for k in ("config", "backend", "precision", "mode") if r.get(k))
            batch = r.get("batch", r.get("batch_size"))
            what += f" b={batch}" if batch is not None else ""
            noisy.append(f"{what.strip()} (median {median:.3g} ms, IQR {spread:.3g} ms)")
    if not noisy:
        return None
    more = f" and {len(noisy) - 3} more" if len(noisy) > 3 else ""
    return (f"warning: noisy timings, IQR > {NOISY_SPREAD:g} x median for {', '.join(noisy[:3])}{more}: machine "
            f"busy? rerun (on an idle machine) before quoting these figures")


@dataclass
class LatencyStats:
    backend: str
    batch_size: int
    threads: int
    median_ms: float
    p25_ms: float
    p75_ms: float
    runs: int            # timed runs after warm-up

    @property
    def spread_ms(self) -> float:
        """Interquartile range of the timed runs."""
        return self.p75_ms - self.p25_ms

    @property
    def per_sample_ms(self) -> float:
        return self.median_ms / self.batch_size

    def as_dict(self) -> dict:
        return {**asdict(self), "spread_ms": self.spread_ms}


RETAIN_BYTES = 256 << 20    # glibc's mmap threshold while timing: blocks below this are reused, not unmapped


def retain_freed_memory(threshold_bytes: int = RETAIN_BYTES) -> bool:
    """Keep freed blocks of up to ``threshold_bytes`` in the process for reuse (glibc ``mallopt``), as jemalloc and
    tcmalloc do and as PyTorch's CPU tuning guides recommend; returns whether the setting took (glibc only).

    With glibc's defaults a large activation (a few MB: the first stage of a batch of 64) is an ``mmap``, which
    the kernel hands back zeroed page by page on every call and unmaps when it is freed; on this project's 2-core
    machine that made the first stage of the demo's network 3.6x slower at batch 64 than at batch 32 for twice
    the work (5.3 against 1.5 ms with the memory retained). Such page faults cost the full network and an early
    exit alike, so they shrink every measured speedup. This is a process setting (memory is not returned to the
    system until exit), which is why only the timing commands and benchmarks call it, never the library."""
    import ctypes
    import ctypes.util
    import sys
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):            # musl and others: no mallopt
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, int(threshold_bytes))) and bool(
        mallopt(m_trim_threshold, 2 * int(threshold_bytes)))


@contextmanager
def torch_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def time_callable(fn: Callable[[], object], *, warmup: int = 3, min_runs: int = 5, max_runs: int = 200,
                  min_time_s: float = 0.5) -> list[float]:
    """Run ``fn`` ``warmup`` times, then at least ``min_runs`` times and until ``min_time_s`` has passed.

    Returns the timed durations in milliseconds.
    """
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start < min_time_s and len(times) < max_runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median milliseconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls (the benchmarks' timer)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def summarize(times_ms: list[float], backend: str, batch_size: int, threads: int) -> LatencyStats:
    q = statistics.quantiles(times_ms, n=4) if len(times_ms) > 1 else [times_ms[0]] * 3
    return LatencyStats(backend=backend, batch_size=batch_size, threads=threads,
                        median_ms=statistics.median(times_ms), p25_ms=q[0], p75_ms=q[2], runs=len(times_ms))


def _batch(sample: Tensor, n: int) -> Tensor:
    return sample[:1].expand(n, *sample.shape[1:]).contiguous() if sample.shape[0] != n else sample


def on_device(fn: Callable[..., object], device: torch.device | str = "cpu") -> Callable[..., object]:
    """``fn(x, *args)`` run with ``x`` moved to ``device`` and the device waited for before returning, so that a
    timer around the call measures the work (and the input's copy), not only its launch. The CPU: ``fn`` itself."""
    device = torch.device(device)
    if device.type == "cpu":
        return fn
    sync = torch.cuda.synchronize if device.type == "cuda" else torch.mps.synchronize

    def call(x, *args):
        out = fn(x.to(device, non_blocking=True), *args)
        sync()
        return out
    return call


def measure_latency(model: nn.Module, input: Tensor, batch_sizes: Iterable[int] = (1,),
                    threads: int = DEFAULT_THREADS,
                    backend: str = "eager", *, warmup: int = 3, min_runs: int = 5, min_time_s: float = 0.5,
                    onnx_path: str | Path | None = None, device: torch.device | str = "cpu"
                    ) -> dict[int, LatencyStats]:
    """Latency of ``model`` on batches shaped like ``input`` (its first sample repeated to each batch size).

    Returns ``{batch_size: LatencyStats}``. The eager backend runs in eval mode under ``torch.inference_mode``
    with ``threads`` intra-op threads, on ``device`` (a GPU's time includes copying the batch there and waiting for
    the result; the model is moved back to where it was afterwards); the ONNX Runtime backend (CPU only) exports to
    ``onnx_path`` (a temporary file when None) and uses a session with the same thread count.
    """
    check_image_batch(input)
    if backend not in ("eager", "onnxruntime"):
        raise ValueError(f"backend must be 'eager' or 'onnxruntime', got {backend!r}")
    batch_sizes = list(batch_sizes)
    if not batch_sizes or any(int(b) < 1 for b in batch_sizes):
        raise ValueError(f"batch_sizes must be positive integers, got {batch_sizes}")
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    device = torch.device(device)
    if backend == "onnxruntime" and device.type != "cpu":
        raise ValueError(f"the onnxruntime backend runs on the CPU, got device {device}")
    was_training = model.training
    home = next((t.device for t in (*model.parameters(), *model.buffers())), torch.device("cpu"))
    model.eval()
    results: dict[int, LatencyStats] = {}
    try:
        if backend == "eager":
            run = on_device(model.to(device), device)
            name = backend if device.type == "cpu" else f"{backend}-{device.type}"
            with torch_threads(threads), torch.inference_mode():
                for b in batch_sizes:
                    x = _batch(input, b)
                    times = time_callable(lambda: run(x), warmup=warmup, min_runs=min_runs,
                                          min_time_s=min_time_s)
                    results[b] = summarize(times, name, b, threads)
        else:
            from ..export.onnx import export_onnx, onnx_session
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(onnx_path) if onnx_path else Path(tmp) / "model.onnx"
                export_onnx(model, input[:1], path)
                sess = onnx_session(path, threads=threads)
                name = sess.get_inputs()[0].name
                for b in batch_sizes:
                    feed = {name: _batch(input, b).numpy()}
                    times = time_callable(lambda: sess.run(None, feed), warmup=warmup, min_runs=min_runs,
                                          min_time_s=min_time_s)
                    results[b] = summarize(times, backend, b, threads)
    finally:
        model.to(home).train(was_training)
    return results
