"""Public functional API: torch-like functions, each picking the fastest backend that supports its
inputs (``backend=None``), or the one named by ``backend=`` / ``GKCORE_BACKEND``."""
from .ops.region_pool import region_pool  # noqa: F401
