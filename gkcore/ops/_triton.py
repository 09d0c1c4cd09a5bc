"""Triton availability and interpreter handling shared by every Triton backend.

Triton kernels run on CUDA tensors. On the CPU they run only under the Triton interpreter
(``TRITON_INTERPRET=1`` set before triton is imported) and only when ``backend='triton'`` is asked for
by name, so that automatic choice on the CPU never lands on the (slow) interpreter.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

_triton = None
_ERROR: Optional[str] = None
try:
    import triton as _triton  # noqa: F401
except Exception as e:  # pragma: no cover - depends on the install
    _ERROR = f"triton could not be imported: {e}"


def interpreter_on() -> bool:
    """True when Triton runs its CPU interpreter (``TRITON_INTERPRET`` set, as it must be before triton is
    imported). The one place this is read: backends, kernel launchers, ``gkcore.aot`` and the tests."""
    return os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


def triton_version() -> Optional[str]:
    return getattr(_triton, "__version__", None) if _triton is not None else None


def triton_unavailable() -> Optional[str]:
    """Reason no Triton backend can run in this process, or None."""
    if _triton is None:
        return _ERROR or "triton is not installed"
    if not torch.cuda.is_available() and not interpreter_on():
        return "no CUDA device (set TRITON_INTERPRET=1 before importing triton to run on the CPU interpreter)"
    return None


def triton_devices():
    """(devices served automatically, devices served only by explicit request)."""
    return ("cuda",), (("cpu",) if interpreter_on() else ())
