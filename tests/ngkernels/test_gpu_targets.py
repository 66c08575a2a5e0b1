"""Every Triton kernel specialisation compiles for real GPUs (sm_80, sm_90) on this GPU-less machine.

The interpreter runs kernels without compiling them, so it misses compile errors; triton.compile with an
explicit GPUTarget runs the whole pipeline down to PTX and cubin. The PTX must use 128-bit loads and must not
spill to local memory. The JIT's divisibility-by-16 hints for pointers and strides are reproduced. The L2
cache hints that let the backward re-read v and target from L2 must reach the PTX.
"""

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from ngkernels.aot import cubin_registers

from ngkernels.ops import fm_normguard as ops

TYPES = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}
FWD_ARGS = dict(W="*fp32", stride_v="i64", stride_t="i64", stride_r="i64", PART="*fp32", COUNT="*i32",
                BSUM="*fp32", STATS="*fp32", COEF="*fp32", LOSS="*fp32", OUT="*fp32", B="i32", N="i32",
                chunk_blocks="i32",
                n_splits="i32", n_row_blocks="i32", ng_lambda="fp32", margin="fp32", inv_n="fp32", out_scale="fp32")
BWD_ARGS = dict(stride_v="i64", stride_t="i64", COEF="*fp32", GO="*fp32", B="i32", N="i32", chunk_blocks="i32",
                go_scale="fp32")
ALIGNED = {"V", "T", "R", "G", "stride_v", "stride_t", "stride_r", "N", "PART", "STATS", "COEF", "LOSS"}
# (B, N) of the layouts the package meets: SD3.5 512px, FLUX tokens, few huge samples, per-token rows
PROBLEMS = {"S": (16, 16 * 64 * 64), "T": (8, 4096 * 64), "F": (8, 262144), "per-token": (8 * 4096, 64)}
VARIANTS = {  # (HAS_T, HAS_R, HAS_W, RELATIVE, SQUARED, REDUCE)
    "fm_normguard": (True, True, True, False, False, True),
    "fm_normguard-rel-sq-none": (True, True, False, True, True, False),
    "normguard": (False, True, False, False, False, True),
    "flow_matching": (True, False, True, False, False, True),
}


def _compile(kernel, signature, constexprs, cc, num_warps):
    fn = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)  # interpreter mode wraps it
    sig = {**signature, **{k: "constexpr" for k in constexprs}}
    assert set(sig) == set(fn.arg_names), set(fn.arg_names) ^ set(sig)
    idx = fn.arg_names.index
    attrs = {(idx(k),): [["tt.divisibility", 16]] for k in ALIGNED if k in sig and sig[k] != "constexpr"}
    src = ASTSource(fn=fn, signature=sig, constexprs={(idx(k),): v for k, v in constexprs.items()}, attrs=attrs)
    options = {"num_warps": num_warps, "enable_fp_fusion": ops.FP_FUSION}
    return triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)


def _check_ptx(compiled, loads_expected=True):
    ptx = compiled.asm["ptx"]
    assert ".local" not in ptx, "register spills to local memory"
    if loads_expected:
        assert re.search(r"ld\.global\S*\.v4\.", ptx), "no 128-bit vector loads"
    assert compiled.asm["cubin"], "no cubin"


def _check_l2_hints(ptx, policies):
    """The forward keeps v and target in L2 (evict_last) and lets v_ref go (evict_first); the backward's
    re-reads are their last use (evict_first). Every 128-bit input load carries an L2 cache policy."""
    made = set(re.findall(r"createpolicy\.fractional\.L2::(\w+)\.b64", ptx))
    assert made == policies, f"L2 policies {made}, expected {policies}"
    loads = re.findall(r"ld\.global\S*\.v4\.\S+", ptx)
    assert loads and all(".L2::cache_hint" in ld for ld in loads), loads


def _check_rounding(ptx, has_r):
    """Norms and hinge divisions are correctly rounded and keep denormals (defect: sqrt.approx.ftz / div.full
    gave ||v|| = 0 for rows of ~1e-20): sqrt.rn / div.rn, and nothing flushes to zero."""
    assert "sqrt.rn.f32" in ptx and "sqrt.approx" not in ptx, "norms must use sqrt.rn"
    assert "div.full" not in ptx and "div.approx" not in ptx and ".ftz" not in ptx, "no approximate or flushing math"
    if has_r:
        assert "div.rn.f32" in ptx or "rcp.rn" in ptx


# every variant x dtype on the SD3.5 layout; the other tile configurations with the fused op in bf16 / fp32
CASES = [(var, "S", dt) for var in VARIANTS for dt in TYPES] + \
        [("fm_normguard", prob, dt) for prob in PROBLEMS if prob != "S" for dt in ("bf16", "fp32")]


def _compile_case(variant, problem, dtype, cc):
    import torch

    B, N = PROBLEMS[problem]
    has_t, has_r, has_w, rel, sq, red = VARIANTS[variant]
    tile = ops.tile_for(getattr(torch, {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]))
    plan = ops.launch_plan(B, N, 132 * 2, tile=tile)  # the Python launcher's plan for this dtype
    rows, block_n, num_warps = plan.rows, plan.block_n, plan.num_warps
    ptr = "*" + TYPES[dtype]
    fwd = _compile(ops._fwd_kernel, dict(V=ptr, T=ptr, R=ptr, **FWD_ARGS),
                   dict(HAS_T=has_t, HAS_R=has_r, HAS_W=has_w, RELATIVE=rel, SQUARED=sq, REDUCE=red,
                        **ops.l2_policies(True), ACC=tl.float32, ROWS=rows, BLOCK_N=block_n,
                        BLOCK_S=plan.block_s, BLOCK_B=ops.BLOCK_B),
                   cc, num_warps)
    _check_ptx(fwd)
    _check_l2_hints(fwd.asm["ptx"], {"evict_last"} | ({"evict_first"} if has_r else set()))
    _check_rounding(fwd.asm["ptx"], has_r)
    bwd = _compile(ops._bwd_kernel, dict(V=ptr, T=ptr, G=ptr, **BWD_ARGS),
                   dict(HAS_A=has_r, HAS_T=has_t, GO_PER_SAMPLE=not red, REVERSE=True, ACC=tl.float32, ROWS=rows,
                        BLOCK_N=block_n), cc, num_warps)
    _check_ptx(bwd)
    assert re.search(r"st\.global(\.\w+)*\.v4\.", bwd.asm["ptx"]), "no 128-bit vector stores of the gradient"
    _check_l2_hints(bwd.asm["ptx"], {"evict_first"})


def _cubin_registers_reads_the_elf():
    """The register count the C rule's wave comes from, read from a cubin compiled here for sm_90 without a GPU,
    agrees with the count ptxas reports for the same kernel."""
    import subprocess

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    @triton.jit
    def axpy(X, Y, a, N, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(Y + i, a * tl.load(X + i, mask=i < N) + tl.load(Y + i, mask=i < N), mask=i < N)

    fn = axpy if isinstance(axpy, JITFunction) else JITFunction(axpy.fn)
    src = ASTSource(fn=fn, signature={"X": "*fp32", "Y": "*fp32", "a": "fp32", "N": "i32", "BLOCK": "constexpr"},
                    constexprs={(4,): 1024})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    entry = re.search(r"\.entry\s+(\w+)", compiled.asm["ptx"]).group(1)
    regs = cubin_registers(compiled.asm["cubin"], entry)
    assert 8 <= regs <= 255
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if cuobjdump.exists():
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            out = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name], capture_output=True,
                                 text=True).stdout
        assert f"REG:{regs} " in out, out




def _default_policy_has_no_l2_hint(cc):
    """With L2_KEEP off (the default) the forward gives no L2 policy at all."""
    plan = ops.launch_plan(16, 16 * 64 * 64, 264)
    fwd = _compile(ops._fwd_kernel, dict(V="*bf16", T="*bf16", R="*bf16", **FWD_ARGS),
                   dict(HAS_T=True, HAS_R=True, HAS_W=True, RELATIVE=False, SQUARED=False, REDUCE=True, **ops.l2_policies(False),
                        ACC=tl.float32, ROWS=plan.rows, BLOCK_N=plan.block_n, BLOCK_S=plan.block_s,
                        BLOCK_B=ops.BLOCK_B), cc, plan.num_warps)
    _check_ptx(fwd)
    assert "createpolicy" not in fwd.asm["ptx"] and "cache_hint" not in fwd.asm["ptx"]
    _check_rounding(fwd.asm["ptx"], True)


N_EXTRA = 3  # the tests below CASES in a compiler process: cubin registers, default policy x 2 archs

if os.environ.get("TRITON_INTERPRET") == "1":
    def test_in_a_compiler_process():
        """Triton imported with the interpreter on has its own standard library interpreted and cannot compile:
        run this file again in a fresh process with the interpreter off."""
        env = {**os.environ, "TRITON_INTERPRET": "0"}
        proc = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider"], env=env,
                              cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
        assert f"{2 * len(CASES) + N_EXTRA} passed" in proc.stdout, proc.stdout[-2000:]
else:
    @pytest.mark.parametrize("cc", [80, 90], ids=["sm80", "sm90"])
    @pytest.mark.parametrize("variant, problem, dtype", CASES, ids=[f"{v}-{p}-{d}" for v, p, d in CASES])
    def test_kernels_compile_for_gpu(cc, variant, problem, dtype):
        _compile_case(variant, problem, dtype, cc)

    def test_cubin_registers_reads_the_elf():
        _cubin_registers_reads_the_elf()

    @pytest.mark.parametrize("cc", [80, 90], ids=["sm80", "sm90"])
    def test_default_policy_has_no_l2_hint(cc):
        _default_policy_has_no_l2_hint(cc)
