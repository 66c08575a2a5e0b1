"""Each method on a fixed batch of a tiny toy model: one optimizer step changes the LoRA weights and lowers the
method's own loss; NormGuard changes the gradient only where ||v|| exceeds ||v_ref||; per-token norms."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from training.config import load_config
from training.methods import build_method
from training.methods.base import TrainBatch, reference_terms
from training.models.toy import ToyFlowModel
from training.toy.data import CAPTIONS, render

SMALL_TOY = ["model.toy.num_layers=1", "finetune.lora_r=4"]


def make(method: str, *overrides):
    cfg = load_config(overrides=[*SMALL_TOY, f"method.name={method}", *overrides])
    torch.manual_seed(0)
    model = ToyFlowModel(cfg.model.toy)
    model.configure_finetuning("lora", lora_r=cfg.finetune.lora_r, lora_alpha=cfg.finetune.lora_alpha)
    m = build_method(cfg)
    m.setup(model)
    return cfg, model, m


def fixed_batch(model, slots_per_item=1, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    captions = [CAPTIONS[i] for i in torch.randint(len(CAPTIONS), (n // slots_per_item,), generator=g).tolist()]
    captions = [c for c in captions for _ in range(slots_per_item)]
    x0 = render(captions, model.latent_shape[-1], g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    if slots_per_item == 2:  # winner and loser share noise and sigma
        noise = noise[::2].repeat_interleave(2, 0)
    sigma = torch.rand(n // slots_per_item, generator=g).repeat_interleave(slots_per_item) * 0.8 + 0.1
    adv = torch.linspace(-2, 2, n)
    with torch.no_grad():
        cond = model.encode_prompts(captions)
    return TrainBatch(x0, noise, sigma, cond, adv, slots_per_item=slots_per_item)


def perturb_lora(model, scale=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_trainable_parameters():
            if "lora_B" in name:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def lora_state(model):
    return {n: p.detach().clone() for n, p in model.named_trainable_parameters()}


@pytest.mark.parametrize("method, extra", [
    ("nft", []), ("nft", ["method.nft.loss_form=velocity"]), ("awm", []), ("dpo", []),
    ("dpo", ["method.dpo.ref_update_every=2"]),
    ("nft", ["normguard.ng_lambda=1.0", "normguard.per_token=true"]),
    ("awm", ["normguard.ng_lambda=1.0", "normguard.relative=true", "normguard.squared=true"]),
    ("dpo", ["normguard.ng_lambda=1.0"]),
])
def test_one_step_changes_lora_and_lowers_the_loss(method, extra):
    cfg, model, m = make(method, *extra)
    if cfg.normguard.ng_lambda:
        perturb_lora(model)  # off the hinge's kink at v == v_ref, where the loss is not differentiable
    batch = fixed_batch(model, m.slots_per_item)
    if method == "awm":  # the ratio needs a fixed old log-likelihood to move away from 1
        batch = dataclasses.replace(batch, logp_old=m.log_prob(model.velocity(batch.x_t, batch.sigma, batch.cond),
                                                                batch).detach())
    before = lora_state(model)
    out = m.loss(batch, model.velocity, model)
    assert out.loss.shape == (batch.x0.shape[0] // m.slots_per_item,)
    assert set(out.terms) == set(m.term_names)
    out.loss.mean().backward()
    grad_norm = torch.cat([p.grad.flatten() for p in model.trainable_parameters()]).norm()
    assert grad_norm > 0
    torch.optim.SGD(model.trainable_parameters(), lr=1e-3 / grad_norm.item()).step()  # a short descent step
    after = lora_state(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        new = m.loss(batch, model.velocity, model).loss.mean()
    assert new < out.loss.mean().detach()


def test_extra_policies_equal_the_reference_at_init_then_diverge():
    _, model, _ = make("nft")
    batch = fixed_batch(model)
    with torch.no_grad():
        v = model.velocity(batch.x_t, batch.sigma, batch.cond)
        with model.reference():
            v_ref = model.velocity(batch.x_t, batch.sigma, batch.cond)
        with model.use_adapter("old"):
            v_old = model.velocity(batch.x_t, batch.sigma, batch.cond)
    assert torch.equal(v, v_ref) and torch.equal(v, v_old)  # peft gaussian init: lora_B = 0
    perturb_lora(model)
    with torch.no_grad():
        v = model.velocity(batch.x_t, batch.sigma, batch.cond)
        with model.use_adapter("old"):
            v_old2 = model.velocity(batch.x_t, batch.sigma, batch.cond)
    assert not torch.allclose(v, v_ref) and torch.equal(v_old2, v_old)
    model.ema_update("old", decay=0.0)  # old <- theta
    with torch.no_grad(), model.use_adapter("old"):
        assert torch.allclose(model.velocity(batch.x_t, batch.sigma, batch.cond), v)
    # only the trained adapter requires grad after switching policies
    trained = {id(p) for p in model.trainable_parameters()}
    assert all(p.requires_grad == (id(p) in trained) for p in model.parameters())


def test_full_finetuning_uses_a_frozen_reference_copy():
    cfg = load_config(overrides=SMALL_TOY)
    model = ToyFlowModel(cfg.model.toy)
    model.configure_finetuning("full")
    model.add_adapter("ema")
    batch = fixed_batch(model)
    with torch.no_grad():
        for p in model.transformer.parameters():
            p.add_(0.01)
        v = model.velocity(batch.x_t, batch.sigma, batch.cond)
        with model.reference():
            v_ref = model.velocity(batch.x_t, batch.sigma, batch.cond)
        with model.use_adapter("ema"):
            v_ema = model.velocity(batch.x_t, batch.sigma, batch.cond)
    assert not torch.allclose(v, v_ref) and torch.equal(v_ref, v_ema)
    assert all(not p.requires_grad for p in model.frozen_copies.parameters())


def _grads(model, m, batch):
    model.zero_grad(set_to_none=True)
    m.loss(batch, model.velocity, model).loss.mean().backward()
    return torch.cat([p.grad.flatten() for p in model.trainable_parameters()])


@pytest.mark.parametrize("method", ["nft", "awm", "dpo"])
def test_normguard_changes_lora_gradients_only_when_the_norm_exceeds_the_reference(method):
    grads = {}
    for lam, margin, perturb in [(0.0, 0.0, False), (1.0, 0.0, False), (0.0, 0.0, True), (1.0, 5.0, True),
                                 (1.0, -0.5, True)]:
        _, model, m = make(method, f"normguard.ng_lambda={lam}", f"normguard.margin={margin}")
        if perturb:
            perturb_lora(model)
        grads[lam, margin, perturb] = _grads(model, m, fixed_batch(model, m.slots_per_item))
    # at init v == v_ref: the hinge sits at its kink and adds no gradient
    assert torch.equal(grads[1.0, 0.0, False], grads[0.0, 0.0, False])
    # perturbed: below a far margin nothing changes; above a low one the gradient changes
    assert torch.allclose(grads[1.0, 5.0, True], grads[0.0, 0.0, True], atol=1e-7, rtol=0)
    assert not torch.allclose(grads[1.0, -0.5, True], grads[0.0, 0.0, True], atol=1e-5)


@pytest.mark.parametrize("method", ["nft", "awm", "dpo"])
def test_normguard_gradient_per_sample(method):
    """With v a leaf scaled around v_ref row by row, only the rows with ||v|| > ||v_ref|| get a different gradient."""
    _, model, m0 = make(method)
    _, _, m1 = make(method, "normguard.ng_lambda=1.0")
    batch = fixed_batch(model, m0.slots_per_item)
    with torch.no_grad(), model.reference():
        v_ref = model.velocity(batch.x_t, batch.sigma, batch.cond)
    scale = torch.tensor([0.9, 1.1, 0.95, 1.2, 1.05, 0.8, 1.15, 0.99])
    grads = []
    for m in (m0, m1):
        v = (v_ref * scale[:, None, None, None]).requires_grad_(True)
        leaf = lambda x, s, c, v=v: v if torch.is_grad_enabled() else model.velocity(x, s, c)  # noqa: E731
        m.loss(batch, leaf, model).loss.sum().backward()
        grads.append(v.grad.flatten(1))
    differs = (grads[0] - grads[1]).abs().amax(1) > 1e-7
    assert differs.tolist() == (scale > 1).tolist()


def test_per_token_norms_recombine_to_the_per_sample_norms():
    cfg, model, _ = make("nft", "normguard.per_token=true", "normguard.ng_lambda=0.5", "normguard.relative=false")
    v, v_ref = torch.randn(3, 3, 16, 16), torch.randn(3, 3, 16, 16)
    loss, kl, guard, v_norm, ref_norm = reference_terms(model, v, v_ref, cfg.normguard, kl_weight=2.0)
    assert torch.allclose(v_norm, v.flatten(1).norm(dim=1)) and torch.allclose(ref_norm, v_ref.flatten(1).norm(dim=1))
    mse = (v - v_ref).square().flatten(1).mean(1)
    assert torch.allclose(kl, 2.0 * mse)
    token_hinge = torch.relu(v.norm(dim=1) - v_ref.norm(dim=1)).flatten(1).mean(1)  # channel norm per pixel
    assert torch.allclose(guard, 0.5 * token_hinge, rtol=1e-5, atol=1e-6)
    assert torch.allclose(loss, 2.0 * mse + 0.5 * token_hinge, rtol=1e-5)


def test_dpo_items_are_best_and_worst_of_each_prompt():
    cfg, _, m = make("dpo")
    rewards = torch.tensor([0.1, 0.5, 0.3, 0.2, 0.2, 0.9, 0.0])
    prompt_ids = torch.tensor([4, 4, 4, 7, 7, 9, 9])
    items = m.make_items(rewards, torch.zeros(7), prompt_ids)
    assert [it.slots for it in items] == [(1, 0), (5, 6)]  # prompt 7 is a tie: no preference
