"""Every op against the float64 oracle (ngkernels/reference.py), both backends, values and gradients."""

import pytest
import torch

import ngkernels
from tests.ngkernels.helpers import OPS
from tests.ngkernels.helpers import call_op
from tests.ngkernels.helpers import check_against_oracle
from tests.ngkernels.helpers import make_inputs

SHAPES = {
    "1x1": (1, 1),
    "3x7x5x11": (3, 7, 5, 11),
    "img4x16x32x32": (4, 16, 32, 32),
    "tok2x256x64": (2, 256, 64),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OPTIONS = {
    "plain-mean": dict(),
    "squared-sum": dict(squared=True, reduction="sum"),
    "relative-none": dict(relative=True, reduction="none"),
    "rel-sq-margin-mean": dict(relative=True, squared=True, margin=0.1),
    "margin-none": dict(margin=0.05, reduction="none", ng_lambda=2.0),
    "lambda-sum": dict(ng_lambda=0.3, reduction="sum"),
}


@pytest.mark.parametrize("opts", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_matches_reference(backend, device, dtype, shape, op, opts):
    v, target, v_ref, weight = make_inputs(shape, dtype, device)
    grad = check_against_oracle(op, v, target, v_ref, weight, opts, dtype)
    if op == "normguard":  # inactive rows (||v_ref|| = 1.4 ||v||) get exactly zero gradient
        assert torch.all(grad[1::2] == 0)
        assert torch.all(grad[0::2].flatten(1).abs().amax(1) > 0)


@pytest.mark.parametrize("splits", [1, 2, 3, 64], ids=lambda s: f"splits{s}")
def test_row_splits_agree(monkeypatch, device, splits):
    """The split-row path (several programs per sample, last arrival finalises) at any split count."""
    monkeypatch.setenv("NGKERNELS_BACKEND", "triton")
    monkeypatch.setenv("NGKERNELS_SPLITS", str(splits))
    v, target, v_ref, weight = make_inputs((5, 3, 2000), torch.float32, device, seed=3)
    check_against_oracle("fm_normguard", v, target, v_ref, weight, dict(squared=True, reduction="none"),
                         torch.float32)


@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded-ref"])
def test_non_contiguous(backend, device, layout):
    g = torch.Generator().manual_seed(5)
    base = torch.randn(6, 8, 10, 12, generator=g).to(device)
    if layout == "transposed":
        v, target = base.transpose(-1, -2), (base * 0.5 + 1).transpose(-1, -2)
    elif layout == "sliced":
        v, target = base[:, ::2, :, 1:11], base[:, 1::2, :, :10]
    else:
        v, target = base[:, 0], base[:, 1]
    scale = torch.tensor([0.7, 1.4] * 3, device=device).view(6, *[1] * (v.dim() - 1))
    v_ref = v * scale
    if layout == "expanded-ref":
        v_ref = torch.ones(1, *v.shape[1:], device=device).expand_as(v)
    assert not v.is_contiguous()
    weight = torch.rand(6, generator=g).to(device)
    check_against_oracle("fm_normguard", v, target, v_ref, weight, dict(reduction="none"), torch.float32)


def test_int64_row_offsets(backend, device):
    """Row offsets beyond 2**31 elements: a 2-row view whose second row starts at element 2**31 + 16."""
    if device.type == "cuda" and torch.cuda.get_device_properties(0).total_memory < 12 * 2**30:
        pytest.skip("needs 8 GiB of device memory")
    stride = 2**31 + 16
    storage = torch.empty(stride + 64, dtype=torch.float16, device=device)  # untouched pages are never committed
    v = storage.as_strided((2, 48), (stride, 1))
    v.copy_(torch.randn(2, 48, generator=torch.Generator().manual_seed(7)).to(device, torch.float16))
    target = torch.zeros(2, 48, dtype=torch.float16, device=device)
    v_ref = v.detach() * torch.tensor([[0.7], [1.4]], device=device, dtype=torch.float16)
    check_against_oracle("fm_normguard", v, target, v_ref, None, dict(reduction="none"), torch.float16)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("opts", [dict(), dict(relative=True, squared=True, margin=0.2)], ids=["plain", "rel-sq"])
def test_gradcheck_float64(backend, device, op, opts):
    v, target, v_ref, weight = make_inputs((4, 5), torch.float64, device, seed=11)
    weight = weight.double()

    def fn(x):
        return call_op(op, x, target, v_ref, weight, dict(opts, reduction="none"))[0]

    assert torch.autograd.gradcheck(fn, (v.clone().requires_grad_(),), eps=1e-6, atol=1e-7)


def test_float64_outputs_are_float64(backend, device):
    v, target, v_ref, weight = make_inputs((3, 4), torch.float64, device)
    assert ngkernels.fm_normguard_loss(v, target, v_ref).dtype == torch.float64


def test_velocity_norms(backend, device):
    v = torch.randn(5, 3, 17, generator=torch.Generator().manual_seed(2)).to(device, torch.bfloat16)
    norms = ngkernels.velocity_norms(v.requires_grad_())
    assert norms.dtype == torch.float32 and norms.shape == (5,) and not norms.requires_grad
    torch.testing.assert_close(norms.double().cpu(), v.detach().double().flatten(1).norm(dim=1).cpu(), rtol=2e-6,
                               atol=0)


def test_empty_batch(backend, device):
    v = torch.zeros(0, 3, 4, device=device, requires_grad=True)
    t, r = torch.zeros_like(v), torch.zeros_like(v)
    assert torch.isnan(ngkernels.fm_normguard_loss(v, t, r, reduction="mean"))
    assert ngkernels.fm_normguard_loss(v, t, r, reduction="sum").item() == 0.0
    none = ngkernels.fm_normguard_loss(v, t, r, reduction="none")
    assert none.shape == (0,) and none.dtype == torch.float32
    ngkernels.fm_normguard_loss(v, t, r, reduction="sum").backward()
    assert v.grad.shape == v.shape


@pytest.mark.parametrize("where", ["v", "v_ref", "target"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_propagates(backend, device, where, bad):
    v, target, v_ref, weight = make_inputs((4, 3, 5), torch.float32, device)
    tensors = dict(v=v.clone(), target=target.clone(), v_ref=v_ref.clone())
    tensors[where][2, 1, 3] = bad
    vv = tensors["v"].requires_grad_()
    per = ngkernels.fm_normguard_loss(vv, tensors["target"], tensors["v_ref"], reduction="none")
    assert not torch.isfinite(per[2]), per  # never a silent finite number
    assert torch.isfinite(per[[0, 1, 3]]).all()
    assert not torch.isfinite(ngkernels.fm_normguard_loss(vv, tensors["target"], tensors["v_ref"]))
    per.sum().backward()
    assert torch.isfinite(vv.grad[[0, 1, 3]]).all()


def test_zero_velocity_row_has_zero_hinge_gradient(backend, device):
    v = torch.randn(3, 8, device=device)
    v[1] = 0
    v_ref = torch.zeros_like(v)  # excess = 0 on row 1: at the kink and n == 0
    v.requires_grad_()
    ngkernels.normguard_loss(v, v_ref, reduction="sum").backward()
    assert torch.all(v.grad[1] == 0)
    torch.testing.assert_close(v.grad[0], (v[0] / v[0].norm()).detach())


def test_modules_match_functional(device):
    v, target, v_ref, weight = make_inputs((3, 4, 5), torch.float32, device)
    opts = dict(margin=0.1, relative=True, squared=True, reduction="none")
    torch.testing.assert_close(ngkernels.NormGuardLoss(**opts)(v, v_ref), ngkernels.normguard_loss(v, v_ref, **opts))
    torch.testing.assert_close(ngkernels.FlowMatchingLoss("sum")(v, target, weight),
                               ngkernels.flow_matching_loss(v, target, weight=weight, reduction="sum"))
    loss, stats = ngkernels.FMNormGuardLoss(ng_lambda=0.5, return_stats=True, **opts)(v, target, v_ref, weight)
    torch.testing.assert_close(loss, ngkernels.fm_normguard_loss(v, target, v_ref, weight=weight, ng_lambda=0.5,
                                                                 **opts))
    assert "relative=True" in repr(ngkernels.NormGuardLoss(**opts))


def test_backends_agree_per_token(device, monkeypatch):
    """Per-token norms are the same op on a reshaped view: [B, T, D] -> [B*T, D]."""
    v, target, v_ref, _ = make_inputs((2, 33, 16), torch.float32, device)
    out = {}
    for b in ("torch", "triton"):
        monkeypatch.setenv("NGKERNELS_BACKEND", b)
        out[b] = ngkernels.normguard_loss(v.reshape(-1, 16), v_ref.reshape(-1, 16), reduction="none")
    assert out["torch"].shape == (66,)
    torch.testing.assert_close(out["torch"], out["triton"], rtol=1e-5, atol=1e-6)


def test_double_backward_is_a_clear_error(backend, device):
    v, target, v_ref, _ = make_inputs((2, 6), torch.float32, device)
    v.requires_grad_()
    (g,) = torch.autograd.grad(ngkernels.fm_normguard_loss(v, target, v_ref), v, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        g.sum().backward()
