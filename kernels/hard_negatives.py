"""Triton ITM hard-negative sampling: tiled similarities + Gumbel-max with Philox4x32-10 uniforms.

One program owns ``BLOCK_M`` rows of the "query" side and sweeps every column tile: it computes the
(BLOCK_M, BLOCK_N) similarity tile ``scale * A_rows . B_cols`` with ``tl.dot`` over ``BLOCK_D`` chunks of
the feature dimension (float32 accumulation, IEEE float32 products for float32 inputs), adds the
Gumbel noise of each pair, masks the positives (diagonal, same group) and keeps a running
(max, argmax) per row. Nothing of size B x B is ever stored. The kernel runs twice: ``SIDE=0`` with the
images as rows (a text for each image) and ``SIDE=1`` with the texts as rows (an image for each text).

The random numbers are those of ``gkcore.reference.hard_negatives.hard_negatives_gumbel``: pair
(image i, text j) has Philox counter ``(i, j, 0, 0)`` and key ``(seed_lo, seed_hi)``; output word 0 is
the image side's uniform, word 1 the text side's. The seed is read from a device tensor, so a launch
needs no host synchronisation. Sampling has no gradient: there is no backward kernel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

PHILOX_MUL0 = tl.constexpr(0xD2511F53)
PHILOX_MUL1 = tl.constexpr(0xCD9E8D57)
PHILOX_KEY0 = tl.constexpr(0x9E3779B9)
PHILOX_KEY1 = tl.constexpr(0xBB67AE85)


@triton.jit
def philox_words01(c0, c1, k0, k1):
    """Output words 0 and 1 of Philox4x32-10 for counters (c0, c1, 0, 0) (uint32 tensors), key (k0, k1)."""
    c2 = tl.zeros_like(c0)
    c3 = tl.zeros_like(c0)
    for r in tl.static_range(10):
        if r > 0:
            k0 = k0 + PHILOX_KEY0
            k1 = k1 + PHILOX_KEY1
        a0 = c0
        a2 = c2
        c0 = tl.umulhi(a2, PHILOX_MUL1) ^ c1 ^ k0
        c2 = tl.umulhi(a0, PHILOX_MUL0) ^ c3 ^ k1
        c1 = a2 * PHILOX_MUL1
        c3 = a0 * PHILOX_MUL0
    return c0, c1


@triton.jit
def _hard_negatives_fwd_kernel(a_ptr, b_ptr, gid_ptr, seed_ptr, scale_ptr, out_ptr, B, D, stride_a, stride_b,
                               SIDE: tl.constexpr, HAS_GROUPS: tl.constexpr, IEEE: tl.constexpr,
                               UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B
    seed = tl.load(seed_ptr)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    scale = tl.load(scale_ptr).to(tl.float32)
    if HAS_GROUPS:
        g_row = tl.load(gid_ptr + rows, mask=row_ok, other=0)
    rows64 = rows.to(tl.int64)
    best_val = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    best_idx = tl.full((BLOCK_M,), -1, tl.int32)
    for n0 in range(0, B, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < B
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dk = d0 + tl.arange(0, BLOCK_D)
            dm = dk < D
            a = tl.load(a_ptr + rows64[:, None] * stride_a + dk[None, :], mask=row_ok[:, None] & dm[None, :],
                        other=0.0)
            b = tl.load(b_ptr + cols.to(tl.int64)[:, None] * stride_b + dk[None, :],
                        mask=col_ok[:, None] & dm[None, :], other=0.0)
            if UPCAST:  # the CPU interpreter computes 16-bit dots wrongly; upcast there (exact products)
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            if IEEE or UPCAST:
                acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, tl.trans(b), acc)
        s = acc * scale
        zero = tl.zeros((BLOCK_M, BLOCK_N), tl.uint32)
        r_ctr = rows.to(tl.uint32)[:, None] + zero
        c_ctr = cols.to(tl.uint32)[None, :] + zero
        if SIDE == 0:
            w, _ = philox_words01(r_ctr, c_ctr, k0, k1)
        else:
            _, w = philox_words01(c_ctr, r_ctr, k0, k1)
        u = ((w >> 9).to(tl.float32) * 2.0 + 1.0) * 5.9604644775390625e-08
        z = s - tl.log(-tl.log(u))
        valid = row_ok[:, None] & col_ok[None, :] & (rows[:, None] != cols[None, :])
        if HAS_GROUPS:
            g_col = tl.load(gid_ptr + cols, mask=col_ok, other=0)
            valid = valid & (g_row[:, None] != g_col[None, :])
        z = tl.where(valid, z, float("-inf"))
        t_max = tl.max(z, 1)
        t_arg = tl.argmax(z, 1).to(tl.int32) + n0
        upd = t_max > best_val
        best_val = tl.where(upd, t_max, best_val)
        best_idx = tl.where(upd, t_arg, best_idx)
    tl.store(out_ptr + rows, best_idx.to(tl.int64), mask=row_ok)


#: (BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages) per input dtype, chosen so that the AOT compile
#: for sm_80 and sm_90a has no register spills (IEEE float32 dots run on FMA units and need more registers).
CONFIGS = {"fp32": (32, 64, 32, 4, 1), "fp16": (64, 64, 32, 8, 2), "bf16": (64, 64, 32, 8, 2)}
_DT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _blocks(dtype: torch.dtype, interpret: bool):
    if interpret:  # the CPU interpreter: its cost is per tile op, so fewer, mid-sized tiles (B > 32 still
        return 32, 32, 32, 4, 1  # spans several tiles, with a partial last one)
    return CONFIGS[_DT[dtype]]


def hard_negatives_forward(image_feat: torch.Tensor, text_feat: torch.Tensor, scale: torch.Tensor,
                           seed: torch.Tensor, group_ids, neg_text: torch.Tensor,
                           neg_image: torch.Tensor):
    """image_feat, text_feat (B, D) with unit stride in D, one dtype; scale (1,) float32 and seed (1,)
    int64 on the same device; group_ids (B,) int64 or None; neg_text, neg_image (B,) int64, fully written
    (-1 for a row without a valid negative)."""
    B, D = image_feat.shape
    if B == 0:
        return neg_text, neg_image
    interpret = image_feat.device.type == "cpu"
    BM, BN, BD, nw, ns = _blocks(image_feat.dtype, interpret)
    ieee = image_feat.dtype == torch.float32
    gid = group_ids if group_ids is not None else seed
    grid = (triton.cdiv(B, BM),)
    for side, (a, b, out) in enumerate(((image_feat, text_feat, neg_text), (text_feat, image_feat, neg_image))):
        _hard_negatives_fwd_kernel[grid](a, b, gid, seed, scale, out, B, D, a.stride(0), b.stride(0),
                                         SIDE=side, HAS_GROUPS=group_ids is not None, IEEE=ieee,
                                         UPCAST=interpret and not ieee,
                                         BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD, num_warps=nw,
                                         num_stages=ns)
    return neg_text, neg_image


def _aot_specs():
    specs = []
    for dt in ("fp32", "bf16", "fp16"):
        for side in (0, 1):
            for groups in (False, True):
                sig = {"a_ptr": f"*{dt}", "b_ptr": f"*{dt}", "gid_ptr": "*i64", "seed_ptr": "*i64",
                       "scale_ptr": "*fp32", "out_ptr": "*i64", "B": "i32", "D": "i32", "stride_a": "i32",
                       "stride_b": "i32", "SIDE": "constexpr", "HAS_GROUPS": "constexpr", "IEEE": "constexpr",
                       "UPCAST": "constexpr",
                       "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_D": "constexpr"}
                bm, bn, bd, nw, ns = CONFIGS[dt]
                specs.append(dict(name=f"hard_negatives_fwd_{dt}_side{side}_groups{int(groups)}",
                                  kernel=_hard_negatives_fwd_kernel, signature=sig,
                                  constexprs={"SIDE": side, "HAS_GROUPS": groups, "IEEE": dt == "fp32", "UPCAST": False,
                                              "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd},
                                  num_warps=nw, num_stages=ns))
    return specs


AOT_SPECS = _aot_specs()
