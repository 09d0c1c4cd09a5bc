"""Saving and loading GK-MVLP: weights and config in one safetensors file. Mixed into
:class:`~gkcore.models.gk_mvlp.GKMVLP`.
"""
from __future__ import annotations

import copy
import json
import os
from typing import Optional, Union

import torch

from .config import config_from_dict, config_to_dict

__all__ = ["Persistence"]


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
        load_model(model, path, strict=True, device=str(device))
        return model.to(device)
