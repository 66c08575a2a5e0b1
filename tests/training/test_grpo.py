"""Flow-GRPO (training/methods/grpo.py): the SDE transition's Gaussian against the closed form, the on-policy ratio
(exactly 1 in float64; the measured bf16 / fp16 deviation), the clipped loss's gradient against the plain policy
gradient, the KL in mean space against autograd through the Gaussian, timestep_fraction, Flow-GRPO-Fast's window,
CFG with the unconditional branch detached, and whole runs on the toy and on tiny SD3 / FLUX pipelines."""

from __future__ import annotations

import math

import pytest
import torch

from training.config import load_config
from training.methods import build_method
from training.methods.base import Item
from training.methods.grpo import (GRPO, Trajectory, gaussian_log_prob, sample_sde_trajectory, sde_gaussian)
from training.models.toy import ToyFlowModel
from training.sampling import sample, sde_step, sigma_schedule
from training.toy.data import CAPTIONS

SMALL_TOY = ["model.toy.num_layers=1", "finetune.lora_r=4", "model.toy.image_size=8"]


def make(*overrides, dtype=torch.float32):
    cfg = load_config(overrides=[*SMALL_TOY, "method.name=grpo", "sampling.num_steps=5", "normguard.ng_lambda=0",
                                 *overrides])
    torch.manual_seed(0)
    model = ToyFlowModel(cfg.model.toy)
    model.configure_finetuning("lora", lora_r=cfg.finetune.lora_r, lora_alpha=cfg.finetune.lora_alpha)
    model.to(dtype)
    m = build_method(cfg)
    m.setup(model)
    return cfg, model, m


def perturb_lora(model, scale=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_trainable_parameters():
            if "lora_B" in name:
                p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * scale)


def encoder(model):
    def encode(prompts):
        with torch.no_grad():
            return model.encode_prompts(prompts)
    return encode


def rollout(cfg, model, m, n=6, seed=0, autocast=None):
    """The loop's rollout for n images (the trained policy, CFG if guidance_scale != 1) -> (trajectories, items)."""
    from training.sampling import policy_velocity

    g = torch.Generator().manual_seed(seed)
    prompts = [CAPTIONS[i] for i in torch.randint(len(CAPTIONS), (n,), generator=g).tolist()]
    dtype, device = next(model.parameters()).dtype, next(model.parameters()).device
    gens = [torch.Generator().manual_seed(seed * 100 + j) for j in range(n)]
    K = cfg.sampling.num_steps
    x1 = torch.stack([torch.randn(model.latent_shape, generator=gg, dtype=torch.float64) for gg in gens])
    x1 = x1.to(device, dtype)
    noise = torch.stack([torch.randn((K, *model.latent_shape), generator=gg, dtype=torch.float64) for gg in gens],
                        dim=1).to(device, dtype)
    encode = encoder(model)
    uncond = encode([""] * n) if cfg.sampling.guidance_scale != 1 else None
    velocity = policy_velocity(model, encode(prompts), cfg.sampling.guidance_scale, uncond)
    with torch.no_grad(), (autocast or torch.autocast("cpu", enabled=False)):
        x0, trajs = m.sample_rollout(velocity, x1, sigma_schedule(K, cfg.sampling.shift), noise, gens)
    adv = torch.linspace(-2, 2, n).tolist()
    return dict(enumerate(trajs)), [Item((j,), a) for j, a in enumerate(adv)], prompts, x0


def train_batch(m, trajs, items, prompts, model, seed=0):
    T = m.num_timesteps
    gens = [torch.Generator().manual_seed(seed * 1000 + j) for j in range(len(items))]
    rows = [prompts[it.slots[0]] for it in items for _ in range(T)]
    return m.transition_batch(items, trajs, gens, rows, encoder(model))


# ---------------------------------------------------------------------------------------------------------------
# the Gaussian transition

def test_log_prob_matches_the_closed_form_gaussian_on_a_linear_field():
    """v = a x + b: the transition x_k -> x_{k+1} is N(m, s^2 I) with m, s written out from the SDE by hand."""
    g = torch.Generator().manual_seed(0)
    B, eta, sigma_max = 4, 0.7, 0.9
    x = torch.randn(B, 3, 4, 4, generator=g, dtype=torch.float64)
    a, b = -0.6, torch.randn(1, 3, 4, 4, generator=g, dtype=torch.float64)
    v = a * x + b
    sigma = torch.tensor([1.0, 0.8, 0.5, 0.2], dtype=torch.float64)
    sigma_next = torch.tensor([0.8, 0.5, 0.2, 0.05], dtype=torch.float64)
    x_next = torch.randn(B, 3, 4, 4, generator=g, dtype=torch.float64)
    mean, scale, std, v_coef = sde_gaussian(x, v, sigma, sigma_next, sigma_max, eta)
    for i in range(B):
        s, dt = sigma[i].item(), (sigma_next[i] - sigma[i]).item()
        std_i = math.sqrt(s / (1 - (sigma_max if s == 1 else s))) * eta
        m_i = x[i] * (1 + std_i ** 2 / (2 * s) * dt) + v[i] * (1 + std_i ** 2 * (1 - s) / (2 * s)) * dt
        s_i = std_i * math.sqrt(-dt)
        expected = torch.distributions.Normal(m_i, s_i).log_prob(x_next[i]).mean()
        torch.testing.assert_close(mean[i], m_i, rtol=1e-14, atol=1e-14)
        assert scale[i].item() == pytest.approx(s_i, rel=1e-14) and std[i].item() == pytest.approx(std_i, rel=1e-14)
        lp = gaussian_log_prob(x_next[i:i + 1], mean[i:i + 1], scale[i:i + 1])
        assert lp.item() == pytest.approx(expected.item(), rel=1e-13)
    # the step the shared sampler takes is the same Gaussian's draw
    xi = torch.randn(3, 4, 4, generator=g, dtype=torch.float64)
    for i in range(B):
        step = sde_step(x[i:i + 1], v[i:i + 1], sigma[i].item(), sigma_next[i].item(), sigma_max, eta, xi)
        torch.testing.assert_close(step[0], mean[i] + scale[i] * xi, rtol=1e-13, atol=1e-13)
    # noise_level 0 is the Euler step
    mean0, scale0, _, _ = sde_gaussian(x, v, sigma, sigma_next, sigma_max, 0.0)
    torch.testing.assert_close(mean0, x + (sigma_next - sigma).view(-1, 1, 1, 1) * v, rtol=1e-14, atol=1e-14)
    assert torch.all(scale0 == 0)


def test_trajectory_sampler_is_the_shared_sde_and_ode_sampler():
    g = torch.Generator().manual_seed(1)
    x1 = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    sigmas = sigma_schedule(6, 3.0).double()
    noise = torch.randn(6, 3, 2, 4, 4, generator=g, dtype=torch.float64)
    field = lambda x, s: -0.5 * x + s.view(-1, 1, 1, 1)  # noqa: E731
    every = torch.ones(6, 3, dtype=torch.bool)
    x0, states, logp = sample_sde_trajectory(field, x1, sigmas, 0.7, noise, every)
    torch.testing.assert_close(x0, sample(field, x1, sigmas, "sde", 0.7, noise), rtol=1e-13, atol=1e-13)
    assert torch.equal(states[0], x1) and states.shape == (6, 3, 2, 4, 4) and logp.dtype == torch.float64
    assert torch.all(logp[:-1] != 0) and torch.all(logp[-1] == 0)  # the last step is Euler: no log-prob
    for k in range(5):  # each recorded log-prob is the Gaussian's at the recorded states
        nxt = states[k + 1]
        mean, scale, _, _ = sde_gaussian(states[k], field(states[k], sigmas[k].expand(3)), sigmas[k].item(),
                                         sigmas[k + 1].item(), sigmas[1].item(), 0.7)
        torch.testing.assert_close(logp[k], gaussian_log_prob(nxt, mean, scale), rtol=0, atol=0)
    x0_ode, _, logp_ode = sample_sde_trajectory(field, x1, sigmas, 0.7, noise, torch.zeros(6, 3, dtype=torch.bool))
    torch.testing.assert_close(x0_ode, sample(field, x1, sigmas, "ode"), rtol=1e-13, atol=1e-13)
    assert torch.all(logp_ode == 0)
    with pytest.raises(ValueError, match="step_noise must be"):
        sample_sde_trajectory(field, x1, sigmas, 0.7, noise[:5], every)


# ---------------------------------------------------------------------------------------------------------------
# ratio, policy gradient, KL

def test_on_policy_ratio_is_exactly_one_in_float64_and_the_clipped_gradient_is_the_policy_gradient():
    cfg, model, m = make("method.grpo.kl_beta=0", dtype=torch.float64)
    perturb_lora(model)
    trajs, items, prompts, _ = rollout(cfg, model, m)
    batch = train_batch(m, trajs, items, prompts, model)
    assert batch.x_t.dtype == torch.float64 and batch.logp_old.dtype == torch.float64
    out = m.loss(batch, model.velocity, model)
    ratio = out.extras["ratio"]
    assert torch.equal(ratio, torch.ones_like(ratio))  # bit for bit: the same function on the same numbers
    assert torch.all(out.terms["ratio_dev"] == 0) and torch.all(out.terms["clip_frac"] == 0)
    model.zero_grad(set_to_none=True)
    out.loss.sum().backward()
    clipped = torch.cat([p.grad.flatten() for p in model.trainable_parameters()])
    model.zero_grad(set_to_none=True)
    v = m.policy_velocity(model.velocity, batch)
    logp, _, _ = m.log_prob(v, batch)
    (-(batch.advantages.double() * logp)).sum().backward()  # REINFORCE: -A grad log p
    plain = torch.cat([p.grad.flatten() for p in model.trainable_parameters()])
    assert clipped.abs().max() > 0
    torch.testing.assert_close(clipped, plain, rtol=1e-12, atol=1e-15)


def test_off_policy_ratios_are_clipped():
    cfg, model, m = make("method.grpo.kl_beta=0", "method.grpo.clip_range=0.01", dtype=torch.float64)
    trajs, items, prompts, _ = rollout(cfg, model, m)
    perturb_lora(model, scale=0.5)  # the policy moved since the rollout
    batch = train_batch(m, trajs, items, prompts, model)
    out = m.loss(batch, model.velocity, model)
    ratio, adv = out.extras["ratio"], batch.advantages.double()
    expected = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.99, 1.01))
    torch.testing.assert_close(out.terms["policy"].double(), expected)
    assert 0 < out.terms["clip_frac"].mean() <= 1
    torch.testing.assert_close(out.terms["clip_frac"], ((ratio - 1).abs() > 0.01).double())


def test_kl_is_zero_at_lora_init_and_its_gradient_is_the_gaussians():
    cfg, model, m = make("method.grpo.kl_beta=0.04", dtype=torch.float64)
    trajs, items, prompts, _ = rollout(cfg, model, m)
    batch = train_batch(m, trajs, items, prompts, model)
    out = m.loss(batch, model.velocity, model)
    assert torch.all(out.terms["kl"] == 0)  # peft's init: v_theta == v_ref
    with torch.no_grad(), model.reference():
        v_ref = model.velocity(batch.x_t, batch.sigma, batch.cond)
    # a leaf velocity off the reference: the KL's gradient against autograd through the two Gaussians' means
    g = torch.Generator().manual_seed(3)
    v = (v_ref + 0.1 * torch.randn(v_ref.shape, generator=g, dtype=torch.float64)).requires_grad_(True)
    leaf = lambda x, s, c: v if torch.is_grad_enabled() else model.velocity(x, s, c)  # noqa: E731
    batch.advantages.zero_()  # no policy gradient: what is left is the KL's
    out = m.loss(batch, leaf, model)
    (grad,) = torch.autograd.grad(out.loss.sum(), v)
    v2 = v.detach().clone().requires_grad_(True)
    mu, _, std, _ = sde_gaussian(batch.x_t, v2, batch.sigma, batch.sigma_next, m.sigma_max, cfg.sampling.noise_level)
    mu_ref, _, _, _ = sde_gaussian(batch.x_t, v_ref, batch.sigma, batch.sigma_next, m.sigma_max,
                                   cfg.sampling.noise_level)
    kl = 0.04 * (mu - mu_ref).square().flatten(1).mean(1) / (2 * std ** 2)
    (expected,) = torch.autograd.grad(kl.sum(), v2)
    torch.testing.assert_close(out.terms["kl"], kl.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-18)


def test_normguard_rides_the_same_call_and_bites_only_above_the_reference_norm():
    cfg, model, m = make("method.grpo.kl_beta=0", "normguard.ng_lambda=1.0", dtype=torch.float64)
    trajs, items, prompts, _ = rollout(cfg, model, m)
    batch = train_batch(m, trajs, items, prompts, model)
    with torch.no_grad(), model.reference():
        v_ref = model.velocity(batch.x_t, batch.sigma, batch.cond)
    scale = torch.linspace(0.8, 1.2, v_ref.shape[0], dtype=torch.float64)
    v = (v_ref * scale.view(-1, 1, 1, 1)).requires_grad_(True)
    leaf = lambda x, s, c: v if torch.is_grad_enabled() else model.velocity(x, s, c)  # noqa: E731
    out = m.loss(batch, leaf, model)
    assert torch.all((out.terms["normguard"] > 0) == (scale > 1))
    torch.testing.assert_close(out.v_norm / out.ref_norm, scale)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # on a GPU machine both are measured


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", ["float32", "bfloat16", "float16"])
def test_on_policy_ratio_deviation_under_autocast(precision, device):
    """The rollout (16 images batched per sampling step) and the loss (rows of mixed steps) compute the same
    log-probability in their own numerics; the on-policy |ratio - 1| is measured with both under the same autocast
    (what the loop does) and with the loss in float32 after an autocast rollout (a precision mismatch). Printed
    with -s and reported in training/README.md."""
    cfg, model, m = make("method.grpo.kl_beta=0", "sampling.num_steps=8")
    perturb_lora(model)
    model.to(device)
    ac = lambda: torch.autocast(device, dtype=getattr(torch, precision), enabled=precision != "float32")  # noqa: E731
    trajs, items, prompts, _ = rollout(cfg, model, m, n=16, autocast=ac())
    batch = train_batch(m, trajs, items, prompts, model)
    with ac():
        same = (m.loss(batch, model.velocity, model).extras["ratio"] - 1).abs()
    mismatch = (m.loss(batch, model.velocity, model).extras["ratio"] - 1).abs()
    print(f"\n{device} {precision}: on-policy |ratio - 1| same autocast: mean {same.mean():.3g} max {same.max():.3g};"
          f" loss in float32: mean {mismatch.mean():.3g} max {mismatch.max():.3g} ({same.numel()} rows)")
    if precision == "float32":  # (CUDA convolutions may run in TF32, whose rounding depends on the batch shape)
        assert same.max() < (1e-6 if device == "cpu" else 1e-3) and mismatch.max() < (1e-6 if device == "cpu" else 1e-3)
    else:
        assert same.max() < 1e-2  # the loop's case: bounded (exactly 0 on CPU, whose kernels are batch-invariant)
        assert mismatch.max() > 1e-6  # mixing precisions between rollout and loss is visible at PPO's clip scale


# ---------------------------------------------------------------------------------------------------------------
# which transitions are trained

def test_timestep_fraction_picks_distinct_transitions_of_each_trajectory():
    cfg, model, m = make("method.grpo.timestep_fraction=0.5", "sampling.num_steps=7")
    assert m.stochastic_steps == 6 and m.num_timesteps == 3
    trajs, items, prompts, _ = rollout(cfg, model, m)
    assert all(t.start == 0 and t.n == 6 and t.states.shape[0] == 7 for t in trajs.values())
    batch = train_batch(m, trajs, items, prompts, model)
    sigmas = sigma_schedule(7)
    k = torch.searchsorted(-sigmas, -batch.sigma)  # descending grid: the step index of each row
    assert torch.equal(sigmas[k], batch.sigma) and torch.equal(sigmas[k + 1], batch.sigma_next)
    for i, item in enumerate(items):
        rows = k[i * 3:(i + 1) * 3]
        assert len(set(rows.tolist())) == 3 and rows.max() < 6
        traj = trajs[item.slots[0]]
        assert torch.equal(batch.x_t[i * 3:(i + 1) * 3], traj.states[rows])
        assert torch.equal(batch.x_next[i * 3:(i + 1) * 3], traj.states[rows + 1])
        assert torch.equal(batch.logp_old[i * 3:(i + 1) * 3], traj.log_probs[rows])
    assert make("sampling.num_steps=10")[2].num_timesteps == 9  # the authors' 0.99: every stochastic step
    assert make("method.grpo.num_timesteps=2")[2].num_timesteps == 2
    with pytest.raises(ValueError, match="num_timesteps \\(9\\) exceeds"):
        make("method.grpo.num_timesteps=9")


def test_fast_window_is_the_only_stochastic_and_trained_part():
    cfg, model, m = make("method.grpo.sde_window=2", "sampling.num_steps=8")
    assert m.window_end == 4 and m.num_timesteps == 2
    trajs, items, prompts, x0 = rollout(cfg, model, m, n=8)
    starts = [t.start for t in trajs.values()]
    assert all(0 <= s <= 2 for s in starts) and len(set(starts)) > 1  # per image, from its own generator
    assert all(t.n == 2 and t.states.shape[0] == 3 and torch.all(t.log_probs != 0) for t in trajs.values())
    # outside the window the sampler is the ODE: another draw of the noise there changes nothing
    K, n = 8, 8
    gens = lambda: [torch.Generator().manual_seed(j) for j in range(n)]  # noqa: E731
    x1 = torch.stack([torch.randn(model.latent_shape, generator=g) for g in gens()])
    noise = torch.randn(K, n, *model.latent_shape, generator=torch.Generator().manual_seed(9))
    encode = encoder(model)
    cond = encode(["a red circle on the left"] * n)
    vel = lambda x, s: model.velocity(x, s, cond)  # noqa: E731
    sig = sigma_schedule(K)
    with torch.no_grad():
        xa, ta = m.sample_rollout(vel, x1, sig, noise, gens())
        inside = torch.zeros(K, n, dtype=torch.bool)
        for b, t in enumerate(ta):
            inside[t.start:t.start + 2, b] = True
        other = torch.where(inside.view(K, n, 1, 1, 1), noise, torch.randn_like(noise))
        xb, _ = m.sample_rollout(vel, x1, sig, other, gens())
        xc, _ = m.sample_rollout(vel, x1, sig, torch.where(inside.view(K, n, 1, 1, 1), -noise, noise), gens())
    torch.testing.assert_close(xa, xb, rtol=0, atol=0)
    assert (xa - xc).flatten(1).abs().amax(1).min() > 1e-3  # and inside it matters, for every image
    with pytest.raises(ValueError, match="sde_window \\(8\\) exceeds"):
        make("method.grpo.sde_window=8", "sampling.num_steps=8")
    with pytest.raises(ValueError, match="noise_level > 0"):
        make("sampling.noise_level=0")
    with pytest.raises(ValueError, match="rescale_to_reference"):
        make("sampling.rescale_to_reference=true")


def test_cfg_training_velocity_detaches_the_unconditional_branch():
    cfg, model, m = make("sampling.guidance_scale=3.0", dtype=torch.float64)
    perturb_lora(model)
    trajs, items, prompts, _ = rollout(cfg, model, m, n=4)
    batch = train_batch(m, trajs, items, prompts, model)
    assert batch.uncond is not None
    n = batch.x_t.shape[0]
    v_c = torch.randn(n, *model.latent_shape, dtype=torch.float64, requires_grad=True)
    v_u = torch.randn(n, *model.latent_shape, dtype=torch.float64, requires_grad=True)
    fake = lambda x, s, c: v_c if c is batch.cond else v_u  # noqa: E731
    v = m.policy_velocity(fake, batch)
    torch.testing.assert_close(v, v_u + 3.0 * (v_c - v_u))
    v.sum().backward()
    assert v_u.grad is None and torch.all(v_c.grad == 3.0)
    # on-policy against the CFG rollout (one batched cond+uncond forward there, two forwards here): ratio ~ 1
    out = m.loss(batch, model.velocity, model)
    assert (out.extras["ratio"] - 1).abs().max() < 1e-12


def test_one_descent_step_lowers_the_loss():
    cfg, model, m = make("method.grpo.clip_range=10", "normguard.ng_lambda=0.5", dtype=torch.float64)
    trajs, items, prompts, _ = rollout(cfg, model, m)
    perturb_lora(model)
    batch = train_batch(m, trajs, items, prompts, model)
    out = m.loss(batch, model.velocity, model)
    assert set(out.terms) == set(m.term_names) and out.loss.shape == (len(items) * m.num_timesteps,)
    out.loss.mean().backward()
    grad_norm = torch.cat([p.grad.flatten() for p in model.trainable_parameters()]).norm()
    torch.optim.SGD(model.trainable_parameters(), lr=1e-3 / grad_norm.item()).step()
    with torch.no_grad():
        assert m.loss(batch, model.velocity, model).loss.mean() < out.loss.mean().detach()


def test_memory_kept_per_image():
    """Flow-GRPO keeps num_steps latents per image (states x_0..x_{K-1}); Fast keeps window + 1."""
    cfg, model, m = make("sampling.num_steps=10")
    trajs, *_ = rollout(cfg, model, m, n=2)
    assert all(isinstance(t, Trajectory) and t.states.shape == (10, *model.latent_shape) for t in trajs.values())
    # each its own storage, not a view that keeps the whole batch's states alive
    assert all(t.states.untyped_storage().nbytes() == t.states.numel() * 4 for t in trajs.values())
    cfg, model, m = make("sampling.num_steps=10", "method.grpo.sde_window=2")
    trajs, *_ = rollout(cfg, model, m, n=2)
    assert all(t.states.shape == (3, *model.latent_shape) for t in trajs.values())


# ---------------------------------------------------------------------------------------------------------------
# whole runs

def test_toy_run_logs_grpo_terms(toy_cfg):
    from training.loop import Trainer
    from training.tracking import read_csv

    cfg = toy_cfg("method.name=grpo", "train.batch_size=16", "sampling.guidance_scale=2.0")
    trainer = Trainer(cfg)
    assert isinstance(trainer.method, GRPO)
    summary = trainer.run()
    rows = read_csv(cfg.run_dir / "metrics.csv")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert math.isfinite(r["loss"]) and r["skipped_updates"] == 0 and 0.5 < r["norm_ratio"] < 2
        assert r["ratio_dev"] < 1e-3  # one update per step: the only micro-batch is on-policy
    assert rows[0]["kl"] == 0.0 and rows[0]["clip_frac"] == 0.0
    assert (summary.checkpoint / "model.safetensors").is_file()


@pytest.mark.parametrize("kind, extra", [("sd3", ["sampling.guidance_scale=2.0", "model.dtype=bfloat16",
                                                  "train.mixed_precision=bf16"]),
                                         ("flux", ["method.grpo.sde_window=1", "sampling.num_steps=3"])])
def test_one_step_on_a_tiny_pipeline(kind, extra, tmp_path):
    import csv

    from tests.training.tiny_pipelines import save_tiny_clip_scorer, save_tiny_flux_pipeline, save_tiny_sd3_pipeline
    from training.loop import Trainer

    path = (save_tiny_sd3_pipeline if kind == "sd3" else save_tiny_flux_pipeline)(tmp_path / kind)
    clip = save_tiny_clip_scorer(tmp_path / "pickscore")
    cfg = load_config(overrides=[
        f"model.type={kind}", f"model.path={path}", "model.resolution=32", "model.max_sequence_length=8",
        "model.free_text_encoders=true", "rollout.prompts=[a red cat, a blue dog]", "rollout.prompts_per_step=2",
        "rollout.group_size=2", "rollout.batch_size=4", "sampling.num_steps=2", "sampling.shift=3.0",
        "reward.name=pickscore", f"reward.kwargs={{path: {clip}}}", "method.name=grpo", "normguard.ng_lambda=0.1",
        "train.steps=1", "train.batch_size=4", "eval.num_prompts=2", "eval.samples_per_prompt=1",
        f"log.output_dir={tmp_path}", "log.run_name=run", "log.progress=false", *extra])
    trainer = Trainer(cfg)
    before = {n: p.detach().clone() for n, p in trainer.model.named_trainable_parameters()}
    summary = trainer.run()
    changed = [n for n, p in trainer.model.named_trainable_parameters() if not torch.equal(before[n], p)]
    assert len(changed) >= len(before) - 2  # SD3's dead last-block context query may stay put
    with open(summary.csv) as f:
        (row,) = [r for r in csv.DictReader(f) if r["step"] == "1"]
    assert math.isfinite(float(row["loss"])) and math.isfinite(float(row["norm_ratio"]))
    assert float(row["ratio_dev"]) < 1e-3 and float(row["skipped_updates"]) == 0


def test_shipped_grpo_configs_load(tmp_path):
    """The toy GRPO config and the SD3.5-M one with the authors' pickscore_sd3 settings, once local paths are given."""
    cfg = load_config("toy_grpo")
    assert cfg.method.name == "grpo" and cfg.model.type == "toy" and cfg.normguard.ng_lambda > 0
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    cfg = load_config("sd35m_grpo_pickscore", [f"model.path={tmp_path}", f"reward.kwargs.path={tmp_path / 'pick'}",
                                                f"rollout.prompt_file={prompts}"])
    g = cfg.method.grpo
    assert (cfg.model.type, cfg.sampling.num_steps, cfg.sampling.guidance_scale, cfg.sampling.noise_level) == \
        ("sd3", 10, 4.5, 0.7)
    assert (g.clip_range, g.kl_beta, g.adv_clip_max, g.timestep_fraction) == (1e-4, 0.01, 5.0, 0.99)
    assert (cfg.rollout.prompts_per_step, cfg.rollout.group_size, cfg.eval.num_steps) == (48, 24, 40)
    assert build_method(cfg).num_timesteps == 9 and cfg.train.mixed_precision == "fp16"
