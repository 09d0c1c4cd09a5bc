"""Triton kernels and their launchers, installed as ``gkcore.kernels``.

Each module may define ``AOT_SPECS``: the kernels with concrete signatures and constexprs that
``python -m gkcore.aot`` (run by tests/test_foundation.py::test_aot_compile_all_triton_kernels) builds for
sm_90a and sm_80.

This file holds what the launchers share.
"""
from gkcore.ops._triton import interpreter_on


def upcast_bf16(dtype) -> bool:
    """The kernels' ``UPCAST`` flag: bf16 tiles are multiplied as their exact fp32 images under the
    interpreter, whose bf16 dot is inexact; never on a GPU."""
    import torch

    return interpreter_on() and dtype == torch.bfloat16


def merge_lse_splits(lz_p, mx_p):
    """Per-split partials of a log-sum-exp, ``lz_p`` = log sum exp(z - m) and ``mx_p`` = m, each
    (n_splits, rows), merged over the splits: (m (rows,), lz (rows,)) with lse = m + lz. They are kept
    apart so that a loss can be formed as lz + (m - target): the small loss of a confident row is then
    not the difference of two numbers the size of the largest logit."""
    import torch

    mx = mx_p.amax(0)
    lz = torch.logsumexp(lz_p + (mx_p - mx), 0) if mx_p.shape[0] > 1 else lz_p[0]
    return mx, lz
