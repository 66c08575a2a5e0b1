"""The compiler's view of the ngkernels Triton kernels, for profiling on a GPU: PTX, registers, spills, vector width.

Runs one full pass of each op for every benchmark shape and dtype, then reads the kernels Triton compiled for
them from the JIT caches: `.asm['ptx']`, `.n_regs`, `.n_spills`, shared memory and num_warps. Writes the PTX
(and TTGIR) of each kernel and a markdown summary that counts the global loads/stores by vector width
(`ld.global.v4.b32` moves 16 bytes per thread: the goal for a streaming kernel).

    python -m benchmarks.kernel_report --out DIR [--shapes full|smoke]      (needs CUDA)
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

import torch

from benchmarks import cases
from ngkernels.ops import fm_normguard as kernels

JIT_KERNELS = {"fwd": kernels._fwd_kernel, "bwd": kernels._bwd_kernel}
ACCESS = re.compile(r"\b(ld|st)\.global\S*")


def compiled_kernels() -> dict:
    """{id: (kind, CompiledKernel)} for every specialisation compiled so far (Triton 3.x JIT caches)."""
    found = {}
    for kind, jit in JIT_KERNELS.items():
        jit = getattr(jit, "fn", jit) if not hasattr(jit, "device_caches") else jit  # an autotuner wraps the JIT
        for device_cache in jit.device_caches.values():
            for compiled in device_cache[0].values():  # (kernel_cache, ...) per device
                found[id(compiled)] = (kind, compiled)
    return found


def access_widths(ptx: str) -> Counter:
    """Counts of global loads/stores by (op, vector, bits), e.g. ('ld', 'v4', 32)."""
    counts = Counter()
    for match in ACCESS.finditer(ptx):
        parts = match.group(0).split(".")
        vector = next((p for p in parts if re.fullmatch(r"v[248]", p)), "v1")
        bits = next((int(p[1:]) for p in reversed(parts) if re.fullmatch(r"[bfsu]\d+", p)), 0)
        counts[(match.group(1), vector, bits)] += 1
    return counts


def constexprs(compiled) -> str:
    src = getattr(compiled, "src", None)
    values = getattr(src, "constexprs", None) or getattr(src, "constants", None) or {}
    names = getattr(getattr(src, "fn", None), "arg_names", [])
    shown = {}
    for key, value in values.items():
        name = names[key[0]] if isinstance(key, tuple) and names and key[0] < len(names) else str(key)
        if name.isupper():  # the kernels' compile-time parameters are upper case
            shown[name] = value
    return ", ".join(f"{k}={v}" for k, v in shown.items())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shapes", choices=tuple(cases.SHAPE_SETS), default="full")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("kernel_report needs a CUDA device: it reads the kernels Triton compiled for it")
    device = torch.device("cuda")
    (args.out / "ptx").mkdir(parents=True, exist_ok=True)

    rows, seen = [], set()
    for case in cases.cases(args.shapes, impls=["ngkernels"], modes=["full"]):
        fn = cases.Pass(case, cases.make_inputs(case, device))
        fn.warm_up(1)
        for key, (kind, compiled) in compiled_kernels().items():
            if key in seen:
                continue
            seen.add(key)
            compiled._init_handles()  # loads the binary: fills n_regs / n_spills
            stem = f"{kind}-{case.op}-{case.shape}-{case.dtype}-{compiled.hash[:8]}"
            ptx = compiled.asm["ptx"]
            (args.out / "ptx" / f"{stem}.ptx").write_text(ptx)
            if "ttgir" in compiled.asm:
                (args.out / "ptx" / f"{stem}.ttgir").write_text(compiled.asm["ttgir"])
            widths = access_widths(ptx)
            rows.append((kind, f"{case.op} {case.shape} {case.dtype}", compiled.metadata.num_warps,
                         compiled.n_regs, compiled.n_spills, compiled.metadata.shared,
                         ", ".join(f"{op}.{vec}.{bits}b x{n}" for (op, vec, bits), n in sorted(widths.items())),
                         constexprs(compiled), stem))

    lines = [f"# ngkernels Triton kernels on {torch.cuda.get_device_name(device)}", "",
             f"torch {torch.__version__}, triton {__import__('triton').__version__}; one row per compiled "
             "specialisation (first case that compiled it).", "",
             "| kernel | first case | warps | regs | spills | shared B | global accesses (op.vector.bits x count) "
             "| constexprs | ptx |", "|---|---|---:|---:|---:|---:|---|---|---|"]
    lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    (args.out / "kernels.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
