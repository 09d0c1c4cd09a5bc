// region_attention, CPU part (torch-free): cross-attention from queries to RoIAlign-pooled region keys
// and values (optionally followed by every patch key), pooled on the fly. See
// gkcore/reference/region_attention.py for the math:
//   Kr = W k, Vr = W v  (W the (R, N) RoIAlign pooling matrix of the boxes, bins averaged)
//   out = softmax(scale q [Kr; k]^T, masked regions left out) [Vr; v];  all-masked rows give 0.
// W is never formed: it factors into per-region row x column weights (axis_weights in
// region_pool/roi_math.h), so a region's key is a weighted sum over the small rectangle of cells its
// samples touch. One OpenMP task per (batch, head) builds that head's [Kr; k] tile, then runs an online
// softmax over blocks of keys; the backward recomputes the tile, owns the (b, h) slices of dq, dk and dv
// and sums into them in a fixed order (no atomics), so gradients are bitwise reproducible.
#pragma once
#include <cstdint>

#include "common/common.h"

namespace gkcore {

struct RegionAttnShape {
  int B, H, P, N, R, D;         // batch, heads, queries, patches (gh * gw), regions, head dim
  int gh, gw, oh, ow;           // grid, RoIAlign bins
  int sampling_ratio;           // <= 0: adaptive
  bool aligned, attend_patches;
  double scale;
  long long sq[4], sk[4], sv[4];  // element strides of q (sq[0] == 0 for queries shared by the batch), k, v
};

// q (B, H, P, D) by strides sq; k, v (B, H, N, D) by strides sk, sv; boxes contiguous (B, R, 4); mask
// contiguous (B, R) (nonzero = region present) or null; all floating inputs of dtype dt (F32 or F64).
// Writes out (B, H, P, D) and lse (B, H, P) (natural log; +inf for rows whose keys are all masked)
// contiguous, and, when weights is non-null, the attention weights (B, H, P, R [+ N]) contiguous.
void region_attention_forward_cpu(DType dt, const void* q, const void* k, const void* v, const void* boxes,
                                  const uint8_t* mask, void* out, void* lse, void* weights, const RegionAttnShape& s);

// grad_out and out (B, H, P, D) contiguous, lse (B, H, P) from the forward. Writes dq (B, H, P, D) (the
// per-batch gradient, also for shared queries: the caller sums it over the batch), dk and dv
// (B, H, N, D), all contiguous and fully written.
void region_attention_backward_cpu(DType dt, const void* q, const void* k, const void* v, const void* boxes,
                                   const uint8_t* mask, const void* grad_out, const void* out, const void* lse,
                                   void* dq, void* dk, void* dv, const RegionAttnShape& s);

}  // namespace gkcore
