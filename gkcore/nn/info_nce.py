"""Contrastive loss modules built on :func:`gkcore.functional.info_nce`.

* :class:`ClipLoss`: a drop-in for open_clip's ``ClipLoss`` (same constructor and ``forward``), without
  the (B, B) logits matrix when a fused ``info_nce`` backend serves the inputs.
* :class:`ITCLoss`: ALBEF's image-text contrastive loss with momentum-feature queues, a learnable
  temperature clamped to [0.001, 0.5] and momentum distillation (``alpha``).

Both take ``backend=`` (``None`` = automatic choice, ``"reference"`` to force plain PyTorch, ...), passed
to every ``info_nce`` call.
"""
from __future__ import annotations

from typing import Dict, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..collectives import all_gather, is_distributed, world_info
from ..ops import info_nce as _op  # looked up at each call: _op.info_nce
from ..ops._util import as_scalar

__all__ = ["ClipLoss", "ITCLoss"]


def _check_pair(a: torch.Tensor, b: torch.Tensor, na: str, nb: str, dim: Optional[int] = None) -> None:
    for t, n in ((a, na), (b, nb)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{n} must be a tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{n} must be 2-D (B, D), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{n} must be floating point, got {t.dtype}")
        if dim is not None and t.shape[1] != dim:
            raise ValueError(f"{n} has feature size {t.shape[1]}, expected {dim}")
    if a.shape != b.shape:
        raise ValueError(f"{na} {tuple(a.shape)} and {nb} {tuple(b.shape)} must have the same shape")
    if a.device != b.device:
        raise ValueError(f"{na} is on {a.device} but {nb} on {b.device}")
    if a.shape[0] == 0:
        raise ValueError(f"{na} and {nb} have no rows (batch size 0): a contrastive loss needs at least one pair")
    if a.shape[1] == 0:
        raise ValueError(f"{na} and {nb} have no features (D=0)")


class ClipLoss(nn.Module):
    """CLIP's symmetric InfoNCE, a drop-in for ``open_clip.loss.ClipLoss``.

    ``loss = (CE(s * I @ T^T, labels) + CE(s * T @ I^T, labels)) / 2`` with ``s = logit_scale`` (already
    exponentiated, as open_clip passes it) and ``labels = arange``. With ``world_size > 1`` (a
    ``torch.distributed`` run) the features are all-gathered first:

    * ``local_loss=False``: every rank computes the loss over the global batch (W * B queries and keys);
    * ``local_loss=True``: the local B queries against the W * B gathered keys, positives at
      ``rank * B + i``;
    * ``gather_with_grad=True``: gradients flow back through the gather to the rank that owns each
      feature (summed over ranks); otherwise only the local features get a gradient.

    Args:
        local_loss, gather_with_grad, cache_labels, rank, world_size: as in open_clip (rank and
            world_size are taken from the constructor, not from the process group, like open_clip).
        use_horovod: only ``False`` is supported.
        backend: ``info_nce`` backend (``None`` = automatic).
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, use_horovod: bool = False, *, backend: Optional[str] = None):
        super().__init__()
        if use_horovod:
            raise NotImplementedError("gkcore.nn.ClipLoss supports torch.distributed only (use_horovod=False)")
        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")
        self.local_loss = bool(local_loss)
        self.gather_with_grad = bool(gather_with_grad)
        self.cache_labels = bool(cache_labels)
        self.rank = rank
        self.world_size = world_size
        self.use_horovod = False
        self.backend = backend
        self.prev_num_logits = 0
        self.labels: Dict[torch.device, torch.Tensor] = {}

    def get_ground_truth(self, device: torch.device, num_logits: int) -> torch.Tensor:
        """(num_logits,) int64 target indices: ``arange`` (+ ``rank * num_logits`` with local_loss)."""
        if self.prev_num_logits != num_logits or device not in self.labels:
            labels = torch.arange(num_logits, device=device, dtype=torch.long)
            if self.world_size > 1 and self.local_loss:
                labels = labels + num_logits * self.rank
            if self.cache_labels:
                self.labels[device] = labels
                self.prev_num_logits = num_logits
        else:
            labels = self.labels[device]
        return labels

    def _gather(self, image_features, text_features):
        if not is_distributed():
            raise RuntimeError(f"ClipLoss(world_size={self.world_size}) needs an initialised torch.distributed "
                               "process group")
        rank, world = world_info()
        if world != self.world_size or rank != self.rank:
            raise RuntimeError(f"ClipLoss was built with rank={self.rank}, world_size={self.world_size} but the "
                               f"process group has rank={rank}, world_size={world}")
        keep_local = not self.local_loss  # open_clip: the local slot keeps its gradient only without local_loss
        all_i = all_gather(image_features, grad=self.gather_with_grad, keep_local=keep_local)
        all_t = all_gather(text_features, grad=self.gather_with_grad, keep_local=keep_local)
        return all_i, all_t

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: Union[float, torch.Tensor], logit_bias=None,
                output_dict: bool = False):
        """
        Args:
            image_features: (B, D) image embeddings (open_clip passes them L2-normalised).
            text_features: (B, D) text embeddings.
            logit_scale: float or 0-d / (1,) tensor, the multiplier of the cosine similarities (already
                exponentiated). A tensor gets a gradient.
            logit_bias: accepted for open_clip's signature; a scalar bias shifts every logit equally and
                leaves the softmax loss unchanged (it gets a zero gradient). A non-scalar bias is refused.
                A bool in this position is read as ``output_dict`` (open_clip 2.x's signature).
            output_dict: return ``{"contrastive_loss": loss}`` instead of the 0-d loss.
        Returns:
            0-d loss, or a dict.
        """
        if isinstance(logit_bias, bool):
            output_dict, logit_bias = logit_bias, None
        _check_pair(image_features, text_features, "image_features", "text_features")
        scale = as_scalar(logit_scale, "logit_scale")
        info_nce = _op.info_nce
        be = self.backend
        if self.world_size > 1:
            all_i, all_t = self._gather(image_features, text_features)
            if self.local_loss:
                labels = self.get_ground_truth(image_features.device, image_features.shape[0])
                loss = (info_nce(image_features, all_t, scale=scale, positives=labels, backend=be)
                        + info_nce(text_features, all_i, scale=scale, positives=labels, backend=be)) / 2
            else:
                loss = (info_nce(all_i, all_t, scale=scale, backend=be)
                        + info_nce(all_t, all_i, scale=scale, backend=be)) / 2
        else:
            loss = (info_nce(image_features, text_features, scale=scale, backend=be)
                    + info_nce(text_features, image_features, scale=scale, backend=be)) / 2
        if logit_bias is not None:
            if isinstance(logit_bias, torch.Tensor):
                if logit_bias.numel() != 1:
                    raise ValueError("ClipLoss: only a scalar logit_bias is supported (it does not change the "
                                     f"softmax loss); got shape {tuple(logit_bias.shape)}")
                loss = loss + 0.0 * logit_bias.reshape(()).to(loss.dtype)
            elif not isinstance(logit_bias, (int, float)):
                raise TypeError(f"logit_bias must be a scalar, got {type(logit_bias).__name__}")
        return {"contrastive_loss": loss} if output_dict else loss

    def extra_repr(self) -> str:
        return (f"local_loss={self.local_loss}, gather_with_grad={self.gather_with_grad}, rank={self.rank}, "
                f"world_size={self.world_size}, backend={self.backend!r}")


class ITCLoss(nn.Module):
    """ALBEF image-text contrastive loss with momentum queues and momentum distillation.

    With online features v, t (B, D), momentum features v', t' (B, D), queues Q_v, Q_t (Q, D) and
    temperature tau (a parameter, clamped in place to [temp_min, temp_max] at every call):

    * keys: ``K_t = [t'_all ; Q_t]``, ``K_v = [v'_all ; Q_v]`` ((B_all + Q, D), no gradient);
    * ``L_i2t = info_nce(v, K_t, scale=1/tau, soft_query=v', alpha=alpha)``: targets
      ``(1 - alpha) * onehot + alpha * softmax(v' K_t^T / tau)``; ``L_t2i`` the same with t, K_v, t';
    * returns ``(L_i2t + L_t2i) / 2`` (each a mean over the local batch);
    * then, in training mode, enqueues the (all-gathered) momentum features at ``queue_ptr`` and
      advances it by the global batch size, wrapping around the end of the queue (no host
      synchronisation). Any batch size works: a batch larger than the queue leaves its last Q rows.
      A row pair whose image or text momentum feature holds a NaN or an inf is never enqueued: the
      queue rows it would have replaced keep their old values (the pointer still advances).

    Distributed runs (``torch.distributed`` initialised): the momentum features of every rank are
    all-gathered (no gradient) and enqueued in rank order, as in ALBEF. With ``gather_keys=True``
    (default) the gathered in-batch momentum features are also the in-batch keys (positives at
    ``rank * B + i``), so that W ranks with local batch B and DDP gradient averaging reproduce one
    process on the concatenated batch; ``gather_keys=False`` uses only the local momentum features as
    in-batch keys (ALBEF's original code).

    Args:
        embed_dim: D, the feature size.
        queue_size: Q, rows of each queue (0 = no queue). Any global batch size (B * world_size) works
            (ALBEF required Q to be a multiple of it; here the writes wrap around), so a batch made
            smaller by a skipped sample does not stop a run.
        temperature: initial tau (0.07 in ALBEF / BLIP).
        temp_min, temp_max: clamp range of tau.
        learnable_temperature: tau is an ``nn.Parameter`` (else a buffer).
        gather_keys: see above.
        distributed: ``None`` (default): gather when a ``torch.distributed`` process group is initialised;
            ``False``: never gather (each process is on its own); ``True``: require a process group.
        process_group: the group to gather over (default: the default group).
        backend: ``info_nce`` backend (``None`` = automatic).

    Buffers: ``image_queue``, ``text_queue`` (Q, D) (rows are L2-normalised random vectors at start),
    ``queue_ptr`` (1,) int64.
    """

    def __init__(self, embed_dim: int, queue_size: int = 65536, temperature: float = 0.07, *,
                 temp_min: float = 0.001, temp_max: float = 0.5, learnable_temperature: bool = True,
                 gather_keys: bool = True, distributed: Optional[bool] = None, process_group=None,
                 backend: Optional[str] = None):
        super().__init__()
        if not isinstance(embed_dim, int) or embed_dim < 1:
            raise ValueError(f"embed_dim must be a positive int, got {embed_dim!r}")
        if not isinstance(queue_size, int) or queue_size < 0:
            raise ValueError(f"queue_size must be an int >= 0, got {queue_size!r}")
        if not 0 < temp_min <= temp_max:
            raise ValueError(f"need 0 < temp_min <= temp_max, got {temp_min}, {temp_max}")
        if not temp_min <= float(temperature) <= temp_max:
            raise ValueError(f"temperature {temperature} is outside [{temp_min}, {temp_max}]")
        self.embed_dim, self.queue_size = embed_dim, queue_size
        self.temp_min, self.temp_max = float(temp_min), float(temp_max)
        self.gather_keys = bool(gather_keys)
        self.distributed = distributed
        self.process_group = process_group
        self.backend = backend
        t = torch.tensor(float(temperature))
        if learnable_temperature:
            self.temp = nn.Parameter(t)
        else:
            self.register_buffer("temp", t)
        self.register_buffer("image_queue", F.normalize(torch.randn(queue_size, embed_dim), dim=1))
        self.register_buffer("text_queue", F.normalize(torch.randn(queue_size, embed_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    def _world(self):
        if self.distributed is False:
            return 0, 1
        if self.distributed and not is_distributed(self.process_group):
            raise RuntimeError("ITCLoss(distributed=True) needs an initialised torch.distributed process group "
                               "with more than one rank")
        return world_info(self.process_group)

    def check_batch(self, batch_size: int, world_size: Optional[int] = None) -> None:
        """Raise ``ValueError`` unless the local batch size is a positive int (any size fits the queue)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"ITCLoss: the batch must hold at least one pair, got batch size {batch_size!r}")

    def forward(self, image_feat: torch.Tensor, text_feat: torch.Tensor, image_feat_m: torch.Tensor,
                text_feat_m: torch.Tensor, alpha: Union[float, torch.Tensor] = 0.0) -> torch.Tensor:
        """
        Args:
            image_feat, text_feat: (B, D) online features (ALBEF: L2-normalised projections).
            image_feat_m, text_feat_m: (B, D) momentum features (treated as constants).
            alpha: distillation weight in [0, 1] (0 = hard one-hot targets).
        Returns:
            0-d loss ``(L_i2t + L_t2i) / 2``.
        """
        _check_pair(image_feat, text_feat, "image_feat", "text_feat", self.embed_dim)
        _check_pair(image_feat_m, text_feat_m, "image_feat_m", "text_feat_m", self.embed_dim)
        if image_feat_m.shape != image_feat.shape:
            raise ValueError(f"momentum features {tuple(image_feat_m.shape)} and online features "
                             f"{tuple(image_feat.shape)} must have the same shape")
        if image_feat_m.device != image_feat.device:
            raise ValueError(f"momentum features on {image_feat_m.device}, online features on {image_feat.device}")
        a = float(alpha) if not isinstance(alpha, torch.Tensor) else float(alpha.detach())
        if not 0.0 <= a <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {a}")
        B = image_feat.shape[0]
        rank, world = self._world()
        if self.training:
            self.check_batch(B, world)

        with torch.no_grad():
            self.temp.clamp_(self.temp_min, self.temp_max)
        scale = 1.0 / self.temp

        img_m = image_feat_m.detach()
        txt_m = text_feat_m.detach()
        if world > 1:
            img_m_all = all_gather(img_m, grad=False, keep_local=False, group=self.process_group)
            txt_m_all = all_gather(txt_m, grad=False, keep_local=False, group=self.process_group)
        else:
            img_m_all, txt_m_all = img_m, txt_m
        if world > 1 and self.gather_keys:
            img_keys, txt_keys = img_m_all, txt_m_all
            positives = torch.arange(B, device=image_feat.device) + rank * B
        else:
            img_keys, txt_keys, positives = img_m, txt_m, None
        dt = image_feat.dtype
        if self.queue_size:
            k_t = torch.cat([txt_keys.to(dt), self.text_queue.to(dt)], 0)
            k_i = torch.cat([img_keys.to(dt), self.image_queue.to(dt)], 0)
        else:
            k_t, k_i = txt_keys.to(dt), img_keys.to(dt)

        info_nce = _op.info_nce
        kw = dict(scale=scale, positives=positives, alpha=a, backend=self.backend)
        l_i2t = info_nce(image_feat, k_t, soft_query=img_m.to(dt) if a > 0 else None, **kw)
        l_t2i = info_nce(text_feat, k_i, soft_query=txt_m.to(dt) if a > 0 else None, **kw)
        loss = (l_i2t + l_t2i) / 2
        if self.training:
            self._dequeue_and_enqueue(img_m_all, txt_m_all)
        return loss

    @torch.no_grad()
    def _dequeue_and_enqueue(self, image_feat_m: torch.Tensor, text_feat_m: torch.Tensor) -> None:
        """Write (B_all, D) momentum features at ``queue_ptr`` and advance it (modulo Q)."""
        if not self.queue_size:
            return
        n = image_feat_m.shape[0]
        Q = self.queue_size
        start = self.queue_ptr
        if n > Q:  # only the last Q rows survive; writing them alone keeps the indices distinct
            image_feat_m, text_feat_m = image_feat_m[n - Q:], text_feat_m[n - Q:]
            start = start + (n - Q)
        m = image_feat_m.shape[0]
        idx = ((start + torch.arange(m, device=start.device)) % Q).to(self.image_queue.device)
        img = image_feat_m.to(self.image_queue.device, self.image_queue.dtype)
        txt = text_feat_m.to(self.text_queue.device, self.text_queue.dtype)
        # a pair with a non-finite feature keeps the old rows (no host sync; the pointer advances as usual)
        ok = (torch.isfinite(img).all(1) & torch.isfinite(txt).all(1)).unsqueeze(1)
        self.image_queue.index_copy_(0, idx, torch.where(ok, img, self.image_queue.index_select(0, idx)))
        self.text_queue.index_copy_(0, idx, torch.where(ok, txt, self.text_queue.index_select(0, idx)))
        self.queue_ptr.add_(n).remainder_(Q)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, queue_size={self.queue_size}, temp_range=({self.temp_min}, "
                f"{self.temp_max}), gather_keys={self.gather_keys}, backend={self.backend!r}")
