"""Reference ``region_attention``: attention from queries to RoIAlign-pooled region keys and values,
optionally followed by all patch keys, in plain PyTorch (the oracle and the fallback on any device).

Shapes: ``q`` (B, H, P, d), or (H, P, d) shared by the batch; ``k``, ``v`` (B, H, N, d) with
N = gh * gw patches in row-major grid order; ``boxes`` (B, R, 4) normalised ``(x0, y0, x1, y1)``;
``region_mask`` (B, R) bool (True = region present).

Math. Let ``W[b]`` (R, N) be the RoIAlign pooling matrix of the boxes (``pooling_matrix`` averaged over
the ``output_size**2`` bins, exactly :func:`gkcore.functional.region_pool`). Region keys and values are

    Kr[b, h] = W[b] @ k[b, h]    (R, d),        Vr[b, h] = W[b] @ v[b, h]    (R, d).

Pooling is linear, so pooling per-head projected keys equals projecting pooled patch features:
``W @ (X Wk) = (W @ X) Wk``; the op can therefore pool after the key/value projections. The keys are
``Kr`` (R rows), followed by ``k`` (N rows) when ``attend_patches`` (global-local fusion):

    S = scale * q @ [Kr; k]^T                      (P, L),  L = R (+ N)
    S[:, j] = -inf for masked regions (region_mask False)
    A = softmax(S, dim=-1),   out = A @ [Vr; v]     (P, d)

A row whose keys are all masked (every region masked and no patches) has ``A = 0`` and ``out = 0``,
never NaN; its gradients are zero. ``scale`` defaults to ``d ** -0.5``.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .region_pool import region_pool_reference

__all__ = ["region_attention_reference", "region_keys_values"]


def region_keys_values(k: torch.Tensor, v: torch.Tensor, boxes: torch.Tensor, grid_size: Sequence[int],
                       output_size: int = 1, sampling_ratio: int = 2, aligned: bool = True):
    """Region keys and values ``(Kr, Vr)``, each (B, H, R, d): ``region_pool`` of ``k`` and ``v``
    (B, H, N, d) at ``boxes`` (B, R, 4), the heads folded into the channels."""
    B, H, N, d = k.shape
    R = boxes.shape[1]
    kv = torch.cat([k, v], dim=-1).permute(0, 2, 1, 3).reshape(B, N, H * 2 * d)
    pooled = region_pool_reference(kv, boxes.detach(), tuple(grid_size), output_size, sampling_ratio, aligned)
    pooled = pooled.view(B, R, H, 2 * d).transpose(1, 2)  # (B, H, R, 2d)
    return pooled[..., :d], pooled[..., d:]


def region_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, boxes: torch.Tensor,
                               grid_size: Sequence[int], region_mask: Optional[torch.Tensor] = None,
                               attend_patches: bool = False, output_size: int = 1, sampling_ratio: int = 2,
                               aligned: bool = True, scale: Optional[float] = None, return_weights: bool = False):
    """See the module docstring. Returns ``out`` (B, H, P, d), and with ``return_weights`` also the
    attention weights ``A`` (B, H, P, R [+ N]) (regions first, then patches)."""
    B, H, N, d = k.shape
    R = boxes.shape[1]
    if q.dim() == 3:
        q = q.unsqueeze(0).expand(B, -1, -1, -1)
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(d)
    rk, rv = region_keys_values(k, v, boxes, grid_size, output_size, sampling_ratio, aligned)
    keep = (torch.ones(B, R, dtype=torch.bool, device=k.device) if region_mask is None
            else region_mask.to(device=k.device, dtype=torch.bool))
    if attend_patches:
        keys, vals = torch.cat([rk, k], dim=2), torch.cat([rv, v], dim=2)
        keep = torch.cat([keep, torch.ones(B, N, dtype=torch.bool, device=k.device)], dim=1)
    else:
        keys, vals = rk, rv
    row_ok = keep.any(dim=1)  # (B,): False where every key of the batch item is masked
    # A fully masked row would give NaN; let it attend everywhere, then zero its output (and gradients).
    attn_keep = keep | ~row_ok[:, None]
    ok4 = row_ok.view(B, 1, 1, 1)
    if return_weights or keys.shape[2] == 0:
        s = torch.matmul(q, keys.transpose(-1, -2)) * scale
        s = s.masked_fill(~attn_keep[:, None, None, :], float("-inf"))
        a = torch.softmax(s, dim=-1)
        a = torch.where(ok4, a, torch.zeros_like(a))
        out = torch.matmul(a, vals)
        return (out, a) if return_weights else out
    out = F.scaled_dot_product_attention(q, keys, vals, attn_mask=attn_keep[:, None, None, :], scale=scale)
    return torch.where(ok4, out, torch.zeros_like(out))
