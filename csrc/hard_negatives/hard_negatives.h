// hard_negatives: ITM hard-negative sampling by Gumbel-max with Philox4x32-10 uniforms (torch-free).
// Mirrors gkcore/reference/hard_negatives.py (hard_negatives_gumbel) and kernels/hard_negatives.py.
#pragma once
#include <cstdint>

#include "common/common.h"

namespace gkcore {

struct HardNegShape {
  int row0;   // first image row of this chunk
  int rows;   // image rows in this chunk
  int B;      // batch (texts = columns)
};

// sim: contiguous (rows, B) unscaled dot products v_i . t_j for images row0 .. row0+rows-1 (F32 or F64);
// the score is s_ij = sim * scale in that dtype. group_ids: (B,) int64 or nullptr.
// neg_text: (B,) int64, entries row0 .. row0+rows-1 written (-1 for a row without a valid negative).
// col_val (B,) of the sim dtype and col_idx (B,) int64: running best (value, image index) of each text
// over the images seen so far; initialise to (-inf, -1) before the first chunk. Ties go to the
// smaller index. Counter of pair (i, j) = (i, j, 0, 0), key = (seed_lo, seed_hi); word 0 -> image
// side, word 1 -> text side.
void hard_negatives_cpu(DType dt, const void* sim, double scale, uint32_t seed_lo, uint32_t seed_hi,
                        const int64_t* group_ids, int64_t* neg_text, void* col_val, int64_t* col_idx,
                        const HardNegShape& s);

// Philox4x32-10 of one counter (exposed for tests).
void philox4x32_10(const uint32_t ctr[4], const uint32_t key[2], uint32_t out[4]);

}  // namespace gkcore
