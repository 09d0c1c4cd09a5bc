"""Drop-in ``nn.Module``s built on :mod:`gkcore.functional`."""
from .region_pool import RegionPool  # noqa: F401
from .region_attention import RegionCrossAttention  # noqa: F401
from .gk_fusion import GKFusion  # noqa: F401
from .linear_cross_entropy import LinearCrossEntropy  # noqa: F401
from .info_nce import ClipLoss, ITCLoss  # noqa: F401
