"""What the compiled CPU path saves per call and what its first compile costs: the two numbers behind
`ngkernels.compiled_cpu`'s pay-back rule (SAVING_NS_PER_ELEMENT, COMPILE_COST_S).

Saving: for each op, shape and dtype, the benchmark suite's full pass (`cases.Pass`, impl "ngkernels": forward
with v requiring grad, then backward) is timed on the eager torch backend (NGKERNELS_CPU_COMPILE=0) and on the
compiled path (=1) in alternation, call after call, in one process; the saving is the difference of the two
medians, per element of v. The clock is the calling thread's CPU time (`time.thread_time`) at 1 torch thread, as
in benchmarks/cpu_ab.py: on a loaded machine wall times count the other processes' share of the cores.

First call (--first-call): in a fresh process, the wall and CPU time (this process and its waited-for children,
Inductor's compile workers) of importing Dynamo and Inductor, then of the first compiled call of fm_normguard
(S, the given dtype), then of a second variant (the other dtype). Inductor's on-disk cache is whatever this
machine has (warm after any earlier run): the cost a user pays in their second and later processes.

    python -m benchmarks.cpu_payback [--ops fm_normguard] [--shapes S T] [--dtypes fp32 bf16] [--reps 30] [--no-grad]
    python -m benchmarks.cpu_payback --first-call
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from benchmarks import cases


def _cpu() -> float:
    """CPU seconds of this process and its waited-for children (Inductor's compile subprocesses)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def saving(op: str, shape: str, dtype: str, reps: int, no_grad: bool = False) -> dict:
    """-> {eager_ms, compiled_ms, saving_ms, ns_per_element} of one full pass (median thread CPU time), or of the
    forward alone under torch.no_grad() (no_grad: an evaluation's call)."""
    dims = cases.SHAPE_SETS["full"][shape]
    case = cases.Case(op, "ngkernels", "full", shape, dims, dtype)
    p = cases.Pass(case, cases.make_inputs(case, torch.device("cpu")))
    run = p

    def run_no_grad():
        with torch.no_grad():
            p.forward()
    if no_grad:
        run = run_no_grad
    times = {"0": [], "1": []}
    for i in range(reps + 6):
        for choice in (("0", "1") if i % 2 == 0 else ("1", "0")):
            os.environ["NGKERNELS_CPU_COMPILE"] = choice
            p.reset()
            t0 = time.thread_time()
            run()
            if i >= 6:  # the first calls compile and warm the allocator
                times[choice].append(time.thread_time() - t0)
    eager, compiled = statistics.median(times["0"]), statistics.median(times["1"])
    numel = p.v.numel()
    return {"eager_ms": eager * 1e3, "compiled_ms": compiled * 1e3, "saving_ms": (eager - compiled) * 1e3,
            "ns_per_element": (eager - compiled) / numel * 1e9}


FIRST_CALL = """
import os, time, resource
os.environ["NGKERNELS_CPU_COMPILE"] = "1"
from benchmarks.cpu_payback import _cpu
from benchmarks import cases
import torch
torch.set_num_threads(1)
def timed(label, fn):
    w, c = time.perf_counter(), _cpu()
    fn()
    print(f"{label}: wall {time.perf_counter() - w:.2f} s, cpu {_cpu() - c:.2f} s", flush=True)
def first(dtype):
    case = cases.Case("fm_normguard", "ngkernels", "full", "S", cases.SHAPE_SETS["full"]["S"], dtype)
    cases.Pass(case, cases.make_inputs(case, torch.device("cpu")))()
timed("import torch._dynamo, torch._inductor.compile_fx", lambda: __import__("torch._inductor.compile_fx"))
timed("first compiled call (fm_normguard S DTYPE0, fwd+bwd)", lambda: first("DTYPE0"))
timed("second variant (fm_normguard S DTYPE1, fwd+bwd)", lambda: first("DTYPE1"))
"""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", nargs="+", choices=tuple(cases.OPS), default=["fm_normguard"])
    parser.add_argument("--shapes", nargs="+", choices=tuple(cases.SHAPE_SETS["full"]), default=["S", "T"])
    parser.add_argument("--dtypes", nargs="+", choices=tuple(cases.DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--reps", type=int, default=30, help="timed calls of each path (default 30)")
    parser.add_argument("--no-grad", action="store_true", help="the forward alone, under torch.no_grad()")
    parser.add_argument("--first-call", action="store_true", help="time the first compile in a fresh process")
    args = parser.parse_args(argv)
    if args.first_call:
        d0, d1 = (args.dtypes + ["bf16"])[:2]
        script = FIRST_CALL.replace("DTYPE0", d0).replace("DTYPE1", d1)
        subprocess.run([sys.executable, "-c", script], check=True)
        return
    torch.set_num_threads(1)
    cases.configure_dynamo()
    what = "no-grad forwards" if args.no_grad else "full passes"
    print(f"torch {torch.__version__}, 1 thread, thread CPU time, median of {args.reps} {what} each\n")
    print("| op | shape | dtype | eager ms | compiled ms | saving ms | saving ns / element |\n"
          "|---|---|---|---:|---:|---:|---:|")
    for op in args.ops:
        for shape in args.shapes:
            for dtype in args.dtypes:
                r = saving(op, shape, dtype, args.reps, args.no_grad)
                print(f"| {op} | {shape} | {dtype} | {r['eager_ms']:.2f} | {r['compiled_ms']:.2f} | "
                      f"{r['saving_ms']:.2f} | {r['ns_per_element']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
