"""The reward registry: reward name -> Reward class or factory.

A leaf module (it imports only training.registry), so that the rewards (builtin.py, clip.py) can register with
`@register_reward(name)` and training.config can check `reward.name` against the registered names without
either importing the other. Importing it runs training/rewards/__init__.py first, which imports the built-in
rewards, so the registry is complete whenever it is read.
"""

from __future__ import annotations

from training.registry import Registry

REWARDS: Registry = Registry("reward")  # name -> Reward class or factory
register_reward = REWARDS.register  # decorator

__all__ = ["REWARDS", "register_reward"]
