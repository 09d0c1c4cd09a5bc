"""Losses built on gkcore's ops: functions that register no op of their own and have no backend of
their own (they call ops of :mod:`gkcore.functional`). The ``nn.Module`` losses over a single op
(``ClipLoss``, ``ITCLoss`` over ``info_nce``) are layer-5 modules and live in :mod:`gkcore.nn`."""
from .entity_contrastive import entity_contrastive_loss  # noqa: F401
