// CPU (OpenMP) hard-negative sampling; see hard_negatives.h.
#include "hard_negatives/hard_negatives.h"

#include <cmath>
#include <limits>
#include <vector>

#ifdef GKCORE_WITH_OPENMP
#include <omp.h>
#endif

namespace gkcore {
namespace {

constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
constexpr uint32_t kKey0 = 0x9E3779B9u, kKey1 = 0xBB67AE85u;

// Words 0 and 1 of Philox4x32-10 for counter (c0, c1, 0, 0).
inline void philox2(uint32_t c0, uint32_t c1, uint32_t k0, uint32_t k1, uint32_t& r0, uint32_t& r1) {
  uint32_t c2 = 0, c3 = 0;
  for (int r = 0; r < 10; ++r) {
    if (r) {
      k0 += kKey0;
      k1 += kKey1;
    }
    const uint64_t p0 = (uint64_t)kMul0 * c0;
    const uint64_t p1 = (uint64_t)kMul1 * c2;
    const uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1;
    c1 = (uint32_t)p1;
    c3 = (uint32_t)p0;
    c0 = n0;
    c2 = n2;
  }
  r0 = c0;
  r1 = c1;
}

template <typename T>
inline T gumbel_from_bits(uint32_t r) {
  const T u = (T)(2u * (r >> 9) + 1u) * (T)5.9604644775390625e-08;  // (2 (r >> 9) + 1) * 2^-24
  return -std::log(-std::log(u));
}

template <typename T>
void run(const T* sim, T scale, uint32_t k0, uint32_t k1, const int64_t* gid, int64_t* neg_text, T* col_val,
         int64_t* col_idx, const HardNegShape& s) {
  const int B = s.B, rows = s.rows, row0 = s.row0;
  const T ninf = -std::numeric_limits<T>::infinity();
  int nthreads = 1;
#ifdef GKCORE_WITH_OPENMP
  nthreads = rows >= 8 ? omp_get_max_threads() : 1;
#endif
  std::vector<T> tval((size_t)nthreads * B, ninf);
  std::vector<int64_t> tidx((size_t)nthreads * B, -1);
#ifdef GKCORE_WITH_OPENMP
#pragma omp parallel num_threads(nthreads)
#endif
  {
    int tid = 0;
#ifdef GKCORE_WITH_OPENMP
    tid = omp_get_thread_num();
#endif
    T* cv = tval.data() + (size_t)tid * B;
    int64_t* ci = tidx.data() + (size_t)tid * B;
    std::vector<uint32_t> w0(B), w1(B);
#ifdef GKCORE_WITH_OPENMP
#pragma omp for schedule(static)
#endif
    for (int r = 0; r < rows; ++r) {
      const int i = row0 + r;
      const T* srow = sim + (size_t)r * B;
      for (int j = 0; j < B; ++j) philox2((uint32_t)i, (uint32_t)j, k0, k1, w0[j], w1[j]);
      T best = ninf;
      int64_t best_j = -1;
      const int64_t gi = gid ? gid[i] : 0;
      for (int j = 0; j < B; ++j) {
        if (j == i || (gid && gid[j] == gi)) continue;
        const T sc = srow[j] * scale;
        const T z0 = sc + gumbel_from_bits<T>(w0[j]);
        if (best_j < 0 || z0 > best) {
          best = z0;
          best_j = j;
        }
        const T z1 = sc + gumbel_from_bits<T>(w1[j]);
        if (ci[j] < 0 || z1 > cv[j]) {  // rows ascend within a thread: strict > keeps the first
          cv[j] = z1;
          ci[j] = i;
        }
      }
      neg_text[i] = best_j;
    }
  }
  // Merge the threads' column bests with the running ones (ties -> smaller image index).
  for (int t = 0; t < nthreads; ++t) {
    const T* cv = tval.data() + (size_t)t * B;
    const int64_t* ci = tidx.data() + (size_t)t * B;
    for (int j = 0; j < B; ++j) {
      if (ci[j] < 0) continue;
      if (col_idx[j] < 0 || cv[j] > col_val[j] || (cv[j] == col_val[j] && ci[j] < col_idx[j])) {
        col_val[j] = cv[j];
        col_idx[j] = ci[j];
      }
    }
  }
}

}  // namespace

void philox4x32_10(const uint32_t ctr[4], const uint32_t key[2], uint32_t out[4]) {
  uint32_t c0 = ctr[0], c1 = ctr[1], c2 = ctr[2], c3 = ctr[3], k0 = key[0], k1 = key[1];
  for (int r = 0; r < 10; ++r) {
    if (r) {
      k0 += kKey0;
      k1 += kKey1;
    }
    const uint64_t p0 = (uint64_t)kMul0 * c0;
    const uint64_t p1 = (uint64_t)kMul1 * c2;
    const uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1;
    c1 = (uint32_t)p1;
    c3 = (uint32_t)p0;
    c0 = n0;
    c2 = n2;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

void hard_negatives_cpu(DType dt, const void* sim, double scale, uint32_t seed_lo, uint32_t seed_hi,
                        const int64_t* group_ids, int64_t* neg_text, void* col_val, int64_t* col_idx,
                        const HardNegShape& s) {
  if (s.rows <= 0 || s.B <= 0) return;
  switch (dt) {
    case DType::F32:
      run<float>((const float*)sim, (float)scale, seed_lo, seed_hi, group_ids, neg_text, (float*)col_val, col_idx, s);
      break;
    case DType::F64:
      run<double>((const double*)sim, scale, seed_lo, seed_hi, group_ids, neg_text, (double*)col_val, col_idx, s);
      break;
    default:
      throw Error(std::string("hard_negatives_cpu: unsupported dtype ") + dtype_name(dt));
  }
}

}  // namespace gkcore
