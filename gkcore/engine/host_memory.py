"""The host allocator setting for CPU training: keep freed memory in the process instead of returning it.

PyTorch's CPU tensors come from the C library's ``malloc``. glibc serves a block larger than its mmap
threshold (128 KiB at first, raised as such blocks are freed, at most 32 MiB) with a fresh ``mmap`` and
returns it to the system when it is freed, so every training step maps its large activations and
gradients again and touches each page anew: on the demo's 2-core machine about 55 000-83 000 page
faults a step, 0.19-0.27 s of system time. :func:`keep_freed_memory` raises both the mmap threshold and
the trim threshold, so that freed blocks stay in the heap and the next step reuses them (about 1 000
faults a step; measured in docs/experiments.md, "Host memory"). The results are unchanged: the same
operations run in the same order; only where their memory comes from differs. The process keeps its
peak heap until it exits. A process-wide setting: call it once, at the start of a CPU job
(``gkcore demo`` and ``gkcore pretrain`` on the CPU do); it does nothing where the C library is not
glibc. glibc before 2.35 takes an mmap threshold of at most 32 MiB, so there larger blocks are still
mapped; and blocks that other threads allocate from their own arenas (heaps of 64 MiB) are mapped above
that size in any version.
"""
from __future__ import annotations

import ctypes
import functools
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
_OLD_GLIBC_CAP = 32 << 20  # glibc < 2.35: the largest mmap threshold mallopt accepts on 64-bit


def keep_freed_memory(limit: int = KEEP_BYTES) -> Optional[str]:
    """Make glibc keep freed blocks up to ``limit`` bytes in the heap (``mallopt`` M_MMAP_THRESHOLD and
    M_TRIM_THRESHOLD; the mmap threshold at glibc's cap of 32 MiB where glibc < 2.35 refuses more).
    Returns a description of what was set, or None where nothing was (not Linux with glibc, or
    ``GKCORE_KEEP_FREED_MEMORY=0``)."""
    _check_bytes("limit", limit, low=1)
    if os.environ.get(ENV_OFF, "1").strip() == "0":
        return None
    for mmap_threshold in dict.fromkeys((limit, min(limit, _OLD_GLIBC_CAP))):  # the cap only if it differs
        if malloc_thresholds(mmap_threshold, limit):
            return (f"glibc keeps freed blocks up to {mmap_threshold >> 20} MiB in the heap (mallopt mmap "
                    f"threshold {mmap_threshold >> 20} MiB, trim threshold {limit >> 20} MiB)")
    return None


def malloc_thresholds(mmap_threshold: int, trim_threshold: int) -> bool:
    """Set glibc's mmap threshold (blocks at least this large get a mapping of their own, returned on
    free) and trim threshold (free heap top above this is returned to the system), in bytes. Setting
    them ends glibc's own dynamic raise of the mmap threshold. False where nothing was set (not Linux
    with glibc, or glibc refused the mmap threshold)."""
    _check_bytes("mmap_threshold", mmap_threshold)
    _check_bytes("trim_threshold", trim_threshold)
    if not sys.platform.startswith("linux"):
        return False
    libc = _glibc()
    return bool(libc is not None and libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
                and libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold))


def _check_bytes(name: str, v, low: int = 0) -> None:
    if not isinstance(v, int) or isinstance(v, bool):
        raise TypeError(f"{name} must be an int (bytes), got {type(v).__name__}")
    if not low <= v <= _INT_MAX:
        raise ValueError(f"{name} must be in [{low}, 2**31 - 1] (bytes), got {v}")


@functools.lru_cache(maxsize=None)
def _glibc():
    try:
        libc = ctypes.CDLL(None)  # the process's own symbols: the C library it runs on
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()  # only glibc has it
    except (OSError, AttributeError):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc
