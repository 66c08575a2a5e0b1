"""FSDP on 2 CPU processes (gloo): how far accelerate's FSDP2 path gets with this trainer, and where it stops.

What runs (tests/training/fsdp_cpu_harness.py, under `accelerate launch --config_file
training/configs/accelerate/fsdp_cpu_2proc.yaml`): accelerate's own `fully_shard` preparation of the FlowModel
(every trainable parameter a DTensor, each rank holding half), one RL step of the shared loop (rollout through
the sharded forward, NFT loss, backward with reduce-scatter, AdamW on the shards), then a checkpoint.

Recorded limits (accelerate 1.16, torch 2.13, CPU):
1. accelerate enables FSDP only on GPUs / accelerators: on CPU `--cpu` starts one plain process, and without
   `--cpu` each process sets up a single-process run, or with ACCELERATE_USE_CPU plain DDP; the trainer refuses
   all three (training.guards.check_launch). The harness promotes the state to FSDP itself.
2. Sharding the whole FlowModel breaks prompt encoding outside the wrapped forward:
   "RuntimeError: aten.embedding.default got mixed torch.Tensor and DTensor, need to convert all torch.Tensor to
   DTensor before calling distributed operators!" (the toy's caption encoder); the harness keeps it out of the
   shards (`ignored_modules`).
3. The step's numbers are close to the 1-process run but NOT equal within float tolerance (measured: LoRA loss
   4.003056 vs 4.003087, grad norm 0.0634 vs 0.0658; full fine-tuning loss 4.00904 vs 4.01573, grad norm 1.07
   vs 1.31), while the rollout rewards are equal to float32 rounding. Unexplained so far (the 2-process DDP run equals the 1-process
   run exactly); the gradient reduction or clipping of DTensor gradients is the first suspect. (accelerate's
   FSDP2 `prepare` resets the state's type to MULTI_CPU on CPU; the harness restores FSDP after it, and the
   numbers and the checkpoint error below are the same either way.)
4. The checkpoint fails: the trimmed model state (training.checkpoint) holds DTensor shards, which accelerate's
   safetensors writer cannot take: "RuntimeError: Attempted to access the data pointer on an invalid python
   storage." Exact resume under FSDP is therefore untested.
The assertions pin each limit, so fixing one fails this test and points at what to update.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

from tests.training.conftest import REPO, toy_overrides
from training.config import load_config
from training.guards import finite_items
from training.loop import Trainer, group_advantages

CHECKPOINT_ERROR = "RuntimeError: Attempted to access the data pointer on an invalid python storage."


def _one_process(overrides):
    trainer = Trainer(load_config(overrides=overrides))
    latents, rewards, prompt_ids, slot_prompts = trainer.rollout(1)
    items, _ = finite_items(trainer.method, rewards, prompt_ids, group_advantages, trainer.cfg.train.adv_std)
    stats = trainer.train_on(items, latents, slot_prompts, 1)
    return rewards.tolist(), stats["loss"], stats["grad_norm"]


def _launch(overrides, ignore="captions"):
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true",
           "NGK_FSDP_IGNORE": ignore}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "training/configs/accelerate/fsdp_cpu_2proc.yaml"),
           str(REPO / "tests/training/fsdp_cpu_harness.py"), *overrides]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in out.stdout.splitlines() if line.startswith("FSDP-REPORT ")]
    assert lines, out.stderr[-4000:]
    return json.loads(lines[-1].split(" ", 1)[1])


@pytest.mark.parametrize("mode, loss_rtol, grad_rtol", [("lora", 1e-4, 0.1), ("full", 5e-3, 0.3)])
def test_fsdp2_on_two_cpu_processes_runs_a_step_and_stops_at_the_checkpoint(tmp_path, toy_cache, mode, loss_rtol,
                                                                            grad_rtol):
    overrides = toy_overrides(tmp_path, toy_cache, f"finetune.mode={mode}", "eval.grid_prompts=0",
                              "rollout.prompts_per_step=3", "rollout.group_size=4")
    report = _launch(overrides + ["log.run_name=fsdp"])
    assert report["num_processes"] == 2
    assert report["dtensor_params"] == report["trainable_params"] > 0  # every trained tensor is sharded ...
    assert report["local_numel"] * 2 == report["full_numel"]  # ... in halves (rank 0's shard)
    rewards, loss, grad_norm = _one_process(overrides + ["log.run_name=one"])
    # The rollout through the sharded forward is the 1-process rollout, up to float32 rounding: bitwise on the
    # machine this was written on, not on another CPU (measured 2026-12-05: 0.0057687233 vs 0.0057687229, 4e-9 at most).
    assert report["rewards"] == pytest.approx(rewards, rel=1e-5, abs=1e-7)
    assert report["finite_weights"]
    assert report["loss"] == pytest.approx(loss, rel=loss_rtol)  # close, not equal within float tolerance (limit 3)
    assert report["grad_norm"] == pytest.approx(grad_norm, rel=grad_rtol)
    assert report.get("error") == CHECKPOINT_ERROR  # limit 4: fix checkpointing under FSDP, then test resume here


class _Acc:
    def __init__(self, num_processes, fsdp_plugin=None):
        from types import SimpleNamespace

        import torch

        self.num_processes, self.distributed_type, self.device = num_processes, "NO", torch.device("cpu")
        self.state = SimpleNamespace(**({"fsdp_plugin": fsdp_plugin} if fsdp_plugin else {}))


def test_launch_traps_are_refused(monkeypatch):
    from training.guards import check_launch

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="one of 2 processes, but accelerate set up a single-process run.*--cpu"):
        check_launch(_Acc(1))
    check_launch(_Acc(2))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match="asks for FSDP, but accelerate runs NO on cpu: accelerate enables FSDP only"):
        check_launch(_Acc(2))
    check_launch(_Acc(2, fsdp_plugin=object()))


def test_an_fsdp_config_on_cpu_is_a_one_line_error_not_a_silent_ddp_run(tmp_path, toy_cache):
    """`accelerate launch --config_file fsdp_cpu_2proc.yaml` with ACCELERATE_USE_CPU: accelerate would train plain
    DDP; the trainer says so and stops before any work."""
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "training/configs/accelerate/fsdp_cpu_2proc.yaml"), "-m", "training",
           *toy_overrides(tmp_path, toy_cache)]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "error: the accelerate config asks for FSDP, but accelerate runs MULTI_CPU on cpu" in out.stderr
    assert not (tmp_path / "toy_nft" / "checkpoints").exists()
