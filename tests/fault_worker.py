"""A crash-safe runner for fault-injection cases: the cases run in a child process, so a segfault or an
abort shows up as one failed case instead of killing pytest.

Child side (``python fault_worker.py MODULE``): imports ``MODULE`` (which defines ``CASES``, a dict of
case id -> zero-argument function), reads case ids from stdin one per line, runs each and writes one JSON
line ``{"id", "outcome", "detail"}``: outcome ``"pass"`` (the case returned), ``"fail"`` (an
``AssertionError``: the case's own check failed) or ``"raised"`` (any other exception, the type and first
line of the message in ``detail``). A case states what it expects (a result checked against the
reference, or a ``ValueError`` naming an argument) and turns that into pass / fail itself.

Parent side: :func:`run_cases` feeds every id to a child, restarts the child after a crash (recording the
case it died on, with the signal) and returns ``{id: (outcome, detail)}``.
"""
from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from typing import Dict, Iterable, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))


def run_cases(module: str, ids: Iterable[str], timeout_s: float = 600.0, case_timeout_s: float = 60.0,
              env: Dict[str, str] = None) -> Dict[str, Tuple[str, str]]:
    """Run the cases ``ids`` of ``module`` in child processes; see the module docstring. A case that
    takes more than ``case_timeout_s`` (a hang) is killed and reported as ``"timeout"``; the whole run
    stops after ``timeout_s``."""
    todo = list(ids)
    results: Dict[str, Tuple[str, str]] = {}
    deadline = time.monotonic() + timeout_s
    child_env = dict(os.environ, **(env or {}))
    child_env["PYTHONPATH"] = HERE + os.pathsep + child_env.get("PYTHONPATH", "")
    while todo:
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "fault_worker.py"), module],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                text=True, env=child_env)
        lines: "queue.Queue[str]" = queue.Queue()
        reader = threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stdout] + [lines.put("")],
                                  daemon=True)
        reader.start()
        try:  # all remaining ids at once: the child works through them; a crash leaves the rest for a new child
            proc.stdin.write("".join(i + "\n" for i in todo))
            proc.stdin.close()
        except BrokenPipeError:  # the child died at start-up; reported below
            pass
        hung = False
        first = True
        while True:
            # the first answer also waits for the child's imports (torch, gkcore: slow on a loaded machine)
            wait = min(case_timeout_s + (300.0 if first else 0.0), max(1.0, deadline - time.monotonic()))
            try:
                line = lines.get(timeout=wait)
            except queue.Empty:
                hung = True
                proc.kill()
                break
            if not line:  # the child's stdout closed: it finished or died
                break
            first = False
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            results[rec["id"]] = (rec["outcome"], rec["detail"])
        rc = proc.wait()
        reader.join(timeout=10)
        todo = [i for i in todo if i not in results]
        if not todo:
            break
        if time.monotonic() > deadline:
            for i in todo:
                results[i] = ("timeout", "the case run ran past its time limit")
            break
        if hung:
            results[todo[0]] = ("timeout", f"no answer within {case_timeout_s:.0f} s (a hang?)")
        else:  # the child died on the first unanswered case
            why = f"signal {signal.Signals(-rc).name}" if rc < 0 else f"exit status {rc}"
            results[todo[0]] = ("crashed", f"the process died ({why})")
        todo = todo[1:]
    return results


def _child(module: str) -> None:
    import importlib

    mod = importlib.import_module(module)
    out = sys.stdout
    sys.stdout = sys.stderr  # stray prints must not garble the protocol
    for line in sys.stdin:
        cid = line.strip()
        if not cid:
            continue
        try:
            mod.CASES[cid]()
            outcome, detail = "pass", ""
        except AssertionError as e:
            outcome, detail = "fail", str(e) or "assertion failed"
        except Exception as e:  # noqa: BLE001 - every exception type is an outcome to report
            first = (str(e).splitlines() or [""])[0]
            outcome, detail = "raised", f"{type(e).__name__}: {first}"
        out.write(json.dumps({"id": cid, "outcome": outcome, "detail": detail[:500]}) + "\n")
        out.flush()


if __name__ == "__main__":
    _child(sys.argv[1])
