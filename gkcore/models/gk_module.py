"""The GK (grounded knowledge) module of GK-MVLP.

Inputs: ViT patch tokens ``patches`` (B, N, Dv) on a (gh, gw) grid (CLS stripped), anatomical region
boxes (B, R=29, 4) with a mask (B, R), and knowledge queries: the text tower's pooled (mean over tokens) features of the
entity prompts, ``prompt_feats`` (E, Dt) ("{entity}: {description}").

    q        = LN(W_q (prompt_feats - c))                             (E, Dv)  shared by the batch
               (c: the knowledge book's mean prompt feature with ``gk.center_queries``, else 0)
    regions  = region_pool(patches, boxes)                            (B, R, Dv)
    z, maps  = GKFusion(q, patches, boxes, grid, region_mask)         (B, E, Dv), depth x (B, H, E, R [+ N])
               each layer: self-attention among the queries, region cross-attention (z_local),
               cross-attention to every patch (z_fused), MLP
    logits   = W_cls z                                                (B, E, 2)  absent / present
    region_attn = mean over layers and heads of maps[..., :R]         (B, E, R)

The decoder reads ``memory() = [z ; LN(W_r regions)]`` (B, E + R, Dv) with mask ``[1 ; region_mask]``
as extra cross-attention tokens, so the GK features and the region features take part in the LM loss.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import GKFusion

__all__ = ["GKModule"]


class GKModule(nn.Module):
    def __init__(self, vision_width: int, text_width: int, num_heads: int, depth: int, mlp_ratio: float = 4.0,
                 backend: Optional[str] = None):
        super().__init__()
        self.backend = backend
        self.query_proj = nn.Sequential(nn.Linear(text_width, vision_width), nn.LayerNorm(vision_width))
        self.fusion = GKFusion(vision_width, num_heads, depth, mlp_ratio=mlp_ratio, backend=backend)
        self.region_proj = nn.Sequential(nn.Linear(vision_width, vision_width), nn.LayerNorm(vision_width))
        self.cls_head = nn.Linear(vision_width, 2)
        self.width = vision_width

    def forward(self, patches: torch.Tensor, grid_size: Tuple[int, int], boxes: torch.Tensor,
                region_mask: torch.Tensor, prompt_feats: torch.Tensor, with_regions: bool = True,
                prompt_center: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """See the module docstring. ``prompt_center`` (Dt,), when given, is subtracted from every prompt
        feature before ``query_proj`` (the knowledge book's mean: queries then differ from the start).
        Returns dict(z (B,E,Dv), logits (B,E,2), region_attn (B,E,R), patch_attn (B,E,N) or None,
        regions (B,R,Dv) when ``with_regions``)."""
        from gkcore.functional import region_pool

        R = boxes.shape[1]
        if prompt_center is not None:
            prompt_feats = prompt_feats - prompt_center.to(prompt_feats.dtype)
        q = self.query_proj(prompt_feats.to(patches.dtype))
        z, maps = self.fusion(q.unsqueeze(0), patches, boxes.to(patches.dtype), grid_size, region_mask=region_mask)
        out = {"z": z, "logits": self.cls_head(z)}
        maps = [m for m in maps if m is not None]
        if maps:
            a = torch.stack([m.float() for m in maps]).mean(dim=(0, 2))  # (B, E, R [+ N])
            out["region_attn"] = a[..., :R]
            out["patch_attn"] = a[..., R:] if a.shape[-1] > R else None
        else:
            out["region_attn"], out["patch_attn"] = None, None
        if with_regions:
            reg = region_pool(patches, boxes.to(patches.dtype), grid_size, backend=self.backend)
            out["regions"] = self.region_proj(reg)
        return out

    @staticmethod
    def memory(out: Dict[str, torch.Tensor], region_mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Extra decoder cross-attention tokens (B, E + R, Dv) and their mask (B, E + R) (long 0/1)."""
        z, reg = out["z"], out["regions"]
        mem = torch.cat([z, reg], dim=1)
        m = torch.cat([torch.ones(z.shape[:2], dtype=torch.long, device=z.device), region_mask.long()], dim=1)
        return mem, m

    @staticmethod
    def probabilities(logits: torch.Tensor) -> torch.Tensor:
        """P(present) per entity: softmax over the 2-way logits (B, E, 2) -> (B, E)."""
        return F.softmax(logits.float(), dim=-1)[..., 1]
