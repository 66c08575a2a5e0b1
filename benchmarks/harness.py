"""What the benchmark suite measures and how; shared by the pytest-benchmark suite and the plain runner.

One case = op x implementation x mode x shape x dtype. The three implementations compute the same loss:
  ngkernels  the package's fused op (Triton on CUDA, its torch backend on CPU; the Triton interpreter is
             never timed),
  eager      `ngkernels.reference.reference_loss`, the plain-PyTorch expression of the math, through autograd,
  compile    that same expression under `torch.compile(fullgraph=True, dynamic=False)`.
Modes: forward (with v requiring grad, as in training), backward (of a retained graph), full (both).

On CUDA, times are `triton.testing.do_bench` medians (after warm-up, L2 flushed between runs) plus CUDA-graph
replays for the launch-bound shapes; one full pass is profiled for kernel launches and peak extra memory.
On CPU, times come from pytest-benchmark's timer (or perf_counter medians in the plain runner) and peak extra
memory from the profiler's allocator trace; there are no kernel launches to count.
The physical limit is a large device-to-device copy measured in the same run; effective bandwidth is the
op's minimal bytes (each input read once, the gradient written once) over the full-pass time.
"""

from __future__ import annotations

import csv
import datetime
import os
import platform
import re
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

import ngkernels
from ngkernels import functional as ngk_functional
from ngkernels import reference

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"

# Issue 4's shapes; v, v_ref and target share the shape.
SHAPE_SETS = {
    "full": {
        "S": (16, 16, 64, 64),  # SD3.5 at 512 px, an RL micro-batch
        "M": (16, 16, 128, 128),  # 1024 px
        "T": (8, 4096, 64),  # FLUX-style token layout
        "F": (8, 262144),  # few huge samples
        "XL": (64, 16, 128, 128),  # bandwidth-bound
    },
    "smoke": {"tiny": (4, 3, 8, 8)},
}
LAUNCH_BOUND_SHAPES = ("S", "T", "F")  # also timed as CUDA-graph replays
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
IMPLS = ("ngkernels", "eager", "compile")
MODES = ("forward", "backward", "full")
QUANTILES = (0.5, 0.2, 0.8)

CSV_COLUMNS = (
    "device", "device_type", "torch", "triton", "ngkernels", "git_commit", "date", "load_avg", "threads",
    "op", "impl", "mode", "shape", "dims", "dtype",
    "median_ms", "p20_ms", "p80_ms", "timer", "cudagraph_ms",
    "min_bytes", "eff_gbps", "copy_gbps", "bw_fraction",
    "launches_kernels", "launches_memsets", "kernel_names",
    "peak_extra_mib", "grad_mib", "memory_method", "notes",
)
ROW_KEY = ("op", "impl", "mode", "shape", "dtype")


# ---------------------------------------------------------------------------------------------------
# The ops: which inputs each uses, its ngkernels call and its eager expression (the reference math).

def eager_normguard(v, v_ref):
    return reference.reference_loss(v, v_ref=v_ref)[0]


def eager_flow_matching(v, target):
    return reference.reference_loss(v, target=target)[0]


def eager_fm_normguard(v, target, v_ref):
    return reference.reference_loss(v, target, v_ref)[0]


@dataclass(frozen=True)
class Op:
    name: str
    inputs: tuple  # names of the constant inputs after v, in call order
    ngkernels_fn: Callable
    eager_fn: Callable

    def min_bytes(self, numel: int, element_size: int) -> int:
        """Each input (v and the constants) read once, the gradient written once."""
        return (1 + len(self.inputs) + 1) * numel * element_size


OPS = {
    "normguard": Op("normguard", ("v_ref",), ngkernels.normguard_loss, eager_normguard),
    "flow_matching": Op("flow_matching", ("target",), ngkernels.flow_matching_loss, eager_flow_matching),
    "fm_normguard": Op("fm_normguard", ("target", "v_ref"), ngkernels.fm_normguard_loss, eager_fm_normguard),
}


def configure_dynamo():
    """One compiled graph per (op, shape, dtype): lift the recompile limit, and fail rather than fall back to
    eager when it is hit, so "compile" never silently times eager code."""
    cfg = torch._dynamo.config
    if hasattr(cfg, "recompile_limit"):
        cfg.recompile_limit = 64
    else:
        cfg.cache_size_limit = 64
    if hasattr(cfg, "fail_on_recompile_limit_hit"):
        cfg.fail_on_recompile_limit_hit = True


_COMPILED: dict = {}


def loss_fn(op: Op, impl: str) -> Callable:
    if impl == "ngkernels":
        return op.ngkernels_fn
    if impl == "eager":
        return op.eager_fn
    if impl == "compile":
        if op.name not in _COMPILED:
            configure_dynamo()
            _COMPILED[op.name] = torch.compile(op.eager_fn, fullgraph=True, dynamic=False)
        return _COMPILED[op.name]
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


# ---------------------------------------------------------------------------------------------------
# Cases and their callables

@dataclass(frozen=True)
class Case:
    op: str
    impl: str
    mode: str
    shape: str
    dims: tuple
    dtype: str

    @property
    def id(self) -> str:
        return f"{self.op}-{self.impl}-{self.mode}-{self.shape}-{self.dtype}"


def cases(shape_set: str, ops=None, impls=None, modes=None, dtypes=None) -> list[Case]:
    if shape_set not in SHAPE_SETS:
        raise ValueError(f"shape set must be one of {tuple(SHAPE_SETS)}, got {shape_set!r}")
    # (op, shape, dtype) outermost so that the three modes of an implementation reuse its compiled graph
    return [Case(op, impl, mode, shape, dims, dtype)
            for op in (ops or OPS)
            for shape, dims in SHAPE_SETS[shape_set].items()
            for dtype in (dtypes or DTYPES)
            for impl in (impls or IMPLS)
            for mode in (modes or MODES)]


def resolve_device(choice: str) -> torch.device:
    if choice not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {choice!r}")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda requested but torch.cuda.is_available() is False")
    return torch.device(choice)


def check_timed_backend(device: torch.device):
    """The Triton interpreter runs programs one by one in Python: its times mean nothing, so never take them."""
    if device.type != "cuda" and ngk_functional.resolve_backend(device) == "triton":
        raise ValueError("NGKERNELS_BACKEND=triton on CPU runs the Triton interpreter, which is never timed; "
                         "unset NGKERNELS_BACKEND to benchmark the torch backend")


def make_inputs(case: Case, device: torch.device, seed: int = 0) -> dict:
    """v (leaf, requires grad), target and v_ref; v_ref is smaller so that the hinge is active in every sample."""
    gen = torch.Generator(device=device).manual_seed(seed)
    dtype = DTYPES[case.dtype]

    def randn(scale=1.0):
        return (torch.randn(case.dims, generator=gen, device=device, dtype=torch.float32) * scale).to(dtype)

    return {"v": randn().requires_grad_(True), "target": randn(), "v_ref": randn(0.5)}


class Pass:
    """The callable a mode times, with `reset` (drop v.grad, as do_bench's grad_to_none) to run before each call."""

    def __init__(self, case: Case, inputs: dict):
        op = OPS[case.op]
        self.v = inputs["v"]
        args = [inputs["v"]] + [inputs[name] for name in op.inputs]
        fn = loss_fn(op, case.impl)
        self.forward = lambda: fn(*args)
        # d(total loss)/d(this loss), made once: in training it belongs to the sum of losses, not to this op, and
        # `loss.backward()` would add a fill kernel to every pass of every implementation
        seed = torch.ones((), dtype=torch.float32, device=self.v.device)
        if case.mode == "forward":
            self.run = self.forward
        elif case.mode == "backward":
            self.loss = self.forward()
            self.run = lambda: self.loss.backward(seed, retain_graph=True)
        elif case.mode == "full":
            self.run = lambda: self.forward().backward(seed)
        else:
            raise ValueError(f"mode must be one of {MODES}, got {case.mode!r}")

    def reset(self):
        self.v.grad = None

    def __call__(self):
        return self.run()

    def warm_up(self, calls: int = 3):
        """First calls compile (torch.compile, Triton JIT) and fill the allocator caches."""
        for _ in range(calls):
            self.reset()
            self.run()
        _sync(self.v.device)


# relative to the largest gradient element (gradients of a mean over B*N elements are tiny): bf16 gradients are
# rounded from fp32 by both implementations and may differ by one unit in the last place
AGREEMENT_TOLERANCE = {"fp32": dict(rtol=1e-4, atol=1e-5), "bf16": dict(rtol=1e-2, atol=1e-2)}


def check_agreement(case: Case, device: torch.device):
    """A full pass of `case.impl` gives the loss and gradient of the eager expression on the same inputs
    (raises AssertionError otherwise): a fast wrong answer is not a result."""
    inputs = make_inputs(case, device)
    v = inputs["v"]
    outputs = []
    for impl in (case.impl, "eager"):
        loss = Pass(Case(case.op, impl, "forward", case.shape, case.dims, case.dtype), inputs)()
        loss.backward()
        outputs.append((loss.detach().float(), v.grad.float()))
        v.grad = None
    (loss, grad), (want_loss, want_grad) = outputs
    torch.testing.assert_close(loss, want_loss, rtol=1e-4, atol=0.0)
    scale = want_grad.abs().max().clamp_min(torch.finfo(torch.float32).tiny)
    torch.testing.assert_close(grad / scale, want_grad / scale, **AGREEMENT_TOLERANCE[case.dtype])


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
        _sync(fn.v.device)
        t0 = time.perf_counter()
        fn()
        _sync(fn.v.device)
        samples.append((time.perf_counter() - t0) * 1e3)
        if len(samples) >= 10_000:
            break
    q = statistics.quantiles(samples, n=10, method="inclusive") if len(samples) > 1 else samples * 9
    return statistics.median(samples), q[1], q[7], "perf_counter"


def rounds_for(fn: Pass, max_time_s: float, min_rounds: int = 5) -> int:
    """pytest-benchmark's pedantic mode takes a round count: as many as fit in max_time_s, at least min_rounds."""
    fn.reset()
    _sync(fn.v.device)
    t0 = time.perf_counter()
    fn()
    _sync(fn.v.device)
    once = max(time.perf_counter() - t0, 1e-6)
    return max(min_rounds, min(int(max_time_s / once), 1000))


# ---------------------------------------------------------------------------------------------------
# One full pass under the profiler: kernel launches (CUDA) and peak extra memory (both devices)

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


def peak_extra_memory_cpu(fn: Pass) -> float:
    """The same on CPU, replaying the CPU allocator's allocation/free records from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn.reset()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                     key=lambda e: e.start_ns())
    current = peak = 0
    for record in records:
        current += record.nbytes()
        peak = max(peak, current)
    return peak


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


# ---------------------------------------------------------------------------------------------------
# Environment and rows

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"CPU ({cores} cores)"


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    return {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "ngkernels": ngkernels.__version__,
        "git_commit": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
        "python": platform.python_version(),
        # other work on the machine skews times: the 1-minute load average when the run started says how much
        "load_avg": f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "",
        "threads": torch.get_num_threads(),  # CPU: intra-op threads (see set_threads)
    }


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


# ---------------------------------------------------------------------------------------------------
# Results files

def default_results_dir(shape_set: str) -> Path:
    """Smoke runs never touch the committed results."""
    return REPO_ROOT / ".benchmarks" / "smoke" if shape_set == "smoke" else RESULTS_DIR


def results_paths(results_dir: Path, device: str) -> dict:
    slug = device_slug(device)
    return {ext: Path(results_dir) / f"{slug}.{ext}" for ext in ("csv", "md", "png")}


def read_rows(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def upsert_rows(path: Path, rows: list[dict]) -> list[dict]:
    """Write rows into the CSV, replacing earlier rows with the same (op, impl, mode, shape, dtype); a run split
    over several calls (e.g. one per dtype) fills one file. Every row keeps its own date, versions and copy
    bandwidth, so nothing is compared across runs without saying so."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new_keys = {tuple(str(r[k]) for k in ROW_KEY) for r in rows}
    kept = [r for r in read_rows(path) if tuple(r[k] for k in ROW_KEY) not in new_keys]
    merged = kept + [{k: _fmt(r.get(k)) for k in CSV_COLUMNS} for r in rows]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(merged)
    return merged


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


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
        from benchmarks import report

        if self.paths is None:
            return None
        report.render(self.paths["csv"], self.paths["md"], self.paths["png"])
        return self.paths
