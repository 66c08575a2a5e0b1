"""Under torch.compile(fullgraph=True): the eager result (the Triton backend as the opaque torch.library custom op,
the torch backend traced inline); opcheck passes on the custom op."""

import pytest
import torch

import ngkernels
from tests.ngkernels.helpers import make_inputs

CASES = {
    "fm_normguard-mean-stats": lambda v, t, r, w: ngkernels.fm_normguard_loss(
        v, t, r, weight=w, ng_lambda=0.5, squared=True, return_stats=True),
    "fm_normguard-none": lambda v, t, r, w: ngkernels.fm_normguard_loss(v, t, r, relative=True, reduction="none"),
    "normguard-sum": lambda v, t, r, w: ngkernels.normguard_loss(v, r, margin=0.1, reduction="sum"),
    "flow_matching-mean": lambda v, t, r, w: ngkernels.flow_matching_loss(v, t, weight=w),
}


def _run(fn, v, t, r, w):
    v = v.clone().requires_grad_()
    out = fn(v, t, r, w)
    loss, stats = out if isinstance(out, tuple) else (out, None)
    (loss * torch.arange(1, loss.numel() + 1, dtype=loss.dtype, device=loss.device).reshape(loss.shape)).sum() \
        .backward()
    return loss.detach(), stats, v.grad


@pytest.mark.parametrize("case", CASES, ids=CASES.keys())
def test_compile_fullgraph_matches_eager(backend, device, case):
    torch._dynamo.reset()
    v, t, r, w = make_inputs((4, 3, 6, 5), torch.float32, device)
    fn = CASES[case]

    def step(v, t, r, w):  # the loss and a downstream op, compiled together
        out = fn(v, t, r, w)
        return (out[0] * 2.0, out[1]) if isinstance(out, tuple) else out * 2.0

    eager = _run(step, v, t, r, w)
    compiled = _run(torch.compile(step, fullgraph=True, dynamic=False), v, t, r, w)
    torch.testing.assert_close(compiled[0], eager[0])
    torch.testing.assert_close(compiled[2], eager[2])
    if eager[1] is not None:
        torch.testing.assert_close(compiled[1].v_norm, eager[1].v_norm)
        torch.testing.assert_close(compiled[1].ref_norm, eager[1].ref_norm)


@pytest.mark.parametrize("reduction", [0, 1, 2], ids=["none", "mean", "sum"])
def test_opcheck(backend, device, reduction):
    v, t, r, w = make_inputs((3, 10), torch.float32, device)
    args = (v.clone().requires_grad_(), t, r, w, 0.5, 0.0, False, True, reduction, backend, True)
    torch.library.opcheck(torch.ops.ngkernels.fused_loss_fwd.default, args)


def test_what_the_compiled_graph_holds(backend, device):
    """The Triton backend enters the caller's graph as the custom op; the torch backend as its plain torch ops,
    which Inductor can fuse with the caller's (on CPU, the reason to trace it rather than hide it)."""
    torch._dynamo.reset()
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    v, t, r, w = make_inputs((3, 10), torch.float32, device)
    torch.compile(lambda v: ngkernels.fm_normguard_loss(v, t, r) * 2.0, backend=capture, fullgraph=True)(v)
    (code,) = graphs
    assert ("ngkernels.fused_loss_fwd" in code) == (backend == "triton")
    assert ("linalg_vector_norm" in code) == (backend == "torch")
