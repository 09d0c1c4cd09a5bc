"""Drop-in ``nn.Module``s built on :mod:`gkcore.functional`."""
from .region_pool import RegionPool  # noqa: F401
