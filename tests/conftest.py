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

INTERPRETER = os.environ.get("TRITON_INTERPRET", "") not in ("", "0")
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


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
