"""Inputs and the float64 oracle shared by the op tests."""

import torch

import ngkernels
from ngkernels.options import accumulation_dtype
from ngkernels.reference import reference_loss

OPS = ("normguard", "flow_matching", "fm_normguard")


def make_inputs(shape, dtype, device, seed=0):
    """v, target, v_ref, weight. Rows alternate ||v_ref|| = 0.7 ||v|| (hinge active) and 1.4 ||v|| (inactive),
    exactly, whatever N (v_ref is a scaled permutation of v), so no row sits near the kink."""
    g = torch.Generator().manual_seed(seed)
    B = shape[0]
    v = torch.randn(shape, generator=g, dtype=torch.float64)
    target = torch.randn(shape, generator=g, dtype=torch.float64)
    scale = torch.tensor([0.7 if i % 2 == 0 else 1.4 for i in range(B)], dtype=torch.float64)
    v_ref = v.flatten(1).flip(1).reshape(shape) * scale.view(B, *[1] * (len(shape) - 1))
    weight = torch.rand(B, generator=g, dtype=torch.float64) + 0.5
    to = dict(dtype=dtype, device=device)
    return v.to(**to), target.to(**to), v_ref.to(**to), weight.to(dtype=torch.float32, device=device)


def call_op(op, v, target, v_ref, weight, opts):
    """Runs one public op; returns (loss, stats or None)."""
    o = dict(opts)
    red = o.pop("reduction", "mean")
    if op == "normguard":
        o.pop("ng_lambda", None)
        return ngkernels.normguard_loss(v, v_ref, reduction=red, **o), None
    if op == "flow_matching":
        return ngkernels.flow_matching_loss(v, target, weight=weight, reduction=red), None
    return ngkernels.fm_normguard_loss(v, target, v_ref, weight=weight, reduction=red, return_stats=True, **o)


def oracle(op, v, target, v_ref, weight, opts):
    """float64 loss and autograd gradient of the same (already dtype-rounded) inputs, on the CPU."""
    o = dict(opts)
    v64 = v.detach().cpu().double().requires_grad_()  # on the CPU whatever v's device: the tests compare there
    t64 = target.cpu().double() if op != "normguard" else None
    r64 = v_ref.cpu().double() if op != "flow_matching" else None
    w64 = weight.cpu().double() if op != "normguard" and weight is not None else None
    if op == "flow_matching":
        o = {"reduction": o.get("reduction", "mean")}
    if op == "normguard":
        o.pop("ng_lambda", None)
    loss, stats = reference_loss(v64, t64, r64, weight=w64, **o)
    return v64, loss, stats


def grad_tolerance(dtype, ref_grad):
    eps = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps
    return dict(rtol=eps, atol=eps * float(ref_grad.abs().max()) + 1e-12)


def check_against_oracle(op, v, target, v_ref, weight, opts, dtype, seed=0):
    v = v.detach().requires_grad_()
    loss, stats = call_op(op, v, target, v_ref, weight, opts)
    v64, ref_loss, ref_stats = oracle(op, v, target, v_ref, weight, opts)
    assert loss.dtype == accumulation_dtype(dtype)  # float32, float64 for float64 inputs
    assert loss.shape == ref_loss.shape
    torch.testing.assert_close(loss.double().cpu(), ref_loss.detach().cpu(), rtol=2e-5, atol=1e-6)
    # a non-uniform grad_output: random per sample for "none", a non-unit scalar otherwise
    gen = torch.Generator().manual_seed(seed + 1)
    go = torch.randn(ref_loss.shape, generator=gen, dtype=torch.float64) if ref_loss.dim() else torch.tensor(1.7,
                                                                                                            dtype=torch.float64)
    loss.backward(go.to(loss.device, loss.dtype))
    ref_loss.backward(go)
    assert v.grad.dtype == v.dtype and v.grad.shape == v.shape
    torch.testing.assert_close(v.grad.double().cpu(), v64.grad, **grad_tolerance(dtype, v64.grad))
    if stats is not None:
        for name in ("v_norm", "ref_norm", "mse"):
            got, want = getattr(stats, name), getattr(ref_stats, name)
            assert got.dtype == accumulation_dtype(dtype)
            torch.testing.assert_close(got.double().cpu(), want.detach().cpu(), rtol=2e-5, atol=1e-6)
    return v.grad
