"""How a case is timed, and the physical limit it is compared with.

On CUDA, times are `triton.testing.do_bench` medians (after warm-up, L2 flushed between runs) plus CUDA-graph
replays for the launch-bound shapes. On CPU, times come from pytest-benchmark's timer (`rounds_for` sizes its
rounds) or perf_counter medians in the plain runner. The physical limit is a large device-to-device copy
measured in the same run (`copy_bandwidth_gbps`); effective bandwidth is the op's minimal bytes over the
full-pass time (benchmarks.harness.measure).
"""

from __future__ import annotations

import statistics
import time
from typing import Optional

import torch

from benchmarks.cases import Pass, sync

QUANTILES = (0.5, 0.2, 0.8)


# ---------------------------------------------------------------------------------------------------
# Timers: each returns (median_ms, p20_ms, p80_ms, timer name)

def time_cuda(fn: Pass):
    import triton.testing

    med, p20, p80 = triton.testing.do_bench(fn, grad_to_none=[fn.v], quantiles=list(QUANTILES))
    return med, p20, p80, "triton.do_bench"


def time_cuda_graph(fn: Pass) -> Optional[float]:
    import triton.testing

    return triton.testing.do_bench_cudagraph(fn, grad_to_none=[fn.v], return_mode="median")


def time_perf_counter(fn: Pass, min_rounds: int = 5, max_time_s: float = 1.0):
    """Median of per-call wall times (device synchronised), at least `min_rounds`, about `max_time_s` in all."""
    samples = []
    deadline = time.perf_counter() + max_time_s
    while len(samples) < min_rounds or time.perf_counter() < deadline:
        fn.reset()
        sync(fn.v.device)
        t0 = time.perf_counter()
        fn()
        sync(fn.v.device)
        samples.append((time.perf_counter() - t0) * 1e3)
        if len(samples) >= 10_000:
            break
    q = statistics.quantiles(samples, n=10, method="inclusive") if len(samples) > 1 else samples * 9
    return statistics.median(samples), q[1], q[7], "perf_counter"


def rounds_for(fn: Pass, max_time_s: float, min_rounds: int = 5) -> int:
    """pytest-benchmark's pedantic mode takes a round count: as many as fit in max_time_s, at least min_rounds."""
    fn.reset()
    sync(fn.v.device)
    t0 = time.perf_counter()
    fn()
    sync(fn.v.device)
    once = max(time.perf_counter() - t0, 1e-6)
    return max(min_rounds, min(int(max_time_s / once), 1000))


def time_once_ms(fn, device: torch.device) -> float:
    """Milliseconds of one call: CUDA events around it (the device's time, host gaps included), else the host
    clock. For whole steps, which are long enough that one call is a sample."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


# ---------------------------------------------------------------------------------------------------
# The physical limit: a large device-to-device copy, bytes read + written per second

def copy_bandwidth_gbps(device: torch.device, nbytes: Optional[int] = None) -> float:
    nbytes = nbytes or (1 << 30 if device.type == "cuda" else 256 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    if device.type == "cuda":
        import triton.testing

        ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    else:
        dst.copy_(src)
        samples = []
        for _ in range(15):
            t0 = time.perf_counter()
            dst.copy_(src)
            samples.append((time.perf_counter() - t0) * 1e3)
        ms = statistics.median(samples)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9
