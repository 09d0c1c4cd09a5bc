"""gkcore: compiled kernels and a training stack for GK-MVLP (grounded knowledge-enhanced
vision-language pre-training for chest X-rays)."""
from __future__ import annotations

__version__ = "0.1.0"

from . import functional  # noqa: E402,F401
from . import nn  # noqa: E402,F401
from .ops.registry import BackendError  # noqa: E402,F401


def __getattr__(name):  # lazy: the model stack pulls in timm/transformers
    if name == "create_model":
        from .models import create_model

        return create_model
    if name in ("models", "data", "engine"):
        import importlib

        return importlib.import_module(f"gkcore.{name}")
    raise AttributeError(f"module 'gkcore' has no attribute {name!r}")
