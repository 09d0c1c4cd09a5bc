"""``LinearCrossEntropy``: module form of :func:`gkcore.functional.linear_cross_entropy` (LM head + loss)."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..ops.linear_cross_entropy import linear_cross_entropy


class LinearCrossEntropy(nn.Module):
    """The LM head ``nn.Linear(in_features, vocab_size, bias)`` fused with its cross-entropy loss.

    ``weight`` (vocab_size, in_features) and ``bias`` (vocab_size,) have ``nn.Linear``'s layout and
    initialisation, so a tied embedding matrix can be assigned (``head.weight = embed.weight``).
    ``forward(hidden (..., in_features), targets (...))`` returns the loss (0-d for ``'mean'``/``'sum'``,
    targets' shape for ``'none'``) without materialising the (tokens x vocab) logits; see
    :func:`gkcore.functional.linear_cross_entropy` for the math, ``ignore_index``, ``label_smoothing``,
    ``softcap`` and the all-ignored case (mean = 0).

    ``forward(hidden, targets, rows=...)`` scores only the vocabulary rows ``rows`` (K,) (a restricted
    output vocabulary; ``targets`` then index into ``rows``): the weight and bias rows are gathered, so the
    cost is K rather than vocab_size, and the gradient reaches only those rows.
    """

    def __init__(self, in_features: int, vocab_size: int, bias: bool = True, ignore_index: int = -100,
                 label_smoothing: float = 0.0, reduction: str = "mean", softcap: Optional[float] = None,
                 backend: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        if in_features < 1 or vocab_size < 1:
            raise ValueError(f"in_features and vocab_size must be positive, got {in_features}, {vocab_size}")
        self.in_features, self.vocab_size = in_features, vocab_size
        self.ignore_index, self.label_smoothing = ignore_index, label_smoothing
        self.reduction, self.softcap, self.backend = reduction, softcap, backend
        kw = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(vocab_size, in_features, **kw))
        if bias:
            self.bias = nn.Parameter(torch.empty(vocab_size, **kw))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's initialisation
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def rows(self, rows: Optional[torch.Tensor] = None):
        """``(weight, bias)`` restricted to the vocabulary rows ``rows`` (K,) (None: the whole head)."""
        w, b = self.weight, self.bias
        if rows is None:
            return w, b
        if rows.ndim != 1 or rows.dtype not in (torch.int64, torch.int32) or rows.numel() == 0:
            raise ValueError(f"rows must be a non-empty 1-d integer tensor, got {rows.dtype} {tuple(rows.shape)}")
        return w[rows], None if b is None else b[rows]

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        w, b = self.rows(rows)
        return linear_cross_entropy(hidden, w, targets, b, ignore_index=self.ignore_index,
                                    label_smoothing=self.label_smoothing, reduction=self.reduction,
                                    softcap=self.softcap, backend=self.backend)

    def extra_repr(self) -> str:
        s = (f"in_features={self.in_features}, vocab_size={self.vocab_size}, bias={self.bias is not None}, "
             f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}, reduction={self.reduction!r}")
        return s + (f", softcap={self.softcap}" if self.softcap is not None else "")
