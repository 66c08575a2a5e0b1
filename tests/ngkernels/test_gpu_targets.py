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
from pathlib import Path

import pytest
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from ngkernels.ops import fm_normguard as ops

TYPES = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}
FWD_ARGS = dict(W="*fp32", stride_v="i64", stride_t="i64", stride_r="i64", PART="*fp32", COUNT="*i32",
                STATS="*fp32", COEF="*fp32", LOSS="*fp32", OUT="*fp32", B="i32", N="i32", chunk="i32",
                n_splits="i32", n_row_blocks="i32", ng_lambda="fp32", margin="fp32", inv_n="fp32", out_scale="fp32")
BWD_ARGS = dict(stride_v="i64", stride_t="i64", COEF="*fp32", GO="*fp32", B="i32", N="i32", chunk="i32",
                go_scale="fp32")
ALIGNED = {"V", "T", "R", "G", "stride_v", "stride_t", "stride_r", "chunk", "N", "PART", "STATS", "COEF", "LOSS"}
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


# every variant x dtype on the SD3.5 layout; the other tile configurations with the fused op in bf16 / fp32
CASES = [(var, "S", dt) for var in VARIANTS for dt in TYPES] + \
        [("fm_normguard", prob, dt) for prob in PROBLEMS if prob != "S" for dt in ("bf16", "fp32")]


def _compile_case(variant, problem, dtype, cc):
    import torch

    B, N = PROBLEMS[problem]
    has_t, has_r, has_w, rel, sq, red = VARIANTS[variant]
    rows, block_n, _, n_splits, _, num_warps = ops.launch_config(B, N, torch.device("cpu"), splits=32)
    ptr = "*" + TYPES[dtype]
    fwd = _compile(ops._fwd_kernel, dict(V=ptr, T=ptr, R=ptr, **FWD_ARGS),
                   dict(HAS_T=has_t, HAS_R=has_r, HAS_W=has_w, RELATIVE=rel, SQUARED=sq, REDUCE=red,
                        KEEP=ops.KEEP_POLICY, ACC=tl.float32, ROWS=rows, BLOCK_N=block_n,
                        BLOCK_S=triton.next_power_of_2(n_splits), BLOCK_B=min(1024, triton.next_power_of_2(B))),
                   cc, num_warps)
    _check_ptx(fwd)
    _check_l2_hints(fwd.asm["ptx"], {"evict_last"} | ({"evict_first"} if has_r else set()))
    bwd = _compile(ops._bwd_kernel, dict(V=ptr, T=ptr, G=ptr, **BWD_ARGS),
                   dict(HAS_A=has_r, HAS_T=has_t, GO_PER_SAMPLE=not red, ACC=tl.float32, ROWS=rows,
                        BLOCK_N=block_n), cc, num_warps)
    _check_ptx(bwd)
    assert re.search(r"st\.global(\.\w+)*\.v4\.", bwd.asm["ptx"]), "no 128-bit vector stores of the gradient"
    _check_l2_hints(bwd.asm["ptx"], {"evict_first"})


if os.environ.get("TRITON_INTERPRET") == "1":
    def test_in_a_compiler_process():
        """Triton imported with the interpreter on has its own standard library interpreted and cannot compile:
        run this file again in a fresh process with the interpreter off."""
        env = {**os.environ, "TRITON_INTERPRET": "0"}
        proc = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider"], env=env,
                              cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
        assert f"{2 * len(CASES)} passed" in proc.stdout, proc.stdout[-2000:]
else:
    @pytest.mark.parametrize("cc", [80, 90], ids=["sm80", "sm90"])
    @pytest.mark.parametrize("variant, problem, dtype", CASES, ids=[f"{v}-{p}-{d}" for v, p, d in CASES])
    def test_kernels_compile_for_gpu(cc, variant, problem, dtype):
        _compile_case(variant, problem, dtype, cc)
