"""Measuring one benchmark case, and recording what was measured; shared by the pytest-benchmark suite
(benchmarks/test_ops.py) and the plain runner (benchmarks/run.py).

`measure` times a case with the timer it is given and, for a full pass, adds the effective bandwidth against
the copy bandwidth of the same run, the kernel launches and the peak extra memory. The parts live in their
own modules: the cases (benchmarks.cases), the timers and the copy bandwidth (benchmarks.timers), the profiler
(benchmarks.profiling), the environment and the CSV files (benchmarks.results); `Recorder` writes each row as
it comes and renders the report (benchmarks.report) at the end.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch

from benchmarks import report
from benchmarks.cases import LAUNCH_BOUND_SHAPES, OPS, Case, Pass, check_timed_backend, make_inputs
from benchmarks.profiling import peak_extra_memory_cpu, peak_extra_memory_cuda, profile_launches
from benchmarks.results import CSV_COLUMNS, results_paths, upsert_rows
from benchmarks.timers import time_cuda_graph


def set_threads(threads: int):
    """CPU intra-op threads (0 keeps torch's default). On a shared, oversubscribed machine one thread gives steadier
    times: with two, every parallel op waits at a barrier for whichever thread the scheduler parked."""
    if threads < 0:
        raise ValueError(f"threads must be >= 0, got {threads}")
    if threads:
        torch.set_num_threads(threads)


def measure(case: Case, device: torch.device, env: dict, copy_gbps: float, timer: Callable) -> dict:
    """Run one case: time it with `timer(Pass) -> (median, p20, p80, name)`, and for full passes add bandwidth,
    launches and memory. Returns a CSV row."""
    check_timed_backend(device)
    inputs = make_inputs(case, device)
    fn = Pass(case, inputs)
    fn.warm_up()
    median, p20, p80, timer_name = timer(fn)
    op = OPS[case.op]
    v = inputs["v"]
    row = {k: env[k] for k in CSV_COLUMNS if k in env}
    row.update(op=case.op, impl=case.impl, mode=case.mode, shape=case.shape, dims="x".join(map(str, case.dims)),
               dtype=case.dtype, median_ms=median, p20_ms=p20, p80_ms=p80, timer=timer_name, copy_gbps=copy_gbps)
    notes = []
    # (a retained graph's backward runs on the stream of its forward, outside the capture: forward and full only)
    if device.type == "cuda" and case.shape in LAUNCH_BOUND_SHAPES and case.mode != "backward":
        try:
            row["cudagraph_ms"] = time_cuda_graph(fn)
        except Exception as err:  # a capture failure is a result to report, not a reason to stop the suite
            notes.append(f"cudagraph failed: {type(err).__name__}: {str(err)[:120]}")
    if case.mode == "full":
        min_bytes = op.min_bytes(v.numel(), v.element_size())
        row["min_bytes"] = min_bytes
        row["eff_gbps"] = min_bytes / (median * 1e-3) / 1e9
        row["bw_fraction"] = row["eff_gbps"] / copy_gbps
        row["grad_mib"] = v.numel() * v.element_size() / 2**20
        if device.type == "cuda":
            row["launches_kernels"], row["launches_memsets"], row["kernel_names"] = profile_launches(fn)
            row["peak_extra_mib"] = peak_extra_memory_cuda(fn) / 2**20
            row["memory_method"] = "torch.cuda.max_memory_allocated"
        else:
            row["peak_extra_mib"] = peak_extra_memory_cpu(fn) / 2**20
            row["memory_method"] = "profiler CPU allocator trace"
            notes.append("no kernel launches on CPU")
    row["notes"] = "; ".join(notes)
    return row


class Recorder:
    """Writes each row into <results_dir>/<device-slug>.csv as soon as it is measured (a run cut short keeps what
    it measured: `python -m benchmarks.report` renders it later), and the markdown table and plot at the end."""

    def __init__(self, results_dir: Path):
        self.results_dir = Path(results_dir)
        self.paths: Optional[dict] = None

    def add(self, row: dict):
        self.paths = results_paths(self.results_dir, row["device"])
        upsert_rows(self.paths["csv"], [row])

    def finish(self) -> Optional[dict]:
        """Render the markdown table and plot of everything in the CSV; the written paths, None if no rows."""
        if self.paths is None:
            return None
        report.render(self.paths["csv"], self.paths["md"], self.paths["png"])
        return self.paths
