"""The NormGuard study's instruments: adjoint sensitivity vs finite differences, the renormalisation baseline in
closed form, the Frechet distance, norm-ratio bookkeeping, and the one-command study on a tiny budget."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from torch import nn

from training.analysis.adjoint import coherence, velocity_scale_sensitivity
from training.analysis.quality import frechet_distance
from training.sampling import sigma_schedule


# ------------------------------------------------------------------------------------------------------
# Adjoint sensitivity

def _closed_form_field(dim: int):
    torch.manual_seed(0)
    W = torch.randn(dim, dim, dtype=torch.float64) / math.sqrt(dim)
    b = torch.randn(dim, dtype=torch.float64)

    def velocity(x, sigma):
        return torch.tanh(x @ W.T) * (1 + sigma[:, None]) + sigma[:, None] * b

    return velocity


def _objective(x):
    return torch.sin(x).sum(1) - 0.3 * x.square().sum(1)


def _finite_differences(velocity, x1, sigmas, objective, eps=1e-6, **kw):
    B, K = x1.shape[0], len(sigmas) - 1
    fd = torch.zeros(B, K, dtype=torch.float64)
    for k in range(K):
        alpha = torch.zeros(B, K, dtype=torch.float64)
        alpha[:, k] = eps
        _, r_plus = velocity_scale_sensitivity(velocity, x1, sigmas, objective, alpha=alpha, **kw)
        _, r_minus = velocity_scale_sensitivity(velocity, x1, sigmas, objective, alpha=-alpha, **kw)
        fd[:, k] = (r_plus.double() - r_minus.double()) / (2 * eps)
    return fd


@pytest.mark.parametrize("sampler", ["ode", "sde"])
def test_adjoint_matches_finite_differences_on_a_closed_form_field(sampler):
    B, D, K = 5, 6, 5
    velocity = _closed_form_field(D)
    x1 = torch.randn(B, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    sigmas = sigma_schedule(K, shift=3.0).double()
    kw = {"sampler": sampler}
    if sampler == "sde":
        kw["step_noise"] = torch.randn(K, B, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    grads, _ = velocity_scale_sensitivity(velocity, x1, sigmas, _objective, **kw)
    fd = _finite_differences(velocity, x1, sigmas, _objective, **kw)
    assert grads.shape == (B, K)
    assert grads.abs().min() > 1e-4  # a non-degenerate check
    torch.testing.assert_close(grads, fd, rtol=1e-6, atol=1e-8)


def test_adjoint_euler_formula_at_the_last_step():
    """dR/d alpha_{K-1} = <dR/dx_K, (sigma_K - sigma_{K-1}) v_{K-1}>, written out by hand."""
    B, D, K = 3, 4, 3
    velocity = _closed_form_field(D)
    x1 = torch.randn(B, D, dtype=torch.float64)
    sigmas = sigma_schedule(K).double()
    grads, _ = velocity_scale_sensitivity(velocity, x1, sigmas, _objective)
    s = sigmas.tolist()
    x = x1
    for i in range(K - 1):
        x = x + (s[i + 1] - s[i]) * velocity(x, torch.full((B,), s[i], dtype=torch.float64))
    v_last = velocity(x, torch.full((B,), s[K - 1], dtype=torch.float64))
    x_final = (x + (s[K] - s[K - 1]) * v_last).requires_grad_(True)
    (a_K,) = torch.autograd.grad(_objective(x_final).sum(), x_final)
    torch.testing.assert_close(grads[:, -1], ((s[K] - s[K - 1]) * v_last * a_K).sum(1))


def _tiny_toy_model(perturb: bool = True, dtype=torch.float64):
    from training.config import ToyConfig
    from training.models.toy import ToyFlowModel

    torch.manual_seed(0)
    toy = ToyConfig(image_size=8, patch_size=2, num_layers=1, num_attention_heads=2, attention_head_dim=4)
    model = ToyFlowModel(toy)
    model.configure_finetuning("lora", lora_r=2)
    if perturb:
        with torch.no_grad():  # peft's gaussian init makes the policy equal the reference: move it away
            for name, p in model.transformer.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.3)
    return model.to(dtype).eval()


def test_adjoint_matches_finite_differences_on_a_tiny_toy_model():
    from training.sampling import policy_velocity

    model = _tiny_toy_model()
    prompts = ["a red circle on the left", "a blue square on the right", "a green circle on the right"]
    with torch.no_grad():
        cond = model.encode_prompts(prompts)
    velocity = policy_velocity(model, cond)
    x1 = torch.randn(3, *model.latent_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sigmas = sigma_schedule(4).double()

    def objective(x):  # the reward through decode, as the study uses it
        return _caption_match64(model, x, prompts)

    grads, _ = velocity_scale_sensitivity(velocity, x1, sigmas, objective)
    fd = _finite_differences(velocity, x1, sigmas, objective, eps=1e-4)
    assert grads.abs().max() > 1e-4
    # diffusers' RMSNorm computes its variance in float32 even for float64 inputs: ~1e-3 relative noise in FD
    torch.testing.assert_close(grads, fd, rtol=1e-2, atol=1e-6)
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())  # weights untouched


def _caption_match64(model, x, prompts):
    """caption_match on the toy's decode, in float64 (the built-in reward and the toy's decode work in float32,
    too coarse for finite differences)."""
    from training.toy.data import COLORS, parse_caption

    images = ((x + 1) / 2).clamp(0, 1)
    parsed = [parse_caption(p) for p in prompts]
    target = torch.tensor([COLORS[c] for c, _, _ in parsed], dtype=torch.float64)[:, :, None, None]
    affinity = torch.exp(-(images - target).square().sum(1) / (2 * 0.2 ** 2))
    half = images.shape[-1] // 2
    left, right = affinity[..., :half].mean((1, 2)), affinity[..., half:].mean((1, 2))
    on_left = torch.tensor([p == "left" for _, _, p in parsed])
    return torch.where(on_left, left - right, right - left)


def test_coherence_statistics():
    g = torch.tensor([[1.0, -1.0], [3.0, 1.0], [2.0, -3.0], [2.0, 3.0]], dtype=torch.float64)
    c = coherence(g)
    assert c.mean == pytest.approx([2.0, 0.0])
    assert c.std[0] == pytest.approx(g[:, 0].std().item())
    assert c.mean_over_std[0] == pytest.approx(2.0 / g[:, 0].std().item())
    assert c.mean_over_std[1] == pytest.approx(0.0)
    assert c.frac_positive == pytest.approx([1.0, 0.5])
    total = g.sum(1)
    assert c.total_mean_over_std == pytest.approx((total.mean() / total.std()).item())
    assert c.total_frac_positive == pytest.approx(0.5)  # totals 0, 4, -1, 5
    with pytest.raises(ValueError):
        coherence(torch.zeros(1, 3))


# ------------------------------------------------------------------------------------------------------
# Frechet distance

def test_frechet_distance_closed_form():
    """b = 2a + 1 on the same samples: cov_b = 4 cov_a, so FD = ||mean_a + 1||^2 + tr(cov_a) exactly."""
    a = torch.randn(400, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) @ torch.diag(
        torch.tensor([1.0, 2.0, 0.5, 1.5, 3.0], dtype=torch.float64))
    b = 2 * a + 1
    expected = (a.mean(0) + 1).square().sum() + torch.trace(torch.cov(a.T))
    assert frechet_distance(a, b) == pytest.approx(expected.item(), rel=1e-8)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    with pytest.raises(ValueError):
        frechet_distance(a, b[:, :3])


# ------------------------------------------------------------------------------------------------------
# Renormalisation baseline (closed form)

class _LinearFieldModel(nn.Module):
    """A FlowModel stand-in with v = a x for the policy and v = b x for the reference (per-prompt a, b)."""

    latent_shape = (2, 3)

    def __init__(self, a: float, b: float):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the model a device
        self.a, self.b, self._ref = a, b, False

    def encode_prompts(self, prompts):
        return {"n": torch.ones(len(prompts), 1)}

    def velocity(self, x, sigma, cond):
        return (self.b if self._ref else self.a) * x

    @contextlib.contextmanager
    def reference(self):
        self._ref = True
        try:
            yield
        finally:
            self._ref = False

    def decode(self, latents):
        return latents.reshape(latents.shape[0], 3, 2, 1).expand(-1, 3, 2, 2)


@pytest.mark.parametrize("phi", [0.0, 0.3, 1.0])
def test_renormalised_sampling_closed_form(phi):
    """v = a x, v_ref = b x: renormalised v = (phi |b|/|a| + 1 - phi) a x, so Euler gives
    x_K = x_1 prod_k (1 + (sigma_{k+1} - sigma_k) c) with c = a (phi |b|/|a| + 1 - phi); ratio = |a|/|b|."""
    from training.analysis.trajectory import initial_noise, traced_sample
    from training.sampling import policy_velocity, rescale_to_norm

    a, b, K = -1.3, 0.9, 6
    model = _LinearFieldModel(a, b)
    trace = traced_sample(model, ["p"] * 4, num_steps=K, rescale_phi=phi, seed=3, progress=False)
    c = a * (phi * abs(b) / abs(a) + 1 - phi)
    s = sigma_schedule(K).double()
    expected = initial_noise(4, model.latent_shape, 3).double() * torch.prod(1 + (s[1:] - s[:-1]) * c)
    torch.testing.assert_close(trace.images.double(), model.decode(expected), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(trace.ratio, torch.full((4, K), abs(a) / abs(b)))
    # the sampler option itself (training.sampling.policy_velocity) agrees
    x = torch.randn(4, 2, 3)
    v = policy_velocity(model, model.encode_prompts(["p"] * 4), rescale_to_reference=True, rescale_phi=phi)(
        x, torch.full((4,), 0.5))
    torch.testing.assert_close(v, c * x)
    torch.testing.assert_close(rescale_to_norm(a * x, b * x, phi), c * x)


# ------------------------------------------------------------------------------------------------------
# Norm inflation along the sampling trajectory

def test_norm_ratio_by_timestep_writes_rows_csv_and_plot(tmp_path):
    from training.analysis.norms import norm_ratio_by_timestep

    prompts = ["a red circle on the left", "a blue square on the right"]
    at_init = norm_ratio_by_timestep(_tiny_toy_model(perturb=False, dtype=torch.float32), prompts, num_steps=3,
                                     samples_per_prompt=2, progress=False)
    assert [r["ratio_mean"] for r in at_init] == [1.0, 1.0, 1.0]  # LoRA B = 0: the policy is the reference
    rows = norm_ratio_by_timestep(_tiny_toy_model(dtype=torch.float32), prompts, num_steps=3, samples_per_prompt=2,
                                  shift=3.0, out_dir=tmp_path, progress=False)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert rows[0]["sigma"] == 1.0 and rows[0]["sigma"] > rows[1]["sigma"] > rows[2]["sigma"] > 0
    assert all(r["num_samples"] == 4 and r["ratio_p10"] <= r["ratio_p50"] <= r["ratio_p90"] for r in rows)
    assert any(abs(r["ratio_mean"] - 1) > 1e-3 for r in rows)
    assert (tmp_path / "norm_ratio_by_timestep.csv").read_text().startswith("step,sigma,ratio_mean")
    assert (tmp_path / "norm_ratio_by_timestep.png").stat().st_size > 1000


def test_traced_sample_bad_input():
    from training.analysis.trajectory import traced_sample

    model = _LinearFieldModel(1.0, 1.0)
    with pytest.raises(ValueError, match="rescale_phi"):
        traced_sample(model, ["p"], num_steps=2, rescale_phi=1.5, progress=False)
    with pytest.raises(ValueError, match="sampler"):
        traced_sample(model, ["p"], num_steps=2, sampler="heun", progress=False)
    with pytest.raises(ValueError, match="prompt"):
        traced_sample(model, [], num_steps=2, progress=False)


# ------------------------------------------------------------------------------------------------------
# The study: early-stopping match and the one-command run on a tiny budget

def test_match_checkpoint_early_stops_the_normguard_off_run():
    from training.analysis.study import match_checkpoint

    off = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    on = [0.1, 0.15, 0.2, 0.25, 0.3, 0.35]
    assert match_checkpoint(off, on, window=1) == {"step": 4, "reached": True, "target_reward": 0.35,
                                                   "matched_reward": 0.4}
    m = match_checkpoint(off, on, window=3)  # trailing means: off 0.1 0.15 0.2 0.3 0.4 0.5, on's final 0.3
    assert m["step"] == 4 and m["reached"] and m["target_reward"] == pytest.approx(0.3)
    m = match_checkpoint(on, off, window=1)  # never reached: the best step, flagged
    assert m == {"step": 6, "reached": False, "target_reward": 0.6, "matched_reward": 0.35}


def test_adjoint_renorm_prediction_is_the_first_order_term():
    from training.analysis.study import adjoint_renorm_prediction

    ev = {"ratio_by_step": [{"step": 0, "ratio_mean": 1.25}, {"step": 1, "ratio_mean": 0.8}],
          "adjoint": [{"step": 0, "grad_mean": 2.0}, {"step": 1, "grad_mean": -1.0}]}
    # alpha = phi (1/ratio - 1): step 0 -> -0.2 phi, step 1 -> +0.25 phi
    assert adjoint_renorm_prediction(ev, 1.0) == pytest.approx(2.0 * -0.2 + -1.0 * 0.25)
    assert adjoint_renorm_prediction(ev, 0.5) == pytest.approx(0.5 * (2.0 * -0.2 + -1.0 * 0.25))


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    from training.analysis.study import StudySettings, run_study

    out = tmp_path_factory.mktemp("study")
    settings = StudySettings.quick()
    settings.overrides.append(f"model.toy.cache_dir={out / 'cache'}")
    return out, settings, run_study(out, settings, progress=False)


def test_quick_study_writes_tables_data_and_plots(quick_study):
    from training.analysis.study import METHODS

    out, settings, md_path = quick_study
    md = md_path.read_text()
    for section in ("## NormGuard on minus off", "## Reward, norm inflation, quality", "## Few-step sampling",
                    "## Inference-time renormalisation baseline", "## Adjoint sensitivity", "## Timing"):
        assert section in md
    for method in METHODS:
        assert f"| {method} NG-off s0 |" in md and f"| {method} NG-on s0 |" in md
    from training.analysis.io import read_rows

    rows = read_rows(out / "study.csv")
    runs = {(r["method"], r["normguard"], r["seed"], r["checkpoint"]) for r in rows}
    assert {("reference", None, None, "reference")} | {(m, ng, 0.0, "final") for m in METHODS
                                                       for ng in ("off", "on")} <= runs
    conditions = {(r["sampling"], r["num_steps"], r["phi"]) for r in rows}
    assert conditions == {("plain", 2.0, 0.0), ("plain", 4.0, 0.0), ("renorm", 4.0, 1.0)}
    assert all(math.isfinite(r[k]) for r in rows for k in ("reward_mean", "norm_inflation_pct", "fd", "attribute_acc"))
    reference = [r for r in rows if r["method"] == "reference"]
    assert all(r["norm_inflation_pct"] == 0.0 for r in reference)  # the reference against itself
    trained = [r for r in rows if r["method"] != "reference"]
    assert any(r["norm_inflation_pct"] != 0.0 for r in trained)  # RL steps moved the policy
    for name in ("norm_ratio_by_timestep", "norm_ratio_over_training", "reward_curves", "few_step",
                 "adjoint_coherence"):
        assert (out / f"{name}.png").stat().st_size > 1000
    for run in (out / "runs").iterdir():  # per-step checkpoints pruned to the final (and matched) ones
        kept = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
        assert "step-3" in kept and len(kept) <= 2
    adjoint = read_rows(out / "adjoint_coherence.csv")
    assert all(0.0 <= r["frac_positive"] <= 1.0 for r in adjoint)


def test_norm_ratio_over_training_reads_the_trainer_logs(quick_study, tmp_path):
    from training.analysis.norms import norm_ratio_over_training

    out, settings, _ = quick_study
    curves = norm_ratio_over_training(out / "runs" / "nft_ng-on_seed-0", tmp_path / "ratio.png")
    (rows,) = curves.values()
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(0.5 < r["norm_ratio"] < 2.0 for r in rows)
    assert (tmp_path / "ratio.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="metrics.csv"):
        norm_ratio_over_training(tmp_path)


def test_feature_net_is_cached_and_the_distance_sees_corruption(quick_study, monkeypatch):
    import training.analysis.quality as quality
    from training.toy.data import render, sample_captions

    out, settings, _ = quick_study

    def no_training(*args, **kwargs):
        raise AssertionError("the cached feature net must be loaded, not retrained")

    monkeypatch.setattr(quality, "train_feature_net", no_training)
    q = quality.ToyQuality(8, out / "cache", spec=quality.FeatureNetSpec(image_size=8, train_steps=40),
                           num_reference=256, progress=False)
    g = torch.Generator().manual_seed(7)
    captions = sample_captions(128, g)
    clean = render(captions, 8, g)
    noisy = (clean + 0.3 * torch.randn(clean.shape, generator=g)).clamp(0, 1)
    assert q(clean, captions)["fd"] < q(noisy, captions)["fd"]


def test_analysis_cli_on_a_run_directory(quick_study, tmp_path, capsys):
    from training.analysis.__main__ import main
    from training.analysis.io import read_rows

    out, settings, _ = quick_study
    run_dir = out / "runs" / "awm_ng-on_seed-0"
    code = main([str(run_dir), "--out", str(tmp_path), "--num-prompts", "2", "--samples-per-prompt", "2",
                 "--steps", "2", "--phis", "1", "--adjoint-samples-per-prompt", "1"])
    assert code == 0
    rows = read_rows(tmp_path / "eval.csv")
    assert {(r["sampling"], r["num_steps"]) for r in rows} == {("plain", 2.0), ("plain", 4.0), ("renorm", 4.0)}
    assert all(r["checkpoint"] == "step-3" for r in rows)
    for name in ("norm_ratio_by_timestep.csv", "norm_ratio_by_timestep.png", "adjoint_coherence.csv",
                 "norm_ratio_over_training.png"):
        assert (tmp_path / name).is_file()
    assert "reward=" in capsys.readouterr().out
    assert main([str(tmp_path / "nowhere")]) == 2


# ------------------------------------------------------------------------------------------------------
# The instruments on real-architecture pipelines (tiny SD3 / FLUX folders: latents, VAE decode, CFG)

@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_instruments_on_tiny_pretrained_pipelines(kind, tmp_path):
    from tests.training.tiny_pipelines import save_tiny_flux_pipeline, save_tiny_sd3_pipeline
    from training.analysis.adjoint import adjoint_sensitivity
    from training.analysis.norms import norm_ratio_by_timestep
    from training.config import load_config
    from training.models import build_model
    from training.rewards import build_reward

    folder = (save_tiny_sd3_pipeline if kind == "sd3" else save_tiny_flux_pipeline)(tmp_path / kind)
    prompts = ["a red cat", "a blue dog"]
    cfg = load_config(overrides=[f"model.type={kind}", f"model.path={folder}", "model.resolution=32",
                                 "model.max_sequence_length=8", f"rollout.prompts=[{', '.join(prompts)}]"])
    torch.manual_seed(0)  # LoRA init and the lora_B perturbation below: the same weights whatever ran before
    model = build_model(cfg)
    guidance = 2.0 if kind == "sd3" else 1.0  # SD3 exercises the CFG path (negative prompt "")
    at_init = norm_ratio_by_timestep(model, prompts, num_steps=2, guidance_scale=guidance, progress=False)
    assert [r["ratio_mean"] for r in at_init] == [1.0, 1.0]
    with torch.no_grad():
        for name, p in model.named_trainable_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    rows = norm_ratio_by_timestep(model, prompts, num_steps=2, guidance_scale=guidance, progress=False)
    assert any(abs(r["ratio_mean"] - 1) > 1e-4 for r in rows)
    grads, rewards, sigmas = adjoint_sensitivity(model, prompts, build_reward("colorfulness"), num_steps=2,
                                                 guidance_scale=guidance, progress=False)
    assert grads.shape == (2, 2) and rewards.shape == (2,) and torch.isfinite(grads).all()
    assert grads.abs().max() > 0
    assert all(p.grad is None for p in model.parameters())
    if kind == "sd3":  # against central differences through the VAE decode (float32: a loose tolerance)
        from training.analysis.trajectory import initial_noise
        from training.sampling import policy_velocity

        model.eval()
        reward = build_reward("colorfulness")
        with torch.no_grad():
            cond, uncond = model.encode_prompts(prompts), model.encode_prompts([""] * 2)
        velocity = policy_velocity(model, cond, guidance, uncond)
        x1, sig = initial_noise(2, model.latent_shape, 0), sigma_schedule(2)
        for p in model.parameters():
            p.requires_grad_(False)
        objective = lambda x: reward(model.decode(x), prompts).double()  # noqa: E731
        adjoint, _ = velocity_scale_sensitivity(velocity, x1, sig, objective)
        fd = _finite_differences(velocity, x1, sig, objective, eps=1e-2)
        assert adjoint.abs().min() > 1e-4
        torch.testing.assert_close(adjoint, fd, rtol=2e-2, atol=1e-6)
