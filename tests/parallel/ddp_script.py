"""Run under torchrun (2 processes) by test_parallel_ddp.py: DDP training of a small MoE model with the
moelab helpers must give the parameters of single-process training on the same global batches.

usage: torchrun --nproc-per-node 2 ddp_script.py OUT.json
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moelab.moe import MoE
from moelab.parallel import ddp
from moelab.train.run import seeded_generator

N, BATCH, EPOCHS = 29, 8, 3  # 29 = 8 + 8 + 8 + 5: the last global batch splits 3 / 2 over the ranks


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(5, 6)
        self.moe = MoE(6, 4, 8, router="topk", k=2, aux_loss_weights={"balance": 0.0})
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        return self.out(self.moe(torch.relu(self.inp(x)))[0])


def train(model: nn.Module, x, y, ctx: ddp.DistContext) -> list[float]:
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    accs = []
    for epoch in range(EPOCHS):
        correct = seen = 0
        for idx, w in ddp.shard_indices(N, seeded_generator(0, "train", epoch), batch_size=BATCH,
                                        with_weights=True, ctx=ctx):
            opt.zero_grad()
            out = model(x[idx])
            (F.cross_entropy(out, y[idx]) * w).backward()
            opt.step()
            correct += int((out.argmax(1) == y[idx]).sum())
            seen += len(idx)
        if ctx.enabled:
            accs.append(ddp.all_reduce_mean(correct / seen, weight=seen))
        else:
            accs.append(correct / seen)
    return accs


def run_ddp(ctx: ddp.DistContext, x, y, ref: Net, ref_acc: list[float]) -> dict:
    net = Net()
    model = ddp.wrap_model(net)
    assert isinstance(model, nn.parallel.DistributedDataParallel)
    acc = train(model, x, y, ctx)
    diff = max((p - q).abs().max().item() for p, q in zip(net.parameters(), ref.parameters()))
    diffs = [None] * ctx.world_size
    dist.all_gather_object(diffs, diff)
    return {"rank": ctx.rank, "max_param_diff_all_ranks": max(diffs), "acc": acc, "ref_acc": ref_acc,
            "sum_of_ranks": ddp.all_reduce_sum(torch.tensor([ctx.rank + 1.0])).item(),
            "mean_of_ranks": ddp.all_reduce_mean(float(ctx.rank))}


def main(out_path: str) -> None:
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(N, 5, generator=g), torch.randint(0, 3, (N,), generator=g)
    ref = Net()
    ref_acc = train(ref, x, y, ddp.DistContext())
    with ddp.maybe_init_from_env("gloo") as ctx:  # CPU tensors: gloo, also on a GPU machine
        assert ctx.enabled and ctx.world_size == 2, ctx
        # the DDP model lives in run_ddp: freed before the process group is destroyed (a DDP model
        # outliving destroy_process_group can hang at exit)
        result = run_ddp(ctx, x, y, ref, ref_acc)
        if ctx.is_main:
            with open(out_path, "w", encoding="utf-8") as f:
                json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
