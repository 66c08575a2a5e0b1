"""Every op x implementation x mode x shape x dtype, timed with pytest-benchmark (and do_bench on CUDA).

The case list comes from `cases.cases` (parametrised in conftest.py by --bench-shapes); each test adds one
row to the run's CSV. A full pass of ngkernels and of torch.compile must agree with eager before it is timed.
"""

from __future__ import annotations

import math
import statistics

import torch

from benchmarks import cases, harness, timers


def test_op(case, benchmark, bench_device, bench_env, copy_gbps, recorder, pytestconfig):
    if case.mode == "full" and case.impl != "eager":
        cases.check_agreement(case, bench_device)

    def timer(fn: cases.Pass):
        if bench_device.type == "cuda":
            # do_bench is the number reported; pytest-benchmark's own table gets the synchronised wall time
            result = timers.time_cuda(fn)
            benchmark.pedantic(lambda: (fn(), torch.cuda.synchronize()), setup=fn.reset, rounds=20, warmup_rounds=2)
            return result
        rounds = timers.rounds_for(fn, pytestconfig.getoption("bench_max_time"))
        benchmark.pedantic(fn, setup=fn.reset, rounds=rounds, iterations=1)
        samples_ms = [s * 1e3 for s in benchmark.stats.stats.data]
        deciles = statistics.quantiles(samples_ms, n=10, method="inclusive")
        return statistics.median(samples_ms), deciles[1], deciles[7], "pytest-benchmark"

    row = harness.measure(case, bench_device, bench_env, copy_gbps, timer)
    benchmark.extra_info.update({k: row[k] for k in ("median_ms", "timer", "bw_fraction", "launches_kernels",
                                                     "peak_extra_mib", "cudagraph_ms") if row.get(k) is not None})
    recorder.add(row)
    assert math.isfinite(row["median_ms"]) and row["median_ms"] > 0
    if case.mode == "full":
        assert 0 < row["bw_fraction"] and row["peak_extra_mib"] > 0
