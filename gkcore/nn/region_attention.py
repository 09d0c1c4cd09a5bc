""":class:`RegionCrossAttention`, the module built on :func:`gkcore.functional.region_attention`:
multi-head cross-attention from queries (knowledge prompts, entities) to anatomical regions pooled from
the ViT patch grid at detected boxes (optionally plus all patches).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ..ops.region_attention import region_attention

__all__ = ["RegionCrossAttention"]


class RegionCrossAttention(nn.Module):
    """Multi-head cross-attention from P queries to R regions RoIAlign-pooled from the patch grid.

    ``q = queries Wq``, ``[k, v] = patch_tokens Wkv`` (per patch), region keys/values ``W k``, ``W v``
    pooled at the boxes inside the op (pooling is linear: pooling projected patches equals projecting
    pooled patches, so the projection runs once over the N patches and regions cost no extra matmul),
    ``out = softmax(q [Wk; k]^T / sqrt(d)) [Wv; v] Wo`` (patches only with ``attend_patches``).

    Args:
        dim: query (and output) width; split into ``num_heads`` heads of ``dim // num_heads``.
        num_heads: number of heads.
        kdim: width of the patch tokens (default ``dim``).
        qkv_bias: bias in the q/k/v projections.
        attend_patches: also attend to every patch (global-local fusion).
        dropout: dropout on the output (after the output projection); the attention probabilities are
            not dropped (the fused kernel has no dropout).
        backend: passed to :func:`gkcore.functional.region_attention` (None: automatic).
    """

    def __init__(self, dim: int, num_heads: int, kdim: Optional[int] = None, qkv_bias: bool = True,
                 attend_patches: bool = False, dropout: float = 0.0, backend: Optional[str] = None):
        super().__init__()
        for name, v in (("dim", dim), ("num_heads", num_heads)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if kdim is not None and (isinstance(kdim, bool) or not isinstance(kdim, int) or kdim < 1):
            raise ValueError(f"kdim must be None or a positive int, got {kdim!r}")
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.kdim = kdim or dim
        self.attend_patches, self.backend = attend_patches, backend
        self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv_proj = nn.Linear(self.kdim, 2 * dim, bias=qkv_bias)
        self.out_proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, queries: torch.Tensor, patch_tokens: torch.Tensor, boxes: torch.Tensor,
                grid_size: Sequence[int], region_mask: Optional[torch.Tensor] = None, return_weights: bool = False):
        """
        Args:
            queries: (B, P, dim), or (1, P, dim) / (P, dim) shared by the batch (no copy is made).
            patch_tokens: (B, N, kdim) patch tokens, N = gh * gw in row-major order (no CLS token).
            boxes: (B, R, 4) normalised (x0, y0, x1, y1).
            grid_size: (gh, gw).
            region_mask: (B, R) bool, False for undetected regions.
            return_weights: also return the attention weights (B, H, P, R [+ N]).

        Returns:
            (B, P, dim), or ``(out, weights)``.
        """
        for name, t in (("queries", queries), ("patch_tokens", patch_tokens)):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise ValueError(f"{name} must be a floating-point tensor, got "
                                 f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
        if patch_tokens.dim() != 3 or patch_tokens.shape[-1] != self.kdim:
            raise ValueError(f"patch_tokens must have shape (B, N, kdim={self.kdim}), got {tuple(patch_tokens.shape)}")
        B, N, _ = patch_tokens.shape
        H, hd = self.num_heads, self.head_dim
        if queries.dim() == 2:
            queries = queries.unsqueeze(0)
        if queries.dim() != 3 or queries.shape[0] not in (1, B) or queries.shape[-1] != self.dim:
            raise ValueError(f"queries must have shape (B={B} or 1, P, {self.dim}), got {tuple(queries.shape)}")
        Bq, P, _ = queries.shape
        q = self.q_proj(queries).view(Bq, P, H, hd).transpose(1, 2)  # (Bq, H, P, hd), a view
        if Bq == 1 and B != 1:
            q = q[0]  # (H, P, hd): shared by the batch, broadcast by the op with a zero batch stride
        kv = self.kv_proj(patch_tokens).view(B, N, 2, H, hd)
        k = kv[:, :, 0].transpose(1, 2)  # (B, H, N, hd), strided views: the kernel reads them in place
        v = kv[:, :, 1].transpose(1, 2)
        res = region_attention(q, k, v, boxes, grid_size, region_mask=region_mask,
                               attend_patches=self.attend_patches, return_weights=return_weights,
                               backend=self.backend)
        out, w = res if return_weights else (res, None)
        out = out.transpose(1, 2).reshape(B, P, self.dim)
        out = self.drop(self.out_proj(out))
        return (out, w) if return_weights else out

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, kdim={self.kdim}, "
                f"attend_patches={self.attend_patches}")
