"""region_attention: cross-attention from queries to RoIAlign-pooled regions (and optionally all patches).

See gkcore/reference/region_attention.py for the math. Backends:

* ``triton`` (CUDA; fp16/bf16 head dim <= 128, fp32 head dim <= 64): one fused kernel per direction that computes the
  bilinear pooling weights on chip from the boxes, pools region keys/values without writing them to
  memory, runs an online softmax over [regions; patches], and a backward whose gradients are
  deterministic by construction (see kernels/region_attention.py).
* ``cpu`` (C++/OpenMP, fp32/fp64; fp16/bf16 upcast to fp32): the same fused algorithm, one task per
  (batch, head): region keys/values pooled from the factorised RoIAlign weights into a per-head tile,
  online softmax over blocks of [regions; patches], register-tiled AVX2 products, and a backward that
  recomputes the tile and owns its (b, h) gradients (fixed order, no atomics: bitwise reproducible).
  See csrc/region_attention/.
* ``reference`` (plain torch: ``region_pool`` + ``scaled_dot_product_attention``; any device and dtype).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch

from .. import _ext
from ..reference.region_attention import region_attention_reference
from . import _triton
from ._util import check_same_device, check_tensor, new_output
from .region_pool import check_boxes, check_grid, check_roi_args
from .registry import Backend, register_op

__all__ = ["region_attention", "OP"]

OP = register_op("region_attention", "cross-attention to RoIAlign-pooled regions (+ patches), pooled on chip")

MAX_HEAD_DIM = 128
MAX_FP32_HEAD_DIM = 64  # = gkcore.kernels.region_attention.MAX_FP32_HEAD_DIM (not imported: triton may be absent)


# ----------------------------------------------------------------------------------------------- checks
def validate(q, k, v, boxes, grid_size, region_mask, output_size, sampling_ratio, scale) -> Tuple[int, int]:
    check_tensor("q", q, (3, 4), floating=True)
    check_tensor("k", k, (4,), floating=True)
    check_tensor("v", v, (4,), floating=True)
    check_tensor("boxes", boxes, (3,), floating=True)
    if region_mask is not None:
        check_tensor("region_mask", region_mask, (2,))
    check_same_device(q=q, k=k, v=v, boxes=boxes, region_mask=region_mask)
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape (B, H, N, d), got {tuple(k.shape)} and {tuple(v.shape)}")
    B, H, N, d = k.shape
    if q.dtype != k.dtype or v.dtype != k.dtype:
        raise ValueError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dim() == 4 and (q.shape[0] != B or q.shape[1] != H or q.shape[3] != d):
        raise ValueError(f"q must have shape (B={B}, H={H}, P, d={d}) or (H, P, d), got {tuple(q.shape)}")
    if q.dim() == 3 and (q.shape[0] != H or q.shape[2] != d):
        raise ValueError(f"shared q must have shape (H={H}, P, d={d}), got {tuple(q.shape)}")
    if d == 0:
        raise ValueError("k has head dimension 0")
    gh, gw = check_grid(grid_size, N, "patches", "k has")
    check_boxes(boxes, B, k.dtype, "k")
    R = boxes.shape[1]
    if region_mask is not None:
        if region_mask.dtype != torch.bool:
            raise ValueError(f"region_mask must be a bool tensor (True = region present), got {region_mask.dtype}")
        if tuple(region_mask.shape) != (B, R):
            raise ValueError(f"region_mask must have shape (B={B}, R={R}), got {tuple(region_mask.shape)}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number or None, got {scale!r}")
    check_roi_args(boxes, output_size, sampling_ratio, (gh, gw))
    return gh, gw


# ------------------------------------------------------------------------------------------- kernels
def _w_shape(q, k, boxes, attend_patches, return_weights):
    B, H, N, _ = k.shape
    if not return_weights:
        return (0,)
    return (B, H, q.shape[-2], boxes.shape[1] + (N if attend_patches else 0))


def _cpu_dtype(dt: torch.dtype) -> torch.dtype:
    """The dtype the cpu backend computes in: float64 for float64, else float32 (fp16/bf16 upcast)."""
    return torch.float64 if dt == torch.float64 else torch.float32


def _lse_dtype(q: torch.Tensor, impl: str) -> torch.dtype:
    return torch.float64 if impl == "cpu" and q.dtype == torch.float64 else torch.float32


def _cpu_args(q, k, v, boxes, region_mask):
    """Inputs of the C++ kernels: q, k, v in the compute dtype (any strides; fp16/bf16 upcast), boxes
    contiguous in the compute dtype, the mask as contiguous uint8, and the element strides (a batch
    stride of 0 for shared (H, P, d) queries)."""
    cdt = _cpu_dtype(q.dtype)
    q, k, v = (t.to(cdt) for t in (q, k, v))
    bx = boxes.detach().to(cdt).contiguous()
    mask = region_mask.to(torch.uint8).contiguous() if region_mask is not None else None
    sq = (0,) + tuple(q.stride()) if q.dim() == 3 else tuple(q.stride())
    return q, k, v, bx, mask, cdt, sq


def _cpu_shape(q, k, boxes, gh, gw, output_size, sampling_ratio, aligned, attend_patches, scale):
    B, H, N, d = k.shape
    return (B, H, q.shape[-2], N, boxes.shape[1], d, gh, gw, output_size, sampling_ratio, aligned, attend_patches,
            float(scale))


@torch.library.custom_op("gkcore::region_attention_fwd", mutates_args=())
def _region_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, boxes: torch.Tensor,
                          region_mask: Optional[torch.Tensor], gh: int, gw: int, attend_patches: bool,
                          output_size: int, sampling_ratio: int, aligned: bool, scale: float,
                          return_weights: bool, impl: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, H, N, d = k.shape
    P = q.shape[-2]
    if impl == "cpu":
        qc, kc, vc, bx, mask, cdt, sq = _cpu_args(q, k, v, boxes, region_mask)
        out = new_output((B, H, P, d), dtype=cdt, device=q.device)
        lse = new_output((B, H, P), dtype=cdt, device=q.device)
        w = new_output(_w_shape(q, k, boxes, attend_patches, return_weights), dtype=cdt, device=q.device)
        _ext.ext().region_attention_forward_cpu(
            _ext.dtype_code(cdt), qc.data_ptr(), kc.data_ptr(), vc.data_ptr(), bx.data_ptr(),
            mask.data_ptr() if mask is not None else 0, out.data_ptr(), lse.data_ptr(),
            w.data_ptr() if return_weights else 0,
            *_cpu_shape(q, k, boxes, gh, gw, output_size, sampling_ratio, aligned, attend_patches, scale),
            list(sq), list(kc.stride()), list(vc.stride()))
        out = out.to(q.dtype)
        lse = lse.to(_lse_dtype(q, impl))
        return out, lse, w.to(q.dtype) if return_weights else w.to(torch.float32)
    if impl != "triton":
        raise ValueError(f"unknown region_attention implementation {impl!r}")
    from gkcore.kernels.region_attention import region_attention_forward

    bx = boxes.detach().to(torch.float32).contiguous()
    mask = region_mask.to(torch.int8).contiguous() if region_mask is not None else None
    out = new_output((B, H, P, d), dtype=q.dtype, device=q.device)
    lse = new_output((B, H, P), dtype=torch.float32, device=q.device)
    w = new_output(_w_shape(q, k, boxes, attend_patches, return_weights), dtype=torch.float32, device=q.device)
    region_attention_forward(q, k, v, bx, mask, out, lse, w if return_weights else None, gh, gw, attend_patches,
                             output_size, sampling_ratio, aligned, scale)
    return out, lse, w.to(q.dtype) if return_weights else w


@_region_attention_fwd.register_fake
def _(q, k, v, boxes, region_mask, gh, gw, attend_patches, output_size, sampling_ratio, aligned, scale,
      return_weights, impl):
    B, H, N, d = k.shape
    P = q.shape[-2]
    w_dt = q.dtype if return_weights else torch.float32
    return (q.new_empty((B, H, P, d)), q.new_empty((B, H, P), dtype=_lse_dtype(q, impl)),
            q.new_empty(_w_shape(q, k, boxes, attend_patches, return_weights), dtype=w_dt))


@torch.library.custom_op("gkcore::region_attention_bwd", mutates_args=())
def _region_attention_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          boxes: torch.Tensor, region_mask: Optional[torch.Tensor], out: torch.Tensor,
                          lse: torch.Tensor, gh: int, gw: int, attend_patches: bool, output_size: int,
                          sampling_ratio: int, aligned: bool, scale: float,
                          impl: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, H, N, d = k.shape
    P = q.shape[-2]
    if impl == "cpu":
        qc, kc, vc, bx, mask, cdt, sq = _cpu_args(q, k, v, boxes, region_mask)
        do = grad_out.to(cdt).contiguous()
        o = out.to(cdt).contiguous()
        ls = lse.to(cdt).contiguous()
        dq = new_output((B, H, P, d), dtype=cdt, device=q.device)
        dk = new_output((B, H, N, d), dtype=cdt, device=q.device)
        dv = new_output((B, H, N, d), dtype=cdt, device=q.device)
        _ext.ext().region_attention_backward_cpu(
            _ext.dtype_code(cdt), qc.data_ptr(), kc.data_ptr(), vc.data_ptr(), bx.data_ptr(),
            mask.data_ptr() if mask is not None else 0, do.data_ptr(), o.data_ptr(), ls.data_ptr(), dq.data_ptr(),
            dk.data_ptr(), dv.data_ptr(),
            *_cpu_shape(q, k, boxes, gh, gw, output_size, sampling_ratio, aligned, attend_patches, scale),
            list(sq), list(kc.stride()), list(vc.stride()))
        if q.dim() == 3:  # shared queries: the per-item gradients summed over the batch in a fixed order
            dq = dq.sum(0)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
    if impl != "triton":
        raise ValueError(f"unknown region_attention implementation {impl!r}")
    from gkcore.kernels.region_attention import region_attention_backward

    do = grad_out.contiguous()
    delta = (do.float() * out.float()).sum(-1).contiguous()  # (B, H, P) rowsum(dO * O)
    bx = boxes.detach().to(torch.float32).contiguous()
    mask = region_mask.to(torch.int8).contiguous() if region_mask is not None else None
    dq32 = torch.zeros((B, H, P, d), dtype=torch.float32, device=q.device)  # accumulated in the kernel
    dk = new_output((B, H, N, d), dtype=k.dtype, device=q.device)
    dv = new_output((B, H, N, d), dtype=v.dtype, device=q.device)
    region_attention_backward(do.to(q.dtype), q, k, v, bx, mask, lse, delta, dq32, dk, dv, gh, gw,
                              attend_patches, output_size, sampling_ratio, aligned, scale)
    if q.dim() == 3:  # shared queries: the batch's per-item gradients summed in a fixed order
        dq32 = dq32.sum(0)
    return dq32.to(q.dtype), dk, dv


@_region_attention_bwd.register_fake
def _(grad_out, q, k, v, boxes, region_mask, out, lse, gh, gw, attend_patches, output_size, sampling_ratio,
      aligned, scale, impl):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, boxes, region_mask, gh, gw, attend_patches, output_size, sampling_ratio, aligned, scale, _, impl = inputs
    out, lse, _w = output
    ctx.save_for_backward(q, k, v, boxes, region_mask, out, lse)
    ctx.meta = (gh, gw, attend_patches, output_size, sampling_ratio, aligned, scale, impl)


def _backward(ctx, grad_out, grad_lse, grad_w):
    q, k, v, boxes, region_mask, out, lse = ctx.saved_tensors
    gh, gw, attend_patches, output_size, sampling_ratio, aligned, scale, impl = ctx.meta
    none = (None,) * 11
    if not any(ctx.needs_input_grad[:3]):
        return (None, None, None) + none
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = _region_attention_bwd(grad_out, q, k, v, boxes, region_mask, out, lse, gh, gw, attend_patches,
                                       output_size, sampling_ratio, aligned, scale, impl)
    n = ctx.needs_input_grad
    return (dq if n[0] else None, dk if n[1] else None, dv if n[2] else None) + none


_region_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------ backends
def _kernel_fn(impl: str):
    def run(q, k, v, boxes, gh, gw, region_mask, attend_patches, output_size, sampling_ratio, aligned, scale,
            return_weights):
        out, _lse, w = _region_attention_fwd(q, k, v, boxes.detach(), region_mask, gh, gw, attend_patches,
                                             output_size, sampling_ratio, aligned, scale, return_weights, impl)
        if return_weights:
            return out, w.detach()
        return out

    return run


def _reference(q, k, v, boxes, gh, gw, region_mask, attend_patches, output_size, sampling_ratio, aligned, scale,
               return_weights):
    return region_attention_reference(q, k, v, boxes.detach(), (gh, gw), region_mask, attend_patches, output_size,
                                      sampling_ratio, aligned, scale, return_weights)


def _triton_check(inputs):
    d = inputs["k"].shape[-1]
    if d > MAX_HEAD_DIM:
        return [f"head dim {d} > {MAX_HEAD_DIM}"]
    if inputs["k"].dtype == torch.float32 and d > MAX_FP32_HEAD_DIM:
        return [f"float32 head dim {d} > {MAX_FP32_HEAD_DIM} (its 3-pass tf32 backward would spill registers; "
                "use bfloat16/float16 or the reference)"]
    return []


_tri_dev, _tri_explicit = _triton.triton_devices()
OP.register(Backend("triton", _kernel_fn("triton"), devices=_tri_dev, explicit_only_devices=_tri_explicit,
                    dtypes=(torch.float32, torch.float16, torch.bfloat16), dtype_args=("q", "k", "v"),
                    availability=_triton.triton_unavailable, check=_triton_check))
def _cpu_check(inputs):
    if not hasattr(_ext.ext(), "region_attention_forward_cpu"):
        return ["gkcore._C was built without region_attention (rebuild: pip install --no-build-isolation -e .)"]
    return []


OP.register(Backend("cpu", _kernel_fn("cpu"), devices=("cpu",),
                    dtypes=(torch.float32, torch.float64, torch.float16, torch.bfloat16), dtype_args=("q", "k", "v"),
                    availability=_ext.cpu_unavailable, check=_cpu_check,
                    note="C++/OpenMP fused kernel; float16/bfloat16 computed in float32"))
OP.register(Backend("reference", _reference, devices=("cpu", "cuda"), dtype_args=("q",)))


# ------------------------------------------------------------------------------------------ public
def region_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, boxes: torch.Tensor,
                     grid_size: Sequence[int], *, region_mask: Optional[torch.Tensor] = None,
                     attend_patches: bool = False, output_size: int = 1, sampling_ratio: int = 2,
                     aligned: bool = True, scale: Optional[float] = None, return_weights: bool = False,
                     backend: Optional[str] = None) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Cross-attention from queries to anatomical regions pooled from the patch grid (plus, optionally,
    every patch), without materialising region keys and values (triton and cpu backends).

    Region keys/values are ``region_pool`` of the per-head patch keys/values: ``Kr = W k``, ``Vr = W v``
    with the RoIAlign pooling matrix ``W`` (R, N) of the boxes. Pooling is linear, so pooling projected
    keys equals projecting pooled features (``W (X Wk) = (W X) Wk``): project the patch tokens once, and
    the region keys come for free. Then

        out = softmax(scale * q [Kr; k]^T + mask) [Vr; v]

    with masked regions left out of the softmax; a row whose keys are all masked returns zeros (never
    NaN) and zero gradients.

    The triton backend computes the bilinear pooling weights from the boxes on chip, so region keys and
    values never reach global memory, and its gradients are deterministic: each (batch, head) program
    owns its dq, dk, dv and sums into them in a fixed order without atomics (the pooling transpose
    ``W^T dKr`` is an on-chip matrix product, not a scatter).

    Args:
        q: (B, H, P, d) queries, or (H, P, d) shared by the whole batch (read with a zero batch stride,
            no copy; its gradient is summed over the batch).
        k, v: (B, H, N, d) per-patch keys and values on a row-major ``grid_size`` grid (N = gh * gw; strip
            a CLS token first). Any strides.
        boxes: (B, R, 4) normalised ``(x0, y0, x1, y1)`` as in :func:`gkcore.functional.region_pool`
            (may extend past [0, 1]; zero-area boxes pool to the border rules of RoIAlign). Not
            differentiable. Same dtype as k, or float32 with float16/bfloat16 inputs.
        grid_size: (gh, gw).
        region_mask: (B, R) bool, False for a region that was not detected (left out of the softmax).
        attend_patches: also attend to all N patches (global-local fusion); keys are [regions; patches].
        output_size, sampling_ratio, aligned: RoIAlign parameters (see ``region_pool``); the
            ``output_size**2`` bins are averaged into one key per region.
        scale: score scale, default ``d ** -0.5``.
        return_weights: also return the attention weights (B, H, P, R [+ N]) for grounding heat maps.
            The triton and cpu backends return them detached (not differentiable); the reference keeps
            the graph.
        backend: ``None`` (automatic: triton on CUDA for supported inputs, the C++ twin on the CPU,
            else the reference), ``'triton'``, ``'cpu'`` or ``'reference'``.

    Returns:
        ``out`` (B, H, P, d) in the dtype of q, or ``(out, weights)`` with ``return_weights``.
    """
    gh, gw = validate(q, k, v, boxes, grid_size, region_mask, output_size, sampling_ratio, scale)
    d = k.shape[-1]
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(d)
    inputs = {"q": q, "k": k, "v": v, "boxes": boxes, "region_mask": region_mask, "grid": (gh, gw)}
    be = OP.select(inputs, backend)
    return be.fn(q, k, v, boxes, gh, gw, region_mask, bool(attend_patches), output_size, sampling_ratio,
                 bool(aligned), scale, bool(return_weights))
