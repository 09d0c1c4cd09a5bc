"""Fault-injection cases for the ops and modules, run by tests/test_faults_ops.py through the crash-safe
worker (tests/fault_worker.py). ``CASES`` maps a case id to a function that returns when the outcome is
the documented one and raises ``AssertionError`` otherwise. Two kinds of case:

* a bad argument: the call must raise ``ValueError`` whose message names the argument (``refuse``);
* an edge input that is valid: every backend returns the float64 reference's result, finite unless the
  documented non-finite rule says NaN (``agree``).

Backends checked here: ``reference``, ``cpu`` and automatic choice (``None``) on the CPU; the triton
kernels (under the interpreter) in the non-finite agreement cases.
"""
from __future__ import annotations

import os
import re
from typing import Callable, Dict

import torch

import gkcore.functional as F
from gkcore.nn import ClipLoss, ITCLoss, LinearCrossEntropy, RegionCrossAttention

NAN, INF = float("nan"), float("inf")
BACKENDS = ("reference", "cpu", None)
TRITON = os.environ.get("TRITON_INTERPRET", "") not in ("", "0") or torch.cuda.is_available()
CASES: Dict[str, Callable[[], None]] = {}


def case(cid: str):
    def deco(fn):
        assert cid not in CASES, cid
        CASES[cid] = fn
        return fn
    return deco


def refuse(cid: str, fn: Callable[[], object], names: str, exc=ValueError):
    """Case ``cid``: ``fn()`` raises ``exc`` and the message matches ``names`` (the argument's name)."""
    def run():
        try:
            r = fn()
        except exc as e:
            assert re.search(names, str(e)), f"message does not name {names!r}: {e}"
            return
        raise AssertionError(f"no {exc.__name__}; returned {type(r).__name__}")
    CASES[cid] = run


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0, dtype=torch.float32):
    """The same numbers whatever ``dtype`` (drawn in float64, then rounded)."""
    return torch.randn(*shape, generator=gen(seed), dtype=torch.float64).to(dtype)


def boxes(B, R, seed=1, dtype=torch.float32):
    b = torch.rand(B, R, 4, generator=gen(seed), dtype=torch.float64).to(dtype)
    return torch.cat([torch.minimum(b[..., :2], b[..., 2:]), torch.maximum(b[..., :2], b[..., 2:])], -1)


def same(a: torch.Tensor, b: torch.Tensor, what: str, rtol=1e-4, atol=1e-5):
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    an, bn = torch.isnan(a), torch.isnan(b)
    assert torch.equal(an, bn), f"{what}: NaN at different places ({int(an.sum())} vs {int(bn.sum())})"
    a, b = a[~an].double(), b[~bn].double()
    assert torch.equal(torch.isinf(a), torch.isinf(b)), f"{what}: inf at different places"
    if a.numel():
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def agree(cid: str, fn: Callable[..., torch.Tensor], *, finite: bool = True, backends=BACKENDS, expect=None):
    """Case ``cid``: ``fn(backend=None)`` and each backend in ``backends`` agree with ``fn`` run by the
    reference in float64 (``fn(backend='reference', dtype=torch.float64)``); all finite when ``finite``;
    ``expect(out)`` checks the documented result when given."""
    def run():
        ref = fn(backend="reference", dtype=torch.float64)
        if finite:
            assert bool(torch.isfinite(ref).all()), "float64 reference is not finite"
        if expect is not None:
            expect(ref)
        for be in backends:
            out = fn(backend=be, dtype=torch.float32)
            same(out, ref.to(out.dtype), f"backend {be}")
    CASES[cid] = run


# ------------------------------------------------------------------------------------------- region_pool
def _rp(tokens_shape, R, grid=None, **kw):
    def fn(backend, dtype):
        t = randn(*tokens_shape, dtype=dtype)
        b = boxes(tokens_shape[0], R, dtype=dtype)
        return F.region_pool(t, b, grid, backend=backend, **kw)
    return fn


for B in (0, 1, 2):
    for (N, grid) in ((1, None), (4, None), (9, None), (6, (2, 3)), (7, (7, 1))):
        for C in (0, 1, 5):
            for R in (0, 1, 3):
                agree(f"region_pool/edge/B{B}-N{N}-C{C}-R{R}", _rp((B, N, C), R, grid))
for kw in ({"output_size": 3, "reduce": False}, {"sampling_ratio": 0}, {"sampling_ratio": -1}, {"aligned": False},
           {"output_size": 2, "sampling_ratio": 5}):
    agree("region_pool/options/" + ",".join(f"{k}={v}" for k, v in kw.items()), _rp((2, 16, 3), 4, None, **kw))
agree("region_pool/channels-last", lambda backend, dtype: F.region_pool(
    randn(2, 3, 4, 5, dtype=dtype), boxes(2, 2, dtype=dtype), backend=backend))


def _far(lo, hi, sr=2):
    def fn(backend, dtype):
        b = torch.tensor([[[lo, lo, hi, hi], [0.1, 0.1, 0.6, 0.7]]], dtype=dtype)
        return F.region_pool(randn(1, 16, 3, dtype=dtype), b, backend=backend, sampling_ratio=sr)
    return fn


def _zeros_first(out):
    assert torch.equal(out[0, 0], torch.zeros_like(out[0, 0])), f"a box far outside pools {out[0, 0].tolist()}"


for lo, hi in ((1e30, 2e30), (-2e30, -1e30), (5.0, 5.0), (-3.0, -2.0), (1e6, 1e6 + 1)):
    agree(f"region_pool/far-box/{lo:g}", _far(lo, hi), expect=_zeros_first)
agree("region_pool/far-box/huge-span", _far(-1e30, 1e30))  # sparse samples, all outside the grid
agree("region_pool/zero-area", lambda backend, dtype: F.region_pool(
    randn(1, 16, 3, dtype=dtype), torch.tensor([[[0.3, 0.3, 0.3, 0.3], [0.0, 0.5, 0.0, 0.5]]], dtype=dtype),
    backend=backend))


def _nan_tokens(where, value):
    def fn(backend, dtype):
        t = randn(1, 16, 3, dtype=dtype)
        t[0, where] = value
        b = torch.tensor([[[0.6, 0.6, 0.9, 0.9], [0.0, 0.0, 0.3, 0.3], [0.0, 0.0, 1.0, 1.0]]], dtype=dtype)
        return F.region_pool(t, b, backend=backend)
    return fn


def _nan_rule(out):
    # token 0 is the top-left cell: the box in the top-left corner and the full box read it, the other not
    assert bool(torch.isfinite(out[0, 0]).all()), "a box that does not read the bad token is not finite"
    assert bool(torch.isnan(out[0, 1]).all()) and bool(torch.isnan(out[0, 2]).all()), \
        "a box with a non-zero weight on the bad token is not NaN"


tri = BACKENDS + (("triton",) if TRITON else ())
for v, name in ((NAN, "nan"), (INF, "inf"), (-INF, "-inf")):
    agree(f"region_pool/nonfinite-token/{name}", _nan_tokens(0, v), finite=False, backends=tri, expect=_nan_rule)


def _nan_unread(backend, dtype):
    t = randn(1, 16, 3, dtype=dtype)
    t[0, 15] = NAN  # bottom-right cell, read by no box
    return F.region_pool(t, torch.tensor([[[0.0, 0.0, 0.4, 0.4]]], dtype=dtype), backend=backend)


agree("region_pool/nonfinite-token/unread", _nan_unread, backends=tri)

T16, B1 = randn(1, 16, 3), boxes(1, 2)
for be in BACKENDS:
    s = f"region_pool/{be}/"
    refuse(s + "N0", lambda be=be: F.region_pool(randn(2, 0, 8), boxes(2, 3), backend=be), r"tokens.*N=0")
    refuse(s + "N0-grid", lambda be=be: F.region_pool(randn(2, 0, 8), boxes(2, 3), (0, 4), backend=be), "N=0")
    refuse(s + "empty-grid-4d", lambda be=be: F.region_pool(randn(1, 0, 4, 3), boxes(1, 2), backend=be), "tokens")
    refuse(s + "grid-int", lambda be=be: F.region_pool(T16, B1, 4, backend=be), "grid_size")
    refuse(s + "grid-1", lambda be=be: F.region_pool(T16, B1, (16,), backend=be), "grid_size")
    refuse(s + "grid-float", lambda be=be: F.region_pool(T16, B1, (4.0, 4), backend=be), "grid_size")
    refuse(s + "grid-str", lambda be=be: F.region_pool(T16, B1, "44", backend=be), "grid_size")
    refuse(s + "grid-mismatch", lambda be=be: F.region_pool(T16, B1, (3, 5), backend=be), "grid_size")
    refuse(s + "grid-negative", lambda be=be: F.region_pool(T16, B1, (-4, -4), backend=be), "grid_size")
    refuse(s + "not-square", lambda be=be: F.region_pool(randn(1, 17, 3), B1, backend=be), "grid_size")
    refuse(s + "tokens-2d", lambda be=be: F.region_pool(randn(16, 3), B1, backend=be), "tokens")
    refuse(s + "tokens-int", lambda be=be: F.region_pool(torch.ones(1, 16, 3, dtype=torch.int64), B1, backend=be),
           "tokens")
    refuse(s + "tokens-list", lambda be=be: F.region_pool([[0.0]], B1, backend=be), "tokens")
    refuse(s + "boxes-shape", lambda be=be: F.region_pool(T16, boxes(1, 2)[..., :3], backend=be), "boxes")
    refuse(s + "boxes-batch", lambda be=be: F.region_pool(T16, boxes(2, 2), backend=be), "boxes")
    refuse(s + "boxes-dtype", lambda be=be: F.region_pool(T16, B1.double(), backend=be), "boxes")
    refuse(s + "boxes-int", lambda be=be: F.region_pool(T16, torch.ones(1, 2, 4, dtype=torch.int64), backend=be),
           "boxes")
    refuse(s + "box-swapped", lambda be=be: F.region_pool(T16, torch.tensor([[[0.9, 0.9, 0.1, 0.1]]]), backend=be),
           "x1 < x0")
    refuse(s + "box-nan", lambda be=be: F.region_pool(T16, torch.tensor([[[NAN, 0.1, 0.5, 0.5]]]), backend=be),
           "NaN")
    refuse(s + "box-inf", lambda be=be: F.region_pool(T16, torch.tensor([[[0.1, 0.1, INF, 0.5]]]), backend=be),
           "inf")
    refuse(s + "box-overflow", lambda be=be: F.region_pool(T16, torch.tensor([[[-1e38, 0, 1e38, 1]]]), backend=be),
           "boxes")
    refuse(s + "adaptive-huge", lambda be=be: F.region_pool(T16, torch.tensor([[[-1e30, 0, 1e30, 1]]]),
                                                            sampling_ratio=0, backend=be), "sampling_ratio")
    refuse(s + "sampling-huge", lambda be=be: F.region_pool(T16, B1, sampling_ratio=10 ** 6, backend=be),
           "sampling_ratio")
    refuse(s + "sampling-float", lambda be=be: F.region_pool(T16, B1, sampling_ratio=2.0, backend=be),
           "sampling_ratio")
    for o in (0, -1, 2.0, True, None):
        refuse(s + f"output_size-{o}", lambda be=be, o=o: F.region_pool(T16, B1, output_size=o, backend=be),
               "output_size")


# ---------------------------------------------------------------------------------------------- info_nce
def _nce(M, N, D, **kw):
    def fn(backend, dtype):
        q = randn(M, D, dtype=dtype)
        k = torch.cat([q + 0.1 * randn(M, D, seed=2, dtype=dtype), randn(max(N - M, 0), D, seed=3, dtype=dtype)])[:N]
        return F.info_nce(q, k, scale=5.0, backend=backend, **kw)
    return fn


for M in (0, 1, 3):
    for N in (3, 8):
        for D in (1, 7):
            for red in ("mean", "sum", "none"):
                agree(f"info_nce/edge/M{M}-N{N}-D{D}-{red}", _nce(M, N, D, reduction=red))


def _nce_pos(kind):
    def fn(backend, dtype):
        q, k = randn(4, 6, dtype=dtype), randn(9, 6, seed=4, dtype=dtype)
        if kind == "none-positive":
            pos = torch.full((4,), -1)
        elif kind == "mask-empty-row":
            pos = torch.zeros(4, 9, dtype=torch.bool)
            pos[0, 3] = pos[2, 1] = pos[2, 5] = True
        else:
            pos = torch.tensor([0, -1, 8, 3])
        return F.info_nce(q, k, scale=3.0, positives=pos, reduction="none", backend=backend)
    return fn


for kind in ("none-positive", "mask-empty-row", "index-mixed"):
    agree(f"info_nce/positives/{kind}", _nce_pos(kind))
agree("info_nce/scale-1e4", lambda backend, dtype: F.info_nce(
    torch.nn.functional.normalize(randn(5, 8, dtype=dtype), dim=1),
    torch.nn.functional.normalize(randn(12, 8, seed=5, dtype=dtype), dim=1), scale=1e4, backend=backend),
    )


def _nce_bad(what, value):
    def fn(backend, dtype):
        q, k = randn(4, 6, dtype=dtype), randn(9, 6, seed=6, dtype=dtype)
        (q if what == "query" else k)[1, 2] = value
        return F.info_nce(q, k, scale=3.0, reduction="none", backend=backend)
    return fn


def _rows_nan(rows):
    def check(out):
        want = torch.zeros(out.shape[0], dtype=torch.bool)
        want[list(rows)] = True
        assert torch.equal(torch.isnan(out), want), f"NaN rows {torch.isnan(out).tolist()}, expected {want.tolist()}"
    return check


for v, name in ((NAN, "nan"), (INF, "inf")):
    agree(f"info_nce/nonfinite-query/{name}", _nce_bad("query", v), finite=False, backends=tri, expect=_rows_nan([1]))
    agree(f"info_nce/nonfinite-key/{name}", _nce_bad("keys", v), finite=False, backends=tri,
          expect=_rows_nan([0, 1, 2, 3]))

Q4, K9 = randn(4, 6), randn(9, 6, seed=7)
for be in BACKENDS:
    s = f"info_nce/{be}/"
    nce = (lambda be: lambda q=Q4, k=K9, **kw: F.info_nce(q, k, **{"scale": 2.0, "backend": be, **kw}))(be)
    refuse(s + "D0", lambda nce=nce: nce(randn(4, 0), randn(9, 0)), "D=0")
    refuse(s + "N0", lambda nce=nce: nce(Q4, randn(0, 6)), "keys")
    refuse(s + "N<M", lambda nce=nce: nce(Q4, randn(3, 6)), "positives")
    refuse(s + "keys-D", lambda nce=nce: nce(Q4, randn(9, 5)), "keys")
    refuse(s + "keys-dtype", lambda nce=nce: nce(Q4, K9.double()), "keys")
    refuse(s + "query-1d", lambda nce=nce: nce(randn(6), K9), "query")
    refuse(s + "query-int", lambda nce=nce: nce(torch.ones(4, 6, dtype=torch.int64), K9), "query")
    for sv, nm in ((NAN, "nan"), (INF, "inf"), (torch.tensor(NAN), "tensor-nan"), (torch.tensor(-INF), "tensor-inf"),
                   (torch.tensor([1.0, 2.0]), "tensor-2"), (torch.tensor(3), "tensor-int"), (True, "bool"),
                   ("2", "str"), (None, "none")):
        refuse(s + f"scale-{nm}", lambda nce=nce, sv=sv: nce(scale=sv), "scale")
    refuse(s + "positives-range", lambda nce=nce: nce(positives=torch.tensor([0, 1, 2, 9])), "positives")
    refuse(s + "positives-shape", lambda nce=nce: nce(positives=torch.tensor([0, 1])), "positives")
    refuse(s + "positives-float", lambda nce=nce: nce(positives=torch.zeros(4)), "positives")
    refuse(s + "positives-mask-shape", lambda nce=nce: nce(positives=torch.ones(4, 8, dtype=torch.bool)), "positives")
    for a in (-0.1, 1.5, NAN, "x"):
        refuse(s + f"alpha-{a}", lambda nce=nce, a=a: nce(alpha=a, soft_query=Q4), "alpha")
    refuse(s + "alpha-no-soft", lambda nce=nce: nce(alpha=0.4), "soft_query")
    refuse(s + "soft-shape", lambda nce=nce: nce(alpha=0.4, soft_query=randn(3, 6)), "soft_query")
    for e in (-0.1, 1.1, NAN):
        refuse(s + f"smoothing-{e}", lambda nce=nce, e=e: nce(label_smoothing=e), "label_smoothing")
    refuse(s + "reduction", lambda nce=nce: nce(reduction="avg"), "reduction")


# ----------------------------------------------------------------------------------- linear_cross_entropy
def _lce(T, V, D, bias=False, **kw):
    def fn(backend, dtype):
        h, w = randn(T, D, dtype=dtype), randn(V, D, seed=8, dtype=dtype)
        y = torch.randint(0, V, (T,), generator=gen(9))
        b = randn(V, seed=10, dtype=dtype) if bias else None
        return F.linear_cross_entropy(h, w, y, b, backend=backend, **kw)
    return fn


for T in (0, 1, 5):
    for V in (1, 7):
        for D in (1, 6):
            agree(f"linear_cross_entropy/edge/T{T}-V{V}-D{D}", _lce(T, V, D, bias=True, reduction="none"))
agree("linear_cross_entropy/all-ignored", lambda backend, dtype: F.linear_cross_entropy(
    randn(4, 6, dtype=dtype), randn(7, 6, seed=1, dtype=dtype), torch.full((4,), -100), backend=backend),
    expect=lambda out: None if float(out) == 0.0 else (_ for _ in ()).throw(AssertionError(f"mean {out}")))
agree("linear_cross_entropy/softcap", _lce(5, 7, 6, softcap=2.0, label_smoothing=0.1))


def _lce_bad(what, value):
    def fn(backend, dtype):
        h, w = randn(5, 6, dtype=dtype), randn(7, 6, seed=11, dtype=dtype)
        (h if what == "hidden" else w)[2, 1] = value
        y = torch.tensor([1, 2, 3, -100, 6])
        return F.linear_cross_entropy(h, w, y, reduction="none", backend=backend)
    return fn


for v, name in ((NAN, "nan"), (INF, "inf"), (-INF, "-inf")):
    agree(f"linear_cross_entropy/nonfinite-hidden/{name}", _lce_bad("hidden", v), finite=False, backends=tri,
          expect=_rows_nan([2]))
    agree(f"linear_cross_entropy/nonfinite-weight/{name}", _lce_bad("weight", v), finite=False, backends=tri,
          expect=_rows_nan([0, 1, 2, 4]))

H5, W7, Y5 = randn(5, 6), randn(7, 6, seed=12), torch.tensor([0, 1, 2, 3, 6])
for be in BACKENDS:
    s = f"linear_cross_entropy/{be}/"
    lce = (lambda be: lambda h=H5, w=W7, y=Y5, b=None, **kw: F.linear_cross_entropy(h, w, y, b, backend=be, **kw))(be)
    refuse(s + "D0", lambda lce=lce: lce(randn(5, 0), randn(7, 0)), "D=0")
    refuse(s + "V0", lambda lce=lce: lce(H5, randn(0, 6)), "weight")
    refuse(s + "weight-D", lambda lce=lce: lce(H5, randn(7, 5)), "weight")
    refuse(s + "targets-range", lambda lce=lce: lce(y=torch.tensor([0, 1, 2, 3, 7])), "targets")
    refuse(s + "targets-negative", lambda lce=lce: lce(y=torch.tensor([0, 1, -2, 3, 4])), "targets")
    refuse(s + "targets-float", lambda lce=lce: lce(y=Y5.float()), "targets")
    refuse(s + "targets-shape", lambda lce=lce: lce(y=Y5[:4]), "targets")
    refuse(s + "bias-shape", lambda lce=lce: lce(b=randn(6)), "bias")
    refuse(s + "hidden-0d", lambda lce=lce: lce(h=torch.tensor(1.0), y=torch.tensor(0)), "hidden")
    for c in (0.0, -1.0, NAN, INF):
        refuse(s + f"softcap-{c}", lambda lce=lce, c=c: lce(softcap=c), "softcap")
    for e in (-0.5, 2.0, NAN):
        refuse(s + f"smoothing-{e}", lambda lce=lce, e=e: lce(label_smoothing=e), "label_smoothing")
    refuse(s + "ignore-float", lambda lce=lce: lce(ignore_index=1.5), "ignore_index")
    refuse(s + "reduction", lambda lce=lce: lce(reduction="avg"), "reduction")


# ------------------------------------------------------------------------------------ sample_hard_negatives
def _hn_case(B, D, groups=None, be=None):
    def run():
        v, t = randn(B, D), randn(B, D, seed=13)
        g = None if groups is None else torch.tensor(groups)
        nt, ni = F.sample_hard_negatives(v, t, 5.0, group_ids=g, generator=gen(3), backend=be)
        assert nt.shape == (B,) and ni.shape == (B,)
        gg = g if g is not None else torch.arange(B)
        for i in range(B):
            assert int(nt[i]) != i and int(gg[nt[i]]) != int(gg[i]), f"row {i}: negative text {int(nt[i])} is a positive"
            assert int(ni[i]) != i and int(gg[ni[i]]) != int(gg[i]), f"row {i}: negative image {int(ni[i])} is a positive"
    return run


for be in BACKENDS:
    s = f"sample_hard_negatives/{be}/"
    for B, D, g in ((2, 1, None), (5, 3, None), (6, 4, [0, 0, 1, 1, 2, 2]), (3, 2, [7, 7, 8])):
        CASES[s + f"ok-B{B}-D{D}-g{g is not None}"] = _hn_case(B, D, g, be)
    hn = (lambda be: lambda v=None, t=None, sc=5.0, **kw: F.sample_hard_negatives(
        randn(4, 3) if v is None else v, randn(4, 3, seed=1) if t is None else t, sc, backend=be, **kw))(be)
    refuse(s + "B1", lambda hn=hn: hn(randn(1, 3), randn(1, 3)), "B=1")
    refuse(s + "D0", lambda hn=hn: hn(randn(4, 0), randn(4, 0)), "D=0")
    refuse(s + "one-group", lambda hn=hn: hn(group_ids=torch.zeros(4, dtype=torch.long)), "group_ids")
    refuse(s + "group-shape", lambda hn=hn: hn(group_ids=torch.zeros(3, dtype=torch.long)), "group_ids")
    refuse(s + "group-float", lambda hn=hn: hn(group_ids=torch.zeros(4)), "group_ids")
    refuse(s + "shapes", lambda hn=hn: hn(randn(4, 3), randn(5, 3)), "image_feat")
    for sv, nm in ((NAN, "nan"), (torch.tensor(NAN), "tensor-nan"), (torch.tensor(INF), "tensor-inf"),
                   (torch.ones(2), "tensor-2"), ("x", "str")):
        refuse(s + f"scale-{nm}", lambda hn=hn, sv=sv: hn(sc=sv), "scale")
    bad = randn(4, 3)
    bad[2, 1] = NAN
    refuse(s + "feat-nan", lambda hn=hn, bad=bad: hn(v=bad), "image_feat")
    refuse(s + "generator", lambda hn=hn: hn(generator=3), "generator")


# ----------------------------------------------------------------------------------------- region_attention
def _ra_inputs(B=2, H=2, P=3, N=16, d=4, R=3, seed=0):
    return (randn(B, H, P, d, seed=seed), randn(B, H, N, d, seed=seed + 1), randn(B, H, N, d, seed=seed + 2),
            boxes(B, R, seed=seed + 3))


def _ra(**kw):
    def fn(backend, dtype):
        q, k, v, b = (x.to(dtype) for x in _ra_inputs())
        return F.region_attention(q, k, v, b, (4, 4), backend=backend, **kw)
    return fn


agree("region_attention/plain", _ra())
agree("region_attention/patches", _ra(attend_patches=True))
agree("region_attention/masked-all", lambda backend, dtype: F.region_attention(
    *(x.to(dtype) for x in _ra_inputs()), (4, 4), region_mask=torch.zeros(2, 3, dtype=torch.bool), backend=backend),
    expect=lambda out: None if bool((out == 0).all()) else (_ for _ in ()).throw(AssertionError("not zeros")))
q, k, v, b = _ra_inputs()
for be in BACKENDS:
    s = f"region_attention/{be}/"
    ra = (lambda be: lambda q=q, k=k, v=v, b=b, g=(4, 4), **kw: F.region_attention(q, k, v, b, g, backend=be, **kw))(be)
    refuse(s + "grid-int", lambda ra=ra: ra(g=4), "grid_size")
    refuse(s + "grid-none", lambda ra=ra: ra(g=None), "grid_size")
    refuse(s + "grid-mismatch", lambda ra=ra: ra(g=(2, 4)), "grid_size")
    refuse(s + "kv-shape", lambda ra=ra: ra(v=v[:, :, :8]), "k and v")
    refuse(s + "q-shape", lambda ra=ra: ra(q=q[..., :3]), "q")
    refuse(s + "d0", lambda ra=ra: ra(q=q[..., :0], k=k[..., :0], v=v[..., :0]), "head dimension")
    refuse(s + "mask-dtype", lambda ra=ra: ra(region_mask=torch.ones(2, 3)), "region_mask")
    refuse(s + "mask-shape", lambda ra=ra: ra(region_mask=torch.ones(2, 4, dtype=torch.bool)), "region_mask")
    for sc in (0.0, -1.0, NAN, "x"):
        refuse(s + f"scale-{sc}", lambda ra=ra, sc=sc: ra(scale=sc), "scale")
    refuse(s + "box-swapped", lambda ra=ra: ra(b=torch.tensor([[[0.9, 0.9, 0.1, 0.1]]] * 2)), "x1 < x0")
    refuse(s + "output_size", lambda ra=ra: ra(output_size=0), "output_size")


# --------------------------------------------------------------------------------------------- losses, nn
def _ecls(labels, scale=4.0):
    return F.entity_contrastive_loss(randn(3, 5), randn(4, 5, seed=1), labels, scale)


refuse("entity_contrastive/scale-nan-no-positive", lambda: _ecls(torch.zeros(3, 4, dtype=torch.long), NAN), "scale")
refuse("entity_contrastive/scale-tensor-nan", lambda: _ecls(torch.ones(3, 4, dtype=torch.long), torch.tensor(NAN)),
       "scale")
refuse("entity_contrastive/labels-7", lambda: _ecls(torch.full((3, 4), 7)), "labels")
refuse("entity_contrastive/labels-shape", lambda: _ecls(torch.ones(3, 5, dtype=torch.long)), "labels")


@case("entity_contrastive/no-positive-is-zero")
def _():
    out = _ecls(torch.zeros(3, 4, dtype=torch.long))
    assert float(out) == 0.0, f"loss {float(out)}"


F8 = randn(4, 8)
refuse("ITCLoss/B0", lambda: ITCLoss(8, 16)(F8[:0], F8[:0], F8[:0], F8[:0]), "no rows")
refuse("ITCLoss/D", lambda: ITCLoss(8, 16)(randn(4, 7), randn(4, 7), randn(4, 7), randn(4, 7)), "feature size")
refuse("ITCLoss/alpha", lambda: ITCLoss(8, 16)(F8, F8, F8, F8, alpha=2.0), "alpha")
refuse("ITCLoss/embed_dim", lambda: ITCLoss(0, 16), "embed_dim")
refuse("ITCLoss/queue_size", lambda: ITCLoss(8, -1), "queue_size")
refuse("ClipLoss/B0", lambda: ClipLoss()(F8[:0], F8[:0], 1.0), "image_features")
refuse("ClipLoss/shapes", lambda: ClipLoss()(F8, F8[:3], 1.0), "image_features")
refuse("ClipLoss/scale-nan", lambda: ClipLoss()(F8, F8, torch.tensor(NAN)), "scale")


@case("ITCLoss/any-batch-size")
def _():
    m = ITCLoss(8, 16, backend="cpu")
    for B in (3, 5, 1, 7, 20):
        f = torch.nn.functional.normalize(randn(B, 8, seed=B), dim=1)
        assert bool(torch.isfinite(m(f, f, f, f))), f"B={B}"
    assert int(m.queue_ptr) == (3 + 5 + 1 + 7 + 20) % 16


@case("ITCLoss/nan-batch-keeps-queue-clean")
def _():
    m = ITCLoss(8, 16, backend="cpu")
    f = torch.full((4, 8), NAN)
    m(f, f, f, f)
    assert bool(torch.isfinite(m.image_queue).all() and torch.isfinite(m.text_queue).all()), "queue took NaN rows"
    g = torch.nn.functional.normalize(randn(4, 8), dim=1)
    assert bool(torch.isfinite(m(g, g, g, g))), "the loss after a NaN batch is not finite"


refuse("RegionCrossAttention/heads0", lambda: RegionCrossAttention(16, 0), "num_heads")
refuse("RegionCrossAttention/dim0", lambda: RegionCrossAttention(0, 2), "dim")
refuse("RegionCrossAttention/heads-divide", lambda: RegionCrossAttention(16, 3), "num_heads")
refuse("RegionCrossAttention/kdim", lambda: RegionCrossAttention(16, 2, kdim=-1), "kdim")
_rca = RegionCrossAttention(16, 2)
_bx = boxes(1, 2)
refuse("RegionCrossAttention/tokens-2d", lambda: _rca(randn(1, 3, 16), randn(16, 16), _bx, (4, 4)), "patch_tokens")
refuse("RegionCrossAttention/tokens-kdim", lambda: _rca(randn(1, 3, 16), randn(1, 16, 8), _bx, (4, 4)), "patch_tokens")
refuse("RegionCrossAttention/tokens-int", lambda: _rca(randn(1, 3, 16), torch.ones(1, 16, 16, dtype=torch.long), _bx,
                                                     (4, 4)), "patch_tokens")
refuse("RegionCrossAttention/queries-dim", lambda: _rca(randn(1, 3, 8), randn(1, 16, 16), _bx, (4, 4)), "queries")
refuse("RegionCrossAttention/grid", lambda: _rca(randn(1, 3, 16), randn(1, 16, 16), _bx, 4), "grid_size")
refuse("LinearCrossEntropy/sizes", lambda: LinearCrossEntropy(0, 5), "in_features")
refuse("LinearCrossEntropy/targets", lambda: LinearCrossEntropy(6, 5)(randn(3, 6), torch.tensor([0, 1, 5])), "targets")


@case("RegionCrossAttention/ok")
def _():
    out = _rca(randn(2, 3, 16), randn(2, 16, 16), boxes(2, 2), (4, 4))
    assert out.shape == (2, 3, 16) and bool(torch.isfinite(out).all())

