"""GK-MVLP model: configs and presets, encoders, GK module, region detector, the full model.

``create_model(name, backend=None, **overrides)`` builds a preset (``gk_mvlp_base``, ``gk_mvlp_resnet50``,
``gk_mvlp_tiny``);
``backend="reference"`` forces the plain-PyTorch path of every gkcore op inside the model (parity runs).
"""
from __future__ import annotations

import os
from typing import List, Optional, Tuple, Union

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from torch import nn  # noqa: E402

from ..ops.registry import BACKEND_ORDER  # noqa: E402
from .config import (GKConfig, GKMVLPConfig, LossConfig, TextConfig, VisionConfig, get_config,  # noqa: E402
                     list_presets, register_preset)
from .detector import ATLAS_BOXES, FasterRCNNRegionDetector, RegionDetector  # noqa: E402
from .gk_mvlp import GKMVLP  # noqa: E402

__all__ = ["create_model", "GKMVLP", "GKMVLPConfig", "VisionConfig", "TextConfig", "GKConfig", "LossConfig",
           "get_config", "list_presets", "register_preset", "RegionDetector", "FasterRCNNRegionDetector",
           "ATLAS_BOXES", "parameter_table", "save_checkpoint", "load"]

_BACKENDS = (None, "auto") + BACKEND_ORDER


def create_model(name: str, backend: Optional[str] = None, *, tokenizer=None, **overrides) -> GKMVLP:
    """Build the preset ``name`` with config ``overrides`` (``embed_dim=64``, ``vision__depth=2`` or
    ``**{"loss.queue_size": 64}``; an unknown preset or field raises ``ValueError`` naming it).

    ``backend`` is passed to every gkcore op of the model (ITC / LECLS ``info_nce``, ``region_pool``,
    ``region_attention`` in GKFusion, ``sample_hard_negatives``, ``linear_cross_entropy``): None / "auto" =
    automatic choice per op; "reference" = plain PyTorch everywhere (the parity switch); "cpu", "cuda",
    "triton" force that backend and raise at the first op that has none for the inputs. ``tokenizer``
    replaces the config's tokenizer. Nothing is downloaded: weights come from local files only."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    cfg = get_config(name, **overrides)
    return GKMVLP(cfg, backend=None if backend == "auto" else backend, tokenizer=tokenizer)


def save_checkpoint(model: GKMVLP, path: str) -> None:
    """Same as ``model.save(path)`` (safetensors with the config in the metadata)."""
    model.save(path)


def load(path: str, backend: Optional[str] = None, device="cpu") -> GKMVLP:
    """Same as ``GKMVLP.load(path)``."""
    return GKMVLP.load(path, backend=backend, device=device)


_OPTIONAL_ROWS = ("knowledge encoder (frozen copy)", "region detector")  # listed only when present


def parameter_table(model: Union[nn.Module, str], **overrides) -> List[Tuple[str, int]]:
    """``[(component, n_params), ...]`` for ``gkcore info --model``: each parameter counted once, in the
    first component that holds it (tied weights go to the module that owns them), momentum copies and
    the detector listed separately, then trainable and total counts. ``model`` may be a preset name: it
    is then built on the meta device (no memory, no weights read), with ``overrides``."""
    if isinstance(model, str):
        import torch

        with torch.device("meta"):
            model = create_model(model, **overrides)
    groups = [
        ("image encoder (ViT)", ["visual"]),
        ("report encoder (text layers)", ["text_encoder"]),
        ("image-report fusion encoder", ["fusion_encoder"]),
        ("report decoder", ["decoder"]),
        ("GK module", ["gk"]),
        ("projections and heads", ["vision_proj", "text_proj", "itm_head", "lm_head", "itc", "ecls_temp"]),
        ("knowledge encoder (frozen copy)", ["knowledge_text", "knowledge_proj"]),
        ("region detector", ["detector"]),
        ("momentum encoders (EMA, frozen)", ["visual_m", "vision_proj_m", "text_encoder_m", "text_proj_m"]),
    ]
    seen, rows = set(), []
    for label, names in groups:
        n = 0
        for attr in names:
            obj = getattr(model, attr, None)
            params = [obj] if isinstance(obj, nn.Parameter) else (list(obj.parameters()) if isinstance(obj, nn.Module) else [])
            for p in params:
                if id(p) not in seen:
                    seen.add(id(p))
                    n += p.numel()
        if n or label not in _OPTIONAL_ROWS:
            rows.append((label, n))
    rest = sum(p.numel() for p in model.parameters() if id(p) not in seen)
    if rest:
        rows.append(("other", rest))
    rows.append(("trainable", sum(p.numel() for p in model.parameters() if p.requires_grad)))
    rows.append(("total", sum(p.numel() for p in model.parameters())))
    return rows
