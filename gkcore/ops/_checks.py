"""Input checks and the non-finite rule shared by every op, whatever backend serves the call.

Each public op validates its arguments once, before choosing a backend, so the reference, cpu, cuda and
triton backends see the same inputs and refuse the same ones with the same ``ValueError`` (naming the
argument). The helpers here are the pieces several ops need:

* :func:`check_scalar` -- a Python number or a one-element floating tensor that must be finite (a
  tensor's value is read on the host; see the function for when that is skipped);
* :func:`check_grid` -- a ``(gh, gw)`` pair of positive ints;
* :func:`nonfinite_rows`, :func:`any_nonfinite` -- exact NaN/inf detection without host synchronisation;
* :func:`nan_where` -- the non-finite rule of the loss ops: a row whose inputs hold a NaN or an inf
  gets a NaN loss (never inf, never a finite value that depends on the backend).
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from ._util import is_compiling

__all__ = ["check_scalar", "check_grid", "nonfinite_rows", "any_nonfinite", "nan_where"]


def check_scalar(name: str, value, device: Optional[torch.device] = None, *, read_device: bool = True) -> None:
    """``value`` must be a real number or a one-element floating tensor (on ``device`` when given), and
    finite. A tensor on the CPU is read at no cost; a tensor on a GPU is read (one host synchronisation)
    unless ``read_device`` is False (ops that promise no host synchronisation). Nothing is read while
    ``torch.compile`` traces."""
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            raise ValueError(f"{name} must be a float or a one-element floating tensor, got dtype {value.dtype}")
        if value.numel() != 1:
            raise ValueError(f"{name} must be a float or a one-element tensor, got shape {tuple(value.shape)}")
        if device is not None and value.device != device:
            raise ValueError(f"{name} is on {value.device} but the inputs are on {device}")
        if is_compiling() or (value.device.type != "cpu" and not read_device):
            return
        v = float(value.detach().reshape(()))
        if not math.isfinite(v):
            raise ValueError(f"{name} must be finite, got a tensor holding {v}")
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a float or a one-element tensor, got {type(value).__name__}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be finite, got {value!r}")


def check_grid(grid_size, name: str = "grid_size"):
    """``(gh, gw)`` as two positive ints from a pair (tuple, list, ``torch.Size``); anything else raises."""
    if isinstance(grid_size, (str, bytes)) or not hasattr(grid_size, "__len__") or len(grid_size) != 2:
        raise ValueError(f"{name} must be a (gh, gw) pair of positive ints, got {grid_size!r}")
    out = []
    for v in grid_size:
        if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.is_floating_point():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise ValueError(f"{name} must be a (gh, gw) pair of positive ints, got {grid_size!r}")
        out.append(int(v))
    gh, gw = out
    if gh <= 0 or gw <= 0:
        raise ValueError(f"{name} must be positive, got {(gh, gw)}")
    return gh, gw


def nonfinite_rows(x: torch.Tensor) -> torch.Tensor:
    """(M,) bool: rows of the (M, D) tensor ``x`` holding a NaN or an inf (no host synchronisation)."""
    if x.shape[0] == 0 or x.shape[1] == 0:
        return torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    x = x.detach()  # two reductions that propagate NaN: a pass each, no boolean copy of x
    return ~(torch.isfinite(x.amax(dim=1)) & torch.isfinite(x.amin(dim=1)))


def any_nonfinite(x: Optional[torch.Tensor]) -> torch.Tensor:
    """0-d bool: ``x`` holds a NaN or an inf. One pass (min and max) without a boolean copy of ``x``;
    no host synchronisation. ``None`` or an empty tensor gives False."""
    if x is None or x.numel() == 0:
        dev = x.device if x is not None else "cpu"
        return torch.zeros((), dtype=torch.bool, device=dev)
    lo, hi = torch.aminmax(x.detach())
    return ~(torch.isfinite(lo) & torch.isfinite(hi))


def nan_where(out: torch.Tensor, bad_rows: torch.Tensor, reduction: str) -> torch.Tensor:
    """The loss ops' non-finite rule: per-row losses (``reduction='none'``) become NaN where ``bad_rows``;
    a reduced loss becomes NaN when any row is bad. ``bad_rows`` has the per-row shape of ``out``."""
    nan = torch.full((), float("nan"), dtype=out.dtype, device=out.device)
    if reduction == "none":
        return torch.where(bad_rows.reshape(out.shape), nan, out)
    return torch.where(bad_rows.any(), nan, out)
