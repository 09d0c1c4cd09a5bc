"""gkcore.engine.host_memory: glibc keeps freed blocks in the heap after keep_freed_memory(). Each check runs in a
fresh interpreter: the setting is process-wide, and the process before it is the comparison."""
import ctypes
import os
import subprocess
import sys

import pytest

from gkcore.engine.host_memory import ENV_OFF, keep_freed_memory, malloc_thresholds

_PROBE = r"""
import ctypes, json, sys
import torch
from gkcore.engine.host_memory import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2

def probe(mib):
    # bytes newly mapped while a tensor of mib MiB is alive, and the heap's free bytes once it is freed
    base = libc.mallinfo2().hblkhd
    t = torch.ones(mib << 18)
    mapped = libc.mallinfo2().hblkhd - base
    del t
    return mapped, libc.mallinfo2().fordblks

# 24 MiB, then 28 MiB: glibc raises its own mmap threshold to a freed mapping's size, so the second
# block must be larger to be mapped without the setting; both are under glibc < 2.35's 32 MiB cap
before = probe(24)
what = keep_freed_memory()
after = probe(28)
print(json.dumps({"before": before, "after": after, "what": what}))
"""


def _glibc_with_mallinfo2() -> bool:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallinfo2")
    except OSError:
        return False


needs_glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or not _glibc_with_mallinfo2(),
                                 reason="the setting and its probe (mallinfo2) are glibc's (2.33+)")


def _run(env_extra=None):
    import json

    env = {**os.environ, **(env_extra or {})}
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@needs_glibc
def test_freed_blocks_stay_in_the_heap():
    # the effect on a training step (page faults, system time, step time) is measured side by side in
    # benchmarks/test_bench_train_step.py::test_train_step_host_allocator
    r = _run({ENV_OFF: "1"})
    (mapped0, free0), (mapped1, free1) = r["before"], r["after"]
    assert r["what"] and "glibc" in r["what"]
    assert mapped0 >= 24 << 20  # by default the first such block is a mapping of its own, returned on free
    assert free0 < 24 << 20
    assert mapped1 < 1 << 20  # afterwards it comes from the heap
    assert free1 >= 28 << 20  # and stays there, free for the next allocation


@needs_glibc
def test_the_environment_variable_leaves_the_allocator_alone():
    r = _run({ENV_OFF: "0"})
    assert r["what"] is None
    assert r["after"][0] >= 28 << 20


def test_a_bad_limit_is_refused_naming_it():
    for bad in (0, -5, 2**31):
        with pytest.raises(ValueError, match="limit"):
            keep_freed_memory(bad)
    for bad in (1.5, True, "1g"):
        with pytest.raises(TypeError, match="limit"):
            keep_freed_memory(bad)
    with pytest.raises(ValueError, match="mmap_threshold"):
        malloc_thresholds(-1, 0)
    with pytest.raises(ValueError, match="trim_threshold"):
        malloc_thresholds(0, 2**40)
    with pytest.raises(TypeError, match="trim_threshold"):
        malloc_thresholds(0, None)
