"""Loader for the compiled extension ``gkcore._C`` (CPU part always, CUDA part when built).

``import gkcore`` never fails because ``_C`` is missing: the reference backend still serves, and
``gkcore info`` prints why the extension is unavailable. Set ``GKCORE_DISABLE_EXT=1`` to act as if it
were missing (used by tests).
"""
from __future__ import annotations

import os
from typing import Any, Callable, List, Mapping, Optional

import torch

_C = None
_ERROR: Optional[str] = None

if os.environ.get("GKCORE_DISABLE_EXT", "") not in ("", "0"):
    _ERROR = "disabled by GKCORE_DISABLE_EXT"
else:
    try:
        from gkcore import _C as _C  # type: ignore[no-redef]
    except ImportError as e:  # not built, or built for another Python
        _ERROR = f"gkcore._C could not be imported: {e}"

#: dtype codes shared with csrc/common/common.h
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


def ext():
    """The extension module, or None."""
    return _C


def ext_error() -> Optional[str]:
    return _ERROR


def has_cpu() -> bool:
    return _C is not None


def has_cuda_build() -> bool:
    return _C is not None and bool(_C.has_cuda())


def cuda_archs() -> str:
    return _C.cuda_archs() if has_cuda_build() else ""


def cpu_unavailable() -> Optional[str]:
    """Reason the C++ CPU backend cannot run, or None."""
    return None if _C is not None else (_ERROR or "gkcore._C is not built")


def built_with(symbol: str, op: str) -> Callable[[Mapping[str, Any]], List[str]]:
    """A backend ``check``: no reason when ``gkcore._C`` exports ``symbol``, else that it was built without
    ``op`` (an extension older than the op's C++ twin)."""
    def check(inputs: Mapping[str, Any]) -> List[str]:
        if hasattr(ext(), symbol):
            return []
        return [f"gkcore._C was built without {op} (rebuild: pip install --no-build-isolation -e .)"]

    return check


def cuda_unavailable() -> Optional[str]:
    """Reason the CUDA C++ backend cannot run, or None."""
    if _C is None:
        return _ERROR or "gkcore._C is not built"
    if not _C.has_cuda():
        return "gkcore._C was built without CUDA (nvcc not found or GKCORE_CUDA=OFF)"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    return None


def dtype_code(dt: torch.dtype) -> int:
    return DTYPE_CODES[dt]


def stream_ptr(device: torch.device) -> int:
    """The raw cudaStream_t of torch's current stream on ``device`` (0 on the CPU)."""
    if device.type != "cuda":
        return 0
    return torch.cuda.current_stream(device).cuda_stream
