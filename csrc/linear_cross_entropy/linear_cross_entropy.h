// linear_cross_entropy, CPU part (torch-free): the row-wise work on one chunk of logits.
//   z[t, v] = sum_d h[t, d] * w[v, d] + b[v];  with softcap c: z <- c * tanh(z / c)
//   lse[t]  = log sum_v exp(z[t, v])
//   loss[t] = (1 - eps) * (lse[t] - z[t, y[t]]) + eps * (lse[t] - mean_v z[t, v]),  0 where y[t] == ignore_index
// The caller (gkcore/ops/linear_cross_entropy.py) walks the tokens in chunks of `rows` tokens, computes
// the (rows, V) logits chunk with a BLAS matmul into one reused buffer (never the whole (T, V) matrix),
// and calls these functions on it; the backward recomputes the chunk and contracts dz with BLAS.
#pragma once
#include <cstdint>

#include "common/common.h"

namespace gkcore {

struct LceChunk {
  long long rows;          // tokens in this chunk
  int V;                   // vocabulary size (row length of z)
  long long ignore_index;  // target value of ignored tokens
  double eps;              // label smoothing in [0, 1]
  double softcap;          // <= 0: off
};

// z: contiguous (rows, V) logits of dtype dt (F32 or F64), bias included, softcap NOT applied; it is
// overwritten with the capped logits. y: (rows,) int64. loss, lse: (rows,) of dt, fully written.
void lce_chunk_forward_cpu(DType dt, void* z, const int64_t* y, void* loss, void* lse, const LceChunk& c);

// z: contiguous (rows, V) logits as for the forward (uncapped; or, with z_capped, the capped logits the
// forward left in z); overwritten in place with
//   dz = g[t] * (softmax(z)[t, v] - (1 - eps) [v == y[t]] - eps / V) * (1 - tanh^2(u / c) with softcap)
// (u the uncapped logit), the gradient w.r.t. the uncapped logits. lse (rows,) from the forward, g
// (rows,) upstream gradient per token (0 at ignored tokens), both of dt. Rows with g == 0 become zeros.
void lce_chunk_backward_cpu(DType dt, void* z, const int64_t* y, const void* lse, const void* g, const LceChunk& c,
                            bool z_capped);

}  // namespace gkcore
