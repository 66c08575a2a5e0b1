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
"""

from __future__ import annotations

from pathlib import Path

import torch

from training.models.base import FlowModel


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
