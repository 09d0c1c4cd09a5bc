"""gkcore.engine: training and evaluation: the training loop (single process or ``torchrun``), downstream
evaluation, metrics, the demo job and plots. The command line that drives them is :mod:`gkcore.cli`.

Import the submodules directly (``gkcore.engine.trainer``, ``gkcore.engine.metrics``, ...); nothing heavy
is imported here.
"""
