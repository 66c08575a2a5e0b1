"""One full pass under the profiler: kernel launches (CUDA) and peak extra memory (both devices).

On CUDA the launches come from the profiler's device events and the memory from the caching allocator's peak;
on CPU the peak comes from replaying the CPU allocator's trace, and there are no kernel launches to count.
"""

from __future__ import annotations

import re

import torch

from benchmarks.cases import Pass


def profile_launches(fn: Pass):
    """(kernels, memsets, kernel names) launched by one call, from the CUDA profiler trace."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn.reset()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    device_events = [e for e in prof.profiler.kineto_results.events() if e.device_type() == DeviceType.CUDA
                     and not (hasattr(e, "is_user_annotation") and e.is_user_annotation())]  # ranges, not launches
    names = [e.name() for e in sorted(device_events, key=lambda e: e.start_ns())]
    memsets = [n for n in names if n.startswith("Memset")]
    kernels = [n for n in names if not n.startswith(("Memset", "Memcpy"))]
    return len(kernels), len(memsets), ";".join(_short_kernel_name(n) for n in kernels)


def _short_kernel_name(name: str) -> str:
    name = re.sub(r"<.*", "", name)  # template arguments
    name = re.sub(r"\(.*", "", name)
    return name.replace("void ", "").strip()[:60]


def peak_extra_memory_cuda(fn: Pass) -> float:
    """Bytes allocated at the peak of one call above what was allocated before it (the gradient included)."""
    fn.reset()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def peak_extra_memory_cpu(fn: Pass, passes: int = 3) -> float:
    """The same on CPU, replaying the CPU allocator's allocation/free records from the profiler: the largest peak of
    `passes` profiled passes (one CI run, 2026-12-04, read 4 bytes for a tiny full pass whose gradient is 1536: the
    profiler had missed the backward's records once; a pass cannot use less than it allocates, so the max is the
    robust reading)."""
    from torch.profiler import ProfilerActivity, profile

    best = 0
    for _ in range(passes):
        fn.reset()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        records = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                         key=lambda e: e.start_ns())
        current = peak = 0
        for record in records:
            current += record.nbytes()
            peak = max(peak, current)
        best = max(best, peak)
    return best
