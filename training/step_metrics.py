"""The statistics one RL step logs: sums over its micro-batches, reduced across processes once per step.

Every per-row value is weighted by the row's weight (1 for a real row, 0 for the zero-weight padding that keeps
all processes on the same number of micro-batches), so padding never reaches the logs. The norm ratio
||v_theta|| / ||v_ref|| is kept overall and per sigma bucket. `reduce` makes one all-reduce of one float64
vector per step, whatever the number of micro-batches.
"""

from __future__ import annotations

import math

import torch

COUNTERS = ("rows", "grad_norm", "updates", "skipped", "nonfinite")  # besides the loss and its named terms


class StepMetrics:
    """Accumulates one RL step's loss terms, norm ratios and optimizer outcomes on one process."""

    def __init__(self, term_names: tuple[str, ...], buckets: torch.Tensor, bucket_names: list[str]):
        self.term_names = tuple(term_names)
        self.buckets = buckets  # sigma bucket edges [n + 1], from 0 to 1
        self.bucket_names = list(bucket_names)
        self.sums = {"loss": 0.0, **{t: 0.0 for t in self.term_names}, **{c: 0.0 for c in COUNTERS}}
        self.ratio_sum = torch.zeros(len(self.bucket_names) + 1, dtype=torch.float64)  # [overall, per bucket]
        self.ratio_count = torch.zeros_like(self.ratio_sum)

    def count(self, counter: str, amount: float = 1.0) -> None:
        """Optimizer outcomes: "updates", "skipped", "nonfinite", and "grad_norm" (a sum over updates)."""
        self.sums[counter] += amount

    @torch.no_grad()
    def add(self, out, sigma: torch.Tensor, weight: torch.Tensor, slots_per_item: int) -> None:
        """One micro-batch: the method's LossOutput, the rows' sigmas and the item rows' weights."""
        w = weight.double().cpu()
        self.sums["rows"] += float(w.sum())
        self.sums["loss"] += float((out.loss.detach().double().cpu() * w).nan_to_num().sum())
        for name in self.term_names:
            self.sums[name] += float((out.terms[name].double().cpu() * w).nan_to_num().sum())
        rw = w.repeat_interleave(slots_per_item)
        ratio = (out.v_norm.double() / out.ref_norm.double().clamp_min(1e-12)).cpu()
        bucket = torch.bucketize(sigma.cpu().double(), self.buckets[1:-1].double())
        self.ratio_sum[0] += float((ratio * rw).sum())
        self.ratio_count[0] += float(rw.sum())
        self.ratio_sum[1:].index_add_(0, bucket, ratio * rw)
        self.ratio_count[1:].index_add_(0, bucket, rw)

    def reduce(self, accelerator) -> dict[str, float]:
        """The step's logged values, summed over every process (one all-reduce): per-row means of the loss and its
        terms, the norm ratio overall and per bucket, the mean gradient norm, skipped updates, non-finite losses."""
        world = accelerator.num_processes
        keys = list(self.sums)
        local = torch.tensor([self.sums[k] for k in keys] + self.ratio_sum.tolist() + self.ratio_count.tolist(),
                             dtype=torch.float64)
        total = accelerator.reduce(local.to(accelerator.device), reduction="sum").cpu() if world > 1 else local
        sums = dict(zip(keys, total[: len(keys)].tolist()))
        n_b = len(self.bucket_names) + 1
        rs, rc = total[len(keys): len(keys) + n_b], total[len(keys) + n_b:]
        rows = max(sums["rows"], 1.0)
        stats = {"loss": sums["loss"] / rows, **{t: sums[t] / rows for t in self.term_names}}
        stats["norm_ratio"] = float(rs[0] / rc[0]) if rc[0] > 0 else math.nan
        for name, s, c in zip(self.bucket_names, rs[1:].tolist(), rc[1:].tolist()):
            stats[name] = s / c if c > 0 else math.nan
        updates = sums["updates"] / world
        stats["grad_norm"] = sums["grad_norm"] / world / updates if updates else math.nan
        stats["skipped_updates"] = sums["skipped"] / world
        stats["nonfinite_losses"] = sums["nonfinite"]
        return stats
