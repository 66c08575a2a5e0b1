"""Is the torch.compile peer a fair one? What Inductor makes of each op's eager expression (forward + backward).

For each op, shape and dtype: the number of Dynamo graphs and graph breaks (torch._dynamo.explain), and the
kernels Inductor generated for the forward and the backward graph (C++ kernels on CPU, Triton on CUDA), from
`torch._inductor.utils.run_and_get_code`. Writes a markdown summary and, with --code-dir, the generated code.

    python -m benchmarks.inspect_compile [--device cpu|cuda] [--shapes S F XL] [--results DIR] [--code-dir DIR]
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch
from torch._inductor.utils import run_and_get_code

from benchmarks import cases, results

KERNEL_DEF = re.compile(r"^(\w+) = async_compile\.(\w+)\(", re.M)


def inspect_case(op: cases.Op, case: cases.Case, device: torch.device, code_dir: Path | None):
    inputs = cases.make_inputs(case, device)
    args = [inputs["v"]] + [inputs[name] for name in op.inputs]
    explanation = torch._dynamo.explain(op.eager_fn)(*args)
    torch._dynamo.reset()
    compiled = torch.compile(op.eager_fn, fullgraph=True, dynamic=False)
    _, codes = run_and_get_code(lambda: compiled(*args).backward())
    torch._dynamo.reset()
    if code_dir is not None:
        code_dir.mkdir(parents=True, exist_ok=True)
        for label, code in zip(("forward", "backward"), codes):
            (code_dir / f"{case.op}-{case.shape}-{case.dtype}-{label}.py").write_text(code)
    kernels = [[name for name, _ in KERNEL_DEF.findall(code)] for code in codes]
    return explanation.graph_count, explanation.graph_break_count, len(codes), kernels


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--shape-set", choices=tuple(cases.SHAPE_SETS), default="full")
    parser.add_argument("--shapes", nargs="+", default=None, help="names within the shape set (default: all)")
    parser.add_argument("--dtypes", nargs="+", choices=tuple(cases.DTYPES), default=list(cases.DTYPES))
    parser.add_argument("--results", type=Path, default=results.RESULTS_DIR,
                        help="folder for inductor-<device-slug>.md (default: benchmarks/results)")
    parser.add_argument("--code-dir", type=Path, default=None, help="also write the generated code here")
    args = parser.parse_args(argv)

    device = cases.resolve_device(args.device)
    env = results.environment(device)
    shapes = cases.SHAPE_SETS[args.shape_set]
    unknown = set(args.shapes or []) - set(shapes)
    if unknown:
        raise ValueError(f"unknown shapes {sorted(unknown)}; {args.shape_set} has {sorted(shapes)}")
    lines = [f"# What Inductor generates for the eager expressions: {env['device']}", "",
             f"torch {env['torch']}, triton {env['triton']}, {env['date']}; "
             "`torch.compile(fullgraph=True, dynamic=False)` of `ngkernels.reference.reference_loss` per op, "
             "forward + backward of one step.", "",
             "| op | shape | dtype | graphs | graph breaks | compiled modules | forward kernels | backward kernels |",
             "|---|---|---|---:|---:|---:|---|---|"]
    for op in cases.OPS.values():
        for shape in args.shapes or shapes:
            for dtype in args.dtypes:
                case = cases.Case(op.name, "compile", "full", shape, shapes[shape], dtype)
                graphs, breaks, modules, kernels = inspect_case(
                    op, case, device, args.code_dir)
                fwd, bwd = (kernels + [[], []])[:2]
                lines.append(f"| {op.name} | {shape} | {dtype} | {graphs} | {breaks} | {modules} | "
                             f"{len(fwd)}: {', '.join(fwd)} | {len(bwd)}: {', '.join(bwd)} |")
                print(lines[-1], flush=True)
    out = args.results / f"inductor-{results.device_slug(env['device'])}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(out)


if __name__ == "__main__":
    main()
