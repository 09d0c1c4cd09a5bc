"""``RegionPool``: module form of :func:`gkcore.functional.region_pool`."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ..ops.region_pool import region_pool


class RegionPool(nn.Module):
    """Pool (B, N, C) patch tokens at (B, R, 4) normalised boxes into (B, R, C) region features."""

    def __init__(self, output_size: int = 1, sampling_ratio: int = 2, aligned: bool = True,
                 backend: Optional[str] = None):
        super().__init__()
        self.output_size, self.sampling_ratio, self.aligned, self.backend = output_size, sampling_ratio, aligned, backend

    def forward(self, tokens: torch.Tensor, boxes: torch.Tensor,
                grid_size: Optional[Sequence[int]] = None) -> torch.Tensor:
        return region_pool(tokens, boxes, grid_size, output_size=self.output_size,
                           sampling_ratio=self.sampling_ratio, aligned=self.aligned, backend=self.backend)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}, sampling_ratio={self.sampling_ratio}, aligned={self.aligned}"
