"""Encoders of GK-MVLP: the timm image encoder (any timm model with a feature grid) and the BERT-family
text towers.

Text towers are built from BERT layers written here (post-norm, exactly BERT's math) with the parameter
names of ``transformers``' ``BertModel`` (``attention.self.query`` ...), so any local BERT checkpoint
(MiniLM, SciBERT, BERT-base) loads into them by name. Writing the layers here instead of driving
``transformers.BertLayer`` keeps one attention path (``scaled_dot_product_attention``), lets the
cross-attention keys come from a different width (the ViT), and does not depend on transformers 5's
internal mask and cache conventions. ``transformers`` reads the checkpoint's ``config.json``.

Shapes: B batch, L tokens, Dt text width, Nv = 1 + gh*gw image tokens, Dv vision width.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import TextConfig, VisionConfig

__all__ = ["ConvStem", "ImageEncoder", "BertEmbeddings", "BertBlock", "TextEncoder", "FusionEncoder", "ReportDecoder",
           "load_bert_state", "text_config_from_pretrained", "init_bert_weights", "ZeroLinear"]


# ------------------------------------------------------------------------------------------ vision
class ConvStem(nn.Module):
    """Convolutional patch embedding (Xiao et al. 2021): ``log2(patch_size)`` blocks of 3x3 stride-2
    convolution (no bias) + GroupNorm(1 group) + ReLU whose widths double up to ``width``, then a 1x1
    convolution to ``width``. (B, C, H, W) -> (B, width, H / patch_size, W / patch_size), the grid of a
    ``patch_size`` patch embedding; a drop-in for timm's ``patch_embed.proj``."""

    def __init__(self, in_chans: int, width: int, patch_size: int):
        super().__init__()
        if patch_size < 2 or patch_size & (patch_size - 1):
            raise ValueError(f"the conv stem needs a power-of-two patch_size >= 2, got {patch_size}")
        n = patch_size.bit_length() - 1
        layers, c = [], in_chans
        for k in range(1, n + 1):
            out = max(8, width >> (n - k))
            layers += [nn.Conv2d(c, out, 3, stride=2, padding=1, bias=False), nn.GroupNorm(1, out), nn.ReLU(inplace=True)]
            c = out
        layers.append(nn.Conv2d(c, width, 1))
        self.layers = nn.Sequential(*layers)
        self.patch_size = patch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _create_timm(timm, name: str, image_size: int, kw: Dict) -> nn.Module:
    """``timm.create_model(name, img_size=image_size, **kw)`` for models that take an input size (ViT,
    DeiT, Swin: their patch grid and position embeddings depend on it); without ``img_size`` for the
    fully convolutional ones (ResNet, ConvNeXt), whose constructors refuse it."""
    try:
        return timm.create_model(name, img_size=image_size, **kw)
    except TypeError as e:
        if "img_size" not in str(e):
            raise
    return timm.create_model(name, **kw)


#: VisionConfig fields passed to timm as they are, only when not None (ViT shapes, a CNN's output stride)
_TIMM_OVERRIDES = ("patch_size", "embed_dim", "depth", "num_heads", "output_stride")


class ImageEncoder(nn.Module):
    """Any timm image model with a spatial feature map: images (B, C, H, W) -> tokens (B, 1 + gh*gw, Dv).

    The first token is the pooled image feature, the rest are the feature map's cells in row-major order:

    * ViT-family models (a ``num_prefix_tokens >= 1`` model, e.g. ViT, DeiT): the final-normed tokens
      of ``forward_features``, the CLS token first (further prefix tokens such as registers are dropped);
    * convolutional and hierarchical models (ResNet, ConvNeXt, Swin, hybrids): the feature map of
      ``forward_features`` (or, with ``feature_index``, of that stage through timm's ``features_only``,
      e.g. 3 = ResNet's layer3 at stride 16 as in MedKLIP), flattened, with its global average first.

    ``grid_size`` (gh, gw) and ``width`` Dv are read from the model by running it once on an empty image
    of the configured size (on the parameters' device; the meta device works). Built with
    ``pretrained=False``; a local ``checkpoint`` file (timm/PyTorch or safetensors) is loaded through
    timm's own loader, which adapts the first convolution to ``in_chans`` and resamples ViT position
    embeddings; no hub access happens either way. ``cfg.stem == "conv"`` replaces a ViT's patch
    projection by a :class:`ConvStem` (same grid).
    """

    def __init__(self, cfg: VisionConfig, image_size: int, channels: int):
        super().__init__()
        import timm

        if cfg.stem not in ("patch", "conv"):
            raise ValueError(f"vision.stem must be 'patch' or 'conv', got {cfg.stem!r}")
        if cfg.stem == "conv" and cfg.checkpoint:
            raise ValueError("vision.stem='conv' cannot load a ViT checkpoint (its patch weights would be dropped); "
                             "use stem='patch' with a checkpoint")
        kw: Dict = dict(in_chans=channels)
        if cfg.drop_path_rate:
            kw["drop_path_rate"] = cfg.drop_path_rate
        os_ = cfg.output_stride
        if os_ is not None and (isinstance(os_, bool) or not isinstance(os_, int) or os_ < 1):
            raise ValueError(f"vision.output_stride must be a positive int or None, got {os_!r}")
        for name in _TIMM_OVERRIDES:
            if getattr(cfg, name) is not None:
                kw[name] = getattr(cfg, name)
        if cfg.feature_index is not None:
            kw.update(features_only=True, out_indices=(int(cfg.feature_index),))
        else:
            kw["num_classes"] = 0
        if cfg.checkpoint:
            if not os.path.isfile(cfg.checkpoint):
                raise ValueError(f"vision checkpoint {cfg.checkpoint!r} is not a file (hub ids are not fetched)")
            kw.update(pretrained=True, pretrained_cfg_overlay=dict(file=os.path.abspath(cfg.checkpoint)))
        else:
            kw["pretrained"] = False
        try:
            self.backbone = _create_timm(timm, cfg.model_name, image_size, kw)
        except (TypeError, RuntimeError, AssertionError) as e:  # timm asserts on e.g. an output_stride it lacks
            given = {k: kw[k] for k in (*_TIMM_OVERRIDES, "feature_index") if k in kw}
            raise ValueError(f"vision.model_name={cfg.model_name!r} cannot be built with {given or kw}: {e}") from e
        self.features_only = cfg.feature_index is not None
        self.num_prefix = 0 if self.features_only else int(getattr(self.backbone, "num_prefix_tokens", 0) or 0)
        if cfg.stem == "conv":
            if not self.num_prefix:
                raise ValueError(f"vision.stem='conv' replaces a ViT's patch embedding; {cfg.model_name!r} is not a ViT")
            embed = self.backbone.patch_embed
            embed.proj = ConvStem(channels, embed.proj.out_channels, embed.proj.kernel_size[0])
        self.channels, self.image_size = channels, image_size
        self.grid_size, self.width = self._probe()

    def _probe(self) -> Tuple[Tuple[int, int], int]:
        """(gh, gw) and Dv from one forward pass on an empty image (eval mode, no autograd)."""
        p = next(self.backbone.parameters())
        x = torch.zeros(1, self.channels, self.image_size, self.image_size, device=p.device, dtype=p.dtype)
        was = self.backbone.training
        self.backbone.eval()
        try:
            with torch.no_grad():
                out = self._features(x)
        finally:
            self.backbone.train(was)
        if out.dim() == 3:  # ViT tokens: the grid comes from the patch embedding
            grid = tuple(int(g) for g in self.backbone.patch_embed.grid_size)
            if grid[0] * grid[1] != out.shape[1] - self.num_prefix:
                raise ValueError(f"vision model returned {out.shape[1]} tokens, not {self.num_prefix} + {grid}")
            return grid, int(out.shape[-1])
        return (int(out.shape[2]), int(out.shape[3])), int(out.shape[1])

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        """ViT tokens (B, P + N, D) or a feature map (B, D, gh, gw) (channels-last maps are permuted)."""
        if self.features_only:
            out, width = self.backbone(images)[0], self.backbone.feature_info.channels()[0]
        else:
            out, width = self.backbone.forward_features(images), self.backbone.num_features
        if out.dim() == 4 and out.shape[1] != width and out.shape[-1] == width:  # NHWC (Swin, ...)
            out = out.permute(0, 3, 1, 2)
        if out.dim() not in (3, 4) or (out.dim() == 3 and not self.num_prefix):
            raise ValueError(f"vision model returned features of shape {tuple(out.shape)}: a spatial feature map "
                             "(B, C, H, W) or ViT tokens with a CLS token are needed")
        return out

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self._features(images)
        if out.dim() == 3:  # pooled = CLS; patch tokens after every prefix token
            return torch.cat([out[:, :1], out[:, self.num_prefix:]], 1) if self.num_prefix > 1 else out
        tokens = out.flatten(2).transpose(1, 2)  # (B, gh*gw, D)
        return torch.cat([tokens.mean(1, keepdim=True), tokens], 1)


# -------------------------------------------------------------------------------------------- BERT
class BertEmbeddings(nn.Module):
    """word + position + token-type embeddings, LayerNorm, dropout: (B, L) ids -> (B, L, Dt)."""

    def __init__(self, cfg: TextConfig, dropout: float):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, input_ids: torch.Tensor, past_length: int = 0) -> torch.Tensor:
        L = input_ids.shape[1]
        pos = torch.arange(past_length, past_length + L, device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(pos)[None] + self.token_type_embeddings.weight[0]
        return self.dropout(self.LayerNorm(x))


class _SelfOut(nn.Module):
    def __init__(self, d, eps, dropout):
        super().__init__()
        self.dense = nn.Linear(d, d)
        self.LayerNorm = nn.LayerNorm(d, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h, x):
        return self.LayerNorm(self.dropout(self.dense(h)) + x)


class _Attn(nn.Module):
    def __init__(self, d, heads, kdim):
        super().__init__()
        self.h = heads
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(kdim, d)
        self.value = nn.Linear(kdim, d)


class _Attention(nn.Module):
    """BERT attention block: multi-head attention + output dense + residual LayerNorm (post-norm)."""

    def __init__(self, d, heads, eps, dropout, kdim=None):
        super().__init__()
        self.self = _Attn(d, heads, kdim or d)
        self.output = _SelfOut(d, eps, dropout)
        self.p = dropout

    def forward(self, x, kv=None, mask=None, is_causal=False, cache=None):
        """x (B, L, D); kv (B, S, Dk) or None (self-attention); mask broadcastable to (B, 1, L, S), True =
        attend; ``cache`` (dict) holds the keys/values of earlier positions for incremental decoding."""
        B, L, D = x.shape
        a = self.self
        h, d = a.h, D // a.h
        q = a.query(x).view(B, L, h, d).transpose(1, 2)
        src = x if kv is None else kv
        if cache is not None and kv is not None and "k" in cache:  # cross-attention: keys fixed
            k, v = cache["k"], cache["v"]
        else:
            k = a.key(src).view(B, src.shape[1], h, d).transpose(1, 2)
            v = a.value(src).view(B, src.shape[1], h, d).transpose(1, 2)
            if cache is not None:
                if kv is None and "k" in cache:
                    k = torch.cat([cache["k"], k], 2)
                    v = torch.cat([cache["v"], v], 2)
                cache["k"], cache["v"] = k, v
        drop = self.p if self.training else 0.0
        if is_causal and L > 1:
            S = k.shape[2]
            causal = torch.ones(L, S, dtype=torch.bool, device=x.device).tril(S - L)
            mask = causal if mask is None else (mask & causal)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        return self.output(o.transpose(1, 2).reshape(B, L, D), x)


class _Intermediate(nn.Module):
    def __init__(self, d, inter):
        super().__init__()
        self.dense = nn.Linear(d, inter)

    def forward(self, x):
        return F.gelu(self.dense(x))


class BertBlock(nn.Module):
    """One BERT layer: self-attention (optionally causal), optional cross-attention to ``kdim``-wide
    tokens, feed-forward; post-norm residuals. Parameter names follow ``transformers`` BertLayer."""

    def __init__(self, cfg: TextConfig, dropout: float, cross_dim: Optional[int] = None, causal: bool = False):
        super().__init__()
        d, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.causal = causal
        self.attention = _Attention(d, cfg.num_heads, eps, dropout)
        if cross_dim is not None:
            self.crossattention = _Attention(d, cfg.num_heads, eps, dropout, kdim=cross_dim)
        self.intermediate = _Intermediate(d, cfg.intermediate_size)
        self.output = _SelfOut(d, eps, dropout)
        self.output.dense = nn.Linear(cfg.intermediate_size, d)

    def forward(self, x, mask=None, enc=None, enc_mask=None, cache=None):
        x = self.attention(x, mask=mask, is_causal=self.causal, cache=None if cache is None else cache.setdefault("self", {}))
        if enc is not None:
            if not hasattr(self, "crossattention"):
                raise ValueError("this BERT layer has no cross-attention")
            x = self.crossattention(x, kv=enc, mask=enc_mask, cache=None if cache is None else cache.setdefault("cross", {}))
        return self.output(self.intermediate(x), x)


def _key_mask(attention_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """(B, S) 0/1 -> (B, 1, 1, S) bool (True = attend), or None."""
    if attention_mask is None:
        return None
    return attention_mask.bool()[:, None, None, :]


class TextEncoder(nn.Module):
    """Unimodal report encoder: the first ``fusion_start`` BERT layers. (B, L) -> (B, L, Dt)."""

    def __init__(self, cfg: TextConfig, dropout: float):
        super().__init__()
        self.embeddings = BertEmbeddings(cfg, dropout)
        self.layer = nn.ModuleList(BertBlock(cfg, dropout) for _ in range(cfg.fusion_start))
        self.width = cfg.hidden_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(input_ids)
        m = _key_mask(attention_mask)
        for blk in self.layer:
            x = blk(x, m)
        return x


class FusionEncoder(nn.Module):
    """Image-report encoder: BERT layers ``fusion_start..num_layers`` with cross-attention to image tokens.

    ``forward(text_hidden (B, L, Dt), attention_mask (B, L), image_tokens (B, Nv, Dv)) -> (B, L, Dt)``;
    the ITM head reads the fused CLS (position 0)."""

    def __init__(self, cfg: TextConfig, dropout: float, image_width: int):
        super().__init__()
        n = cfg.num_layers - cfg.fusion_start
        self.layer = nn.ModuleList(BertBlock(cfg, dropout, cross_dim=image_width) for _ in range(n))

    def forward(self, text_hidden, attention_mask, image_tokens, image_mask=None):
        x, m, em = text_hidden, _key_mask(attention_mask), _key_mask(image_mask)
        for blk in self.layer:
            x = blk(x, m, image_tokens, em)
        return x


class ReportDecoder(nn.Module):
    """Causal BERT decoder with cross-attention to the image (and GK) tokens, and an LM-head transform.

    ``forward(input_ids (B, L), attention_mask (B, L), enc (B, S, Dv), cache=None, cond=None) -> hidden (B, L, Dt)``
    after BERT's prediction-head transform (dense, GELU, LayerNorm); the vocabulary projection and the
    loss live in the LM head (``gkcore.nn.LinearCrossEntropy``), which never materialises the logits
    during training. With ``cond_dim`` > 0, ``cond`` (B, cond_dim) is projected (``cond_proj``, a Linear to
    Dt that starts at 0) and added to the input embedding of every position (GK-MVLP passes the GK head's
    entity states).
    """

    def __init__(self, cfg: TextConfig, dropout: float, enc_width: int, embeddings: Optional[BertEmbeddings] = None,
                 cond_dim: int = 0):
        super().__init__()
        self.shared_embeddings = embeddings is not None
        if embeddings is None:
            self.embeddings = BertEmbeddings(cfg, dropout)
        else:
            self._shared = [embeddings]  # not registered: owned by the text encoder
        self.layer = nn.ModuleList(BertBlock(cfg, dropout, cross_dim=enc_width, causal=True)
                                   for _ in range(cfg.decoder_layers))
        d = cfg.hidden_size
        self.transform = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.LayerNorm(d, eps=cfg.layer_norm_eps))
        # zero at start, no random draw: the decoder starts as the one without a condition
        self.cond_proj = ZeroLinear(cond_dim, d) if cond_dim > 0 else None

    @property
    def embed(self) -> BertEmbeddings:
        return self._shared[0] if self.shared_embeddings else self.embeddings

    def forward(self, input_ids, attention_mask, enc, enc_mask=None, cache: Optional[List[Dict]] = None,
                past_length: int = 0, cond: Optional[torch.Tensor] = None):
        x = self.embed(input_ids, past_length=past_length)
        if (cond is None) != (self.cond_proj is None):
            raise ValueError("cond must be given exactly when the decoder was built with cond_dim > 0")
        if cond is not None:
            if cond.shape != (x.shape[0], self.cond_proj.in_features):
                raise ValueError(f"cond must have shape ({x.shape[0]}, {self.cond_proj.in_features}), "
                                 f"got {tuple(cond.shape)}")
            x = x + self.cond_proj(cond.to(x.dtype))[:, None]
        m = None if attention_mask is None else _key_mask(attention_mask)
        em = _key_mask(enc_mask)
        for i, blk in enumerate(self.layer):
            x = blk(x, m, enc, em, cache=None if cache is None else cache[i])
        return self.transform(x)


class ZeroLinear(nn.Linear):
    """A Linear layer whose weight and bias start at 0 without drawing from the random generator: a new
    input path joins a model without changing its output at initialisation or the random draws of the
    layers built after it (:func:`init_bert_weights` leaves it at 0 too)."""

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


def init_bert_weights(module: nn.Module, std: float = 0.02) -> None:
    """BERT's initialisation (``initializer_range`` 0.02): Linear and Embedding weights N(0, std), biases
    and the padding row 0, LayerNorm (1, 0). Keeps tied LM-head logits small for random text towers.
    A :class:`ZeroLinear` stays at 0."""
    for m in module.modules():
        if isinstance(m, ZeroLinear):
            continue
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# ------------------------------------------------------------------------------------ checkpoints
def text_config_from_pretrained(cfg: TextConfig) -> TextConfig:
    """Fill architecture fields of ``cfg`` from the local folder's config.json (via transformers)."""
    if not cfg.pretrained:
        return cfg
    if not os.path.isdir(cfg.pretrained):
        raise ValueError(f"text.pretrained {cfg.pretrained!r} is not a local folder (hub ids are not fetched)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import BertConfig

    bc = BertConfig.from_pretrained(cfg.pretrained, local_files_only=True)
    import dataclasses

    new = dataclasses.replace(cfg, vocab_size=bc.vocab_size, hidden_size=bc.hidden_size,
                              num_layers=bc.num_hidden_layers, num_heads=bc.num_attention_heads,
                              intermediate_size=bc.intermediate_size,
                              max_position_embeddings=bc.max_position_embeddings,
                              type_vocab_size=bc.type_vocab_size, layer_norm_eps=bc.layer_norm_eps)
    if not 0 <= new.fusion_start <= new.num_layers:
        raise ValueError(f"text.fusion_start={new.fusion_start} must be in [0, {new.num_layers}]")
    return new


def load_bert_state(folder: str) -> Dict[str, torch.Tensor]:
    """The BERT weights of a local folder as a dict with the ``embeddings.*`` / ``encoder.layer.N.*`` names
    (``bert.`` prefixes stripped); model.safetensors or pytorch_model.bin."""
    st = os.path.join(folder, "model.safetensors")
    if os.path.isfile(st):
        from safetensors.torch import load_file

        sd = load_file(st)
    else:
        binf = os.path.join(folder, "pytorch_model.bin")
        if not os.path.isfile(binf):
            raise ValueError(f"no model.safetensors or pytorch_model.bin in {folder!r}")
        sd = torch.load(binf, map_location="cpu", weights_only=True)
    out = {}
    for k, v in sd.items():
        k = k[5:] if k.startswith("bert.") else k
        # old checkpoints name LayerNorm parameters gamma/beta
        k = k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        out[k] = v
    return out


def init_text_towers(state: Dict[str, torch.Tensor], text: TextEncoder, fusion: FusionEncoder,
                     decoder: ReportDecoder, num_layers: int) -> List[str]:
    """Copy BERT weights into the towers: embeddings -> text encoder (and an unshared decoder); layer i <
    fusion_start -> text layer i; the rest -> fusion layers (self-attention and FFN; cross-attention stays
    random, as in ALBEF); the last ``decoder_layers`` BERT layers -> the decoder. Returns the names of
    the parameters that were initialised."""
    loaded = []

    def copy(module: nn.Module, prefix: str, tag: str):
        for name, p in module.named_parameters():
            key = prefix + name
            if key in state and state[key].shape == p.shape:
                with torch.no_grad():
                    p.copy_(state[key].to(p.dtype))
                loaded.append(f"{tag}.{name}")

    copy(text.embeddings, "embeddings.", "text.embeddings")
    if not decoder.shared_embeddings:
        copy(decoder.embeddings, "embeddings.", "decoder.embeddings")
    nt = len(text.layer)
    for i, blk in enumerate(text.layer):
        copy(blk, f"encoder.layer.{i}.", f"text.layer.{i}")
    for j, blk in enumerate(fusion.layer):
        copy(blk, f"encoder.layer.{nt + j}.", f"fusion.layer.{j}")
    nd = len(decoder.layer)
    for j, blk in enumerate(decoder.layer):
        src = max(0, num_layers - nd) + j
        if src < num_layers:
            copy(blk, f"encoder.layer.{src}.", f"decoder.layer.{j}")
    return loaded

