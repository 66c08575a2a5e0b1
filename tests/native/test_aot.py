"""ngkernels.aot without compiling: the specialisation list and how the generator follows the kernels."""

from __future__ import annotations

import pytest
import triton
import triton.language as tl

from ngkernels import aot
from ngkernels.ops import fm_normguard as ops


def test_specialisations_cover_the_api_once():
    specs = aot.specialisations()
    assert len({s.name for s in specs}) == len(specs)
    per_arch = len(aot.DTYPES) * len(aot.aot_tiles()) * 2  # dtypes x tiles x (aligned, generic)
    fwd = list(aot.fwd_flag_sets())
    bwd = list(aot.bwd_flag_sets())
    assert len(specs) == len(aot.ARCHS) * per_arch * (len(fwd) + len(bwd))
    # normguard: 4 hinge variants; fm + normguard: 4; flow matching: 1 -- all with REDUCE and HAS_W = HAS_T
    assert sorted((f["HAS_T"], f["HAS_R"]) for f in fwd) == [(False, True)] * 4 + [(True, False)] + [(True, True)] * 4
    assert all(f["REDUCE"] and f["HAS_W"] == f["HAS_T"] for f in fwd)
    assert len(bwd) == 6


def test_tiles_follow_the_python_launcher():
    tiles = aot.aot_tiles()
    assert [t.block_n for t in tiles] == sorted(aot.AOT_BLOCK_NS) and tiles[-1].block_n == ops.TILE
    for t in tiles:
        assert t.rows * t.block_n == ops.TILE
        assert (t.rows, t.block_n, t.num_warps, t.block_s) == ops.tile_of(t.block_n)
        # rows longer than BLOCK_N only exist for the largest tile, which reads split partials in wide steps
        assert t.block_s == (triton.next_power_of_2(ops.MAX_SPLITS) if t.block_n == ops.TILE else 1)


def test_plan_follows_the_python_launcher():
    """aot_launch_plan is ops.launch_plan with BLOCK_N rounded up to a compiled tile and the tile's own wave."""
    per_sm = [3, 4, 2, 2]
    for B, N in [(1, 1), (5, 17), (64, 100), (3, 3000), (8, 262144), (300, 4097)]:
        rows, block_n, n_rb, n_splits, chunk, warps, tile = aot.aot_launch_plan(B, N, 132, per_sm)
        assert aot.aot_tiles()[tile].block_n == block_n >= min(triton.next_power_of_2(N), ops.TILE)
        plan = ops.launch_plan(B, N, per_sm[tile] * 132, block_ns=aot.AOT_BLOCK_NS)
        assert (rows, block_n, n_rb, n_splits, chunk, warps) == (plan.rows, plan.block_n, plan.n_row_blocks,
                                                                  plan.n_splits, plan.chunk_blocks * block_n,
                                                                  plan.num_warps)


def test_arguments_are_read_from_the_kernels(monkeypatch):
    """Reordered arguments follow automatically; an argument or flag the generator does not know stops it."""

    @triton.jit
    def reordered(N, B, V, T, G, stride_t, stride_v, COEF, GO, chunk_blocks, go_scale, HAS_A: tl.constexpr,
                  HAS_T: tl.constexpr, GO_PER_SAMPLE: tl.constexpr, ACC: tl.constexpr, ROWS: tl.constexpr,
                  BLOCK_N: tl.constexpr):
        pass

    monkeypatch.setattr(ops, "_bwd_kernel", reordered)
    assert list(aot.signature_of("bwd", "bf16")) == ["N", "B", "V", "T", "G", "stride_t", "stride_v", "COEF", "GO",
                                                     "chunk_blocks", "go_scale"]
    assert aot.signature_of("bwd", "bf16")["V"] == "*bf16"
    source = aot._struct_and_filler("bwd", 2)
    assert source.index("params[0] = &args->N;") < source.index("params[2] = &args->V;")

    @triton.jit
    def new_argument(V, T, G, stride_v, stride_t, COEF, GO, B, N, chunk_blocks, go_scale, clip, HAS_A: tl.constexpr,
                     HAS_T: tl.constexpr, GO_PER_SAMPLE: tl.constexpr, ACC: tl.constexpr, ROWS: tl.constexpr,
                     BLOCK_N: tl.constexpr):
        pass

    monkeypatch.setattr(ops, "_bwd_kernel", new_argument)
    with pytest.raises(SystemExit, match="unknown argument 'clip'.*ARG_TYPES"):
        aot.signature_of("bwd", "fp32")

    @triton.jit
    def new_flag(V, T, G, stride_v, stride_t, COEF, GO, B, N, chunk_blocks, go_scale, HAS_A: tl.constexpr,
                 HAS_T: tl.constexpr, GO_PER_SAMPLE: tl.constexpr, CLIP: tl.constexpr, ACC: tl.constexpr,
                 ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
        pass

    monkeypatch.setattr(ops, "_bwd_kernel", new_flag)
    with pytest.raises(SystemExit, match="constexpr flags.*CLIP"):
        aot.flag_names("bwd")
