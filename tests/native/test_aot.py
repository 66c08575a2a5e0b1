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


def test_tiles_follow_launch_config():
    tiles = aot.aot_tiles()
    assert [t.block_n for t in tiles] == sorted(aot.AOT_BLOCK_NS) and tiles[-1].block_n == ops._MAX_BLOCK_N
    for t in tiles:
        assert t.rows * t.block_n == ops._TILE
        # rows longer than BLOCK_N only exist for the largest tile, which must hold every split's partial sum
        assert t.block_s == (triton.next_power_of_2(ops._MAX_SPLITS) if t.block_n == ops._MAX_BLOCK_N else 1)


def test_arguments_are_read_from_the_kernels(monkeypatch):
    """Reordered arguments follow automatically; an argument or flag the generator does not know stops it."""

    @triton.jit
    def reordered(N, B, V, T, G, stride_t, stride_v, COEF, GO, chunk, go_scale, HAS_A: tl.constexpr,
                  HAS_T: tl.constexpr, GO_PER_SAMPLE: tl.constexpr, ACC: tl.constexpr, ROWS: tl.constexpr,
                  BLOCK_N: tl.constexpr):
        pass

    monkeypatch.setattr(ops, "_bwd_kernel", reordered)
    assert list(aot.signature_of("bwd", "bf16")) == ["N", "B", "V", "T", "G", "stride_t", "stride_v", "COEF", "GO",
                                                     "chunk", "go_scale"]
    assert aot.signature_of("bwd", "bf16")["V"] == "*bf16"
    source = aot._struct_and_filler("bwd", 2)
    assert source.index("params[0] = &args->N;") < source.index("params[2] = &args->V;")

    @triton.jit
    def new_argument(V, T, G, stride_v, stride_t, COEF, GO, B, N, chunk, go_scale, clip, HAS_A: tl.constexpr,
                     HAS_T: tl.constexpr, GO_PER_SAMPLE: tl.constexpr, ACC: tl.constexpr, ROWS: tl.constexpr,
                     BLOCK_N: tl.constexpr):
        pass

    monkeypatch.setattr(ops, "_bwd_kernel", new_argument)
    with pytest.raises(SystemExit, match="unknown argument 'clip'.*ARG_TYPES"):
        aot.signature_of("bwd", "fp32")

    @triton.jit
    def new_flag(V, T, G, stride_v, stride_t, COEF, GO, B, N, chunk, go_scale, HAS_A: tl.constexpr,
                 HAS_T: tl.constexpr, GO_PER_SAMPLE: tl.constexpr, CLIP: tl.constexpr, ACC: tl.constexpr,
                 ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
        pass

    monkeypatch.setattr(ops, "_bwd_kernel", new_flag)
    with pytest.raises(SystemExit, match="constexpr flags.*CLIP"):
        aot.flag_names("bwd")
