"""Small helpers shared by the op modules: output allocation (poisoned in tests), dtypes, raw pointers,
input checks."""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional, Sequence, Union

import torch

_POISON = False

#: 16-bit floating dtypes (served by the GPU backends, accumulated in float32)
HALF_DTYPES = (torch.float16, torch.bfloat16)


def acc_dtype(dt: torch.dtype) -> torch.dtype:
    """The accumulation dtype of the kernels: float64 for float64 inputs, else float32."""
    return torch.float64 if dt == torch.float64 else torch.float32


def ptr(t: Optional[torch.Tensor]) -> int:
    """``t.data_ptr()``, or 0 (a null pointer for the C++ kernels) for None."""
    return 0 if t is None else t.data_ptr()


@contextlib.contextmanager
def poison_outputs(enabled: bool = True) -> Iterator[None]:
    """Inside this context every kernel output is allocated filled with NaN, so an element a kernel
    forgets to write shows up in the parity checks instead of passing as leftover memory."""
    global _POISON
    old, _POISON = _POISON, enabled
    try:
        yield
    finally:
        _POISON = old


def new_output(shape: Sequence[int], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if _POISON and dtype.is_floating_point:
        return torch.full(tuple(shape), math.nan, dtype=dtype, device=device)
    if _POISON:
        return torch.full(tuple(shape), -7777, dtype=dtype, device=device)
    return torch.empty(tuple(shape), dtype=dtype, device=device)


def is_compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - old torch
        return False


def check_tensor(name: str, t, ndims: Sequence[int] = None, floating: bool = False) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndims is not None and t.dim() not in ndims:
        want = " or ".join(str(n) for n in ndims)
        raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(t.shape)}")
    if floating and not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")


def check_same_device(**tensors: torch.Tensor) -> None:
    devs = {k: t.device for k, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devs.values())) > 1:
        desc = ", ".join(f"{k} on {d}" for k, d in devs.items())
        raise ValueError(f"inputs must be on one device: {desc}")


def as_scalar(x: Union[float, torch.Tensor], name: str) -> Union[float, torch.Tensor]:
    """A float, or a one-element tensor reshaped to 0-d (shape () or (1,) accepted); a scale or a
    temperature given to a loss."""
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise ValueError(f"{name} must be a float or a one-element tensor, got shape {tuple(x.shape)}")
        return x.reshape(())
    if isinstance(x, (int, float)):
        return float(x)
    raise TypeError(f"{name} must be a float or a 0-d tensor, got {type(x).__name__}")
