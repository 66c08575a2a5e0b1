"""NormGuard under the wrappers of the trainers it goes into: autocast (bf16 / fp16), no-grad reference forwards,
gradient accumulation (grad_output != 1), torch.compile of the loss function, and DDP (2 gloo processes)."""

import copy

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import ngkernels
from tests.integrations import ddp_worker
from tests.integrations.plain import hinge, sample_mean


def _models(dtype=torch.float32, seed=0):
    """A policy and a frozen reference (weights scaled by 0.9, so ||v|| > ||v_ref|| on most samples)."""
    torch.manual_seed(seed)
    policy = nn.Conv2d(16, 16, 1, dtype=dtype)
    ref = copy.deepcopy(policy).requires_grad_(False)
    with torch.no_grad():
        ref.weight.mul_(0.9)
    return policy, ref


def _x(B=4, seed=1, dtype=torch.float32):
    return torch.randn(B, 16, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _plain_total(v, v_ref, ng_lambda, kl_beta, **opts):
    return (kl_beta * sample_mean((v - v_ref) ** 2) + ng_lambda * hinge(v, v_ref, **opts)).mean()


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("per_token", [False, True], ids=["sample", "token"])
def test_autocast_half_precision_inputs(backend, half, per_token):
    policy, ref = _models()
    guard = ngkernels.NormGuard(0.3, relative=True, per_token=per_token)
    with torch.autocast("cpu", dtype=half):
        v = policy(_x())
        with torch.no_grad():
            v_ref = ref(_x())
        v.retain_grad()
        loss = guard(v, v_ref, target=v_ref, weight=0.1)
    assert v.dtype == half and v_ref.dtype == half and loss.dtype == torch.float32
    loss.backward()
    v64 = v.detach().double().requires_grad_()
    expected = _plain_total(v64, v_ref.double(), 0.3, 0.1, relative=True, per_token=per_token)
    expected.backward()
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=0)
    assert v.grad.dtype == half
    torch.testing.assert_close(v.grad.double(), v64.grad, rtol=1e-2, atol=1e-2 * v64.grad.abs().max().item())
    assert policy.weight.grad is not None and ref.weight.grad is None


def test_gradients_reach_only_the_policy_even_if_the_reference_forward_kept_a_graph():
    policy, ref = _models()
    ref.requires_grad_(True)  # a trainer that forgot torch.no_grad() around the reference forward
    x = _x()
    loss = ngkernels.NormGuard(0.3, relative=True)(policy(x), ref(x))
    loss.backward()
    assert policy.weight.grad is not None and policy.weight.grad.abs().sum() > 0
    assert ref.weight.grad is None


@pytest.mark.parametrize("adaptive", [False, True], ids=["fixed", "adaptive"])
def test_gradient_accumulation_equals_one_large_batch(backend, adaptive):
    """Two micro-batches, each loss divided by 2 (grad_output = 0.5), then one update(): the parameters'
    gradient and the dual step equal those of the one batch holding both."""
    kwargs = dict(relative=True, adaptive=adaptive, lambda_lr=0.5)
    policy, ref = _models(torch.float64)
    x = _x(B=8, dtype=torch.float64)
    acc_guard, big_guard = ngkernels.NormGuard(0.3, **kwargs), ngkernels.NormGuard(0.3, **kwargs)
    for part in x.chunk(2):
        with torch.no_grad():
            v_ref = ref(part)
        (acc_guard(policy(part), v_ref, target=v_ref, weight=0.1) / 2).backward()
    acc_grad = policy.weight.grad.clone()
    policy.zero_grad()
    with torch.no_grad():
        v_ref = ref(x)
    big_guard(policy(x), v_ref, target=v_ref, weight=0.1).backward()
    torch.testing.assert_close(acc_grad, policy.weight.grad, rtol=1e-12, atol=1e-15)
    acc_guard.update()
    big_guard.update()
    for name in ("lambda_", "ratio_mean", "ratio_max", "ratio_ema"):
        torch.testing.assert_close(getattr(acc_guard, name), getattr(big_guard, name), rtol=1e-12, atol=0)
    if adaptive:
        assert acc_guard.lambda_.item() != 0.3


def test_compiled_loss_function_matches_eager(backend):
    """An NFT-style loss function (a policy term + the guard fused with the KL-to-reference MSE), compiled with
    fullgraph=True, scaled by 1/4 as under gradient accumulation."""
    torch._dynamo.reset()
    guard_e = ngkernels.NormGuard(0.3, relative=True, per_token=True, return_stats=True)
    guard_c = ngkernels.NormGuard(0.3, relative=True, per_token=True, return_stats=True)

    def loss_fn(guard, v, v_ref, target):
        policy = ((v - target) ** 2).mean()
        ng, stats = guard(v, v_ref, target=v_ref, weight=1e-2)
        return (policy + ng) / 4, stats.v_norm / stats.ref_norm

    compiled = torch.compile(loss_fn, fullgraph=True, dynamic=False)
    policy, ref = _models()
    x, target = _x(), _x(seed=2)
    v_e = policy(x)
    with torch.no_grad():
        v_ref = ref(x)
    v_c = v_e.detach().clone().requires_grad_()
    v_e = v_e.detach().clone().requires_grad_()
    (le, re_), (lc, rc) = loss_fn(guard_e, v_e, v_ref, target), compiled(guard_c, v_c, v_ref, target)
    le.backward()
    lc.backward()
    torch.testing.assert_close(lc, le)
    torch.testing.assert_close(rc, re_)
    torch.testing.assert_close(v_c.grad, v_e.grad)
    torch.testing.assert_close(guard_c._acc, guard_e._acc, rtol=1e-5, atol=1e-6)  # from float32 norms


def test_ddp_two_processes_share_one_lambda(tmp_path):
    """2 gloo processes, each with its own batch: after every update() lambda is the same on both ranks and
    equals the dual step computed from both ranks' samples together."""
    mp.spawn(ddp_worker.run, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    torch.testing.assert_close(r0["weight"], r1["weight"], rtol=0, atol=0)  # DDP kept the replicas equal
    for a, b in zip(r0["record"], r1["record"]):
        ratios = torch.cat([a["ratio"], b["ratio"]]).double()
        assert not torch.allclose(a["ratio"].mean(), b["ratio"].mean())  # the ranks saw different data
        expected = (a["before"] + ddp_worker.LAMBDA_LR * (ratios.mean() - 1.0)).clamp(0, 10.0)
        for r in (a, b):
            torch.testing.assert_close(r["after"], expected, rtol=1e-12, atol=0)
            torch.testing.assert_close(r["ratio_mean"], ratios.mean(), rtol=1e-12, atol=0)
            torch.testing.assert_close(r["ratio_max"], ratios.max(), rtol=1e-12, atol=0)
    assert r0["record"][-1]["after"].item() != 0.1
