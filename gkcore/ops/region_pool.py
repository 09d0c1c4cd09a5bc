"""region_pool: RoIAlign-pool patch tokens at normalised boxes (see gkcore/reference/region_pool.py).

Backends: ``cuda`` (CUDA C++, fp32/fp64/fp16/bf16, deterministic backward), ``triton``
(fp32/fp16/bf16, deterministic backward), ``cpu`` (C++/OpenMP, fp32/fp64, deterministic backward),
``reference`` (plain torch, any device and dtype).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from .. import _ext
from ..reference.region_pool import region_pool_reference
from . import _triton
from . import _checks
from ._util import HALF_DTYPES, check_same_device, check_tensor, is_compiling, new_output
from .registry import Backend, register_op

__all__ = ["region_pool", "OP"]

OP = register_op("region_pool", "RoIAlign of normalised boxes on a patch-token grid")



# ----------------------------------------------------------------------------------------------- checks
def _grid_from(tokens: torch.Tensor, grid_size) -> Tuple[torch.Tensor, int, int]:
    if tokens.dim() == 4:
        B, gh, gw, C = tokens.shape
        if gh == 0 or gw == 0:
            raise ValueError(f"tokens must hold a non-empty grid, got channels-last shape {tuple(tokens.shape)}")
        if grid_size is not None and _checks.check_grid(grid_size) != (gh, gw):
            raise ValueError(f"grid_size {tuple(grid_size)} does not match channels-last tokens of shape "
                             f"{tuple(tokens.shape)}")
        return tokens.reshape(B, gh * gw, C), gh, gw
    B, N, C = tokens.shape
    if N == 0:
        raise ValueError(f"tokens must hold at least one grid position, got shape {tuple(tokens.shape)} (N=0)")
    if grid_size is None:
        side = int(round(N ** 0.5))
        if side * side != N:
            raise ValueError(f"grid_size is required: tokens have N={N} positions, not a square grid "
                             "(strip a leading CLS token before pooling)")
        return tokens, side, side
    gh, gw = check_grid(grid_size, N, "positions", "tokens have")
    return tokens, gh, gw


def validate(tokens, boxes, grid_size, output_size, sampling_ratio):
    check_tensor("tokens", tokens, (3, 4), floating=True)
    check_tensor("boxes", boxes, (3,), floating=True)
    check_same_device(tokens=tokens, boxes=boxes)
    tokens3, gh, gw = _grid_from(tokens, grid_size)
    B = tokens3.shape[0]
    check_boxes(boxes, B, tokens.dtype, "tokens")
    check_roi_args(boxes, output_size, sampling_ratio, (gh, gw))
    return tokens3, gh, gw


def check_grid(grid_size: Optional[Sequence[int]], N: int, unit: str, holder: str) -> Tuple[int, int]:
    """``(gh, gw)`` of a ``grid_size`` that must cover the N positions of a token grid (shared by every op
    that pools regions); ``unit`` and ``holder`` word the error ("gives 16 patches but k has N=17")."""
    gh, gw = _checks.check_grid(grid_size)
    if gh * gw != N:
        hint = " (a leading CLS token? strip it first)" if gh * gw + 1 == N else ""
        raise ValueError(f"grid_size {(gh, gw)} gives {gh * gw} {unit} but {holder} N={N}{hint}")
    return gh, gw


def check_boxes(boxes: torch.Tensor, B: int, dtype: torch.dtype, name: str) -> None:
    """(B, R, 4) boxes in the dtype of the pooled input ``name``, or float32 with a 16-bit input."""
    if boxes.shape[0] != B or boxes.shape[2] != 4:
        raise ValueError(f"boxes must have shape (B={B}, R, 4), got {tuple(boxes.shape)}")
    if boxes.dtype != dtype and not (boxes.dtype == torch.float32 and dtype in HALF_DTYPES):
        raise ValueError(f"boxes dtype {boxes.dtype} does not match {name} dtype {dtype} "
                         f"(float32 boxes are accepted with float16/bfloat16 {name})")


#: Most bilinear samples per bin side (a fixed ``sampling_ratio``, or the adaptive count of a box).
MAX_SAMPLES_PER_SIDE = 1024


def check_roi_args(boxes: torch.Tensor, output_size, sampling_ratio, grid=None) -> None:
    """The RoIAlign options and box values shared by every op that pools regions (region_pool,
    region_attention): a positive int ``output_size``, an int ``sampling_ratio`` (at most
    ``MAX_SAMPLES_PER_SIDE``), finite (x0, y0, x1, y1) boxes with x1 >= x0 and y1 >= y0 whose grid
    coordinates stay far from the dtype's overflow (a box may lie far outside the image: it pools zeros),
    and, with adaptive sampling (``sampling_ratio <= 0``), boxes that need at most ``MAX_SAMPLES_PER_SIDE``
    samples per bin side. One host sync; skipped while torch.compile traces."""
    if isinstance(output_size, bool) or not isinstance(output_size, int) or output_size < 1:
        raise ValueError(f"output_size must be a positive int, got {output_size!r}")
    if isinstance(sampling_ratio, bool) or not isinstance(sampling_ratio, int):
        raise ValueError(f"sampling_ratio must be an int (<= 0 for adaptive), got {sampling_ratio!r}")
    if sampling_ratio > MAX_SAMPLES_PER_SIDE:
        raise ValueError(f"sampling_ratio must be at most {MAX_SAMPLES_PER_SIDE}, got {sampling_ratio}")
    if boxes.numel() and not is_compiling():
        b = boxes.detach()
        gh, gw = grid if grid is not None else (1, 1)
        # grid coordinates are about |box| * grid * 2 in the kernels' arithmetic: keep them finite
        limit = torch.finfo(b.dtype).max / (8.0 * max(gh, gw, output_size))
        wdt = torch.float64 if b.dtype == torch.float64 else torch.float32
        w = (b[..., 2].to(wdt) - b[..., 0].to(wdt)) * gw / output_size
        h = (b[..., 3].to(wdt) - b[..., 1].to(wdt)) * gh / output_size
        flags = torch.stack([(~torch.isfinite(b)).any(), (b[..., 2] < b[..., 0]).any(),
                             (b[..., 3] < b[..., 1]).any(), (b.abs() > limit).any(),
                             torch.maximum(w, h).max() > MAX_SAMPLES_PER_SIDE]).tolist()
        if flags[0]:
            raise ValueError("boxes contain NaN or inf")
        if flags[1] or flags[2]:
            raise ValueError("boxes must be (x0, y0, x1, y1) with x1 >= x0 and y1 >= y0; got a box with "
                             f"{'x1 < x0' if flags[1] else 'y1 < y0'} (are they (y0, x0, y1, x1) or (x, y, w, h)?)")
        if flags[3]:
            raise ValueError(f"boxes hold a coordinate beyond +-{limit:.3g} (normalised image units): its grid "
                             f"coordinates would overflow {str(b.dtype).replace('torch.', '')}")
        if flags[4] and sampling_ratio <= 0:
            raise ValueError(f"a box spans more than {MAX_SAMPLES_PER_SIDE} grid cells per output bin: adaptive "
                             f"sampling (sampling_ratio={sampling_ratio}) would take more than "
                             f"{MAX_SAMPLES_PER_SIDE} samples per bin side; pass a positive sampling_ratio")


# ------------------------------------------------------------------------------------------- kernels
def _boxes_for(tokens: torch.Tensor, boxes: torch.Tensor, impl: str) -> torch.Tensor:
    if impl == "triton" or tokens.dtype in HALF_DTYPES:
        return boxes.detach().to(torch.float32).contiguous()
    return boxes.detach().to(tokens.dtype).contiguous()


def _out_shape(B, R, C, output_size, reduce):
    return (B, R, C) if reduce else (B, R, output_size, output_size, C)


@torch.library.custom_op("gkcore::region_pool_fwd", mutates_args=())
def _region_pool_fwd(tokens: torch.Tensor, boxes: torch.Tensor, gh: int, gw: int, output_size: int,
                     sampling_ratio: int, aligned: bool, reduce: bool, impl: str) -> torch.Tensor:
    tokens = tokens.contiguous()
    B, N, C = tokens.shape
    R = boxes.shape[1]
    bx = _boxes_for(tokens, boxes, impl)
    out = new_output(_out_shape(B, R, C, output_size, reduce), dtype=tokens.dtype, device=tokens.device)
    args = (B, R, gh, gw, C, output_size, output_size, sampling_ratio, aligned, reduce)
    if impl == "cpu":
        _ext.ext().region_pool_forward_cpu(_ext.dtype_code(tokens.dtype), tokens.data_ptr(), bx.data_ptr(),
                                           out.data_ptr(), *args)
    elif impl == "cuda":
        with torch.cuda.device(tokens.device):
            _ext.ext().region_pool_forward_cuda(_ext.dtype_code(tokens.dtype), tokens.data_ptr(), bx.data_ptr(),
                                                out.data_ptr(), *args, _ext.stream_ptr(tokens.device))
    elif impl == "triton":
        from gkcore.kernels.region_pool import region_pool_forward

        region_pool_forward(tokens, bx, out, gh, gw, output_size, sampling_ratio, aligned, reduce)
    else:
        raise ValueError(f"unknown region_pool implementation {impl!r}")
    return out


@_region_pool_fwd.register_fake
def _(tokens, boxes, gh, gw, output_size, sampling_ratio, aligned, reduce, impl):
    B, N, C = tokens.shape
    return tokens.new_empty(_out_shape(B, boxes.shape[1], C, output_size, reduce))


@torch.library.custom_op("gkcore::region_pool_bwd", mutates_args=())
def _region_pool_bwd(grad_out: torch.Tensor, boxes: torch.Tensor, B: int, N: int, gh: int, gw: int,
                     output_size: int, sampling_ratio: int, aligned: bool, reduce: bool,
                     impl: str) -> torch.Tensor:
    grad_out = grad_out.contiguous()
    C = grad_out.shape[-1]
    R = boxes.shape[1]
    bx = _boxes_for(grad_out, boxes, impl)
    args = (B, R, gh, gw, C, output_size, output_size, sampling_ratio, aligned, reduce)
    if impl == "triton":
        from gkcore.kernels.region_pool import region_pool_backward

        g32 = new_output((B, N, C), dtype=torch.float32, device=grad_out.device)
        region_pool_backward(grad_out, bx, g32, gh, gw, output_size, sampling_ratio, aligned, reduce)
        return g32.to(grad_out.dtype)
    gt = new_output((B, N, C), dtype=grad_out.dtype, device=grad_out.device)
    if impl == "cpu":
        _ext.ext().region_pool_backward_cpu(_ext.dtype_code(grad_out.dtype), grad_out.data_ptr(), bx.data_ptr(),
                                            gt.data_ptr(), *args)
    elif impl == "cuda":
        with torch.cuda.device(grad_out.device):
            _ext.ext().region_pool_backward_cuda(_ext.dtype_code(grad_out.dtype), grad_out.data_ptr(),
                                                 bx.data_ptr(), gt.data_ptr(), *args,
                                                 _ext.stream_ptr(grad_out.device))
    else:
        raise ValueError(f"unknown region_pool implementation {impl!r}")
    return gt


@_region_pool_bwd.register_fake
def _(grad_out, boxes, B, N, gh, gw, output_size, sampling_ratio, aligned, reduce, impl):
    return grad_out.new_empty((B, N, grad_out.shape[-1]))


def _setup_context(ctx, inputs, output):
    tokens, boxes, gh, gw, output_size, sampling_ratio, aligned, reduce, impl = inputs
    ctx.save_for_backward(boxes)
    ctx.meta = (tokens.shape[0], tokens.shape[1], gh, gw, output_size, sampling_ratio, aligned, reduce, impl)


def _backward(ctx, grad_out):
    (boxes,) = ctx.saved_tensors
    B, N, gh, gw, output_size, sampling_ratio, aligned, reduce, impl = ctx.meta
    if not ctx.needs_input_grad[0]:
        return (None,) * 9
    g = _region_pool_bwd(grad_out, boxes, B, N, gh, gw, output_size, sampling_ratio, aligned, reduce, impl)
    return (g,) + (None,) * 8


_region_pool_fwd.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------ backends
def _kernel_fn(impl: str):
    def run(tokens, boxes, gh, gw, output_size, sampling_ratio, aligned, reduce):
        return _region_pool_fwd(tokens, boxes.detach(), gh, gw, output_size, sampling_ratio, aligned, reduce, impl)

    return run


def _reference(tokens, boxes, gh, gw, output_size, sampling_ratio, aligned, reduce):
    return region_pool_reference(tokens, boxes.detach(), (gh, gw), output_size, sampling_ratio, aligned, reduce)


def _cuda_check(inputs):
    gh, gw = inputs["grid"]
    acc = 8 if inputs["tokens"].dtype == torch.float64 else 4
    if gh * gw * acc > 48 * 1024:
        return [f"grid {gh}x{gw} too large for the backward's shared-memory tile (at most {48 * 1024 // acc} tokens)"]
    return []


_tri_dev, _tri_explicit = _triton.triton_devices()
OP.register(Backend("cuda", _kernel_fn("cuda"), devices=("cuda",), dtype_args=("tokens",),
                    availability=_ext.cuda_unavailable, check=_cuda_check))
OP.register(Backend("triton", _kernel_fn("triton"), devices=_tri_dev, explicit_only_devices=_tri_explicit,
                    dtypes=(torch.float32, torch.float16, torch.bfloat16), dtype_args=("tokens",),
                    availability=_triton.triton_unavailable))
OP.register(Backend("cpu", _kernel_fn("cpu"), devices=("cpu",), dtypes=(torch.float32, torch.float64),
                    dtype_args=("tokens",), availability=_ext.cpu_unavailable))
OP.register(Backend("reference", _reference, devices=("cpu", "cuda"), dtype_args=("tokens",)))


# ------------------------------------------------------------------------------------------ public
def region_pool(tokens: torch.Tensor, boxes: torch.Tensor, grid_size: Optional[Sequence[int]] = None, *,
                output_size: int = 1, sampling_ratio: int = 2, aligned: bool = True, reduce: bool = True,
                backend: Optional[str] = None) -> torch.Tensor:
    """RoIAlign-pool patch tokens at anatomical region boxes.

    Args:
        tokens: (B, N, C) patch tokens in row-major grid order (N = gh * gw; strip a leading CLS token
            first), or (B, gh, gw, C) channels-last.
        boxes: (B, R, 4) boxes ``(x0, y0, x1, y1)`` in normalised image coordinates. A box with
            ``x1 < x0`` or ``y1 < y0`` raises ``ValueError`` (no silent swap: swapped corners usually mean
            a (y, x) or (x, y, w, h) mix-up). Boxes may extend past [0, 1]: as in ``roi_align``,
            samples more than one cell outside the grid contribute zero, nearer ones are clamped to the
            border. Boxes are not differentiable. Their dtype matches ``tokens``, or is float32 with
            float16/bfloat16 tokens.
        grid_size: (gh, gw); inferred for channels-last tokens and for square N.
        output_size: bins per side; the samples of each bin are averaged.
        sampling_ratio: samples per bin side; ``<= 0`` means adaptive, ``ceil(box size / output_size)``.
        aligned: shift by half a cell (``roi_align(aligned=True)``), so that the box [0, 1] covers the
            whole grid exactly.
        reduce: average the bins into one feature per region.
        backend: ``None`` (automatic), ``'cuda'``, ``'triton'``, ``'cpu'`` or ``'reference'``.

    Returns:
        (B, R, C), or (B, R, output_size, output_size, C) with ``reduce=False``; the dtype of ``tokens``.

    Non-finite tokens (every backend, outside ``torch.compile``): an output is NaN exactly where it has a
    non-zero pooling weight on a NaN or inf token, and is the pool of the finite tokens elsewhere (so a
    NaN patch outside every box changes nothing); such tokens get a zero gradient. Checking costs one
    host read of whether the output is finite.
    """
    tokens3, gh, gw = validate(tokens, boxes, grid_size, output_size, sampling_ratio)
    inputs = {"tokens": tokens3, "boxes": boxes, "grid": (gh, gw)}
    be = OP.select(inputs, backend)
    args = (boxes, gh, gw, output_size, sampling_ratio, bool(aligned), bool(reduce))
    out = be.fn(tokens3, *args)
    # a sum is non-finite when any term is (or on overflow, which the rule then tells apart)
    if out.numel() and not is_compiling() and not bool(torch.isfinite(out.detach().sum())):
        out = _nonfinite_rule(be, tokens3, out, args)
    return out


def _nonfinite_rule(be, tokens3: torch.Tensor, out: torch.Tensor, args) -> torch.Tensor:
    """The documented result for non-finite tokens, the same on every backend: an output is NaN exactly
    where it has a non-zero pooling weight on a NaN or inf token; every other output is the pool of the
    finite tokens. (Backends read different zero-weight neighbours, so their raw results disagree.)"""
    bad = ~torch.isfinite(tokens3)
    if not bool(bad.any()):
        return out  # finite tokens that overflowed: the kernel's result stands
    clean = torch.where(bad, torch.zeros((), dtype=tokens3.dtype, device=tokens3.device), tokens3)
    out = be.fn(clean, *args)
    with torch.no_grad():
        touched = be.fn(bad.to(tokens3.dtype), *args) != 0  # pooling weights are >= 0: no cancellation
    return torch.where(touched, torch.full((), float("nan"), dtype=out.dtype, device=out.device), out)
