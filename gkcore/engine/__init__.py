"""gkcore.engine: the training loop (single process or ``torchrun``), downstream evaluation, metrics,
the ``gkcore pretrain`` / ``demo`` / ``eval`` commands and plots.

Import the submodules directly (``gkcore.engine.trainer``, ``gkcore.engine.metrics``, ...); nothing heavy
is imported here.
"""
