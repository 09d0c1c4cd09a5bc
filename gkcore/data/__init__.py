"""Data: knowledge base, synthetic chest X-rays, dataset adapters, reports -> entity labels, and the
DALI loader (GPU decode, CPU fallback). Names are imported lazily so ``import gkcore.data`` stays cheap and
works without DALI or transformers installed."""
from __future__ import annotations

import importlib

_LAZY = {
    # knowledge base
    "knowledge": "gkcore.data.knowledge",
    "REGIONS": "gkcore.data.knowledge",
    "ENTITIES": "gkcore.data.knowledge",
    "ENTITY_NAMES": "gkcore.data.knowledge",
    "Entity": "gkcore.data.knowledge",
    "entity_index": "gkcore.data.knowledge",
    "entity_prompts": "gkcore.data.knowledge",
    "region_prompts": "gkcore.data.knowledge",
    # records
    "Sample": "gkcore.data.sample",
    # synthetic data
    "synth": "gkcore.data.synth",
    "SynthCXR": "gkcore.data.synth",
    # real-data adapters
    "MimicCXR": "gkcore.data.adapters",
    "IUXray": "gkcore.data.adapters",
    "open_dataset": "gkcore.data.adapters",
    # reports
    "reports": "gkcore.data.reports",
    "extract_sections": "gkcore.data.reports",
    "label_report": "gkcore.data.reports",
    "default_tokenizer": "gkcore.data.reports",
    "report_token_ids": "gkcore.data.reports",
    # loader
    "build_loader": "gkcore.data.loader",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'gkcore.data' has no attribute {name!r}")
    m = importlib.import_module(mod)
    value = m if mod.endswith("." + name) else getattr(m, name)
    globals()[name] = value
    return value
