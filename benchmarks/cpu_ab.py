"""ngkernels vs torch.compile on CPU, as interleaved A/B ratios: robust to a loaded or shared machine.

Absolute times on a machine shared with other jobs scatter by up to 2x between runs; a ratio of two
implementations timed in alternation, call after call, in one process, does not (both see the same load). For
each op, shape and dtype this script builds the benchmark suite's full pass (`cases.Pass`: forward with v
requiring grad, then backward) for `ngkernels` and for `compile` (the suite's peer:
`torch.compile(fullgraph=True, dynamic=False)` of `ngkernels.reference.reference_loss`), checks both against
eager (`cases.check_agreement`), warms both up, then times `--reps` pairs of calls, alternating which goes
first, and takes each one's median. The whole measurement is repeated `--repeats` times (the spread is the
noise); the table shows ngkernels' speed relative to compile (compile median / ngkernels median: >= 1 is as
fast or faster) for each repeat, and the median of the repeats, with the median minor page faults of a pass
(a fresh large buffer from mmap is paid per 4 KiB page on first touch). Also the first ngkernels call of each case
(its compile: Dynamo + Inductor, from Inductor's on-disk cache when a previous process filled it; always wall
time).

Both implementations read the same input tensors (and, as each pass frees the gradient before the next, usually
write the same gradient buffer): with inputs of their own, where the allocator put each implementation's buffers
moved the ratio by up to 15 % (fm_normguard T fp32, one process: 0.83x after S had run, 0.96x without; likely
4K aliasing between the backward's stores and its loads), so the ratio would measure allocator luck.

The clock: `cpu` (default) is the calling thread's CPU time (`time.thread_time`): at 1 torch thread Inductor's
C++ kernels and ATen run in that thread, so it counts the work (page faults included) but not the time the
scheduler gives to other processes, which on a loaded machine inflates and scatters wall times. It is only
meaningful at --threads 1 (other threads' work is not counted); `wall` (perf_counter) for quiet machines and
more threads.

    python -m benchmarks.cpu_ab [--ops normguard ...] [--shapes S T] [--dtypes fp32 bf16] [--threads 1]
                                [--reps 40] [--repeats 3] [--fresh-process]

--fresh-process times each case in its own Python process (no other compiled variant or call site alive), to
tell the case's own speed from the state a long process accumulates.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time

import torch

from benchmarks import cases


CLOCKS = {"cpu": time.thread_time, "wall": time.perf_counter}
_clock = CLOCKS["cpu"]


def _faults() -> int:
    return resource.getrusage(getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF)).ru_minflt


def _timed(fn) -> tuple[float, int]:
    """-> (seconds on the chosen clock, minor page faults of the calling thread)."""
    f0 = _faults()
    t0 = _clock()
    fn()
    t = _clock() - t0
    return t, _faults() - f0


def measure(op: str, shape: str, dtype: str, reps: int, repeats: int, warmup: int) -> dict:
    """-> {first_call_s, compile_first_s, ratios [repeats], ngk_ms, cmp_ms} for one case (full pass, CPU)."""
    device = torch.device("cpu")
    dims = cases.SHAPE_SETS["full"][shape]
    passes = {}
    first = {}
    inputs = cases.make_inputs(cases.Case(op, "compile", "full", shape, dims, dtype), device)  # shared: see above
    # compile traces first: a call of ngkernels' compiled path leaves `_dynamo_propagated_dynamic_indices` on the
    # shared inputs, and a torch.compile that first traces them after that makes those sizes symbolic (before
    # 2026-12-04 20:30 UTC this ran ngkernels first, so its "compile" was partly symbolic: benchmarks/README.md)
    for impl in ("compile", "ngkernels"):
        case = cases.Case(op, impl, "full", shape, dims, dtype)
        p = passes[impl] = cases.Pass(case, inputs)
        p.reset()
        t0 = time.perf_counter()
        p()  # the first call compiles
        first[impl] = time.perf_counter() - t0
        cases.check_agreement(case, device)
        p.warm_up(warmup)

    def call(impl):
        p = passes[impl]
        p.reset()
        return _timed(p)

    ratios, ngk_ms, cmp_ms = [], [], []
    faults = {"ngkernels": [], "compile": []}
    for _ in range(repeats):
        times = {"ngkernels": [], "compile": []}
        for i in range(reps):
            order = ("ngkernels", "compile") if i % 2 == 0 else ("compile", "ngkernels")
            for impl in order:
                t, f = call(impl)
                times[impl].append(t)
                faults[impl].append(f)
        a, b = statistics.median(times["ngkernels"]), statistics.median(times["compile"])
        ratios.append(b / a)
        ngk_ms.append(a * 1e3)
        cmp_ms.append(b * 1e3)
    return {"first_call_s": first["ngkernels"], "compile_first_s": first["compile"], "ratios": ratios,
            "ngk_ms": statistics.median(ngk_ms), "cmp_ms": statistics.median(cmp_ms),
            "ngk_faults": statistics.median(faults["ngkernels"]), "cmp_faults": statistics.median(faults["compile"])}


def _row(op, shape, dtype, r) -> str:
    each = " ".join(f"{x:.2f}" for x in r["ratios"])
    return (f"| {op} | {shape} | {dtype} | **{statistics.median(r['ratios']):.2f}** | {each} | "
            f"{r['ngk_ms']:.2f} | {r['cmp_ms']:.2f} | {r['ngk_faults']:.0f} / {r['cmp_faults']:.0f} | "
            f"{r['first_call_s']:.1f} | {r['compile_first_s']:.1f} |")


HEADER = ("| op | shape | dtype | vs compile (median) | per repeat | ngkernels ms | compile ms | page faults / pass "
          "(ngkernels / compile) | first ngkernels call s | first compile call s |\n"
          "|---|---|---|---:|---|---:|---:|---:|---:|---:|")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", nargs="+", choices=tuple(cases.OPS), default=list(cases.OPS))
    parser.add_argument("--shapes", nargs="+", choices=tuple(cases.SHAPE_SETS["full"]), default=["S", "T"])
    parser.add_argument("--dtypes", nargs="+", choices=tuple(cases.DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--reps", type=int, default=40, help="timed pairs of calls per repeat (default 40)")
    parser.add_argument("--repeats", type=int, default=3, help="independent repeats per case (default 3)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls of each after the first (default 5)")
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="cpu",
                        help="cpu: thread CPU time (default; needs --threads 1), wall: perf_counter")
    parser.add_argument("--fresh-process", action="store_true", help="each case in its own Python process")
    parser.add_argument("--row-only", action="store_true", help=argparse.SUPPRESS)  # the child of --fresh-process
    args = parser.parse_args(argv)

    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu counts only the calling thread: use --threads 1, or --clock wall")
    global _clock
    _clock = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)
    cases.configure_dynamo()
    if not args.row_only:
        print(f"torch {torch.__version__}, {args.threads} thread(s), {args.clock} clock, {args.reps} interleaved pairs x "
              f"{args.repeats} repeats, full pass (forward + backward); "
              f"{'one process per case' if args.fresh_process else 'all cases in one process'}\n")
        print(HEADER, flush=True)
    for op in args.ops:
        for shape in args.shapes:
            for dtype in args.dtypes:
                if args.fresh_process:
                    cmd = [sys.executable, "-m", "benchmarks.cpu_ab", "--row-only", "--ops", op, "--shapes", shape,
                           "--dtypes", dtype, "--threads", str(args.threads), "--clock", args.clock, "--reps", str(args.reps),
                           "--repeats", str(args.repeats), "--warmup", str(args.warmup)]
                    subprocess.run(cmd, check=True)
                    continue
                r = measure(op, shape, dtype, args.reps, args.repeats, args.warmup)
                print(_row(op, shape, dtype, r), flush=True)


if __name__ == "__main__":
    main()
