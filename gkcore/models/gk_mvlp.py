"""GK-MVLP: grounded knowledge-enhanced vision-language pre-training for chest X-rays.

Components (B batch, L tokens, Nv = 1 + gh*gw image tokens, Dv / Dt vision / text widths, De embed dim,
E knowledge entities, R = 29 regions):

* ``visual`` :class:`ImageEncoder` (any timm model with a feature grid: ViT, ResNet, ...): images
  (B, C, H, W) -> tokens (B, Nv, Dv), the pooled feature (ViT CLS / CNN global average) first.
* ``text_encoder`` :class:`TextEncoder` (BERT layers ``0..fusion_start``): (B, L) -> (B, L, Dt).
* ``fusion_encoder`` :class:`FusionEncoder` (BERT layers with cross-attention to image tokens) and the
  ITM head ``Linear(Dt, 2)`` on the fused CLS.
* ``decoder`` :class:`ReportDecoder` (causal BERT, cross-attention to the image tokens and the GK
  memory) with the LM head ``lm_head`` (``gkcore.nn.LinearCrossEntropy``; weight tied to the word
  embeddings when ``text.tie_lm_head``).
* ``gk`` :class:`GKModule`: knowledge queries (entity prompts encoded by the text tower) fused with
  region-pooled and global patch features; per-entity present/absent head; grounding maps. None with
  ``gk.enabled=False`` (the ablation: ITC + ITM + LM only, ``loss_ecls`` = ``loss_gk`` = 0, zero-shot
  and grounding through text prompts in the ITC space, see :mod:`~gkcore.models.inference`).
* ``detector`` :class:`RegionDetector`: region boxes from the batch, the atlas, or a Faster R-CNN.
* ``vision_proj`` / ``text_proj``: Linear to De (from the pooled image token / the report encoder's masked mean
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
* A zero weight (``loss.w_itm`` / ``loss.w_ecls`` = 0) skips that loss: it is reported as 0.
* ``loss_gk``: CE of the GK head's per-entity present/absent logits against ``entity_labels`` (entities
  labelled -1, not mentioned, are ignored). This trains the zero-shot head (MedKLIP-style).

Training-mode forward also (in this order) clamps the temperatures, runs :meth:`momentum_update`,
enqueues the momentum features (inside ITCLoss) and increments ``step`` (used by the alpha ramp).

The knowledge book (entity prompt features) is computed by the knowledge towers (:meth:`knowledge_towers`:
the online text tower, or with ``gk.knowledge_encoder="frozen"`` a frozen copy of it made at build time)
without gradient and cached for the device, dtype and prompt list it was asked for. The model drops the
cache itself whenever the towers' weights change: after every step of any ``torch.optim`` optimizer
that updates one of their parameters (a global optimizer step post-hook, so fused optimizers and
training loops other than gkcore's trainer are covered; in training that is every step, since ITC
trains the text tower), and after ``load_state_dict``. Code that edits the towers' weights in place any
other way calls :meth:`GKMVLP.invalidate_caches`. With ``gk.freeze_knowledge_encoder=False`` the book is
recomputed with gradient at every training forward instead.

This file holds the module (construction, momentum encoders, knowledge book, ``forward``); the loss terms
are in :mod:`~gkcore.models.pretrain_losses`, the inference API in :mod:`~gkcore.models.inference`,
report generation (greedy, beam search) in :mod:`~gkcore.models.generation` and save / load in
:mod:`~gkcore.models.persistence`, each mixed into :class:`GKMVLP`.
"""
from __future__ import annotations

import copy
import os
import weakref
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from gkcore import nn as gnn
from gkcore.data import knowledge as K
from .config import GKMVLPConfig, minilm_path
from .detector import RegionDetector
from .encoders import (FusionEncoder, ImageEncoder, ReportDecoder, TextEncoder, init_bert_weights, init_text_towers,
                       load_bert_state, text_config_from_pretrained)
from .generation import ReportGeneration
from .gk_module import GKModule
from .inference import InferenceAPI, inference
from .persistence import Persistence
from .pretrain_losses import PretrainLosses

__all__ = ["GKMVLP", "REQUIRED_KEYS"]

REQUIRED_KEYS = ("image", "input_ids", "attention_mask", "entity_labels", "region_boxes", "region_mask", "study_id")


#: models holding a cached knowledge book; an optimizer step over their knowledge towers drops it
_CACHED_BOOKS: "weakref.WeakSet[GKMVLP]" = weakref.WeakSet()
_STEP_HOOK = None


def _drop_books_after_step(optimizer, args, kwargs) -> None:
    """Global optimizer step post-hook: the parameters the step updated (those with a gradient) drop the
    cached knowledge book of every model whose knowledge towers hold one of them."""
    if not _CACHED_BOOKS:
        return
    updated = {id(p) for g in optimizer.param_groups for p in g["params"] if p.grad is not None}
    for model in list(_CACHED_BOOKS):
        if not updated.isdisjoint(model._cached_param_ids()):
            model.invalidate_caches()


def _watch_optimizer_steps() -> None:
    global _STEP_HOOK
    if _STEP_HOOK is None:
        _STEP_HOOK = register_optimizer_step_post_hook(_drop_books_after_step)


def _drop_book_after_load(module: "GKMVLP", incompatible_keys) -> None:
    """``load_state_dict`` post-hook: the loaded weights may differ from those the book was computed with."""
    module.invalidate_caches()


def _tokenizer_folder(folder: Optional[str]) -> Optional[str]:
    """``folder`` when it holds a tokenizer (tokenizer.json or vocab.txt), else None."""
    if folder and any(os.path.isfile(os.path.join(folder, f)) for f in ("tokenizer.json", "vocab.txt")):
        return folder
    return None


class GKMVLP(PretrainLosses, InferenceAPI, ReportGeneration, Persistence, nn.Module):
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
        self._prompts = list(K.entity_prompts())
        if not 0.0 <= float(gc.decoder_label_forcing) <= 1.0:
            raise ValueError(f"gk.decoder_label_forcing must be in [0, 1], got {gc.decoder_label_forcing!r}")
        if config.text_max_length < 0 or config.text_max_length == 1:
            raise ValueError(f"text_max_length must be 0 (max_length) or >= 2, got {config.text_max_length!r}")
        self.decoder = ReportDecoder(tc, p, Dv, embeddings=self.text_encoder.embeddings if tc.share_decoder_embeddings else None,
                                     cond_dim=len(self._prompts) if gc.enabled and gc.decoder_entity_states else 0)
        for tower in (self.text_encoder, self.fusion_encoder, self.decoder):
            init_bert_weights(tower)
        if init_pretrained and tc.pretrained:
            loaded = init_text_towers(load_bert_state(tc.pretrained), self.text_encoder, self.fusion_encoder,
                                      self.decoder, tc.num_layers)
            if not loaded:
                raise ValueError(f"no weight of {tc.pretrained!r} matched the text towers")
        if gc.decoder_state_init not in ("names", "zero"):
            raise ValueError(f"gk.decoder_state_init must be 'names' or 'zero', got {gc.decoder_state_init!r}")
        if gc.decoder_state_rule not in ("prevalence", "accuracy"):
            raise ValueError(f"gk.decoder_state_rule must be 'prevalence' or 'accuracy', got {gc.decoder_state_rule!r}")
        if self.decoder.cond_proj is not None and gc.decoder_state_init == "names":
            self._init_condition_from_names()
        self.vision_proj = nn.Linear(Dv, De)
        self.text_proj = nn.Linear(Dt, De)
        self.itm_head = nn.Linear(Dt, 2)
        if tc.pooling not in ("mean", "cls"):
            raise ValueError(f"text.pooling must be 'mean' or 'cls', got {tc.pooling!r}")
        if gc.knowledge_encoder not in ("online", "frozen"):
            raise ValueError(f"gk.knowledge_encoder must be 'online' or 'frozen', got {gc.knowledge_encoder!r}")
        if gc.knowledge_encoder == "frozen" and not gc.freeze_knowledge_encoder:
            raise ValueError("gk.knowledge_encoder='frozen' contradicts gk.freeze_knowledge_encoder=False")
        if gc.knowledge_encoder == "frozen" and gc.enabled:
            # a frozen copy of the (pretrained) text tower: the knowledge book is computed once and cached
            # (no copy without the GK module, which alone reads the book)
            self.knowledge_text = copy.deepcopy(self.text_encoder).requires_grad_(False)
            self.knowledge_proj = copy.deepcopy(self.text_proj).requires_grad_(False)

        # --- losses with parameters / buffers
        self.itc = gnn.ITCLoss(De, lc.queue_size, temperature=lc.temperature, backend=backend)
        self.lm_head = gnn.LinearCrossEntropy(Dt, tc.vocab_size, bias=True, label_smoothing=lc.label_smoothing,
                                              backend=backend)
        if tc.tie_lm_head:
            self.lm_head.weight = self.decoder.embed.word_embeddings.weight
        self._init_lm_vocab(tc.lm_vocab, tc.vocab_size)
        # LECLS temperature (no LECLS without the GK module: kept, frozen, for a uniform state dict)
        self.ecls_temp = nn.Parameter(torch.tensor(float(lc.temperature)), requires_grad=bool(gc.enabled))

        # --- GK module and region boxes
        self.gk = GKModule(Dv, Dt, gc.num_heads, gc.depth, gc.mlp_ratio, backend=backend) if gc.enabled else None
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
        self._state_window = 0
        if self.decoder.cond_proj is not None and gc.decoder_label_forcing > 0:
            # the decoder's entity states (see _entity_states): the GK head's margins and the present
            # labels of the last STATE_WINDOW training samples
            E, self._state_window = len(self._prompts), STATE_WINDOW
            self.register_buffer("state_margins", torch.zeros(STATE_WINDOW, E))
            self.register_buffer("state_present", torch.zeros(STATE_WINDOW, E, dtype=torch.bool))
            self.register_buffer("state_seen", torch.zeros((), dtype=torch.long))
        self._book = None  # (key, ids of the knowledge towers' parameters, prompt_feats, prompt_emb)
        self._prompt_cache: Dict = {}  # text-prompt embeddings of the inference API (prompt_embeddings)
        self.register_load_state_dict_post_hook(_drop_book_after_load)
        # ITM sampling generator: a module attribute, so the trainer saves and restores its state with the
        # other RNG states; made and kept on the model's device by _itm_rng only
        self.itm_generator: Optional[torch.Generator] = None
        self._itm_rng()
        self.last_itm_negatives: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self._itm_rng()
        return out

    def _itm_rng(self) -> Optional[torch.Generator]:
        """The ITM sampler's generator, on the model's device. It is made here and nowhere else: seeded
        with ``loss.itm_seed`` when there is none (``itm_generator = None`` restarts the stream) or when
        the model moved to another device type (None while the model is on the meta device)."""
        dev = self.vision_proj.weight.device
        g = self.itm_generator
        if dev.type != "meta" and (g is None or g.device.type != dev.type):
            g = self.itm_generator = torch.Generator(device=dev).manual_seed(int(self.config.loss.itm_seed))
        return g

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

    @torch.no_grad()
    def _init_condition_from_names(self) -> None:
        """Start the decoder's condition projection (``gk.decoder_state_init = "names"``) so that a state
        vector s in [-1, 1]^E adds sum_e (s_e + 1) / 2 v_e to every input embedding, v_e the mean word
        embedding of entity e's name, rescaled to the decoder's mean word-embedding norm: a present entity
        starts as its name written into the input. No random draw."""
        emb = self.decoder.embed.word_embeddings.weight
        vecs = []
        for name in K.ENTITY_NAMES:
            ids = self.tokenizer(name, add_special_tokens=False)["input_ids"]
            vecs.append(emb[torch.as_tensor(ids, dtype=torch.long, device=emb.device)].float().mean(0))
        v = torch.stack(vecs, 1)  # (Dt, E)
        v = v / v.norm(dim=0, keepdim=True).clamp_min(1e-12) * emb.float().norm(dim=1).mean()
        proj = self.decoder.cond_proj
        proj.weight.copy_(v / 2)
        proj.bias.copy_(v.sum(1) / 2)

    def _init_lm_vocab(self, vocab: Optional[Sequence[int]], size: int) -> None:
        """Buffers of ``text.lm_vocab`` (not saved: the config rebuilds them): ``lm_rows`` (K,) the sorted
        token ids the LM head scores, ``lm_index`` (V,) each token id's row in it (the unknown token's row
        for ids outside it); both None for the whole vocabulary."""
        rows = index = None
        if vocab is not None:
            if isinstance(vocab, (str, bytes)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in vocab):
                raise ValueError(f"text.lm_vocab must be a list of token ids (ints), got {str(vocab)[:80]!r}")
            bad = [t for t in vocab if not 0 <= t < size]
            if bad:
                raise ValueError(f"text.lm_vocab has ids outside [0, {size}): {bad[:5]}")
            tok = self.tokenizer
            keep = set(vocab) | {int(tok.sep_token_id), int(tok.unk_token_id)}  # the end and out-of-vocabulary targets
            rows = torch.tensor(sorted(keep), dtype=torch.long)
            index = torch.full((size,), int((rows == tok.unk_token_id).nonzero()[0, 0]), dtype=torch.long)
            index[rows] = torch.arange(len(rows))
        self.register_buffer("lm_rows", rows, persistent=False)
        self.register_buffer("lm_index", index, persistent=False)

    def _momentum_is_online(self) -> bool:
        """True in a training step with ``loss.momentum = 0`` and no dropout or drop-path: the update has just
        copied the online encoders into the momentum ones, so the momentum features are the online
        features and their second forward pass is skipped."""
        c = self.config
        return self.training and c.loss.momentum == 0 and c.dropout == 0 and not c.vision.drop_path_rate

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
        if getattr(self, "knowledge_text", None) is not None:
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

    def prompt_embeddings(self, prompts: Sequence[str], device=None, dtype=None) -> torch.Tensor:
        """Normalised ITC-space embeddings (P, De) of text prompts by the online report encoder, cached per
        prompt until the online text tower changes (an optimizer step over it or ``load_state_dict`` drops the
        cache, as for the knowledge book), so that grounding and prompt zero-shot do not re-encode their
        prompts at every call."""
        device = device or self.vision_proj.weight.device
        dtype = dtype or self.vision_proj.weight.dtype
        ids = tuple(id(p) for p in list(self.text_encoder.parameters()) + list(self.text_proj.parameters()))
        key = (ids, str(device), dtype)
        if self._prompt_cache.get("key") != key:
            self._prompt_cache = {"key": key, "ids": frozenset(ids)}
            _watch_optimizer_steps()
            _CACHED_BOOKS.add(self)
        cache = self._prompt_cache
        new = list(dict.fromkeys(p for p in prompts if p not in cache))
        if new:
            _, emb = self._encode_prompts(new, device, dtype, grad=False, online=True)
            cache.update(zip(new, emb.detach()))
        return torch.stack([cache[p] for p in prompts])

    def lr_scales(self) -> Dict[str, float]:
        """Learning-rate multiplier per module-name prefix (``config.lr_scale``), read by the trainer's
        parameter groups; parameters under no prefix (projections, heads, temperatures) take 1."""
        s = self.config.lr_scale
        out = {"visual": s.visual, "text_encoder": s.text_encoder, "fusion_encoder": s.fusion_encoder,
               "decoder": s.decoder}
        if self.gk is not None:
            out["gk"] = s.gk
        return {k: float(v) for k, v in out.items()}

    def knowledge_book(self, device=None, dtype=None, grad: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """Entity prompt features ``(feats (E, Dt), emb (E, De))``; cached unless ``grad`` (module docstring)."""
        device = device or self.vision_proj.weight.device
        dtype = dtype or self.vision_proj.weight.dtype
        if grad:
            return self._encode_prompts(self._prompts, device, dtype, grad=True)
        enc, proj = self.knowledge_towers()
        ids = tuple(id(p) for p in list(enc.parameters()) + list(proj.parameters()))
        # the parameters' identity is part of the key: a copy of the model (deepcopy) computes its own book
        key = (ids, str(device), dtype, tuple(self._prompts))
        if self._book is None or self._book[0] != key:
            feats, emb = self._encode_prompts(self._prompts, device, dtype, grad=False)
            self._book = (key, frozenset(ids), feats.detach(), emb.detach())
            _watch_optimizer_steps()
            _CACHED_BOOKS.add(self)
        return self._book[2], self._book[3]

    def invalidate_caches(self) -> None:
        """Drop the cached knowledge book and prompt embeddings; the next :meth:`knowledge_book` recomputes it. Optimizer steps
        and ``load_state_dict`` call this by themselves (module docstring); call it after changing the
        knowledge towers' weights any other way."""
        self._book = None
        self._prompt_cache = {}
        _CACHED_BOOKS.discard(self)

    def _cached_param_ids(self) -> frozenset:
        """Ids of the parameters the cached knowledge book and prompt embeddings were computed from."""
        book = self._book[1] if self._book is not None else frozenset()
        return book | self._prompt_cache.get("ids", frozenset())

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
                  "region_boxes": (B, K.NUM_REGIONS, 4), "region_mask": (B, K.NUM_REGIONS), "study_id": (B,)}
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

    # ------------------------------------------------------------------------------------- forward
    def forward(self, batch: Dict, alpha: Optional[float] = None) -> Dict[str, torch.Tensor]:
        """Pre-training losses for one batch (the batch dict of docs/api.md); see the module docstring."""
        self.check_batch(batch)
        lc = self.config.loss
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

        # ---- unimodal features (the decoder reads the whole report, the encoder its first text_max_length)
        dec_ids, dec_att = ids, att
        ids, att = self._encoder_text(ids, att)
        img_tokens, img_feat = self._image(images)
        txt_hidden = self.text_encoder(ids, att)
        txt_feat = F.normalize(self.text_proj(self.pool_text(txt_hidden, att)), dim=-1)
        with torch.no_grad():
            if self.training:
                self.momentum_update()
            if self._momentum_is_online():  # the copies now equal the online encoders: same features
                img_m, txt_m = img_feat.detach(), txt_feat.detach()
            else:
                img_m = F.normalize(self.vision_proj_m(self.visual_m(images)[:, 0]), dim=-1)
                txt_m = F.normalize(self.text_proj_m(self.pool_text(self.text_encoder_m(ids, att), att)), dim=-1)

        # ---- ITC (enqueues momentum features in training mode), ITM with hard negatives
        loss_itc = self.itc(img_feat, txt_feat, img_m, txt_m, alpha=alpha)
        # a zero weight skips the ITM pass (a third of a CPU step at the demo's size) and LECLS below
        loss_itm = (self._itm_loss(img_tokens, img_feat, txt_hidden, txt_feat, att, study) if lc.w_itm
                    else torch.zeros((), device=dev, dtype=dt))

        # ---- knowledge book, GK module, entity losses (none without the GK module)
        boxes, rmask = self.detector(images, batch["region_boxes"].to(dev, dt), batch["region_mask"].to(dev))
        if self.gk is not None:
            freeze = self.config.gk.freeze_knowledge_encoder
            feats, emb = self.knowledge_book(dev, dt, grad=not freeze and self.training)
            if labels.shape[1] != feats.shape[0]:
                raise ValueError(f"batch['entity_labels'] has {labels.shape[1]} entities, the knowledge book "
                                 f"{feats.shape[0]}")
            loss_ecls = (self._ecls_loss(img_feat, emb, labels) if lc.w_ecls
                         else torch.zeros((), device=dev, dtype=dt))
            gk = self._run_gk(img_tokens[:, 1:], boxes, rmask, feats, book=feats)
            loss_gk = self._gk_loss(gk["logits"], labels)
        else:
            gk, loss_ecls, loss_gk = None, torch.zeros((), device=dev, dtype=dt), torch.zeros((), device=dev, dtype=dt)

        # ---- LM
        loss_lm = self._lm_loss(img_tokens, gk, rmask, dec_ids, dec_att, labels)

        loss = (lc.w_itc * loss_itc + lc.w_itm * loss_itm + lc.w_lm * loss_lm + lc.w_ecls * loss_ecls
                + lc.w_gk * loss_gk)
        if self.training:
            self.step += 1
        return {"loss": loss, "loss_itc": loss_itc, "loss_itm": loss_itm, "loss_lm": loss_lm,
                "loss_ecls": loss_ecls, "loss_gk": loss_gk, "alpha": torch.tensor(float(alpha))}

    def _decoder_memory(self, img_tokens, gk, rmask):
        """Decoder cross-attention tokens: image tokens, then (``gk.decoder_attends_gk``) the GK memory;
        the image tokens alone without the GK module (``gk`` None)."""
        if gk is None or not self.config.gk.decoder_attends_gk:
            return img_tokens, None
        mem, mm = GKModule.memory(gk, rmask)
        ones = torch.ones(img_tokens.shape[:2], dtype=torch.long, device=img_tokens.device)
        return torch.cat([img_tokens, mem], 1), torch.cat([ones, mm], 1)

    def _decoder_condition(self, gk, labels: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """The decoder's condition (``gk.decoder_entity_states``): 2 P(present) - 1 per knowledge entity
        (B, E) from the GK head, detached; None when the option is off (or without the GK module). With
        ``gk.decoder_label_forcing`` > 0, decisions instead: +1 where :meth:`_entity_states` says
        present, else -1; and in training, with ``labels`` (B, E), that fraction of the samples take
        their true states: +1 where the label is 1 (present), -1 elsewhere."""
        if self.decoder.cond_proj is None:
            return None
        dt, logits = gk["z"].dtype, gk["logits"].detach()
        if not self._state_window:
            return (2 * GKModule.probabilities(logits) - 1).to(dt)
        margin = (logits[..., 1] - logits[..., 0]).float()
        train = labels is not None and self.training
        if train:
            self._remember_states(margin, labels)
            true = torch.where(labels == 1, 1.0, -1.0).to(dt)
            forcing = float(self.config.gk.decoder_label_forcing)
            if forcing >= 1.0:  # every sample forced: no decision needed
                return true
        cond = torch.where(self._entity_states(margin), 1.0, -1.0).to(dt)
        if not train:
            return cond
        pick = torch.rand(cond.shape[0], device=cond.device) < forcing
        return torch.where(pick[:, None], true, cond)

    def _remember_states(self, margin: torch.Tensor, labels: torch.Tensor) -> None:
        """Write the batch's GK margins (B, E) and present labels into the window of the last
        ``STATE_WINDOW`` training samples (a ring; no host synchronisation)."""
        n = self.state_margins.shape[0]
        new, present = margin[-n:], (labels == 1)[-n:]
        rows = (self.state_seen + torch.arange(new.shape[0], device=margin.device)) % n
        self.state_margins[rows] = new
        self.state_present[rows] = present
        self.state_seen += new.shape[0]

    def _entity_states(self, margin: torch.Tensor) -> torch.Tensor:
        """Present / not decisions (B, E) bool from the GK head's margins (B, E) (logit present - logit
        absent), with a threshold per entity from the window of training samples (a label of -1 counts
        as not present). ``gk.decoder_state_rule`` "prevalence": present where the margin is above the
        margin that as many of the window's samples exceed as were labelled present; "accuracy": the
        threshold that makes the most right decisions on the window (never present where calling any
        sample present gains nothing). The GK head's own p = P(present | mentioned) cannot be
        thresholded: reports leave most absent entities unmentioned, and its p on those is high."""
        n = min(int(self.state_seen), self.state_margins.shape[0])
        if n == 0:
            return torch.zeros_like(margin, dtype=torch.bool)
        ranked, order = self.state_margins[:n].sort(0, descending=True)  # (n, E)
        present = self.state_present[:n]
        if self.config.gk.decoder_state_rule == "accuracy":
            # calling the top k present: (true positives - false positives) = 2 tp(k) - k; k = 0 first, so a
            # tie keeps the fewer calls
            tp = present.gather(0, order).long().cumsum(0)
            gain = torch.cat([tp.new_zeros(1, tp.shape[1]), 2 * tp - torch.arange(1, n + 1, device=tp.device)[:, None]])
            k = gain.argmax(0)
        else:
            k = present.sum(0)  # present samples per entity in the window
        tau = ranked.gather(0, k.clamp(max=n - 1)[None]).squeeze(0)
        tau = torch.where(k >= n, torch.full_like(tau, float("-inf")), tau)
        if self.config.gk.decoder_state_rule == "accuracy":
            tau = torch.where(k == 0, torch.full_like(tau, float("inf")), tau)
        return margin > tau

    @inference
    def calibrate_states(self, loader, max_batches: Optional[int] = None) -> int:
        """Refill the decoder's window of entity states (``gk.decoder_label_forcing`` > 0) from ``loader``'s
        batches in eval mode: the GK head's margins on those images and their present labels replace the
        margins seen in training (under augmentation and batch statistics). Call it after training with the
        training images without augmentation, so that generation decides as the images it will see are
        scored. Returns the number of samples in the window (at most ``STATE_WINDOW``)."""
        if not self._state_window:
            raise ValueError("calibrate_states needs the decoder's entity states: gk.decoder_entity_states "
                             "with gk.decoder_label_forcing > 0")
        room, dev = self.state_margins.shape[0], self.state_margins.device
        ms, ps, seen = [], [], 0
        for i, b in enumerate(loader):
            if (max_batches is not None and i >= max_batches) or seen >= room:
                break
            for key in ("image", "entity_labels", "region_boxes", "region_mask"):
                if key not in b:
                    raise ValueError(f"calibrate_states: every batch needs {key!r}")
            lg = self._gk_infer(b["image"], None, b["region_boxes"], b["region_mask"])[3]["logits"]
            ms.append((lg[..., 1] - lg[..., 0]).float())
            ps.append(b["entity_labels"].to(dev) == 1)
            seen += len(lg)
        if not ms:
            raise ValueError("calibrate_states: the loader gave no batch")
        m, p = torch.cat(ms)[:room], torch.cat(ps)[:room]
        self.state_margins.zero_()
        self.state_present.zero_()
        self.state_margins[:len(m)] = m
        self.state_present[:len(m)] = p
        self.state_seen.fill_(len(m))
        return len(m)

    def _encoder_text(self, ids: torch.Tensor, att: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The part of the reports (B, L) that the report encoder reads: the first ``text_max_length`` word
        pieces (0: all), with SEP as the last of a row that was cut."""
        n = self.config.text_max_length
        if not n or ids.shape[1] <= n:
            return ids, att
        ids, att = ids[:, :n].clone(), att[:, :n]
        cut = att[:, -1] > 0
        ids[cut, -1] = self.tokenizer.sep_token_id
        return ids, att

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
        if self.gk is None:
            raise RuntimeError("this model has no GK module (gk.enabled=False)")
        return self.gk(patches, self.visual.grid_size, boxes, rmask, queries, with_regions=with_regions,
                       prompt_center=self._query_center(book))


#: training samples whose GK margins and labels calibrate the decoder's entity states (``_entity_states``)
STATE_WINDOW = 1024


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
