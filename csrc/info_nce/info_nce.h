// info_nce: InfoNCE / contrastive cross-entropy of queries against keys without the (M, N) logits
// (torch-free). See gkcore/reference/info_nce.py for the math:
//   s_ij = scale <q_i, k_j>,  t_ij = (1 - eps) ((1 - alpha) y_ij + alpha p^m_ij) + eps / N,
//   loss_i = lse_i - sum_j t_ij s_ij   (0 for rows without a positive)
// y from idx (M,) int64 (negative: no positive) or mask (M, N) uint8/bool (y = mask / row count).
//
// CPU part: the row-wise work on one chunk of logits. The caller (gkcore/ops/info_nce.py) walks the
// queries in chunks, computes each chunk's (rows, N) logits with one BLAS matmul into a reused buffer
// (never the whole (M, N) matrix), calls info_nce_rows_cpu on it, and contracts the logit gradient it
// leaves in the buffer with BLAS: A = G K (query side), C = G^T (g q) (key side).
#pragma once
#include <cstdint>

#include "common/common.h"

namespace gkcore {

struct InfoNceRows {
  long long rows, N;  // rows of this chunk, keys
  double alpha, eps;
};

// s (rows, N): scaled logits of the chunk, contiguous, dtype dt (F32 or F64); sm (rows, N) the soft-target
// logits scale <qm_i, k_j> (used when alpha > 0) or null; exactly one of idx (rows,) / mask (rows, N) is
// non-null. Writes loss (rows,), lse (rows,) and, with sm, lse_m (rows,), all of dt. With grad, s is
// overwritten with G = p - t, the gradient of loss_i w.r.t. s_i (zero rows for rows without a positive).
// One row per task, each reduced in a fixed order: results do not depend on the thread count.
void info_nce_rows_cpu(DType dt, void* s, const void* sm, const int64_t* idx, const uint8_t* mask,
                       const InfoNceRows& c, void* loss, void* lse, void* lse_m, bool grad);

}  // namespace gkcore
