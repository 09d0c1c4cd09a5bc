"""Reference ``info_nce``: the InfoNCE / contrastive cross-entropy of queries against keys, in plain
PyTorch (materialises the (M, N) logits). This is the spec of :func:`gkcore.functional.info_nce`.

Shapes: ``query`` (M, D), ``keys`` (N, D) (N may include a feature queue), ``soft_query`` (M, D) or None,
``positives`` None, (M,) integer or (M, N) bool; ``scale`` a Python float or a 0-d tensor.

Math::

    s_ij   = scale * <q_i, k_j>                                     logits, (M, N)
    lse_i  = log sum_j exp(s_ij)
    y_ij   = 1[j == i]                      positives=None (the first M keys are the positives; N >= M)
           = 1[j == positives_i]            positives (M,) integer; a negative index means "no positive"
           = mask_ij / sum_j mask_ij        positives (M, N) bool (several positives per row)
    p^m_ij = softmax_j(scale * <soft_query_i, k_j>)                 soft targets, computed without gradient
    u_ij   = (1 - alpha) * y_ij + alpha * p^m_ij                    (alpha = 0: u = y; soft_query unused)
    t_ij   = (1 - eps) * u_ij + eps / N                             eps = label_smoothing
    loss_i = -sum_j t_ij * log softmax_j(s_i) = lse_i - sum_j t_ij s_ij

``t`` is exactly the target distribution of ``F.cross_entropy(s, u, label_smoothing=eps)`` (label
smoothing acts on the mixed target, as it does for probability targets in ``F.cross_entropy``).

**Rows with no positive** (a negative integer index, or an all-False mask row) have ``loss_i = 0``, get
no gradient, and are left out of the mean -- also when ``alpha > 0`` (the row is dropped as a whole):

    reduction='none': loss_i, shape (M,)
    reduction='sum' : sum_i loss_i
    reduction='mean': sum_i loss_i / max(1, number of rows with a positive)

so a batch in which no row has a positive gives 0 (with zero gradients) under ``'mean'``.

Gradients flow to ``query``, to ``keys`` (when it requires grad) and to ``scale`` (when it is a tensor
that requires grad); the soft targets are constants (no gradient through ``soft_query``, ``keys`` or
``scale`` inside ``p^m``), as in ALBEF's momentum distillation.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

__all__ = ["info_nce_reference", "hard_targets"]


def hard_targets(positives: Optional[torch.Tensor], M: int, N: int, dtype: torch.dtype,
                 device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """The hard target matrix ``y`` (M, N) in ``dtype`` and the row-has-a-positive flags (M,) bool."""
    if positives is None:
        y = torch.zeros(M, N, dtype=dtype, device=device)
        y[torch.arange(M, device=device), torch.arange(M, device=device)] = 1
        return y, torch.ones(M, dtype=torch.bool, device=device)
    if positives.dtype == torch.bool:
        cnt = positives.sum(dim=1)
        valid = cnt > 0
        y = positives.to(dtype) / cnt.clamp(min=1).to(dtype).unsqueeze(1)
        return y, valid
    idx = positives.long()
    valid = idx >= 0
    y = torch.zeros(M, N, dtype=dtype, device=device)
    rows = torch.arange(M, device=device)
    y[rows[valid], idx[valid]] = 1
    return y, valid


def info_nce_reference(query: torch.Tensor, keys: torch.Tensor, *, scale: Union[float, torch.Tensor],
                       positives: Optional[torch.Tensor] = None, soft_query: Optional[torch.Tensor] = None,
                       alpha: float = 0.0, label_smoothing: float = 0.0, reduction: str = "mean") -> torch.Tensor:
    """Plain-PyTorch InfoNCE (see the module docstring for the math and the shapes).

    Args:
        query: (M, D) floating.
        keys: (N, D), same dtype and device.
        scale: float or 0-d tensor (``logit_scale.exp()`` or ``1 / temperature``).
        positives: None (positive of row i is key i), (M,) integer (negative = no positive) or (M, N) bool.
        soft_query: (M, D) momentum queries for the soft targets (needed when ``alpha > 0``).
        alpha: weight of the soft targets in [0, 1].
        label_smoothing: eps in [0, 1], as in ``F.cross_entropy``.
        reduction: ``'mean'`` (over rows with a positive), ``'sum'`` or ``'none'``.

    Returns:
        0-d loss, or (M,) per-row losses for ``reduction='none'``; in ``query``'s dtype. Computed in
        ``query``'s dtype (the reduction in float32 at least).
    """
    M, N = query.shape[0], keys.shape[0]
    dt = query.dtype
    if isinstance(scale, torch.Tensor):
        scale = scale.reshape(()).to(dt)
    logits = (query @ keys.t()) * scale
    logp = F.log_softmax(logits, dim=-1)
    y, valid = hard_targets(positives, M, N, dt, query.device)
    if alpha > 0.0:
        if soft_query is None:
            raise ValueError("alpha > 0 needs soft_query")
        with torch.no_grad():
            sc = scale.detach() if isinstance(scale, torch.Tensor) else scale
            pm = F.softmax((soft_query.detach().to(dt) @ keys.detach().t()) * sc, dim=-1)
        u = (1.0 - alpha) * y + alpha * pm
    else:
        u = y
    eps = float(label_smoothing)
    t = (1.0 - eps) * u + eps / N if eps > 0.0 else u
    per = -(t * logp).sum(dim=-1)
    per = torch.where(valid, per, torch.zeros_like(per))
    if reduction == "none":
        return per
    acc = torch.float64 if dt == torch.float64 else torch.float32
    total = per.to(acc).sum()
    if reduction == "sum":
        return total.to(dt)
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    return (total / valid.sum().clamp(min=1).to(acc)).to(dt)
