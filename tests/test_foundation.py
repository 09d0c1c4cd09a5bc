"""Backend registry, dispatch, extension loading, `gkcore info`, and the AOT compile of Triton kernels."""
import json
import os
import subprocess
import sys

import pytest
import torch

from gkcore import _ext
from gkcore.ops.registry import BACKEND_ORDER, Backend, BackendError, Op, all_ops


def _op():
    op = Op("toy")
    op.register(Backend("reference", lambda x: ("reference", x)))
    op.register(Backend("cpu", lambda x: ("cpu", x), devices=("cpu",), dtypes=(torch.float32,)))
    op.register(Backend("cuda", lambda x: ("cuda", x), devices=("cuda",),
                        availability=lambda: "no CUDA device is available"))
    return op


def test_automatic_order_and_reasons():
    op = _op()
    x32, x64 = torch.zeros(2), torch.zeros(2, dtype=torch.float64)
    assert op.select({"x": x32}).name == "cpu"
    assert op.select({"x": x64}).name == "reference"  # cpu declines float64
    why = op.reasons({"x": x64})
    assert why["cuda"] == ["no CUDA device is available"]
    assert any("float64" in r for r in why["cpu"]) and why["reference"] == []


def test_explicit_backend_that_cannot_serve_lists_every_reason(monkeypatch):
    op = _op()
    x64 = torch.zeros(2, dtype=torch.float64)
    with pytest.raises(BackendError) as ei:
        op.select({"x": x64}, "cpu")
    msg = str(ei.value)
    assert "backend='cpu'" in msg and "cuda: no CUDA device" in msg and "reference: ok" in msg
    with pytest.raises(BackendError, match="has no triton backend"):
        op.select({"x": x64}, "triton")
    with pytest.raises(BackendError, match="unknown backend"):
        op.select({"x": x64}, "fastest")


def test_env_variable_forces_backend(monkeypatch):
    op = _op()
    x32 = torch.zeros(2)
    monkeypatch.setenv("GKCORE_BACKEND", "reference")
    assert op.select({"x": x32}).name == "reference"
    monkeypatch.setenv("GKCORE_BACKEND", "cuda")
    with pytest.raises(BackendError, match="GKCORE_BACKEND='cuda'"):
        op.select({"x": x32})
    monkeypatch.setenv("GKCORE_BACKEND", "auto")
    assert op.select({"x": x32}).name == "cpu"
    # an explicit argument wins over the environment
    monkeypatch.setenv("GKCORE_BACKEND", "cuda")
    assert op.select({"x": x32}, "reference").name == "reference"


def test_every_op_has_a_reference_backend():
    ops = all_ops()
    assert "region_pool" in {o.name for o in ops}
    for op in ops:
        assert "reference" in op.backends, f"{op.name} has no reference backend"
        assert set(op.backends) <= set(BACKEND_ORDER)


def test_extension_state_is_reported_truthfully():
    if _ext.has_cpu():
        import gkcore._C as C

        assert C.has_cuda() == _ext.has_cuda_build()
        if C.has_cuda():
            assert "80" in C.cuda_archs() and "90" in C.cuda_archs()
    else:
        assert _ext.ext_error()


def test_import_works_without_extension():
    code = ("import gkcore, torch; from gkcore import _ext; assert _ext.ext() is None;"
            "from gkcore.functional import region_pool;"
            "b=torch.tensor([[[0.1,0.1,0.5,0.5]]]); print(region_pool(torch.randn(1,16,3), b, (4,4)).shape)")
    env = dict(os.environ, GKCORE_DISABLE_EXT="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "torch.Size([1, 1, 3])" in r.stdout
    r = subprocess.run([sys.executable, "-m", "gkcore", "info"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "gkcore._C: NOT available: disabled by GKCORE_DISABLE_EXT" in r.stdout
    assert "region_pool/cpu: disabled by GKCORE_DISABLE_EXT" in r.stdout


def test_info_cli_json_matches_the_truth():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "gkcore", "info", "--json"], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["ext_loaded"] == _ext.has_cpu()
    assert info["ext_cuda_built"] == _ext.has_cuda_build()
    assert info["cuda_available"] == torch.cuda.is_available()
    rp = info["ops"]["region_pool"]
    assert rp["reference"]["status"] == "available"
    assert rp["cpu"]["status"] == ("available" if _ext.has_cpu() else "unavailable")
    if not torch.cuda.is_available():
        assert rp["cuda"]["status"] == "unavailable" and rp["triton"]["status"] == "unavailable"
        assert "no CUDA device" in rp["triton"]["reason"]


def test_aot_compile_all_triton_kernels(tmp_path):
    """Every kernel in kernels/ compiles for sm_90a and sm_80 with no register spills and shared memory
    within the device limit. Runs in a subprocess: the interpreter (TRITON_INTERPRET) replaces jit functions."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "aot.json"
    r = subprocess.run([sys.executable, "-m", "gkcore.aot", "--json", str(out)], capture_output=True, text=True,
                       env=env, timeout=1500)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    res = json.loads(out.read_text())
    names = {k["module"] for k in res["kernels"]}
    assert "region_pool" in names
    assert {k["arch"] for k in res["kernels"]} == {80, 90}
    assert all(k["spill_stores"] == 0 and k["spill_loads"] == 0 for k in res["kernels"])


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc to read peak RSS")
def test_benchmark_suite_runs(tmp_path):
    """The region_pool benchmark file runs end to end (each case once, quick shapes) through pytest-benchmark."""
    bench = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "test_bench_region_pool.py")
    env = dict(os.environ, GKCORE_BENCH_QUICK="1")
    env.pop("TRITON_INTERPRET", None)
    js = tmp_path / "b.json"
    r = subprocess.run([sys.executable, "-m", "pytest", bench, "-q", "-p", "no:cacheprovider", "-k",
                        "forward and (reference or cpu) and 1", f"--benchmark-json={js}"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    data = json.loads(js.read_text())
    rows = [b["extra_info"] for b in data["benchmarks"]]
    assert {r["provider"] for r in rows} >= {"reference"}
    for row in rows:
        assert row["max_error"] is not None and row["max_error"] < 1e-4
        assert row["peak_bytes"] is not None and row["peak_bytes"] >= 0
