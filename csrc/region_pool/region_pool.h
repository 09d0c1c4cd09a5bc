// region_pool: RoIAlign of normalised boxes on a (B, N = gh*gw, C) token grid (torch-free).
#pragma once
#include <cstdint>

#include "common/common.h"

namespace gkcore {

struct RegionPoolShape {
  int B, R, gh, gw, C;   // batch, regions, grid, channels
  int oh, ow;            // output bins
  int sampling_ratio;    // <= 0: adaptive, ceil(roi size / bins)
  bool aligned;
  bool reduce;           // average over the oh*ow bins -> (B, R, C); else (B, R, oh, ow, C)
};

// tokens: contiguous (B, N, C); boxes: contiguous (B, R, 4) of the same dtype as tokens for F32/F64
// and float32 for F16/BF16; out: contiguous (B, R, C) or (B, R, oh, ow, C).
void region_pool_forward_cpu(DType dt, const void* tokens, const void* boxes, void* out,
                             const RegionPoolShape& s);
// grad_out as out; grad_tokens (B, N, C), fully written (deterministic: fixed summation order).
void region_pool_backward_cpu(DType dt, const void* grad_out, const void* boxes, void* grad_tokens,
                              const RegionPoolShape& s);

#ifdef GKCORE_WITH_CUDA
void region_pool_forward_cuda(DType dt, const void* tokens, const void* boxes, void* out,
                              const RegionPoolShape& s, void* stream);
void region_pool_backward_cuda(DType dt, const void* grad_out, const void* boxes, void* grad_tokens,
                               const RegionPoolShape& s, void* stream);
#endif

}  // namespace gkcore
