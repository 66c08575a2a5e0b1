"""Fused flow-matching + NormGuard loss: Triton kernels, their launch plan and launch wrappers.

One kernel pair serves all three public ops; constexpr flags remove the absent terms at compile time:
`normguard_loss` (HAS_T=False), `flow_matching_loss` (HAS_R=False), `fm_normguard_loss` (both).
The math is documented once in `ngkernels/reference.py`; this file mirrors it in Triton.

Design (why two kernels and not "gradient in the forward"):
  forward  grid (row blocks, splits), one launch: each program streams its chunk of v, v_ref, target once, writes
           fp32 partial sums (sum v^2, sum v_ref^2, sum (v-t)^2). The program that arrives last at its row
           block (an atomic ticket, never a wait) finishes those rows: norms, mse, hinge, per-sample loss, the
           two gradient coefficients a_i, c_i and the row block's loss sum; the last row block to finish adds
           the n_row_blocks block sums (not the B losses) in a fixed order: a deterministic reduced loss.
  backward grid (row blocks, splits): grad = g_i * (a_i v + c_i (v - t)), reading v and target once more
           and writing the gradient once, scaled by grad_output inside the kernel (no host sync).
Bytes per full pass: read v, v_ref, t + read v, t + write grad = 6N. Computing the gradient in the forward
(Liger-style) needs the full row norm before any element can be written, so it re-reads v and t too, and
its backward must then multiply by grad_output (another read + write of N) or sync on grad_output == 1.

Cross-program state lives only as long as the launch that uses it. The tickets are a fresh int32 tensor from
the caching allocator, zeroed on the launch's own stream just before the forward (one memset: a full pass is
3 launches). Nothing is cached between calls, so a CUDA graph captures the memset, the tickets' address and
the kernel together; a graph replay, a second stream, a larger batch or a failed launch cannot meet a
counter some other launch left behind, and under torch.compile(mode="reduce-overhead") the buffer is an
ordinary temporary of the cudagraph pool, freed when the op returns.

Numerics: the norms use sqrt_rn and the divisions div_rn (correctly rounded, no flush of denormals); the GPU's
default sqrt.approx.ftz would turn a row of 1e-20 values (denormal squares) into ||v|| = 0 and a zero hinge
gradient where the reference has neither.

Compiled variants are bounded: ROWS, BLOCK_S and BLOCK_B depend on BLOCK_N alone (never on B), and B, the
split count, the chunk length (passed in units of BLOCK_N) and the row-block count are never specialised.
The variant key of a launch is therefore (dtype, terms/options flags, BLOCK_N, L2 policy, Triton's
alignment/==1 hints on pointers, row strides and N): over a training run whose B varies and whose N is
fixed there is one forward and one backward variant per op; with N varying too, at most one per power of
two of N up to the dtype's tile (at most 13: 1..4096) times the alignment classes (`variant_bound`).

The launch plan is `launch_plan` (the native generator, `ngkernels.aot`, calls it too): split long rows until
the grid fills one wave of the device, where a wave is SMs x the CTAs per SM that the compiled kernel's
registers, shared memory and warps allow (`ctas_per_sm`, read off the compiled kernel, not assumed). The tile
(ROWS x BLOCK_N) is a constant number of bytes of v per program-iteration, TILE_BYTES (`tile_for`): 4096
elements in bf16/fp16, 2048 in fp32, 1024 in fp64, so every dtype holds the same bytes in flight per program
(an H200 sweep measured fp32 faster at 2048 than at 4096, bf16 faster at 4096 than at 2048; fp64 is
unmeasured, and its smaller tile can only lower the 175 registers its forward used at 4096). The native
library keeps the widest tile, TILE, for every dtype (`ngkernels.aot`).

L2 policy: with `L2_KEEP` on (NGKERNELS_L2_KEEP=1), a forward whose backward will follow marks v and target
evict_last and v_ref evict_first, and the backward walks programs and chunks in reverse order, so it starts
on what the forward read last. Off by default: it only pays where v and target fit in L2 and nothing runs
between the loss's forward and backward (a trainer runs several losses first), and it is kept only where a
GPU measurement shows a gain (benchmarks/README.md). Even when on, tensors larger than half the L2 are
never marked.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ngkernels.options import LossOptions, accumulation_dtype, reduction_code

TILE = 4096  # the widest tile: elements per program per loop iteration (ROWS x BLOCK_N); the AOT library's tile
# Bytes of v per program-iteration (tile_for): H200, CUDA-graph-timed fwd+bwd, fp32 2048 beat 4096 at every shape
# (XL [64, 262144] 0.112 vs 0.121 ms) and bf16 4096 beat 2048 at all but S, i.e. 8 KiB in both dtypes.
TILE_BYTES = 8192
MAX_SPLITS = 256  # programs a row may be split across
BLOCK_B = 1024  # the final reduction adds row-block sums in steps of this many
CPU_SMS, CPU_CTAS_PER_SM = 2, 4  # the interpreter's stand-in device, so CPU tests take the split path too
FP_FUSION = True  # FMA contraction, stated rather than left to Triton's default (which changes in 3.10)
KEEP_POLICY = "evict_last"  # L2 policy of the forward's reads of v and target when L2_KEEP applies
L2_KEEP = os.environ.get("NGKERNELS_L2_KEEP", "0") == "1"
CPU_L2_BYTES = 50 * 2**20  # the interpreter's stand-in L2 (an H100's), for the size rule of L2_KEEP
# Integer arguments Triton must not specialise (on == 1 or divisibility by 16): each value would be a variant.
FWD_UNSPECIALISED = ("B", "chunk_blocks", "n_splits", "n_row_blocks")
BWD_UNSPECIALISED = ("B", "chunk_blocks")


@triton.jit
def _sqrt(x, ACC: tl.constexpr):
    """Correctly rounded square root: sqrt_rn in float32 (tl.sqrt is sqrt.approx.ftz there); float64's is exact."""
    if ACC == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def _div(x, y, ACC: tl.constexpr):
    """Correctly rounded division without flushing denormals (div_rn in float32; float64's '/' is div.rn)."""
    if ACC == tl.float64:
        return x / y
    else:
        return tl.div_rn(x, y)


@triton.jit(do_not_specialize=FWD_UNSPECIALISED)
def _fwd_kernel(
    V, T, R, W,  # inputs: [B, N] views with unit column stride; W: [B] weights
    stride_v, stride_t, stride_r,  # row strides (elements)
    PART,  # [B, n_splits, 3] partial sums (ACC dtype)
    COUNT,  # int32 [n_row_blocks + 1], zeroed by the caller for this launch: arrivals per row block, finished blocks
    BSUM,  # [n_row_blocks] per-row-block loss sums (the reduction's partials)
    STATS,  # [3, B]: v_norm, ref_norm, mse
    COEF,  # [2, B]: a (coefficient of v), c (coefficient of v - target)
    LOSS,  # [B] per-sample loss
    OUT,  # [1] reduced loss
    B, N, chunk_blocks, n_splits, n_row_blocks,  # a split covers chunk_blocks * BLOCK_N columns
    ng_lambda, margin, inv_n, out_scale,
    HAS_T: tl.constexpr, HAS_R: tl.constexpr, HAS_W: tl.constexpr,
    RELATIVE: tl.constexpr, SQUARED: tl.constexpr, REDUCE: tl.constexpr,
    KEEP: tl.constexpr,  # L2 eviction policy of v and target: "evict_last" when the backward re-reads them, else ""
    REF_POLICY: tl.constexpr,  # of v_ref: "evict_first" alongside KEEP (read once: let it leave L2 first), else ""
    ACC: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_B: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_r * ROWS + tl.arange(0, ROWS)
    row_mask = rows < B
    rows64 = rows.to(tl.int64)  # B * N may exceed 2**31
    cols = tl.arange(0, BLOCK_N)
    start = pid_s.to(tl.int64) * chunk_blocks * BLOCK_N  # a multiple of BLOCK_N: aligned vector loads
    end = tl.minimum(start + chunk_blocks * BLOCK_N, N)

    acc_vv = tl.zeros([ROWS, BLOCK_N], ACC)
    acc_rr = tl.zeros([ROWS, BLOCK_N], ACC)
    acc_dd = tl.zeros([ROWS, BLOCK_N], ACC)
    for off in range(start, end, BLOCK_N):
        c = off + cols
        mask = row_mask[:, None] & (c < end)[None, :]
        v = tl.load(V + rows64[:, None] * stride_v + c[None, :], mask=mask, other=0.0,
                    eviction_policy=KEEP).to(ACC)
        acc_vv += v * v
        if HAS_R:
            r = tl.load(R + rows64[:, None] * stride_r + c[None, :], mask=mask, other=0.0,
                        eviction_policy=REF_POLICY).to(ACC)
            acc_rr += r * r
        if HAS_T:
            t = tl.load(T + rows64[:, None] * stride_t + c[None, :], mask=mask, other=0.0,
                        eviction_policy=KEEP).to(ACC)
            d = v - t
            acc_dd += d * d
    part = PART + (rows64 * n_splits + pid_s) * 3
    tl.store(part, tl.sum(acc_vv, axis=1), mask=row_mask)
    if HAS_R:
        tl.store(part + 1, tl.sum(acc_rr, axis=1), mask=row_mask)
    if HAS_T:
        tl.store(part + 2, tl.sum(acc_dd, axis=1), mask=row_mask)

    # All threads' stores happen before the ticket (release); the last arrival reads every partial (acquire,
    # L2-coherent loads). Nobody waits, so this is safe for any grid size and in the interpreter.
    tl.debug_barrier()
    ticket = tl.atomic_add(COUNT + pid_r, 1, sem="acq_rel")
    if ticket == n_splits - 1:
        tl.debug_barrier()
        vv = tl.zeros([ROWS], ACC)
        rr = tl.zeros([ROWS], ACC)
        dd = tl.zeros([ROWS], ACC)
        for s0 in range(0, n_splits, BLOCK_S):  # one iteration unless BLOCK_N is the largest tile
            s = s0 + tl.arange(0, BLOCK_S)
            pmask = row_mask[:, None] & (s < n_splits)[None, :]
            pbase = PART + (rows64[:, None] * n_splits + s[None, :]) * 3
            vv += tl.sum(tl.load(pbase, mask=pmask, other=0.0, cache_modifier=".cg"), axis=1)
            if HAS_R:
                rr += tl.sum(tl.load(pbase + 1, mask=pmask, other=0.0, cache_modifier=".cg"), axis=1)
            if HAS_T:
                dd += tl.sum(tl.load(pbase + 2, mask=pmask, other=0.0, cache_modifier=".cg"), axis=1)
        n = _sqrt(vv, ACC)
        loss = tl.zeros([ROWS], ACC)
        tl.store(STATS + rows, n, mask=row_mask)
        if HAS_T:
            mse = dd * inv_n
            if HAS_W:
                w = tl.load(W + rows, mask=row_mask, other=0.0).to(ACC)
            else:
                w = tl.full([ROWS], 1.0, ACC)
            loss += w * mse
            tl.store(STATS + 2 * B + rows, mse, mask=row_mask)
            tl.store(COEF + B + rows, 2.0 * w * inv_n, mask=row_mask)
        if HAS_R:
            ref = _sqrt(rr, ACC)
            if RELATIVE:
                excess = _div(n, ref, ACC) - (1.0 + margin)
            else:
                excess = n - (1.0 + margin) * ref
            excess = tl.where(ref < float("inf"), excess, float("nan"))  # as reference.hinge_excess
            h = tl.where(excess <= 0.0, 0.0, excess)  # max(0, x) that keeps NaN
            if SQUARED:
                loss += ng_lambda * h * h
                dp_dh = 2.0 * excess
            else:
                loss += ng_lambda * h
                dp_dh = tl.full([ROWS], 1.0, ACC)
            if RELATIVE:
                dp_dh = _div(dp_dh, ref, ACC)
            active = (excess > 0.0) & (n > 0.0)
            a = tl.where(active, _div(ng_lambda * dp_dh, tl.where(active, n, 1.0), ACC), 0.0)
            a = tl.where(excess != excess, excess, a)  # a NaN excess gives a NaN gradient
            tl.store(STATS + B + rows, ref, mask=row_mask)
            tl.store(COEF + rows, a, mask=row_mask)
        tl.store(LOSS + rows, loss, mask=row_mask)
        if REDUCE:
            tl.store(BSUM + pid_r, tl.sum(tl.where(row_mask, loss, 0.0), axis=0))
            tl.debug_barrier()
            done = tl.atomic_add(COUNT + n_row_blocks, 1, sem="acq_rel")
            if done == n_row_blocks - 1:
                tl.debug_barrier()
                total = tl.zeros([BLOCK_B], ACC)
                for b0 in range(0, n_row_blocks, BLOCK_B):  # fixed order: deterministic
                    bb = b0 + tl.arange(0, BLOCK_B)
                    total += tl.load(BSUM + bb, mask=bb < n_row_blocks, other=0.0, cache_modifier=".cg")
                tl.store(OUT, tl.sum(total, axis=0) * out_scale)


@triton.jit(do_not_specialize=BWD_UNSPECIALISED)
def _bwd_kernel(
    V, T, G,  # v, target: [B, N] views with unit column stride; G: contiguous [B, N] gradient
    stride_v, stride_t,
    COEF,  # [2, B] from the forward
    GO,  # grad_output: [B] (GO_PER_SAMPLE) or a 0-d tensor
    B, N, chunk_blocks, go_scale,
    HAS_A: tl.constexpr, HAS_T: tl.constexpr, GO_PER_SAMPLE: tl.constexpr, REVERSE: tl.constexpr,
    ACC: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    if REVERSE:  # the reverse of the forward's order, programs and chunk alike: what it read last is in L2
        pid_r = tl.num_programs(0) - 1 - tl.program_id(0)
        pid_s = tl.num_programs(1) - 1 - tl.program_id(1)
    else:
        pid_r = tl.program_id(0)
        pid_s = tl.program_id(1)
    rows = pid_r * ROWS + tl.arange(0, ROWS)
    row_mask = rows < B
    rows64 = rows.to(tl.int64)
    if GO_PER_SAMPLE:
        g = tl.load(GO + rows, mask=row_mask, other=0.0).to(ACC)
    else:
        g = tl.load(GO).to(ACC) * go_scale + tl.zeros([ROWS], ACC)
    a = tl.zeros([ROWS], ACC)
    c = tl.zeros([ROWS], ACC)
    if HAS_A:
        a = g * tl.load(COEF + rows, mask=row_mask, other=0.0)
    if HAS_T:
        c = g * tl.load(COEF + B + rows, mask=row_mask, other=0.0)
    cols = tl.arange(0, BLOCK_N)
    start = pid_s.to(tl.int64) * chunk_blocks * BLOCK_N
    end = tl.minimum(start + chunk_blocks * BLOCK_N, N)
    n_iter = tl.cdiv(end - start, BLOCK_N)
    for i in range(0, n_iter):
        if REVERSE:
            col = start + (n_iter - 1 - i) * BLOCK_N + cols
        else:
            col = start + i * BLOCK_N + cols
        mask = row_mask[:, None] & (col < end)[None, :]
        v = tl.load(V + rows64[:, None] * stride_v + col[None, :], mask=mask, other=0.0,
                    eviction_policy="evict_first").to(ACC)  # last use
        grad = a[:, None] * v
        if HAS_T:
            t = tl.load(T + rows64[:, None] * stride_t + col[None, :], mask=mask, other=0.0,
                        eviction_policy="evict_first").to(ACC)
            grad += c[:, None] * (v - t)
        tl.store(G + rows64[:, None] * N + col[None, :], grad.to(G.dtype.element_ty), mask=mask)


# Under TRITON_INTERPRET=1 (set before import) the kernels run on CPU tensors, one program after another.
INTERPRETED = type(_fwd_kernel).__name__ == "InterpretedFunction"

# ---------------------------------------------------------------------------------------------------------
# Launch plan: one rule for the Python launcher and the native library's generator (`ngkernels.aot`)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(x: int) -> int:
    return 1 << (max(x, 1) - 1).bit_length()


# triton.cdiv / next_power_of_2 are JIT-callable functions: called from Python they cost microseconds each,
# more than the rest of the plan (measured: 60 % of the launcher's host time); these are the plain-int twins.


class LaunchPlan(NamedTuple):
    rows: int  # ROWS: rows per program
    block_n: int  # BLOCK_N: columns per loop iteration
    n_row_blocks: int  # grid dim 0
    n_splits: int  # grid dim 1: programs per row
    chunk_blocks: int  # a split covers chunk_blocks * block_n columns
    num_warps: int
    block_s: int  # BLOCK_S: split partials read per step by the last arrival


@functools.lru_cache(maxsize=4096)
def tile_of(N: int, tile: int = TILE, block_ns=None):
    """(rows, block_n, num_warps, block_s) of the tile a row of N elements gets. block_n is N's next power of
    two up to the tile (or, given the compiled `block_ns`, the smallest of them that covers it); rows fill the
    tile, whatever B is (so B never selects a variant); only the widest tile splits rows, so only it needs
    more than one split partial per step."""
    block_n = min(_next_pow2(max(N, 1)), tile)
    if block_ns is not None:
        block_n = next(b for b in sorted(block_ns) if b >= block_n)  # block_ns: a tuple (cached)
    rows = max(1, tile // block_n)
    num_warps = 8 if rows * block_n >= 4096 else 4
    return rows, block_n, num_warps, (_next_pow2(MAX_SPLITS) if block_n >= tile else 1)


@functools.lru_cache(maxsize=4096)
def launch_plan(B: int, N: int, programs: int, splits: int = 0, tile: int = TILE, block_ns=None) -> LaunchPlan:
    """The grid for a [B, N] problem: short rows packed `rows` to a program, long rows split across programs
    until about `programs` run (one wave: SMs x CTAs per SM), at most MAX_SPLITS. `splits` > 0 forces the split
    count (tests; NGKERNELS_SPLITS)."""
    rows, block_n, num_warps, block_s = tile_of(N, tile, block_ns)
    n_row_blocks = _cdiv(B, rows)
    max_splits = min(_cdiv(N, block_n), MAX_SPLITS)
    want = splits if splits > 0 else _cdiv(programs, n_row_blocks)
    chunk_blocks = _cdiv(_cdiv(N, max(1, min(want, max_splits))), block_n)
    n_splits = max(1, _cdiv(N, chunk_blocks * block_n))
    return LaunchPlan(rows, block_n, n_row_blocks, n_splits, chunk_blocks, num_warps, block_s)


def ctas_per_sm(n_regs: int, num_warps: int, shared: int, regs_per_sm: int = 65536, max_threads: int = 2048,
                shared_per_sm: int = 233472, max_blocks: int = 32) -> int:
    """CTAs of a kernel that fit on one SM together: registers (allocated per warp in units of 256), warps,
    shared memory and the block limit (defaults: sm_80 / sm_90)."""
    regs_per_warp = -(-max(n_regs, 1) * 32 // 256) * 256
    by_regs = regs_per_sm // (regs_per_warp * num_warps)
    by_warps = max_threads // (32 * num_warps)
    by_shared = shared_per_sm // shared if shared > 0 else max_blocks
    return max(1, min(by_regs, by_warps, by_shared, max_blocks))


def variant_bound(n_dtypes: int = 1, n_flag_sets: int = 1) -> int:
    """Upper bound on the forward variants a run compiles: BLOCK_N takes at most 13 values (1..TILE; fp32's tile
    stops at 2048 and fp64's at 1024, so they take fewer), and each input pointer, row stride and N are either
    16-aligned or not (Triton's hints; 2 classes each, counted jointly as aligned / not, plus N == 1 and
    stride == 1 for one-element rows): 13 x 2 + 1 per dtype and flag set."""
    return n_dtypes * n_flag_sets * (13 * 2 + 1)


def tile_for(dtype: torch.dtype) -> int:
    """Elements per program per loop iteration (ROWS x BLOCK_N) for v of this dtype: NGKERNELS_TILE if set
    (benchmarks, tests), else TILE_BYTES of it, never more than TILE (bf16/fp16 4096, fp32 2048, fp64 1024).
    The warps follow from the tile (`tile_of`: 4 below 4096 elements), as in the measured NGKERNELS_TILE runs."""
    forced = os.environ.get("NGKERNELS_TILE")
    if forced:
        tile = int(forced) if forced.isdigit() else 0
        if tile < 1 or tile & (tile - 1) or tile > TILE:
            raise ValueError(f"NGKERNELS_TILE must be a power of two from 1 to {TILE}, got {forced!r}")
        return tile
    return min(TILE, TILE_BYTES // dtype.itemsize)


def _forced_splits(splits):
    return splits if splits else int(os.environ.get("NGKERNELS_SPLITS", "0"))


@functools.lru_cache(maxsize=None)
def _device_limits(index: int):
    p = torch.cuda.get_device_properties(index)
    return (p.multi_processor_count, getattr(p, "regs_per_multiprocessor", 65536),
            getattr(p, "max_threads_per_multi_processor", 2048),
            getattr(p, "shared_memory_per_multiprocessor", 233472), getattr(p, "L2_cache_size", 50 * 2**20))


_OCCUPANCY: dict = {}  # (device index, kernel, Triton's variant key) -> CTAs per SM; host ints only


def _programs(kernel, device: torch.device, grid, args, kwargs) -> int:
    """Programs in one wave for this launch: SMs x CTAs per SM of the compiled variant (compiled here if new)."""
    if device.type != "cuda" or INTERPRETED:
        return CPU_SMS * CPU_CTAS_PER_SM
    key = (device.index, kernel.fn.__name__, _variant_key(kernel, args, kwargs))
    per_sm = _OCCUPANCY.get(key)
    sms, regs, threads, shared, _ = _device_limits(device.index or 0)
    if per_sm is None:
        compiled = kernel.warmup(*args, grid=grid, **kwargs)
        compiled._init_handles()  # loads the binary: n_regs
        per_sm = _OCCUPANCY[key] = ctas_per_sm(compiled.n_regs, compiled.metadata.num_warps,
                                               compiled.metadata.shared, regs, threads, shared)
    return sms * per_sm


def _variant_key(kernel, args, kwargs):
    """What selects a compiled variant besides the constexprs: Triton's hints on the specialised arguments
    (16-byte alignment of tensors, integers == 1 or divisible by 16), as a tuple."""
    skip = FWD_UNSPECIALISED if kernel.fn.__name__ == "_fwd_kernel" else BWD_UNSPECIALISED
    names = kernel.arg_names
    return tuple(kwargs.items()) + tuple(
        (a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor) else (a % 16 == 0, a == 1)
        if isinstance(a, int) and names[i] not in skip else None for i, a in enumerate(args))


def _tl_dtype(acc: torch.dtype):
    """The kernels' ACC constexpr for an accumulation dtype (options.accumulation_dtype decides which)."""
    return tl.float64 if acc == torch.float64 else tl.float32


def _on(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' one (multi-GPU)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def l2_policies(keep: bool) -> dict:
    """The forward's L2 constexprs: keep v and target for the backward, let v_ref go; or no hints at all."""
    return dict(KEEP=KEEP_POLICY, REF_POLICY="evict_first") if keep else dict(KEEP="", REF_POLICY="")


def _keep_in_l2(keep: bool, v2d, t2d) -> bool:
    if not (keep and L2_KEEP):
        return False
    l2 = _device_limits(v2d.device.index or 0)[4] if v2d.device.type == "cuda" else CPU_L2_BYTES
    size = v2d.numel() * v2d.element_size() * (2 if t2d is not None else 1)
    return size <= l2 // 2


def forward_launch(v2d, t2d, r2d, weight, opts: LossOptions, keep: bool = False, splits: int = 0):
    """Everything the forward's launch takes, allocated but not launched: (grid, args, kwargs, (loss, stats,
    coef)). `triton_forward` launches it; tests hand the same arguments to Triton's own specialisation binder."""
    B, N = v2d.shape
    dev = v2d.device
    acc = accumulation_dtype(v2d.dtype)
    code = reduction_code(opts.reduction)
    has_t, has_r = t2d is not None, r2d is not None
    stats = torch.empty((3, B), dtype=acc, device=dev)
    coef = torch.empty((2, B), dtype=acc, device=dev)
    per_sample = torch.empty(B, dtype=acc, device=dev)
    out = per_sample if code == 0 else torch.empty((), dtype=acc, device=dev)
    tile = tile_for(v2d.dtype)
    rows, block_n, num_warps, block_s = tile_of(N, tile)
    kwargs = dict(HAS_T=has_t, HAS_R=has_r, HAS_W=weight is not None, RELATIVE=bool(opts.relative),
                  SQUARED=bool(opts.squared), REDUCE=code != 0, **l2_policies(_keep_in_l2(keep, v2d, t2d)),
                  ACC=_tl_dtype(acc), ROWS=rows, BLOCK_N=block_n,
                  BLOCK_S=block_s, BLOCK_B=BLOCK_B, num_warps=num_warps, enable_fp_fusion=FP_FUSION)

    def args(plan, part, count, bsum):
        return (v2d, t2d if has_t else v2d, r2d if has_r else v2d, weight if weight is not None else v2d,
                v2d.stride(0), t2d.stride(0) if has_t else 0, r2d.stride(0) if has_r else 0,
                part, count, bsum, stats, coef, per_sample, out,
                B, N, plan.chunk_blocks, plan.n_splits, plan.n_row_blocks,
                float(opts.ng_lambda), float(opts.margin), 1.0 / N, (1.0 / B) if code == 1 else 1.0)

    programs = _programs(_fwd_kernel, dev, (1, 1), args(launch_plan(B, N, 1, 1, tile), stats, stats, stats), kwargs)
    plan = launch_plan(B, N, programs, _forced_splits(splits), tile)
    part = torch.empty((B, plan.n_splits, 3), dtype=acc, device=dev)
    count = torch.zeros(plan.n_row_blocks + 1, dtype=torch.int32, device=dev)  # this launch's tickets
    bsum = torch.empty(plan.n_row_blocks, dtype=acc, device=dev)
    return (plan.n_row_blocks, plan.n_splits), args(plan, part, count, bsum), kwargs, (out, stats, coef)


def triton_forward(v2d, t2d, r2d, weight, opts: LossOptions, keep: bool = False, splits: int = 0):
    """Launch the forward. Inputs are [B, N] views with unit column stride. Returns
    (loss, stats [3, B], coef [2, B]) in float32 (float64 for float64 v); loss is [B] or 0-d.
    keep: a backward will follow (an L2 hint, see L2_KEEP; no effect on values)."""
    with _on(v2d.device):
        grid, args, kwargs, outputs = forward_launch(v2d, t2d, r2d, weight, opts, keep, splits)
        _fwd_kernel[grid](*args, **kwargs)
    return outputs


def triton_backward(grad_out, v2d, t2d, coef, opts: LossOptions, has_ref: bool, splits: int = 0):
    """grad_v = g_i (a_i v + c_i (v - t)) as a contiguous [B, N] tensor of v's dtype."""
    B, N = v2d.shape
    dev = v2d.device
    grad = torch.empty((B, N), dtype=v2d.dtype, device=dev)
    code = reduction_code(opts.reduction)
    go = grad_out.to(coef.dtype).contiguous()
    has_t = t2d is not None
    tile = tile_for(v2d.dtype)
    rows, block_n, num_warps, _ = tile_of(N, tile)
    kwargs = dict(HAS_A=bool(has_ref), HAS_T=has_t, GO_PER_SAMPLE=code == 0, REVERSE=L2_KEEP,
                  ACC=_tl_dtype(coef.dtype), ROWS=rows, BLOCK_N=block_n,
                  num_warps=num_warps, enable_fp_fusion=FP_FUSION)

    def args(plan):
        return (v2d, t2d if has_t else v2d, grad, v2d.stride(0), t2d.stride(0) if has_t else 0,
                coef, go, B, N, plan.chunk_blocks, (1.0 / B) if code == 1 else 1.0)

    with _on(dev):
        programs = _programs(_bwd_kernel, dev, (1, 1), args(launch_plan(B, N, 1, 1, tile)), kwargs)
        plan = launch_plan(B, N, programs, _forced_splits(splits), tile)
        _bwd_kernel[(plan.n_row_blocks, plan.n_splits)](*args(plan), **kwargs)
    return grad
