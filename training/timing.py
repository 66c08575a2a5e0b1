"""Where a step's time goes: rollout, reward, loss+backward, optimizer, evaluation, checkpoint.

Sections nest and are exclusive: the reward is scored inside the rollout and the optimizer steps inside the
micro-batch loop, and each second is counted once, in the innermost section running. On a GPU the timer
synchronises the device at every section boundary, so kernel time lands in the section that launched it (a
handful of syncs per micro-batch; the loop already syncs that often for its logs). What no section covers
(the method's policy updates, logging) is `other` = step seconds - the sections.
"""

from __future__ import annotations

import contextlib
import time

import torch

SECTIONS = ("rollout", "reward", "loss_backward", "optimizer", "eval", "checkpoint")
LABELS = {"rollout": "rollout", "reward": "reward", "loss_backward": "loss+backward", "optimizer": "optimizer",
          "eval": "evaluation", "checkpoint": "checkpoint"}
COLUMNS = [f"time/{s}" for s in SECTIONS]


class StepTimer:
    def __init__(self, device: torch.device | None = None):
        self._sync = torch.cuda.synchronize if device is not None and device.type == "cuda" else (lambda: None)
        self.current = dict.fromkeys(SECTIONS, 0.0)
        self.totals = dict.fromkeys(SECTIONS, 0.0)
        self.steps = 0
        self._children: list[float] = []  # per open section: seconds spent in its nested sections

    @contextlib.contextmanager
    def __call__(self, section: str):
        if section not in self.current:
            raise ValueError(f"unknown timing section {section!r}; one of {SECTIONS}")
        self._sync()
        start = time.perf_counter()
        self._children.append(0.0)
        try:
            yield
        finally:
            self._sync()
            elapsed = time.perf_counter() - start
            self.current[section] += elapsed - self._children.pop()
            if self._children:
                self._children[-1] += elapsed

    def pop(self) -> dict[str, float]:
        """The seconds since the last pop, as CSV columns time/<section>; they join the run's totals."""
        out = {f"time/{k}": v for k, v in self.current.items()}
        for k, v in self.current.items():
            self.totals[k] += v
        self.current = dict.fromkeys(SECTIONS, 0.0)
        self.steps += 1
        return out

    def discard(self) -> None:
        """Forget the seconds since the last pop (set-up work that belongs to no step)."""
        self.current = dict.fromkeys(SECTIONS, 0.0)

    def summary(self) -> str:
        """Mean seconds per step and section over the popped steps (plus what ran after the last pop: the final
        checkpoint)."""
        n = max(self.steps, 1)
        parts = [f"{LABELS[k]} {(v + self.current[k]) / n:.3f}" for k, v in self.totals.items()]
        return ", ".join(parts) + f" s per step (mean over {self.steps} steps)"


__all__ = ["COLUMNS", "SECTIONS", "StepTimer"]
