"""Triton LM-head cross-entropy without materialising the (T, V) logits.

Forward (``_linear_cross_entropy_fwd_kernel``): grid (token blocks, vocabulary splits). A program owns
BLOCK_T tokens and one contiguous slice of the vocabulary; it walks that slice in BLOCK_V tiles,
computes each logits tile ``z = h W^T + b`` on chip (fp32 accumulation over BLOCK_D slices of D),
applies the softcap, and keeps per token an online log-sum-exp (running max and scaled sum), the target
logit and the sum of logits (for label smoothing). The launcher merges the splits (a log-sum-exp over
at most a few dozen partials per token) and returns the per-token loss and LSE; only O(T) is stored.

Backward: two kernels that each recompute the logits tiles from ``hidden``, ``weight`` and the saved
LSE, form ``dz = g_t (softmax(z) - (1 - eps) onehot(y) - eps / V)`` (times ``1 - (z / c)^2`` with a
softcap), and contract it:

* ``_linear_cross_entropy_bwd_kernel`` (grid: token blocks): ``dhidden[t] = sum_v dz[t, v] W[v]``; the
  program owns its rows of ``dhidden`` (fp32) and accumulates vocabulary tiles in order.
* ``_linear_cross_entropy_bwd_weight_kernel`` (grid: vocabulary blocks): ``dW[v] = sum_t dz[t, v] h[t]``
  and ``dbias[v] = sum_t dz[t, v]``, token tiles in order.

Every output element is written by exactly one program in a fixed order: deterministic, no atomics.
The accumulators live in the fp32 output rows in global memory (read-modify-write per tile, ordered by
block barriers between the passes).
fp32 inputs use IEEE fp32 dot products (no TF32), bf16/fp16 inputs use tensor cores with fp32
accumulation.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from . import interpreter_on, upcast_bf16


@triton.jit
def _tanh(x):
    """tanh accurate to a few ulp in fp32 (series near 0, exp formula elsewhere); libdevice-free so that
    it also runs under the interpreter."""
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    x2 = x * x
    small = a * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
    t = tl.where(a < 0.3, small, big)
    return tl.where(x < 0, -t, t)


@triton.jit
def _mm(a, b, acc, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b with fp32 accumulation. UPCAST (set only under the Triton interpreter for bf16, whose
    interpreted bf16 dot is wrong in triton 3.8) multiplies the exact fp32 images of the operands."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT_PREC)


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, offs_t, mask_t, offs_v, mask_v, D, softcap,
                 HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """(BLOCK_T, BLOCK_V) fp32 logits tile (capped with SOFTCAP: ``c tanh(z / c)``)."""
    acc = tl.zeros((BLOCK_T, BLOCK_V), dtype=tl.float32)
    rows_h = offs_t.to(tl.int64)[:, None] * D
    rows_w = offs_v.to(tl.int64)[:, None] * D
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        h = tl.load(h_ptr + rows_h + offs_d[None, :], mask=mask_t[:, None] & mask_d[None, :], other=0.0)
        w = tl.load(w_ptr + rows_w + offs_d[None, :], mask=mask_v[:, None] & mask_d[None, :], other=0.0)
        acc = _mm(h, tl.trans(w), acc, DOT_PREC, UPCAST)
    if HAS_BIAS:
        b = tl.load(b_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)
        acc = acc + b[None, :]
    if SOFTCAP:
        acc = softcap * _tanh(acc / softcap)
    return acc


@triton.jit
def _linear_cross_entropy_fwd_kernel(h_ptr, w_ptr, b_ptr, y_ptr, lz_ptr, zy_ptr, zsum_ptr, mx_ptr, T, V, D,
                                     V_PER_SPLIT, softcap, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr,
                                     BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                                     DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Partial (per vocabulary split) LSE as log s and the max m (apart: the host forms m - target before
    adding log s), target logit and logit sum of BLOCK_T tokens; outputs are (n_splits, T) fp32, row
    ``program_id(1)``."""
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    y = tl.load(y_ptr + offs_t, mask=mask_t, other=-1)
    v_lo = pid_s * V_PER_SPLIT
    v_hi = tl.minimum(V, v_lo + V_PER_SPLIT)
    m = tl.full((BLOCK_T,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_T,), dtype=tl.float32)
    zy = tl.zeros((BLOCK_T,), dtype=tl.float32)
    zsum = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < v_hi
        z = _logits_tile(h_ptr, w_ptr, b_ptr, offs_t, mask_t, offs_v, mask_v, D, softcap, HAS_BIAS, SOFTCAP,
                         BLOCK_T, BLOCK_V, BLOCK_D, DOT_PREC, UPCAST)
        zm = tl.where(mask_v[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(zm, 1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(zm - m_new[:, None]), 1)
        m = m_new
        zy += tl.sum(tl.where(offs_v[None, :] == y[:, None], z, 0.0), 1)
        zsum += tl.sum(tl.where(mask_v[None, :], z, 0.0), 1)
    out = pid_s.to(tl.int64) * T + offs_t
    tl.store(lz_ptr + out, tl.log(s), mask=mask_t)
    tl.store(mx_ptr + out, m, mask=mask_t)
    tl.store(zy_ptr + out, zy, mask=mask_t)
    tl.store(zsum_ptr + out, zsum, mask=mask_t)


@triton.jit
def _dlogits_tile(z, offs_v, mask_v, y, lse, g, inv_v, one_minus_eps, softcap, SOFTCAP: tl.constexpr):
    """dz = g (softmax - (1-eps) onehot - eps/V) [* (1 - (z / c)^2), the tanh derivative of the capped
    logit z = c tanh(u / c)], zero outside the vocabulary."""
    p = tl.exp(z - lse[:, None])
    dz = p - tl.where(offs_v[None, :] == y[:, None], one_minus_eps, 0.0) - (1.0 - one_minus_eps) * inv_v
    if SOFTCAP:
        th = z / softcap
        dz = dz * (1.0 - th * th)
    dz = dz * g[:, None]
    return tl.where(mask_v[None, :], dz, 0.0)


@triton.jit
def _linear_cross_entropy_bwd_kernel(h_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, g_ptr, dh_ptr, T, V, D, softcap,
                                     inv_v, one_minus_eps, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr,
                                     BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                                     DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """dhidden (T, D) fp32 for BLOCK_T tokens: zeroed, then one vocabulary tile after the other.
    ``g`` (T,) fp32 is the upstream gradient per token, already 0 at ignored tokens."""
    pid_t = tl.program_id(0)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    y = tl.load(y_ptr + offs_t, mask=mask_t, other=-1)
    lse = tl.load(lse_ptr + offs_t, mask=mask_t, other=0.0)
    g = tl.load(g_ptr + offs_t, mask=mask_t, other=0.0)
    rows = offs_t.to(tl.int64)[:, None] * D
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        tl.store(dh_ptr + rows + offs_d[None, :], tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32),
                 mask=mask_t[:, None] & (offs_d < D)[None, :])
    # The program re-reads the dh rows it wrote, possibly from other threads (load and store layouts
    # differ): a block barrier orders every pass over them (global writes are visible block-wide after it).
    tl.debug_barrier()
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        z = _logits_tile(h_ptr, w_ptr, b_ptr, offs_t, mask_t, offs_v, mask_v, D, softcap, HAS_BIAS, SOFTCAP,
                         BLOCK_T, BLOCK_V, BLOCK_D, DOT_PREC, UPCAST)
        dz = _dlogits_tile(z, offs_v, mask_v, y, lse, g, inv_v, one_minus_eps, softcap, SOFTCAP)
        dzc = dz.to(w_ptr.dtype.element_ty)
        rows_w = offs_v.to(tl.int64)[:, None] * D
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            w = tl.load(w_ptr + rows_w + offs_d[None, :], mask=mask_v[:, None] & mask_d[None, :], other=0.0)
            ptrs = dh_ptr + rows + offs_d[None, :]
            msk = mask_t[:, None] & mask_d[None, :]
            acc = tl.load(ptrs, mask=msk, other=0.0)
            acc = _mm(dzc, w, acc, DOT_PREC, UPCAST)
            tl.store(ptrs, acc, mask=msk)
        tl.debug_barrier()


@triton.jit
def _linear_cross_entropy_bwd_weight_kernel(h_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, g_ptr, dw_ptr, db_ptr, T, V, D,
                                            softcap, inv_v, one_minus_eps, HAS_BIAS: tl.constexpr,
                                            SOFTCAP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr,
                                            BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """dW (V, D) fp32 and dbias (V,) fp32 for BLOCK_V vocabulary rows: zeroed, then one token tile after
    the other."""
    pid_v = tl.program_id(0)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_v = offs_v < V
    rows = offs_v.to(tl.int64)[:, None] * D
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        tl.store(dw_ptr + rows + offs_d[None, :], tl.zeros((BLOCK_V, BLOCK_D), dtype=tl.float32),
                 mask=mask_v[:, None] & (offs_d < D)[None, :])
    tl.debug_barrier()  # as in the dh kernel: the dW rows are re-read by the passes below
    db = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask_t = offs_t < T
        y = tl.load(y_ptr + offs_t, mask=mask_t, other=-1)
        lse = tl.load(lse_ptr + offs_t, mask=mask_t, other=0.0)
        g = tl.load(g_ptr + offs_t, mask=mask_t, other=0.0)
        z = _logits_tile(h_ptr, w_ptr, b_ptr, offs_t, mask_t, offs_v, mask_v, D, softcap, HAS_BIAS, SOFTCAP,
                         BLOCK_T, BLOCK_V, BLOCK_D, DOT_PREC, UPCAST)
        dz = _dlogits_tile(z, offs_v, mask_v, y, lse, g, inv_v, one_minus_eps, softcap, SOFTCAP)
        dz = tl.where(mask_t[:, None], dz, 0.0)
        db += tl.sum(dz, 0)
        dzt = tl.trans(dz.to(h_ptr.dtype.element_ty))
        rows_h = offs_t.to(tl.int64)[:, None] * D
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            h = tl.load(h_ptr + rows_h + offs_d[None, :], mask=mask_t[:, None] & mask_d[None, :], other=0.0)
            ptrs = dw_ptr + rows + offs_d[None, :]
            msk = mask_v[:, None] & mask_d[None, :]
            acc = tl.load(ptrs, mask=msk, other=0.0)
            acc = _mm(dzt, h, acc, DOT_PREC, UPCAST)
            tl.store(ptrs, acc, mask=msk)
        tl.debug_barrier()
    if HAS_BIAS:
        tl.store(db_ptr + offs_v, db, mask=mask_v)


# ----------------------------------------------------------------------------------------------- launchers
#: (BLOCK_T, BLOCK_V, BLOCK_D, num_warps, num_stages) per kernel and input dtype. Every entry compiles for
#: sm_80 and sm_90a without register spills (``python -m gkcore.aot --module linear_cross_entropy``
#: compiles exactly these); fp32 runs IEEE dots on the FMA units, which need smaller tiles.
CONFIGS = {
    "fwd": {"fp32": (32, 64, 32, 4, 1), "bf16": (64, 128, 64, 8, 3), "fp16": (64, 128, 64, 8, 3)},
    "bwd": {"fp32": (32, 64, 32, 4, 1), "bf16": (64, 64, 64, 8, 2), "fp16": (64, 64, 64, 8, 2)},
    "bwd_weight": {"fp32": (32, 64, 32, 4, 1), "bf16": (64, 64, 64, 8, 2), "fp16": (64, 64, 64, 8, 2)},
}
_DT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}



def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _config(kernel: str, D: int, dtype: torch.dtype):
    """(BLOCK_T, BLOCK_V, BLOCK_D, num_warps, num_stages) of ``kernel`` ('fwd', 'bwd', 'bwd_weight'). Small
    tiles under the interpreter so that small test vocabularies still span several tiles, including a
    partial one."""
    if interpreter_on():
        return 16, 32, max(16, min(32, triton.next_power_of_2(D))), 4, 1
    return CONFIGS[kernel][_DT[dtype]]


def _n_splits(T: int, V: int, block_t: int, block_v: int, device: torch.device) -> int:
    tiles = triton.cdiv(V, block_v)
    if interpreter_on() or device.type != "cuda":
        return min(2, tiles)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(tiles, triton.cdiv(2 * sms, triton.cdiv(T, block_t))))


def linear_cross_entropy_forward(hidden: torch.Tensor, weight: torch.Tensor, bias, targets: torch.Tensor,
                                 lz_part: torch.Tensor, zy_part: torch.Tensor, zsum_part: torch.Tensor,
                                 mx_part: torch.Tensor, softcap: float, v_per_split: int) -> None:
    """hidden (T, D), weight (V, D), bias (V,) or None: contiguous, one dtype; targets (T,) int64;
    lz_part (log of the split's sum of exp(z - max)), zy_part, zsum_part, mx_part (the split's max logit):
    (n_splits, T) fp32 preallocated, every element written."""
    T, D = hidden.shape
    V = weight.shape[0]
    BT, BV, BD, nw, ns = _config("fwd", D, hidden.dtype)
    assert v_per_split % BV == 0
    n_splits = lz_part.shape[0]
    if T == 0:
        return
    grid = (triton.cdiv(T, BT), n_splits)
    _linear_cross_entropy_fwd_kernel[grid](
        hidden, weight, bias if bias is not None else hidden, targets, lz_part, zy_part, zsum_part, mx_part, T, V, D,
        v_per_split, float(softcap or 1.0), HAS_BIAS=bias is not None, SOFTCAP=bool(softcap),
        BLOCK_T=BT, BLOCK_V=BV, BLOCK_D=BD, DOT_PREC=_prec(hidden.dtype), UPCAST=upcast_bf16(hidden.dtype),
        num_warps=nw, num_stages=ns)


def forward_splits(T: int, V: int, D: int, dtype: torch.dtype, device: torch.device):
    """(n_splits, v_per_split) that :func:`linear_cross_entropy_forward` expects for this call."""
    BT, BV, _, _, _ = _config("fwd", D, dtype)
    n = _n_splits(T, V, BT, BV, device)
    per = triton.cdiv(triton.cdiv(V, BV), n) * BV
    return triton.cdiv(V, per), per


def linear_cross_entropy_backward(hidden, weight, bias, targets, lse, g, dh, dw, db, softcap: float,
                                  label_smoothing: float) -> None:
    """Gradients into preallocated fp32 buffers (each fully written): dh (T, D) or None, dw (V, D) or
    None, db (V,) or None (only with a bias, and only together with dw). ``lse`` (T,) fp32 from the
    forward; ``g`` (T,) fp32 upstream gradient per token, 0 at ignored tokens."""
    T, D = hidden.shape
    V = weight.shape[0]
    b = bias if bias is not None else hidden
    c = float(softcap or 1.0)
    inv_v, ome = 1.0 / V, 1.0 - float(label_smoothing)

    def common(kernel):
        BT, BV, BD, nw, ns = _config(kernel, D, hidden.dtype)
        return (BT, BV), dict(HAS_BIAS=bias is not None, SOFTCAP=bool(softcap), BLOCK_T=BT, BLOCK_V=BV, BLOCK_D=BD,
                              DOT_PREC=_prec(hidden.dtype), UPCAST=upcast_bf16(hidden.dtype), num_warps=nw,
                              num_stages=ns)

    if dh is not None and T > 0:
        (BT, _), kw = common("bwd")
        _linear_cross_entropy_bwd_kernel[(triton.cdiv(T, BT),)](hidden, weight, b, targets, lse, g, dh, T, V, D, c,
                                                               inv_v, ome, **kw)
    if dw is not None:
        if T == 0:
            dw.zero_()
            if db is not None:
                db.zero_()
            return
        (_, BV), kw = common("bwd_weight")
        _linear_cross_entropy_bwd_weight_kernel[(triton.cdiv(V, BV),)](
            hidden, weight, b, targets, lse, g, dw, db if db is not None else dw, T, V, D, c, inv_v, ome, **kw)


# ----------------------------------------------------------------------------------------------- AOT
_KERNELS = {"fwd": _linear_cross_entropy_fwd_kernel, "bwd": _linear_cross_entropy_bwd_kernel,
            "bwd_weight": _linear_cross_entropy_bwd_weight_kernel}


def aot_spec(kernel: str, dt: str, softcap: bool, config=None):
    """The AOT compile spec of one kernel ('fwd', 'bwd', 'bwd_weight') for dtype ``dt`` ('fp32', 'bf16',
    'fp16') with the launch configuration of :data:`CONFIGS` (or ``config``)."""
    BT, BV, BD, nw, ns = config or CONFIGS[kernel][dt]
    const = {"HAS_BIAS": True, "SOFTCAP": softcap, "BLOCK_T": BT, "BLOCK_V": BV, "BLOCK_D": BD,
             "DOT_PREC": "ieee" if dt == "fp32" else "tf32", "UPCAST": False}
    sig = {"h_ptr": f"*{dt}", "w_ptr": f"*{dt}", "b_ptr": f"*{dt}", "y_ptr": "*i64"}
    if kernel == "fwd":
        sig.update(lz_ptr="*fp32", zy_ptr="*fp32", zsum_ptr="*fp32", mx_ptr="*fp32", T="i32", V="i32", D="i32",
                   V_PER_SPLIT="i32", softcap="fp32")
    elif kernel == "bwd":
        sig.update(lse_ptr="*fp32", g_ptr="*fp32", dh_ptr="*fp32", T="i32", V="i32", D="i32", softcap="fp32",
                   inv_v="fp32", one_minus_eps="fp32")
    else:
        sig.update(lse_ptr="*fp32", g_ptr="*fp32", dw_ptr="*fp32", db_ptr="*fp32", T="i32", V="i32", D="i32",
                   softcap="fp32", inv_v="fp32", one_minus_eps="fp32")
    sig.update({k: "constexpr" for k in const})
    return dict(name=f"lce_{kernel}_{dt}_softcap{int(softcap)}", kernel=_KERNELS[kernel], signature=sig,
                constexprs=const, num_warps=nw, num_stages=ns)


AOT_SPECS = [aot_spec(k, dt, sc) for dt in ("fp32", "bf16", "fp16") for sc in (False, True) for k in _KERNELS]
