"""Reference ``sample_hard_negatives``: ALBEF-style hard negatives for the ITM loss, in plain PyTorch.

Math. Let ``v`` (B, D) be the image features, ``t`` (B, D) the text features and ``S = scale * v t^T``
(B, B) their similarities. Pair (i, j) is *positive* when ``i == j`` or ``group_ids[i] == group_ids[j]``
(e.g. two images of one study). For every image ``i`` one text is drawn with

    P(neg_text_for_image[i] = j) = exp(S_ij) / sum_{k not positive of i} exp(S_ik)   (j not positive of i)

and for every text ``j`` one image with ``P(neg_image_for_text[j] = i)`` proportional to ``exp(S_ij)``
over the images that are not positives of ``j`` (the transposed problem). ALBEF and BLIP draw the same
law with a softmax, a zeroed diagonal and one ``torch.multinomial`` per row.

Two equivalent samplers live here:

* :func:`hard_negatives_multinomial` -- the oracle of the *distribution*: masked softmax and one
  vectorised ``torch.multinomial`` call per side, driven by a ``torch.Generator``.
* :func:`hard_negatives_gumbel` -- the exact Gumbel-max sampler used by the fast backends,
  ``argmax_j (S_ij + G_ij)`` over the valid ``j`` with ``G_ij = -log(-log U_ij)`` i.i.d. standard Gumbel.
  The uniforms come from a counter-based generator (:func:`philox4x32`, Philox4x32-10 of Salmon et al.
  2011, keyed by a 64-bit seed), so each pair's draw depends only on (seed, i, j): not on tiling, thread
  count or backend. The counter of pair (image i, text j) is ``(i, j, 0, 0)``; its first output word
  drives the image side ``G_ij`` and its second word the text side (text j choosing image i). A word
  ``r`` becomes ``U = (2 * (r >> 9) + 1) * 2^-24`` in (0, 1), exact in float32. The cpu and triton
  backends compute exactly these numbers, so for one seed they return the same indices as this
  function (up to float rounding of the similarities, which only matters at exact ties).

Ties in the argmax go to the smallest index. A row without any valid negative (B = 1, or every pair
sharing one group) has no distribution: callers must reject it (:func:`gkcore.functional.sample_hard_negatives`
raises ``ValueError``); here such a row would get index 0 from argmax / an error from multinomial.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ["PHILOX_KEY", "PHILOX_MUL", "hard_negatives_gumbel", "hard_negatives_multinomial", "negative_mask",
           "philox4x32", "seed_words", "similarities", "uniform_from_bits"]

#: Philox4x32 round multipliers and Weyl key increments (Random123's constants).
PHILOX_MUL = (0xD2511F53, 0xCD9E8D57)
PHILOX_KEY = (0x9E3779B9, 0xBB67AE85)
_M32 = 0xFFFFFFFF


def _mulhilo(a: int, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of ``a * b`` for a 32-bit constant ``a`` and int64 tensor ``b`` in [0, 2^32),
    computed without overflowing int64 (split ``a`` into 16-bit halves)."""
    x = (a >> 16) * b  # < 2^48
    y = (a & 0xFFFF) * b  # < 2^48
    hi = (x + (y >> 16)) >> 16
    lo = (((x & 0xFFFF) << 16) + y) & _M32
    return hi, lo


def philox4x32(c0, c1, c2, c3, k0, k1, rounds: int = 10):
    """Philox4x32-``rounds`` on int64 tensors holding uint32 values (broadcast together).

    Returns the four output words as int64 tensors in [0, 2^32). ``k0``, ``k1`` are the key words
    (Python ints or tensors)."""
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) if not isinstance(c, torch.Tensor) else c.long()
                      for c in (c0, c1, c2, c3))
    k0 = k0.long() if isinstance(k0, torch.Tensor) else torch.tensor(int(k0) & _M32, dtype=torch.int64)
    k1 = k1.long() if isinstance(k1, torch.Tensor) else torch.tensor(int(k1) & _M32, dtype=torch.int64)
    for r in range(rounds):
        if r:
            k0 = (k0 + PHILOX_KEY[0]) & _M32
            k1 = (k1 + PHILOX_KEY[1]) & _M32
        hi0, lo0 = _mulhilo(PHILOX_MUL[0], c0)
        hi1, lo1 = _mulhilo(PHILOX_MUL[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def uniform_from_bits(r: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Map uint32 words (int64 tensor) to uniforms ``(2 * (r >> 9) + 1) * 2^-24`` in (0, 1), exact in fp32."""
    return ((r >> 9) * 2 + 1).to(dtype) * (2.0 ** -24)


def seed_words(seed) -> Tuple[int, int]:
    """(lo, hi) 32-bit key words of a 64-bit seed (int or one-element int64 tensor)."""
    s = int(seed.reshape(-1)[0]) if isinstance(seed, torch.Tensor) else int(seed)
    return s & _M32, (s >> 32) & _M32


def negative_mask(B: int, group_ids: Optional[torch.Tensor], device) -> torch.Tensor:
    """(B, B) bool, True where pair (i, j) is a valid negative (not the diagonal, not the same group)."""
    idx = torch.arange(B, device=device)
    pos = idx[:, None] == idx[None, :]
    if group_ids is not None:
        g = group_ids.to(device)
        pos = pos | (g[:, None] == g[None, :])
    return ~pos


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def similarities(image_feat: torch.Tensor, text_feat: torch.Tensor, scale) -> torch.Tensor:
    """``S = (v t^T) * scale`` (B, B), accumulated in float32 (float64 for float64 inputs)."""
    cdt = _compute_dtype(image_feat.dtype)
    s = image_feat.to(cdt) @ text_feat.to(cdt).T
    if isinstance(scale, torch.Tensor):
        scale = scale.to(device=s.device, dtype=cdt).reshape(())
    return s * scale


def hard_negatives_multinomial(image_feat: torch.Tensor, text_feat: torch.Tensor, scale,
                               group_ids: Optional[torch.Tensor] = None,
                               generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Masked softmax + ``torch.multinomial`` (one vectorised call per side).

    Args: ``image_feat``, ``text_feat`` (B, D); ``scale`` a float or 0-d tensor; ``group_ids`` (B,)
    integer or None; ``generator`` on the features' device or None. Returns two (B,) int64 tensors:
    ``neg_text_for_image`` and ``neg_image_for_text``.
    """
    with torch.no_grad():
        s = similarities(image_feat.detach(), text_feat.detach(), scale)
        valid = negative_mask(s.shape[0], group_ids, s.device)
        ninf = torch.tensor(float("-inf"), dtype=s.dtype, device=s.device)
        w_i2t = torch.softmax(torch.where(valid, s, ninf), dim=1)
        w_t2i = torch.softmax(torch.where(valid.T, s.T, ninf), dim=1)
        neg_t = torch.multinomial(w_i2t, 1, generator=generator).squeeze(1)
        neg_i = torch.multinomial(w_t2i, 1, generator=generator).squeeze(1)
    return neg_t, neg_i


def hard_negatives_gumbel(image_feat: torch.Tensor, text_feat: torch.Tensor, scale, seed,
                          group_ids: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gumbel-max with Philox uniforms keyed by ``seed`` (a 64-bit int or one-element int64 tensor):
    the exact computation of the cpu and triton backends. Shapes as :func:`hard_negatives_multinomial`.
    Memory O(B^2)."""
    with torch.no_grad():
        s = similarities(image_feat.detach(), text_feat.detach(), scale)
        B, dev, cdt = s.shape[0], s.device, s.dtype
        k0, k1 = seed_words(seed)
        i = torch.arange(B, device=dev, dtype=torch.int64)
        r0, r1, _, _ = philox4x32(i[:, None], i[None, :], 0, 0, k0, k1)
        g_img = -torch.log(-torch.log(uniform_from_bits(r0, cdt)))
        g_txt = -torch.log(-torch.log(uniform_from_bits(r1, cdt)))
        valid = negative_mask(B, group_ids, dev)
        ninf = torch.tensor(float("-inf"), dtype=cdt, device=dev)
        neg_t = torch.where(valid, s + g_img, ninf).argmax(dim=1)
        neg_i = torch.where(valid, s + g_txt, ninf).argmax(dim=0)
    return neg_t, neg_i
