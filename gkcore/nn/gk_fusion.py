""":class:`GKFusion`, the GK fusion module of GK-MVLP: a stack of pre-norm decoder layers (self-attention
among the queries, region cross-attention = z_local, cross-attention to all patches = z_fused, MLP).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from .region_attention import RegionCrossAttention

__all__ = ["GKFusion"]


class _GKFusionLayer(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, backend: Optional[str]):
        super().__init__()
        self.norm_sa = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm_local = nn.LayerNorm(dim)
        self.region_attn = RegionCrossAttention(dim, num_heads, backend=backend)
        self.norm_fused = nn.LayerNorm(dim)
        self.patch_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x, patches, boxes, grid_size, region_mask):
        h = self.norm_sa(x)
        x = x + self.self_attn(h, h, h, need_weights=False)[0]
        local, maps = self.region_attn(self.norm_local(x), patches, boxes, grid_size, region_mask,
                                       return_weights=True)
        x = x + local  # broadcasts shared (1, P, dim) queries to (B, P, dim) at the first layer
        h = self.norm_fused(x)
        x = x + self.patch_attn(h, patches, patches, need_weights=False)[0]
        x = x + self.mlp(self.norm_mlp(x))
        return x, maps.detach()


class GKFusion(nn.Module):
    """GK fusion module: knowledge queries grounded on anatomical regions, then fused with all patches.

    ``depth`` pre-norm decoder layers; each layer, with ``x`` the query features,

        x = x + SelfAttn(LN(x))                                      (among the queries)
        x = x + RegionCrossAttention(LN(x), LN(patches), boxes)      (z_local: pooled regions)
        x = x + CrossAttn(LN(x), LN(patches))                        (z_fused: all patch tokens)
        x = x + MLP(LN(x))                                           (GELU, hidden dim * mlp_ratio)

    then a final LayerNorm. Region attention is computed by :func:`gkcore.functional.region_attention`
    (fused Triton kernel on the GPU, no region keys/values in memory).

    Args:
        dim: width of queries and patch tokens.
        num_heads: heads of every attention.
        depth: number of layers.
        mlp_ratio: MLP hidden width / dim.
        backend: region-attention backend (None: automatic).
    """

    def __init__(self, dim: int, num_heads: int, depth: int, mlp_ratio: float = 4.0,
                 backend: Optional[str] = None):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.dim, self.num_heads, self.depth = dim, num_heads, depth
        self.norm_patches = nn.LayerNorm(dim)
        self.layers = nn.ModuleList(_GKFusionLayer(dim, num_heads, mlp_ratio, backend) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, queries: torch.Tensor, patch_tokens: torch.Tensor, boxes: torch.Tensor,
                grid_size: Sequence[int], region_mask: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """
        Args:
            queries: (B, P, dim) query features, or (1, P, dim) shared by the batch (e.g. the knowledge
                prompts / entity embeddings, identical for every image).
            patch_tokens: (B, N, dim) ViT patch tokens without the CLS token, N = gh * gw.
            boxes: (B, R, 4) normalised (x0, y0, x1, y1) region boxes (e.g. the 29 Chest ImaGenome regions).
            grid_size: (gh, gw) of the patch grid (14, 14 for ViT-B/16 at 224 px).
            region_mask: (B, R) bool, False for regions the detector did not find (left out).

        Returns:
            ``fused`` (B, P, dim) and a list of ``depth`` region attention maps, each (B, H, P, R)
            (detached; rows sum to 1 over the unmasked regions, zero rows where every region is masked).
            Average them over layers and heads for grounding heat maps.
        """
        B = patch_tokens.shape[0]
        if queries.dim() != 3 or queries.shape[0] not in (1, B) or queries.shape[-1] != self.dim:
            raise ValueError(f"queries must have shape (B={B} or 1, P, {self.dim}), got {tuple(queries.shape)}")
        if patch_tokens.dim() != 3 or patch_tokens.shape[-1] != self.dim:
            raise ValueError(f"patch_tokens must have shape (B, N, {self.dim}), got {tuple(patch_tokens.shape)}")
        patches = self.norm_patches(patch_tokens)  # the memory, normalised once (pre-norm)
        x = queries
        maps = []
        for layer in self.layers:
            x, m = layer(x, patches, boxes, grid_size, region_mask)
            maps.append(m)
        return self.norm(x), maps
