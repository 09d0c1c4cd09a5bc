"""Triton region-pooled cross-attention: pool + attend in one kernel, forward and deterministic backward.

Math (see gkcore/reference/region_attention.py): region keys/values ``Kr = W @ k``, ``Vr = W @ v`` with
the RoIAlign pooling matrix ``W`` (R, N) of the boxes; ``out = softmax(scale * q [Kr; k]^T) [Vr; v]``
with masked regions left out and fully masked rows returning 0.

Pooling weights on chip. RoIAlign's bilinear weights factor over the two axes: a sample at (y, x) puts
``wy(row) * wx(col)`` on the four corners, it is valid iff y and x each lie in [-1, G], and the bins and
the samples form a full (OH * gy) x (OW * gx) product grid. So, for region r and patch n = (row, col),

    W[r, n] = Y[r, row] * X[r, col] / (gy * gx * OH * OW),
    Y[r, row] = sum over the OH * gy sample rows of (hy [row == y_low] + ly [row == y_high]) * valid_y,

and likewise X. ``_pool_weights`` evaluates a (BLOCK_R, BLOCK_N) tile of ``W`` from the boxes with a few
vector compares per sample row and column (no memory traffic besides the boxes), with exactly the
clamping rules of gkcore/reference/region_pool.py.

Forward (``_region_attention_fwd_kernel``), one program per (batch * head, block of queries):

* For each block of ``BLOCK_R`` regions, ``Kr``/``Vr`` tiles (BLOCK_R, d) are accumulated in fp32 as
  ``W_tile @ k_tile`` over blocks of ``BLOCK_NP`` patches (coalesced tile loads, tensor-core products).
  fp16/bf16 inputs: ``W = W_hi + W_lo`` split into two input-dtype tiles (about 16 mantissa bits in
  all, more than the reference's pooling matrix rounded to the input dtype) times the exact k, v tiles;
  fp32 inputs: 3-pass tf32 (``tf32x3``, fp32 accuracy) for every product. Region keys and values never
  touch global memory.
* Scores ``q Kr^T`` (rounded to the input dtype like the reference's pooled keys), masked regions set to
  -inf, online softmax in base 2; then, with ``ATTEND_PATCHES``, the N patch keys in blocks of
  ``BLOCK_N`` as in flash attention.
* Stores ``out`` and the log-sum-exp (base 2; ``+inf`` for fully masked rows so that the backward's
  probabilities are exactly 0); with ``WRITE_W`` the normalised weights (B, H, P, R [+ N]).

Backward (``_region_attention_bwd_kernel``), one program per (batch, head), everything recomputed
(``W^T dKr`` in tf32 for fp16/bf16 inputs, tf32x3 for fp32):

1. Regions: for each region block, rebuild ``Kr``/``Vr`` on chip, accumulate the region-key gradients
   ``dKr``, ``dVr`` (BLOCK_R, d) over the query blocks (dq accumulates in an fp32 buffer), and park them
   in a small fp32 scratch (B, H, R, d) owned by this program.
2. Patches: for each block of ``BLOCK_N`` patches, the flash-attention backward over the query blocks
   (with ``ATTEND_PATCHES``) plus the pooling transpose ``W_tile^T @ dKr`` for every region block,
   accumulated in registers and stored once.

Determinism by construction: every gradient element is owned by exactly one program (dk, dv and dq of a
(b, h) by the program of that (b, h)); each is a sum in a fixed order (fixed loop orders; the pooling
transpose is a matrix product over the regions, not a scatter), and there are no atomics. So the same
inputs give bitwise identical gradients on every run. Shared queries (H, P, d) are read with a batch
stride of 0 (no copy); their gradient is the per-batch fp32 gradient summed over the batch by a
deterministic reduction.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import upcast_bf16
from .region_pool import roi_box

LOG2E = 1.4426950408889634


@triton.jit
def _mm(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """``tl.dot`` of operands already rounded to the input dtype. ``UPCAST`` (set only under the Triton
    interpreter for bf16, whose interpreted bf16 dot is wrong in triton 3.8) multiplies the same bf16
    values in fp32, which is what the tensor cores compute (fp32 accumulation)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _axis_weights(start, binsz, g, G, NB, MAXG, idx):
    """(BLOCK_R, BLOCK_N) one-axis bilinear weights: sum over the NB * g sample positions of region r
    (start + p * binsz + (i + 0.5) * binsz / g) of the weights on grid line ``idx[n]``."""
    gf = tl.maximum(g, 1).to(tl.float32)
    acc = tl.zeros([start.shape[0], idx.shape[0]], dtype=tl.float32)
    for j in range(0, NB * MAXG):
        p = j // MAXG
        i = j % MAXG
        c = start + p * binsz + (i + 0.5) * binsz / gf
        valid = (c >= -1.0) & (c <= G) & (i < g)
        c = tl.maximum(c, 0.0)
        lo = tl.minimum(c.to(tl.int32), G - 1)
        c = tl.where(lo >= G - 1, lo.to(tl.float32), c)
        hi = tl.minimum(lo + 1, G - 1)
        lw = tl.where(valid, c - lo.to(tl.float32), 0.0)
        hw = tl.where(valid, 1.0 - (c - lo.to(tl.float32)), 0.0)
        acc += tl.where(lo[:, None] == idx[None, :], hw[:, None], 0.0)
        acc += tl.where(hi[:, None] == idx[None, :], lw[:, None], 0.0)
    return acc


@triton.jit
def _pool_weights(box_base, offs_r, rmask, offs_n, GH, GW, OH, OW, SAMPLING_RATIO, ALIGNED: tl.constexpr):
    """(BLOCK_R, BLOCK_N) fp32 tile of the RoIAlign pooling matrix W (bins averaged) for regions
    ``offs_r`` (rows with ``rmask`` False are zero) and patches ``offs_n`` (columns past N are zero)."""
    x0 = tl.load(box_base + offs_r * 4 + 0, mask=rmask, other=0.0).to(tl.float32)
    y0 = tl.load(box_base + offs_r * 4 + 1, mask=rmask, other=0.0).to(tl.float32)
    x1 = tl.load(box_base + offs_r * 4 + 2, mask=rmask, other=0.0).to(tl.float32)
    y1 = tl.load(box_base + offs_r * 4 + 3, mask=rmask, other=0.0).to(tl.float32)
    sx, sy, rw, rh, bw, bh = roi_box(x0, y0, x1, y1, GH, GW, OH, OW, ALIGNED)
    sr = tl.zeros_like(offs_r) + SAMPLING_RATIO
    gy = tl.where(sr > 0, sr, tl.ceil(rh / OH).to(tl.int32))
    gx = tl.where(sr > 0, sr, tl.ceil(rw / OW).to(tl.int32))
    gy = tl.where(rmask, gy, 0)
    gx = tl.where(rmask, gx, 0)
    scale = 1.0 / (tl.maximum(gy * gx, 1).to(tl.float32) * (OH * OW))
    row = offs_n // GW
    col = offs_n % GW
    row = tl.where(offs_n < GH * GW, row, -1)  # padding columns match no grid line
    wy = _axis_weights(sy, bh, gy, GH, OH, tl.max(gy, axis=0), row)
    wx = _axis_weights(sx, bw, gx, GW, OW, tl.max(gx, axis=0), col)
    return wy * wx * scale[:, None]


@triton.jit
def _region_kv(k_base, v_base, box_base, r0, R, N, GH, GW, OH, OW, SAMPLING_RATIO, skn, skd, svn, svd,
               offs_d, dmask, ALIGNED: tl.constexpr, PREC: tl.constexpr, PREC32: tl.constexpr,
               UPCAST: tl.constexpr, SPLIT_W: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_D: tl.constexpr):
    """Pooled key and value tiles (BLOCK_R, BLOCK_D) fp32 of regions r0 .. r0 + BLOCK_R - 1 (rows past R
    are zero): ``W_tile @ k_tile`` accumulated over the patch blocks."""
    offs_r = r0 + tl.arange(0, BLOCK_R)
    rmask = offs_r < R
    rk = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    rv = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        lm = (offs_n < N)[:, None] & dmask[None, :]
        w = _pool_weights(box_base, offs_r, rmask, offs_n, GH, GW, OH, OW, SAMPLING_RATIO, ALIGNED)
        kt = tl.load(k_base + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=lm, other=0.0)
        vt = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=lm, other=0.0)
        if SPLIT_W:
            # half inputs: W = W_hi + W_lo, both in the input dtype (about 16 mantissa bits together),
            # times the exact k and v tiles on the tensor cores with fp32 accumulation
            w_hi = w.to(kt.dtype)
            w_lo = (w - w_hi.to(tl.float32)).to(kt.dtype)
            rk += _mm(w_hi, kt, PREC, UPCAST) + _mm(w_lo, kt, PREC, UPCAST)
            rv += _mm(w_hi, vt, PREC, UPCAST) + _mm(w_lo, vt, PREC, UPCAST)
        else:
            rk += tl.dot(w, kt.to(tl.float32), input_precision=PREC32)
            rv += tl.dot(w, vt.to(tl.float32), input_precision=PREC32)
    return rk, rv


@triton.jit
def _region_valid(mask_ptr, b, r0, R, HAS_MASK: tl.constexpr, BLOCK_R: tl.constexpr):
    offs_r = r0 + tl.arange(0, BLOCK_R)
    valid = offs_r < R
    if HAS_MASK:
        mv = tl.load(mask_ptr + b * R + offs_r, mask=valid, other=0)
        valid = valid & (mv != 0)
    return valid


@triton.jit
def _region_attention_fwd_kernel(q_ptr, k_ptr, v_ptr, box_ptr, mask_ptr, o_ptr, lse_ptr, w_ptr,
                                 H, P, N, R, GH, GW, D, OH, OW, SAMPLING_RATIO, qk_scale,
                                 sqb, sqh, sqp, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                                 HAS_MASK: tl.constexpr, ATTEND_PATCHES: tl.constexpr, ALIGNED: tl.constexpr,
                                 WRITE_W: tl.constexpr, PREC: tl.constexpr, PREC32: tl.constexpr,
                                 UPCAST: tl.constexpr, SPLIT_W: tl.constexpr, BLOCK_P: tl.constexpr,
                                 BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_NP: tl.constexpr,
                                 BLOCK_D: tl.constexpr):
    # one flat axis (no 65535 limit); the query blocks of one (b, h) are neighbours, sharing k, v in L2
    n_pb = tl.cdiv(P, BLOCK_P)
    pid = tl.program_id(0)
    bh = pid // n_pb
    pid_p = pid % n_pb
    b = bh // H
    h = bh % H
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = offs_p < P
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    q_base = q_ptr + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    q = tl.load(q_base + offs_p[:, None] * sqp + offs_d[None, :] * sqd, mask=pmask[:, None] & dmask[None, :],
                other=0.0)
    k_base = k_ptr + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    v_base = v_ptr + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    box_base = box_ptr + b.to(tl.int64) * R * 4
    if ATTEND_PATCHES:
        L = R + N
    else:
        L = R
    w_base = w_ptr + bh.to(tl.int64) * P * L
    m_i = tl.full([BLOCK_P], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_P], dtype=tl.float32)
    acc = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rk, rv = _region_kv(k_base, v_base, box_base, r0, R, N, GH, GW, OH, OW, SAMPLING_RATIO, skn, skd, svn, svd,
                            offs_d, dmask, ALIGNED, PREC, PREC32, UPCAST, SPLIT_W, BLOCK_R, BLOCK_NP, BLOCK_D)
        s = _mm(q, tl.trans(rk.to(q.dtype)), PREC, UPCAST) * qk_scale
        valid = _region_valid(mask_ptr, b, r0, R, HAS_MASK, BLOCK_R)
        s = tl.where(valid[None, :], s, float("-inf"))
        if WRITE_W:
            offs_r = r0 + tl.arange(0, BLOCK_R)
            tl.store(w_base + offs_p[:, None] * L + offs_r[None, :], s, mask=pmask[:, None] & (offs_r < R)[None, :])
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _mm(p.to(q.dtype), rv.to(q.dtype), PREC, UPCAST)
        m_i = m_new
    if ATTEND_PATCHES:
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            nmask = offs_n < N
            lm = nmask[:, None] & dmask[None, :]
            kt = tl.load(k_base + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=lm, other=0.0)
            vt = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=lm, other=0.0)
            s = _mm(q, tl.trans(kt), PREC, UPCAST) * qk_scale
            s = tl.where(nmask[None, :], s, float("-inf"))
            if WRITE_W:
                tl.store(w_base + offs_p[:, None] * L + (R + offs_n)[None, :], s,
                         mask=pmask[:, None] & nmask[None, :])
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + _mm(p.to(q.dtype), vt, PREC, UPCAST)
            m_i = m_new
    safe = l_i > 0.0
    out = acc / tl.where(safe, l_i, 1.0)[:, None]
    out = tl.where(safe[:, None], out, 0.0)
    lse = tl.where(safe, m_i + tl.log2(tl.where(safe, l_i, 1.0)), float("inf"))
    o_base = o_ptr + bh.to(tl.int64) * P * D
    tl.store(o_base + offs_p[:, None] * D + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=pmask[:, None] & dmask[None, :])
    tl.store(lse_ptr + bh.to(tl.int64) * P + offs_p, lse, mask=pmask)
    if WRITE_W:
        # the raw scores were parked in w; normalise them in place (same program, same layout)
        tl.debug_barrier()
        for j0 in range(0, L, BLOCK_N):
            offs_j = j0 + tl.arange(0, BLOCK_N)
            wm = pmask[:, None] & (offs_j < L)[None, :]
            ptrs = w_base + offs_p[:, None] * L + offs_j[None, :]
            s = tl.load(ptrs, mask=wm, other=float("-inf"))
            tl.store(ptrs, tl.exp2(s - lse[:, None]), mask=wm)


@triton.jit
def _kv_block_bwd(kt, vt, kvalid, q_base, do_base, dq_base, lse_ptr, delta_ptr, st_base, P, D, sqp, sqd,
                  offs_d, dmask, qk_scale, sm_scale, PREC: tl.constexpr, UPCAST: tl.constexpr,
                  BLOCK_P: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_D: tl.constexpr):
    """Flash-attention backward of one block of keys ``kt`` / values ``vt`` (BLOCK_KV, BLOCK_D) against every
    query block, in a fixed order: adds this block's share to dq in place and returns (dk / sm_scale, dv)
    as fp32 tiles. Serves both the pooled region keys and the patch keys."""
    dk = tl.zeros([BLOCK_KV, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_KV, BLOCK_D], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        pmask = offs_p < P
        qm = pmask[:, None] & dmask[None, :]
        q = tl.load(q_base + offs_p[:, None] * sqp + offs_d[None, :] * sqd, mask=qm, other=0.0)
        do = tl.load(do_base + offs_p[:, None] * D + offs_d[None, :], mask=qm, other=0.0)
        lse = tl.load(lse_ptr + st_base + offs_p, mask=pmask, other=float("inf"))
        delta = tl.load(delta_ptr + st_base + offs_p, mask=pmask, other=0.0)
        s = _mm(q, tl.trans(kt), PREC, UPCAST) * qk_scale
        p = tl.exp2(s - lse[:, None])
        p = tl.where(kvalid[None, :], p, 0.0)
        dv += _mm(tl.trans(p.to(q.dtype)), do, PREC, UPCAST)
        dp = _mm(do, tl.trans(vt), PREC, UPCAST)
        ds = p * (dp - delta[:, None])
        dk += _mm(tl.trans(ds.to(q.dtype)), q, PREC, UPCAST)
        dq_ptrs = dq_base + offs_p[:, None] * D + offs_d[None, :]
        dq = tl.load(dq_ptrs, mask=qm, other=0.0)
        dq += _mm(ds.to(q.dtype), kt, PREC, UPCAST) * sm_scale
        tl.store(dq_ptrs, dq, mask=qm)
    return dk, dv


@triton.jit
def _region_attention_bwd_kernel(q_ptr, k_ptr, v_ptr, box_ptr, mask_ptr, do_ptr, lse_ptr, delta_ptr,
                                 dq_ptr, dk_ptr, dv_ptr, drk_ptr, drv_ptr,
                                 H, P, N, R, GH, GW, D, OH, OW, SAMPLING_RATIO, qk_scale, sm_scale,
                                 sqb, sqh, sqp, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                                 HAS_MASK: tl.constexpr, ATTEND_PATCHES: tl.constexpr, ALIGNED: tl.constexpr,
                                 PREC: tl.constexpr, PREC32: tl.constexpr, UPCAST: tl.constexpr,
                                 SPLIT_W: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr,
                                 BLOCK_N: tl.constexpr, BLOCK_NP: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per (b, h); see the module docstring for the fixed accumulation order.
    do (contiguous, input dtype), dq (fp32, zero-initialised) (B, H, P, D); dk, dv (input dtype) (B, H, N, D);
    drk, drv (fp32 scratch) (B, H, R, D); lse, delta (B, H, P) fp32."""
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    q_base = q_ptr + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    k_base = k_ptr + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    v_base = v_ptr + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    box_base = box_ptr + b.to(tl.int64) * R * 4
    do_base = do_ptr + bh.to(tl.int64) * P * D
    dq_base = dq_ptr + bh.to(tl.int64) * P * D
    dk_base = dk_ptr + bh.to(tl.int64) * N * D
    dv_base = dv_ptr + bh.to(tl.int64) * N * D
    drk_base = drk_ptr + bh.to(tl.int64) * R * D
    drv_base = drv_ptr + bh.to(tl.int64) * R * D
    st_base = bh.to(tl.int64) * P

    # ---- 1. regions: dKr, dVr on chip (and their dq), parked in this program's scratch
    for r0 in range(0, R, BLOCK_R):
        rk, rv = _region_kv(k_base, v_base, box_base, r0, R, N, GH, GW, OH, OW, SAMPLING_RATIO, skn, skd, svn, svd,
                            offs_d, dmask, ALIGNED, PREC, PREC32, UPCAST, SPLIT_W, BLOCK_R, BLOCK_NP, BLOCK_D)
        rk = rk.to(q_ptr.dtype.element_ty)
        rv = rv.to(q_ptr.dtype.element_ty)
        valid = _region_valid(mask_ptr, b, r0, R, HAS_MASK, BLOCK_R)
        drk, drv = _kv_block_bwd(rk, rv, valid, q_base, do_base, dq_base, lse_ptr, delta_ptr, st_base, P, D, sqp,
                                 sqd, offs_d, dmask, qk_scale, sm_scale, PREC, UPCAST, BLOCK_P, BLOCK_R, BLOCK_D)
        offs_r = r0 + tl.arange(0, BLOCK_R)
        rm = (offs_r < R)[:, None] & dmask[None, :]
        tl.store(drk_base + offs_r[:, None] * D + offs_d[None, :], drk * sm_scale, mask=rm)
        tl.store(drv_base + offs_r[:, None] * D + offs_d[None, :], drv, mask=rm)
    tl.debug_barrier()

    # ---- 2. patches: flash-attention backward per key block + the pooling transpose W^T dKr
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
        lm = nmask[:, None] & dmask[None, :]
        dk_acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv_acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        if ATTEND_PATCHES:
            kt = tl.load(k_base + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=lm, other=0.0)
            vt = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=lm, other=0.0)
            dk_acc, dv_acc = _kv_block_bwd(kt, vt, nmask, q_base, do_base, dq_base, lse_ptr, delta_ptr, st_base, P,
                                           D, sqp, sqd, offs_d, dmask, qk_scale, sm_scale, PREC, UPCAST, BLOCK_P,
                                           BLOCK_N, BLOCK_D)
            dk_acc = dk_acc * sm_scale
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            rmask = offs_r < R
            w = _pool_weights(box_base, offs_r, rmask, offs_n, GH, GW, OH, OW, SAMPLING_RATIO, ALIGNED)
            rm = rmask[:, None] & dmask[None, :]
            gk = tl.load(drk_base + offs_r[:, None] * D + offs_d[None, :], mask=rm, other=0.0)
            gv = tl.load(drv_base + offs_r[:, None] * D + offs_d[None, :], mask=rm, other=0.0)
            wt = tl.trans(w)
            dk_acc += tl.dot(wt, gk, input_precision=PREC32)
            dv_acc += tl.dot(wt, gv, input_precision=PREC32)
        tl.store(dk_base + offs_n[:, None] * D + offs_d[None, :], dk_acc.to(dk_ptr.dtype.element_ty), mask=lm)
        tl.store(dv_base + offs_n[:, None] * D + offs_d[None, :], dv_acc.to(dv_ptr.dtype.element_ty), mask=lm)


# ------------------------------------------------------------------------------------------ launchers
def _fwd_config(P: int, R: int, D: int, fp32: bool = False):
    """Block sizes (constexprs) and warps of the forward (fp32 inputs: 3-pass tf32 products, which need
    twice the registers, so twice the warps or half the query block)."""
    BLOCK_D = max(16, triton.next_power_of_2(D))
    cfg = dict(BLOCK_P=max(16, min(32 if fp32 else 64, triton.next_power_of_2(max(P, 1)))),
               BLOCK_R=16 if fp32 else max(16, min(32, triton.next_power_of_2(max(R, 1)))),
               BLOCK_N=64 if BLOCK_D <= 64 else 32, BLOCK_NP=32, BLOCK_D=BLOCK_D)
    return cfg, (4 if cfg["BLOCK_P"] * BLOCK_D <= 32 * 64 and not fp32 else 8)


#: software-pipelining depth of the backward's loops (more stages spill registers on sm_80)
BWD_STAGES = 2


#: widest fp32 head the triton backend serves (wider fp32 heads fall back to the reference)
MAX_FP32_HEAD_DIM = 64


def _bwd_config(P: int, R: int, D: int, fp32: bool = False):
    """Block sizes (constexprs) and warps of the backward."""
    BLOCK_D = max(16, triton.next_power_of_2(D))
    # fp32 inputs: 3-pass tf32 products need about twice the registers, so smaller region/patch tiles
    cfg = dict(BLOCK_P=16, BLOCK_R=16 if fp32 else max(16, min(32, triton.next_power_of_2(max(R, 1)))),
               BLOCK_N=16 if fp32 else 32, BLOCK_NP=32, BLOCK_D=BLOCK_D)
    return cfg, (4 if BLOCK_D <= 64 else 8)


def _dtype_config(dtype: torch.dtype, upcast: bool = None):
    """PREC (products of input-dtype tiles), PREC32 (products of fp32 tiles), UPCAST (default: under the
    interpreter for bf16), SPLIT_W."""
    if dtype == torch.float32:
        return dict(PREC="tf32x3", PREC32="tf32x3", UPCAST=False, SPLIT_W=False)
    return dict(PREC="tf32", PREC32="tf32", UPCAST=upcast_bf16(dtype) if upcast is None else upcast, SPLIT_W=True)


def _q_strides(q: torch.Tensor):
    if q.dim() == 3:  # shared (H, P, d): batch stride 0, no copy
        return (0,) + tuple(q.stride())
    return tuple(q.stride())


def region_attention_forward(q, k, v, boxes, mask, out, lse, weights, gh, gw, attend_patches, output_size,
                             sampling_ratio, aligned, scale):
    """q (B, H, P, d) or (H, P, d), any strides; k, v (B, H, N, d) any strides; boxes (B, R, 4) float32
    contiguous; mask (B, R) int8 contiguous or None; out (B, H, P, d), lse (B, H, P) fp32 and weights
    (B, H, P, R [+ N]) fp32 (or None) contiguous, preallocated and fully written."""
    B, H, N, D = k.shape
    P = q.shape[-2]
    R = boxes.shape[1]
    if B * H * P == 0:
        return out
    cfg, num_warps = _fwd_config(P, R, D, q.dtype == torch.float32)
    grid = (B * H * triton.cdiv(P, cfg["BLOCK_P"]),)
    _region_attention_fwd_kernel[grid](
        q, k, v, boxes, mask if mask is not None else boxes, out, lse, weights if weights is not None else lse,
        H, P, N, R, gh, gw, D, output_size, output_size, sampling_ratio, float(scale) * LOG2E,
        *_q_strides(q), *k.stride(), *v.stride(),
        HAS_MASK=mask is not None, ATTEND_PATCHES=bool(attend_patches), ALIGNED=bool(aligned),
        WRITE_W=weights is not None, **_dtype_config(q.dtype), **cfg, num_warps=num_warps)
    return out


def region_attention_backward(do, q, k, v, boxes, mask, lse, delta, dq32, dk, dv, gh, gw, attend_patches,
                              output_size, sampling_ratio, aligned, scale):
    """do (B, H, P, d) contiguous in the input dtype; lse, delta (B, H, P) fp32 contiguous; dq32
    (B, H, P, d) fp32 zeros (accumulated); dk, dv (B, H, N, d) contiguous in the input dtype, fully
    written. Uses an fp32 scratch of 2 * B * H * R * d for the region-key gradients."""
    B, H, N, D = k.shape
    P = q.shape[-2]
    R = boxes.shape[1]
    if B * H == 0:
        return
    cfg, num_warps = _bwd_config(P, R, D, q.dtype == torch.float32)
    drk = torch.empty((B, H, R, D), dtype=torch.float32, device=k.device)
    drv = torch.empty((B, H, R, D), dtype=torch.float32, device=k.device)
    _region_attention_bwd_kernel[(B * H,)](
        q, k, v, boxes, mask if mask is not None else boxes, do, lse, delta, dq32, dk, dv, drk, drv,
        H, P, N, R, gh, gw, D, output_size, output_size, sampling_ratio, float(scale) * LOG2E, float(scale),
        *_q_strides(q), *k.stride(), *v.stride(),
        HAS_MASK=mask is not None, ATTEND_PATCHES=bool(attend_patches), ALIGNED=bool(aligned),
        **_dtype_config(q.dtype), **cfg, num_warps=num_warps, num_stages=BWD_STAGES)


# ------------------------------------------------------------------------------------------ AOT
_TORCH_DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _aot_specs():
    """Forward and backward with the launchers' blocks for P=75, R=29: bf16 and fp16 at head dim 64 (the
    target shape of docs/performance.md), bf16 at 128 (the largest supported), fp32 at 64 (the largest fp32 head the backend
    serves: the 3-pass tf32 backward of wider fp32 heads would spill registers); plus GKFusion's forward
    (regions only, writing the attention maps)."""
    specs = []
    ints = ["H", "P", "N", "R", "GH", "GW", "D", "OH", "OW", "SAMPLING_RATIO"]
    strides = ["sqb", "sqh", "sqp", "skb", "skh", "skn", "svb", "svh", "svn"]
    # The launch specialises unit strides (Triton's default for ints equal to 1): the common contiguous
    # head dimension is compiled with constant stride 1, as here.
    unit = {"sqd": 1, "skd": 1, "svd": 1}
    for dt, D in (("bf16", 64), ("fp16", 64), ("bf16", 128), ("fp32", 64)):
        dcfg = _dtype_config(_TORCH_DT[dt], upcast=False)
        cfg, nw = _fwd_config(75, 29, D, dt == "fp32")
        sig = {"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "v_ptr": f"*{dt}", "box_ptr": "*fp32", "mask_ptr": "*i8",
               "o_ptr": f"*{dt}", "lse_ptr": "*fp32", "w_ptr": "*fp32"}
        sig.update({n: "i32" for n in ints})
        sig["qk_scale"] = "fp32"
        sig.update({n: "i32" for n in strides})
        const = {"HAS_MASK": True, "ATTEND_PATCHES": True, "ALIGNED": True, "WRITE_W": False, **dcfg, **cfg, **unit}
        sig.update({n: "constexpr" for n in const})
        specs.append(dict(name=f"region_attention_fwd_{dt}_d{D}", kernel=_region_attention_fwd_kernel,
                          signature=sig, constexprs=const, num_warps=nw))
        if dt == "bf16" and D == 64:  # GKFusion's call: regions only, with the attention maps
            specs.append(dict(name="region_attention_fwd_bf16_d64_weights", kernel=_region_attention_fwd_kernel,
                              signature=sig, constexprs={**const, "ATTEND_PATCHES": False, "WRITE_W": True},
                              num_warps=nw))
        cfg, nw = _bwd_config(75, 29, D, dt == "fp32")
        sig = {"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "v_ptr": f"*{dt}", "box_ptr": "*fp32", "mask_ptr": "*i8",
               "do_ptr": f"*{dt}", "lse_ptr": "*fp32", "delta_ptr": "*fp32", "dq_ptr": "*fp32",
               "dk_ptr": f"*{dt}", "dv_ptr": f"*{dt}", "drk_ptr": "*fp32", "drv_ptr": "*fp32"}
        sig.update({n: "i32" for n in ints})
        sig["qk_scale"] = "fp32"
        sig["sm_scale"] = "fp32"
        sig.update({n: "i32" for n in strides})
        const = {"HAS_MASK": True, "ATTEND_PATCHES": True, "ALIGNED": True, **dcfg, **cfg, **unit}
        sig.update({n: "constexpr" for n in const})
        specs.append(dict(name=f"region_attention_bwd_{dt}_d{D}", kernel=_region_attention_bwd_kernel,
                          signature=sig, constexprs=const, num_warps=nw, num_stages=BWD_STAGES))
    return specs


AOT_SPECS = _aot_specs()
