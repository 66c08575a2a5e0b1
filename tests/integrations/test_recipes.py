"""The recipes of docs/integrations.md, executed: each `# recipe: NAME` block of the doc runs in a namespace that
holds its trainer's tensors, and its total must equal that trainer's loss as the authors write it (plain torch,
tests/integrations/plain.py) plus ng_lambda times the hinge, in value and in gradient.

Shapes are the trainers' own: SD3.5 latents [B, 16, 64, 64] (flow_grpo, DiffusionNFT, AWM) and FLUX packed
tokens [B, 1024, 64] (Flow-Factory), in float64 on the torch backend. The Triton backend (interpreted on CPU)
runs every recipe once more on a smaller shape in float32: float64 is the oracle's dtype, and what the Triton
run adds is that the recipes' reshapes, concatenations and weights reach the kernels intact, at the dtype
trainers feed them; the kernels' own float64 path is tests/ngkernels' business. The full shapes would also
run under the interpreter (about 0.5 s a call), but 8 recipes x 3 forms of it would double the file's time
for no new coverage.
"""

import re
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import ngkernels
from tests.integrations import plain

DOC = Path(__file__).resolve().parents[2] / "docs" / "integrations.md"
F64 = torch.float64


def recipes() -> dict:
    text = DOC.read_text()
    blocks = re.findall(r"^```python\n# recipe: (\S+)\n(.*?)^```", text, flags=re.S | re.M)
    return {name: body for name, body in blocks}


FORMS = {  # NormGuard constructor options; the plain hinge takes the same (minus ng_lambda / adaptive)
    "sample-relative": dict(ng_lambda=0.3, relative=True),
    "token-squared-margin": dict(ng_lambda=0.5, squared=True, margin=0.02, per_token=True),
    "sample-adaptive": dict(ng_lambda=0.2, relative=True, adaptive=True),
}
SHAPES = {("sd3", "full"): (16, 64, 64), ("sd3", "small"): (16, 16, 16),
          ("flux", "full"): (1024, 64), ("flux", "small"): (64, 64)}


def _hinge_opts(form):
    return {k: v for k, v in form.items() if k not in ("ng_lambda", "adaptive")}


class Maker:
    """Random tensors of one case, built in float64 and rounded to the test dtype (the oracle upcasts back)."""

    def __init__(self, seed, dtype):
        self.g = torch.Generator().manual_seed(seed)
        self.dtype = dtype

    def randn(self, *shape):
        return torch.randn(*shape, generator=self.g, dtype=F64).to(self.dtype)

    def pair(self, B, rest):
        """(v, v_ref): per-sample scales alternate 1.2 / 0.85 around v_ref (hinge on / off, also per token)."""
        v_ref = self.randn(B, *rest)
        scale = torch.tensor([1.2 if i % 2 == 0 else 0.85 for i in range(B)], dtype=self.dtype)
        v = v_ref * scale.view(B, *[1] * len(rest)) + 0.05 * self.randn(B, *rest)
        return v, v_ref


def _sigma_view(sigma, x):
    return sigma.view(-1, *[1] * (x.dim() - 1))


# ---------------------------------------------------------------------------------------------------
# One builder per recipe: -> (namespace for the doc's block, leaves, authors' loss, finish(ns) -> total,
#                              (v, v_ref) the guarded pair, log: (container name, key))

def case_flow_grpo_grpo(m, rest):
    B, guidance = 2, 4.5
    v, v_ref = m.pair(B, rest)
    uncond = m.randn(B, *rest).requires_grad_()
    text = (uncond.detach() + (v - uncond.detach()) / guidance).requires_grad_()
    noise_pred = uncond + guidance * (text - uncond)  # CFG-combined, as compute_log_prob forms it
    x, x_next = m.randn(B, *rest), m.randn(B, *rest)
    sigma = torch.tensor([0.7, 0.4], dtype=m.dtype)
    mean, std_dev_t, logp = plain.sde_step_mean_logprob(noise_pred, x, x_next, sigma, sigma - 0.1, 0.7)
    with torch.no_grad():
        mean_ref, _, _ = plain.sde_step_mean_logprob(v_ref, x, x_next, sigma, sigma - 0.1, 0.7)
    logp_old = logp.detach() + 5e-5 * m.randn(B)  # inside the 1e-4 clip range: the ratio carries gradient
    loss = plain.grpo_loss(logp, logp_old, m.randn(B), 1e-4, mean, mean_ref, std_dev_t, beta=0.04)
    ns = dict(noise_pred=noise_pred, noise_pred_ref=v_ref, loss=loss, info=defaultdict(list))
    return ns, [uncond, text], loss, (lambda ns: ns["loss"]), (noise_pred, v_ref), ("info", "normguard_ratio")


def case_flow_grpo_dpo(m, rest):
    bsz = 2
    v, v_ref = m.pair(2 * bsz, rest)
    v.requires_grad_()
    target = m.randn(2 * bsz, *rest)
    loss = plain.dpo_loss(v, v_ref, target, beta=100.0)
    ns = dict(model_pred=v, model_pred_ref=v_ref, loss=loss, info=defaultdict(list))
    return ns, [v], loss, (lambda ns: ns["loss"]), (v, v_ref), ("info", "normguard_ratio")


def _nft_case(m, rest, sigmas, kl_beta, B=2):
    """v, v_ref, the NFT policy loss and the authors' total (policy + beta * velocity KL), as both NFT trainers
    form them."""
    v, v_ref = m.pair(B, rest)
    v.requires_grad_()
    v_old = v_ref * 1.02 + 0.02 * m.randn(B, *rest)
    x0, noise = m.randn(B, *rest), m.randn(B, *rest)
    sigma = torch.tensor(sigmas, dtype=m.dtype)
    x_t = (1 - _sigma_view(sigma, x0)) * x0 + _sigma_view(sigma, x0) * noise
    policy = plain.nft_policy_loss(v, v_old, x0, x_t, sigma, m.randn(B), nft_beta=1.0, adv_clip_max=5.0)
    return v, v_ref, policy, policy + kl_beta * plain.velocity_kl(v, v_ref).mean()


def case_diffusionnft(m, rest):
    kl_beta = 1e-4
    v, v_ref, policy, authors = _nft_case(m, rest, [0.6, 0.3], kl_beta)
    ns = dict(forward_prediction=v, ref_forward_prediction=v_ref, loss=policy, loss_terms={},
              config=SimpleNamespace(train=SimpleNamespace(beta=kl_beta)))
    return ns, [v], authors, (lambda ns: ns["loss"]), (v, v_ref), ("loss_terms", "normguard_ratio")


def _case_awm(m, rest, kl_weight):
    T, B, beta, ema_beta = 2, 2, 1e-3, 1.0
    v, v_ref = m.pair(T * B, rest)
    v = v.view(T, B, *rest).requires_grad_()
    v_ref = v_ref.view(T, B, *rest)
    v_ema = v_ref * 1.05 + 0.02 * m.randn(T, B, *rest)
    target = m.randn(T * B, *rest)
    sigma = torch.tensor([0.8, 0.8, 0.3, 0.3], dtype=m.dtype)
    std_dev_t = (torch.sqrt(sigma / (1 - sigma.clamp(0, 0.99))) * 0.7).view(T, B, *[1] * len(rest))
    logp = plain.awm_logp(v.flatten(0, 1), target, sigma).view(T, B)
    policy = plain.awm_policy_loss(logp.mean(0), logp.mean(0).detach() + 1e-3 * m.randn(B), m.randn(B), 1.0)
    kl_rows = plain.velocity_kl(v.flatten(0, 1), v_ref.flatten(0, 1))
    if kl_weight == "ELBO":
        kl_rows = kl_rows / (2 * std_dev_t.flatten() ** 2)
    ema_kl = plain.velocity_kl(v.flatten(0, 1), v_ema.flatten(0, 1)).mean()
    authors = policy + beta * kl_rows.mean() + ema_beta * ema_kl
    cfg = SimpleNamespace(train=SimpleNamespace(beta=beta, ema_beta=ema_beta, kl_weight=kl_weight))
    ns = dict(model_output=v, model_output_ref=v_ref, std_dev_t=std_dev_t, config=cfg, policy_loss=policy,
              ema_kl_loss=ema_kl, info=defaultdict(list))
    return ns, [v], authors, (lambda ns: ns["loss"]), (v.flatten(0, 1), v_ref.flatten(0, 1)), \
        ("info", "normguard_ratio")


def _trainer_self(guard, kl_beta):
    """The attributes of a Flow-Factory trainer that the recipes read."""
    return SimpleNamespace(adapter=SimpleNamespace(trajectory_component_order=["latents"]),
                           training_args=SimpleNamespace(kl_beta=kl_beta), kl_beta=kl_beta, normguard=guard)


def _state(x):
    return SimpleNamespace(components={"latents": x})


def case_flow_factory_nft(m, rest):
    kl_beta = 0.04
    v, v_ref, policy, authors = _nft_case(m, rest, [0.5, 0.2], kl_beta)
    ns = dict(new_velocity=_state(v), ref_velocity=_state(v_ref), loss=policy, loss_info=defaultdict(list),
              self=("trainer", kl_beta))
    return ns, [v], authors, (lambda ns: ns["loss"]), (v, v_ref), ("loss_info", "normguard_ratio")


def case_flow_factory_awm(m, rest):
    B, kl_beta, ema_kl_beta = 2, 0.04, 0.5
    v, v_ref = m.pair(B, rest)
    v.requires_grad_()
    v_ema = v_ref * 1.05 + 0.02 * m.randn(B, *rest)
    sigma = torch.tensor([0.7, 0.3], dtype=m.dtype)
    logp = plain.awm_logp(v, m.randn(B, *rest), sigma)
    policy = plain.awm_policy_loss(logp, logp.detach() + 1e-3 * m.randn(B), m.randn(B), 1.0)
    ema_term = ema_kl_beta * plain.velocity_kl(v, v_ema).mean()
    authors = policy + kl_beta * plain.velocity_kl(v, v_ref).mean() + ema_term
    ns = dict(velocity=_state(v), ref_velocity=_state(v_ref), loss=policy, loss_info=defaultdict(list),
              self=("trainer", kl_beta))
    # step 5 (the EMA KL) follows the recipe's step 4 unchanged
    return ns, [v], authors, (lambda ns: ns["loss"] + ema_term), (v, v_ref), ("loss_info", "normguard_ratio")


def case_flow_factory_dpo(m, rest):
    B = 2
    v, v_ref = m.pair(2 * B, rest)
    v.requires_grad_()
    target = m.randn(2 * B, *rest)
    loss = plain.dpo_loss(v, v_ref, target, beta=100.0)
    ns = dict(theta_w_pred=_state(v[:B]), theta_l_pred=_state(v[B:]), ref_w_pred=_state(v_ref[:B]),
              ref_l_pred=_state(v_ref[B:]), loss=loss, loss_info=defaultdict(list), self=("trainer", 0.0))
    return ns, [v], loss, (lambda ns: ns["loss"]), (v, v_ref), ("loss_info", "normguard_ratio")


CASES = {  # recipe name -> (builder, model family)
    "flow_grpo-grpo": (case_flow_grpo_grpo, "sd3"),
    "flow_grpo-dpo": (case_flow_grpo_dpo, "sd3"),
    "diffusionnft": (case_diffusionnft, "sd3"),
    "awm": (lambda m, rest: _case_awm(m, rest, "Uniform"), "sd3"),
    "awm-elbo": (lambda m, rest: _case_awm(m, rest, "ELBO"), "sd3"),
    "flow-factory-nft": (case_flow_factory_nft, "flux"),
    "flow-factory-awm": (case_flow_factory_awm, "flux"),
    "flow-factory-dpo": (case_flow_factory_dpo, "flux"),
}


def test_every_recipe_of_the_doc_is_tested():
    names = set(recipes())
    assert names == {n for n in CASES if n != "awm-elbo"}, names


def run_recipe(name, form, dtype, size):
    builder, family = CASES[name]
    m = Maker(seed=sorted(CASES).index(name), dtype=dtype)
    ns, leaves, authors, finish, (v, v_ref), (box, key) = builder(m, SHAPES[family, size])
    guard = ngkernels.NormGuard(return_stats=True, **form)
    ns["guard"] = guard
    if "self" in ns:
        ns["self"] = _trainer_self(guard, ns["self"][1])
    ns.update(torch=torch, ngkernels=ngkernels)
    exec(compile(recipes()[name.replace("-elbo", "")], f"{DOC.name}:{name}", "exec"), ns)
    total = finish(ns)

    # the oracle: the authors' loss + ng_lambda * mean_i hinge_i, all in float64 math
    expected = authors + form["ng_lambda"] * plain.hinge(v, v_ref.to(v.dtype), **_hinge_opts(form)).mean()
    # the oracle's backward first, keeping the shared graph; then the recipe's, once, as a trainer runs it (the
    # torch backend compiles its CPU path for large rows, and a compiled backward may not be retained)
    exp_grads = torch.autograd.grad(expected, leaves, retain_graph=True)
    got_grads = torch.autograd.grad(total, leaves)
    logged = ns[box][key]
    logged = logged[-1] if isinstance(logged, list) else logged
    ratio = (v.detach().flatten(1).double().norm(dim=1) / v_ref.flatten(1).double().norm(dim=1)).mean()
    return total, expected, got_grads, exp_grads, logged, ratio, guard, v.shape[0]


@pytest.mark.parametrize("form", FORMS, ids=FORMS.keys())
@pytest.mark.parametrize("name", CASES, ids=CASES.keys())
def test_recipe_equals_authors_loss_plus_hinge_float64(monkeypatch, name, form):
    monkeypatch.setenv("NGKERNELS_BACKEND", "torch")
    total, expected, got, exp, logged, ratio, guard, rows = run_recipe(name, FORMS[form], F64, "full")
    assert total.dtype == F64
    torch.testing.assert_close(total, expected, rtol=1e-10, atol=1e-12)
    for a, b in zip(got, exp):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12 * b.abs().max().item())
    torch.testing.assert_close(logged.double(), ratio, rtol=1e-10, atol=0)
    assert guard._acc[2].item() == rows  # the guarded rows entered the step's statistics once


@pytest.mark.parametrize("name", CASES, ids=CASES.keys())
def test_recipe_on_triton_kernels_float32(monkeypatch, name):
    monkeypatch.setenv("NGKERNELS_BACKEND", "triton")
    form = FORMS["token-squared-margin"] if "dpo" in name else FORMS["sample-relative"]
    total, expected, got, exp, logged, ratio, _, _ = run_recipe(name, form, torch.float32, "small")
    torch.testing.assert_close(total.double(), expected.double(), rtol=2e-5, atol=1e-6)
    for a, b in zip(got, exp):
        torch.testing.assert_close(a.double(), b.double(), rtol=2e-4, atol=2e-5 * b.abs().max().item())
    torch.testing.assert_close(logged.double(), ratio, rtol=1e-5, atol=0)


def test_grpo_kl_on_step_means_is_a_weighted_velocity_mse(monkeypatch):
    """The doc's remark on flow_grpo's KL: beta * mean((mu - mu_ref)^2) / (2 std_dev_t^2) equals the fused op's
    weighted MSE against v_ref with weight beta * c^2 / (2 std_dev_t^2), c = (1 + std^2 (1 - s) / (2 s)) dt."""
    monkeypatch.setenv("NGKERNELS_BACKEND", "torch")
    m = Maker(seed=11, dtype=F64)
    v, v_ref = m.pair(2, (16, 64, 64))
    x, x_next = m.randn(2, 16, 64, 64), m.randn(2, 16, 64, 64)
    sigma, sigma_next = torch.tensor([0.7, 0.4], dtype=F64), torch.tensor([0.6, 0.3], dtype=F64)
    mean, std_dev_t, _ = plain.sde_step_mean_logprob(v, x, x_next, sigma, sigma_next, 0.7)
    mean_ref, _, _ = plain.sde_step_mean_logprob(v_ref, x, x_next, sigma, sigma_next, 0.7)
    kl = 0.04 * (plain.sample_mean((mean - mean_ref) ** 2) / (2 * std_dev_t.flatten() ** 2)).mean()
    std = torch.sqrt(sigma / (1 - sigma)) * 0.7
    c = (1 + std ** 2 * (1 - sigma) / (2 * sigma)) * (sigma_next - sigma)
    fused = ngkernels.flow_matching_loss(v, v_ref, weight=0.04 * c ** 2 / (2 * std_dev_t.flatten() ** 2))
    torch.testing.assert_close(fused, kl, rtol=1e-10, atol=0)
