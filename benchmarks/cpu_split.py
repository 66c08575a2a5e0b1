"""Where a CPU call's time goes: ngkernels vs torch.compile, split into Inductor's C++ kernels and the rest.

benchmarks/cpu_ab.py says which implementation is faster; this script says why. For one op, shape, dtype and mode
(forward: v requires grad, no backward; full: forward + backward) it times, interleaved call after call in one
process on shared inputs (as cpu_ab does):
  ngkernels  the public op (argument checks, backend choice, options, the compiled-variant key, then the compiled
             graph: ngkernels/compiled_cpu.py),
  compiled   the same compiled graph called directly with prebuilt arguments (the op without its Python front),
  compile    the suite's peer, torch.compile(fullgraph=True, dynamic=False) of the reference expression,
and splits each call into the time inside Inductor's generated C++ kernels (every `cpp_fused_*` function of the
loaded Inductor modules is wrapped with a timer) and the rest (Python, Dynamo guards, AOT autograd, the autograd
engine). Kernels equal but "outside" larger means per-call overhead, not generated code.

    python -m benchmarks.cpu_split [--op fm_normguard] [--shape S] [--dtype bf16] [--mode forward]
                                   [--threads 1] [--clock cpu] [--reps 300] [--repeats 3]

The cpu clock (the calling thread's CPU time) is only meaningful at 1 thread; wall at 2 threads on a machine shared
with other jobs measures the scheduler (each OpenMP barrier can wait a whole time slice).
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from benchmarks import cases
from benchmarks.cpu_ab import CLOCKS
from ngkernels import compiled_cpu
from ngkernels import functional as ngk_functional
from ngkernels.options import LossOptions

IMPLS = ("ngkernels", "compiled", "compile")


class _Compiled:
    """The op's compiled graph called as `functional._fused` calls it, with the arguments built once."""

    def __init__(self, op: cases.Op, inputs: dict, mode: str):
        v = self.v = inputs["v"]
        target = inputs["target"] if "target" in op.inputs else None
        v_ref = inputs["v_ref"] if "v_ref" in op.inputs else None
        key = compiled_cpu.Variant(v.dtype, v.dim(), target is not None, v_ref is not None, False, False, False,
                                   "mean", True, False)
        opts = compiled_cpu.with_tensor_scalars(LossOptions(1.0 if op.name != "flow_matching" else 0.0, 0.0,
                                                            False, False, "mean"))
        seed = torch.ones((), dtype=torch.float32)

        def forward():
            return compiled_cpu.run(ngk_functional._rows_and_loss, key, v, target, v_ref, None, opts, "torch",
                                    True, False)[0]

        self.run = forward if mode == "forward" else (lambda: forward().backward(seed))

    def reset(self):
        self.v.grad = None

    def __call__(self):
        return self.run()


def _time_kernels(clock, spent: list):
    """Wrap every generated C++ kernel of the loaded Inductor modules: each call adds its time to spent[0]."""
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None) or ""
        if "torchinductor" not in path or not hasattr(module, "call"):
            continue
        for name, fn in list(vars(module).items()):
            if name.startswith("cpp_fused") and callable(fn) and not getattr(fn, "_timed", False):
                def timed(*args, _fn=fn):
                    t0 = clock()
                    out = _fn(*args)
                    spent[0] += clock() - t0
                    return out
                timed._timed = True
                setattr(module, name, timed)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--op", choices=tuple(cases.OPS), default="fm_normguard")
    parser.add_argument("--shape", choices=tuple(cases.SHAPE_SETS["full"]), default="S")
    parser.add_argument("--dtype", choices=tuple(cases.DTYPES), default="bf16")
    parser.add_argument("--mode", choices=("forward", "full"), default="forward")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="cpu")
    parser.add_argument("--reps", type=int, default=300, help="interleaved calls of each per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.threads < 1 or args.reps < 1 or args.repeats < 1:
        raise ValueError("--threads, --reps and --repeats must be >= 1")

    torch.set_num_threads(args.threads)
    clock = CLOCKS[args.clock]
    dims = cases.SHAPE_SETS["full"][args.shape]
    op = cases.OPS[args.op]
    inputs = cases.make_inputs(cases.Case(args.op, "ngkernels", args.mode, args.shape, dims, args.dtype),
                               torch.device("cpu"))
    passes = {impl: cases.Pass(cases.Case(args.op, impl, args.mode, args.shape, dims, args.dtype), inputs)
              for impl in ("ngkernels", "compile")}
    passes["compiled"] = _Compiled(op, inputs, args.mode)
    passes = {impl: passes[impl] for impl in IMPLS}
    for p in passes.values():  # compile everything before the kernels are wrapped
        for _ in range(5):
            p.reset()
            p()
    spent = [0.0]
    _time_kernels(clock, spent)

    print(f"{args.op} {args.shape} {list(dims)} {args.dtype} {args.mode}, torch {torch.__version__}, "
          f"{args.threads} thread(s), {args.clock} clock, {args.reps} interleaved calls x {args.repeats} repeats "
          "(medians, ms)")
    print("| repeat | impl | total | C++ kernels | outside |\n|---:|---|---:|---:|---:|")
    for repeat in range(args.repeats):
        total = {impl: [] for impl in passes}
        kernels = {impl: [] for impl in passes}
        for i in range(args.reps):
            order = list(passes)[i % len(passes):] + list(passes)[:i % len(passes)]
            for impl in order:
                p = passes[impl]
                p.reset()
                spent[0] = 0.0
                t0 = clock()
                p()
                total[impl].append(clock() - t0)
                kernels[impl].append(spent[0])
        for impl in passes:
            outside = [t - k for t, k in zip(total[impl], kernels[impl])]
            print(f"| {repeat} | {impl} | {statistics.median(total[impl]) * 1e3:.3f} | "
                  f"{statistics.median(kernels[impl]) * 1e3:.3f} | {statistics.median(outside) * 1e3:.3f} |")


if __name__ == "__main__":
    main()
