"""Shared fixtures. Triton kernels run under the interpreter on machines without a GPU: the variable
must be set before triton is first imported, which is why it is set here, at the top."""
import os
import pathlib
import sys

import torch

_triton_loaded = "triton" in sys.modules
if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ and not _triton_loaded:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))

# "ci" draws the same examples on every run (derandomize), so a CI result does not depend on the draw;
# HYPOTHESIS_PROFILE=thorough draws 200 fresh examples per test to look for new failures.
settings.register_profile("ci", max_examples=12, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

REPO = pathlib.Path(__file__).resolve().parents[1]
CXR_DIR = pathlib.Path(os.environ.get("GKCORE_CXR_DIR", REPO.parent / "shared" / "data" / "cxr"))

from gkcore.ops._triton import interpreter_on  # noqa: E402  (after TRITON_INTERPRET is set)

INTERPRETER = interpreter_on()
HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(scope="session")
def cxr_dir() -> pathlib.Path:
    """The folder of real chest radiographs (../shared/data/cxr); tests that need it skip without it."""
    if not CXR_DIR.is_dir():
        pytest.skip(f"real CXR images not found at {CXR_DIR} (set GKCORE_CXR_DIR)")
    return CXR_DIR


def triton_devices():
    """Devices on which the triton backend can be tested here: cuda, or cpu under the interpreter."""
    devs = []
    if HAS_CUDA:
        devs.append("cuda")
    if INTERPRETER:
        devs.append("cpu")
    return devs


def kernel_backends(op, probe):
    """The kernel backends of ``op`` that can be tested here, for ``pytest.mark.parametrize("backend,device",
    ...)``: ``(cpu_ok, pairs, ids)`` with ``cpu_ok`` whether the C++ cpu backend serves the tensors of
    ``probe``, ``pairs`` the (backend, device) pairs (cpu; triton on cuda, or on cpu under the interpreter)
    and their ids. When none can run, one ("none", "none") pair keeps the tests visible: they call
    :func:`need_kernel`, which skips with the reason."""
    cpu_ok = not op.backends["cpu"].not_supported_reasons(probe)
    pairs = ([("cpu", "cpu")] if cpu_ok else []) + [("triton", d) for d in triton_devices()]
    if not pairs:
        return cpu_ok, [("none", "none")], ["none"]
    return cpu_ok, pairs, [f"{b}-{d}" for b, d in pairs]


def need_kernel(backend):
    """Skip a test parametrised by :func:`kernel_backends` when no kernel backend can run here."""
    if backend == "none":
        pytest.skip("neither the cpu backend (gkcore._C) nor triton (GPU or TRITON_INTERPRET=1) is available")


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
