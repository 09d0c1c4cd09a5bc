"""``gkcore bench``: run the pytest-benchmark suite, print a side-by-side table, write results JSON.

Each benchmark records op, provider, mode, shape, device, peak memory and max error against the
float64 reference in ``extra_info`` (benchmarks/harness.py), with the FLOPs, bytes and floor time of the
performance model (benchmarks/perf_model.py); the table shows each time's ratio to its floor. This command runs the suite in a
subprocess (with ``MALLOC_MMAP_THRESHOLD_`` set so that CPU peak-memory readings are faithful), then
writes ``benchmarks/results/<device>-<date>-<commit>.json`` with the raw times of every provider.

For regression tracking, run pytest directly with pytest-benchmark's own options, e.g.
``pytest benchmarks --benchmark-autosave`` then ``pytest benchmarks --benchmark-compare
--benchmark-compare-fail=min:5%``.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import pathlib
import platform
import re
import subprocess
import sys
import tempfile
from typing import List, Optional


def bench_dir() -> pathlib.Path:
    import gkcore

    here = pathlib.Path(gkcore.__file__).resolve().parent
    for cand in (here / "benchmarks", here.parent / "benchmarks"):
        if (cand / "harness.py").exists():
            return cand
    raise FileNotFoundError("the benchmark suite (benchmarks/harness.py) is not part of this install")


def _commit(repo: pathlib.Path) -> str:
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        sha = out.stdout.strip()
        if out.returncode == 0 and sha:
            dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def fmt_time(s: Optional[float]) -> str:
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.3f} s"


def _fmt_bytes(b) -> str:
    if b is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(b) < 1024 or unit == "GiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024.0
    return "-"


#: performance-model fields copied from each benchmark's extra_info (benchmarks/perf_model.py, harness.py);
#: a benchmark's ``profile`` (the ops that take its time, test_bench_train_step.py) is copied when present
PERF_FIELDS = ("flops", "bytes", "floor_s", "floor_bound", "ratio_to_floor", "peaks")


def summarise(raw: dict) -> List[dict]:
    rows = []
    for b in raw.get("benchmarks", []):
        ei = b.get("extra_info", {})
        st = b.get("stats", {})
        rows.append(dict(op=ei.get("op", b.get("group") or b["name"]), provider=ei.get("provider", b["name"]),
                         mode=ei.get("mode", "?"), shape=ei.get("shape", {}), device=ei.get("device"),
                         median_s=st.get("median"), min_s=st.get("min"), mean_s=st.get("mean"),
                         rounds=st.get("rounds"), times_s=st.get("data"), peak_bytes=ei.get("peak_bytes"),
                         max_error=ei.get("max_error"), test=b.get("fullname", b["name"]),
                         **{k: ei.get(k) for k in PERF_FIELDS},
                         **({"profile": ei["profile"]} if ei.get("profile") else {})))
    base = {}
    for r in rows:
        if r["provider"] == "reference":
            base[(r["op"], json.dumps(r["shape"], sort_keys=True), r["mode"])] = r["median_s"]
    for r in rows:
        ref = base.get((r["op"], json.dumps(r["shape"], sort_keys=True), r["mode"]))
        r["speedup_vs_reference"] = (ref / r["median_s"]) if ref and r["median_s"] else None
    return rows


def format_table(rows: List[dict]) -> str:
    head = ["op", "shape", "mode", "provider", "median", "vs ref", "floor", "x floor", "peak mem", "max err"]
    body = []
    for r in sorted(rows, key=lambda r: (r["op"], json.dumps(r["shape"], sort_keys=True), r["mode"], r["provider"])):
        shape = ",".join(f"{k}={v}" for k, v in r["shape"].items())
        sp = r["speedup_vs_reference"]
        err = r["max_error"]
        body.append([r["op"], shape, r["mode"], r["provider"], fmt_time(r["median_s"]),
                     f"{sp:.2f}x" if sp else "-", fmt_time(r.get("floor_s")),
                     f"{r['ratio_to_floor']:.1f}" if r.get("ratio_to_floor") else "-", _fmt_bytes(r["peak_bytes"]),
                     "-" if err is None else f"{err:.2e}"])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)] if body else [len(h) for h in head]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])


def run(args) -> int:
    import torch

    d = bench_dir()
    targets = []
    if args.op:
        for op in args.op:
            f = d / f"test_bench_{op}.py"
            if not f.exists():
                known = sorted(p.stem.replace("test_bench_", "") for p in d.glob("test_bench_*.py"))
                print(f"no benchmark for op {op!r}; known: {', '.join(known)}", file=sys.stderr)
                return 2
            targets.append(str(f))
    else:
        targets.append(str(d))
    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    if args.quick:
        env["GKCORE_BENCH_QUICK"] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        js = os.path.join(tmp, "bench.json")
        cmd = [sys.executable, "-m", "pytest", *targets, "-q", "-p", "no:cacheprovider", f"--benchmark-json={js}",
               "--benchmark-save-data", "--benchmark-disable-gc", "-rs", "--rootdir", str(d)]
        if args.k:
            cmd += ["-k", args.k]
        print("running:", " ".join(cmd), flush=True)
        rc = subprocess.call(cmd, env=env, cwd=str(d))
        if not os.path.exists(js):
            print("the benchmark run produced no results", file=sys.stderr)
            return rc or 1
        with open(js) as fh:
            raw = json.load(fh)
    rows = summarise(raw)
    print()
    print(format_table(rows))
    dev = (torch.cuda.get_device_name(0) if torch.cuda.is_available()
           else f"cpu-{platform.machine()}-{os.cpu_count()}threads")
    try:
        import triton

        tv = triton.__version__
    except Exception:
        tv = None
    commit = _commit(d.parent)
    result = dict(device=dev, machine=raw.get("machine_info", {}), torch=torch.__version__, triton=tv,
                  cuda=torch.version.cuda, commit=commit, quick=bool(args.quick),
                  date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                  peaks=next((r["peaks"] for r in rows if r.get("peaks")), None), rows=rows)
    out_dir = pathlib.Path(args.out) if args.out else d / "results"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError:
        out_dir = pathlib.Path.cwd() / "gkcore-bench-results"
        out_dir.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", dev).strip("-").lower()
    name = f"{slug}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}-{commit[:10]}{'-quick' if args.quick else ''}.json"
    path = out_dir / name
    with open(path, "w") as fh:
        json.dump(result, fh, indent=1)
    print(f"\nresults: {path}")
    return rc


def register(sub) -> None:
    p = sub.add_parser("bench", help="run the benchmark suite and write results JSON")
    p.add_argument("--op", action="append", help="only this op (repeatable), e.g. region_pool")
    p.add_argument("--quick", action="store_true", help="small shapes and few rounds (a smoke run)")
    p.add_argument("-k", default=None, help="pytest -k expression to select benchmarks")
    p.add_argument("--out", default=None, help="results folder (default: benchmarks/results)")
    p.set_defaults(func=run)
