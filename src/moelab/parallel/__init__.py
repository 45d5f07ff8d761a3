"""Scale-out on torch.distributed (see docs/distributed.md).

    ddp              process-group set-up from torchrun's env, ``wrap_model``, ``shard_indices``, reductions
    expert_parallel  ``ExpertParallelMoE`` / ``ShardedExperts``: experts sharded over a process group
    comm             the differentiable all-to-all token exchange
    launch           ``moelab run --nproc N`` (torchrun re-launch) and ``spawn`` for tests / benchmarks

Submodules are imported on use (``moelab.parallel.ddp`` is imported by every ``moelab run``).
"""
