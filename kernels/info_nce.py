"""Triton info_nce (InfoNCE / contrastive cross-entropy) without materialising the (M, N) logits.

Notation (gkcore/reference/info_nce.py): ``s_ij = scale <q_i, k_j>``, ``p = softmax_j(s)``, soft targets
``p^m = softmax_j(scale <qm_i, k_j>)``, target ``t_ij = c_y y_ij + c_s p^m_ij + c_e`` with
``c_y = (1 - eps)(1 - alpha)``, ``c_s = (1 - eps) alpha``, ``c_e = eps / N``.

Forward (``_info_nce_fwd_kernel``): grid (query blocks, key splits). A program owns BLOCK_M query rows
(held on chip with the full feature row, BLOCK_D >= D) and one contiguous slice of the keys, which it walks
in BLOCK_N tiles: logits tile on chip (fp32 accumulation), online log-sum-exp (running max and scaled sum),
the hard-target term (index compare or bool-mask tile), the sum of logits (label smoothing) and, with soft
targets, a second online log-sum-exp of the momentum logits together with the running soft-target
weighted logit sum. It writes per-split partials (n_splits, M) which the launcher merges with a
log-sum-exp over the splits (a few dozen values per row). Only O(M) is stored.

Backward: the tiles are recomputed from the inputs and the saved log-sum-exp values.

* ``_info_nce_bwd_rows_kernel`` (grid: query blocks x key splits): ``A_i = sum_j (p_ij - t_ij) k_j`` for
  the program's key slice into a (n_splits, M, D) fp32 buffer (summed by the launcher in split order):
  the query (and scale) gradient is ``g_i scale A_i``.
* ``_info_nce_bwd_keys_kernel`` (grid: key blocks): ``C_j = sum_i g_i (p_ij - t_ij) q_i`` walking the query
  blocks in order; the keys' gradient is ``scale C_j``. Run only when the keys require grad (a queue
  needs none).

Every output element is written by one program in a fixed order: deterministic, no atomics. bf16/fp16
inputs keep full feature rows on chip (BLOCK_D >= D, up to 1024) and use tensor cores with fp32
accumulation (the probability tiles are cast to the input dtype for the gradient products, as in flash
attention). fp32 inputs use IEEE fp32 dot products (no TF32) streamed through BLOCK_DK-wide slices of D;
their gradient rows are accumulated by read-modify-write of the program's own fp32 output rows.
On a GPU the tile sizes are autotuned (key: M, N, D, dtype); ``AOT_SPECS`` lists the fixed builds
checked for sm_90a and sm_80 (no spills, shared memory within the limit).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import triton
import triton.language as tl

from . import interpreter_on, merge_lse_splits, upcast_bf16


@triton.jit
def _dot(a, b, acc, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b, fp32 accumulation. UPCAST (only under the Triton interpreter for bf16, whose
    interpreted bf16 dot is inexact) multiplies the exact fp32 images of the operands."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT_PREC)


@triton.jit
def _scores(a_ptr, a_full, offs_a, mask_a, b_ptr, offs_b, mask_b, D,
            BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DK: tl.constexpr,
            DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """(BLOCK_A, BLOCK_B) fp32 tile of <a_i, b_j>. With BLOCK_DK == BLOCK_D the rows of ``a`` are
    ``a_full`` (already on chip); otherwise both operands stream through BLOCK_DK-wide slices of D."""
    rows_b = offs_b.to(tl.int64)[:, None] * D
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    if BLOCK_DK == BLOCK_D:
        offs_d = tl.arange(0, BLOCK_D)
        b = tl.load(b_ptr + rows_b + offs_d[None, :], mask=mask_b[:, None] & (offs_d < D)[None, :], other=0.0)
        acc = _dot(a_full, tl.trans(b), acc, DOT_PREC, UPCAST)
    else:
        rows_a = offs_a.to(tl.int64)[:, None] * D
        for d0 in range(0, D, BLOCK_DK):
            offs_d = d0 + tl.arange(0, BLOCK_DK)
            md = (offs_d < D)[None, :]
            a = tl.load(a_ptr + rows_a + offs_d[None, :], mask=mask_a[:, None] & md, other=0.0)
            b = tl.load(b_ptr + rows_b + offs_d[None, :], mask=mask_b[:, None] & md, other=0.0)
            acc = _dot(a, tl.trans(b), acc, DOT_PREC, UPCAST)
    return acc


@triton.jit
def _load_rows(ptr, offs, mask, D, BLOCK_D: tl.constexpr, BLOCK_DK: tl.constexpr):
    """The (len(offs), BLOCK_D) rows on chip when the tile holds a full feature row, else a dummy."""
    if BLOCK_DK == BLOCK_D:
        offs_d = tl.arange(0, BLOCK_D)
        rows = tl.load(ptr + offs.to(tl.int64)[:, None] * D + offs_d[None, :],
                       mask=mask[:, None] & (offs_d < D)[None, :], other=0.0)
    else:
        rows = tl.zeros((1, 1), dtype=tl.float32)
    return rows


@triton.jit
def _acc_rows(acc, g, b_ptr, offs_b, mask_b, out_ptr, offs_o, mask_o, D,
              BLOCK_D: tl.constexpr, BLOCK_DK: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """acc + g @ b[offs_b] (g: (BLOCK_O, BLOCK_B) in b's dtype). Full-row tiles accumulate in registers;
    D-sliced tiles read-modify-write the program's own fp32 output rows (deterministic, no atomics)."""
    if BLOCK_DK == BLOCK_D:
        offs_d = tl.arange(0, BLOCK_D)
        b = tl.load(b_ptr + offs_b.to(tl.int64)[:, None] * D + offs_d[None, :],
                    mask=mask_b[:, None] & (offs_d < D)[None, :], other=0.0)
        acc = _dot(g, b, acc, DOT_PREC, UPCAST)
    else:
        for d0 in range(0, D, BLOCK_DK):
            offs_d = d0 + tl.arange(0, BLOCK_DK)
            md = (offs_d < D)[None, :]
            b = tl.load(b_ptr + offs_b.to(tl.int64)[:, None] * D + offs_d[None, :], mask=mask_b[:, None] & md,
                        other=0.0)
            ptrs = out_ptr + offs_o.to(tl.int64)[:, None] * D + offs_d[None, :]
            cur = tl.load(ptrs, mask=mask_o[:, None] & md, other=0.0)
            tl.store(ptrs, _dot(g, b, cur, DOT_PREC, UPCAST), mask=mask_o[:, None] & md)
    return acc


@triton.jit
def _zero_rows(out_ptr, offs_o, mask_o, D, BLOCK_O: tl.constexpr, BLOCK_DK: tl.constexpr):
    for d0 in range(0, D, BLOCK_DK):
        offs_d = d0 + tl.arange(0, BLOCK_DK)
        tl.store(out_ptr + offs_o.to(tl.int64)[:, None] * D + offs_d[None, :],
                 tl.zeros((BLOCK_O, BLOCK_DK), dtype=tl.float32), mask=mask_o[:, None] & (offs_d < D)[None, :])


@triton.jit
def _info_nce_fwd_kernel(q_ptr, k_ptr, qm_ptr, idx_ptr, mask_ptr, scale_ptr,
                         lz_p, mx_p, pos_p, cnt_p, ssum_p, lsem_p, soft_p,
                         M, N, D, N_PER_SPLIT,
                         SOFT: tl.constexpr, POS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_DK: tl.constexpr, DOT_PREC: tl.constexpr,
                         UPCAST: tl.constexpr):
    """Per-split partials, each (n_splits, M) fp32, row ``program_id(1)``: log-sum-exp as log z and the
    max m (apart, so that the host can form m - target before adding log z), hard-target logit sum,
    positive count (mask mode), logit sum, and with SOFT the soft log-sum-exp and the soft-target
    weighted mean logit of the split."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    q = _load_rows(q_ptr, offs_m, mask_m, D, BLOCK_D, BLOCK_DK)
    qm = q
    if SOFT:
        qm = _load_rows(qm_ptr, offs_m, mask_m, D, BLOCK_D, BLOCK_DK)
    scale = tl.load(scale_ptr).to(tl.float32)
    if not POS_MASK:
        idx = tl.load(idx_ptr + offs_m, mask=mask_m, other=-1)
    n_lo = pid_s * N_PER_SPLIT
    n_hi = tl.minimum(N, n_lo + N_PER_SPLIT)
    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    z = tl.zeros((BLOCK_M,), dtype=tl.float32)
    ssum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    pos = tl.zeros((BLOCK_M,), dtype=tl.float32)
    cnt = tl.zeros((BLOCK_M,), dtype=tl.float32)
    mm = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    zm = tl.zeros((BLOCK_M,), dtype=tl.float32)
    w = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_hi
        s = _scores(q_ptr, q, offs_m, mask_m, k_ptr, offs_n, mask_n, D, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DK,
                    DOT_PREC, UPCAST) * scale
        sv = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(sv, 1))
        z = z * tl.exp(m - m_new) + tl.sum(tl.exp(sv - m_new[:, None]), 1)
        m = m_new
        s0 = tl.where(mask_n[None, :], s, 0.0)
        ssum += tl.sum(s0, 1)
        if POS_MASK:
            mk = tl.load(mask_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :],
                         mask=mask_m[:, None] & mask_n[None, :], other=0)
            hit = mk != 0
            pos += tl.sum(tl.where(hit, s0, 0.0), 1)
            cnt += tl.sum(hit.to(tl.float32), 1)
        else:
            pos += tl.sum(tl.where(offs_n[None, :] == idx[:, None], s0, 0.0), 1)
        if SOFT:
            sm = _scores(qm_ptr, qm, offs_m, mask_m, k_ptr, offs_n, mask_n, D, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DK,
                         DOT_PREC, UPCAST) * scale
            smv = tl.where(mask_n[None, :], sm, float("-inf"))
            mm_new = tl.maximum(mm, tl.max(smv, 1))
            corr = tl.exp(mm - mm_new)
            e = tl.exp(smv - mm_new[:, None])
            zm = zm * corr + tl.sum(e, 1)
            w = w * corr + tl.sum(e * s0, 1)
            mm = mm_new
    out = pid_s.to(tl.int64) * M + offs_m
    tl.store(lz_p + out, tl.log(z), mask=mask_m)
    tl.store(mx_p + out, m, mask=mask_m)
    tl.store(pos_p + out, pos, mask=mask_m)
    tl.store(ssum_p + out, ssum, mask=mask_m)
    if POS_MASK:
        tl.store(cnt_p + out, cnt, mask=mask_m)
    if SOFT:
        tl.store(lsem_p + out, mm + tl.log(zm), mask=mask_m)
        tl.store(soft_p + out, w / zm, mask=mask_m)


@triton.jit
def _targets_tile(offs_m, mask_m, offs_n, mask_n, idx, inv_cnt, mask_ptr, N, c_y, c_e,
                  POS_MASK: tl.constexpr):
    """c_y y + c_e as a (BLOCK_M, BLOCK_N) fp32 tile (soft part added by the caller)."""
    if POS_MASK:
        mk = tl.load(mask_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :],
                     mask=mask_m[:, None] & mask_n[None, :], other=0)
        t = tl.where(mk != 0, c_y * inv_cnt[:, None], 0.0) + c_e
    else:
        t = tl.where(offs_n[None, :] == idx[:, None], c_y, 0.0) + c_e
    return t


@triton.jit
def _info_nce_bwd_rows_kernel(q_ptr, k_ptr, qm_ptr, idx_ptr, mask_ptr, invcnt_ptr, scale_ptr, lse_ptr, lsem_ptr,
                              a_ptr, M, N, D, N_PER_SPLIT, c_y, c_s, c_e,
                              SOFT: tl.constexpr, POS_MASK: tl.constexpr, BLOCK_M: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DK: tl.constexpr,
                              DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """A partial (n_splits, M, D) fp32, slice ``program_id(1)``: sum over the split's keys of (p - t) k."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    out_ptr = a_ptr + pid_s.to(tl.int64) * M * D
    q = _load_rows(q_ptr, offs_m, mask_m, D, BLOCK_D, BLOCK_DK)
    qm = q
    if SOFT:
        qm = _load_rows(qm_ptr, offs_m, mask_m, D, BLOCK_D, BLOCK_DK)
        lsem = tl.load(lsem_ptr + offs_m, mask=mask_m, other=0.0)
    scale = tl.load(scale_ptr).to(tl.float32)
    lse = tl.load(lse_ptr + offs_m, mask=mask_m, other=0.0)
    if POS_MASK:
        inv_cnt = tl.load(invcnt_ptr + offs_m, mask=mask_m, other=0.0)
        idx = offs_m
    else:
        idx = tl.load(idx_ptr + offs_m, mask=mask_m, other=-1)
        inv_cnt = lse
    if BLOCK_DK != BLOCK_D:
        _zero_rows(out_ptr, offs_m, mask_m, D, BLOCK_M, BLOCK_DK)
    n_lo = pid_s * N_PER_SPLIT
    n_hi = tl.minimum(N, n_lo + N_PER_SPLIT)
    acc = tl.zeros((BLOCK_M, BLOCK_D if BLOCK_DK == BLOCK_D else 16), dtype=tl.float32)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_hi
        s = _scores(q_ptr, q, offs_m, mask_m, k_ptr, offs_n, mask_n, D, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DK,
                    DOT_PREC, UPCAST) * scale
        g = tl.exp(s - lse[:, None]) - _targets_tile(offs_m, mask_m, offs_n, mask_n, idx, inv_cnt, mask_ptr, N,
                                                      c_y, c_e, POS_MASK)
        if SOFT:
            sm = _scores(qm_ptr, qm, offs_m, mask_m, k_ptr, offs_n, mask_n, D, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DK,
                         DOT_PREC, UPCAST) * scale
            g -= c_s * tl.exp(sm - lsem[:, None])
        g = tl.where(mask_m[:, None] & mask_n[None, :], g, 0.0)
        acc = _acc_rows(acc, g.to(k_ptr.dtype.element_ty), k_ptr, offs_n, mask_n, out_ptr, offs_m, mask_m, D,
                        BLOCK_D, BLOCK_DK, DOT_PREC, UPCAST)
    if BLOCK_DK == BLOCK_D:
        offs_d = tl.arange(0, BLOCK_D)
        tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * D + offs_d[None, :], acc,
                 mask=mask_m[:, None] & (offs_d < D)[None, :])


@triton.jit
def _info_nce_bwd_keys_kernel(q_ptr, k_ptr, qm_ptr, idx_ptr, mask_ptr, invcnt_ptr, scale_ptr, lse_ptr, lsem_ptr,
                              g_ptr, c_ptr, M, N, D, c_y, c_s, c_e,
                              SOFT: tl.constexpr, POS_MASK: tl.constexpr, BLOCK_M: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DK: tl.constexpr,
                              DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """C (N, D) fp32 for BLOCK_N keys: sum over all queries (in block order) of g (p - t) q."""
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    scale = tl.load(scale_ptr).to(tl.float32)
    if BLOCK_DK != BLOCK_D:
        _zero_rows(c_ptr, offs_n, mask_n, D, BLOCK_N, BLOCK_DK)
    acc = tl.zeros((BLOCK_N, BLOCK_D if BLOCK_DK == BLOCK_D else 16), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        q = _load_rows(q_ptr, offs_m, mask_m, D, BLOCK_D, BLOCK_DK)
        lse = tl.load(lse_ptr + offs_m, mask=mask_m, other=0.0)
        gr = tl.load(g_ptr + offs_m, mask=mask_m, other=0.0)
        if POS_MASK:
            inv_cnt = tl.load(invcnt_ptr + offs_m, mask=mask_m, other=0.0)
            idx = offs_m
        else:
            idx = tl.load(idx_ptr + offs_m, mask=mask_m, other=-1)
            inv_cnt = lse
        s = _scores(q_ptr, q, offs_m, mask_m, k_ptr, offs_n, mask_n, D, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DK,
                    DOT_PREC, UPCAST) * scale
        g = tl.exp(s - lse[:, None]) - _targets_tile(offs_m, mask_m, offs_n, mask_n, idx, inv_cnt, mask_ptr, N,
                                                      c_y, c_e, POS_MASK)
        if SOFT:
            qm = _load_rows(qm_ptr, offs_m, mask_m, D, BLOCK_D, BLOCK_DK)
            lsem = tl.load(lsem_ptr + offs_m, mask=mask_m, other=0.0)
            sm = _scores(qm_ptr, qm, offs_m, mask_m, k_ptr, offs_n, mask_n, D, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DK,
                         DOT_PREC, UPCAST) * scale
            g -= c_s * tl.exp(sm - lsem[:, None])
        g = tl.where(mask_m[:, None] & mask_n[None, :], g * gr[:, None], 0.0)
        acc = _acc_rows(acc, tl.trans(g.to(q_ptr.dtype.element_ty)), q_ptr, offs_m, mask_m, c_ptr, offs_n, mask_n,
                        D, BLOCK_D, BLOCK_DK, DOT_PREC, UPCAST)
    if BLOCK_DK == BLOCK_D:
        offs_d = tl.arange(0, BLOCK_D)
        tl.store(c_ptr + offs_n.to(tl.int64)[:, None] * D + offs_d[None, :], acc,
                 mask=mask_n[:, None] & (offs_d < D)[None, :])


# ----------------------------------------------------------------------------------------------- launchers

#: fp32 inputs: IEEE fp32 dot products (FMA units), streamed through BLOCK_DK-wide slices of D
_FP32_PREC = "ieee"
_FP32_DK = 16


def _prec(dtype: torch.dtype) -> str:
    return _FP32_PREC if dtype == torch.float32 else "tf32"


def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def _block_dk(D: int, dtype: torch.dtype) -> int:
    """Full feature rows on chip for 16-bit inputs; D slices for fp32 (and under the interpreter, so
    that the tests cover both code paths: bf16/fp16 full rows, fp32 slices)."""
    bd = _block_d(D)
    if dtype == torch.float32:
        return min(bd, 16 if interpreter_on() else _FP32_DK)
    return bd


#: the largest BLOCK_N any config uses; key splits are multiples of it
_MAX_BN = 128


def _configs(kind: str, block_d: int, dtype: torch.dtype, soft: bool):
    """Autotune candidates, the spill-free AOT build first; smaller tiles as the feature row grows."""
    half = dtype != torch.float32
    cands = [_spec_blocks(kind, half, soft)[:3]]
    if not half:
        cands += [(32, 32, 4), (64, 32, 4), (32, 64, 4), (64, 64, 8)]
    elif block_d <= 128:
        cands += [(64, 64, 4), (64, 128, 8), (128, 64, 8), (64, 32, 4)]
    elif block_d <= 256:
        cands += [(32, 32, 4), (32, 64, 4), (64, 32, 8), (16, 32, 4)]
    else:
        cands = [(16, 32, 4), (32, 16, 4), (16, 16, 4), (32, 32, 8)]
    out, seen = [], set()
    for bm, bn, nw in cands:
        if kind == "keys" and block_d > 128 and half and bm * bn > 1024:
            continue
        for ns in (1, 2):
            if (bm, bn, nw, ns) in seen:
                continue
            seen.add((bm, bn, nw, ns))
            out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=nw, num_stages=ns))
    return out


_TUNED: Dict[tuple, object] = {}


def _tuned(kernel, kind: str, block_d: int, dtype: torch.dtype, soft: bool):
    key = (kind, block_d, dtype, soft)
    if key not in _TUNED:
        _TUNED[key] = triton.autotune(configs=_configs(kind, block_d, dtype, soft), key=["M", "N", "D"])(kernel)
    return _TUNED[key]


#: (BLOCK_M, BLOCK_N) under the interpreter: small tiles, so that tiny test shapes span several (partial) tiles
_INTERP_BLOCKS = (16, 16)


def _n_splits(M: int, N: int, device: torch.device) -> int:
    tiles = triton.cdiv(N, _MAX_BN)
    if interpreter_on() or device.type != "cuda":
        return min(2, triton.cdiv(N, 16))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(tiles, triton.cdiv(2 * sms, triton.cdiv(M, 64))))


def _split(M: int, N: int, device: torch.device):
    """(n_splits, keys per split): every split non-empty, a multiple of the largest BLOCK_N."""
    quantum = 16 if (interpreter_on() or device.type != "cuda") else _MAX_BN
    n = _n_splits(M, N, device)
    per = triton.cdiv(triton.cdiv(N, quantum), n) * quantum
    return triton.cdiv(N, per), per


def _coefs(N: int, alpha: float, eps: float):
    return (1.0 - eps) * (1.0 - alpha), (1.0 - eps) * alpha, eps / N


def _launch(kernel, kind, grid_fn, args, D, dtype, **const):
    BD = _block_d(D)
    const.update(BLOCK_D=BD, BLOCK_DK=_block_dk(D, dtype), DOT_PREC=_prec(dtype), UPCAST=upcast_bf16(dtype))
    if interpreter_on() or not torch.cuda.is_available():
        bm, bn = _INTERP_BLOCKS
        kernel[grid_fn({"BLOCK_M": bm, "BLOCK_N": bn})](*args, BLOCK_M=bm, BLOCK_N=bn, **const)
    else:
        _tuned(kernel, kind, BD, dtype, bool(const.get("SOFT")))[grid_fn](*args, **const)


def info_nce_forward(query: torch.Tensor, keys: torch.Tensor, soft_query: Optional[torch.Tensor],
                     idx: Optional[torch.Tensor], mask: Optional[torch.Tensor], scale: torch.Tensor, alpha: float,
                     eps: float, loss: torch.Tensor, lse: torch.Tensor, lse_m: Optional[torch.Tensor]) -> None:
    """query (M, D), keys (N, D), soft_query (M, D) or None: contiguous, one dtype; idx (M,) int64 or mask
    (M, N) bool (exactly one); scale 0-d tensor. Writes loss (M,), lse (M,) and lse_m (M,) (with
    soft_query), all fp32, every element."""
    M, D = query.shape
    N = keys.shape[0]
    if M == 0:
        return
    dev = query.device
    n, per = _split(M, N, dev)
    parts = [torch.empty((n, M), dtype=torch.float32, device=dev) for _ in range(7)]
    lz_p, mx_p, pos_p, cnt_p, ssum_p, lsem_p, soft_p = parts
    soft = soft_query is not None
    pm = mask is not None
    mask_u8 = mask.view(torch.uint8) if pm else query
    sc = scale.reshape(1).to(torch.float32)
    args = (query, keys, soft_query if soft else query, idx if not pm else query, mask_u8, sc,
            lz_p, mx_p, pos_p, cnt_p, ssum_p, lsem_p, soft_p, M, N, D, per)
    _launch(_info_nce_fwd_kernel, "fwd", lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), n), args, D, query.dtype,
            SOFT=soft, POS_MASK=pm)
    c_y, c_s, c_e = _coefs(N, alpha, eps)
    mx, lz = merge_lse_splits(lz_p, mx_p)  # the loss is lz + (mx - target)
    lse_all = mx + lz
    pos = pos_p.sum(0)
    if pm:
        cnt = cnt_p.sum(0)
        valid = cnt > 0
        pos = pos / cnt.clamp(min=1.0)
    else:
        valid = idx >= 0
    tsum = c_y * pos + eps * ssum_p.sum(0) / N
    if soft:
        lsem_all = torch.logsumexp(lsem_p, 0) if n > 1 else lsem_p[0]
        tsum = tsum + c_s * (torch.exp(lsem_p - lsem_all) * soft_p).sum(0)
        lse_m.copy_(lsem_all)
    lse.copy_(lse_all)
    loss.copy_(torch.where(valid, lz + (mx - tsum), torch.zeros_like(tsum)))


def _inv_count(mask: torch.Tensor) -> torch.Tensor:
    return 1.0 / mask.sum(dim=1, dtype=torch.float32).clamp(min=1.0)


def info_nce_backward(query, keys, soft_query, idx, mask, scale, alpha: float, eps: float, lse, lse_m, g,
                      A: Optional[torch.Tensor], C: Optional[torch.Tensor]) -> None:
    """Fills A (M, D) = sum_j (p - t) k_j and/or C (N, D) = sum_i g_i (p - t) q_i (fp32, each may be None).
    ``lse``, ``lse_m`` (M,) fp32 from the forward; ``g`` (M,) fp32, 0 at rows without a positive."""
    M, D = query.shape
    N = keys.shape[0]
    dev = query.device
    soft = soft_query is not None
    pm = mask is not None
    mask_u8 = mask.view(torch.uint8) if pm else query
    inv_cnt = _inv_count(mask) if pm else lse
    sc = scale.reshape(1).to(torch.float32)
    c_y, c_s, c_e = _coefs(N, alpha, eps)
    qm = soft_query if soft else query
    lm = lse_m if soft else lse
    ix = idx if not pm else query
    if A is not None:
        if M == 0:
            return
        n, per = _split(M, N, dev)
        part = A.view(1, M, D) if n == 1 else torch.empty((n, M, D), dtype=torch.float32, device=dev)
        args = (query, keys, qm, ix, mask_u8, inv_cnt, sc, lse, lm, part, M, N, D, per, c_y, c_s, c_e)
        _launch(_info_nce_bwd_rows_kernel, "rows", lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), n), args, D,
                query.dtype, SOFT=soft, POS_MASK=pm)
        if n > 1:
            torch.sum(part, dim=0, out=A)
    if C is not None:
        if M == 0:
            C.zero_()
            return
        args = (query, keys, qm, ix, mask_u8, inv_cnt, sc, lse, lm, g, C, M, N, D, c_y, c_s, c_e)
        _launch(_info_nce_bwd_keys_kernel, "keys", lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),), args, D,
                query.dtype, SOFT=soft, POS_MASK=pm)


# ----------------------------------------------------------------------------------------------- AOT
#: (BLOCK_M, BLOCK_N, num_warps) of the fixed AOT builds at BLOCK_D = 256, chosen spill-free on sm_90a
#: and sm_80; each is also an autotune candidate (see :func:`_configs`).
def _spec_blocks(kind: str, half: bool, soft: bool):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages or None for Triton's default)."""
    if not half:
        return (32, 32, 8, 2 if (kind == "keys" and soft) else 1)
    if kind == "fwd":
        return (64, 32, 8, None) if soft else (64, 64, 8, None)
    if kind == "rows":
        return (32, 32, 8, None)
    return (16, 32, 8, None) if soft else (32, 32, 8, None)


def _aot_specs():
    """Fixed builds at D = 256 (BLOCK_D = 256, the ITC feature size), checked for spills and shared memory."""
    specs = []
    for dt in ("fp32", "bf16", "fp16"):
        prec = _FP32_PREC if dt == "fp32" else "tf32"
        for soft in (False, True):
            for pm in (False, True):
                base = {"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "qm_ptr": f"*{dt}", "idx_ptr": "*i64",
                        "mask_ptr": "*u8"}
                tag = f"{dt}_soft{int(soft)}_mask{int(pm)}"
                for kind, kernel, extra in (
                        ("fwd", _info_nce_fwd_kernel,
                         dict(scale_ptr="*fp32", lz_p="*fp32", mx_p="*fp32", pos_p="*fp32", cnt_p="*fp32",
                              ssum_p="*fp32", lsem_p="*fp32", soft_p="*fp32", M="i32", N="i32", D="i32",
                              N_PER_SPLIT="i32")),
                        ("rows", _info_nce_bwd_rows_kernel,
                         dict(invcnt_ptr="*fp32", scale_ptr="*fp32", lse_ptr="*fp32", lsem_ptr="*fp32",
                              a_ptr="*fp32", M="i32", N="i32", D="i32", N_PER_SPLIT="i32", c_y="fp32",
                              c_s="fp32", c_e="fp32")),
                        ("keys", _info_nce_bwd_keys_kernel,
                         dict(invcnt_ptr="*fp32", scale_ptr="*fp32", lse_ptr="*fp32", lsem_ptr="*fp32",
                              g_ptr="*fp32", c_ptr="*fp32", M="i32", N="i32", D="i32", c_y="fp32", c_s="fp32",
                              c_e="fp32"))):
                    BM, BN, nw, ns = _spec_blocks(kind, dt != "fp32", soft)
                    const = {"SOFT": soft, "POS_MASK": pm, "BLOCK_M": BM, "BLOCK_N": BN, "BLOCK_D": 256,
                             "BLOCK_DK": 256 if dt != "fp32" else _FP32_DK, "DOT_PREC": prec, "UPCAST": False}
                    sig = dict(base, **extra, **{k: "constexpr" for k in const})
                    spec = dict(name=f"info_nce_{kind}_{tag}", kernel=kernel, signature=sig, constexprs=const,
                                num_warps=nw)
                    if ns is not None:
                        spec["num_stages"] = ns
                    specs.append(spec)
    return specs


AOT_SPECS = _aot_specs()
