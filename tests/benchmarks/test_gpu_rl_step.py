"""benchmarks/gpu_rl_step.py cannot rot before its one GPU run: the CPU rehearsal (--device cpu --tiny) runs the
same code path end to end and writes a table whose numbers add up; without a GPU the real run stops at once with
exit code 2 and one line; the SD3.5-Medium config builds the published model (checked on the meta device).
In-process (`main(argv)`): the imports (torch, diffusers, peft) dominate a subprocess's time on a small machine."""

from __future__ import annotations

import csv
import math

import torch

from benchmarks import gpu_rl_step


def test_cpu_rehearsal_writes_a_consistent_table(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        rc = gpu_rl_step.main(["--device", "cpu", "--tiny", "--resolutions", "64", "--rollout-steps", "3",
                               "--steps", "2", "--op-reps", "3", "--out", str(tmp_path),
                               "--budget-s", "3600"])  # the budget counts from the module's import
    finally:
        torch.set_num_threads(threads)  # the rehearsal runs on one thread
    printed = capsys.readouterr()
    assert rc == 0, printed.out[-3000:] + printed.err[-3000:]
    (md,) = tmp_path.glob("rl_step-*.md")
    (csv_path,) = tmp_path.glob("rl_step-*.csv")
    text = md.read_text()
    assert "NormGuard's share of the step" in text and "| step |" in text and "64px: batch 2" in text
    assert text.strip() in printed.out  # the table is printed too
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    by = {(r["mode"], r["phase"]): r for r in rows}
    for mode in gpu_rl_step.MODES:
        for phase in ("step", *gpu_rl_step.PHASES, "loss_op_fwd_bwd"):
            r = by[(mode, phase)]
            assert math.isfinite(float(r["median_ms"])) and float(r["median_ms"]) > 0, r
            assert float(r["min_ms"]) <= float(r["median_ms"]) <= float(r["max_ms"])
        assert by[(mode, "step")]["n"] == "2" and by[(mode, "loss_op_fwd_bwd")]["n"] == "3"
        # the phases are disjoint parts of the step: their medians cannot add up to much more than it
        parts = sum(float(by[(mode, p)]["median_ms"]) for p in gpu_rl_step.PHASES)
        assert parts <= 1.2 * float(by[(mode, "step")]["median_ms"])
    assert all(r["device"].startswith("CPU (") and r["resolution"] == "64" and r["notes"] == "" for r in rows)


def test_a_failing_configuration_keeps_the_others(tmp_path, capsys, monkeypatch):
    """One configuration failing on the GPU (say, out of memory) must not lose the others' numbers."""
    real = gpu_rl_step.run_config

    def run_config(model, optimizer, params, arch, prompt_tokens, cfg, *rest):
        if cfg.resolution == 64:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(model, optimizer, params, arch, prompt_tokens, cfg, *rest)

    monkeypatch.setattr(gpu_rl_step, "run_config", run_config)
    threads = torch.get_num_threads()
    try:
        rc = gpu_rl_step.main(["--device", "cpu", "--tiny", "--resolutions", "64", "128", "--rollout-steps", "2",
                               "--steps", "1", "--op-reps", "2", "--out", str(tmp_path), "--budget-s", "3600"])
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr()
    assert rc == 1 and printed.err.strip().endswith("error: a configuration failed (see the table)")
    text = next(tmp_path.glob("rl_step-*.md")).read_text()
    assert "64px: FAILED (RuntimeError: CUDA out of memory (simulated))" in text
    assert "128px: batch 2" in text and "| step |" in text


def test_no_gpu_fails_fast_with_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for args in (["--out", str(tmp_path)], ["--device", "cpu", "--out", str(tmp_path)],
                 ["--device", "cpu", "--tiny", "--train-timesteps", "5", "--rollout-steps", "3"],
                 ["--device", "cpu", "--tiny", "--resolutions", "100"]):
        assert gpu_rl_step.main(args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
    assert not list(tmp_path.iterdir())  # nothing written


def test_sd35_medium_config_is_the_published_model():
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        model = SD3Transformer2DModel(**gpu_rl_step.SD35_MEDIUM)
    params = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() for b in model.buffers())
    assert params == 2_243_171_520 and params + buffers == 2_469_663_936  # 4.94 GB in fp16, as published
    assert len(model.transformer_blocks) == 24
    assert sum(getattr(b, "use_dual_attention", False) for b in model.transformer_blocks) == 13


def test_inlined_sampler_is_the_trainers():
    """The script inlines the trainer's schedule and Euler sampler (so that it depends only on the model API):
    they must stay the same math as training.sampling."""
    from training.sampling import sample, sigma_schedule

    torch.testing.assert_close(gpu_rl_step.sigma_schedule(10, 3.0), sigma_schedule(10, 3.0), rtol=0, atol=0)

    class Linear:  # a closed-form velocity field v = a x + b sigma
        def velocity(self, x, sigma, cond):
            assert sigma.shape == (x.shape[0],)
            return 0.3 * x + sigma.view(-1, 1, 1, 1) * cond["b"]

    x1 = torch.randn(3, 2, 4, 4)
    cond = {"b": torch.randn(3, 2, 4, 4)}
    sigmas = sigma_schedule(5, 3.0)
    expected = sample(lambda x, s: Linear().velocity(x, s, cond), x1, sigmas)
    torch.testing.assert_close(gpu_rl_step.euler_sample(Linear(), cond, x1, sigmas), expected)
    picks = gpu_rl_step.pick_train_sigmas(sigmas, batch=4, num_timesteps=3, seed=1)
    assert picks.shape == (4, 3)
    for row in picks:
        assert len(set(row.tolist())) == 3 and set(row.tolist()) <= set(sigmas[:-1].tolist())
