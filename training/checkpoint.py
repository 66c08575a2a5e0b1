"""Trimmed accelerate checkpoints: the model file holds only what training changes.

`accelerate.Accelerator.save_state` writes the full state_dict of every prepared model. For a FlowModel that
is mostly frozen weights: the base transformer under LoRA (5-24 GB for SD3.5 / FLUX.1) or the reference copy
under full fine-tuning, which `build_model(cfg)` rebuilds anyway. `register_checkpoint_hooks` plugs into
accelerate's own save/load hooks so that, for the FlowModel,

- save: the state dict accelerate is about to write (`model.safetensors`, keys relative to the FlowModel, the
  same with or without a DDP wrapper) is replaced by `FlowModel.checkpoint_state_dict()`: the trained
  parameters and the extra policies the methods update (old / EMA / ref);
- load: the FlowModel is taken out of accelerate's list and loaded with `FlowModel.load_checkpoint_state`,
  which checks the keys and shapes strictly (a clear ValueError for a checkpoint of another LoRA rank,
  fine-tuning mode, method, ...).

Everything else (optimizer, RNG states, registered objects such as the loop's RunState) is accelerate's
usual save/load. Under DeepSpeed / FSDP / Megatron accelerate saves and loads the model itself (full state)
and the hooks leave it alone.

Where checkpoints live is also here, once: `<run_dir>/checkpoints/step-N`, written atomically
(`save_checkpoint`), found by `latest_checkpoint`, chosen for --resume by `resume_checkpoint` (the trainer and
the CLI's --dry-run give the same one-line error when there is none).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from training.models.base import FlowModel


def step_of(folder: Path) -> int:
    """N of a checkpoints/step-N folder."""
    return int(folder.name.split("-")[1])


def checkpoints(run_dir: str | Path) -> list[Path]:
    """The run's complete checkpoints, oldest first (a half-written .tmp-step-N folder is not one)."""
    return sorted((Path(run_dir) / "checkpoints").glob("step-*"), key=step_of)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1] if found else None


def resume_checkpoint(run_dir: str | Path, resume: bool | str) -> Path | None:
    """The checkpoint --resume continues from: the run's latest (resume=True) or the given folder; None when not
    resuming. A one-line ValueError when there is none."""
    if not resume:
        return None
    path = latest_checkpoint(run_dir) if resume is True else Path(resume)
    if path is None or not path.is_dir():
        raise ValueError(f"--resume: no checkpoint found ({path or Path(run_dir) / 'checkpoints'})")
    return path


def save_checkpoint(accelerator, run_dir: str | Path, step: int, keep: int) -> Path:
    """accelerate save_state into checkpoints/.tmp-step-N, then an atomic rename to checkpoints/step-N (a kill -9
    leaves the last complete checkpoint); only the newest `keep` checkpoints stay.

    The folder holds model.safetensors with only the weights training changes (`FlowModel.checkpoint_keys`:
    the trained LoRA or transformer and the old / EMA / ref policies; not the frozen base weights or the
    reference copy, which the Trainer rebuilds from the config; see `register_checkpoint_hooks`), the
    optimizer, the RNG states and the registered objects (the loop's RunState)."""
    acc = accelerator
    root = Path(run_dir) / "checkpoints"
    final, tmp = root / f"step-{step}", root / f".tmp-step-{step}"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    acc.wait_for_everyone()
    acc.save_state(str(tmp))
    acc.wait_for_everyone()
    if acc.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def model_file(folder: str | Path, index: int = 0) -> Path:
    """The model state file of the `index`-th prepared model in an accelerate checkpoint folder
    (model.safetensors, model_1.safetensors, ...; pytorch_model.bin when saved without safetensors)."""
    from accelerate.utils import MODEL_NAME, SAFE_MODEL_NAME

    folder = Path(folder)
    ending = f"_{index}" if index > 0 else ""
    for path in (folder / f"{SAFE_MODEL_NAME}{ending}.safetensors", folder / f"{MODEL_NAME}{ending}.bin"):
        if path.is_file():
            return path
    raise ValueError(f"{folder}: no {SAFE_MODEL_NAME}{ending}.safetensors (not a checkpoint of this trainer?)")


def read_model_state(folder: str | Path, index: int = 0) -> dict[str, torch.Tensor]:
    path = model_file(folder, index)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_model_state(model: FlowModel, folder: str | Path, index: int = 0) -> None:
    """A checkpoint folder's model state into `model` (built from the run's config), strictly checked."""
    model.load_checkpoint_state(read_model_state(folder, index), source=f"checkpoint {folder}")


def register_checkpoint_hooks(accelerator, model: FlowModel) -> None:
    """Makes `accelerator.save_state` / `load_state` save and load only `model.checkpoint_keys()` of the
    prepared `model` (see the module docstring)."""

    def index_of(models) -> int | None:
        for i, m in enumerate(models):
            if accelerator.unwrap_model(m) is model:
                return i
        return None

    def save_hook(models, weights, output_dir):
        if len(weights) != len(models):  # DeepSpeed / FSDP / Megatron: accelerate saved the model itself
            return
        i = index_of(models)
        if i is not None:
            weights[i] = model.checkpoint_state_dict()

    def load_hook(models, input_dir):
        i = index_of(models)
        if i is None:  # DeepSpeed / FSDP / Megatron: accelerate loaded it already
            return
        if i != len(models) - 1:  # accelerate numbers the remaining models' files by their new positions
            raise ValueError("the FlowModel must be the last model passed to accelerator.prepare")
        load_model_state(model, input_dir, i)
        models.pop(i)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
