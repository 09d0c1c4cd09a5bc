"""The prepared GPU check: everything a GPU must show about gkcore, in one command that fits 8 minutes.

    python benchmarks/gpu_check.py            # on a machine with a CUDA GPU (docs/gpu-check.md)
    python benchmarks/gpu_check.py --smoke    # anywhere: tiny shapes, Triton interpreter, no build (CI)

Stages, in order, each timed and printed, each with a time budget (``BUDGETS``):

1. ``env``: versions, device, driver; the CPU's and the GPU's peaks (perf_model's probes).
2. ``build``: ``pip install --no-build-isolation -e .`` with ``GKCORE_CUDA=ON`` and
   ``CMAKE_ARGS=-DCMAKE_CUDA_ARCHITECTURES=<the device's, e.g. 90>``; then ``gkcore._C`` is checked for its
   CUDA part. Skipped in smoke mode.
3. ``parity_design``: every cuda and triton backend against the float64 reference (the 2x rule of docs/numerics.md,
   forward and gradients) in float32, bfloat16 and float16 at the shapes of docs/performance.md.
4. ``determinism``: each backend twice on the same inputs, outputs and gradients bitwise equal.
5. ``parity_tests``: the GPU tests of tests/ (CUDA-skipped, GPU-marked and Triton-on-CUDA tests of the op
   test files, ``-k "cuda or triton or gpu"``), under pytest-xdist when it is installed.
6. ``bench``: ``gkcore bench`` at the full shapes with every provider side by side (check mode: the
   ``full`` pass, 5 rounds, docs/performance.md shapes; per-op budgets), each time with its ratio to the floor.
7. ``train_step``: a bf16 training step of ``gk_mvlp_base`` at batch 64, automatic (fused) backends
   against ``backend="reference"``: steps/s and peak memory.

A stage gets its budget plus whatever earlier stages left unused, never time reserved for later stages:
its hard limit is ``end of run - the budgets of the stages after it``; a stage that reaches it is killed
and marked ``cut`` and the run goes on. Inside a stage, cases stop starting a few seconds before the limit
("budget spent" notes), and every finished case is on disk at once, so cut stages keep their results.
Triton and inductor caches live in one folder for the whole run (``--cache-dir``) and the autotuned
kernels keep their first configuration (``GKCORE_CHECK_AUTOTUNE=1``).

Output: ``gpu_check.json`` (device, driver, versions, commit, shapes, raw times, peak memory, errors vs
float64, pass/fail of every case) and ``gpu_check.md`` (a short summary), rewritten after every stage,
under ``$OUT`` when it is set and under ``benchmarks/results/`` (as ``gpucheck-<device>-<date>-<commit>``);
``$OUT`` also gets the console log, the build log and the benchmark JSON.
Exit status: 0 when every stage ran and every check passed, 1 when a check failed or a stage errored,
2 when nothing failed but a stage was cut or skipped for time.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, Optional

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
SCHEMA = "gkcore-gpu-check/1"

#: total wall budget of the stages (the device tool's call adds the wheel install, ~5 s, to reach 8 min)
TOTAL_BUDGET_S = 465

#: stage -> (budget s on one H100/H200, budget s in smoke mode, the estimate behind the GPU budget).
#: Estimates come from section 2's model (benchmarks/perf_model.py) for the GPU work, which is small at
#: these shapes; the fixed costs dominate and are assumptions until a first run measures them: a Python
#: process with torch and a CUDA context ~5 s, one Triton kernel specialisation ~1.5 s to compile, one
#: torch.compile (inductor) graph, forward + backward, ~15 s, the float64 CPU references at the CPU's
#: float64 matrix rate (assumed 200 GFLOP/s on 16 cores; the env stage measures it and parity_design
#: predicts each case from it). docs/gpu-check.md has the same table.
BUDGETS: Dict[str, tuple] = {
    "env": (15, 30, "process + CUDA context 5 s, CPU probe 1.5 s, GPU probe (8192^3 bf16 product, 4096^3 fp32, "
                    "1 GiB copy) 1 s, nvidia-smi 1 s: ~9 s"),
    "build": (95, 0, "the same build (GKCORE_CUDA=ON, CMAKE_CUDA_ARCHITECTURES=90, nvcc 13.0 as on the GPU "
                     "machine) took 87 s user + 9 s system CPU on the 2-core development box (16 min wall "
                     "under a load of 10); on 16 idle cores with the C++ files compiled in parallel: 60-90 s"),
    "parity_design": (60, 60, "19 cases; float64 CPU truths at 3x the reference's FLOPs / 200 GFLOP/s: "
                              "linear_cross_entropy bf16 at 8192 tokens 1.2 TFLOP = 17.6 s, fp32 and fp16 at 2048 "
                              "tokens 4.4 s each, info_nce 0.1 TFLOP = 1.6 s x 4, region_pool output 7 (B 64) "
                              "0.8 s x 6, region_attention 0.8 s x 3, region_pool output 1 0.1 s x 6: ~41 s; "
                              "~15 Triton specialisations x 1.5 s = 22 s; GPU work < 1 s: ~63 s"),
    "determinism": (15, 40, "13 cases, each two runs of a kernel at the docs/performance.md shape (floors 0.01-13 ms) on "
                            "kernels already compiled by parity_design, inputs made on the CPU: ~5 s"),
    "parity_tests": (75, 60, "~80 GPU-selected tests of the op files (82 selected here on the CPU); each a small shape "
                             "(microseconds of GPU); pytest + xdist start ~15 s, ~60 Triton specialisations x 1.5 s "
                             "over 8 workers ~15 s, hypothesis draws: ~45 s"),
    "bench": (165, 90, "~55 cases in check mode; GPU time per case = ratio x floor, floors 0.01-13 ms (the "
                       "largest: linear_cross_entropy fp32 full, 0.88 TFLOP at 67 TFLOP/s), 8 calls per case, "
                       "at 10x the floor < 5 s in all; 8 torch.compile graphs x 15 s = 120 s (run last in each "
                       "file, so they are what a cut removes); float64 truths of the ITC module (2 dtypes, "
                       "0.2 TFLOP + element work) ~10 s; process start 10 s: ~145 s"),
    "train_step": (40, 45, "2 models of ~0.5 G parameters, random init on the GPU ~3 s each; a step is 29.5 "
                           "TFLOP (perf_model.gk_mvlp_step) = 37 ms at 790 TFLOP/s, ~0.12 s at 30 % of peak; "
                           "2 warm-up steps (JIT of the fused ops in the step's dtypes ~10 s) + 5 timed steps "
                           "per model: ~30 s"),
}
ORDER = ["env", "build", "parity_design", "determinism", "parity_tests", "bench", "train_step"]
WORKER_STAGES = {"env", "parity_design", "determinism", "train_step"}

OP_TEST_FILES = ["tests/test_region_pool.py", "tests/test_region_attention.py", "tests/test_info_nce.py",
                 "tests/test_linear_cross_entropy.py", "tests/test_hard_negatives.py",
                 "tests/test_info_nce_modules.py", "tests/test_region_attention_modules.py"]
#: benchmark files in run order with their budgets (s) inside the bench stage (check mode)
BENCH_OPS = {"info_nce": 30, "region_attention": 28, "linear_cross_entropy": 30, "info_nce_modules": 27,
             "region_pool": 22, "hard_negatives": 8}
SMOKE_BENCH_OPS = {"region_pool": 50}
GRACE_S = 6  # a stage stops starting cases this long before its hard limit


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------------ output
class Log:
    """Console output, also written to ``<out>/gpu_check.log``."""

    def __init__(self, path: Optional[pathlib.Path]):
        self.fh = open(path, "a") if path else None
        self.lock = threading.Lock()

    def __call__(self, msg: str = "") -> None:
        with self.lock:
            print(msg, flush=True)
            if self.fh:
                self.fh.write(msg + "\n")
                self.fh.flush()


def git_commit() -> Dict[str, Any]:
    out = {"commit": None, "dirty": None, "source": None}
    try:
        r = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if r.returncode == 0 and r.stdout.strip():
            dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            out.update(commit=r.stdout.strip(), dirty=bool(dirty), source="git")
            return out
    except (OSError, subprocess.SubprocessError):
        pass
    if os.environ.get("GKCORE_COMMIT"):
        out.update(commit=os.environ["GKCORE_COMMIT"], source="GKCORE_COMMIT (no git here)")
    else:
        out.update(commit="unknown", source="no git and no GKCORE_COMMIT")
    return out


def tree_digest() -> str:
    """sha256 over the sources that decide what runs (gkcore/, kernels/, csrc/, python/, benchmarks/*.py,
    tests/*.py, CMakeLists.txt, pyproject.toml): identifies the code even where no git travelled."""
    h = hashlib.sha256()
    files: List[pathlib.Path] = []
    for d, pat in (("gkcore", "**/*.py"), ("kernels", "**/*.py"), ("csrc", "**/*"), ("python", "**/*"),
                   ("benchmarks", "*.py"), ("tests", "*.py")):
        files += [p for p in (REPO / d).glob(pat) if p.is_file() and "__pycache__" not in p.parts]
    files += [REPO / "CMakeLists.txt", REPO / "pyproject.toml"]
    for p in sorted(set(files)):
        if p.exists():
            h.update(str(p.relative_to(REPO)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def read_jsonl(path: pathlib.Path) -> List[Dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                out.append({"kind": "unreadable", "line": line[:200]})
    return out


def _fmt_s(s: Optional[float]) -> str:
    from gkcore.cli.bench import fmt_time

    return fmt_time(s)


def _fmt_b(b: Optional[float]) -> str:
    if b is None:
        return "-"
    return f"{b / 2 ** 20:.1f} MiB" if b < 2 ** 30 else f"{b / 2 ** 30:.2f} GiB"


def markdown(res: Dict[str, Any]) -> str:
    env = res.get("env") or {}
    L = [f"# gkcore GPU check ({res['mode']})", "",
         f"- device: {env.get('device', '?')}, driver {env.get('driver') or '-'}, torch {env.get('torch', '?')}, "
         f"triton {env.get('triton', '?')}, python {env.get('python', '?')}",
         f"- commit: {res['commit'].get('commit')} ({res['commit'].get('source')}"
         f"{', dirty' if res['commit'].get('dirty') else ''}); tree digest {res['tree_digest'][:16]}",
         f"- started {res['started']}, wall {res.get('wall_s', 0):.0f} s of {res['total_budget_s']} s budget; "
         f"result: **{res['summary']['verdict']}**", ""]
    pk = (res.get("peaks") or {})
    for k, p in pk.items():
        m = p.get("measured") or {}
        L.append(f"- peaks {k}: " + ", ".join(f"{n} {v / 1e12:.3g} T/s" for n, v in m.items())
                 + f" measured; floors use: {p.get('source')}")
    L += ["", "| stage | status | wall | budget | limit | note |", "|---|---|---|---|---|---|"]
    for st in res["stages"]:
        L.append(f"| {st['name']} | {st['status']} | {st.get('wall_s', 0):.1f} s | {st['budget_s']} s | "
                 f"{st.get('limit_s') or 0:.0f} s | {st.get('note', '')[:120]} |")
    cases = res.get("parity", [])
    if cases:
        L += ["", "## parity (docs/performance.md shapes, vs float64)", "", "| op | backend | dtype | status | errors |",
              "|---|---|---|---|---|"]
        for c in cases:
            errs = c.get("errors") or {}
            e = ", ".join(f"{k} {v:.2e}" if isinstance(v, (int, float)) else f"{k} {v}" for k, v in errs.items())
            why = c.get("reason") or (c.get("error") or "")[:100]
            L.append(f"| {c['op']} | {c['backend']} | {c['dtype']} | {c['status']} | {e or why} |")
    det = res.get("determinism", [])
    if det:
        L += ["", "## determinism", "", "| op | backend | dtype | status |", "|---|---|---|---|"]
        for c in det:
            L.append(f"| {c['op']} | {c['backend']} | {c['dtype']} | {c['status']} {c.get('reason', '')} |")
    t = res.get("tests") or {}
    if t:
        L += ["", f"## GPU tests of tests/: {t.get('passed', 0)} passed, {t.get('failed', 0)} failed, "
                  f"{t.get('skipped', 0)} skipped"]
        for f in t.get("failures", [])[:20]:
            L.append(f"- FAILED {f}")
    rows = res.get("bench") or []
    if rows:
        L += ["", "## bench (median; x floor = median / perf-model floor)", "",
              "| op | shape | mode | provider | median | x floor | peak mem | vs ref |", "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            shape = ",".join(f"{k}={v}" for k, v in (r.get("shape") or {}).items())
            ratio = r.get("ratio_to_floor")
            sp = r.get("speedup_vs_reference")
            L.append(f"| {r.get('op')} | {shape} | {r.get('mode')} | {r.get('provider')} | {_fmt_s(r.get('median_s'))} | "
                     f"{f'{ratio:.1f}' if ratio else '-'} | {_fmt_b(r.get('peak_bytes'))} | "
                     f"{f'{sp:.2f}x' if sp else '-'} |")
        sk = res.get("bench_skips") or []
        if sk:
            L += ["", f"{len(sk)} benchmark cases skipped:"] + [f"- {s}" for s in sk[:30]]
    tr = res.get("train_step") or []
    if tr:
        L += ["", "## training step", "", "| variant | status | steps/s | median step | peak mem | note |",
              "|---|---|---|---|---|---|"]
        for r in tr:
            if r.get("kind") == "train_compare":
                continue
            sps = r.get("steps_per_s")
            L.append(f"| {r.get('variant')} ({r.get('backend')}) | {r.get('status')} | {f'{sps:.2f}' if sps else '-'} | "
                     f"{_fmt_s(r.get('median_step_s'))} | {_fmt_b(r.get('peak_bytes'))} | "
                     f"{(r.get('reason') or r.get('error') or '')[:100]} |")
        cmp_ = next((r for r in tr if r.get("kind") == "train_compare"), None)
        if cmp_:
            mr = cmp_.get("memory_ratio")
            L.append(f"\nfused vs reference: {cmp_['speedup']:.2f}x steps/s (target >= 1.3), peak memory "
                     f"{f'{mr:.2f}x' if mr else '-'} (target <= 0.8)")
    if res["summary"]["failures"]:
        L += ["", "## failures"] + [f"- {f}" for f in res["summary"]["failures"][:40]]
    return "\n".join(L) + "\n"


# ------------------------------------------------------------------------------------------ stages
class Runner:
    def __init__(self, args):
        self.args = args
        self.smoke = args.smoke
        self.t_start = time.time()
        self.total = args.total_budget if args.total_budget else (
            sum(b[1] for b in BUDGETS.values()) if self.smoke else TOTAL_BUDGET_S) * args.budget_scale
        self.t_end = self.t_start + self.total
        self.stages = [s for s in ORDER if not args.stages or s in args.stages]
        col = 1 if self.smoke else 0
        self.budget = {s: BUDGETS[s][col] * args.budget_scale for s in self.stages}
        if self.smoke:
            self.budget["build"] = 0
        out_env = os.environ.get("OUT")
        self.out = pathlib.Path(args.out or out_env) if (args.out or out_env) else None
        self.results_dir = pathlib.Path(args.results_dir) if args.results_dir else HERE / "results"
        self.cache = pathlib.Path(args.cache_dir)
        self.work = self.cache / f"run-{os.getpid()}"
        self.records = self.work / "records"
        self.records.mkdir(parents=True, exist_ok=True)
        for d in (self.out, self.results_dir):
            if d:
                d.mkdir(parents=True, exist_ok=True)
        self.log = Log(self.out / "gpu_check.log" if self.out else None)
        self.state_file = self.work / "state.json"
        c = git_commit()
        self.res: Dict[str, Any] = {
            "schema": SCHEMA, "mode": "smoke" if self.smoke else "full", "started": now_iso(), "commit": c,
            "tree_digest": tree_digest(), "argv": sys.argv[1:], "total_budget_s": self.total,
            "budgets": {s: {"budget_s": self.budget[s], "estimate": BUDGETS[s][2]} for s in self.stages},
            "stages": [], "parity": [], "determinism": [], "tests": {}, "bench": [], "bench_skips": [],
            "train_step": [], "summary": {"verdict": "running", "failures": []}}
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.stamp = stamp
        self.base_env = self._env()

    # ---------------------------------------------------------------- environment for the children
    def _env(self) -> Dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
        pp = [str(REPO), str(HERE)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        env["PYTHONPATH"] = os.pathsep.join(pp)
        env.setdefault("TRITON_CACHE_DIR", str(self.cache / "triton"))
        env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(self.cache / "inductor"))
        env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", GKCORE_CHECK_AUTOTUNE="1",
                   TRITON_CACHE_AUTOTUNING="1")
        if self.smoke:
            env["TRITON_INTERPRET"] = "1"
            env["GKCORE_BENCH_QUICK"] = "1"
        else:
            env.pop("TRITON_INTERPRET", None)
        return env

    def hard_end(self, stage: str) -> float:
        """A stage's hard limit: the run's end less the budgets of the stages after it."""
        later = self.stages[self.stages.index(stage) + 1:]
        return self.t_end - sum(self.budget[s] for s in later)

    # ------------------------------------------------------------------------ subprocess handling
    def spawn(self, cmd: List[str], env: Dict[str, str], deadline: float, log_file: Optional[pathlib.Path] = None,
              echo: bool = True) -> Dict[str, Any]:
        """Run ``cmd`` until it exits or ``deadline`` (unix time); its output goes to the console (and
        ``log_file``). Returns rc, timed_out, wall_s and the last lines."""
        t0 = time.time()
        tail: List[str] = []
        lf = open(log_file, "a") if log_file else None
        try:
            p = subprocess.Popen(cmd, cwd=str(REPO), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True, bufsize=1, start_new_session=True)
        except OSError as e:
            return {"rc": 127, "timed_out": False, "wall_s": 0.0, "tail": [f"could not start {cmd[0]}: {e}"]}

        def pump():
            for line in p.stdout:
                line = line.rstrip("\n")
                tail.append(line)
                del tail[:-60]
                if lf:
                    lf.write(line + "\n")
                    lf.flush()
                if echo:
                    self.log("    " + line)

        th = threading.Thread(target=pump, daemon=True)
        th.start()
        timed_out = False
        try:
            p.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            timed_out = True
            for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    p.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        th.join(timeout=5)
        if lf:
            lf.close()
        return {"rc": p.returncode, "timed_out": timed_out, "wall_s": time.time() - t0, "tail": tail[-30:]}

    # ------------------------------------------------------------------------------- the stages
    def no_gpu(self) -> bool:
        """Full mode on a machine without a CUDA device: nothing but the env stage makes sense (and the build
        would reinstall the local package). Asks the driver when the env stage did not report."""
        if self.smoke:
            return False
        env = self.res.get("env") or {}
        if "cuda_available" in env:
            return env["cuda_available"] is False
        if not hasattr(self, "_no_gpu"):
            try:
                r = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
                self._no_gpu = r.returncode != 0 or "GPU" not in r.stdout
            except (OSError, subprocess.SubprocessError):
                self._no_gpu = True
        return self._no_gpu

    def run(self) -> int:
        self.log(f"gkcore GPU check ({self.res['mode']}): stages {', '.join(self.stages)}; total budget "
                 f"{self.total:.0f} s; commit {self.res['commit']['commit']}")
        self.log("budgets: " + ", ".join(f"{s} {self.budget[s]:.0f} s" for s in self.stages))
        # a stage with no budget (the build in smoke mode) is recorded as skipped up front, so that the
        # worker stages around it still share one process
        skipped = [s for s in self.stages if self.budget[s] <= 0]
        for s in skipped:
            getattr(self, f"stage_{s}")()
        run = [s for s in self.stages if s not in skipped]
        i = 0
        while i < len(run):
            s = run[i]
            if s != "env" and self.no_gpu():
                st = self.begin(s)
                st.update(status="skipped", wall_s=0.0, note="no CUDA device here (run with --smoke on a CPU)")
                self.end(st)
                i += 1
                continue
            if s in WORKER_STAGES:
                group = [s]
                while i + len(group) < len(run) and run[i + len(group)] in WORKER_STAGES:
                    group.append(run[i + len(group)])
                self.run_workers(group)
                i += len(group)
            else:
                getattr(self, f"stage_{s}")()
                i += 1
        self.res["stages"].sort(key=lambda st: ORDER.index(st["name"]))
        return self.finish()

    def begin(self, name: str) -> Dict[str, Any]:
        limit = self.hard_end(name) - time.time()
        self.log("")
        self.log(f"== {name}: budget {self.budget[name]:.0f} s, limit {max(limit, 0):.0f} s "
                 f"(t = {time.time() - self.t_start:.0f} s)")
        return {"name": name, "budget_s": self.budget[name], "limit_s": round(max(limit, 0), 1),
                "estimate": BUDGETS[name][2], "started_at_s": round(time.time() - self.t_start, 1)}

    def end(self, st: Dict[str, Any]) -> None:
        self.log(f"== {st['name']}: {st['status']} in {st.get('wall_s', 0):.1f} s"
                 + (f" ({st['note']})" if st.get("note") else ""))
        self.res["stages"].append(st)
        self.write()

    def run_workers(self, group: List[str]) -> None:
        """Run consecutive worker stages in one process; relaunch for the rest if it dies early."""
        todo = list(group)
        while todo:
            st0 = {s: self.begin(s) if s == todo[0] else None for s in todo}
            deadlines = [self.hard_end(s) - GRACE_S for s in todo]
            if self.hard_end(todo[-1]) - time.time() < 3:
                for s in todo:
                    st = st0[s] or self.begin(s)
                    st.update(status="skipped", note="no time left", wall_s=0.0)
                    self.end(st)
                return
            cmd = [sys.executable, str(HERE / "gpu_check_stages.py"), ",".join(todo), "--records", str(self.records),
                   "--state", str(self.state_file), "--deadlines", ",".join(f"{d:.1f}" for d in deadlines)]
            if self.smoke:
                cmd.append("--smoke")
            t0 = time.time()
            r = self.spawn(cmd, self.base_env, self.hard_end(todo[-1]))
            done, used = [], 0.0
            for s in todo:
                recs = read_jsonl(self.records / f"{s}.jsonl")
                end = next((x for x in recs if x.get("kind") == "stage_end"), None)
                st = st0[s] or {"name": s, "budget_s": self.budget[s], "estimate": BUDGETS[s][2],
                                "limit_s": round(max(self.hard_end(s) - t0, 0), 1)}
                done.append(s)
                if end is not None:
                    st.update(status=self._status_of(s, recs, end["rc"]), wall_s=end.get("wall_s", 0.0), rc=end["rc"])
                    used += end.get("wall_s", 0.0)
                    self.absorb(s, recs, st)
                    self.end(st)
                    continue
                # the stage that was running when the worker ended: cut at the limit, or crashed
                why = "killed at its limit" if r["timed_out"] else f"worker exited rc={r['rc']}"
                st.update(status="cut" if r["timed_out"] else "crashed", wall_s=max(0.0, time.time() - t0 - used),
                          note=why + ("; " + " | ".join(r["tail"][-3:])[:300] if r["tail"] else ""))
                self.absorb(s, recs, st)
                self.end(st)
                break
            todo = [s for s in todo if s not in done]

    def _status_of(self, s: str, recs: List[Dict[str, Any]], rc: int) -> str:
        cases = [x for x in recs if x.get("kind") not in ("stage_end", "env", "peaks", "train_compare")]
        if any(x.get("status") in ("fail", "error") for x in cases) or any(x.get("kind") == "stage_error" for x in recs):
            return "fail"
        if rc not in (0, None):
            return "fail"
        if any("budget" in str(x.get("reason", "")) for x in cases):
            return "cut"
        return "ok"

    def absorb(self, s: str, recs: List[Dict[str, Any]], st: Dict[str, Any]) -> None:
        if s == "env":
            env = next((x for x in recs if x.get("kind") == "env"), None)
            peaks = next((x for x in recs if x.get("kind") == "peaks"), None)
            if env:
                self.res["env"] = {k: v for k, v in env.items() if k not in ("kind", "stage")}
            if peaks:
                self.res["peaks"] = {k: v for k, v in peaks.items() if k in ("cpu", "cuda")}
                st["note"] = f"probes {peaks.get('probe_s', 0):.1f} s"
            if self.state_file.exists():
                state = json.loads(self.state_file.read_text())
                if state.get("peaks_file"):
                    self.base_env["GKCORE_PEAKS_FILE"] = state["peaks_file"]
        elif s in ("parity_design", "determinism"):
            key = "parity" if s == "parity_design" else "determinism"
            cases = [x for x in recs if x.get("kind") in ("parity", "determinism")]
            self.res[key] = cases
            n = {k: sum(1 for c in cases if c.get("status") == k) for k in ("pass", "fail", "error", "skipped")}
            st["counts"] = n
            st["note"] = ", ".join(f"{v} {k}" for k, v in n.items() if v)
        elif s == "train_step":
            self.res["train_step"] = [x for x in recs if x.get("kind") in ("train_step", "train_compare")]
            cmp_ = next((x for x in recs if x.get("kind") == "train_compare"), None)
            if cmp_:
                st["note"] = f"fused {cmp_['speedup']:.2f}x steps/s, memory {cmp_.get('memory_ratio') or 0:.2f}x"
        errs = [x for x in recs if x.get("kind") == "stage_error"]
        if errs:
            st["error"] = errs[-1].get("error")

    def stage_build(self) -> None:
        st = self.begin("build")
        if self.smoke:
            st.update(status="skipped", wall_s=0.0, note="smoke mode: no build (the CPU part is already installed)")
            self.end(st)
            return
        state = json.loads(self.state_file.read_text()) if self.state_file.exists() else {}
        arch = (state.get("env") or {}).get("arch") or os.environ.get("GKCORE_CUDA_ARCH") or "90"
        env = dict(self.base_env)
        env.update(GKCORE_CUDA="ON", CMAKE_ARGS=f"-DCMAKE_CUDA_ARCHITECTURES={arch}",
                   CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 4))
        log_file = self.work / "build.log"
        cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "-e", str(REPO)]
        self.log("    " + " ".join(cmd) + f"  (GKCORE_CUDA=ON CMAKE_ARGS={env['CMAKE_ARGS']})")
        r = self.spawn(cmd, env, self.hard_end("build"), log_file=log_file, echo=False)
        st.update(wall_s=r["wall_s"], rc=r["rc"], arch=arch, log_tail=r["tail"][-15:])
        if self.out and log_file.exists():
            shutil.copy(log_file, self.out / "build.log")
        if r["timed_out"] or r["rc"] != 0:
            note = ("killed at its limit" if r["timed_out"] else f"pip exited {r['rc']}")
            for line in r["tail"][-15:]:
                self.log("    | " + line)
            # gkcore.kernels (the Triton kernels) is importable only through the install's package mapping:
            # without any install the triton backends would fail too, so fall back to the CPU-only build
            if self.hard_end("build") - time.time() > 30:
                self.log("    CUDA build failed: building without CUDA so that the Triton backends import")
                env_off = dict(self.base_env, GKCORE_CUDA="OFF", CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 4))
                r2 = self.spawn(cmd, env_off, self.hard_end("build"), log_file=log_file, echo=False)
                note += ("; fallback GKCORE_CUDA=OFF build " + ("done" if r2["rc"] == 0 and not r2["timed_out"]
                                                              else "failed too: the triton backends cannot import"))
                if self.out and log_file.exists():
                    shutil.copy(log_file, self.out / "build.log")
            st.update(status="cut" if r["timed_out"] else "fail",
                      note=note + "; the cuda backend's cases are skipped with its reason")
            self.end(st)
            return
        probe = subprocess.run([sys.executable, "-c", "import json; from gkcore import _ext; print(json.dumps("
                                "{'cuda_build': _ext.has_cuda_build(), 'archs': _ext.cuda_archs(), "
                                "'cuda_unavailable': _ext.cuda_unavailable(), 'ext_error': _ext.ext_error()}))"],
                               cwd=str(REPO), env=self.base_env, capture_output=True, text=True, timeout=120)
        try:
            ext = json.loads(probe.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            ext = {"error": (probe.stderr or probe.stdout)[-500:]}
        st["extension"] = ext
        ok = bool(ext.get("cuda_build")) and not ext.get("cuda_unavailable")
        st.update(status="ok" if ok else "fail",
                  note=f"gkcore._C with CUDA for {ext.get('archs')}" if ok else f"extension: {ext}")
        self.end(st)

    def stage_parity_tests(self) -> None:
        st = self.begin("parity_tests")
        rec = self.records / "parity_tests.jsonl"
        env = dict(self.base_env)
        env.update(GKCORE_CHECK_RECORD=str(rec), GKCORE_CHECK_DEADLINE=f"{self.hard_end('parity_tests') - GRACE_S:.1f}")
        if self.smoke:
            files, expr = ["tests/test_region_pool.py"], "cuda or gpu"
        else:
            files, expr = OP_TEST_FILES, "cuda or triton or gpu"
        cmd = [sys.executable, "-m", "pytest", *files, "-k", expr, "-q", "-rfE", "-p", "no:cacheprovider",
               "-p", "check_plugin", "--rootdir", str(REPO)]
        workers = 0
        if not self.smoke and _has("xdist"):
            workers = max(2, min(8, (os.cpu_count() or 4) // 2))
            cmd += ["-n", str(workers)]
        r = self.spawn(cmd, env, self.hard_end("parity_tests"))
        recs = read_jsonl(rec)
        final = {}
        for x in recs:  # the last report of a test wins (a setup skip, or the call's outcome)
            final[x["nodeid"]] = x
        outs = list(final.values())
        t = {"passed": sum(1 for x in outs if x["outcome"] == "passed"),
             "failed": sum(1 for x in outs if x["outcome"] == "failed"),
             "skipped": sum(1 for x in outs if x["outcome"] == "skipped"),
             "budget_skipped": sum(1 for x in outs if "budget spent" in str(x.get("reason", ""))),
             "failures": [x["nodeid"] for x in outs if x["outcome"] == "failed"], "cases": outs,
             "command": " ".join(cmd[1:]), "xdist_workers": workers}
        self.res["tests"] = t
        if r["timed_out"]:
            status = "cut"
        elif t["failed"] or r["rc"] not in (0, 5):
            status = "fail"
        elif t["budget_skipped"]:
            status = "cut"
        else:
            status = "ok"
        st.update(status=status, wall_s=r["wall_s"], rc=r["rc"],
                  note=f"{t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped"
                       + (f" ({t['budget_skipped']} for time)" if t["budget_skipped"] else "")
                       + ("; killed at its limit" if r["timed_out"] else ""))
        self.end(st)

    def stage_bench(self) -> None:
        st = self.begin("bench")
        ops = SMOKE_BENCH_OPS if self.smoke else BENCH_OPS
        cases = self.records / "bench_cases.jsonl"
        rec = self.records / "bench.jsonl"
        bench_out = self.work / "bench"
        env = dict(self.base_env)
        env.update(GKCORE_BENCH_CHECK="1", GKCORE_BENCH_RECORD=str(cases), GKCORE_CHECK_RECORD=str(rec),
                   GKCORE_CHECK_DEADLINE=f"{self.hard_end('bench') - GRACE_S:.1f}",
                   GKCORE_CHECK_MODULE_BUDGETS=json.dumps({f"test_bench_{k}": v * self.args.budget_scale
                                                           for k, v in ops.items()}),
                   PYTEST_ADDOPTS=(env.get("PYTEST_ADDOPTS", "") + " -p check_plugin").strip())
        cmd = [sys.executable, "-m", "gkcore", "bench", "--out", str(bench_out)]
        for op in ops:
            cmd += ["--op", op]
        if self.smoke:
            cmd += ["--quick", "-k", "reference-1 or cpu-1"]
        r = self.spawn(cmd, env, self.hard_end("bench"))
        rows = []
        files = sorted(bench_out.glob("*.json")) if bench_out.exists() else []
        if files:
            data = json.loads(files[-1].read_text())
            rows = data.get("rows", [])
            if self.out:
                shutil.copy(files[-1], self.out / "bench.json")
            src = "gkcore bench results JSON"
        else:
            rows = [x for x in read_jsonl(cases) if x.get("median_s") is not None]
            src = "per-case records (the bench run was cut before writing its JSON)"
        for row in rows:
            row.pop("peaks", None)  # the same for every row: kept once under "peaks"
        self.res["bench"] = rows
        outcomes = read_jsonl(rec)
        skips = [f"{x['nodeid'].split('::')[-1]}: {x.get('reason', '')}"[:220] for x in outcomes
                 if x.get("outcome") == "skipped"]
        fails = [x["nodeid"] for x in outcomes if x.get("outcome") == "failed"]
        self.res["bench_skips"] = skips
        self.res["bench_failures"] = fails
        budget_cut = sum(1 for s in skips if "budget spent" in s)
        status = "cut" if (r["timed_out"] or budget_cut) else ("fail" if fails or r["rc"] not in (0, 5) else "ok")
        st.update(status=status, wall_s=r["wall_s"], rc=r["rc"], source=src,
                  note=f"{len(rows)} cases measured, {len(skips)} skipped"
                       + (f" ({budget_cut} for time)" if budget_cut else "") + (f", {len(fails)} failed" if fails else "")
                       + ("; killed at its limit" if r["timed_out"] else ""))
        self.end(st)

    # ------------------------------------------------------------------------------- the outputs
    def summary(self) -> None:
        fails = []
        for c in self.res["parity"] + self.res["determinism"]:
            if c.get("status") in ("fail", "error"):
                fails.append(f"{c['kind']} {c['op']} {c['backend']} {c['dtype']}: {(c.get('error') or '')[:200]}")
        for n in (self.res.get("tests") or {}).get("failures", []):
            fails.append(f"test {n}")
        for n in self.res.get("bench_failures", []):
            fails.append(f"bench {n}")
        for r in self.res["train_step"]:
            if r.get("status") in ("fail", "error"):
                fails.append(f"train_step {r.get('variant')}: {(r.get('error') or '')[:200]}")
        for st in self.res["stages"]:
            if st["status"] in ("fail", "crashed") and not any(f.startswith(st["name"]) for f in fails):
                fails.append(f"stage {st['name']}: {st.get('note', '')[:200]}")
        cut = [st["name"] for st in self.res["stages"] if st["status"] in ("cut", "skipped")
               and not (self.smoke and st["name"] == "build")]
        verdict = "FAIL" if fails else ("INCOMPLETE (cut: " + ", ".join(cut) + ")" if cut else "PASS")
        self.res["summary"] = {"verdict": verdict, "failures": fails, "cut_or_skipped": cut,
                               "stages_ran": [st["name"] for st in self.res["stages"]]}

    def write(self) -> None:
        self.res["wall_s"] = round(time.time() - self.t_start, 1)
        self.summary()
        js = json.dumps(self.res, indent=1, default=str)
        md = markdown(self.res)
        dev = (self.res.get("env") or {}).get("device") or "unknown"
        slug = re.sub(r"[^A-Za-z0-9]+", "-", dev).strip("-").lower()[:40]
        commit = (self.res["commit"].get("commit") or "unknown")[:10]
        base = f"gpucheck-{slug}-{self.stamp}-{commit}{'-smoke' if self.smoke else ''}"
        targets = [(self.results_dir / f"{base}.json", js), (self.results_dir / f"{base}.md", md)]
        for old in getattr(self, "_dated", []):  # the name changes once the device is known
            if old not in [p for p, _ in targets] and old.exists():
                old.unlink()
        self._dated = [p for p, _ in targets]
        if self.out:
            targets += [(self.out / "gpu_check.json", js), (self.out / "gpu_check.md", md)]
        for path, text in targets:
            tmp = path.with_suffix(path.suffix + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, path)
        self.paths = [str(p) for p, _ in targets]

    def finish(self) -> int:
        self.res["finished"] = now_iso()
        self.write()
        self.log("")
        self.log(markdown(self.res))
        self.log("written: " + ", ".join(self.paths))
        v = self.res["summary"]["verdict"]
        return 0 if v == "PASS" else (1 if v == "FAIL" else 2)


def _has(mod: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(mod) is not None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU smoke run: tiny shapes, Triton interpreter, no build")
    ap.add_argument("--stages", type=lambda s: s.split(","), default=None,
                    help=f"comma-separated subset of {','.join(ORDER)} (e.g. a rerun of what was cut; env always runs)")
    ap.add_argument("--total-budget", type=float, default=None,
                    help=f"seconds for all stages (default {TOTAL_BUDGET_S}; smoke: the sum of its budgets)")
    ap.add_argument("--budget-scale", type=float, default=1.0, help="multiply every stage budget (and the total)")
    ap.add_argument("--out", default=None, help="output folder (default: $OUT when set)")
    ap.add_argument("--results-dir", default=None, help="where the dated copies go (default benchmarks/results)")
    ap.add_argument("--cache-dir", default=os.environ.get("GKCORE_CHECK_CACHE", "/tmp/gkcore-gpu-check"),
                    help="Triton / inductor caches and work files, shared by the stages (and by a rerun)")
    args = ap.parse_args(argv)
    if args.stages:
        bad = [s for s in args.stages if s not in ORDER]
        if bad:
            ap.error(f"unknown stage(s) {bad}; known: {', '.join(ORDER)}")
    if args.stages and "env" not in args.stages:
        args.stages = ["env"] + args.stages  # the device facts and peaks belong in every result
    if args.stages and not args.smoke and "build" not in args.stages and not _has("gkcore"):
        # a fresh machine: without the install gkcore.kernels (the Triton kernels) does not import
        args.stages = ["env", "build"] + [s for s in args.stages if s != "env"]
    if args.total_budget is None and args.stages and not args.smoke:
        args.total_budget = sum(BUDGETS[s][0] for s in args.stages)
    return Runner(args).run()


if __name__ == "__main__":
    sys.exit(main())
