"""Triton kernels and their launchers, installed as ``gkcore.kernels``.

Each module may define ``AOT_SPECS``: the kernels with concrete signatures and constexprs that the
ahead-of-time compile test (tests/test_aot_compile.py) builds for sm_90a and sm_80.
"""


def merge_lse_splits(lz_p, mx_p):
    """Per-split partials of a log-sum-exp, ``lz_p`` = log sum exp(z - m) and ``mx_p`` = m, each
    (n_splits, rows), merged over the splits: (m (rows,), lz (rows,)) with lse = m + lz. They are kept
    apart so that a loss can be formed as lz + (m - target): the small loss of a confident row is then
    not the difference of two numbers the size of the largest logit."""
    import torch

    mx = mx_p.amax(0)
    lz = torch.logsumexp(lz_p + (mx_p - mx), 0) if mx_p.shape[0] > 1 else lz_p[0]
    return mx, lz
