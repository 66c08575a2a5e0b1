"""Adaptive NormGuard in the trainer (normguard.adaptive, issue 14): the terms equal the fixed form's at the same
lambda, padding rows stay out of the dual step, the loop's logged lambda follows the dual-ascent recursion on
the logged norm ratio, and --resume replays the same lambda sequence.

The update rule itself (projected dual ascent, its closed-form fixed point, clipping, non-finite steps, state
round trips) is ngkernels.NormGuard's and is tested there: tests/integrations/test_normguard_module.py
(test_dual_ascent_converges_to_the_closed_form_multiplier and the tests after it). Here: the integration.
"""

from __future__ import annotations

import math

import pytest
import torch

from training.config import load_config
from training.loop import Trainer
from training.methods import build_method
from training.methods.base import reference_terms
from training.models.toy import ToyFlowModel
from training.tracking import read_csv

SMALL_TOY = ["model.toy.num_layers=1", "finetune.lora_r=4"]


def _model_and_cfg(*overrides):
    cfg = load_config(overrides=[*SMALL_TOY, *overrides])
    torch.manual_seed(0)
    model = ToyFlowModel(cfg.model.toy)
    return cfg, model


def _velocities(n=6, seed=0):
    """v with per-sample scales around 1 (some rows above the hinge, some below), v_ref, in float64."""
    g = torch.Generator().manual_seed(seed)
    v_ref = torch.randn(n, 3, 16, 16, generator=g, dtype=torch.float64)
    scale = torch.linspace(0.8, 1.3, n, dtype=torch.float64)
    v = v_ref * scale[:, None, None, None] + 0.05 * torch.randn(v_ref.shape, generator=g, dtype=torch.float64)
    return v, v_ref


@pytest.mark.parametrize("form", [
    ["normguard.relative=true"],
    ["normguard.relative=false", "normguard.squared=true", "normguard.margin=0.02"],
    ["normguard.relative=true", "normguard.per_token=true"],
], ids=["relative", "absolute-squared-margin", "relative-per-token"])
@pytest.mark.parametrize("kl", [None, 2.0, "rows"], ids=["no-kl", "kl-number", "kl-per-row"])
def test_adaptive_terms_equal_the_fixed_terms_at_the_same_lambda(form, kl):
    """Before any update the adaptive guard's lambda is ng_lambda: loss, its KL and NormGuard parts, the norms and
    the gradient are the fixed path's (one fused call) up to float64 rounding."""
    cfg, model = _model_and_cfg("normguard.ng_lambda=0.3", *form)
    adaptive_cfg, _ = _model_and_cfg("normguard.ng_lambda=0.3", "normguard.adaptive=true", *form)
    method = build_method(adaptive_cfg)
    assert method.guard is not None and build_method(cfg).guard is None
    v, v_ref = _velocities()
    kl_weight = torch.linspace(0.5, 1.5, v.shape[0], dtype=torch.float64) if kl == "rows" else kl
    outs, grads = [], []
    for guard in (None, method.guard):
        leaf = v.clone().requires_grad_(True)
        out = reference_terms(model, leaf, v_ref, cfg.normguard, kl_weight, guard=guard)
        out.loss.sum().backward()
        outs.append(out)
        grads.append(leaf.grad)
    fixed, adaptive = outs
    opts = dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(adaptive.loss.detach(), fixed.loss.detach(), **opts)
    torch.testing.assert_close(adaptive.normguard, fixed.normguard, **opts)
    assert (adaptive.kl is None) == (fixed.kl is None) == (kl is None)
    if kl is not None:
        torch.testing.assert_close(adaptive.kl, fixed.kl, **opts)
    torch.testing.assert_close(adaptive.v_norm, fixed.v_norm, **opts)
    torch.testing.assert_close(adaptive.ref_norm, fixed.ref_norm, **opts)
    torch.testing.assert_close(grads[1], grads[0], **opts)
    assert fixed.normguard.abs().sum() > 0  # some rows are above the hinge: the comparison is not 0 == 0


def test_stat_weight_of_item_rows_covers_both_slots_of_a_pair():
    """DPO's rows are (winner, loser) per item-row; the loop's weight is per item-row. A zero-weight padding pair
    leaves the dual step and the logged ratio as the real rows alone give them."""
    cfg, model = _model_and_cfg("method.name=dpo", "normguard.ng_lambda=0.1", "normguard.relative=true",
                                "normguard.adaptive=true", "normguard.lambda_lr=0.5")
    v, v_ref = _velocities(6)
    padded, real = build_method(cfg), build_method(cfg)
    pad_v = torch.cat([v, v[:2] * 3.0])  # a padding pair far above the margin
    pad_ref = torch.cat([v_ref, v_ref[:2]])
    padded.row_weight = torch.tensor([1.0, 1.0, 1.0, 0.0])  # 3 real pairs, 1 padding pair
    padded.reference_terms(model, pad_v, pad_ref)
    real.reference_terms(model, v, v_ref)
    padded.update_normguard()
    real.update_normguard()
    torch.testing.assert_close(padded.guard.lambda_, real.guard.lambda_, rtol=1e-14, atol=0)
    torch.testing.assert_close(padded.guard.ratio_mean, real.guard.ratio_mean, rtol=1e-14, atol=0)
    ratio = (v.flatten(1).norm(dim=1) / v_ref.flatten(1).norm(dim=1)).mean().item()
    assert real.normguard_lambda() == pytest.approx(max(0.0, 0.1 + 0.5 * (ratio - 1.0)), rel=1e-12)
    with pytest.raises(ValueError, match="stat_weight has 4 entries for 6 rows"):
        reference_terms(model, v, v_ref, cfg.normguard, guard=real.guard, stat_weight=torch.ones(4))


def _adaptive_run(toy_cfg, *extra):
    return toy_cfg("normguard.adaptive=true", "normguard.ng_lambda=0.05", "normguard.relative=true",
                   "normguard.lambda_lr=2.0", "normguard.margin=0.0", *extra)


@pytest.mark.parametrize("method", ["nft", "dpo"])
def test_logged_lambda_follows_dual_ascent_on_the_logged_ratio(toy_cfg, method):
    """lambda_{t+1} = clip(lambda_t + lr (ratio_t - 1 - margin), 0, lambda_max), with ratio_t the step's logged
    norm ratio: the guard sees exactly the rows the logs see (DPO: 3 pairs in a micro-batch of 4, one padding)."""
    cfg = _adaptive_run(toy_cfg, f"method.name={method}", "train.steps=4", "log.run_name=dual")
    trainer = Trainer(cfg)
    trainer.run()
    rows = read_csv(cfg.run_dir / "metrics.csv")
    lams = [r["ng_lambda"] for r in rows if r["step"] >= 1]
    ratios = [r["norm_ratio"] for r in rows if r["step"] >= 1]
    assert lams[0] == 0.05 and len(lams) == 4
    expected = [0.05]
    for ratio in ratios:
        expected.append(min(max(expected[-1] + 2.0 * (ratio - 1.0), 0.0), 10.0))
    assert lams == pytest.approx(expected[:4], rel=1e-9, abs=1e-12)
    assert trainer.method.normguard_lambda() == pytest.approx(expected[4], rel=1e-9, abs=1e-12)
    assert len(set(lams)) > 1  # lambda moved: the recursion is not checked on a constant


def test_fixed_normguard_logs_its_constant_lambda(toy_cfg):
    cfg = toy_cfg("normguard.ng_lambda=0.25", "train.steps=2", "log.run_name=fixed")
    Trainer(cfg).run()
    assert [r["ng_lambda"] for r in read_csv(cfg.run_dir / "metrics.csv") if r["step"] >= 1] == [0.25, 0.25]


def test_resume_replays_the_same_lambda_sequence(toy_cfg):
    """The guard's buffers travel in the checkpoint: a run stopped after step 2 and resumed to step 4 logs the
    same lambdas (and losses) as the uninterrupted run, bit for bit, and ends in the same guard state."""
    full = _adaptive_run(toy_cfg, "train.steps=4", "log.run_name=full")
    a = Trainer(full)
    a.run()
    Trainer(_adaptive_run(toy_cfg, "train.steps=2", "log.run_name=part")).run()
    resumed = _adaptive_run(toy_cfg, "train.steps=4", "log.run_name=part")
    b = Trainer(resumed, resume=True)
    assert b.method.guard.num_updates.item() == 2  # loaded from the step-2 checkpoint, not a fresh guard
    b.run()
    ra, rb = read_csv(full.run_dir / "metrics.csv"), read_csv(resumed.run_dir / "metrics.csv")
    assert [r["step"] for r in rb] == [1, 2, 3, 4]
    lams = [r["ng_lambda"] for r in ra if r["step"] >= 1]
    assert len(set(lams)) > 1  # lambda moved
    for x, y in zip(ra, rb):
        assert x["ng_lambda"] == y["ng_lambda"]
        assert x["loss"] == y["loss"] or (math.isnan(x["loss"]) and math.isnan(y["loss"]))
    for (name, x), (_, y) in zip(a.method.guard.state_dict().items(), b.method.guard.state_dict().items()):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("overrides,match", [
    (["normguard.adaptive=true", "normguard.ng_lambda=2.0", "normguard.lambda_max=1.0"], "lambda_max"),
    (["normguard.lambda_lr=0"], "lambda_lr"),
    (["normguard.constraint=kkt"], "constraint"),
])
def test_bad_adaptive_settings_are_one_line_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_config(overrides=overrides)
