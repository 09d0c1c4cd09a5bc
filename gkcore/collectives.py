"""Small ``torch.distributed`` helpers for losses that need every rank's features.

* :func:`world_info` / :func:`is_distributed`: ``(rank, world_size)`` of the default (or a given)
  process group, ``(0, 1)`` when no process group is initialised.
* :func:`all_gather`: concatenate a tensor of shape (B, ...) from every rank along dim 0 into
  (world_size * B, ...), in rank order. Three gradient modes:

  - ``grad=True``: differentiable. The backward sums, over all ranks, the gradient that each rank's
    loss sends to a slot and returns to each rank the sum for its own slot (reduce-scatter with SUM),
    i.e. the semantics of ``torch.distributed.nn.all_gather``. If every rank computes the same global
    loss, a rank's feature gradient is ``world_size`` times the single-process gradient; DDP's gradient
    averaging then gives exactly the single-process parameter gradient.
  - ``grad=False, keep_local=True`` (default): the other ranks' slots carry no gradient, but the local
    slot is the input tensor itself, so the local loss still backpropagates into the local features
    (open_clip's gather without grad).
  - ``grad=False, keep_local=False``: fully detached (e.g. momentum features for a queue).

  Every rank must pass the same shape; this is not checked (a mismatch fails inside the collective).

Nothing here initialises a process group; see :mod:`gkcore.engine.launch` for ``torchrun`` set-up.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "world_info", "all_gather", "all_gather_no_grad", "all_gather_with_grad"]


def is_distributed(group=None) -> bool:
    """True when a process group is initialised and has more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def world_info(group=None) -> Tuple[int, int]:
    """``(rank, world_size)`` in ``group`` (default group), or ``(0, 1)`` without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def _gather_raw(x: torch.Tensor, group=None) -> torch.Tensor:
    """(B, ...) -> (W * B, ...) without autograd, rank order."""
    world = dist.get_world_size(group)
    x = x.contiguous()
    out = torch.empty((world * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    if hasattr(dist, "all_gather_into_tensor") and dist.get_backend(group) == "nccl":
        dist.all_gather_into_tensor(out, x, group=group)
    else:
        dist.all_gather(list(out.chunk(world, 0)), x, group=group)
    return out


class _AllGatherGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        ctx.world = dist.get_world_size(group)
        ctx.n = x.shape[0]
        return _gather_raw(x, group)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        g = g.contiguous()
        if dist.get_backend(ctx.group) == "nccl" and hasattr(dist, "reduce_scatter_tensor"):
            out = torch.empty((ctx.n,) + tuple(g.shape[1:]), dtype=g.dtype, device=g.device)
            dist.reduce_scatter_tensor(out, g, op=dist.ReduceOp.SUM, group=ctx.group)
            return out, None
        g = g.clone()
        dist.all_reduce(g, op=dist.ReduceOp.SUM, group=ctx.group)  # gloo: no reduce_scatter everywhere
        return g[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n].clone(), None


def all_gather(x: torch.Tensor, *, grad: bool = False, keep_local: bool = True, group=None) -> torch.Tensor:
    """Concatenate ``x`` (B, ...) from every rank along dim 0: returns (world_size * B, ...).

    In a single process (no process group, or world size 1) returns ``x`` itself. See the module
    docstring for the gradient modes ``grad`` / ``keep_local``.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"all_gather: x must be a tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError("all_gather: x must have at least one dimension (gathered along dim 0)")
    if not is_distributed(group):
        return x if (grad or keep_local) else x.detach()
    if grad:
        return _AllGatherGrad.apply(x, group)
    with torch.no_grad():
        out = _gather_raw(x.detach(), group)
    if not keep_local or not x.requires_grad:
        return out
    rank, world = world_info(group)
    parts = list(out.chunk(world, 0))
    parts[rank] = x
    return torch.cat(parts, 0)


def all_gather_with_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """``all_gather(x, grad=True)``."""
    return all_gather(x, grad=True, group=group)


def all_gather_no_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """``all_gather(x, grad=False, keep_local=False)``: a detached concatenation."""
    return all_gather(x, grad=False, keep_local=False, group=group)
