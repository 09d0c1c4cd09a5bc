"""Public functional API: torch-like functions, each picking the fastest backend that supports its
inputs (``backend=None``), or the one named by ``backend=`` / ``GKCORE_BACKEND``."""
from .ops.region_pool import region_pool  # noqa: F401
from .ops.hard_negatives import sample_hard_negatives  # noqa: F401
from .ops.region_attention import region_attention  # noqa: F401
from .ops.linear_cross_entropy import linear_cross_entropy  # noqa: F401
from .ops.info_nce import info_nce  # noqa: F401
from .losses import entity_contrastive_loss  # noqa: F401
