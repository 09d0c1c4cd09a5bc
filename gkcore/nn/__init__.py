"""Drop-in ``nn.Module``s built on :mod:`gkcore.functional`."""
from .region_pool import RegionPool  # noqa: F401
from .attention import GKFusion, RegionCrossAttention  # noqa: F401
from .linear_cross_entropy import LinearCrossEntropy  # noqa: F401
from .contrastive import ClipLoss, ITCLoss  # noqa: F401
