"""Differentiable token exchange between ranks (the all-to-all of expert parallelism).

``all_to_all(x, send, recv, group)`` sends rows ``x[sum(send[:j]) : sum(send[:j+1])]`` to rank ``j``
of ``group`` and returns the rows received, grouped by source rank::

    x (sum(send), *f)  --exchange-->  out (sum(recv), *f)      recv[j] = rows rank j sends here

Its backward is the reverse exchange (``send`` and ``recv`` swapped) of the output gradient, so the
gradient of a token always flows back to the rank that owns it.

Two implementations, same result:

- ``"native"`` (default): ``dist.all_to_all_single`` with uneven split sizes. NCCL has it; so does
  gloo in torch >= 2.x (checked on torch 2.13 CPU, uneven splits and empty parts included).
- ``"p2p"``: one ``isend``/``irecv`` pair per peer through ``dist.batch_isend_irecv``, for a
  backend without all-to-all. Select with ``MOELAB_ALL_TO_ALL=p2p`` or :func:`set_impl`.

Split sizes are Python ints: the caller exchanges the counts first (:func:`exchange_counts`, one
small all-to-all, a host sync) so every rank can size its receive buffer.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_to_all", "exchange_counts", "set_impl", "get_impl"]

_IMPL = os.environ.get("MOELAB_ALL_TO_ALL", "native")


def set_impl(impl: str) -> None:
    """Choose the exchange: ``"native"`` (all_to_all_single) or ``"p2p"`` (isend/irecv pairs)."""
    global _IMPL
    if impl not in ("native", "p2p"):
        raise ValueError(f"all-to-all impl must be 'native' or 'p2p', got {impl!r}")
    _IMPL = impl


def get_impl() -> str:
    return _IMPL


def _exchange(x: Tensor, send: Sequence[int], recv: Sequence[int], group) -> Tensor:
    """Non-differentiable exchange: x (sum(send), *f) -> (sum(recv), *f)."""
    x = x.contiguous()
    out = x.new_empty(sum(recv), *x.shape[1:])
    if _IMPL == "native":
        dist.all_to_all_single(out, x, output_split_sizes=list(recv), input_split_sizes=list(send), group=group)
        return out
    me = dist.get_rank(group)
    peers = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
    xs, outs = x.split(list(send)), out.split(list(recv))
    outs[me].copy_(xs[me])
    ops = [dist.P2POp(dist.irecv, o, peers[j], group) for j, o in enumerate(outs) if j != me and o.numel()]
    ops += [dist.P2POp(dist.isend, s, peers[j], group) for j, s in enumerate(xs) if j != me and s.numel()]
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, send: list[int], recv: list[int], group) -> Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        return _exchange(x, send, recv, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _exchange(grad, ctx.recv, ctx.send, ctx.group), None, None, None


def all_to_all(x: Tensor, send: Sequence[int], recv: Sequence[int], group=None) -> Tensor:
    """x (sum(send), *f) -> (sum(recv), *f), rows grouped by source rank; backward = reverse exchange."""
    return _AllToAll.apply(x, list(send), list(recv), group)


def exchange_counts(counts: Tensor, group=None) -> Tensor:
    """counts (W, c) rows sent to each rank -> (W, c) rows received from each rank (``out[j]`` from j).

    One equal-split all-to-all of a small integer tensor (on the device the backend needs)."""
    counts = counts.contiguous()
    out = torch.empty_like(counts)
    w = counts.shape[0]
    _exchange_equal(out.view(w, -1), counts.view(w, -1), group)
    return out


def _exchange_equal(out: Tensor, x: Tensor, group) -> None:
    if _IMPL == "native":
        dist.all_to_all_single(out, x, group=group)
    else:
        out.copy_(_exchange(x, [1] * x.shape[0], [1] * x.shape[0], group))
