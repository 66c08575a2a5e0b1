"""Launched by tests/training/test_fsdp.py under `accelerate launch` (2 CPU processes, gloo): one RL step of the
shared loop through accelerate's own FSDP2 path (`fully_shard` via Accelerator.prepare), then a checkpoint.

accelerate 1.16 enables FSDP only on GPUs / accelerators (AcceleratorState sets DistributedType.FSDP only for
MULTI_GPU, MULTI_NPU, MULTI_XPU ...); on CPU it silently runs DDP. To exercise the FSDP code path anyway, this
harness (test-only) promotes the MULTI_CPU state to FSDP with the plugin accelerate built from the config, as
accelerate would on a GPU, and keeps the toy's caption encoder out of the shards (`ignored_modules`): it is
called outside the wrapped forward (prompt encoding), where sharded parameters fail (see test_fsdp.py).

Prints one line `FSDP-REPORT {json}` on the main process.
"""

import json
import os
import sys

from accelerate import state as _state
from accelerate.utils import DistributedType

_orig_init = _state.AcceleratorState.__init__


def _fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _orig_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        if os.environ.get("NGK_FSDP_IGNORE"):
            fsdp_plugin.ignored_modules = os.environ["NGK_FSDP_IGNORE"]


_state.AcceleratorState.__init__ = _fsdp_on_cpu

import accelerate as _accelerate  # noqa: E402

_orig_prepare = _accelerate.Accelerator.prepare


def _prepare_keeping_fsdp(self, *args, **kwargs):
    """accelerate's FSDP2 preparation resets the shared state's type to MULTI_CPU on CPU; the rest of accelerate
    (gradient clipping, save_state) branches on it, so it is restored."""
    out = _orig_prepare(self, *args, **kwargs)
    if getattr(self.state, "fsdp_plugin", None) is not None:
        self.state.distributed_type = DistributedType.FSDP
    return out


_accelerate.Accelerator.prepare = _prepare_keeping_fsdp


def main():
    import torch
    from torch.distributed.tensor import DTensor

    from training.config import load_config
    from training.guards import finite_items
    from training.loop import Trainer, group_advantages

    cfg = load_config(overrides=sys.argv[1:])
    report = {}
    try:
        trainer = Trainer(cfg)
        acc = trainer.accelerator
        params = trainer.model.trainable_parameters()
        report["distributed_type"] = str(acc.distributed_type)
        report["num_processes"] = acc.num_processes
        report["dtensor_params"] = sum(isinstance(p, DTensor) for p in params)
        report["trainable_params"] = len(params)
        report["local_numel"] = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params)
        report["full_numel"] = sum(p.numel() for p in params)
        latents, rewards, prompt_ids, slot_prompts = trainer.rollout(1)
        report["rewards"] = rewards.tolist()
        items, _ = finite_items(trainer.method, rewards, prompt_ids, group_advantages, cfg.train.adv_std)
        stats = trainer.train_on(items, latents, slot_prompts, 1)
        report["loss"], report["grad_norm"] = stats["loss"], stats["grad_norm"]
        report["finite_weights"] = all(bool(torch.isfinite(p.full_tensor() if isinstance(p, DTensor) else p).all())
                                       for p in params)
        trainer.state.step = 1
        trainer.save_checkpoint(1)
        report["checkpoint"] = "ok"
    except Exception as err:  # the report says how far it got, and the exact error
        report["error"] = f"{type(err).__name__}: {err}"
    import accelerate

    if accelerate.PartialState().is_main_process:
        print("FSDP-REPORT " + json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
