// info_nce: InfoNCE / contrastive cross-entropy of queries against keys without the (M, N) logits
// (torch-free). See gkcore/reference/info_nce.py for the math:
//   s_ij = scale <q_i, k_j>,  t_ij = (1 - eps) ((1 - alpha) y_ij + alpha p^m_ij) + eps / N,
//   loss_i = lse_i - sum_j t_ij s_ij   (0 for rows without a positive)
// y from idx (M,) int64 (negative: no positive) or mask (M, N) uint8/bool (y = mask / row count).
// Memory: per thread a (D x 64) packed query block, two (96 x 64) logit tiles and (64 x D) row
// accumulators; the backward's key-gradient adds one (N, D) accumulator per extra thread.
#pragma once
#include <cstdint>

#include "common/common.h"

namespace gkcore {

struct InfoNceShape {
  long long M, N;  // queries, keys
  int D;           // feature size
  double scale, alpha, eps;
};

// q (M, D), k (N, D), qm (M, D) or null (soft-target queries; used when alpha > 0): contiguous, dtype dt
// (F32 or F64). Exactly one of idx / mask is non-null.
// Writes loss (M,), lse (M,), lse_m (M,) (when qm is used) and, when A is non-null, the query-gradient
// rows A (M, D) = sum_j (p_ij - t_ij) k_j (accumulated online, so that the backward needs no recompute).
// All outputs are of dt and fully written.
void info_nce_forward_cpu(DType dt, const void* q, const void* k, const void* qm, const int64_t* idx,
                          const uint8_t* mask, const InfoNceShape& s, void* loss, void* lse, void* lse_m, void* A);

// lse, lse_m from the forward; g (M,) upstream gradient per row (0 at rows without a positive); all of dt.
// A (M, D) = sum_j (p_ij - t_ij) k_j and C (N, D) = sum_i g_i (p_ij - t_ij) q_i, each may be null; the
// non-null ones are fully written. Deterministic for a given thread count (static schedule, fixed-order
// reduction of the per-thread key accumulators).
void info_nce_backward_cpu(DType dt, const void* q, const void* k, const void* qm, const int64_t* idx,
                           const uint8_t* mask, const InfoNceShape& s, const void* lse, const void* lse_m,
                           const void* g, void* A, void* C);

}  // namespace gkcore
