"""Backend registry: one op, several implementations, one contract (docs/ops.md).

Every op registers an :class:`Op` holding its backends. A backend declares the devices and dtypes it
serves and returns the reasons it cannot serve a particular call from :meth:`Backend.not_supported_reasons`.
Automatic choice takes the first backend, in the order ``cuda, triton, cpu, reference``, that gives no
reason. An explicit ``backend=`` (or the ``GKCORE_BACKEND`` environment variable) that cannot serve
raises :class:`BackendError`, which lists every backend's reasons.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch

__all__ = [
    "BACKEND_ORDER",
    "Backend",
    "BackendError",
    "Op",
    "all_ops",
    "get_op",
    "register_op",
    "tensor_inputs",
]

#: Automatic-choice order.
BACKEND_ORDER: Tuple[str, ...] = ("cuda", "triton", "cpu", "reference")

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


class BackendError(RuntimeError):
    """No backend (or not the requested one) can serve a call; the message lists every reason."""


def tensor_inputs(inputs: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """The tensors among a call's inputs (``None`` and Python scalars are left out)."""
    return {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


@dataclass
class Backend:
    """One implementation of an op.

    ``fn`` is called with the op's (validated) arguments. ``devices`` and ``dtypes`` declare what it
    serves; ``dtype_args`` names the tensor arguments whose dtype must be in ``dtypes`` (all floating
    tensors when ``None``); ``check`` returns extra, input-specific reasons; ``availability`` returns a
    reason the backend cannot run at all in this process (library not built, triton missing) or None.
    """

    name: str
    fn: Callable[..., Any]
    devices: Tuple[str, ...] = ("cpu", "cuda")
    dtypes: Tuple[torch.dtype, ...] = FLOAT_DTYPES
    dtype_args: Optional[Tuple[str, ...]] = None
    check: Optional[Callable[[Mapping[str, Any]], List[str]]] = None
    availability: Optional[Callable[[], Optional[str]]] = None
    #: Devices served only when this backend is asked for by name (the Triton interpreter on the CPU).
    explicit_only_devices: Tuple[str, ...] = ()
    note: str = ""

    def unavailable_reason(self) -> Optional[str]:
        return self.availability() if self.availability is not None else None

    def not_supported_reasons(self, inputs: Mapping[str, Any], explicit: bool = False) -> List[str]:
        reasons: List[str] = []
        why = self.unavailable_reason()
        if why:
            return [why]
        tensors = tensor_inputs(inputs)
        devices = {t.device.type for t in tensors.values()}
        allowed = set(self.devices) | (set(self.explicit_only_devices) if explicit else set())
        for dev in sorted(devices - allowed):
            if dev in self.explicit_only_devices:
                reasons.append(f"{dev} tensors are served only when backend='{self.name}' is asked for by name")
            else:
                reasons.append(f"device {dev} not supported (serves {', '.join(self.devices)})")
        names = self.dtype_args if self.dtype_args is not None else [
            k for k, t in tensors.items() if t.is_floating_point()]
        for k in names:
            t = tensors.get(k)
            if t is not None and t.dtype not in self.dtypes:
                reasons.append(f"{k}: dtype {_dtype_name(t.dtype)} not supported "
                               f"(serves {', '.join(_dtype_name(d) for d in self.dtypes)})")
        if not reasons and self.check is not None:
            reasons.extend(self.check(inputs))
        return reasons


class Op:
    """A named op with its backends."""

    def __init__(self, name: str, doc: str = ""):
        self.name = name
        self.doc = doc
        self.backends: Dict[str, Backend] = {}

    def register(self, backend: Backend) -> Backend:
        if backend.name not in BACKEND_ORDER:
            raise ValueError(f"unknown backend name {backend.name!r}; expected one of {BACKEND_ORDER}")
        self.backends[backend.name] = backend
        return backend

    def ordered(self) -> List[Backend]:
        return [self.backends[n] for n in BACKEND_ORDER if n in self.backends]

    def reasons(self, inputs: Mapping[str, Any], explicit: Optional[str] = None) -> Dict[str, List[str]]:
        return {b.name: b.not_supported_reasons(inputs, explicit=(b.name == explicit)) for b in self.ordered()}

    def select(self, inputs: Mapping[str, Any], backend: Optional[str] = None) -> Backend:
        """Pick the backend for a call. ``backend=None`` reads ``GKCORE_BACKEND``, then chooses automatically."""
        source = "backend="
        if backend is None:
            env = os.environ.get("GKCORE_BACKEND", "").strip()
            if env and env.lower() != "auto":
                backend, source = env, "GKCORE_BACKEND="
        if backend is not None and backend != "auto":
            if backend not in BACKEND_ORDER:
                raise BackendError(f"{self.name}: unknown backend {source}{backend!r}; "
                                   f"expected one of {', '.join(BACKEND_ORDER)} or 'auto'")
            chosen = self.backends.get(backend)
            why = (chosen.not_supported_reasons(inputs, explicit=True) if chosen is not None
                   else [f"{self.name} has no {backend} backend"])
            if not why:
                return chosen
            raise BackendError(self._report(f"{source}{backend!r} cannot serve this call", inputs, backend))
        for b in self.ordered():
            if not b.not_supported_reasons(inputs):
                return b
        raise BackendError(self._report("no backend can serve this call", inputs, None))

    def _report(self, head: str, inputs: Mapping[str, Any], explicit: Optional[str]) -> str:
        lines = [f"{self.name}: {head}. Inputs: {describe_inputs(inputs)}"]
        if explicit is not None and explicit not in self.backends:
            lines.append(f"  {explicit}: {self.name} has no {explicit} backend")
        for name, why in self.reasons(inputs, explicit).items():
            lines.append(f"  {name}: " + ("; ".join(why) if why else "ok"))
        return "\n".join(lines)


def describe_inputs(inputs: Mapping[str, Any]) -> str:
    parts = []
    for k, t in tensor_inputs(inputs).items():
        parts.append(f"{k}{tuple(t.shape)} {_dtype_name(t.dtype)} {t.device.type}")
    return ", ".join(parts) if parts else "(no tensors)"


_OPS: Dict[str, Op] = {}


def register_op(name: str, doc: str = "") -> Op:
    """Create (or return) the op called ``name``."""
    if name not in _OPS:
        _OPS[name] = Op(name, doc)
    return _OPS[name]


def get_op(name: str) -> Op:
    _load_all()
    try:
        return _OPS[name]
    except KeyError:
        raise KeyError(f"unknown op {name!r}; known: {', '.join(sorted(_OPS))}") from None


def all_ops() -> List[Op]:
    _load_all()
    return [_OPS[k] for k in sorted(_OPS)]


def _load_all() -> None:
    """Import every module in gkcore.ops so that each op registers itself."""
    import importlib
    import pkgutil

    import gkcore.ops as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if not mod.name.startswith("_") and mod.name != "registry":
            importlib.import_module(f"gkcore.ops.{mod.name}")
