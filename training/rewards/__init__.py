"""Reward registry: `@register_reward(name)` on a class or factory, `build_reward(name, **kwargs)` to make one.

The registry itself is the leaf module registry.py (training.config reads it from there). Built-in offline
rewards live in `builtin.py`; CLIP-style scorers loaded from local checkpoints in `clip.py`; both register when
this package is imported.
"""

from __future__ import annotations

import inspect

from training.rewards.base import Reward, check_reward_inputs
from training.rewards.registry import REWARDS, register_reward


def build_reward(name: str, **kwargs) -> Reward:
    """Makes the reward `name`; unknown names and keyword arguments are ValueErrors."""
    factory = REWARDS.lookup(name)
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as err:
        raise ValueError(f"reward {name!r}: bad arguments {sorted(kwargs)}: {err}") from None
    return factory(**kwargs)


from training.rewards import builtin  # noqa: E402,F401  (registers the offline rewards)
from training.rewards import clip  # noqa: E402,F401  (registers pickscore / hpsv2 / aesthetic)

__all__ = ["REWARDS", "Reward", "register_reward", "build_reward", "check_reward_inputs"]
