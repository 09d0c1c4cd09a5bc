"""The output folder of a run: an exclusive lock, a writability check, and the removal of temporaries
left by a process that died while writing.

* :func:`lock_output` takes an exclusive ``flock`` on the folder itself (no lock file is created, so the
  folder's contents stay as the run wrote them). A second process asking for the same folder gets
  :class:`OutputLockedError` at once, naming the holder's PID where ``/proc/locks`` tells it. The lock is
  re-entrant within a process (the command line takes it before building the model, the trainer again)
  and is released by the kernel when the process ends, however it ends.
* :func:`check_writable` creates and removes a probe file, so a read-only folder (or file system) is
  reported before any work is done.
* :func:`clean_stale_temporaries` removes ``NAME.tmp-PID`` files (the atomic writes of checkpoints and
  weights) whose PID is no longer a running process; a live PID's file is left alone (call it while
  holding the lock, before writing anything).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
from typing import Dict, Iterator, List, Optional, Tuple

__all__ = ["OutputLockedError", "lock_output", "check_writable", "clean_stale_temporaries", "pid_alive"]

_TMP = re.compile(r"\.tmp-(\d+)$")
_HELD: Dict[str, List[int]] = {}  # real path -> [fd, depth]


class OutputLockedError(RuntimeError):
    """Another process holds the output folder."""


def _holder(path: str) -> Optional[int]:
    """PID of the process holding an flock on ``path`` (Linux ``/proc/locks``), or None."""
    try:
        st = os.stat(path)
        want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        with open("/proc/locks") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == want:
                    return int(parts[4])
    except (OSError, ValueError):
        pass
    return None


@contextlib.contextmanager
def lock_output(path: str) -> Iterator[str]:
    """Create ``path`` if needed and hold an exclusive lock on it for the ``with`` block."""
    os.makedirs(path, exist_ok=True)
    real = os.path.realpath(path)
    held = _HELD.get(real)
    if held is not None:
        held[1] += 1
    else:
        fd = os.open(real, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            pid = _holder(real)
            who = f"process {pid}" if pid else "another process"
            raise OutputLockedError(f"output folder {path} is in use by {who} (another gkcore run?); wait for it "
                                    "to finish or choose another --out") from None
        held = _HELD[real] = [fd, 1]
    try:
        yield path
    finally:
        held[1] -= 1
        if held[1] == 0:
            _HELD.pop(real, None)
            os.close(held[0])  # closing the descriptor releases the lock


def check_writable(path: str) -> None:
    """Raise ``OSError`` naming ``path`` unless a file can be created in it (creating the folder first)."""
    try:
        if os.path.exists(path) and not os.path.isdir(path):
            raise NotADirectoryError(errno.ENOTDIR, "it exists and is not a folder", path)
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".gkcore-write-test.tmp-{os.getpid()}")
        with open(probe, "wb") as f:
            f.write(b"x")
        os.remove(probe)
    except OSError as e:
        raise OSError(e.errno, f"output folder {path} is not writable: {e.strerror}", path) from None


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_stale_temporaries(path: str) -> List[Tuple[str, int]]:
    """Remove ``*.tmp-PID`` files in ``path`` whose PID is not running; returns ``[(file, pid)]`` removed."""
    removed = []
    try:
        names = os.listdir(path)
    except OSError:
        return removed
    for name in sorted(names):
        m = _TMP.search(name)
        if not m:
            continue
        pid = int(m.group(1))
        full = os.path.join(path, name)
        # this process writes nothing before it cleans, so a file with its own PID is a leftover too
        if (pid != os.getpid() and pid_alive(pid)) or not os.path.isfile(full):
            continue
        with contextlib.suppress(OSError):
            os.remove(full)
            removed.append((full, pid))
    return removed
