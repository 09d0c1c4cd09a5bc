"""pytest plugin used by benchmarks/gpu_check.py for its test and benchmark stages (``-p check_plugin``
with benchmarks/ on ``PYTHONPATH``; it does nothing unless the variables below are set).

* ``GKCORE_CHECK_RECORD=<file>``: every test's outcome (passed / failed / skipped, duration, skip reason
  or the end of the failure) is appended to the file as one JSON line the moment it is known, so a stage
  killed at its time budget keeps what it finished. Under pytest-xdist only the controller writes.
* ``GKCORE_CHECK_DEADLINE=<unix time>``: tests that would start after it are skipped with a note
  ("budget spent"), so a stage ends on its own instead of being killed. ``GKCORE_CHECK_MODULE_BUDGETS``
  (JSON ``{file stem: seconds}``, in run order) reserves time for the files still to come: a test of file
  k is skipped once ``deadline - now`` is below the budgets of the files after k.
* ``GKCORE_CHECK_AUTOTUNE=1``: the autotuned Triton kernels (info_nce) keep their first candidate only,
  the spill-free configuration checked ahead of time, so no time goes to timing candidates.
"""
from __future__ import annotations

import json
import os
import time

import pytest

_RECORD = os.environ.get("GKCORE_CHECK_RECORD")
_DEADLINE = float(os.environ["GKCORE_CHECK_DEADLINE"]) if os.environ.get("GKCORE_CHECK_DEADLINE") else None
_BUDGETS = json.loads(os.environ.get("GKCORE_CHECK_MODULE_BUDGETS") or "{}")


def limit_autotune() -> bool:
    """Keep only the first autotune candidate of gkcore's autotuned kernels. True when patched."""
    try:
        import gkcore.kernels.info_nce as k
    except Exception:  # triton missing: nothing is autotuned
        return False
    if getattr(k, "_gkcore_check_limited", False):
        return True
    full = k._configs

    def first_only(*args, **kwargs):
        return full(*args, **kwargs)[:1]

    k._configs = first_only
    k._TUNED.clear()
    k._gkcore_check_limited = True
    return True


def pytest_configure(config):
    if os.environ.get("GKCORE_CHECK_AUTOTUNE", "") not in ("", "0"):
        limit_autotune()


def _stem(nodeid: str) -> str:
    return os.path.splitext(os.path.basename(nodeid.split("::")[0]))[0]


def _reserve_after(stem: str) -> float:
    names = list(_BUDGETS)
    if stem not in names:
        return 0.0
    return float(sum(_BUDGETS[n] for n in names[names.index(stem) + 1:]))


def pytest_runtest_setup(item):
    if _DEADLINE is None:
        return
    left = _DEADLINE - time.time()
    stem = _stem(item.nodeid)
    if left <= _reserve_after(stem):
        pytest.skip(f"gpu check: budget spent ({stem}: {max(left, 0):.0f} s left, "
                    f"{_reserve_after(stem):.0f} s kept for later files)")


def pytest_runtest_logreport(report):
    if not _RECORD:
        return
    if report.when != "call" and not (report.skipped or report.failed):
        return
    # under xdist the workers' reports reach the controller too: write there only
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    rec = {"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
           "duration_s": round(report.duration, 4)}
    if report.skipped:
        lr = report.longrepr
        rec["reason"] = lr[2] if isinstance(lr, tuple) and len(lr) == 3 else str(lr)[-400:]
    elif report.failed:
        rec["error"] = str(report.longrepr)[-1500:]
    with open(_RECORD, "a") as fh:
        fh.write(json.dumps(rec) + "\n")
