"""Saving and loading GK-MVLP: weights and config in one safetensors file. Mixed into
:class:`~gkcore.models.gk_mvlp.GKMVLP`.
"""
from __future__ import annotations

import copy
import json
import os
from typing import Dict, Optional, Union

import torch

from .config import config_from_dict, config_to_dict

__all__ = ["Persistence", "remap_legacy_keys"]

#: parameter-name prefixes renamed since checkpoints were first written: old -> new
LEGACY_PREFIXES = (("visual.vit.", "visual.backbone."), ("visual_m.vit.", "visual_m.backbone."))


def remap_legacy_keys(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A state dict with the old names renamed (``visual.vit.*`` -> ``visual.backbone.*``, the same for the
    momentum copy ``visual_m``): the image encoder held its timm ViT as ``vit`` before any timm model
    could be plugged in as ``backbone``."""
    out = {}
    for k, v in state.items():
        for old, new in LEGACY_PREFIXES:
            if k.startswith(old):
                k = new + k[len(old):]
                break
        out[k] = v
    return out


class Persistence:
    """:meth:`save` and :meth:`load` of :class:`~gkcore.models.gk_mvlp.GKMVLP` (a mixin)."""

    def save(self, path: str) -> None:
        """Weights and config in one safetensors file (tied / shared tensors stored once)."""
        from safetensors.torch import save_model

        cfg = copy.deepcopy(self.config)
        meta = {"format": "gkcore.GKMVLP", "config": json.dumps(config_to_dict(cfg))}
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        save_model(self, path, metadata=meta)

    @classmethod
    def load(cls, path: str, backend: Optional[str] = None, device: Union[str, torch.device] = "cpu",
             tokenizer=None):
        """Rebuild a model saved by :meth:`save` (architecture from the file's metadata; no pretrained
        weights are read, every tensor comes from the file). Older files load too: their ViT weights
        named ``visual.vit.*`` are renamed (:func:`remap_legacy_keys`). Every parameter and buffer must
        come from the file, except a tied / shared one whose twin does; nothing may be left over."""
        from safetensors import safe_open
        from safetensors.torch import load_file

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
        state = remap_legacy_keys(load_file(path, device=str(device)))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected:
            raise ValueError(f"{path!r} holds tensors this model does not have: {sorted(unexpected)[:8]}")
        # save_model stores a tied / shared tensor once: a missing key is fine when it aliases a loaded one
        own = model.state_dict(keep_vars=True)
        loaded = {own[k].data_ptr() for k in state if k in own}
        lost = [k for k in missing if own[k].data_ptr() not in loaded]
        if lost:
            raise ValueError(f"{path!r} lacks tensors of this model: {sorted(lost)[:8]}")
        return model.to(device)
