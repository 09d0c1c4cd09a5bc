"""Fault injection, ops and modules: several hundred bad and edge inputs (tests/fault_ops_cases.py), run in
a child process by the crash-safe worker (tests/fault_worker.py), so that a segfault is one failed case
and not the end of the test run. Each case asserts the documented outcome: a ``ValueError`` naming the
bad argument, or the float64 reference's result on every backend (NaN exactly where the non-finite
rule of the op says so)."""
import pytest

import fault_ops_cases
from fault_worker import run_cases

IDS = sorted(fault_ops_cases.CASES)


@pytest.fixture(scope="module")
def results():
    return run_cases("fault_ops_cases", IDS, timeout_s=900)


@pytest.mark.parametrize("cid", IDS)
def test_op_fault_case(results, cid):
    outcome, detail = results[cid]
    assert outcome == "pass", f"{cid}: {outcome}: {detail}"


def test_worker_reports_a_crash_as_a_failed_case(tmp_path, monkeypatch):
    """The worker survives a case that kills its process and goes on with the next case."""
    (tmp_path / "crash_cases.py").write_text(
        "import os, signal\n"
        "def ok():\n    pass\n"
        "def boom():\n    os.kill(os.getpid(), signal.SIGSEGV)\n"
        "def bad():\n    raise KeyError('x')\n"
        "CASES = {'a': ok, 'b': boom, 'c': ok, 'd': bad}\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    res = run_cases("crash_cases", ["a", "b", "c", "d"], timeout_s=120)
    assert res["a"] == ("pass", "")
    assert res["b"] == ("crashed", "the process died (signal SIGSEGV)")
    assert res["c"] == ("pass", "")
    assert res["d"] == ("raised", "KeyError: 'x'")
