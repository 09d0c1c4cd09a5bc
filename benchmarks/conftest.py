"""Benchmark suite set-up: harness and perf_model importable; the machine's peaks measured (CPU) or looked
up (known GPU) once at the start of the run and printed, so every floor in the run uses the same ones;
in check mode (``GKCORE_BENCH_CHECK=1``) the providers that compile (``compile``, ``flex``) run after the
others of their file, so that a file cut short by the GPU check's budget has its eager side-by-side."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

#: providers that spend seconds compiling before their first call
SLOW_START = ("compile", "flex")


def pytest_report_header(config):
    try:
        import perf_model
        from harness import cuda_or_cpu

        p = perf_model.peaks_for(cuda_or_cpu())
    except Exception as e:  # never stop the benchmarks over the model
        return f"perf model: peaks unavailable ({type(e).__name__}: {e})"
    mm = ", ".join(f"{k} {v / 1e9:.0f}" for k, v in p.matmul.items())
    return (f"perf model peaks for {p.device}: matmul GFLOP/s {mm}; vector {p.vector / 1e9:.0f} GFLOP/s; "
            f"memory {p.memory / 1e9:.1f} GB/s ({p.source})")


def pytest_collection_modifyitems(session, config, items):
    if os.environ.get("GKCORE_BENCH_CHECK", "") in ("", "0"):
        return
    files = {}
    for it in items:
        files.setdefault(it.nodeid.split("::")[0], len(files))

    def slow(it):
        cs = getattr(it, "callspec", None)
        return bool(cs and cs.params.get("provider") in SLOW_START)

    order = {id(it): i for i, it in enumerate(items)}
    items.sort(key=lambda it: (files[it.nodeid.split("::")[0]], slow(it), order[id(it)]))
