"""The host allocator setting for CPU training: keep freed memory in the process instead of returning it.

PyTorch's CPU tensors come from the C library's ``malloc``. glibc serves a block larger than its mmap
threshold (128 KiB at first, raised as such blocks are freed, at most 32 MiB) with a fresh ``mmap`` and
returns it to the system when it is freed, so every training step maps its large activations and
gradients again and touches each page anew: on the demo's 2-core machine about 55 000-83 000 page
faults a step, 0.19-0.27 s of system time. :func:`keep_freed_memory` raises both the mmap threshold and
the trim threshold, so that freed blocks stay in the heap and the next step reuses them (about 1 000
faults a step; measured in docs/experiments.md). The results are unchanged: the same operations run in
the same order; only where their memory comes from differs. The process keeps its peak heap until it
exits. A process-wide setting: call it once, at the start of a CPU job (``gkcore demo`` and
``gkcore pretrain`` on the CPU do); it does nothing where the C library is not glibc.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from typing import Optional

__all__ = ["keep_freed_memory", "malloc_thresholds", "KEEP_BYTES", "ENV_OFF"]

#: the mmap and trim thresholds set (1 GiB): blocks up to this size come from the heap and stay there
KEEP_BYTES = 1 << 30
#: set this environment variable to 0 to leave the allocator as it is
ENV_OFF = "GKCORE_KEEP_FREED_MEMORY"
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_INT_MAX = 2**31 - 1  # mallopt takes a C int


def keep_freed_memory(limit: int = KEEP_BYTES) -> Optional[str]:
    """Make glibc keep freed blocks up to ``limit`` bytes in the heap (``mallopt`` M_MMAP_THRESHOLD and
    M_TRIM_THRESHOLD). Returns a description of what was set, or None where nothing was (not Linux with
    glibc, ``GKCORE_KEEP_FREED_MEMORY=0``, or glibc refused the value)."""
    if not isinstance(limit, int) or isinstance(limit, bool) or not 0 < limit <= _INT_MAX:
        raise ValueError(f"limit must be an int in [1, 2**31 - 1] (bytes), got {limit!r}")
    if os.environ.get(ENV_OFF, "1").strip() == "0" or not malloc_thresholds(limit, limit):
        return None
    return f"glibc keeps freed blocks up to {limit >> 20} MiB (mallopt mmap/trim thresholds)"


def malloc_thresholds(mmap_threshold: int, trim_threshold: int) -> bool:
    """Set glibc's mmap threshold (blocks at least this large get a mapping of their own, returned on
    free) and trim threshold (free heap top above this is returned to the system), in bytes. Setting
    them ends glibc's own dynamic raise of the mmap threshold. False where nothing was set (not Linux
    with glibc, or glibc refused a value)."""
    for name, v in (("mmap_threshold", mmap_threshold), ("trim_threshold", trim_threshold)):
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= _INT_MAX:
            raise ValueError(f"{name} must be an int in [0, 2**31 - 1] (bytes), got {v!r}")
    if not sys.platform.startswith("linux"):
        return False
    libc = _glibc()
    return bool(libc is not None and libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
                and libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold))


def _glibc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()  # only glibc has it
    except (OSError, AttributeError):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc
