"""What only a GPU can show: CUDA-graph capture and replay, torch.compile(mode="reduce-overhead"), several streams,
a buffer-size change between capture and replay, real occupancy, and the compiled-variant count of a training run
whose batch size varies. Each result is held to the eager call (itself held to the float64 oracle elsewhere).

Why these cases: the forward's cross-program tickets used to live in a module-level cache; a graph captured its
address, a later larger call replaced it, and the replay then counted in freed memory (stats and loss left as
uninitialised memory, silently). Now every launch zeroes its own tickets on its own stream (test_launch.py shows
the CPU half of that); here the replays, streams and reduce-overhead runs show it on the device.
"""

import pytest
import torch

import ngkernels
from ngkernels.ops import fm_normguard as ops

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _inputs(B, N, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    v = torch.randn(B, N, device="cuda", dtype=dtype, generator=g)
    target = torch.randn(B, N, device="cuda", dtype=dtype, generator=g)
    v_ref = v * torch.rand(B, 1, device="cuda", dtype=dtype, generator=g).add_(0.5)  # half the rows active
    return v, target, v_ref


def _full_pass(v, target, v_ref):
    """Loss, stats and gradient of one fused call, into fresh tensors."""
    v = v.detach().requires_grad_()
    loss, stats = ngkernels.fm_normguard_loss(v, target, v_ref, ng_lambda=0.5, return_stats=True)
    loss.backward()
    return loss.detach(), stats.v_norm, stats.ref_norm, v.grad


def _assert_same(a, b):
    for x, y in zip(a, b):
        torch.testing.assert_close(x.float(), y.float(), rtol=0, atol=0)  # same kernels, same order: bitwise


@pytest.mark.parametrize("B, N", [(4, 16 * 64 * 64), (8, 262144), (4096, 64)])
def test_graph_replay_survives_a_larger_eager_call_and_other_streams(B, N):
    """Capture a full pass, then run an eager call that needs more tickets ([4096, 1000]) and a failed launch,
    then replay on the capture stream and on a second stream: each replay equals eager, and so does eager after."""
    v, target, v_ref = _inputs(B, N)
    want = _full_pass(v, target, v_ref)
    static_v = v.detach().clone().requires_grad_()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up outside the capture (compiles, autograd state)
        for _ in range(2):
            static_v.grad = None
            loss, stats = ngkernels.fm_normguard_loss(static_v, target, v_ref, ng_lambda=0.5, return_stats=True)
            loss.backward()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    static_v.grad = None
    with torch.cuda.graph(graph):
        loss, stats = ngkernels.fm_normguard_loss(static_v, target, v_ref, ng_lambda=0.5, return_stats=True)
        loss.backward()
    # things that used to replace or poison the shared ticket buffer
    _full_pass(*_inputs(4096, 1000, seed=1))
    with pytest.raises(ValueError):
        ngkernels.fm_normguard_loss(v, target[:, :-1], v_ref)
    for stream in (torch.cuda.current_stream(), torch.cuda.Stream()):
        with torch.cuda.stream(stream):
            for _ in range(3):
                graph.replay()
        stream.synchronize()
        _assert_same((loss, stats.v_norm, stats.ref_norm, static_v.grad), want)
    _assert_same(_full_pass(v, target, v_ref), want)


def test_two_graphs_replayed_concurrently_on_two_streams():
    """Two graphs captured on one stream, replayed at the same time on two streams: no shared counters."""
    a, b = _inputs(8, 262144, seed=2), _inputs(8, 262144, seed=3)
    want_a, want_b = (_full_pass(*x)[0] for x in (a, b))
    graphs, losses = [], []
    for x in (a, b):
        ngkernels.fm_normguard_loss(*x)  # warm-up
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            losses.append(ngkernels.fm_normguard_loss(*x, ng_lambda=0.5))
        graphs.append(g)
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for _ in range(20):
        for g, st in zip(graphs, streams):
            with torch.cuda.stream(st):
                g.replay()
    torch.cuda.synchronize()
    _assert_same(losses, (want_a, want_b))


def test_eager_calls_on_two_streams_at_once():
    xs = [_inputs(16, 65536, seed=s) for s in range(4)]
    want = [ngkernels.fm_normguard_loss(*x) for x in xs]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    got = []
    for i, x in enumerate(xs * 5):
        with torch.cuda.stream(streams[i % 2]):
            got.append(ngkernels.fm_normguard_loss(*x))
    torch.cuda.synchronize()
    for i, g in enumerate(got):
        _assert_same([g], [want[i % 4]])


@pytest.mark.parametrize("mode", ["default", "reduce-overhead", "max-autotune-no-cudagraphs"])
def test_torch_compile_modes(mode):
    """The first call of reduce-overhead used to crash (a cached buffer created in the cudagraph pool)."""
    torch._dynamo.reset()
    v, target, v_ref = _inputs(16, 16 * 64 * 64)

    def step(v, target, v_ref):
        loss, stats = ngkernels.fm_normguard_loss(v, target, v_ref, ng_lambda=0.5, return_stats=True)
        return loss * 2, stats.v_norm / stats.ref_norm

    compiled = torch.compile(step, mode=mode, fullgraph=True)
    want = step(v, target, v_ref)
    for i in range(4):  # warm-up, record, replays
        got = compiled(v, target, v_ref)
        for g, w in zip(got, want):
            torch.testing.assert_close(g.clone(), w, rtol=1e-6, atol=0)
    big = _inputs(64, 16 * 64 * 64, seed=5)  # a new shape between replays
    for args, w in ((big, step(*big)), ((v, target, v_ref), want)):
        got = [t.clone() for t in compiled(*args)]  # read before the next replay overwrites the graph's outputs
        for g, x in zip(got, w):
            torch.testing.assert_close(g, x, rtol=1e-6, atol=0)


def test_compiled_variants_bounded_over_a_varying_batch():
    """A training run's loop: B varies every step at fixed N; the JIT caches must end with one forward and one
    backward variant for this op and dtype (misaligned and N changes are bounded by ops.variant_bound)."""
    N = 16 * 32 * 32
    before = {k: len(getattr(ops, k).device_caches[torch.cuda.current_device()][0]) for k in ("_fwd_kernel",
                                                                                               "_bwd_kernel")}
    for B in [1, 2, 3, 5, 8, 13, 16, 17, 31, 64, 100, 127, 128, 129, 300, 1000]:
        _full_pass(*_inputs(B, N, seed=B))
    after = {k: len(getattr(ops, k).device_caches[torch.cuda.current_device()][0]) for k in before}
    assert all(after[k] - before[k] <= 1 for k in before), (before, after)


def test_occupancy_comes_from_the_compiled_kernel():
    v, target, v_ref = _inputs(8, 262144)
    ngkernels.fm_normguard_loss(v, target, v_ref)
    assert ops._OCCUPANCY, "the launcher did not read the compiled kernel's resources"
    for per_sm in ops._OCCUPANCY.values():
        assert 1 <= per_sm <= 32
