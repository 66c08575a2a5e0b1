"""The shared loop on the tiny toy: advantages over free batch geometry, exact resume, trimmed checkpoints (no
frozen weights, strict loading), crash recovery, non-finite losses, 1 vs 2 processes (accelerate launch, gloo),
logs, and the embedded default's CLI."""

from __future__ import annotations

import csv
import math
import shutil
import sys

import pytest
import torch

from tests.training.conftest import run_cli, toy_overrides
from training.loop import Trainer, group_advantages, latest_checkpoint
from training.tracking import read_csv


def rows(run_dir):
    return read_csv(run_dir / "metrics.csv")


def test_group_advantages_use_each_prompts_whole_group():
    rewards = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 0.0, 4.0])  # groups of 3, 2 and 2, interleaved
    prompt_ids = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    adv = group_advantages(rewards, prompt_ids, "group")
    assert torch.allclose(adv[:3], torch.tensor([-1.0, 0.0, 1.0]) / (math.sqrt(2 / 3) + 1e-4))
    assert torch.allclose(adv[3:5], torch.zeros(2))
    assert torch.allclose(adv[5:], torch.tensor([-1.0, 1.0]) * 2 / (2 + 1e-4))
    glob = group_advantages(rewards, prompt_ids, "global")
    centred = torch.tensor([-1.0, 0, 1, 0, 0, -2, 2])
    assert torch.allclose(glob, centred / (rewards.std(unbiased=False) + 1e-4))
    shuffled = torch.randperm(7, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(group_advantages(rewards[shuffled], prompt_ids[shuffled], "global"), glob[shuffled])


@pytest.mark.parametrize("method, extra", [
    ("nft", ["log.trackers=[csv,tensorboard]", "train.grad_accum=2", "train.batch_size=2"]),
    ("awm", ["train.mixed_precision=bf16", "normguard.per_token=true", "train.inner_epochs=2"]),
    ("dpo", ["method.dpo.ref_update_every=1", "sampling.sampler=sde", "sampling.guidance_scale=2.0"]),
    ("grpo", ["sampling.guidance_scale=2.0", "normguard.ng_lambda=0.1"]),  # its SDE rollout, CFG-trained
])
def test_each_method_runs_and_logs(toy_cfg, method, extra):
    cfg = toy_cfg(f"method.name={method}", *extra)
    summary = Trainer(cfg).run()
    logged = rows(cfg.run_dir)
    assert [r["step"] for r in logged] == [1, 2]
    assert logged[1]["eval_reward"] == pytest.approx(summary.reward_after)
    for r in logged:
        assert math.isfinite(r["loss"]) and r["skipped_updates"] == 0
        assert 0.5 < r["norm_ratio"] < 2.0
        assert any(math.isfinite(r[k]) for k in r if k.startswith("norm_ratio/"))
    assert logged[0]["norm_ratio"] == pytest.approx(1.0, abs=0.01)  # step 1 starts from v_theta == v_ref
    assert summary.plot.is_file() and summary.plot.stat().st_size > 1000
    assert (summary.checkpoint / "model.safetensors").is_file()
    assert (summary.trained_weights / "adapter_config.json").is_file()
    events = list((cfg.run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    assert bool(events) == ("tensorboard" in cfg.log.trackers)


@pytest.mark.parametrize("extra", [
    (),  # LoRA + NFT: the checkpoint holds the trained adapter and the "old" adapter, not the base weights
    ("finetune.mode=full", "method.name=awm"),  # the trained transformer and the "ema" copy, not the reference
    ("method.name=grpo", "method.grpo.sde_window=2", "train.inner_epochs=2"),  # GRPO-Fast: stored SDE trajectories
], ids=["lora-nft", "full-awm", "lora-grpo-fast"])
def test_resume_continues_exactly(toy_cfg, extra):
    full = toy_cfg("train.steps=3", "log.run_name=full", *extra)
    Trainer(full).run()
    part = toy_cfg("train.steps=1", "log.run_name=part", *extra)
    Trainer(part).run()
    resumed = toy_cfg("train.steps=3", "log.run_name=part", *extra)
    Trainer(resumed, resume=True).run()
    a, b = rows(full.run_dir), rows(part.run_dir)
    assert [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        assert ra["loss"] == rb["loss"] and ra["reward_mean"] == rb["reward_mean"]


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("mode, method, updated_policy", [("lora", "nft", "old"), ("full", "awm", "ema")])
def test_a_checkpoint_holds_only_what_training_changes(toy_cfg, mode, method, updated_policy):
    """model.safetensors holds the trained weights and the policy the method updates (NFT's "old", AWM's
    "ema"), nothing frozen: no base weight under LoRA, no reference copy under full fine-tuning, no caption
    encoder, no buffer. What it leaves out really is what a fresh build from the config gives back."""
    from safetensors.torch import load_file

    from training.methods import build_method
    from training.models import build_model

    cfg = toy_cfg("train.steps=1", f"finetune.mode={mode}", f"method.name={method}")
    trainer = Trainer(cfg)
    summary = trainer.run()
    model = trainer.model
    saved = load_file(str(summary.checkpoint / "model.safetensors"))
    params = dict(model.named_parameters())
    state = model.state_dict()
    if mode == "lora":
        expected = {n for n in params if ".lora_" in n and (".default." in n or f".{updated_policy}." in n)}
        frozen = {n for n in params if ".lora_" not in n}  # the base transformer and the caption encoder
    else:
        expected = {n for n in params if n.startswith(("transformer.", f"frozen_copies.{updated_policy}."))}
        frozen = {n for n in params if n.startswith(("frozen_copies.reference.", "captions."))}
    assert frozen and all(not params[n].requires_grad for n in frozen)
    assert set(saved) == expected
    assert set(saved).isdisjoint(frozen) and set(saved).isdisjoint(dict(model.named_buffers()))
    assert {n for n, p in params.items() if p.requires_grad} <= set(saved)
    for name, tensor in saved.items():  # the values of the end of the run
        assert torch.equal(tensor, state[name]), name
    # the trained weights and the one policy that follows them, in a file of those tensors plus a small header
    assert _tensor_bytes(saved.values()) == 2 * _tensor_bytes(model.trainable_parameters())
    size = (summary.checkpoint / "model.safetensors").stat().st_size
    assert _tensor_bytes(saved.values()) <= size < _tensor_bytes(saved.values()) + 32_000
    whole = _tensor_bytes(state.values())
    assert size < (0.15 if mode == "lora" else 0.7) * whole  # LoRA on SD3.5 / FLUX: far below 1%
    # everything left out comes back unchanged from the config: trimming loses nothing a resume needs
    fresh = build_model(cfg)
    build_method(cfg).setup(fresh)
    fresh_state = fresh.state_dict()
    assert set(fresh_state) == set(state)
    for name in set(state) - set(saved):
        assert torch.equal(fresh_state[name], state[name]), name
    # the final export: the trained policy only, in its library's format
    if mode == "lora":  # peft adapter folder: the "default" adapter's LoRA tensors, no other adapter
        files = sorted(p.name for p in summary.trained_weights.iterdir())
        assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
        exported = load_file(str(summary.trained_weights / "adapter_model.safetensors"))
        assert len(exported) == len(model.trainable_parameters())
        for name, tensor in exported.items():  # peft drops the adapter name from the keys
            ours = "transformer." + name.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")
            assert torch.equal(tensor, state[ours]), name
    else:  # diffusers model folder: the trained transformer, not the reference or EMA copies
        exported = load_file(str(summary.trained_weights / "diffusion_pytorch_model.safetensors"))
        assert set(exported) == set(model.transformer.state_dict())
        for name, tensor in exported.items():
            assert torch.equal(tensor, state[f"transformer.{name}"]), name


def test_a_checkpoint_of_another_configuration_is_refused(toy_cfg):
    """Loading checks keys and shapes: another LoRA rank, method or fine-tuning mode is a clear error, and a
    checkpoint carrying frozen weights beside the trained ones is refused too; nothing is loaded."""
    summary = Trainer(toy_cfg("train.steps=1", "log.run_name=r8")).run()  # lora_r=8, NFT ("old" adapter)
    checkpoint = str(summary.checkpoint)
    # resume=<folder> from another run directory: no config.yaml comparison, only the checkpoint's own checks
    with pytest.raises(ValueError, match=r"does not match this model \(finetune.mode=lora, lora_r=4.*"
                                         r"shape mismatch.*lora_A.default.weight: saved \(8, "):
        Trainer(toy_cfg("finetune.lora_r=4", "log.run_name=r4"), resume=checkpoint)
    with pytest.raises(ValueError, match=r"key\(s\) the model does not have.*\.old\..*missing.*\.ema\."):
        Trainer(toy_cfg("method.name=awm", "log.run_name=awm"), resume=checkpoint)
    with pytest.raises(ValueError, match=r"finetune.mode=full.*key\(s\) the model does not have.*lora_"):
        Trainer(toy_cfg("finetune.mode=full", "log.run_name=full"), resume=checkpoint)

    from training.checkpoint import read_model_state

    trainer = Trainer(toy_cfg("train.steps=1", "log.run_name=r8-again"))  # built, not trained
    model = trainer.model
    saved = read_model_state(checkpoint)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    base = next(n for n in before if ".lora_" not in n and n.startswith("transformer."))
    with pytest.raises(ValueError, match=r"1 frozen weight\(s\)"):
        model.load_checkpoint_state({**saved, base: before[base]})
    (dropped, *_) = saved
    with pytest.raises(ValueError, match=r"1 trained/updated weight\(s\) missing"):
        model.load_checkpoint_state({k: v for k, v in saved.items() if k != dropped})
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())  # a refused load changes nothing
    model.load_checkpoint_state(saved)
    assert all(torch.equal(t, model.state_dict()[n]) for n, t in saved.items())
    model.load_checkpoint_state(before)  # a full state_dict, as checkpoints were written before they were trimmed
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())


def test_a_crash_loses_only_the_steps_after_the_last_checkpoint(toy_cfg):
    """Simulates kill -9 after step 3 with checkpoints every 2 steps: step 3's row exists, its checkpoint not.
    Resuming replays step 3 from the step-2 checkpoint, drops the stale row, and matches an uninterrupted run."""
    crashed = toy_cfg("train.steps=3", "log.checkpoint_every=2", "log.run_name=crash")
    Trainer(crashed).run()
    shutil.rmtree(crashed.run_dir / "checkpoints" / "step-3")  # the end-of-run checkpoint never got written
    (crashed.run_dir / "checkpoints" / ".tmp-step-3").mkdir()  # a half-written one is ignored
    assert latest_checkpoint(crashed.run_dir).name == "step-2"
    before = rows(crashed.run_dir)
    Trainer(toy_cfg("train.steps=4", "log.checkpoint_every=2", "log.run_name=crash"), resume=True).run()
    after = rows(crashed.run_dir)
    assert [r["step"] for r in after] == [1, 2, 3, 4]
    assert after[2]["loss"] == before[2]["loss"]


def test_a_fresh_run_in_a_used_directory_starts_clean(toy_cfg):
    Trainer(toy_cfg("train.steps=3", "log.run_name=again")).run()
    summary = Trainer(toy_cfg("train.steps=1", "log.run_name=again")).run()
    assert sorted(p.name for p in (summary.run_dir / "checkpoints").iterdir()) == ["step-1"]
    assert [r["step"] for r in rows(summary.run_dir)] == [1]


def test_resume_refuses_a_changed_config(toy_cfg):
    Trainer(toy_cfg("train.steps=1", "log.run_name=r")).run()
    with pytest.raises(ValueError, match="method.nft.beta"):
        Trainer(toy_cfg("train.steps=2", "log.run_name=r", "method.nft.beta=0.5"), resume=True)
    with pytest.raises(ValueError, match="no checkpoint"):
        Trainer(toy_cfg("log.run_name=never"), resume=True)


def test_a_non_finite_loss_skips_the_update_and_training_goes_on(toy_cfg, monkeypatch):
    cfg = toy_cfg("train.steps=2", "train.batch_size=16")  # one update per step
    trainer = Trainer(cfg)
    original = trainer.method.loss
    calls = {"n": 0}

    def poisoned(batch, velocity, model):
        out = original(batch, velocity, model)
        calls["n"] += 1
        if calls["n"] == 1:
            out.loss = out.loss * torch.tensor(float("nan"))
        return out

    monkeypatch.setattr(trainer.method, "loss", poisoned)
    weights = {n: p.detach().clone() for n, p in trainer.model.named_trainable_parameters()}
    orig_step = trainer.rollout
    snapshots = []

    def rollout_spy(step):
        snapshots.append({n: p.detach().clone() for n, p in trainer.model.named_trainable_parameters()})
        return orig_step(step)

    monkeypatch.setattr(trainer, "rollout", rollout_spy)
    trainer.run()
    logged = rows(cfg.run_dir)
    assert logged[0]["skipped_updates"] == 1 and logged[0]["nonfinite_losses"] == 1
    assert logged[1]["skipped_updates"] == 0 and math.isfinite(logged[1]["loss"])
    assert all(torch.equal(weights[n], snapshots[1][n]) for n in weights)  # step 1 changed nothing
    assert any(not torch.equal(snapshots[1][n], p) for n, p in trainer.model.named_trainable_parameters())


@pytest.mark.parametrize("method", ["nft", "dpo", "grpo"])
def test_two_processes_match_one(toy_cfg, tmp_path, toy_cache, method):
    """accelerate launch --num_processes 2 --cpu (gloo): 3 prompts x 5 images = 15 slots over 2 processes
    (8 + 7), and the run equals the single-process one."""
    overrides = toy_overrides(tmp_path / "runs", toy_cache, f"method.name={method}", "rollout.group_size=5",
                              "train.batch_size=16", "log.checkpoint_every=0")
    one_summary = Trainer(toy_cfg(*overrides[:0], f"method.name={method}", "rollout.group_size=5",
                                  "train.batch_size=16", "log.checkpoint_every=0", "log.run_name=one")).run()
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m"]
    result = run_cli([*overrides, "log.run_name=two"], launcher=launcher, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("=== summary ===") == 1  # printed by the main process only
    one, two = rows(tmp_path / "runs" / "one"), rows(tmp_path / "runs" / "two")
    assert len(one) == len(two) == 2
    assert one[1]["eval_reward"] == pytest.approx(two[1]["eval_reward"], rel=1e-5)
    for a, b in zip(one, two):
        assert a["reward_mean"] == pytest.approx(b["reward_mean"], rel=1e-5)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)
    # the DDP run's checkpoint holds the same trimmed keys (no "module." prefix) and loads in one process
    from training.checkpoint import read_model_state

    two_checkpoint = tmp_path / "runs" / "two" / "checkpoints" / "step-2"
    saved = read_model_state(two_checkpoint)
    assert sorted(saved) == sorted(read_model_state(one_summary.checkpoint))
    resumed = Trainer(toy_cfg(f"method.name={method}", "rollout.group_size=5", "train.batch_size=16",
                              "log.checkpoint_every=0", "log.run_name=two"), resume=True)
    assert resumed.state.step == 2
    assert all(torch.equal(t, resumed.model.state_dict()[n]) for n, t in saved.items())


def test_embedded_default_cli_with_a_short_schedule(tmp_path, toy_cache):
    """`python -m training` as a user runs it (the toy config), with a shortened schedule."""
    args = [f"log.output_dir={tmp_path}", f"model.toy.cache_dir={toy_cache}", "model.toy.pretrain_steps=120",
            "train.steps=4", "eval.every=2", "eval.num_prompts=4", "log.checkpoint_every=2"]
    result = run_cli(args, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    for line in ("=== summary ===", "eval reward", "norm ratio", "metrics CSV", "plot", "checkpoint"):
        assert line in out
    run_dir = tmp_path / "toy_nft"
    assert (run_dir / "plot.png").is_file() and (run_dir / "checkpoints" / "step-4").is_dir()
    with open(run_dir / "metrics.csv") as f:
        logged = list(csv.DictReader(f))
    assert [int(r["step"]) for r in logged] == [1, 2, 3, 4]
    assert logged[1]["eval_reward"] and not logged[0]["eval_reward"]
    assert "nft steps" in result.stderr  # tqdm progress


def test_kill_9_loses_only_the_steps_since_the_last_checkpoint(tmp_path, toy_cache):
    """A real SIGKILL mid-run: the last complete checkpoint survives and --resume finishes the run."""
    import os
    import signal
    import subprocess
    import time

    from tests.training.conftest import REPO

    args = toy_overrides(tmp_path, toy_cache, "train.steps=40", "log.checkpoint_every=1", "log.run_name=killed")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "training", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_dir = tmp_path / "killed"
    deadline = time.time() + 240
    while time.time() < deadline and not (run_dir / "checkpoints" / "step-3").is_dir():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    last = latest_checkpoint(run_dir)
    assert last is not None and int(last.name.split("-")[1]) >= 3
    assert (last / "model.safetensors").is_file()
    target = int(last.name.split("-")[1]) + 2
    result = run_cli([*args, f"train.steps={target}", "--resume"], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["step"] for r in rows(run_dir)] == list(range(1, target + 1))
