"""Samplers against closed-form flows: a point mass (Euler is exact in one step), Gaussian data (the ODE's
flow map is affine and known; the SDE keeps the marginals), CFG arithmetic, the SD3 time shift, and the
training timestep schemes built on the sampler's schedule."""

from __future__ import annotations

import math

import pytest
import torch

from training.sampling import policy_velocity, sample, sigma_schedule, time_shift, train_sigmas

MU, S = 1.5, 0.5  # data ~ N(MU, S^2) per coordinate


def gaussian_velocity(x, sigma):
    """E[eps - x0 | x_t = x] for x0 ~ N(MU, S^2), eps ~ N(0, 1), x_t = (1-t) x0 + t eps (exact)."""
    t = sigma.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    var = (1 - t) ** 2 * S ** 2 + t ** 2
    centred = x - (1 - t) * MU
    return (t - (1 - t) * S ** 2) / var * centred - MU


def test_schedule_endpoints_and_shift():
    s = sigma_schedule(10)
    assert s[0] == 1 and s[-1] == 0 and torch.all(s[1:] < s[:-1])
    shifted = sigma_schedule(10, shift=3.0)
    assert torch.allclose(shifted, 3 * s / (1 + 2 * s))
    assert torch.all(shifted[1:-1] > s[1:-1])  # shift > 1 spends more steps at high noise
    with pytest.raises(ValueError):
        sigma_schedule(0)


@pytest.mark.parametrize("steps", [1, 2, 7])
def test_point_mass_is_exact_for_any_number_of_euler_steps(steps):
    mu = torch.tensor([0.3, -1.2, 2.0])
    x1 = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    velocity = lambda x, sigma: (x - mu) / sigma[:, None]  # noqa: E731  (u = (x - mu) / t exactly)
    x0 = sample(velocity, x1, sigma_schedule(steps, shift=2.0))
    assert torch.allclose(x0, mu.expand(5, 3), atol=1e-5)


def test_gaussian_ode_follows_the_closed_form_flow_map():
    """x_t = (1-t) MU + sqrt(var(t)) z solves the ODE, so x_0 = MU + S * x_1 exactly."""
    x1 = torch.randn(2000, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact = MU + S * x1
    errors = [(sample(gaussian_velocity, x1, sigma_schedule(n).double()) - exact).abs().max().item()
              for n in (4, 100, 400)]
    assert errors[2] < 1e-2
    assert errors[1] / errors[2] == pytest.approx(4.0, rel=0.1)  # Euler: first-order convergence
    assert errors[0] > 0.1  # few steps: the discretisation error is visible


def test_gaussian_sde_keeps_the_data_marginal():
    g = torch.Generator().manual_seed(2)
    n, steps = 40000, 100
    x1 = torch.randn(n, 1, generator=g, dtype=torch.float64)
    noise = torch.randn(steps, n, 1, generator=g, dtype=torch.float64)
    x0 = sample(gaussian_velocity, x1, sigma_schedule(steps).double(), "sde", noise_level=0.7, step_noise=noise)
    assert x0.mean().item() == pytest.approx(MU, abs=0.02)
    assert x0.std().item() == pytest.approx(S, abs=0.02)
    assert (x0 - (MU + S * x1)).abs().mean() > 0.05  # the paths are stochastic, not the ODE's


def test_sde_needs_its_noise():
    with pytest.raises(ValueError, match="step_noise"):
        sample(gaussian_velocity, torch.zeros(2, 1), sigma_schedule(3), "sde")
    with pytest.raises(ValueError, match="sampler"):
        sample(gaussian_velocity, torch.zeros(2, 1), sigma_schedule(3), "heun")


class LinearModel:
    """A stand-in FlowModel: v = a * x + b(cond), with a reference() whose v is half as large."""

    def __init__(self):
        self.scale = 1.0

    def velocity(self, x, sigma, cond):
        return self.scale * (2.0 * x + cond["c"])

    def reference(self):
        model = self

        class _Ref:
            def __enter__(self):
                model.scale = 0.5

            def __exit__(self, *exc):
                model.scale = 1.0

        return _Ref()


def test_cfg_combines_conditional_and_unconditional():
    model, x, sigma = LinearModel(), torch.ones(2, 3), torch.full((2,), 0.5)
    cond, uncond = {"c": torch.full((2, 3), 3.0)}, {"c": torch.full((2, 3), 1.0)}
    v = policy_velocity(model, cond, guidance_scale=4.0, uncond=uncond)(x, sigma)
    assert torch.allclose(v, (2 + 1) + 4.0 * ((2 + 3) - (2 + 1)) * torch.ones(2, 3))
    with pytest.raises(ValueError, match="unconditional"):
        policy_velocity(model, cond, guidance_scale=2.0)


def test_rescale_to_reference_matches_the_reference_norm():
    model, x, sigma = LinearModel(), torch.randn(3, 4), torch.full((3,), 0.5)
    cond = {"c": torch.randn(3, 4)}
    v = policy_velocity(model, cond, rescale_to_reference=True)(x, sigma)
    v_theta = model.velocity(x, sigma, cond)
    assert torch.allclose(v.norm(dim=1), 0.5 * v_theta.norm(dim=1), rtol=1e-5)
    assert torch.allclose(v / v.norm(dim=1, keepdim=True), v_theta / v_theta.norm(dim=1, keepdim=True), atol=1e-6)
    assert not math.isclose(v.norm().item(), v_theta.norm().item())


def _generators(n, seed=0):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def test_time_shift_is_the_one_formula_of_the_schedule_and_the_training_timesteps():
    s = torch.linspace(1.0, 0.0, 9, dtype=torch.float64)
    assert torch.equal(sigma_schedule(8, 3.0), time_shift(s, 3.0).float())
    assert torch.allclose(time_shift(torch.tensor([0.0, 0.5, 1.0]), 3.0), torch.tensor([0.0, 0.75, 1.0]))
    # logit_normal: sigmoid(N(0, 1)) time-shifted; the same generator gives the same draw
    g = torch.Generator().manual_seed(7)
    u = torch.sigmoid(torch.randn(3, generator=g))
    got = train_sigmas("logit_normal", 1, 3, sigma_schedule(8, 3.0), 3.0, [torch.Generator().manual_seed(7)])
    assert torch.equal(got[0], time_shift(u, 3.0))


def test_train_sigmas_schemes_pick_where_they_say():
    grid = sigma_schedule(10, 2.0)
    picks = train_sigmas("sampler", 5, 4, grid, 2.0, _generators(5))
    assert picks.shape == (5, 4)
    for row in picks:  # distinct sigmas of the sampler, never its final 0
        assert len(set(row.tolist())) == 4 and all(x in grid[:-1].tolist() for x in row.tolist())
    strat = train_sigmas("stratified", 50, 3, grid, 2.0, _generators(50))
    index = {x: i for i, x in enumerate(grid.tolist())}
    idx = torch.tensor([[index[x] for x in row] for row in strat.tolist()])
    assert idx.min() >= 1 and idx.max() <= 9  # the strata cover steps [1, int(0.9 * 10)]
    assert (idx[:, 0] <= idx[:, 1]).all() and (idx[:, 1] <= idx[:, 2]).all()  # one pick per stratum, in order
    uniform = train_sigmas("uniform", 200, 2, grid, 1.0, _generators(200))
    assert 0 < uniform.min() and uniform.max() < 1 and abs(uniform.mean().item() - 0.5) < 0.05
    again = train_sigmas("uniform", 200, 2, grid, 1.0, _generators(200))
    assert torch.equal(uniform, again)  # reproducible from the per-item generators
    with pytest.raises(ValueError, match="exceeds the sampler's 10 steps"):
        train_sigmas("sampler", 1, 11, grid, 2.0, _generators(1))
    with pytest.raises(ValueError, match="unknown timestep scheme"):
        train_sigmas("cosine", 1, 2, grid, 2.0, _generators(1))
