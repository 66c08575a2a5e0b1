"""Fused flow-matching + NormGuard loss: Triton kernels and their launch wrappers.

One kernel pair serves all three public ops; constexpr flags remove the absent terms at compile time:
`normguard_loss` (HAS_T=False), `flow_matching_loss` (HAS_R=False), `fm_normguard_loss` (both).
The math is documented once in `ngkernels/reference.py`; this file mirrors it in Triton.

Design (why two launches and not "gradient in the forward"):
  forward  grid (row blocks, splits), one launch: each program streams its chunk of v, v_ref, target once, writes
           fp32 partial sums (sum v^2, sum v_ref^2, sum (v-t)^2). The program that arrives last at its row
           block (an atomic ticket, never a wait) finishes those rows: norms, mse, hinge, per-sample loss and
           the two gradient coefficients a_i, c_i; the last row block to finish writes the reduced loss.
  backward grid (row blocks, splits): grad = g_i * (a_i v + c_i (v - t)), reading v and target once more
           and writing the gradient once, scaled by grad_output inside the kernel (no host sync).
Bytes per full pass: read v, v_ref, t + read v, t + write grad = 6N, of which the backward's 2N re-read can come
from L2 rather than HBM: when a backward will follow (KEEP), the forward marks v and t "evict_last" in L2 and
v_ref "evict_first", and the backward visits programs and each program's chunk in the reverse order, so it
starts on the data the forward read last (the loss's backward is the first node autograd runs after its
forward, in a trainer as in the benchmark). Computing the gradient in the forward
(Liger-style) needs the full row norm before any element can be written, so it re-reads v and t too, and
its backward must then multiply by grad_output (another read + write of N) or sync on grad_output == 1.
The ticket scheme needs no cross-program wait, so the interpreter (programs run one after another) runs
exactly the code the GPU runs. Splitting rows keeps the GPU busy when a few samples are huge (8 x 262144).
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

REDUCTION_CODE = {"none": 0, "mean": 1, "sum": 2}
_TILE = 4096  # elements per program per loop iteration (rows x columns)
_MAX_BLOCK_N = 4096
_MAX_SPLITS = 256
_PROGRAMS_PER_SM = 4  # split long rows until about this many programs per SM run
_CPU_SMS = 2  # the interpreter's stand-in, so CPU tests take the split path too
FP_FUSION = True  # FMA contraction, stated rather than left to Triton's default (which changes in 3.10)
KEEP_POLICY = "evict_last"  # L2 policy of the forward's reads of v and target when a backward will re-read them


@triton.jit
def _fwd_kernel(
    V, T, R, W,  # inputs: [B, N] views with unit column stride; W: [B] weights
    stride_v, stride_t, stride_r,  # row strides (elements)
    PART,  # [B, n_splits, 3] partial sums (ACC dtype)
    COUNT,  # int32 [>= n_row_blocks + 1], zero on entry and on exit: arrivals per row block, finished blocks
    STATS,  # [3, B]: v_norm, ref_norm, mse
    COEF,  # [2, B]: a (coefficient of v), c (coefficient of v - target)
    LOSS,  # [B] per-sample loss
    OUT,  # [1] reduced loss
    B, N, chunk, n_splits, n_row_blocks,
    ng_lambda, margin, inv_n, out_scale,
    HAS_T: tl.constexpr, HAS_R: tl.constexpr, HAS_W: tl.constexpr,
    RELATIVE: tl.constexpr, SQUARED: tl.constexpr, REDUCE: tl.constexpr,
    KEEP: tl.constexpr,  # L2 eviction policy of v and target: "evict_last" when the backward re-reads them, else ""
    ACC: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_B: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_r * ROWS + tl.arange(0, ROWS)
    row_mask = rows < B
    rows64 = rows.to(tl.int64)  # B * N may exceed 2**31
    cols = tl.arange(0, BLOCK_N)
    start = pid_s.to(tl.int64) * chunk
    end = tl.minimum(start + chunk, N)

    acc_vv = tl.zeros([ROWS, BLOCK_N], ACC)
    acc_rr = tl.zeros([ROWS, BLOCK_N], ACC)
    acc_dd = tl.zeros([ROWS, BLOCK_N], ACC)
    for off in range(start, end, BLOCK_N):
        c = off + cols
        mask = row_mask[:, None] & (c < end)[None, :]
        v = tl.load(V + rows64[:, None] * stride_v + c[None, :], mask=mask, other=0.0,
                    eviction_policy=KEEP).to(ACC)
        acc_vv += v * v
        if HAS_R:  # v_ref is read once: let it leave L2 first
            r = tl.load(R + rows64[:, None] * stride_r + c[None, :], mask=mask, other=0.0,
                        eviction_policy="evict_first").to(ACC)
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
        tl.store(COUNT + pid_r, 0)  # every arrival is in: leave the ticket zero for the next launch
        tl.debug_barrier()
        s = tl.arange(0, BLOCK_S)
        pmask = row_mask[:, None] & (s < n_splits)[None, :]
        pbase = PART + (rows64[:, None] * n_splits + s[None, :]) * 3
        vv = tl.sum(tl.load(pbase, mask=pmask, other=0.0, cache_modifier=".cg"), axis=1)
        n = tl.sqrt(vv)
        loss = tl.zeros([ROWS], ACC)
        tl.store(STATS + rows, n, mask=row_mask)
        if HAS_T:
            dd = tl.sum(tl.load(pbase + 2, mask=pmask, other=0.0, cache_modifier=".cg"), axis=1)
            mse = dd * inv_n
            if HAS_W:
                w = tl.load(W + rows, mask=row_mask, other=0.0).to(ACC)
            else:
                w = tl.full([ROWS], 1.0, ACC)
            loss += w * mse
            tl.store(STATS + 2 * B + rows, mse, mask=row_mask)
            tl.store(COEF + B + rows, 2.0 * w * inv_n, mask=row_mask)
        if HAS_R:
            rr = tl.sum(tl.load(pbase + 1, mask=pmask, other=0.0, cache_modifier=".cg"), axis=1)
            ref = tl.sqrt(rr)
            if RELATIVE:
                excess = n / ref - (1.0 + margin)
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
                dp_dh = dp_dh / ref
            a = tl.where((excess > 0.0) & (n > 0.0), ng_lambda * dp_dh / n, 0.0)
            a = tl.where(excess != excess, excess, a)  # a NaN excess gives a NaN gradient
            tl.store(STATS + B + rows, ref, mask=row_mask)
            tl.store(COEF + rows, a, mask=row_mask)
        tl.store(LOSS + rows, loss, mask=row_mask)
        if REDUCE:
            tl.debug_barrier()
            done = tl.atomic_add(COUNT + n_row_blocks, 1, sem="acq_rel")
            if done == n_row_blocks - 1:
                tl.store(COUNT + n_row_blocks, 0)
                tl.debug_barrier()
                total = tl.zeros([BLOCK_B], ACC)
                for b0 in range(0, B, BLOCK_B):  # fixed order: deterministic
                    bb = b0 + tl.arange(0, BLOCK_B)
                    total += tl.load(LOSS + bb, mask=bb < B, other=0.0, cache_modifier=".cg")
                tl.store(OUT, tl.sum(total, axis=0) * out_scale)


@triton.jit
def _bwd_kernel(
    V, T, G,  # v, target: [B, N] views with unit column stride; G: contiguous [B, N] gradient
    stride_v, stride_t,
    COEF,  # [2, B] from the forward
    GO,  # grad_output: [B] (GO_PER_SAMPLE) or a 0-d tensor
    B, N, chunk, go_scale,
    HAS_A: tl.constexpr, HAS_T: tl.constexpr, GO_PER_SAMPLE: tl.constexpr,
    ACC: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # The reverse of the forward's order, programs and chunk alike: what the forward read last is still in L2.
    pid_r = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_s = tl.num_programs(1) - 1 - tl.program_id(1)
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
    start = pid_s.to(tl.int64) * chunk
    end = tl.minimum(start + chunk, N)
    n_iter = tl.cdiv(end - start, BLOCK_N)
    for i in range(0, n_iter):
        col = start + (n_iter - 1 - i) * BLOCK_N + cols
        mask = row_mask[:, None] & (col < end)[None, :]
        v = tl.load(V + rows64[:, None] * stride_v + col[None, :], mask=mask, other=0.0,
                    eviction_policy="evict_first").to(ACC)  # last use
        grad = a[:, None] * v
        if HAS_T:
            t = tl.load(T + rows64[:, None] * stride_t + col[None, :], mask=mask, other=0.0,
                        eviction_policy="evict_first").to(ACC)
            grad += c[:, None] * (v - t)
        tl.store(G + rows64[:, None] * N + col[None, :], grad.to(G.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def launch_config(B: int, N: int, device: torch.device, splits: int | None = None):
    """(ROWS, BLOCK_N, n_row_blocks, n_splits, chunk, num_warps) for a [B, N] problem.

    Short rows are packed several to a program; long rows are split so that about 4 programs per SM run
    even when B is small. `splits` (or NGKERNELS_SPLITS) forces the split count, for tests.
    """
    block_n = min(triton.next_power_of_2(max(N, 1)), _MAX_BLOCK_N)
    rows = max(1, min(triton.next_power_of_2(max(B, 1)), _TILE // block_n))
    n_row_blocks = triton.cdiv(B, rows)
    max_splits = min(triton.cdiv(N, block_n), _MAX_SPLITS)
    forced = splits if splits is not None else int(os.environ.get("NGKERNELS_SPLITS", "0"))
    if forced > 0:
        want = forced
    else:
        programs = _PROGRAMS_PER_SM * (_multiprocessors(device.index or 0) if device.type == "cuda" else _CPU_SMS)
        want = triton.cdiv(programs, n_row_blocks)
    chunk = triton.cdiv(triton.cdiv(N, max(1, min(want, max_splits))), block_n) * block_n
    n_splits = max(1, triton.cdiv(N, chunk))
    num_warps = 8 if rows * block_n >= 4096 else 4
    return rows, block_n, n_row_blocks, n_splits, chunk, num_warps


def _on(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' one (multi-GPU)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


_TICKETS: dict = {}


def _ticket_key(device: torch.device):
    return str(device), torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


def _tickets(n: int, device: torch.device) -> torch.Tensor:
    """Zeroed int32 tickets, cached: every forward leaves them zero again (the last arrival at each counter
    resets it), so a call needs no fill kernel. One buffer per (device, stream), because launches on one stream
    never overlap; launches on different streams get different buffers."""
    key = _ticket_key(device)
    buf = _TICKETS.get(key)
    if buf is None or buf.numel() < n:
        buf = _TICKETS[key] = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
    return buf


@contextlib.contextmanager
def _drop_tickets_on_error(device: torch.device):
    """A launch that fails half-way may leave tickets non-zero: never reuse that buffer."""
    try:
        yield
    except BaseException:
        _TICKETS.pop(_ticket_key(device), None)
        raise


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def triton_forward(v2d, t2d, r2d, weight, ng_lambda, margin, relative, squared, reduction, keep=False,
                   splits=None):
    """Launch the forward. Inputs are [B, N] views with unit column stride. Returns
    (loss, stats [3, B], coef [2, B]) in float32 (float64 for float64 v); loss is [B] or 0-d.
    keep: a backward will follow, so v and target are kept in L2 for it."""
    B, N = v2d.shape
    acc = torch.float64 if v2d.dtype == torch.float64 else torch.float32
    rows, block_n, n_rb, n_splits, chunk, num_warps = launch_config(B, N, v2d.device, splits)
    dev = v2d.device
    part = torch.empty((B, n_splits, 3), dtype=acc, device=dev)
    count = _tickets(n_rb + 1, dev)
    stats = torch.empty((3, B), dtype=acc, device=dev)
    coef = torch.empty((2, B), dtype=acc, device=dev)
    per_sample = torch.empty(B, dtype=acc, device=dev)
    code = REDUCTION_CODE[reduction]
    out = per_sample if code == 0 else torch.empty((), dtype=acc, device=dev)
    has_t, has_r = t2d is not None, r2d is not None
    with _on(dev), _drop_tickets_on_error(dev):
        _fwd_kernel[(n_rb, n_splits)](
            v2d, t2d if has_t else v2d, r2d if has_r else v2d, weight if weight is not None else v2d,
            v2d.stride(0), t2d.stride(0) if has_t else 0, r2d.stride(0) if has_r else 0,
            part, count, stats, coef, per_sample, out,
            B, N, chunk, n_splits, n_rb,
            float(ng_lambda), float(margin), 1.0 / N, (1.0 / B) if code == 1 else 1.0,
            HAS_T=has_t, HAS_R=has_r, HAS_W=weight is not None,
            RELATIVE=bool(relative), SQUARED=bool(squared), REDUCE=code != 0, KEEP=KEEP_POLICY if keep else "",
            ACC=_acc_dtype(v2d.dtype), ROWS=rows, BLOCK_N=block_n,
            BLOCK_S=triton.next_power_of_2(n_splits), BLOCK_B=min(1024, triton.next_power_of_2(B)),
            num_warps=num_warps, enable_fp_fusion=FP_FUSION,
        )
    return out, stats, coef


def triton_backward(grad_out, v2d, t2d, coef, has_ref, reduction, splits=None):
    """grad_v = g_i (a_i v + c_i (v - t)) as a contiguous [B, N] tensor of v's dtype."""
    B, N = v2d.shape
    rows, block_n, n_rb, n_splits, chunk, num_warps = launch_config(B, N, v2d.device, splits)
    grad = torch.empty((B, N), dtype=v2d.dtype, device=v2d.device)
    code = REDUCTION_CODE[reduction]
    go = grad_out.to(coef.dtype).contiguous()
    has_t = t2d is not None
    with _on(v2d.device):
        _bwd_kernel[(n_rb, n_splits)](
            v2d, t2d if has_t else v2d, grad, v2d.stride(0), t2d.stride(0) if has_t else 0,
            coef, go, B, N, chunk, (1.0 / B) if code == 1 else 1.0,
            HAS_A=bool(has_ref), HAS_T=has_t, GO_PER_SAMPLE=code == 0,
            ACC=_acc_dtype(v2d.dtype), ROWS=rows, BLOCK_N=block_n,
            num_warps=num_warps, enable_fp_fusion=FP_FUSION,
        )
    return grad
