"""Distributed set-up for ``torchrun``: process group from the environment, DDP wrapping, rank-0 helpers.

Under ``torchrun --nproc_per_node N`` every process sees ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT``. :func:`init_from_env` reads them, picks NCCL when the process owns a
GPU and gloo on CPUs, and returns a :class:`DistInfo`. Without those variables (a plain ``python`` run)
it returns a single-process ``DistInfo`` and initialises nothing.

The data are sharded by rank by the loader (``build_loader(..., rank=, world_size=)``); DDP averages the
gradients, so N processes with local batch B/N follow the same trajectory as one process with batch B
(for losses that are means over the batch). Contrastive losses that need every rank's features gather
them inside the model (``gkcore.nn.ITCLoss``); the trainer does not.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init_from_env", "wrap_model", "unwrap", "all_reduce_mean", "any_flag",
           "barrier", "cleanup"]


@dataclass
class DistInfo:
    """Where this process stands: ``rank`` in ``[0, world_size)``, its ``local_rank`` on the node, its
    ``device``, and whether this run initialised a process group (``distributed``)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only process that writes files and prints progress."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {v!r}") from None


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """``"auto"`` -> ``cuda:<local_rank>`` when a GPU is visible, else ``cpu``; other strings as given.
    ``ValueError`` for a string torch cannot parse and for a CUDA device on a machine without one."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: no CUDA device is visible to torch; use --device cpu (or auto)")
    if d.type == "cuda" and d.index is None:
        d = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    return d


def init_from_env(device: str = "auto", backend: Optional[str] = None, timeout_s: float = 600.0) -> DistInfo:
    """Initialise the default process group from the ``torchrun`` environment when ``WORLD_SIZE > 1``.

    Args:
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...
        backend: ``"nccl"`` / ``"gloo"``; default NCCL for CUDA devices, gloo otherwise.
        timeout_s: collective timeout.
    Returns:
        :class:`DistInfo`. A process group that is already initialised is reused.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"bad torchrun environment: RANK={rank}, WORLD_SIZE={world}")
    dev = resolve_device(device, local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world == 1:
        return DistInfo(0, 1, 0, dev, None)
    be = backend or ("nccl" if dev.type == "cuda" else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(be, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank, world, local, dev, be)


def wrap_model(model: torch.nn.Module, info: DistInfo, find_unused_parameters: bool = True) -> torch.nn.Module:
    """Wrap in ``DistributedDataParallel`` when distributed (the model must already be on ``info.device``).

    ``find_unused_parameters`` defaults to True because GK-MVLP's loss terms can leave heads unused in a
    step (e.g. no sample with a positive entity for LECLS)."""
    if not info.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [info.device.index] if info.device.type == "cuda" else None
    return DDP(model, device_ids=ids, find_unused_parameters=find_unused_parameters)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP (or ``torch.compile``) wrapper."""
    while True:
        if hasattr(model, "module") and isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (identity in a single process). Returns a new tensor."""
    y = x.detach().clone()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
        y /= dist.get_world_size()
    return y


def any_flag(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is True on any rank (so every rank takes the same branch)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)
    return bool(flag)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def cleanup() -> None:
    """Destroy the process group if this process has one."""
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
