"""One process of the 2-process gloo DDP check of NormGuard (tests/integrations/test_wrappers.py)."""

import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import ngkernels

STEPS, LAMBDA_LR = 3, 0.5


def run(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # the same weights on every rank
        model = nn.Conv2d(16, 16, 1, dtype=torch.float64)
        ref = nn.Conv2d(16, 16, 1, dtype=torch.float64).requires_grad_(False)
        with torch.no_grad():
            ref.weight.copy_(model.weight * 0.9)
            ref.bias.copy_(model.bias)
        ddp = DistributedDataParallel(model)
        guard = ngkernels.NormGuard(0.1, relative=True, adaptive=True, lambda_lr=LAMBDA_LR, return_stats=True)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
        record = []
        for step in range(STEPS):
            g = torch.Generator().manual_seed(100 * step + rank)  # each rank its own batch
            x = torch.randn(3, 16, 8, 8, generator=g, dtype=torch.float64) * (1.0 + rank)
            v = ddp(x)
            with torch.no_grad():
                v_ref = ref(x)
            loss, stats = guard(v, v_ref, target=v_ref, weight=0.1)
            loss.backward()
            opt.step()
            opt.zero_grad()
            before = guard.lambda_.clone()
            guard.update()
            record.append(dict(before=before, after=guard.lambda_.clone(), ratio=stats.v_norm / stats.ref_norm,
                               ratio_mean=guard.ratio_mean.clone(), ratio_max=guard.ratio_max.clone()))
        torch.save(dict(record=record, weight=model.weight.detach().clone()), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
