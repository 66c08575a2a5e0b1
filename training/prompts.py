"""The prompt pool of a run: `rollout.prompts` plus the lines of `rollout.prompt_file`, or the toy's captions.

One definition for everything that must agree on it: the loop samples its rollout and evaluation prompts from
it, a pipeline model with `model.free_text_encoders` encodes exactly these prompts before dropping its text
encoders, and the analysis evaluates on them. It sits with the config, below the models and the loop, so
all of them can read it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from training.toy import is_toy
from training.toy.data import CAPTIONS

if TYPE_CHECKING:
    from training.config import Config


def prompt_pool(cfg: "Config") -> list[str]:
    """The run's prompts in a fixed order (the loop's seeded prompt picks index into it)."""
    prompts = list(cfg.rollout.prompts)
    if cfg.rollout.prompt_file:
        with open(cfg.rollout.prompt_file) as f:
            prompts += [line.strip() for line in f if line.strip()]
    if not prompts and is_toy(cfg.model.type):
        prompts = list(CAPTIONS)
    if not prompts:
        raise ValueError("no prompts: set rollout.prompts or rollout.prompt_file")
    return prompts
