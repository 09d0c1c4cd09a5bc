"""Triton region_pool (RoIAlign on a token grid), forward and deterministic backward.

The geometry helpers compute the bilinear pooling weights on chip from a box, exactly as
csrc/region_pool/roi_math.h and gkcore/reference/region_pool.py do: ``roi_box`` (start corner, extent and
bin size; elementwise, so it also serves a vector of boxes) is shared with the fused region-attention
kernel, which counts the samples per bin of a whole tile of regions itself; ``roi_geometry`` adds that
count for one box and ``roi_sample`` gives the four corners of one sample.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def roi_box(x0, y0, x1, y1, GH, GW, OH, OW, ALIGNED: tl.constexpr):
    """Start corner (sx, sy), extent (rw, rh) and bin size (bw, bh) of normalised boxes on a GH x GW grid
    (scalars or tensors of boxes alike)."""
    if ALIGNED:
        off = 0.5
    else:
        off = 0.0
    sx = x0 * GW - off
    sy = y0 * GH - off
    rw = x1 * GW - off - sx
    rh = y1 * GH - off - sy
    if not ALIGNED:
        rw = tl.maximum(rw, 1.0)
        rh = tl.maximum(rh, 1.0)
    bw = rw / OW
    bh = rh / OH
    return sx, sy, rw, rh, bw, bh


@triton.jit
def roi_geometry(x0, y0, x1, y1, GH, GW, OH, OW, SAMPLING_RATIO, ALIGNED: tl.constexpr):
    """Start corner, bin size and samples per bin of a normalised box on a GH x GW grid."""
    sx, sy, rw, rh, bw, bh = roi_box(x0, y0, x1, y1, GH, GW, OH, OW, ALIGNED)
    if SAMPLING_RATIO > 0:
        gy = SAMPLING_RATIO
        gx = SAMPLING_RATIO
    else:
        gy = tl.ceil(rh / OH).to(tl.int32)
        gx = tl.ceil(rw / OW).to(tl.int32)
    inv_count = 1.0 / tl.maximum(gy * gx, 1).to(tl.float32)
    return sx, sy, bw, bh, gy, gx, inv_count


@triton.jit
def roi_sample(sx, sy, bw, bh, gy, gx, ph, pw, iy, ix, GH, GW):
    """Flat indices and weights of the four bilinear corners of one sample (weights 0 if outside)."""
    y = sy + ph * bh + (iy + 0.5) * bh / gy.to(tl.float32)
    x = sx + pw * bw + (ix + 0.5) * bw / gx.to(tl.float32)
    valid = (y >= -1.0) & (y <= GH) & (x >= -1.0) & (x <= GW)
    y = tl.maximum(y, 0.0)
    x = tl.maximum(x, 0.0)
    yl = tl.minimum(y.to(tl.int32), GH - 1)
    xl = tl.minimum(x.to(tl.int32), GW - 1)
    y = tl.where(yl >= GH - 1, yl.to(tl.float32), y)
    x = tl.where(xl >= GW - 1, xl.to(tl.float32), x)
    yh = tl.minimum(yl + 1, GH - 1)
    xh = tl.minimum(xl + 1, GW - 1)
    ly = y - yl.to(tl.float32)
    lx = x - xl.to(tl.float32)
    hy = 1.0 - ly
    hx = 1.0 - lx
    v = tl.where(valid, 1.0, 0.0)
    return (yl * GW + xl, yl * GW + xh, yh * GW + xl, yh * GW + xh,
            hy * hx * v, hy * lx * v, ly * hx * v, ly * lx * v)


@triton.jit
def _region_pool_fwd_kernel(tok_ptr, box_ptr, out_ptr, R, GH, GW, C, OH, OW, SAMPLING_RATIO,
                            ALIGNED: tl.constexpr, REDUCE: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)  # b * R + r
    pid_c = tl.program_id(1)
    b = pid // R
    N = GH * GW
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    x0 = tl.load(box_ptr + pid * 4 + 0).to(tl.float32)
    y0 = tl.load(box_ptr + pid * 4 + 1).to(tl.float32)
    x1 = tl.load(box_ptr + pid * 4 + 2).to(tl.float32)
    y1 = tl.load(box_ptr + pid * 4 + 3).to(tl.float32)
    sx, sy, bw, bh, gy, gx, inv_count = roi_geometry(x0, y0, x1, y1, GH, GW, OH, OW, SAMPLING_RATIO, ALIGNED)
    tok = tok_ptr + b.to(tl.int64) * N * C
    total = tl.zeros([BLOCK_C], dtype=tl.float32)
    for bin in range(0, OH * OW):
        ph = bin // OW
        pw = bin % OW
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for iy in range(0, gy):
            for ix in range(0, gx):
                i0, i1, i2, i3, w0, w1, w2, w3 = roi_sample(sx, sy, bw, bh, gy, gx, ph, pw, iy, ix, GH, GW)
                acc += w0 * tl.load(tok + i0 * C + offs_c, mask=mask_c, other=0.0).to(tl.float32)
                acc += w1 * tl.load(tok + i1 * C + offs_c, mask=mask_c, other=0.0).to(tl.float32)
                acc += w2 * tl.load(tok + i2 * C + offs_c, mask=mask_c, other=0.0).to(tl.float32)
                acc += w3 * tl.load(tok + i3 * C + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        if REDUCE:
            total += acc
        else:
            dst = out_ptr + (pid.to(tl.int64) * OH * OW + bin) * C + offs_c
            tl.store(dst, (acc * inv_count).to(out_ptr.dtype.element_ty), mask=mask_c)
    if REDUCE:
        total = total * inv_count / (OH * OW)
        tl.store(out_ptr + pid.to(tl.int64) * C + offs_c, total.to(out_ptr.dtype.element_ty), mask=mask_c)


@triton.jit
def _region_pool_bwd_kernel(go_ptr, box_ptr, gt_ptr, R, GH, GW, C, OH, OW, SAMPLING_RATIO,
                            ALIGNED: tl.constexpr, REDUCE: tl.constexpr, BLOCK_C: tl.constexpr):
    """One program owns (batch item, channel block): it zeroes its slice of the token gradient, then
    adds every sample's contribution in a fixed order (regions, bins, samples, corners). No two
    programs touch the same element, so the result is deterministic without atomics."""
    b = tl.program_id(0)
    pid_c = tl.program_id(1)
    N = GH * GW
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    gt = gt_ptr + b.to(tl.int64) * N * C
    for n in range(0, N):
        tl.store(gt + n * C + offs_c, tl.zeros([BLOCK_C], dtype=tl.float32), mask=mask_c)
    for r in range(0, R):
        row = b * R + r
        x0 = tl.load(box_ptr + row * 4 + 0).to(tl.float32)
        y0 = tl.load(box_ptr + row * 4 + 1).to(tl.float32)
        x1 = tl.load(box_ptr + row * 4 + 2).to(tl.float32)
        y1 = tl.load(box_ptr + row * 4 + 3).to(tl.float32)
        sx, sy, bw, bh, gy, gx, inv_count = roi_geometry(x0, y0, x1, y1, GH, GW, OH, OW, SAMPLING_RATIO,
                                                         ALIGNED)
        if REDUCE:
            scale = inv_count / (OH * OW)
        else:
            scale = inv_count
        for bin in range(0, OH * OW):
            ph = bin // OW
            pw = bin % OW
            if REDUCE:
                go_off = row.to(tl.int64) * C
            else:
                go_off = (row.to(tl.int64) * OH * OW + bin) * C
            go = tl.load(go_ptr + go_off + offs_c, mask=mask_c, other=0.0).to(tl.float32) * scale
            for iy in range(0, gy):
                for ix in range(0, gx):
                    i0, i1, i2, i3, w0, w1, w2, w3 = roi_sample(sx, sy, bw, bh, gy, gx, ph, pw, iy, ix, GH, GW)
                    p = gt + i0 * C + offs_c
                    tl.store(p, tl.load(p, mask=mask_c, other=0.0) + w0 * go, mask=mask_c)
                    p = gt + i1 * C + offs_c
                    tl.store(p, tl.load(p, mask=mask_c, other=0.0) + w1 * go, mask=mask_c)
                    p = gt + i2 * C + offs_c
                    tl.store(p, tl.load(p, mask=mask_c, other=0.0) + w2 * go, mask=mask_c)
                    p = gt + i3 * C + offs_c
                    tl.store(p, tl.load(p, mask=mask_c, other=0.0) + w3 * go, mask=mask_c)


def _block_c(C: int) -> int:
    return max(16, min(256, triton.next_power_of_2(C)))


def region_pool_forward(tokens: torch.Tensor, boxes: torch.Tensor, out: torch.Tensor, gh: int, gw: int,
                        output_size: int, sampling_ratio: int, aligned: bool, reduce: bool) -> torch.Tensor:
    """tokens (B, N, C) contiguous; boxes (B, R, 4) float32 contiguous; out preallocated."""
    B, N, C = tokens.shape
    R = boxes.shape[1]
    if B * R == 0 or C == 0:
        return out
    BLOCK_C = _block_c(C)
    grid = (B * R, triton.cdiv(C, BLOCK_C))
    _region_pool_fwd_kernel[grid](tokens, boxes, out, R, gh, gw, C, output_size, output_size, sampling_ratio,
                                  ALIGNED=aligned, REDUCE=reduce, BLOCK_C=BLOCK_C, num_warps=4)
    return out


def region_pool_backward(grad_out: torch.Tensor, boxes: torch.Tensor, grad_tokens: torch.Tensor, gh: int,
                         gw: int, output_size: int, sampling_ratio: int, aligned: bool,
                         reduce: bool) -> torch.Tensor:
    """grad_tokens (B, N, C) float32 contiguous, fully written."""
    B, N, C = grad_tokens.shape
    R = boxes.shape[1]
    if B == 0 or C == 0:
        return grad_tokens
    BLOCK_C = _block_c(C)
    grid = (B, triton.cdiv(C, BLOCK_C))
    _region_pool_bwd_kernel[grid](grad_out, boxes, grad_tokens, R, gh, gw, C, output_size, output_size,
                                  sampling_ratio, ALIGNED=aligned, REDUCE=reduce, BLOCK_C=BLOCK_C, num_warps=4)
    return grad_tokens


def _aot_specs():
    specs = []
    for dt in ("fp32", "bf16", "fp16"):
        for reduce in (True, False):
            sig = {"tok_ptr": f"*{dt}", "box_ptr": "*fp32", "out_ptr": f"*{dt}", "R": "i32", "GH": "i32",
                   "GW": "i32", "C": "i32", "OH": "i32", "OW": "i32", "SAMPLING_RATIO": "i32",
                   "ALIGNED": "constexpr", "REDUCE": "constexpr", "BLOCK_C": "constexpr"}
            specs.append(dict(name=f"region_pool_fwd_{dt}_reduce{int(reduce)}", kernel=_region_pool_fwd_kernel,
                              signature=sig, constexprs={"ALIGNED": True, "REDUCE": reduce, "BLOCK_C": 256},
                              num_warps=4))
        sig = {"go_ptr": f"*{dt}", "box_ptr": "*fp32", "gt_ptr": "*fp32", "R": "i32", "GH": "i32", "GW": "i32",
               "C": "i32", "OH": "i32", "OW": "i32", "SAMPLING_RATIO": "i32", "ALIGNED": "constexpr",
               "REDUCE": "constexpr", "BLOCK_C": "constexpr"}
        specs.append(dict(name=f"region_pool_bwd_{dt}", kernel=_region_pool_bwd_kernel, signature=sig,
                          constexprs={"ALIGNED": True, "REDUCE": True, "BLOCK_C": 256}, num_warps=4))
    return specs


AOT_SPECS = _aot_specs()
