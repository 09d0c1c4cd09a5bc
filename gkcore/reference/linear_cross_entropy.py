"""Reference LM-head cross-entropy: ``F.linear`` + ``F.cross_entropy`` (materialises the logits).

This is the spec of :func:`gkcore.functional.linear_cross_entropy`. With ``hidden`` (T, D) (or (..., D),
flattened), ``weight`` (V, D), optional ``bias`` (V,) and integer ``targets`` (T,) (or (...)):

    z_tj = sum_d hidden_td * weight_jd + bias_j                       (logits, (T, V))
    z_tj <- c * tanh(z_tj / c)                                         (only with softcap=c)
    lse_t = log sum_j exp(z_tj)
    loss_t = (1 - eps) * (lse_t - z_{t, y_t}) + eps * (lse_t - (1/V) sum_j z_tj)

with ``eps = label_smoothing`` (exactly ``F.cross_entropy``'s label smoothing: the target distribution
is ``(1 - eps) onehot(y) + eps / V``). Tokens whose target equals ``ignore_index`` have ``loss_t = 0``
and no gradient, and are left out of the mean:

    reduction='none': loss_t, shape of ``targets``
    reduction='sum' : sum_t loss_t
    reduction='mean': sum_t loss_t / max(1, #{t : y_t != ignore_index})

**All targets ignored**: ``'mean'`` returns 0 with zero gradients. (``F.cross_entropy`` returns NaN
there, 0/0; this reference special-cases it by dividing by ``max(1, count)``.) The reduction is summed
in float32 at least and the result cast back to ``hidden``'s dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["linear_cross_entropy_reference", "reduce_token_losses"]


def reduce_token_losses(loss: torch.Tensor, targets: torch.Tensor, ignore_index: int, reduction: str,
                        dtype: torch.dtype) -> torch.Tensor:
    """Reduce per-token losses (T,) (0 at ignored tokens) as described in the module docstring.

    ``loss`` (T,) any float dtype; ``targets`` (T,) integer. Returns a 0-d tensor (``'sum'``, ``'mean'``)
    or (T,) (``'none'``), in ``dtype``. No host synchronisation.
    """
    if reduction == "none":
        return loss.to(dtype)
    acc = torch.float64 if loss.dtype == torch.float64 else torch.float32
    total = loss.to(acc).sum()
    if reduction == "sum":
        return total.to(dtype)
    count = (targets != ignore_index).sum().clamp(min=1).to(acc)
    return (total / count).to(dtype)


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                   bias: Optional[torch.Tensor] = None, ignore_index: int = -100,
                                   label_smoothing: float = 0.0, reduction: str = "mean",
                                   softcap: Optional[float] = None) -> torch.Tensor:
    """Plain-PyTorch LM-head cross-entropy (see the module docstring for the math).

    Args:
        hidden: (..., D) floating.
        weight: (V, D), the ``nn.Linear`` layout (a tied embedding matrix can be passed).
        targets: (...) integer class indices in [0, V), or ``ignore_index``.
        bias: optional (V,).
        ignore_index, label_smoothing, reduction, softcap: as in the module docstring.

    Returns:
        0-d loss (``'mean'``, ``'sum'``) or per-token losses of ``targets``' shape (``'none'``), in
        ``hidden``'s dtype. Runs on any device and dtype; materialises the (T, V) logits.
    """
    D = hidden.shape[-1]
    h = hidden.reshape(-1, D)
    y = targets.reshape(-1).long()
    logits = F.linear(h, weight.to(h.dtype), None if bias is None else bias.to(h.dtype))
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    per = F.cross_entropy(logits, y, ignore_index=ignore_index, reduction="none",
                          label_smoothing=label_smoothing)
    out = reduce_token_losses(per, y, ignore_index, reduction, hidden.dtype)
    return out.reshape(targets.shape) if reduction == "none" else out
