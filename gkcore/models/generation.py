"""GK-MVLP's report generation: greedy decoding and beam search over the report decoder, with the image
tokens and the GK memory as cross-attention context. Mixed into :class:`~gkcore.models.gk_mvlp.GKMVLP`.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from .inference import inference

__all__ = ["ReportGeneration"]


class ReportGeneration:
    """:meth:`generate` and :meth:`generate_report` of :class:`~gkcore.models.gk_mvlp.GKMVLP` (a mixin)."""

    @torch.no_grad()
    def _next_logprobs(self, ids, enc, enc_mask):
        att = torch.ones_like(ids)
        h = self.decoder(ids, att, enc, enc_mask)[:, -1]
        logits = F.linear(h.float(), self.lm_head.weight.float(),
                          None if self.lm_head.bias is None else self.lm_head.bias.float())
        return torch.log_softmax(logits, -1)

    @torch.no_grad()
    def generate_report(self, images: torch.Tensor, max_length: Optional[int] = None, num_beams: int = 1,
                        region_boxes: Optional[torch.Tensor] = None,
                        region_mask: Optional[torch.Tensor] = None) -> List[str]:
        """Reports (B strings) for images (B, C, H, W): greedy (``num_beams=1``) or beam search; see
        :meth:`generate`. The text is the decoded tokens up to the first SEP, special tokens dropped."""
        ids, _ = self.generate(images, max_length, num_beams, region_boxes, region_mask)
        sep = self.tokenizer.sep_token_id
        out = []
        for row in ids.tolist():
            if sep in row:
                row = row[:row.index(sep)]
            out.append(self.tokenizer.decode(row, skip_special_tokens=True).strip())
        return out

    @inference
    def generate(self, images: torch.Tensor, max_length: Optional[int] = None, num_beams: int = 1,
                 region_boxes: Optional[torch.Tensor] = None,
                 region_mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Token ids and scores of the best sequence per image: greedy (``num_beams=1``) or beam search
        over the sum of next-token log-probabilities (no length penalty; a beam ends at SEP and then
        only repeats SEP at no cost), starting from BOS, ``max_length`` positions including BOS (default
        ``config.max_length``). Returns ``ids`` (B, T <= max_length - 1) without BOS (SEP-padded after
        the end) and ``scores`` (B,) float32, the log-probability of ``ids`` up to and including the
        first SEP."""
        if num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {num_beams}")
        max_length = max_length or self.config.max_length
        images = self._images(images)
        tokens = self.visual(images)
        boxes, rmask = self.detector(images, None if region_boxes is None else region_boxes.to(images.device, images.dtype),
                                     None if region_mask is None else region_mask.to(images.device))
        feats, _ = self.knowledge_book()
        gk = self._run_gk(tokens[:, 1:], boxes, rmask, feats, book=feats)
        enc, enc_mask = self._decoder_memory(tokens, gk, rmask)
        B, K, dev = images.shape[0], num_beams, images.device
        sep = self.tokenizer.sep_token_id
        enc = enc.repeat_interleave(K, 0)
        enc_mask = None if enc_mask is None else enc_mask.repeat_interleave(K, 0)
        seqs = torch.full((B * K, 1), self.bos_token_id, dtype=torch.long, device=dev)
        scores = torch.zeros(B, K, device=dev)
        scores[:, 1:] = float("-inf")  # start from one live beam per image
        done = torch.zeros(B * K, dtype=torch.bool, device=dev)
        for _ in range(max_length - 1):
            lp = self._next_logprobs(seqs, enc, enc_mask)  # (B*K, V)
            V = lp.shape[-1]
            # finished beams only extend with SEP at no cost
            lp = torch.where(done[:, None], torch.full_like(lp, float("-inf")), lp)
            lp[done, sep] = 0.0
            cand = (scores.view(B * K, 1) + lp).view(B, K * V)
            top, idx = cand.topk(K, dim=-1)
            beam, tok = idx // V, idx % V
            base = (torch.arange(B, device=dev) * K)[:, None]
            src = (base + beam).flatten()
            seqs = torch.cat([seqs[src], tok.flatten()[:, None]], 1)
            done = done[src] | (tok.flatten() == sep)
            scores = top
            if bool(done.all()):
                break
        best_score, best = scores.max(-1)
        best = best + torch.arange(B, device=dev) * K
        return seqs[best, 1:], best_score.float()
