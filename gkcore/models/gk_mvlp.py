"""GK-MVLP: grounded knowledge-enhanced vision-language pre-training for chest X-rays.

Components (B batch, L tokens, Nv = 1 + gh*gw image tokens, Dv / Dt vision / text widths, De embed dim,
E knowledge entities, R = 29 regions):

* ``visual`` :class:`ImageEncoder` (timm ViT): images (B, C, H, W) -> tokens (B, Nv, Dv).
* ``text_encoder`` :class:`TextEncoder` (BERT layers ``0..fusion_start``): (B, L) -> (B, L, Dt).
* ``fusion_encoder`` :class:`FusionEncoder` (BERT layers with cross-attention to image tokens) and the
  ITM head ``Linear(Dt, 2)`` on the fused CLS.
* ``decoder`` :class:`ReportDecoder` (causal BERT, cross-attention to the image tokens and the GK
  memory) with the LM head ``lm_head`` (``gkcore.nn.LinearCrossEntropy``; weight tied to the word
  embeddings when ``text.tie_lm_head``).
* ``gk`` :class:`GKModule`: knowledge queries (entity prompts encoded by the text tower) fused with
  region-pooled and global patch features; per-entity present/absent head; grounding maps.
* ``detector`` :class:`RegionDetector`: region boxes from the batch, the atlas, or a Faster R-CNN.
* ``vision_proj`` / ``text_proj``: Linear to De (from the ViT CLS token / the report encoder's masked mean
  over tokens, ``text.pooling``), features L2-normalised; momentum copies
  ``visual_m``, ``vision_proj_m``, ``text_encoder_m``, ``text_proj_m`` (EMA, ``loss.momentum``).

Losses of ``model(batch)`` (each a scalar; ``loss`` = weighted sum with ``config.loss.w_*``):

* ``loss_itc``: ALBEF ITC through ``gkcore.nn.ITCLoss`` (queues ``itc.image_queue`` / ``itc.text_queue``
  (Q, De) of momentum features, momentum distillation with weight ``alpha``; ``alpha=None`` uses the
  ramp ``loss.alpha * min(1, step / loss.alpha_warmup_steps)``).
* ``loss_itm``: 2-way CE on B positive pairs, B (text, hard-negative image) and B (hard-negative text,
  image) pairs; negatives from ``sample_hard_negatives(..., group_ids=study_id)`` (same-study pairs are
  never negatives), drawn with the model's ``itm_generator`` (seed ``loss.itm_seed``) on the backend
  ``loss.itm_sampler_backend`` (None = the model's backend; backends draw different samples of the same
  law, so "reference" pins the draws across paths). A batch in which every pair shares one study has no
  negative: ``loss_itm`` is 0 then (with a warning).
* ``loss_lm``: next-token CE with label smoothing through ``linear_cross_entropy`` (the logits are never
  materialised); the decoder input is the report with BOS (``text.bos_token``) in place of CLS, targets
  are the report shifted by one with padding ignored.
* ``loss_ecls``: LECLS, ``entity_contrastive_loss`` between the image embedding (B, De) and the knowledge
  book's entity embeddings (E, De) with ``entity_labels`` (samples without a present entity left out),
  learnable temperature ``ecls_temp``.
* ``loss_gk``: CE of the GK head's per-entity present/absent logits against ``entity_labels`` (entities
  labelled -1, not mentioned, are ignored). This trains the zero-shot head (MedKLIP-style).

Training-mode forward also (in this order) clamps the temperatures, runs :meth:`momentum_update`,
enqueues the momentum features (inside ITCLoss) and increments ``step`` (used by the alpha ramp).

The knowledge book (entity prompt features) is computed by the knowledge towers (:meth:`knowledge_towers`:
the online text tower, or with ``gk.knowledge_encoder="frozen"`` a frozen copy of it made at build time)
without gradient and cached; the cache key is the identity and ``_version`` counter of every parameter of ``text_encoder`` and
``text_proj`` (a counter is bumped by every in-place update: optimizer steps, ``load_state_dict``,
``copy_``), plus device, dtype and the prompt list, so it is recomputed exactly when those parameters
change (in training that is after every optimizer step, since the text tower is trained by ITC). With ``gk.freeze_knowledge_encoder=False``
it is recomputed with gradient at every training forward instead.
"""
from __future__ import annotations

import copy
import json
import os
import warnings
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from gkcore import functional as GF
from gkcore import nn as gnn
from gkcore.data import knowledge as K
from .config import GKMVLPConfig, config_from_dict, config_to_dict, minilm_path
from .detector import NUM_REGIONS, RegionDetector
from .encoders import (FusionEncoder, ImageEncoder, ReportDecoder, TextEncoder, init_bert_weights, init_text_towers,
                       load_bert_state,
                       text_config_from_pretrained)
from .gk_module import GKModule

__all__ = ["GKMVLP", "REQUIRED_KEYS"]

REQUIRED_KEYS = ("image", "input_ids", "attention_mask", "entity_labels", "region_boxes", "region_mask", "study_id")


def _tokenizer_folder(folder: Optional[str]) -> Optional[str]:
    """``folder`` when it holds a tokenizer (tokenizer.json or vocab.txt), else None."""
    if folder and any(os.path.isfile(os.path.join(folder, f)) for f in ("tokenizer.json", "vocab.txt")):
        return folder
    return None


def _inference(fn):
    """Inference API methods run without autograd and in eval mode (no dropout); the mode is restored."""
    import functools

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        was = self.training
        self.eval()
        try:
            with torch.no_grad():
                return fn(self, *args, **kwargs)
        finally:
            self.train(was)
    return wrapper


def _acc(x: torch.Tensor) -> torch.Tensor:
    """float32 for half / bfloat16 tensors (loss accumulation), unchanged otherwise (float32, float64)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _take_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[idx]`` (rows, repeats allowed) with a backward that sums repeated rows in a fixed order on every
    device. On the CPU, the backward of ``x[idx]`` adds with parallel atomic adds, so two runs can differ
    in the last bits; ``index_select``'s is ordered there. On CUDA it is the reverse: the backward of
    ``index_select`` uses atomic adds and that of ``x[idx]`` sorts (PyTorch's reproducibility notes)."""
    return x.index_select(0, idx) if x.device.type == "cpu" else x[idx]


class GKMVLP(nn.Module):
    """The full model; see the module docstring. Build with :func:`gkcore.create_model`."""

    #: the trainer's contract: momentum encoders and queues are updated inside ``forward`` (training mode)
    momentum_in_forward = True

    def __init__(self, config: GKMVLPConfig, backend: Optional[str] = None, tokenizer=None,
                 init_pretrained: bool = True):
        super().__init__()
        config = copy.deepcopy(config)
        config.text = text_config_from_pretrained(config.text)
        self.config, self.backend = config, backend
        tc, lc, gc = config.text, config.loss, config.gk
        p = config.dropout
        if config.tokenizer_path is None:
            config.tokenizer_path = _tokenizer_folder(tc.pretrained) or minilm_path()
        self.tokenizer = tokenizer if tokenizer is not None else _load_tokenizer(config.tokenizer_path)
        if len(self.tokenizer) > tc.vocab_size:
            raise ValueError(f"tokenizer has {len(self.tokenizer)} tokens but text.vocab_size is {tc.vocab_size}")
        self.bos_token_id = self.tokenizer.convert_tokens_to_ids(tc.bos_token)
        if self.bos_token_id is None or self.bos_token_id == self.tokenizer.unk_token_id:
            raise ValueError(f"text.bos_token {tc.bos_token!r} is not in the tokenizer's vocabulary")

        # --- encoders
        self.visual = ImageEncoder(config.vision, config.image_size, config.channels)
        Dv, Dt, De = self.visual.width, tc.hidden_size, config.embed_dim
        self.text_encoder = TextEncoder(tc, p)
        self.fusion_encoder = FusionEncoder(tc, p, Dv)
        self.decoder = ReportDecoder(tc, p, Dv, embeddings=self.text_encoder.embeddings if tc.share_decoder_embeddings else None)
        for tower in (self.text_encoder, self.fusion_encoder, self.decoder):
            init_bert_weights(tower)
        if init_pretrained and tc.pretrained:
            loaded = init_text_towers(load_bert_state(tc.pretrained), self.text_encoder, self.fusion_encoder,
                                      self.decoder, tc.num_layers)
            if not loaded:
                raise ValueError(f"no weight of {tc.pretrained!r} matched the text towers")
        self.vision_proj = nn.Linear(Dv, De)
        self.text_proj = nn.Linear(Dt, De)
        self.itm_head = nn.Linear(Dt, 2)
        if tc.pooling not in ("mean", "cls"):
            raise ValueError(f"text.pooling must be 'mean' or 'cls', got {tc.pooling!r}")
        if gc.knowledge_encoder not in ("online", "frozen"):
            raise ValueError(f"gk.knowledge_encoder must be 'online' or 'frozen', got {gc.knowledge_encoder!r}")
        if gc.knowledge_encoder == "frozen":
            if not gc.freeze_knowledge_encoder:
                raise ValueError("gk.knowledge_encoder='frozen' contradicts gk.freeze_knowledge_encoder=False")
            # a frozen copy of the (pretrained) text tower: the knowledge book is computed once and cached
            self.knowledge_text = copy.deepcopy(self.text_encoder).requires_grad_(False)
            self.knowledge_proj = copy.deepcopy(self.text_proj).requires_grad_(False)

        # --- losses with parameters / buffers
        self.itc = gnn.ITCLoss(De, lc.queue_size, temperature=lc.temperature, backend=backend)
        self.lm_head = gnn.LinearCrossEntropy(Dt, tc.vocab_size, bias=True, label_smoothing=lc.label_smoothing,
                                              backend=backend)
        if tc.tie_lm_head:
            self.lm_head.weight = self.decoder.embed.word_embeddings.weight
        self.ecls_temp = nn.Parameter(torch.tensor(float(lc.temperature)))

        # --- GK module and region boxes
        self.gk = GKModule(Dv, Dt, gc.num_heads, gc.depth, gc.mlp_ratio, backend=backend)
        self.detector = RegionDetector(gc.detector, gc.detector_backbone, config.image_size, config.channels)
        if self.detector.detector is not None:
            self.detector.requires_grad_(False)  # trained on its own (FasterRCNNRegionDetector.loss)

        # --- momentum encoders
        self.visual_m = copy.deepcopy(self.visual)
        self.vision_proj_m = copy.deepcopy(self.vision_proj)
        self.text_encoder_m = copy.deepcopy(self.text_encoder)
        self.text_proj_m = copy.deepcopy(self.text_proj)
        for m in self.momentum_modules():
            m.requires_grad_(False)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self._book = None  # (key, prompt_feats, prompt_emb)
        # ITM sampling generator, kept on the model's device (see _apply) so that the trainer saves and
        # restores its state with the other RNG states
        self.itm_generator: Optional[torch.Generator] = torch.Generator().manual_seed(int(lc.itm_seed))
        self.last_itm_negatives: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self._prompts = list(K.entity_prompts())

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        dev = self.vision_proj.weight.device
        g = self.itm_generator
        if dev.type != "meta" and (g is None or g.device.type != dev.type):
            self.itm_generator = torch.Generator(device=dev).manual_seed(int(self.config.loss.itm_seed))
        return out

    # ------------------------------------------------------------------------------------- momentum
    def momentum_modules(self) -> List[nn.Module]:
        return [self.visual_m, self.vision_proj_m, self.text_encoder_m, self.text_proj_m]

    def _momentum_pairs(self):
        online = [self.visual, self.vision_proj, self.text_encoder, self.text_proj]
        for a, b in zip(online, self.momentum_modules()):
            for p, pm in zip(a.parameters(), b.parameters()):
                yield p, pm

    @torch.no_grad()
    def momentum_update(self, momentum: Optional[float] = None) -> None:
        """EMA of the online encoders into the momentum copies: p_m <- m p_m + (1 - m) p."""
        m = self.config.loss.momentum if momentum is None else float(momentum)
        pairs = list(self._momentum_pairs())
        pm = [b for _, b in pairs]
        torch._foreach_mul_(pm, m)
        torch._foreach_add_(pm, [a.detach() for a, _ in pairs], alpha=1.0 - m)

    def queues(self) -> Tuple[torch.Tensor, torch.Tensor, int]:
        """The ITC feature queues (image (Q, De), text (Q, De)) and the write pointer."""
        return self.itc.image_queue, self.itc.text_queue, int(self.itc.queue_ptr)

    # ------------------------------------------------------------------------------------ knowledge
    @property
    def entity_prompts(self) -> List[str]:
        return list(self._prompts)

    def _tokenize(self, texts: Sequence[str], device) -> Tuple[torch.Tensor, torch.Tensor]:
        tok = self.tokenizer(list(texts), padding="longest", truncation=True, max_length=self.config.max_length,
                             return_tensors="pt")
        return tok["input_ids"].to(device), tok["attention_mask"].to(device)

    def knowledge_towers(self) -> Tuple[nn.Module, nn.Module]:
        """(text encoder, projection) that encode the knowledge prompts: the online report encoder, or its
        frozen copy with ``gk.knowledge_encoder="frozen"``."""
        if self.config.gk.knowledge_encoder == "frozen":
            return self.knowledge_text, self.knowledge_proj
        return self.text_encoder, self.text_proj

    def _encode_prompts(self, prompts: Sequence[str], device, dtype, grad: bool,
                        online: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """(pooled features (P, Dt) (:meth:`pool_text`), normalised embeddings (P, De)) of text prompts by the knowledge towers
        (``online=True``: by the online report encoder, whose embeddings live in the ITC space)."""
        enc, proj = (self.text_encoder, self.text_proj) if online else self.knowledge_towers()
        ids, att = self._tokenize(prompts, device)
        was = enc.training
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            if not grad:
                enc.eval()
            try:
                cls = self.pool_text(enc(ids, att), att)
            finally:
                enc.train(was)
            emb = F.normalize(proj(cls), dim=-1)
        return cls.to(dtype), emb.to(dtype)

    def _text_version(self) -> Tuple:
        """Identity and in-place version counter of every text-tower parameter: changes whenever a weight
        is updated in place (optimizer step, ``load_state_dict``, ``copy_``) or replaced."""
        enc, proj = self.knowledge_towers()
        ps = list(enc.parameters()) + list(proj.parameters())
        return tuple((id(p), p._version) for p in ps)

    def knowledge_book(self, device=None, dtype=None, grad: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """Entity prompt features ``(feats (E, Dt), emb (E, De))``; cached unless ``grad`` (module docstring)."""
        device = device or self.vision_proj.weight.device
        dtype = dtype or self.vision_proj.weight.dtype
        if grad:
            return self._encode_prompts(self._prompts, device, dtype, grad=True)
        key = (self._text_version(), str(device), dtype, tuple(self._prompts))
        if self._book is None or self._book[0] != key:
            feats, emb = self._encode_prompts(self._prompts, device, dtype, grad=False)
            self._book = (key, feats.detach(), emb.detach())
        return self._book[1], self._book[2]

    # ------------------------------------------------------------------------------------- checks
    def check_batch(self, batch: Dict) -> int:
        """Raise ``ValueError`` naming what is wrong with ``batch``; return the batch size."""
        if not isinstance(batch, dict):
            raise ValueError(f"batch must be a dict, got {type(batch).__name__}")
        missing = [k for k in REQUIRED_KEYS if k not in batch]
        if missing:
            raise ValueError(f"batch is missing key(s) {missing}; the model needs {list(REQUIRED_KEYS)}")
        cfg = self.config
        img = batch["image"]
        if not isinstance(img, torch.Tensor) or img.dim() != 4:
            raise ValueError(f"batch['image'] must be a (B, C, H, W) tensor, got "
                             f"{tuple(img.shape) if isinstance(img, torch.Tensor) else type(img).__name__}")
        B = img.shape[0]
        if img.shape[1] != cfg.channels:
            raise ValueError(f"batch['image'] has {img.shape[1]} channels, the model expects {cfg.channels}")
        if tuple(img.shape[2:]) != (cfg.image_size, cfg.image_size):
            raise ValueError(f"batch['image'] is {tuple(img.shape[2:])} pixels, the model expects "
                             f"{(cfg.image_size, cfg.image_size)} (config.image_size)")
        E = len(self._prompts)
        shapes = {"input_ids": (B, None), "attention_mask": (B, None), "entity_labels": (B, E),
                  "region_boxes": (B, NUM_REGIONS, 4), "region_mask": (B, NUM_REGIONS), "study_id": (B,)}
        for k, want in shapes.items():
            t = batch[k]
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"batch[{k!r}] must be a tensor, got {type(t).__name__}")
            if t.dim() != len(want):
                raise ValueError(f"batch[{k!r}] must have {len(want)} dims {want}, got shape {tuple(t.shape)}")
            if t.shape[0] != B:
                raise ValueError(f"batch size mismatch: batch['image'] has B={B} but batch[{k!r}] has "
                                 f"{t.shape[0]} rows (shape {tuple(t.shape)})")
            for i, w in enumerate(want):
                if w is not None and t.shape[i] != w:
                    raise ValueError(f"batch[{k!r}] must have shape {want}, got {tuple(t.shape)}")
        if batch["attention_mask"].shape != batch["input_ids"].shape:
            raise ValueError(f"batch['attention_mask'] shape {tuple(batch['attention_mask'].shape)} differs from "
                             f"batch['input_ids'] shape {tuple(batch['input_ids'].shape)}")
        L = batch["input_ids"].shape[1]
        if L > self.config.text.max_position_embeddings:
            raise ValueError(f"batch['input_ids'] has {L} tokens, more than the text encoder's "
                             f"{self.config.text.max_position_embeddings} positions")
        if batch["input_ids"].dtype not in (torch.int64, torch.int32):
            raise ValueError(f"batch['input_ids'] must be integer, got {batch['input_ids'].dtype}")
        if not batch["region_boxes"].is_floating_point():
            raise ValueError(f"batch['region_boxes'] must be floating point, got {batch['region_boxes'].dtype}")
        return B

    # ------------------------------------------------------------------------------------- forward
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
        never negatives), with ``self.itm_generator`` (seeded with ``loss.itm_seed``, saved by the trainer)
        and the backend ``loss.itm_sampler_backend`` (None = the model's backend)."""
        dev = img_feat.device
        if self.itm_generator is None or self.itm_generator.device.type != dev.type:
            self.itm_generator = torch.Generator(device=dev).manual_seed(int(self.config.loss.itm_seed))
        be = self.config.loss.itm_sampler_backend or self.backend
        neg_t, neg_i = GF.sample_hard_negatives(img_feat, txt_feat, self._itc_scale().to(dev, img_feat.dtype), group_ids=study,
                          generator=self.itm_generator, backend=be)
        self.last_itm_negatives = (neg_t, neg_i)
        return neg_t, neg_i

    def _itc_scale(self) -> torch.Tensor:
        for name in ("temp", "temperature"):
            t = getattr(self.itc, name, None)
            if isinstance(t, torch.Tensor):
                return 1.0 / t.detach()
        ls = getattr(self.itc, "logit_scale", None)
        if isinstance(ls, torch.Tensor):
            return ls.detach().exp()
        return torch.tensor(1.0 / self.config.loss.temperature)

    def pool_text(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Sentence features (B, Dt) of text-tower outputs ``hidden`` (B, L, Dt) with ``attention_mask``
        (B, L) 0/1: masked mean over the tokens (``text.pooling="mean"``) or the CLS token ("cls")."""
        if self.config.text.pooling == "cls":
            return hidden[:, 0]
        m = attention_mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)

    def _image(self, images):
        tokens = self.visual(images)
        return tokens, F.normalize(self.vision_proj(tokens[:, 0]), dim=-1)

    def forward(self, batch: Dict, alpha: Optional[float] = None) -> Dict[str, torch.Tensor]:
        """Pre-training losses for one batch (CONTRACTS.md batch dict); see the module docstring."""
        B = self.check_batch(batch)
        lc, be = self.config.loss, self.backend
        dev = self.vision_proj.weight.device
        dt = self.vision_proj.weight.dtype
        images = batch["image"].to(dev, dt)
        ids = batch["input_ids"].to(dev).long()
        att = batch["attention_mask"].to(dev).long()
        labels = batch["entity_labels"].to(dev).long()
        study = batch["study_id"].to(dev).long()
        if alpha is None:
            alpha = self.current_alpha()
        with torch.no_grad():
            self.ecls_temp.clamp_(0.001, 0.5)

        # ---- unimodal features
        img_tokens, img_feat = self._image(images)
        txt_hidden = self.text_encoder(ids, att)
        txt_feat = F.normalize(self.text_proj(self.pool_text(txt_hidden, att)), dim=-1)
        with torch.no_grad():
            if self.training:
                self.momentum_update()
            img_m = F.normalize(self.vision_proj_m(self.visual_m(images)[:, 0]), dim=-1)
            txt_m = F.normalize(self.text_proj_m(self.pool_text(self.text_encoder_m(ids, att), att)), dim=-1)

        # ---- ITC (enqueues momentum features in training mode)
        loss_itc = self.itc(img_feat, txt_feat, img_m, txt_m, alpha=alpha)

        # ---- ITM with hard negatives
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

        # ---- knowledge book, GK module, entity losses
        freeze = self.config.gk.freeze_knowledge_encoder
        feats, emb = self.knowledge_book(dev, dt, grad=not freeze and self.training)
        if labels.shape[1] != feats.shape[0]:
            raise ValueError(f"batch['entity_labels'] has {labels.shape[1]} entities, the knowledge book {feats.shape[0]}")
        loss_ecls = GF.entity_contrastive_loss(img_feat, emb.to(img_feat.dtype), labels, 1.0 / self.ecls_temp,
                                               backend=be)
        boxes, rmask = self.detector(images, batch["region_boxes"].to(dev, dt), batch["region_mask"].to(dev))
        gk = self._run_gk(img_tokens[:, 1:], boxes, rmask, feats, book=feats)
        known = labels >= 0  # mean over the mentioned (sample, entity) pairs; 0 when there is none (no sync)
        ce = F.cross_entropy(_acc(gk["logits"]).flatten(0, 1), labels.clamp(min=0).flatten(), reduction="none")
        loss_gk = ((ce * known.flatten()).sum() / known.sum().clamp(min=1)).to(dt)

        # ---- LM
        enc, enc_mask = self._decoder_memory(img_tokens, gk, rmask)
        dec_ids = ids.clone()
        dec_ids[:, 0] = self.bos_token_id
        hidden = self.decoder(dec_ids, att, enc, enc_mask)
        targets = ids[:, 1:].masked_fill(att[:, 1:] == 0, -100)
        loss_lm = self.lm_head(hidden[:, :-1], targets)  # label smoothing set in the head; padding ignored

        loss = (lc.w_itc * loss_itc + lc.w_itm * loss_itm + lc.w_lm * loss_lm + lc.w_ecls * loss_ecls
                + lc.w_gk * loss_gk)
        if self.training:
            self.step += 1
        return {"loss": loss, "loss_itc": loss_itc, "loss_itm": loss_itm, "loss_lm": loss_lm,
                "loss_ecls": loss_ecls, "loss_gk": loss_gk, "alpha": torch.tensor(float(alpha))}

    def _decoder_memory(self, img_tokens, gk, rmask):
        """Decoder cross-attention tokens: image tokens, then (``gk.decoder_attends_gk``) the GK memory."""
        if not self.config.gk.decoder_attends_gk:
            return img_tokens, None
        mem, mm = GKModule.memory(gk, rmask)
        ones = torch.ones(img_tokens.shape[:2], dtype=torch.long, device=img_tokens.device)
        return torch.cat([img_tokens, mem], 1), torch.cat([ones, mm], 1)

    # ----------------------------------------------------------------------------------- inference
    def _images(self, images: torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise ValueError("images must be a (B, C, H, W) tensor")
        if images.shape[1] != self.config.channels or tuple(images.shape[2:]) != (self.config.image_size,) * 2:
            raise ValueError(f"images have shape {tuple(images.shape)}, the model expects (B, {self.config.channels}, "
                             f"{self.config.image_size}, {self.config.image_size})")
        return images.to(self.vision_proj.weight.device, self.vision_proj.weight.dtype)

    @_inference
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings (B, De) (projected ViT CLS)."""
        return self._image(self._images(images))[1]

    @_inference
    def encode_text(self, input_ids: Union[torch.Tensor, Sequence[str]],
                    attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """L2-normalised report embeddings (B, De); ``input_ids`` (B, L) with ``attention_mask``, or a list
        of strings (tokenised here)."""
        dev = self.vision_proj.weight.device
        if not isinstance(input_ids, torch.Tensor):
            input_ids, attention_mask = self._tokenize(input_ids, dev)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        h = self.text_encoder(input_ids.to(dev).long(), attention_mask.to(dev).long())
        return F.normalize(self.text_proj(self.pool_text(h, attention_mask.to(dev).long())), dim=-1)

    def _query_center(self, book: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """The knowledge book's mean prompt feature (Dt,) subtracted from every GK query before its
        projection (``gk.center_queries``), else None. ``book``: the book's features when at hand."""
        if not self.config.gk.center_queries:
            return None
        if book is None:
            book, _ = self.knowledge_book()
        return book.mean(0)

    def _run_gk(self, patches, boxes, rmask, queries, book=None, with_regions=True):
        """The GK module on patch tokens with the prompt features ``queries`` (rows of the knowledge book
        or other prompts), centred on the book's mean when ``gk.center_queries``."""
        return self.gk(patches, self.visual.grid_size, boxes, rmask, queries, with_regions=with_regions,
                       prompt_center=self._query_center(book))

    def _query_feats(self, entities: Optional[Sequence[str]]):
        feats, _ = self.knowledge_book()
        if entities is None:
            return feats
        if isinstance(entities, str):
            entities = [entities]
        names = list(K.ENTITY_NAMES)
        rows, out = [], [None] * len(entities)
        for i, e in enumerate(entities):
            if e in names:
                out[i] = feats[names.index(e)]
            else:
                rows.append(i)
        if rows:  # entities outside the knowledge base: their name is the prompt (zero-shot)
            f, _ = self._encode_prompts([entities[i] for i in rows], feats.device, feats.dtype, grad=False)
            for j, i in enumerate(rows):
                out[i] = f[j]
        return torch.stack(out)

    def _gk_infer(self, images, entities, region_boxes, region_mask, patch_grad: bool = False):
        """Image tokens, boxes, region mask and the GK output for ``entities``. ``patch_grad``: the GK
        module runs with autograd on (a copy of) the patch tokens, returned as ``out["patches"]``."""
        images = self._images(images)
        tokens = self.visual(images)
        if region_boxes is not None:
            region_boxes = region_boxes.to(images.device, images.dtype)
        boxes, rmask = self.detector(images, region_boxes, None if region_mask is None else region_mask.to(images.device))
        q = self._query_feats(entities)
        with torch.set_grad_enabled(patch_grad):
            patches = tokens[:, 1:].detach().requires_grad_(patch_grad)
            out = self._run_gk(patches, boxes, rmask, q, with_regions=False)
        out["patches"] = patches
        return tokens, boxes, rmask, out

    @_inference
    def zero_shot_classify(self, images: torch.Tensor, entities: Optional[Sequence[str]] = None,
                           region_boxes: Optional[torch.Tensor] = None,
                           region_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """P(entity present) (B, E') through the GK module. ``entities``: names of knowledge-base entities
        (their "{entity}: {description}" prompt is used) or any other text (used as the prompt);
        None = every knowledge-base entity. Boxes default to the detector's / the atlas."""
        _, _, _, out = self._gk_infer(images, entities, region_boxes, region_mask)
        return GKModule.probabilities(out["logits"])

    @_inference
    def ground(self, images: torch.Tensor, entity: str, region_boxes: Optional[torch.Tensor] = None,
               region_mask: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Where is ``entity``? ``region_scores`` (B, 29): the GK fusion's region attention for the entity
        query (mean over layers and heads; masked regions 0; sums to 1 over present regions);
        ``patch_map`` (B, gh, gw): the fusion's patch attention when it attends to patches, else
        softmax over patches of the cosine similarity between the fused entity feature and the patch
        tokens (temperature 0.1); ``region_text_scores`` (B, 29): ITC-space grounding with the
        region-aware prompts "{entity} in the {region}": softmax over the present regions of
        ``vision_proj(region_pool(patches, box_r)) . text_proj(prompt_r) / temp`` (masked regions 0);
        ``patch_saliency`` (B, gh, gw): gradient saliency of the GK decision (Simonyan et al. 2014), the
        L2 norm over channels of d(logit_present - logit_absent) / d(patch token), through the GK module
        with the ViT tokens fixed, normalised to sum to 1 (computed with autograd inside this no-grad
        method)."""
        if not isinstance(entity, str):
            raise ValueError(f"entity must be a string, got {type(entity).__name__}")
        tokens, boxes, rmask, out = self._gk_infer(images, [entity], region_boxes, region_mask, patch_grad=True)
        gh, gw = self.visual.grid_size
        B = tokens.shape[0]
        ra = out["region_attn"]
        if ra is None:
            raise RuntimeError("the GK fusion returned no region attention maps")
        rs = ra[:, 0].float() * rmask.float()
        rs = rs / rs.sum(-1, keepdim=True).clamp(min=1e-12)
        pa = out.get("patch_attn")
        if pa is not None:
            pm = pa[:, 0].float()
            pm = pm / pm.sum(-1, keepdim=True).clamp(min=1e-12)
        else:
            z = F.normalize(out["z"][:, 0].float(), dim=-1)
            p = F.normalize(tokens[:, 1:].float(), dim=-1)
            pm = torch.softmax(torch.einsum("bd,bnd->bn", z, p) / 0.1, dim=-1)
        # gradient saliency of the entity's decision on the patch tokens (through the GK module only)
        with torch.enable_grad():
            lo = out["logits"][:, 0]
            (g,) = torch.autograd.grad((lo[:, 1] - lo[:, 0]).float().sum(), out["patches"])
        sal = g.float().norm(dim=-1)
        sal = sal / sal.sum(-1, keepdim=True).clamp(min=1e-12)
        # region-aware prompts in the ITC embedding space
        from gkcore.functional import region_pool

        regions = list(K.REGIONS)
        _, pe = self._encode_prompts([f"{entity} in the {r}" for r in regions], tokens.device, tokens.dtype,
                                     grad=False, online=True)  # (29, De)
        rf = region_pool(tokens[:, 1:], boxes.to(tokens.dtype), self.visual.grid_size, backend=self.backend)
        rf = F.normalize(self.vision_proj(rf), dim=-1)  # (B, 29, De)
        sim = torch.einsum("brd,rd->br", rf.float(), pe.float()) * self._itc_scale().float()
        sim = sim.masked_fill(~rmask.bool(), float("-inf"))
        rts = torch.softmax(sim, -1).nan_to_num(0.0)
        return {"region_scores": rs, "patch_map": pm.view(B, gh, gw), "region_text_scores": rts,
                "patch_saliency": sal.view(B, gh, gw)}

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

    @_inference
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

    # ---------------------------------------------------------------------------------- save / load
    def save(self, path: str) -> None:
        """Weights and config in one safetensors file (tied / shared tensors stored once)."""
        from safetensors.torch import save_model

        cfg = copy.deepcopy(self.config)
        meta = {"format": "gkcore.GKMVLP", "config": json.dumps(config_to_dict(cfg))}
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        save_model(self, path, metadata=meta)

    @classmethod
    def load(cls, path: str, backend: Optional[str] = None, device: Union[str, torch.device] = "cpu",
             tokenizer=None) -> "GKMVLP":
        """Rebuild a model saved by :meth:`save` (architecture from the file's metadata; no pretrained
        weights are read, every tensor comes from the file)."""
        from safetensors import safe_open
        from safetensors.torch import load_model

        if not os.path.isfile(path):
            raise ValueError(f"checkpoint {path!r} does not exist")
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != "gkcore.GKMVLP":
            raise ValueError(f"{path!r} is not a GKMVLP checkpoint (metadata format {meta.get('format')!r})")
        cfg = config_from_dict(json.loads(meta["config"]))
        cfg.vision.checkpoint = None
        cfg.text.pretrained = None  # architecture fields were resolved before saving
        model = cls(cfg, backend=backend, tokenizer=tokenizer, init_pretrained=False)
        missing, unexpected = load_model(model, path, strict=True, device=str(device))
        return model.to(device)


def _load_tokenizer(path=None):
    """The fast BERT tokenizer: ``gkcore.data.default_tokenizer()`` for the MiniLM folder, else loaded
    offline from the local folder ``path`` (never from a hub)."""
    import os

    from gkcore.data import default_tokenizer

    if path is None or os.path.abspath(str(path)) == os.path.abspath(minilm_path()):
        return default_tokenizer()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)
