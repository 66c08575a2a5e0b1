"""Ahead-of-time compilation of the fused loss kernels for the native library (`native/`, `CMakeLists.txt`).

    python -m ngkernels.aot --out DIR --arch 80 --arch 90 [--jobs N]

compiles every kernel specialisation the C library dispatches to with `triton.compile` and an explicit
`GPUTarget` (no GPU or driver needed) and writes, into DIR:
  ngkernels_aot.h         constants of the launch rule, the tile table, per-kernel argument structs and
                          parameter fillers, the specialisation table's layout
  ngkernels_aot_table.c   the specialisation table (kernel, arch, dtype, tile, alignment, constexpr flags,
                          num_warps, shared memory, number of parameters)
  ngkernels_aot_smXX.c    the cubins as byte arrays, one file per arch
  manifest.json           the same table for tools and tests; cubins/ the binaries themselves

The kernels (`ngkernels/ops/fm_normguard.py`) are the single source of truth. Everything about them is read
from them: argument names and order, which arguments are constexpr, the flags, the tile rule
(`ops.tile_of`, `ops.launch_plan` and their constants). What is decided here, for the native library only:
  * tiles: `ops.tile_of` with BLOCK_N rounded up to the next of AOT_BLOCK_NS; the C rule is `ops.launch_plan`
    with those tiles and, per tile, the CTAs per SM its compiled forward kernels allow (registers read from
    the cubins, `ops.ctas_per_sm`), written into the tile table (see `aot_launch_plan`);
  * one tile width, ops.TILE (4096 elements), for every dtype: the C rule picks the tile from N alone
    (`ng_launch_plan` and the workspace size take no dtype), whereas the Python launcher narrows it to
    ops.TILE_BYTES per program-iteration (`ops.tile_for`: fp32 2048). A different plan (ROWS, BLOCK_N, warps,
    splits) for fp32, not a different value: both compute the same loss and gradient up to float32 summation
    order (a byte rule in C would need a dtype in those two calls and a tile table per dtype);
  * BLOCK_S and BLOCK_B as the Python launcher sets them (`ops.tile_of`, `ops.BLOCK_B`);
  * REDUCE=True and HAS_W=HAS_T always (a reduction "none" call writes the reduced value to the
    workspace; a missing weight is a workspace row of ones): same results, half the specialisations;
  * integer arguments are never specialised on the value 1 (the JIT would make them constexpr); an
    "aligned" variant carries the JIT's divisibility-by-16 hints on the input pointers, row strides and N,
    a "generic" variant none, and the library picks one per call; the workspace pointer PART always carries
    the hint; B and the split/chunk/row-block counts never do (the JIT does not specialise them either).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import hashlib
import itertools
import json
import multiprocessing
import os
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton

from ngkernels.ops import fm_normguard as ops
from ngkernels.options import reduction_code

KERNELS = {"fwd": "_fwd_kernel", "bwd": "_bwd_kernel"}
ARCHS = (80, 90)  # cc 8.x runs the sm_80 cubins, 9.0 the sm_90(a) ones
DTYPES = ("fp32", "bf16", "fp16")  # C enum order: NG_FLOAT32, NG_BFLOAT16, NG_FLOAT16
AOT_BLOCK_NS = (16, 128, 1024, ops.TILE)  # compiled BLOCK_N; ROWS = TILE // BLOCK_N
DIVISIBILITY = 16  # the JIT's hint: pointers 16-byte aligned, integers multiples of 16

# Argument types by name. Input pointers (V, T, R and the gradient G) take the problem's dtype; every
# statistic and coefficient is float32 (ACC), the ticket counter int32. A kernel argument missing here stops
# the generator with a message instead of guessing.
INPUT_POINTERS = ("V", "T", "R", "G")
ARG_TYPES = {
    "W": "*fp32", "PART": "*fp32", "COUNT": "*i32", "BSUM": "*fp32", "STATS": "*fp32", "COEF": "*fp32", "LOSS": "*fp32",
    "OUT": "*fp32", "GO": "*fp32",
    "stride_v": "i64", "stride_t": "i64", "stride_r": "i64",
    "B": "i32", "N": "i32", "chunk_blocks": "i32", "n_splits": "i32", "n_row_blocks": "i32",
    "ng_lambda": "fp32", "margin": "fp32", "inv_n": "fp32", "out_scale": "fp32", "go_scale": "fp32",
}
ALIGNED_HINTS = ("V", "T", "R", "G", "stride_v", "stride_t", "stride_r", "N")  # only in "aligned" variants
ALWAYS_HINTS = ("PART",)
C_TYPES = {"*": "CUdeviceptr", "i32": "int32_t", "i64": "int64_t", "fp32": "float"}
PTX_TYPES = {"*": {"u64", "b64"}, "i32": {"u32", "s32", "b32"}, "i64": {"u64", "s64", "b64"},
             "fp32": {"f32", "b32"}}
TILE_CONSTEXPRS = ("ACC", "ROWS", "BLOCK_N", "BLOCK_S", "BLOCK_B")
# Constexprs with one value in the library: the L2 policy as the Python launcher's default (ops.L2_KEEP).
FIXED_CONSTEXPRS = {**ops.l2_policies(ops.L2_KEEP), "REVERSE": ops.L2_KEEP}

# Constexpr flag combinations the library uses: normguard alone, fm + normguard, flow matching alone.
_TERMS = ((False, True), (True, True), (True, False))  # (target, v_ref)


def fwd_flag_sets():
    for has_t, has_r in _TERMS:
        options = itertools.product((False, True), repeat=2) if has_r else [(False, False)]
        for relative, squared in options:
            yield dict(HAS_T=has_t, HAS_R=has_r, HAS_W=has_t, RELATIVE=relative, SQUARED=squared, REDUCE=True)


def bwd_flag_sets():
    for has_t, has_r in _TERMS:
        for per_sample in (False, True):
            yield dict(HAS_A=has_r, HAS_T=has_t, GO_PER_SAMPLE=per_sample)


FLAG_SETS = {"fwd": fwd_flag_sets, "bwd": bwd_flag_sets}


def jit_function(name):
    """The kernel as a JITFunction (under TRITON_INTERPRET=1 the module holds an interpreted wrapper)."""
    kernel = getattr(ops, name)
    return kernel if isinstance(kernel, triton.runtime.jit.JITFunction) else triton.runtime.jit.JITFunction(kernel.fn)


def kernel_params(name):
    """(runtime argument names, constexpr names) in the kernel's order."""
    fn = jit_function(name)
    runtime = [p.name for p in fn.params if not p.is_constexpr]
    constexpr = [p.name for p in fn.params if p.is_constexpr]
    return runtime, constexpr


def flag_names(kind):
    """The kernel's boolean constexpr flags, in its order (everything but the tile and fixed constexprs)."""
    _, constexpr = kernel_params(KERNELS[kind])
    names = [n for n in constexpr if n not in TILE_CONSTEXPRS and n not in FIXED_CONSTEXPRS]
    sample = next(FLAG_SETS[kind]())
    if set(names) != set(sample):
        raise SystemExit(f"ngkernels.aot: {KERNELS[kind]} has constexpr flags {names}, the generator knows "
                         f"{sorted(sample)}: update fwd_flag_sets/bwd_flag_sets and native/ngkernels.c")
    return names


# ---------------------------------------------------------------------------------------------------------
# Tiles and the launch rule shared with the Python launcher (ops.launch_plan)


@dataclass(frozen=True)
class Tile:
    rows: int
    block_n: int
    block_s: int  # split partials the last arrival reads per step
    num_warps: int


@functools.lru_cache(maxsize=None)
def aot_tiles():
    """One tile per compiled BLOCK_N: the Python launcher's own tile for rows of exactly that length."""
    tiles = []
    for block_n in sorted(AOT_BLOCK_NS):
        rows, bn, num_warps, block_s = ops.tile_of(block_n)
        assert bn == block_n, (bn, block_n)
        tiles.append(Tile(rows, block_n, block_s, num_warps))
    if tiles[-1].block_n != ops.TILE:
        raise SystemExit("ngkernels.aot: AOT_BLOCK_NS must contain the widest tile, ops.TILE")
    return tuple(tiles)


def aot_launch_plan(B, N, num_sms, programs_per_sm, splits=0):
    """The C library's launch rule, in Python (native/ngkernels.c implements the same lines): ops.launch_plan
    over the compiled tiles, one wave being num_sms x the tile's programs_per_sm (from the manifest).
    Returns (rows, block_n, n_row_blocks, n_splits, chunk, num_warps, tile_index), chunk in elements."""
    _, block_n, _, _ = ops.tile_of(N, block_ns=AOT_BLOCK_NS)
    index = [t.block_n for t in aot_tiles()].index(block_n)
    plan = ops.launch_plan(B, N, programs_per_sm[index] * num_sms, splits, block_ns=AOT_BLOCK_NS)
    return (plan.rows, plan.block_n, plan.n_row_blocks, plan.n_splits, plan.chunk_blocks * plan.block_n,
            plan.num_warps, index)


def cubin_registers(cubin: bytes, entry: str) -> int:
    """Registers per thread of `entry` in a cubin, without a GPU (what cuobjdump --dump-resource-usage prints as
    REG): the ELF's .nv.info sections hold EIATTR_REGCOUNT (attribute 0x2f) records of (symbol index, registers),
    and the section .text.<entry> names the entry's symbol index in sh_info. Records are 4-byte aligned: 2 header
    bytes (format, attribute), then 2 value bytes, or for EIFMT_SVAL (4) a 2-byte size and that many bytes.
    Where no record names the entry (another ptxas), the only REGCOUNT record of the cubin is its one kernel's."""
    import struct

    shoff, = struct.unpack_from("<Q", cubin, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", cubin, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", cubin, shoff + i * shentsize) for i in range(shnum)]
    names_at = headers[shstrndx][4]
    sections = {cubin[names_at + h[0]:cubin.index(b"\0", names_at + h[0])].decode(): h for h in headers}
    text = sections.get(f".text.{entry}")
    counts = {}
    for name, h in sections.items():
        if not name.startswith(".nv.info"):
            continue
        data, at = cubin[h[4]:h[4] + h[5]], 0
        while at + 4 <= len(data):
            fmt, attr = data[at], data[at + 1]
            if fmt == 4:  # EIFMT_SVAL
                size, = struct.unpack_from("<H", data, at + 2)
                if attr == 0x2F and size >= 8:  # EIATTR_REGCOUNT
                    symbol, regs = struct.unpack_from("<II", data, at + 4)
                    counts[symbol] = regs
                at += 4 + size
            else:  # EIFMT_NVAL, BVAL, HVAL: 4 bytes in all
                at += 4
    if text is not None and text[7] in counts:
        return counts[text[7]]
    if len(set(counts.values())) == 1:
        return next(iter(counts.values()))
    raise SystemExit(f"ngkernels.aot: no register count for {entry} in the cubin's .nv.info sections")


def programs_per_sm(specs, results):
    """Per tile: the CTAs per SM the tile's forward kernels allow (the fewest over dtypes, flags and alignment,
    at the newest compiled arch): the C rule's wave, derived from compiled resource use as in Python."""
    newest = max(s.arch for s in specs)
    out = []
    for index in range(len(aot_tiles())):
        out.append(min(ops.ctas_per_sm(r["n_regs"], r["num_warps"], r["shared"])
                       for s, r in zip(specs, results) if s.kind == "fwd" and s.tile == index and s.arch == newest))
    return out


# ---------------------------------------------------------------------------------------------------------
# Specialisations


@dataclass(frozen=True)
class Spec:
    kind: str  # "fwd" | "bwd"
    arch: int
    dtype: str
    tile: int  # index into aot_tiles()
    aligned: bool
    flags: int  # bit i = flag_names(kind)[i]

    @property
    def name(self):
        return f"{self.kind}_sm{self.arch}_{self.dtype}_t{self.tile}_{'a' if self.aligned else 'g'}_f{self.flags}"


def specialisations(archs=ARCHS):
    out = []
    for kind in KERNELS:
        names = flag_names(kind)
        for arch, dtype, tile, aligned, flags in itertools.product(
                archs, DTYPES, range(len(aot_tiles())), (True, False), FLAG_SETS[kind]()):
            bits = sum(1 << i for i, n in enumerate(names) if flags[n])
            out.append(Spec(kind, arch, dtype, tile, aligned, bits))
    return out


def signature_of(kind, dtype):
    runtime, _ = kernel_params(KERNELS[kind])
    sig = {}
    for name in runtime:
        if name in INPUT_POINTERS:
            sig[name] = "*" + dtype
        elif name in ARG_TYPES:
            sig[name] = ARG_TYPES[name]
        else:
            raise SystemExit(f"ngkernels.aot: unknown argument {name!r} of {KERNELS[kind]}: give it a type in "
                             "ARG_TYPES and a value in native/ngkernels.c")
    return sig


def compile_spec(spec: Spec):
    """Compile one specialisation; returns the cubin and what the launcher needs (runs in a worker)."""
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = jit_function(KERNELS[spec.kind])
    tile = aot_tiles()[spec.tile]
    names = flag_names(spec.kind)
    constexprs = {n: bool(spec.flags >> i & 1) for i, n in enumerate(names)}
    constexprs.update(ACC=tl.float32, ROWS=tile.rows, BLOCK_N=tile.block_n)
    _, constexpr_names = kernel_params(KERNELS[spec.kind])
    constexprs.update({k: v for k, v in FIXED_CONSTEXPRS.items() if k in constexpr_names})
    if "BLOCK_S" in constexpr_names:
        constexprs["BLOCK_S"] = tile.block_s
    if "BLOCK_B" in constexpr_names:
        constexprs["BLOCK_B"] = ops.BLOCK_B
    missing = set(constexpr_names) - set(constexprs)
    if missing:
        raise SystemExit(f"ngkernels.aot: no value for constexpr {sorted(missing)} of {fn.__name__}")
    sig = signature_of(spec.kind, spec.dtype)
    hinted = ALWAYS_HINTS + (ALIGNED_HINTS if spec.aligned else ())
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", DIVISIBILITY]] for n in hinted if n in sig}
    src = ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in constexprs}},
                    constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()}, attrs=attrs)
    options = {"num_warps": tile.num_warps, "enable_fp_fusion": ops.FP_FUSION}
    compiled = triton.compile(src, target=GPUTarget("cuda", spec.arch, 32), options=options)
    md = compiled.metadata
    unsupported = {k: getattr(md, k) for k in ("launch_cooperative_grid", "launch_pdl", "global_scratch_size",
                                               "profile_scratch_size") if getattr(md, k)}
    if md.num_ctas != 1:
        unsupported["num_ctas"] = md.num_ctas
    if unsupported:
        raise SystemExit(f"ngkernels.aot: {spec.name} needs {unsupported}; native/ngkernels.c launches "
                         "single-CTA kernels without scratch memory: extend it first")
    ptx = compiled.asm["ptx"]
    entry = re.search(r"\.entry\s+(\w+)\s*\((.*?)\)", ptx, re.S)
    ptx_params = re.findall(r"\.param\s+\.(\w+)", entry.group(2))
    n_args = len(sig)
    # Triton appends scratch pointers (global, profile: 2 in triton 3.9) after the kernel's own arguments
    for (name, ty), ptx_ty in zip(sig.items(), ptx_params):
        if ptx_ty not in PTX_TYPES["*" if ty.startswith("*") else ty]:
            raise SystemExit(f"ngkernels.aot: {spec.name}: argument {name} is .{ptx_ty} in PTX, expected {ty}")
    extra = len(ptx_params) - n_args
    if extra < 0 or any(t not in PTX_TYPES["*"] for t in ptx_params[n_args:]):
        raise SystemExit(f"ngkernels.aot: {spec.name}: unexpected PTX parameters {ptx_params}")
    target = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1)
    return dict(cubin=compiled.asm["cubin"], entry=entry.group(1), shared=md.shared, num_warps=md.num_warps,
                n_regs=cubin_registers(compiled.asm["cubin"], entry.group(1)),
                num_params=len(ptx_params), scratch_params=extra, target=target,
                vector_loads=bool(re.search(r"ld\.global\S*\.v4\.", ptx)), spills=".local" in ptx)


def _worker_init():
    triton.knobs.compilation.disable_line_info = True  # 3x smaller cubins, same code


def compile_all(specs, jobs):
    _worker_init()
    results = [None] * len(specs)
    try:
        from tqdm import tqdm
    except ImportError:  # the generator only needs torch + triton
        tqdm = None
    bar = tqdm(total=len(specs), desc="ngkernels.aot", unit="kernel", disable=None) if tqdm else None
    if jobs <= 1:
        for i, spec in enumerate(specs):
            results[i] = compile_spec(spec)
            bar and bar.update()
    else:
        ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch/triton state
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_init) as pool:
            futures = {pool.submit(compile_spec, s): i for i, s in enumerate(specs)}
            for fut in concurrent.futures.as_completed(futures):
                results[futures[fut]] = fut.result()
                bar and bar.update()
    bar and bar.close()
    return results


# ---------------------------------------------------------------------------------------------------------
# C sources


def _c_bytes(data: bytes, indent="    "):
    """A byte array as C string literals (compiles ~20x faster than an initializer list)."""
    lines = []
    for i in range(0, len(data), 48):
        lines.append(indent + '"' + "".join(f"\\x{b:02x}" for b in data[i:i + 48]) + '"')
    return "\n".join(lines)


def _struct_and_filler(kind, max_scratch):
    runtime, _ = kernel_params(KERNELS[kind])
    sig = signature_of(kind, "fp32")
    fields = "\n".join(f"    {C_TYPES['*' if sig[n].startswith('*') else sig[n]]} {n};" for n in runtime)
    fill = "\n".join(f"    params[{i}] = &args->{n};" for i, n in enumerate(runtime))
    return f"""
/* Runtime arguments of {KERNELS[kind]}, named and ordered as in ngkernels/ops/fm_normguard.py. */
typedef struct ng_{kind}_args {{
{fields}
    CUdeviceptr scratch[NG_MAX_SCRATCH_PARAMS]; /* Triton's trailing scratch pointers: always NULL */
}} ng_{kind}_args;

#define NG_{kind.upper()}_NUM_ARGS {len(runtime)}

/* params[] for cuLaunchKernelEx: the arguments in order, then `scratch_params` scratch pointers. */
static inline int ng_{kind}_params(ng_{kind}_args *args, int scratch_params, void **params) {{
{fill}
    for (int i = 0; i < scratch_params; ++i) params[{len(runtime)} + i] = &args->scratch[i];
    return {len(runtime)} + scratch_params;
}}
"""


def write_sources(out: Path, specs, results, archs):
    out.mkdir(parents=True, exist_ok=True)
    (out / "cubins").mkdir(exist_ok=True)
    tiles = aot_tiles()
    max_scratch = max(r["scratch_params"] for r in results)
    max_params = max(r["num_params"] for r in results)
    flag_defs = []
    for kind in KERNELS:
        for i, n in enumerate(flag_names(kind)):
            flag_defs.append(f"#define NG_{kind.upper()}_{n} (1u << {i})")
    dtype_defs = "\n".join(f"#define NG_AOT_DTYPE_{d.upper()} {i}" for i, d in enumerate(DTYPES))
    per_sm = programs_per_sm(specs, results)
    tile_rows = ",\n".join(f"    {{{t.rows}, {t.block_n}, {t.block_s}, {t.num_warps}, {p}}}" for t, p in zip(tiles, per_sm))
    header = f"""/* Generated by `python -m ngkernels.aot` from ngkernels/ops/fm_normguard.py: do not edit. */
#ifndef NGKERNELS_AOT_H
#define NGKERNELS_AOT_H

#include <stddef.h>
#include <stdint.h>
#include <cuda.h>

#define NG_AOT_TRITON_VERSION "{triton.__version__}"

/* ops.launch_plan's constants and the compiled tiles (ngkernels.aot.aot_launch_plan is the Python twin) */
#define NG_TILE {ops.TILE}
#define NG_MAX_BLOCK_N {ops.TILE}
#define NG_MAX_SPLITS {ops.MAX_SPLITS}
#define NG_DIVISIBILITY {DIVISIBILITY}
#define NG_NUM_TILES {len(tiles)}
#define NG_NUM_KERNELS {len(specs)}
#define NG_MAX_SCRATCH_PARAMS {max(max_scratch, 1)}
#define NG_MAX_PARAMS {max_params}
{dtype_defs}
#define NG_REDUCTION_CODE_NONE {reduction_code('none')}
#define NG_REDUCTION_CODE_MEAN {reduction_code('mean')}
#define NG_REDUCTION_CODE_SUM {reduction_code('sum')}

{chr(10).join(flag_defs)}

typedef struct ng_aot_tile {{
    int rows, block_n, block_s, num_warps;
    int programs_per_sm; /* CTAs per SM its forward kernels allow (registers from the cubins): one wave */
}} ng_aot_tile;

static const ng_aot_tile ng_aot_tiles[NG_NUM_TILES] = {{
{tile_rows}
}};

enum {{ NG_KIND_FWD = 0, NG_KIND_BWD = 1 }};

typedef struct ng_aot_kernel {{
    const char *name;            /* e.g. fwd_sm90_bf16_t3_a_f7 */
    const char *entry;           /* function name in the cubin */
    const unsigned char *cubin;
    size_t cubin_size;
    uint8_t kind;                /* NG_KIND_* */
    uint8_t arch;                /* 80 or 90 */
    uint8_t dtype;               /* index into fp32, bf16, fp16 (the ng_dtype enum) */
    uint8_t tile;                /* index into ng_aot_tiles */
    uint8_t aligned;             /* compiled with divisibility-16 hints on inputs, strides and N */
    uint8_t num_params;          /* kernel arguments + trailing scratch pointers */
    uint8_t scratch_params;
    uint32_t flags;              /* NG_FWD_* / NG_BWD_* bits */
    int num_warps;
    int shared;                  /* dynamic shared memory bytes to launch with */
}} ng_aot_kernel;

extern const ng_aot_kernel ng_aot_kernels[NG_NUM_KERNELS];
{_struct_and_filler("fwd", max_scratch)}{_struct_and_filler("bwd", max_scratch)}
#endif /* NGKERNELS_AOT_H */
"""
    _write(out / "ngkernels_aot.h", header)

    manifest = []
    blobs = {arch: [] for arch in archs}
    entries = []
    for i, (spec, res) in enumerate(zip(specs, results)):
        sym = f"ng_cubin_{spec.name}"
        # aligned like a cubin file in memory: the loader reads the ELF's 64-bit fields in place
        blobs[spec.arch].append(f"__attribute__((aligned(64))) const unsigned char {sym}[{len(res['cubin']) + 1}] ="
                                f"\n{_c_bytes(res['cubin'])};\n")
        (out / "cubins" / f"{spec.name}.cubin").write_bytes(res["cubin"])
        entries.append(f'    {{"{spec.name}", "{res["entry"]}", {sym}, {len(res["cubin"])}, '
                       f'{0 if spec.kind == "fwd" else 1}, {spec.arch}, {DTYPES.index(spec.dtype)}, {spec.tile}, '
                       f'{int(spec.aligned)}, {res["num_params"]}, {res["scratch_params"]}, {spec.flags}u, '
                       f'{res["num_warps"]}, {res["shared"]}}}')
        manifest.append(dict(asdict(spec), name=spec.name, entry=res["entry"], target=res["target"],
                             num_warps=res["num_warps"], shared=res["shared"], num_params=res["num_params"],
                             scratch_params=res["scratch_params"], vector_loads=res["vector_loads"],
                             spills=res["spills"], n_regs=res["n_regs"], cubin_size=len(res["cubin"]),
                             cubin_sha256=hashlib.sha256(res["cubin"]).hexdigest()))
    for arch in archs:
        banner = f"/* Generated by `python -m ngkernels.aot`: sm_{arch} cubins. */\n\n"
        _write(out / f"ngkernels_aot_sm{arch}.c", banner + "\n".join(blobs[arch]))
    table = ",\n".join(entries)
    decls = "\n".join(f"extern const unsigned char ng_cubin_{s.name}[];" for s in specs)
    _write(out / "ngkernels_aot_table.c", f"""/* Generated by `python -m ngkernels.aot`: do not edit. */
#include "ngkernels_aot.h"

{decls}

const ng_aot_kernel ng_aot_kernels[NG_NUM_KERNELS] = {{
{table}
}};
""")
    info = dict(triton=triton.__version__, archs=list(archs), dtypes=list(DTYPES),
                tiles=[dict(asdict(t), programs_per_sm=p) for t, p in zip(tiles, per_sm)], flags={k: flag_names(k) for k in KERNELS},
                kernels=manifest)
    _write(out / "manifest.json", json.dumps(info, indent=1) + "\n")


def _write(path: Path, text: str):
    path.write_text(text)  # always: the build tool compares time stamps with the generator's inputs


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m ngkernels.aot", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--arch", type=int, action="append", choices=ARCHS,
                        help="compute capability to compile for (repeatable; default: 80 and 90)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiler processes")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("ngkernels.aot: unset TRITON_INTERPRET: the interpreter cannot compile kernels")
    archs = tuple(sorted(set(args.arch or ARCHS)))
    specs = specialisations(archs)
    results = compile_all(specs, max(1, args.jobs))
    write_sources(args.out, specs, results, archs)
    size = sum(len(r["cubin"]) for r in results)
    print(f"ngkernels.aot: {len(specs)} kernels for sm_{', sm_'.join(map(str, archs))} "
          f"({size / 2**20:.1f} MiB of cubins) in {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
