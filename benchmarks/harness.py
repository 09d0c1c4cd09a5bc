"""Benchmark harness shared by every benchmarks/test_bench_*.py file.

Use from a pytest-benchmark test::

    from harness import bench_case, Case
    def test_x(benchmark, case):          # parametrised over providers
        bench_case(benchmark, op="region_pool", provider="cpu", mode="full", shape={...},
                   make_inputs=lambda: ..., fn=lambda inputs: ..., truth=lambda inputs: ...)

``bench_case``
* builds the inputs once (``make_inputs()``), warms up, then times ``fn(inputs)`` with a timer that
  synchronises the GPU inside the timed function (pytest-benchmark's own timer does not wait);
* measures peak extra memory of one call: CUDA ``max_memory_allocated`` over the baseline, or on the
  CPU the resident-set high-water mark over the baseline (``/proc/self/clear_refs``; run under
  ``gkcore bench``, which sets ``MALLOC_MMAP_THRESHOLD_`` so freed buffers leave the RSS);
* compares the output with ``truth(inputs)`` (the reference in float64), max absolute error;
* records everything in ``benchmark.extra_info`` (op, provider, mode, shape, device, peak bytes, error),
  which ``gkcore bench`` turns into its table and results JSON;
* adds the performance model's view (benchmarks/perf_model.py): the FLOPs and bytes the op must move,
  the floor they imply on this machine and ``ratio_to_floor`` = median time / floor;
* with ``GKCORE_BENCH_RECORD=<file>`` also appends each finished case to that file as one JSON line, so a
  run that is cut short (the GPU check's time budget) keeps what it measured.

Check mode (``GKCORE_BENCH_CHECK=1``, set by benchmarks/gpu_check.py): the docs/performance.md shapes in the
``full`` mode only (forward only where there is no backward) and 5 timed rounds, so that the whole
suite fits the GPU check's budget.

Modes: ``forward`` (no grad), ``backward`` (only the backward of a graph rebuilt outside the timer before every call),
``full`` (forward + backward).
"""
from __future__ import annotations

import gc
import json
import math
import os
from typing import Any, Callable, Dict, Mapping, Optional

import pytest
import torch

QUICK = os.environ.get("GKCORE_BENCH_QUICK", "") not in ("", "0")
CHECK = os.environ.get("GKCORE_BENCH_CHECK", "") not in ("", "0")


def modes(default):
    """The modes a benchmark file runs: ``default``, or ``full`` alone in check mode."""
    return ["full"] if CHECK and "full" in default else list(default)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} threads)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_now() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _rss_peak() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_memory(fn: Callable[[], Any], device: torch.device) -> Optional[int]:
    """Peak extra bytes allocated while running ``fn()`` once (None when it cannot be measured)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return int(peak)
    if not _reset_rss_peak():
        return None
    base = _rss_now()
    out = fn()
    peak = _rss_peak() - base
    del out
    return int(max(peak, 0))


def max_error(out, truth) -> Optional[float]:
    if truth is None or out is None:
        return None
    outs = out if isinstance(out, (tuple, list)) else [out]
    truths = truth if isinstance(truth, (tuple, list)) else [truth]
    err = 0.0
    for o, t in zip(outs, truths):
        if o is None or t is None:
            continue
        d = (o.detach().double().cpu() - t.detach().double().cpu()).abs()
        if not torch.isfinite(d).all():
            return math.inf
        err = max(err, float(d.max()) if d.numel() else 0.0)
    return err


def bench_case(benchmark, *, op: str, provider: str, mode: str, shape: Mapping[str, Any],
               make_inputs: Callable[[], Dict[str, Any]], fn: Callable[[Dict[str, Any]], Any],
               truth: Optional[Callable[[Dict[str, Any]], Any]] = None,
               grad_of: Optional[Callable[[Dict[str, Any], Any], Any]] = None,
               device: Optional[torch.device] = None, rounds: Optional[int] = None, warmup: int = 1) -> None:
    """Time one provider of one op in one mode; see the module docstring.

    ``fn(inputs)`` returns the forward output. For ``backward``/``full``, the output is reduced with a
    fixed random upstream gradient and backpropagated; ``grad_of(inputs, out)`` may return the tensors
    compared with ``truth`` (default: the forward output).
    """
    inputs = make_inputs()
    dev = device or next((v.device for v in inputs.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))
    leaves = [v for v in inputs.values() if isinstance(v, torch.Tensor) and v.requires_grad]

    def clear_grads():
        for t in leaves:
            t.grad = None

    def upstream(out):
        o = out[0] if isinstance(out, (tuple, list)) else out
        return o, torch.ones_like(o) if o.dim() == 0 else torch.randn_like(o)

    if mode == "forward":
        def run():
            with torch.no_grad():
                r = fn(inputs)
            sync(dev)
            return r
        setup = None
    elif mode == "full":
        def run():
            clear_grads()
            out = fn(inputs)
            o, g = upstream(out)
            o.backward(g)
            sync(dev)
            return out
        setup = None
    elif mode == "backward":
        state = {}

        def setup():
            clear_grads()
            out = fn(inputs)
            state["out"] = out
            state["og"] = upstream(out)
            sync(dev)

        def run():
            o, g = state["og"]
            o.backward(g)  # setup() rebuilds the graph before every timed call
            sync(dev)
            return state["out"]
    else:
        raise ValueError(f"unknown mode {mode!r}")

    try:
        for _ in range(warmup):
            if setup:
                setup()
            run()
    except torch.cuda.OutOfMemoryError as e:
        benchmark.extra_info.update(dict(op=op, provider=provider, mode=mode, shape=dict(shape),
                                         device=device_name(dev), error="out of memory"))
        _append_record(dict(benchmark.extra_info, median_s=None))
        pytest.skip(f"{provider} ran out of memory: {e}")

    if setup:
        setup()
    peak = peak_memory(run, dev)
    out = run() if setup is None else state["out"]
    err = None
    if truth is not None:
        ref = truth(inputs)
        got = grad_of(inputs, out) if grad_of is not None and mode != "forward" else out
        err = max_error(got, ref)
    benchmark.extra_info.update(dict(op=op, provider=provider, mode=mode, shape=dict(shape),
                                     device=device_name(dev), peak_bytes=peak, max_error=err,
                                     torch=torch.__version__))
    benchmark.extra_info.update(perf_fields(op, shape, mode, dev))
    n = rounds or (3 if QUICK else 5 if CHECK else 10)
    if CHECK:
        n = min(n, 5)
    if setup:
        benchmark.pedantic(run, setup=setup, rounds=n, iterations=1, warmup_rounds=0)
    else:
        benchmark.pedantic(run, rounds=n, iterations=1, warmup_rounds=0)
    finish_record(benchmark)


def perf_fields(op: str, shape: Mapping[str, Any], mode: str, dev: torch.device) -> Dict[str, Any]:
    """perf_model's fields for one case (empty for an op without a model; the error, if the model fails)."""
    try:
        import perf_model

        return perf_model.annotate(op, shape, mode, dev) or {}
    except Exception as e:  # the model must never stop a measurement
        return {"perf_model_error": f"{type(e).__name__}: {e}"}


def finish_record(benchmark) -> None:
    """Add ``ratio_to_floor`` (median / floor) to ``extra_info`` and append the case to
    ``GKCORE_BENCH_RECORD`` when set."""
    ei = benchmark.extra_info
    st = benchmark.stats.stats if benchmark.stats is not None else None
    med = getattr(st, "median", None)
    fl = ei.get("floor_s")
    ei["ratio_to_floor"] = (med / fl) if med and fl else None
    _append_record(dict(ei, test=getattr(benchmark, "fullname", None) or getattr(benchmark, "name", None),
                        median_s=med, min_s=getattr(st, "min", None), mean_s=getattr(st, "mean", None),
                        rounds=getattr(st, "rounds", None), times_s=list(getattr(st, "data", []) or [])))


def _append_record(rec: Dict[str, Any]) -> None:
    path = os.environ.get("GKCORE_BENCH_RECORD")
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps(rec, default=str) + "\n")


def peer(module: str, package: str):
    """Import a peer library's module, or skip the case saying why: not installed, or installed but failing
    to import (e.g. a version that does not match this torch), with the error."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        if getattr(e, "name", None) and module.startswith(e.name):
            pytest.skip(f"{package} is not installed")
        pytest.skip(f"{package} is installed but {module} does not import: {type(e).__name__}: {e}"[:300])
    except Exception as e:
        pytest.skip(f"{package} is installed but {module} does not import: {type(e).__name__}: {e}"[:300])


def cuda_or_cpu() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def compiled(fn: Callable) -> Callable:
    """``torch.compile`` of a reference function (the inductor provider); skips when it cannot compile."""
    try:
        return torch.compile(fn, dynamic=False)
    except Exception as e:  # pragma: no cover
        pytest.skip(f"torch.compile unavailable: {e}")
