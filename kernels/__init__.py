"""Triton kernels and their launchers, installed as ``gkcore.kernels``.

Each module may define ``AOT_SPECS``: the kernels with concrete signatures and constexprs that the
ahead-of-time compile test (tests/test_aot_compile.py) builds for sm_90a and sm_80.
"""
