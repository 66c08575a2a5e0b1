"""Bad input, caught where it enters: before training (prompt file, model folder, the reward's output contract)
and during a run (rewards that are NaN / inf for some images).

Why here and not deeper: a deep failure (diffusers' loader on a folder without a transformer, a [B, 1] reward
broadcasting into the advantages, a NaN reward turning every advantage of its run into NaN) either crashes
with a traceback far from the cause or trains silently on garbage. Each check below names the file or config
key at fault in one line (a ValueError, which the CLI prints as one line with exit code 2).

Non-finite rewards are data, not a configuration error: the images whose reward is NaN / inf leave the
advantage computation (their group's mean and std, and the global std, use the finite rewards only) and
produce no training item; the loop logs and prints how many. A step where no reward is finite has nothing to
learn from and is skipped.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from training.toy import is_toy


def check_prompt_file(path: str) -> None:
    """`rollout.prompt_file` must exist, be readable text and hold at least one non-empty line."""
    if not path:
        return
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"rollout.prompt_file {path!r} does not exist")
    try:
        lines = [line for line in file.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"rollout.prompt_file {path!r} cannot be read as text: {err}") from None
    if not lines:
        raise ValueError(f"rollout.prompt_file {path!r} is empty: it needs one prompt per line")


def check_model_folder(model_type: str, path: str) -> None:
    """A diffusers pipeline folder for sd3 / flux: model_index.json and, for every component it lists (the
    transformer first), a subfolder with its config file."""
    if is_toy(model_type):
        return
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ValueError(f"model.path {str(folder)!r} does not exist or is not a folder")
    index = folder / "model_index.json"
    if not index.is_file():
        raise ValueError(f"model.path {str(folder)!r} has no model_index.json: not a diffusers pipeline folder")
    try:
        components = json.loads(index.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{index}: not valid JSON ({err})") from None
    if "transformer" not in components:
        raise ValueError(f"{index} lists no transformer component: model.path must be a full SD3 / FLUX pipeline")
    for name, spec in components.items():
        if name.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue  # metadata, or an optional component saved as [null, null]
        sub = folder / name
        configs = [sub / "config.json", sub / "scheduler_config.json", sub / "tokenizer_config.json",
                   sub / "preprocessor_config.json"]
        if not sub.is_dir():
            raise ValueError(f"model.path {str(folder)!r} has no {name}/ folder (listed in model_index.json)")
        if name == "transformer" and not configs[0].is_file():
            raise ValueError(f"{configs[0]} is missing: model.path's transformer/ folder is incomplete")


def check_reward_output(out, batch: int, name: str) -> torch.Tensor:
    """A reward must return a floating tensor of shape [B], one score per image."""
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"reward {name!r} returned {type(out).__name__}, not a tensor of shape [{batch}]")
    if tuple(out.shape) != (batch,):
        raise ValueError(f"reward {name!r} returned shape {tuple(out.shape)} for {batch} images; it must return "
                         f"one score per image, shape [{batch}]")
    if not out.is_floating_point():
        raise ValueError(f"reward {name!r} returned dtype {out.dtype}; it must return floating-point scores")
    return out


def finite_items(method, rewards: torch.Tensor, prompt_ids: torch.Tensor, advantages_fn, adv_std: str):
    """-> (items, number of non-finite rewards). Only the images with a finite reward enter the advantages and
    the method's items; items index the full rollout's slots. items is None when no reward is finite."""
    finite = torch.isfinite(rewards)
    dropped = int((~finite).sum())
    if dropped == len(rewards):
        return None, dropped
    if dropped == 0:
        return method.make_items(rewards, advantages_fn(rewards, prompt_ids, adv_std), prompt_ids), 0
    keep = finite.nonzero().flatten()
    r, p = rewards[keep], prompt_ids[keep]
    items = method.make_items(r, advantages_fn(r, p, adv_std), p)
    for item in items:
        item.slots = tuple(int(keep[s]) for s in item.slots)
    return items, dropped




def check_launch(accelerator) -> None:
    """The launch gave the run the processes and the engine it asked for.

    Two traps of `accelerate launch` on a machine without GPUs: an FSDP / multi-GPU config without --cpu starts
    N processes that each set up a single-process run (N independent runs writing the same directory), and
    accelerate (1.16) enables FSDP only on GPUs / accelerators, so an FSDP config on CPU silently trains with
    plain DDP (or, with --cpu, in one process). Both are refused here, before any work."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    kind = getattr(accelerator.distributed_type, "value", accelerator.distributed_type)
    if world > 1 and accelerator.num_processes == 1:
        raise ValueError(f"launched as one of {world} processes, but accelerate set up a single-process run "
                         f"(distributed type {kind}): without GPUs, launch with --cpu "
                         "(e.g. --config_file training/configs/accelerate/cpu_2proc.yaml)")
    wants_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if wants_fsdp and getattr(accelerator.state, "fsdp_plugin", None) is None:
        raise ValueError(f"the accelerate config asks for FSDP, but accelerate runs {kind} "
                         f"on {accelerator.device.type}: accelerate enables FSDP only on GPUs / accelerators; on CPU "
                         "use training/configs/accelerate/cpu_2proc.yaml (DDP)")


__all__ = ["check_launch", "check_model_folder", "check_prompt_file", "check_reward_output", "finite_items"]
