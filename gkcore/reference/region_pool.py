"""Reference ``region_pool``: RoIAlign of normalised boxes on a patch-token grid, in plain PyTorch.

Math (torchvision ``roi_align`` semantics with ``spatial_scale`` = the grid size):

* A box ``(x0, y0, x1, y1)`` in normalised image coordinates maps to grid coordinates
  ``x * gw - o``, ``y * gh - o`` with ``o = 0.5`` when ``aligned`` else ``0``. Without ``aligned``,
  the box is at least one cell wide and high.
* The box is split into ``output_size x output_size`` bins; each bin averages ``sy * sx`` bilinear
  samples placed at the centres of an even sub-grid, with ``sy = sx = sampling_ratio`` when it is
  positive, else ``ceil(box height / bins)`` and ``ceil(box width / bins)`` (adaptive).
* A sample outside ``[-1, gh] x [-1, gw]`` contributes zero (it still counts in the average); one
  inside is clamped to the grid and interpolated from its four neighbouring tokens.
* ``reduce=True`` averages the bins: the result is one feature per region.

Shapes: ``tokens`` (B, N, C) with N = gh * gw in row-major order; ``boxes`` (B, R, 4).
Returns (B, R, C), or (B, R, oh, ow, C) with ``reduce=False``.

The op is linear in ``tokens``: ``out[b] = W[b] @ tokens[b]`` with a sparse pooling matrix ``W[b]``
of shape (R * oh * ow, N) that depends only on the boxes. The reference builds ``W`` densely (so the
backward to ``tokens`` is ``W^T @ grad``) and runs on any device and dtype.
"""
from __future__ import annotations

import torch

__all__ = ["pooling_matrix", "region_pool_reference"]


def pooling_matrix(boxes: torch.Tensor, gh: int, gw: int, output_size: int = 1, sampling_ratio: int = 2,
                   aligned: bool = True, dtype: torch.dtype = None) -> torch.Tensor:
    """Dense RoIAlign weights ``W`` of shape (B, R, oh * ow, gh * gw) for normalised ``boxes`` (B, R, 4).

    Coordinates are computed in ``boxes.dtype``; ``W`` is returned in ``dtype`` (default: boxes').
    """
    B, R, _ = boxes.shape
    oh = ow = int(output_size)
    dev, cdt = boxes.device, boxes.dtype
    dtype = dtype or cdt
    off = 0.5 if aligned else 0.0
    x0 = boxes[..., 0] * gw - off
    y0 = boxes[..., 1] * gh - off
    rw = boxes[..., 2] * gw - off - x0
    rh = boxes[..., 3] * gh - off - y0
    if not aligned:
        rw = rw.clamp(min=1.0)
        rh = rh.clamp(min=1.0)
    bw, bh = rw / ow, rh / oh
    if sampling_ratio > 0:
        sy = torch.full_like(rh, sampling_ratio, dtype=torch.long)
        sx = torch.full_like(rw, sampling_ratio, dtype=torch.long)
    else:
        sy = torch.ceil(rh / oh).long()
        sx = torch.ceil(rw / ow).long()
    count = (sy * sx).clamp(min=1).to(cdt)
    max_sy = int(sy.max().item()) if sy.numel() else 0
    max_sx = int(sx.max().item()) if sx.numel() else 0
    W = torch.zeros(B, R, oh * ow, gh * gw, dtype=cdt, device=dev)
    if max_sy <= 0 or max_sx <= 0:
        return W.to(dtype)
    # sample grid: (B, R, oh, ow, max_sy, max_sx)
    ph = torch.arange(oh, device=dev, dtype=cdt).view(1, 1, oh, 1, 1, 1)
    pw = torch.arange(ow, device=dev, dtype=cdt).view(1, 1, 1, ow, 1, 1)
    iy = torch.arange(max_sy, device=dev).view(1, 1, 1, 1, max_sy, 1)
    ix = torch.arange(max_sx, device=dev).view(1, 1, 1, 1, 1, max_sx)
    e = lambda t: t.view(B, R, 1, 1, 1, 1)  # noqa: E731
    y = e(y0) + ph * e(bh) + (iy.to(cdt) + 0.5) * e(bh) / e(sy.to(cdt).clamp(min=1))
    x = e(x0) + pw * e(bw) + (ix.to(cdt) + 0.5) * e(bw) / e(sx.to(cdt).clamp(min=1))
    y, x = torch.broadcast_tensors(y, x)
    valid = (iy < e(sy)) & (ix < e(sx))
    valid = valid & (y >= -1.0) & (y <= gh) & (x >= -1.0) & (x <= gw)
    y = y.clamp(min=0, max=gh)  # the upper clamp only touches invalid samples (weight 0): it keeps a box
    x = x.clamp(min=0, max=gw)  # far outside the grid from overflowing the integer corner indices
    yl = y.floor().long().clamp(max=gh - 1)
    xl = x.floor().long().clamp(max=gw - 1)
    y = torch.where(yl >= gh - 1, yl.to(cdt), y)
    x = torch.where(xl >= gw - 1, xl.to(cdt), x)
    yh = (yl + 1).clamp(max=gh - 1)
    xh = (xl + 1).clamp(max=gw - 1)
    ly, lx = y - yl.to(cdt), x - xl.to(cdt)
    hy, hx = 1 - ly, 1 - lx
    scale = valid.to(cdt) / e(count)
    bins = (torch.arange(oh * ow, device=dev).view(1, 1, oh, ow, 1, 1)).expand_as(yl)
    Wv = W.view(B, R, oh * ow * gh * gw)
    base = bins * (gh * gw)
    for (yy, xx, ww) in ((yl, xl, hy * hx), (yl, xh, hy * lx), (yh, xl, ly * hx), (yh, xh, ly * lx)):
        idx = (base + yy * gw + xx).reshape(B, R, -1)
        Wv.scatter_add_(2, idx, (ww * scale).reshape(B, R, -1))
    return W.to(dtype)


def region_pool_reference(tokens: torch.Tensor, boxes: torch.Tensor, grid_size, output_size: int = 1,
                          sampling_ratio: int = 2, aligned: bool = True, reduce: bool = True) -> torch.Tensor:
    """RoIAlign-pool ``tokens`` (B, N, C) at ``boxes`` (B, R, 4); see the module docstring."""
    gh, gw = grid_size
    B, N, C = tokens.shape
    R = boxes.shape[1]
    W = pooling_matrix(boxes, gh, gw, output_size, sampling_ratio, aligned, dtype=tokens.dtype)
    if reduce:
        Wr = W.mean(dim=2)  # (B, R, N)
        return torch.bmm(Wr, tokens)
    out = torch.bmm(W.reshape(B, R * output_size * output_size, N), tokens)
    return out.view(B, R, output_size, output_size, C)

