"""GK-MVLP's pre-training loss terms besides ITC (which is :class:`gkcore.nn.ITCLoss`): ITM with hard
negatives, LECLS, the GK head's entity loss, the report LM loss, and ALBEF's alpha ramp of the ITC soft
targets. Mixed into :class:`~gkcore.models.gk_mvlp.GKMVLP`, whose ``forward`` calls them; the module
docstring of :mod:`gkcore.models.gk_mvlp` defines each loss.
"""
from __future__ import annotations

import warnings
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from gkcore import functional as GF

__all__ = ["PretrainLosses"]


def _acc(x: torch.Tensor) -> torch.Tensor:
    """float32 for half / bfloat16 tensors (loss accumulation), unchanged otherwise (float32, float64)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _take_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[idx]`` (rows, repeats allowed) with a backward that sums repeated rows in a fixed order on every
    device. On the CPU, the backward of ``x[idx]`` adds with parallel atomic adds, so two runs can differ
    in the last bits; ``index_select``'s is ordered there. On CUDA it is the reverse: the backward of
    ``index_select`` uses atomic adds and that of ``x[idx]`` sorts (PyTorch's reproducibility notes)."""
    return x.index_select(0, idx) if x.device.type == "cpu" else x[idx]


class PretrainLosses:
    """The loss terms of :meth:`GKMVLP.forward <gkcore.models.gk_mvlp.GKMVLP.forward>` (a mixin)."""

    def current_alpha(self) -> float:
        """ALBEF's ramp: ``alpha * min(1, step / alpha_warmup_steps)``."""
        lc = self.config.loss
        if lc.alpha_warmup_steps <= 0:
            return lc.alpha
        return lc.alpha * min(1.0, float(self.step) / lc.alpha_warmup_steps)

    def sample_negatives(self, img_feat: torch.Tensor, txt_feat: torch.Tensor,
                         study: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """ITM hard negatives: ``(neg_text_for_image (B,), neg_image_for_text (B,))`` drawn by
        ``sample_hard_negatives`` from the (B, D) ITC features with ``group_ids=study`` (same-study pairs are
        never negatives), with ``self.itm_generator`` (on the model's device, where the features must be;
        seeded with ``loss.itm_seed``, saved by the trainer) and the backend ``loss.itm_sampler_backend``
        (None = the model's backend)."""
        be = self.config.loss.itm_sampler_backend or self.backend
        scale = self._itc_scale().to(img_feat.device, img_feat.dtype)
        neg_t, neg_i = GF.sample_hard_negatives(img_feat, txt_feat, scale, group_ids=study, generator=self._itm_rng(),
                                                backend=be)
        self.last_itm_negatives = (neg_t, neg_i)
        return neg_t, neg_i

    def _itc_scale(self) -> torch.Tensor:
        """The ITC logit scale 1 / temperature (0-d, no gradient)."""
        return 1.0 / self.itc.temp.detach()

    def _itm_loss(self, img_tokens: torch.Tensor, img_feat: torch.Tensor, txt_hidden: torch.Tensor,
                  txt_feat: torch.Tensor, att: torch.Tensor, study: torch.Tensor) -> torch.Tensor:
        """2-way CE of the ITM head on the positive pairs and the hard-negative pairs of each side."""
        B = img_tokens.shape[0]
        dev, dt = self.vision_proj.weight.device, self.vision_proj.weight.dtype
        has_neg = B > 1 and bool((study[:, None] != study[None, :]).any())
        if has_neg:
            with torch.no_grad():
                neg_t, neg_i = self.sample_negatives(img_feat.detach(), txt_feat.detach(), study)
            txt_all = torch.cat([txt_hidden, txt_hidden, _take_rows(txt_hidden, neg_t)], 0)
            att_all = torch.cat([att, att, att[neg_t]], 0)
            img_all = torch.cat([img_tokens, _take_rows(img_tokens, neg_i), img_tokens], 0)
            fused = self.fusion_encoder(txt_all, att_all, img_all)
            itm_logits = self.itm_head(fused[:, 0])
            itm_labels = torch.cat([torch.ones(B, dtype=torch.long, device=dev),
                                    torch.zeros(2 * B, dtype=torch.long, device=dev)])
            loss_itm = F.cross_entropy(_acc(itm_logits), itm_labels).to(dt)
        else:
            warnings.warn("ITM: every pair in the batch shares one study_id (or B = 1): no negative, loss_itm = 0")
            fused = self.fusion_encoder(txt_hidden, att, img_tokens)
            loss_itm = self.itm_head(fused[:, 0]).sum() * 0.0
        return loss_itm

    def _ecls_loss(self, img_feat: torch.Tensor, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """LECLS between the image embeddings (B, De) and the knowledge book's entity embeddings (E, De)."""
        return GF.entity_contrastive_loss(img_feat, emb.to(img_feat.dtype), labels, 1.0 / self.ecls_temp,
                                          backend=self.backend)

    def _gk_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """CE of the GK head's present/absent logits (B, E, 2) over the mentioned (sample, entity) pairs, or
        over every pair with ``loss.unmentioned_as_absent`` (an unmentioned entity counts as absent)."""
        ce = F.cross_entropy(_acc(logits).flatten(0, 1), labels.clamp(min=0).flatten(), reduction="none")
        if self.config.loss.unmentioned_as_absent:
            return ce.mean().to(self.vision_proj.weight.dtype)
        known = labels >= 0  # mean over the mentioned (sample, entity) pairs; 0 when there is none (no sync)
        return ((ce * known.flatten()).sum() / known.sum().clamp(min=1)).to(self.vision_proj.weight.dtype)

    def _lm_loss(self, img_tokens: torch.Tensor, gk: Dict[str, torch.Tensor], rmask: torch.Tensor,
                 ids: torch.Tensor, att: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Next-token CE of the report decoder (BOS in place of CLS, padding ignored); ``labels``: the
        entity labels, for ``gk.decoder_label_forcing``."""
        enc, enc_mask = self._decoder_memory(img_tokens, gk, rmask)
        dec_ids = ids.clone()
        dec_ids[:, 0] = self.bos_token_id
        hidden = self.decoder(dec_ids, att, enc, enc_mask, cond=self._decoder_condition(gk, labels))
        targets = ids[:, 1:].masked_fill(att[:, 1:] == 0, -100)
        if self.lm_rows is not None:  # text.lm_vocab: targets become rows of the restricted vocabulary
            targets = torch.where(targets < 0, targets, self.lm_index[targets.clamp(min=0)])
        # label smoothing set in the head; padding ignored
        return self.lm_head(hidden[:, :-1], targets, rows=self.lm_rows)
