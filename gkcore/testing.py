"""Test helpers shared by gkcore's suite (and usable by anyone validating a backend).

* :func:`assert_parity` / :func:`check_parity`: the parity rule of docs/numerics.md. Ground truth is the
  reference run in float64 on the CPU; a candidate's error in dtype X must be at most ``factor`` (2) times
  the error of the reference run in dtype X, plus an absolute floor. Outputs and gradients of every
  differentiable input are compared; NaN or inf in the candidate never passes.
* :func:`poison_outputs` (re-exported): kernel outputs allocated as NaN so unwritten elements fail.
* :func:`noncontiguous`: the same values in a non-contiguous layout.
* :func:`aot_compile`: compile one Triton kernel ahead of time for a GPU target (no GPU needed) and
  report registers, spills and shared memory.
"""
from __future__ import annotations

import math
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import torch

from .ops._util import poison_outputs  # noqa: F401

__all__ = [
    "ParityError", "assert_close_report", "assert_parity", "check_parity", "error_of", "mismatch_report",
    "noncontiguous", "poison_outputs", "aot_compile", "SHARED_MEMORY_LIMIT", "to_f64",
]

# Largest dynamic shared memory per block (bytes) with opt-in: H100 (sm_90) 227 KiB, A100 (sm_80) 163 KiB.
SHARED_MEMORY_LIMIT = {90: 232448, 80: 166912}


class ParityError(AssertionError):
    pass


def _flat(x):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        out = []
        for v in x:
            out.extend(_flat(v))
        return out
    if isinstance(x, dict):
        out = []
        for k in sorted(x):
            out.extend(_flat(x[k]))
        return out
    if x is None:
        return []
    return [torch.as_tensor(x)]


def error_of(out: torch.Tensor, truth: torch.Tensor) -> float:
    """Max absolute error of ``out`` against ``truth`` (computed in float64 on the CPU); inf if any
    non-finite value appears where the truth is finite."""
    o = out.detach().to("cpu", torch.float64)
    t = truth.detach().to("cpu", torch.float64)
    if o.shape != t.shape:
        raise ParityError(f"shape mismatch: {tuple(o.shape)} vs truth {tuple(t.shape)}")
    if o.numel() == 0:
        return 0.0
    bad = ~torch.isfinite(o) & torch.isfinite(t)
    if bad.any():
        return math.inf
    d = (o - t).abs()
    d = torch.where(torch.isfinite(t), d, torch.zeros_like(d))
    return float(d.max())


def mismatch_report(out: torch.Tensor, truth: torch.Tensor, tol: float, name: str = "output",
                    max_items: int = 8) -> str:
    """A verbose description of where ``out`` and ``truth`` differ by more than ``tol``."""
    o = out.detach().to("cpu", torch.float64)
    t = truth.detach().to("cpu", torch.float64)
    lines = [f"{name}: shape {tuple(o.shape)}, dtype {out.dtype}, device {out.device}"]
    nan, inf = int(torch.isnan(o).sum()), int(torch.isinf(o).sum())
    lines.append(f"  NaN: {nan}, inf: {inf} (truth NaN: {int(torch.isnan(t).sum())}, inf: {int(torch.isinf(t).sum())})")
    d = (o - t).abs()
    d = torch.where(torch.isnan(d), torch.full_like(d, math.inf), d)
    over = (d > tol).nonzero()
    lines.append(f"  {over.shape[0]} of {o.numel()} elements differ by more than {tol:.3g}; "
                 f"max |diff| {float(d.max()) if d.numel() else 0.0:.3g}, max |truth| {float(t.abs().max()) if t.numel() else 0.0:.3g}")
    for idx in over[:max_items].tolist():
        i = tuple(idx)
        lines.append(f"    at {i}: got {float(o[i]):.8g}, expected {float(t[i]):.8g}")
    return "\n".join(lines)


def to_f64(x):
    """float64 CPU copies of every floating tensor in a (nested) structure, keeping requires_grad."""
    if isinstance(x, torch.Tensor):
        if x.is_floating_point():
            y = x.detach().to("cpu", torch.float64)
            return y.requires_grad_(x.requires_grad)
        return x.detach().cpu()
    if isinstance(x, (list, tuple)):
        return type(x)(to_f64(v) for v in x)
    if isinstance(x, dict):
        return {k: to_f64(v) for k, v in x.items()}
    return x


def _fresh(x):
    if isinstance(x, torch.Tensor):
        y = x.detach().clone()
        return y.requires_grad_(x.requires_grad) if x.is_floating_point() else y
    if isinstance(x, (list, tuple)):
        return type(x)(_fresh(v) for v in x)
    if isinstance(x, dict):
        return {k: _fresh(v) for k, v in x.items()}
    return x


def assert_parity(got, ref_lowp, truth, *, factor: float = 2.0, atol: float = 1e-6, rtol_floor: float = 0.0,
                  name: str = "output") -> None:
    """``error(got) <= factor * error(ref_lowp) + atol + rtol_floor * max|truth|`` element-set-wise."""
    g, r, t = _flat(got), _flat(ref_lowp), _flat(truth)
    if not (len(g) == len(r) == len(t)):
        raise ParityError(f"{name}: structure differs ({len(g)} vs {len(r)} vs {len(t)} tensors)")
    for i, (gi, ri, ti) in enumerate(zip(g, r, t)):
        label = f"{name}[{i}]" if len(g) > 1 else name
        eg, er = error_of(gi, ti), error_of(ri, ti)
        scale = float(ti.detach().abs().max()) if ti.numel() else 0.0
        tol = factor * er + atol + rtol_floor * scale
        if not eg <= tol:  # also catches NaN
            raise ParityError(f"{label}: error {eg:.3g} > {factor} x reference error {er:.3g} + floor "
                              f"{atol + rtol_floor * scale:.3g}\n" + mismatch_report(gi, ti, max(tol, 1e-30), label))


def assert_close_report(got: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float = 0.0,
                        name: str = "output") -> None:
    """Elementwise ``|got - expected| <= atol + rtol * |expected|`` with the verbose report on failure."""
    o = got.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    if o.shape != e.shape:
        raise ParityError(f"{name}: shape {tuple(o.shape)} vs expected {tuple(e.shape)}")
    ok = ((o - e).abs() <= atol + rtol * e.abs()) & torch.isfinite(o)
    if not bool(ok.all()):
        raise ParityError(mismatch_report(o, e, atol, name))


def check_parity(fn: Callable[..., Any], ref: Callable[..., Any], args: Sequence[Any],
                 kwargs: Optional[Mapping[str, Any]] = None, *, grad: bool = True, factor: float = 2.0,
                 atol: float = 1e-6, rtol_floor: float = 0.0, grad_seed: int = 0, name: str = "op",
                 poison: bool = True) -> Dict[str, float]:
    """Run ``fn(*args)`` (the candidate), ``ref(*args)`` in the inputs' dtype and ``ref`` in float64 on
    the CPU, and assert the parity rule (docs/numerics.md) on the outputs and on the gradients of every
    floating input that requires grad (with a random upstream gradient). Returns the measured errors."""
    kwargs = dict(kwargs or {})
    a_got, a_ref, a_64 = _fresh(list(args)), _fresh(list(args)), to_f64(list(args))
    with poison_outputs(poison):
        out = fn(*a_got, **kwargs)
    out_ref = ref(*a_ref, **kwargs)
    out_64 = ref(*a_64, **kwargs)
    assert_parity(out, out_ref, out_64, factor=factor, atol=atol, rtol_floor=rtol_floor, name=f"{name} forward")
    errors = {"forward": max((error_of(o, t) for o, t in zip(_flat(out), _flat(out_64))), default=0.0)}
    if not grad:
        return errors
    outs, outs_r, outs_64 = _flat(out), _flat(out_ref), _flat(out_64)
    diff = [i for i, o in enumerate(outs) if o.requires_grad]
    if not diff:
        return errors
    gen = torch.Generator().manual_seed(grad_seed)
    ups = [torch.randn(outs_64[i].shape, generator=gen, dtype=torch.float64) for i in diff]
    leaves = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]

    def grads(outs_, args_):
        sel = [outs_[i] for i in diff]
        ins = [args_[i] for i in leaves]
        gs = torch.autograd.grad(sel, ins, [u.to(o.device, o.dtype) for u, o in zip(ups, sel)], allow_unused=True)
        return [torch.zeros_like(x) if g is None else g for g, x in zip(gs, ins)]

    with poison_outputs(poison):
        g_got = grads(outs, a_got)
    g_ref, g_64 = grads(outs_r, a_ref), grads(outs_64, a_64)
    for j, i in enumerate(leaves):
        assert_parity(g_got[j], g_ref[j], g_64[j], factor=factor, atol=atol, rtol_floor=rtol_floor,
                      name=f"{name} grad of arg {i}")
        errors[f"grad{i}"] = error_of(g_got[j], g_64[j])
    return errors


def noncontiguous(t: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The same values as ``t`` in a non-contiguous view (every other element of a wider buffer)."""
    shape = list(t.shape)
    d = dim % t.dim() if t.dim() else 0
    if t.dim() == 0:
        return t
    wide = shape.copy()
    wide[d] = shape[d] * 2
    buf = torch.full(wide, float("nan") if t.is_floating_point() else -1, dtype=t.dtype, device=t.device)
    idx = [slice(None)] * t.dim()
    idx[d] = slice(0, None, 2)
    view = buf[tuple(idx)]
    view.copy_(t.detach())
    view = view.detach()
    if t.requires_grad:
        view.requires_grad_(True)
    return view


# ------------------------------------------------------------------------------ ahead-of-time compile
@dataclass
class AOTResult:
    name: str
    arch: int
    registers: int
    spill_stores: int
    spill_loads: int
    shared: int
    num_warps: int

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads


def _ptxas() -> str:
    import triton

    p = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return p if os.path.exists(p) else "ptxas"


def aot_compile(spec: Mapping[str, Any], arch: int) -> AOTResult:
    """Compile ``spec`` (an entry of a kernels module's ``AOT_SPECS``: ``kernel``, ``signature``,
    ``constexprs``, ``num_warps``, optional ``num_stages`` and ``name``) for ``sm_{arch}`` (sm_90a for
    90) without a GPU, and read registers and spills from ``ptxas -v`` on the generated PTX."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=spec["kernel"], signature=dict(spec["signature"]), constexprs=dict(spec.get("constexprs", {})))
    opts = {"num_warps": spec.get("num_warps", 4)}
    if "num_stages" in spec:
        opts["num_stages"] = spec["num_stages"]
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
    ptx = k.asm["ptx"]
    gpu = "sm_90a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as d:
        f = os.path.join(d, "k.ptx")
        with open(f, "w") as fh:
            fh.write(ptx)
        res = subprocess.run([_ptxas(), "-v", f"--gpu-name={gpu}", f, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed for {spec.get('name')}: {res.stderr}")
    log = res.stderr + res.stdout
    regs = max([int(x) for x in re.findall(r"Used (\d+) registers", log)] or [0])
    st = sum(int(x) for x in re.findall(r"(\d+) bytes spill stores", log))
    ld = sum(int(x) for x in re.findall(r"(\d+) bytes spill loads", log))
    return AOTResult(spec.get("name", spec["kernel"].__name__), arch, regs, st, ld, int(k.metadata.shared),
                     opts["num_warps"])
