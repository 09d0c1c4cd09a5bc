"""GK-MVLP's report generation: greedy decoding and beam search over the report decoder, with the image
tokens and the GK memory as cross-attention context. Decoding is incremental by default: the decoder's
key/value cache (per layer, self-attention keys of the earlier positions and the fixed cross-attention
keys) means each step runs the decoder on the newest token only; ``use_cache=False`` recomputes the
whole prefix every step (the same tokens, the reference for the tests). Mixed into
:class:`~gkcore.models.gk_mvlp.GKMVLP`.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from .inference import inference

__all__ = ["ReportGeneration"]


class ReportGeneration:
    """:meth:`generate` and :meth:`generate_report` of :class:`~gkcore.models.gk_mvlp.GKMVLP` (a mixin)."""

    @torch.no_grad()
    def _next_logprobs(self, ids, enc, enc_mask, cache: Optional[List[Dict]] = None, cond=None):
        """Log-probabilities (B, V) of the token after ``ids`` (B, T). Without ``cache`` the decoder runs on
        the whole prefix; with ``cache`` (one dict per decoder layer, filled here) only on the positions
        the cache does not hold yet (the newest token after the first call). ``cond``: the decoder's
        condition (B, E) or None (``gk.decoder_entity_states``)."""
        if cache is None:
            h = self.decoder(ids, torch.ones_like(ids), enc, enc_mask, cond=cond)[:, -1]
        else:
            past = _cache_length(cache)
            h = self.decoder(ids[:, past:], None, enc, enc_mask, cache=cache, past_length=past, cond=cond)[:, -1]
        rows = self.lm_rows  # text.lm_vocab: only its tokens can be emitted (-inf elsewhere)
        w, b = self.lm_head.rows(rows)
        lp = torch.log_softmax(F.linear(h.float(), w.float(), None if b is None else b.float()), -1)
        if rows is None:
            return lp
        return lp.new_full((lp.shape[0], self.lm_head.vocab_size), float("-inf")).index_copy_(1, rows, lp)

    @torch.no_grad()
    def generate_report(self, images: torch.Tensor, max_length: Optional[int] = None, num_beams: int = 1,
                        region_boxes: Optional[torch.Tensor] = None,
                        region_mask: Optional[torch.Tensor] = None, use_cache: bool = True) -> List[str]:
        """Reports (B strings) for images (B, C, H, W): greedy (``num_beams=1``) or beam search; see
        :meth:`generate`. The text is the decoded tokens up to the first SEP, special tokens dropped."""
        ids, _ = self.generate(images, max_length, num_beams, region_boxes, region_mask, use_cache=use_cache)
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
                 region_mask: Optional[torch.Tensor] = None,
                 use_cache: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
        """Token ids and scores of the best sequence per image: greedy (``num_beams=1``) or beam search
        over the sum of next-token log-probabilities (no length penalty; a beam ends at SEP and then
        only repeats SEP at no cost), starting from BOS, ``max_length`` positions including BOS (default
        ``config.max_length``). Returns ``ids`` (B, T <= max_length - 1) without BOS (SEP-padded after
        the end) and ``scores`` (B,) float32, the log-probability of ``ids`` up to and including the
        first SEP. ``use_cache``: incremental decoding with the decoder's key/value cache (beams reorder
        it as they are re-ranked); False recomputes the prefix every step."""
        if num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {num_beams}")
        max_length = max_length or self.config.max_length
        images = self._images(images)
        tokens = self.visual(images)
        boxes, rmask = self.detector(images, None if region_boxes is None else region_boxes.to(images.device, images.dtype),
                                     None if region_mask is None else region_mask.to(images.device))
        gk = None
        if self.gk is not None:
            feats, _ = self.knowledge_book()
            gk = self._run_gk(tokens[:, 1:], boxes, rmask, feats, book=feats)
        enc, enc_mask = self._decoder_memory(tokens, gk, rmask)
        cond = self._decoder_condition(gk)
        B, K, dev = images.shape[0], num_beams, images.device
        sep = self.tokenizer.sep_token_id
        enc = enc.repeat_interleave(K, 0)
        enc_mask = None if enc_mask is None else enc_mask.repeat_interleave(K, 0)
        cond = None if cond is None else cond.repeat_interleave(K, 0)
        seqs = torch.full((B * K, 1), self.bos_token_id, dtype=torch.long, device=dev)
        scores = torch.zeros(B, K, device=dev)
        scores[:, 1:] = float("-inf")  # start from one live beam per image
        done = torch.zeros(B * K, dtype=torch.bool, device=dev)
        cache = [{} for _ in self.decoder.layer] if use_cache else None
        for _ in range(max_length - 1):
            lp = self._next_logprobs(seqs, enc, enc_mask, cache, cond)  # (B*K, V)
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
            if cache is not None and K > 1:
                _reorder_cache(cache, src)
            done = done[src] | (tok.flatten() == sep)
            scores = top
            if bool(done.all()):
                break
        best_score, best = scores.max(-1)
        best = best + torch.arange(B, device=dev) * K
        return seqs[best, 1:], best_score.float()


def _cache_length(cache: List[Dict]) -> int:
    """Positions held by a decoder cache (0 before the first call)."""
    kv = cache[0].get("self", {}) if cache else {}
    return int(kv["k"].shape[2]) if "k" in kv else 0


def _reorder_cache(cache: List[Dict], src: torch.Tensor) -> None:
    """Beam search re-ranked its beams (row i continues beam ``src[i]``): the self-attention keys and values
    follow. The cross-attention keys are left alone: the beams of one image share them and ``src`` never
    leaves an image's beams."""
    for layer in cache:
        kv = layer.get("self")
        if kv and "k" in kv:
            kv["k"], kv["v"] = kv["k"][src], kv["v"][src]
