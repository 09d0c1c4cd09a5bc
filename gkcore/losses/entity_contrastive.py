"""LECLS / ECLS entity contrastive loss (GK-MVLP), built on :func:`gkcore.functional.info_nce`.

The loss aligns each image embedding with the embeddings of the entities (findings) its report calls
present: a multi-positive InfoNCE of image queries against entity keys, averaged over the samples that
have at least one present entity.

Design choice, not-mentioned entities (label -1): they **stay in the softmax denominator as negatives**,
exactly like absent ones (label 0). Reasons: (1) a radiology report names the abnormal findings it sees,
so an unmentioned finding is, in the great majority of studies, absent (CheXpert-style labelers make the
same assumption for blanks); GK-MVLP describes the negative entities as serving as negatives and gives no
third class. (2) One key set shared by every row keeps the loss a single ``info_nce`` call, which the
fused backends compute in O((B + E) * D) memory without a (B, E) key mask. The cost is some label noise
when a present finding goes unmentioned. Labels -1 and 0 therefore give the same loss; only 1 matters.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from ..ops import info_nce as _op  # looked up at each call: _op.info_nce
from ..ops._util import as_scalar
from ..ops._checks import check_scalar

__all__ = ["entity_contrastive_loss"]


def entity_contrastive_loss(image_emb: torch.Tensor, entity_emb: torch.Tensor, labels: torch.Tensor,
                            scale: Union[float, torch.Tensor], *, reduction: str = "mean",
                            backend: Optional[str] = None) -> torch.Tensor:
    """LECLS: multi-positive InfoNCE of image embeddings against entity embeddings.

    For each sample b with at least one present entity, P_b = {e : labels[b, e] == 1}:
    ``loss_b = -(1/|P_b|) * sum_{e in P_b} log softmax_e(scale * image_emb[b] . entity_emb[e])``, the
    softmax running over all E entities (absent and not-mentioned ones are negatives; see the module
    docstring for why not-mentioned entities stay in the denominator).

    Args:
        image_emb: (B, D) image embeddings (usually L2-normalised). Gets a gradient.
        entity_emb: (E, D) entity embeddings. Gets a gradient when it requires one.
        labels: (B, E) integer (or bool / float) labels in {1 present, 0 absent, -1 not mentioned}.
        scale: logit scale, a float or a 0-d tensor (e.g. ``1 / temperature``); a tensor gets a gradient.
        reduction: ``"mean"`` (over the samples with >= 1 present entity), ``"sum"``, or ``"none"``
            (a (B,) tensor holding 0 for the samples that are left out).
        backend: forwarded to ``info_nce`` (``None`` = automatic, ``"reference"``, ...).
    Returns:
        A 0-d loss (mean / sum) or (B,) per-sample losses (none). When no sample has a present entity
        the mean / sum is 0, still connected to the inputs' graphs (zero gradients), so DDP sees every
        parameter used.
    """
    if not isinstance(image_emb, torch.Tensor) or image_emb.dim() != 2:
        raise ValueError(f"image_emb must be a (B, D) tensor, got "
                         f"{tuple(image_emb.shape) if isinstance(image_emb, torch.Tensor) else type(image_emb).__name__}")
    if not isinstance(entity_emb, torch.Tensor) or entity_emb.dim() != 2:
        raise ValueError(f"entity_emb must be an (E, D) tensor, got "
                         f"{tuple(entity_emb.shape) if isinstance(entity_emb, torch.Tensor) else type(entity_emb).__name__}")
    B, D = image_emb.shape
    E = entity_emb.shape[0]
    if entity_emb.shape[1] != D:
        raise ValueError(f"entity_emb has feature size {entity_emb.shape[1]}, image_emb has {D}")
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != (B, E):
        raise ValueError(f"labels must be a (B, E) = ({B}, {E}) tensor, got "
                         f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}")
    if labels.is_complex():
        raise TypeError(f"labels must be integer, bool or float, got {labels.dtype}")
    if image_emb.device != entity_emb.device or labels.device != image_emb.device:
        raise ValueError(f"image_emb ({image_emb.device}), entity_emb ({entity_emb.device}) and labels "
                         f"({labels.device}) must be on one device")
    if not image_emb.is_floating_point() or not entity_emb.is_floating_point():
        raise TypeError(f"image_emb and entity_emb must be floating point, got {image_emb.dtype}, {entity_emb.dtype}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    scale = as_scalar(scale, "scale")
    check_scalar("scale", scale, image_emb.device)  # before the early return below: a NaN scale never passes
    if labels.dtype != torch.bool and labels.numel():
        ok = (labels == 1) | (labels == 0) | (labels == -1)
        if not bool(ok.all()):
            bad = labels[~ok].unique()[:5].tolist()
            raise ValueError(f"labels must hold only 1 (present), 0 (absent) and -1 (not mentioned); found {bad}")

    pos = labels == 1 if labels.dtype != torch.bool else labels
    keep = pos.any(1)  # (B,)
    n_keep = int(keep.sum())
    if n_keep == 0 or E == 0:
        zero = image_emb.sum() * 0.0 + entity_emb.sum() * 0.0
        if isinstance(scale, torch.Tensor):
            zero = zero + scale * 0.0
        if reduction == "none":
            return zero.expand(B).clone() if B else image_emb.new_zeros(0)
        return zero
    info_nce = _op.info_nce
    q = image_emb if n_keep == B else image_emb[keep]
    p = pos if n_keep == B else pos[keep]
    if reduction != "none":
        return info_nce(q, entity_emb, scale=scale, positives=p, reduction=reduction, backend=backend)
    rows = info_nce(q, entity_emb, scale=scale, positives=p, reduction="none", backend=backend)
    if n_keep == B:
        return rows
    out = rows.new_zeros(B)
    return out.masked_scatter(keep, rows)
