"""The Triton launcher: per-launch ticket state, the launch plan, bounded variants, the L2 option, denormal rows,
misaligned views and the final reduction over many row blocks.

What the interpreter cannot show (CUDA graphs, reduce-overhead, streams, real occupancy) is in test_cuda.py;
these tests pin the parts of the same design that a CPU can check.
"""

import random

import pytest
import torch
import triton

import ngkernels
from ngkernels.ops import fm_normguard as ops
from ngkernels.options import LossOptions
from tests.ngkernels.helpers import call_op
from tests.ngkernels.helpers import make_inputs
from tests.ngkernels.helpers import oracle


def assert_matches_oracle(op, v, target, v_ref, weight, opts, rtol=2e-5):
    v = v.detach().requires_grad_()
    loss, stats = call_op(op, v, target, v_ref, weight, opts)
    v64, ref_loss, ref_stats = oracle(op, v, target, v_ref, weight, opts)
    torch.testing.assert_close(loss.double().cpu(), ref_loss.detach().cpu(), rtol=rtol, atol=1e-6)
    go = torch.rand(ref_loss.shape, dtype=torch.float64) + 0.5
    loss.backward(go.to(loss.device, loss.dtype))
    ref_loss.backward(go)
    scale = float(v64.grad.abs().max())
    torch.testing.assert_close(v.grad.double().cpu(), v64.grad, rtol=1e-5, atol=1e-5 * scale)
    return loss, stats, v.grad


def spy_on_forward(monkeypatch, check):
    """Replaces the forward kernel by a wrapper that calls check(grid, args, kwargs) before each launch."""
    launch = ops._fwd_kernel
    interpreted = ops.INTERPRETED

    class Spy:
        def __getattr__(self, name):  # fn, arg_names, warmup: the launcher reads the compiled kernel through them
            return getattr(launch, name)

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                check(grid, args, kwargs)
                return launch[grid](*args, **kwargs)
            return run

    monkeypatch.setattr(ops, "_fwd_kernel", Spy())
    monkeypatch.setattr(ops, "INTERPRETED", interpreted)


def _module_tensors():
    """Tensors reachable from the ops module's globals (directly or in a dict/list): state outliving a launch."""
    found = []
    for name, value in vars(ops).items():
        values = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(x, torch.Tensor) for x in values):
            found.append(name)
    return found


def test_tickets_live_only_as_long_as_their_launch(monkeypatch, device):
    """Every forward gets fresh tickets, zero at launch, and the module keeps no tensor between calls: a CUDA
    graph, a second stream or a larger batch can never meet a counter another launch left behind."""
    monkeypatch.setenv("NGKERNELS_BACKEND", "triton")
    seen = []

    def check(grid, args, kwargs):
        count = args[8]
        assert count.dtype == torch.int32 and count.numel() == grid[0] + 1
        seen.append(int(torch.count_nonzero(count)))

    spy_on_forward(monkeypatch, check)
    for shape, splits, red in [((5, 3000), "3", "mean"), ((64, 8), "0", "none"), ((2, 9000), "4", "sum"),
                               ((5, 3000), "3", "mean")]:
        monkeypatch.setenv("NGKERNELS_SPLITS", splits)
        v, target, v_ref, weight = make_inputs(shape, torch.float32, device)
        assert_matches_oracle("fm_normguard", v, target, v_ref, weight, dict(reduction=red))
    assert seen == [0, 0, 0, 0]
    assert _module_tensors() == []


@pytest.mark.parametrize("B, N", [(1, 1), (3, 5), (7, 4096), (2, 9000), (33, 64), (5000, 3), (2, 300000)])
def test_launch_plan(B, N):
    """Rows fill the tile whatever B is; splits only for rows wider than the tile, up to one wave of programs,
    never more than MAX_SPLITS; the chunks cover every column exactly once."""
    for programs in (8, 132 * 2, 132 * 4):
        plan = ops.launch_plan(B, N, programs)
        assert plan.rows * plan.block_n == ops.TILE and plan.block_n <= ops.TILE
        assert plan.block_n == min(triton.next_power_of_2(N), ops.TILE)
        assert plan.n_row_blocks == -(-B // plan.rows)
        chunk = plan.chunk_blocks * plan.block_n
        assert (plan.n_splits - 1) * chunk < N <= plan.n_splits * chunk
        assert plan.n_splits <= ops.MAX_SPLITS
        if N <= plan.block_n:
            assert plan.n_splits == 1
        else:
            assert plan.n_splits * plan.n_row_blocks >= min(programs, plan.n_row_blocks * min(
                ops.MAX_SPLITS, -(-N // plan.block_n))) or plan.n_splits == ops.MAX_SPLITS
        assert plan.block_s >= plan.n_splits or plan.block_s == triton.next_power_of_2(ops.MAX_SPLITS)
    assert ops.launch_plan(B, N, 8, splits=3).n_splits == min(3, -(-N // ops.tile_of(N)[1]))


def _backward_plan(monkeypatch, v2d, t2d, coef):
    """(grid, ROWS, BLOCK_N, num_warps) the backward launcher picks, recorded instead of launched."""
    seen = []

    class Record:
        fn = ops._bwd_kernel.fn

        def __getitem__(self, grid):
            return lambda *args, **kwargs: seen.append((grid, kwargs["ROWS"], kwargs["BLOCK_N"], kwargs["num_warps"]))

    monkeypatch.setattr(ops, "_bwd_kernel", Record())
    ops.triton_backward(torch.ones(()), v2d, t2d, coef, LossOptions(reduction="mean"), has_ref=True)
    return seen[0]


@pytest.mark.parametrize("dtype, tile", [(torch.bfloat16, 4096), (torch.float16, 4096), (torch.float32, 2048),
                                         (torch.float64, 1024)])
@pytest.mark.parametrize("N", [40, 1500, 9000])
def test_tile_is_8_kib_per_program_iteration(monkeypatch, dtype, tile, N):
    """The forward and the backward launch tiles of TILE_BYTES of v (H200: fp32 faster at 2048 elements than at
    4096, bf16 at 4096 than at 2048): rows fill the tile, BLOCK_N is N's power of two up to it, rows wider than it
    are split; 8 warps only for the 4096-element tile. TILE stays the widest tile (the AOT library's)."""
    monkeypatch.delenv("NGKERNELS_TILE", raising=False)
    assert ops.tile_for(dtype) == tile == min(ops.TILE, ops.TILE_BYTES // dtype.itemsize) and tile <= ops.TILE
    B = 3
    v, t, r = (torch.randn(B, N, dtype=dtype) for _ in range(3))
    grid, _, kwargs, (_, _, coef) = ops.forward_launch(v, t, r, None, LossOptions(reduction="mean"), splits=3)
    block_n = min(triton.next_power_of_2(N), tile)
    assert kwargs["ROWS"] * kwargs["BLOCK_N"] == tile and kwargs["BLOCK_N"] == block_n
    assert kwargs["num_warps"] == (8 if tile == 4096 else 4)
    assert grid == (-(-B // kwargs["ROWS"]), min(3, -(-N // block_n)))
    monkeypatch.setenv("NGKERNELS_SPLITS", "3")
    bwd_grid, rows, bwd_block_n, warps = _backward_plan(monkeypatch, v, t, coef)
    assert (bwd_grid, rows, bwd_block_n, warps) == (grid, kwargs["ROWS"], block_n, kwargs["num_warps"])


def test_tile_override(monkeypatch):
    """NGKERNELS_TILE (benchmarks, tests) overrides the byte rule in both directions, for every dtype; a value
    that is not a power of two up to TILE is refused with a one-line error."""
    for dtype in (torch.bfloat16, torch.float32, torch.float64):
        for forced in ("1024", "4096", "16"):
            monkeypatch.setenv("NGKERNELS_TILE", forced)
            assert ops.tile_for(dtype) == int(forced)
            v = torch.randn(2, 9000, dtype=dtype)
            _, _, kwargs, _ = ops.forward_launch(v, v, v, None, LossOptions())
            assert kwargs["ROWS"] * kwargs["BLOCK_N"] == int(forced)
    for bad in ("3000", "8192", "0", "-16", "big"):
        monkeypatch.setenv("NGKERNELS_TILE", bad)
        with pytest.raises(ValueError, match="NGKERNELS_TILE must be a power of two"):
            ops.tile_for(torch.float32)


@pytest.mark.parametrize("n_regs, warps, shared, want", [
    (32, 8, 0, 8),  # 256 threads x 32 regs: the thread limit (2048 / 256) binds
    (64, 8, 0, 4),
    (96, 8, 0, 2),  # the review's 86-101 registers at 8 warps: 2 CTAs, not 4
    (101, 8, 0, 2),
    (175, 8, 0, 1),  # the fp64 forward
    (40, 4, 100_000, 2),  # shared memory binds
])
def test_ctas_per_sm(n_regs, warps, shared, want):
    assert ops.ctas_per_sm(n_regs, warps, shared) == want


def _binder_keys(kernel, launches):
    """Triton's own specialisation key of each launch, as its JIT computes it for an sm_90 target."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    skip = ops.FWD_UNSPECIALISED if kernel == "fwd" else ops.BWD_UNSPECIALISED
    fn = JITFunction(getattr(ops, f"_{kernel}_kernel").fn, do_not_specialize=list(skip))
    binder = create_function_from_signature(fn.signature, fn.params, make_backend(GPUTarget("cuda", 90, 32)))
    keys = set()
    for args, kwargs in launches:
        _, specialization, options = binder(*args, **kwargs)
        keys.add(str(specialization) + str(sorted(options.items())))
    return keys


def _bwd_args(v2d, t2d, coef, plan, B, N):
    grad = torch.empty_like(v2d)
    go = torch.ones((), dtype=torch.float32)
    return (v2d, t2d, grad, v2d.stride(0), t2d.stride(0), coef, go, B, N, plan.chunk_blocks, 1.0 / B)


def test_variants_bounded_over_a_training_run():
    """A run whose batch size varies (B = 1..300, random) at fixed N compiles ONE forward and ONE backward
    variant per op (Triton's own specialisation keys, computed without a GPU); varying N adds at most one per
    BLOCK_N and alignment class (ops.variant_bound)."""
    rng = random.Random(0)
    opts = LossOptions(reduction="mean")
    fwd, bwd = [], []
    for _ in range(40):
        B = rng.randint(1, 300)
        v, t, r = (torch.randn(B, 16 * 8 * 8) for _ in range(3))
        _, args, kwargs, (_, _, coef) = ops.forward_launch(v, t, r, None, opts, keep=True)
        fwd.append((args, kwargs))
        plan = ops.launch_plan(B, v.shape[1], 8, tile=ops.tile_for(v.dtype))  # the backward launcher's tile
        assert (plan.rows, plan.block_n) == (kwargs["ROWS"], kwargs["BLOCK_N"])
        bwd.append((_bwd_args(v, t, coef, plan, B, v.shape[1]), dict(HAS_A=True, HAS_T=True, GO_PER_SAMPLE=False,
                                                                      REVERSE=False, ACC=kwargs["ACC"],
                                                                      ROWS=plan.rows, BLOCK_N=plan.block_n)))
    assert len(_binder_keys("fwd", fwd)) == 1
    assert len(_binder_keys("bwd", bwd)) == 1
    # N varies too, with misaligned views (storage offset 1) and the three tile widths (dtypes) mixed in
    launches = {dtype: [] for dtype in (torch.float32, torch.bfloat16, torch.float64)}
    for _ in range(240):
        B, N, dtype = rng.randint(1, 64), rng.randint(1, 20000), rng.choice(list(launches))
        base = torch.randn(3, B * N + 1, dtype=dtype)
        off = rng.randint(0, 1)
        v, t, r = (base[i, off:off + B * N].view(B, N) for i in range(3))
        launches[dtype].append(ops.forward_launch(v, t, r, None, opts, keep=False)[1:3])
    for dtype, runs in launches.items():
        assert len(_binder_keys("fwd", runs)) <= ops.variant_bound(), dtype


def test_l2_hint_is_an_option_off_by_default(monkeypatch, device):
    """By default the forward gives no L2 hint; with L2_KEEP on it keeps v and target exactly when autograd will
    run the backward that re-reads them, and only when they fit in half the L2."""
    monkeypatch.setenv("NGKERNELS_BACKEND", "triton")
    policies = []
    spy_on_forward(monkeypatch, lambda grid, args, kwargs: policies.append(kwargs["KEEP"]))
    v, target, v_ref, _ = make_inputs((2, 40), torch.float32, device)

    def calls():
        ngkernels.fm_normguard_loss(v.detach().requires_grad_(), target, v_ref).backward()
        with torch.no_grad():
            ngkernels.fm_normguard_loss(v.detach().requires_grad_(), target, v_ref)
        ngkernels.normguard_loss(v, v_ref)
        ngkernels.flow_matching_loss(v.detach().requires_grad_(), target)

    calls()
    assert policies == ["", "", "", ""]
    policies.clear()
    monkeypatch.setattr(ops, "L2_KEEP", True)
    calls()
    assert policies == [ops.KEEP_POLICY, "", "", ops.KEEP_POLICY]
    policies.clear()
    monkeypatch.setattr(ops, "CPU_L2_BYTES", 2 * 40 * 4 * 2 - 1)  # v + target no longer fit in half of it
    if device.type == "cpu":
        calls()
        assert policies == ["", "", "", ""]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("relative", [False, True])
def test_denormal_rows(backend, device, dtype, relative):
    """Rows of ~3e-20 values: their squares are float32 denormals (the relative hinge's 1 / (||v|| ||v_ref||) still fits float32). The norm, the hinge and its gradient must
    follow the float64 reference (a flushing sqrt/div would give ||v|| = 0 and a zero gradient)."""
    g = torch.Generator().manual_seed(3)
    v = (torch.rand(4, 37, generator=g, dtype=torch.float64) + 0.5) * 3e-20  # squares 2e-40..2e-39
    v_ref = v.flip(1) * torch.tensor([0.7, 1.4, 0.5, 0.9], dtype=torch.float64)[:, None]
    target = torch.zeros_like(v)
    v, v_ref, target = (x.to(dtype=dtype, device=device) for x in (v, v_ref, target))
    loss, stats, grad = assert_matches_oracle("fm_normguard", v, target, v_ref, None,
                                              dict(relative=relative, reduction="none"), rtol=1e-5)
    assert (stats.v_norm > 0).all()
    active = stats.v_norm > stats.ref_norm
    assert active.any() and (grad[active] != 0).all()


@pytest.mark.parametrize("op", ["normguard", "flow_matching", "fm_normguard"])
@pytest.mark.parametrize("N", [1, 13, 4097])
def test_misaligned_views(backend, device, op, N):
    """Views at storage offset 1 with odd row strides (no 16-byte alignment: Triton's generic variant)."""
    B = 3
    base = torch.randn(3, B * (N + 5) + 1, dtype=torch.float32, generator=torch.Generator().manual_seed(N))
    base = base.to(device)
    v, target, v_ref = (base[i, 1:1 + B * (N + 5)].view(B, N + 5)[:, :N] for i in range(3))
    assert v.data_ptr() % 16 != 0 and v.stride(0) % 16 != 0
    assert_matches_oracle(op, v, target, v_ref, torch.rand(B, device=device) + 0.5,
                          dict(reduction="mean", squared=True, margin=0.1))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reduction_over_many_row_blocks(monkeypatch, device, reduction):
    """More row blocks than one step of the final reduction: a tile of 16 makes every row of 16 its own row block
    and a BLOCK_B of 8 makes the last arrival add 37 block sums in 5 steps (the same loop that takes 1024 sums a
    step at the real BLOCK_B; the interpreter would need minutes for 1025 row blocks)."""
    monkeypatch.setenv("NGKERNELS_BACKEND", "triton")
    monkeypatch.setenv("NGKERNELS_TILE", "16")
    monkeypatch.setattr(ops, "BLOCK_B", 8)
    v, target, v_ref, weight = make_inputs((37, 16), torch.float32, device)
    opts = LossOptions(reduction=reduction)
    assert ops.forward_launch(v, target, v_ref, weight, opts)[0][0] > 4 * ops.BLOCK_B
    assert_matches_oracle("fm_normguard", v, target, v_ref, weight, dict(reduction=reduction), rtol=1e-5)
