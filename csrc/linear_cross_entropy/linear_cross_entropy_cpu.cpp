// CPU (OpenMP) linear_cross_entropy: row-wise forward / backward on one logits chunk; see the header.
// One token row per task; every row is reduced in a fixed order, so results do not depend on the
// thread count. float32 rows without softcap run 8-wide AVX2 passes (exp of common/simd.h) when the CPU
// has them: the row passes are then a small fraction of the chunk's three matmuls.
#include "linear_cross_entropy/linear_cross_entropy.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "common/simd.h"

namespace gkcore {
namespace {

#ifdef GK_SIMD_X86
// One row: max, sum of logits and sum of exp(z - max), 4 x 8 lanes each, combined in double at the end.
__attribute__((target("avx2,fma"), noinline)) void row_stats_avx2(const float* z, int V, float* mx_out,
                                                                   double* sum_out, double* se_out) {
  int j = 0;
  __m256 m0 = _mm256_set1_ps(-std::numeric_limits<float>::infinity()), m1 = m0, m2 = m0, m3 = m0;
  __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  for (; j + 32 <= V; j += 32) {
    const __m256 a = _mm256_loadu_ps(z + j), b = _mm256_loadu_ps(z + j + 8);
    const __m256 c = _mm256_loadu_ps(z + j + 16), d = _mm256_loadu_ps(z + j + 24);
    m0 = _mm256_max_ps(m0, a);
    m1 = _mm256_max_ps(m1, b);
    m2 = _mm256_max_ps(m2, c);
    m3 = _mm256_max_ps(m3, d);
    s0 = _mm256_add_ps(s0, a);
    s1 = _mm256_add_ps(s1, b);
    s2 = _mm256_add_ps(s2, c);
    s3 = _mm256_add_ps(s3, d);
  }
  float mx = simd::hmax8(_mm256_max_ps(_mm256_max_ps(m0, m1), _mm256_max_ps(m2, m3)));
  double sum = (double)simd::hsum8(s0) + (double)simd::hsum8(s1) + (double)simd::hsum8(s2) + (double)simd::hsum8(s3);
  for (; j < V; ++j) {
    mx = std::max(mx, z[j]);
    sum += (double)z[j];
  }
  // the sum of exp is accumulated in float64 (4 x 4 lanes): for a confident token it is 1 + a small
  // remainder whose log is the loss, so float32 sums would cost about 1e-5 of a small loss
  const __m256 o = _mm256_set1_ps(mx);
  __m256d e0 = _mm256_setzero_pd(), e1 = e0, e2 = e0, e3 = e0;
  j = 0;
  for (; j + 16 <= V; j += 16) {
    const __m256 a = simd::exp8(_mm256_sub_ps(_mm256_loadu_ps(z + j), o));
    const __m256 b = simd::exp8(_mm256_sub_ps(_mm256_loadu_ps(z + j + 8), o));
    e0 = _mm256_add_pd(e0, _mm256_cvtps_pd(_mm256_castps256_ps128(a)));
    e1 = _mm256_add_pd(e1, _mm256_cvtps_pd(_mm256_extractf128_ps(a, 1)));
    e2 = _mm256_add_pd(e2, _mm256_cvtps_pd(_mm256_castps256_ps128(b)));
    e3 = _mm256_add_pd(e3, _mm256_cvtps_pd(_mm256_extractf128_ps(b, 1)));
  }
  alignas(32) double part[4];
  _mm256_store_pd(part, _mm256_add_pd(_mm256_add_pd(e0, e1), _mm256_add_pd(e2, e3)));
  double se = (part[0] + part[1]) + (part[2] + part[3]);
  for (; j < V; ++j) se += (double)std::exp(z[j] - mx);
  *mx_out = mx;
  *sum_out = sum;
  *se_out = se;
}

// One row in place: z <- g (exp(z - l) - eps_v)
__attribute__((target("avx2,fma"), noinline)) void row_grad_avx2(float* z, int V, float l, float g, float eps_v) {
  const __m256 o = _mm256_set1_ps(l), gv = _mm256_set1_ps(g), ev = _mm256_set1_ps(eps_v);
  int j = 0;
  for (; j + 8 <= V; j += 8) {
    const __m256 e = simd::exp8(_mm256_sub_ps(_mm256_loadu_ps(z + j), o));
    _mm256_storeu_ps(z + j, _mm256_mul_ps(gv, _mm256_sub_ps(e, ev)));
  }
  for (; j < V; ++j) z[j] = g * (std::exp(z[j] - l) - eps_v);
}
#endif

template <typename T>
void forward_rows(T* z, const int64_t* y, T* loss, T* lse, const LceChunk& c) {
  const int V = c.V;
  const bool cap = c.softcap > 0;
  const T cc = (T)c.softcap, inv_c = cap ? (T)(1.0 / c.softcap) : T(1);
  const bool avx = simd::cpu_has_avx2_fma();
#pragma omp parallel for schedule(static)
  for (long long r = 0; r < c.rows; ++r) {
    T* zr = z + (size_t)r * V;
    if (cap)
      for (int j = 0; j < V; ++j) zr[j] = cc * std::tanh(zr[j] * inv_c);
    T mx = -std::numeric_limits<T>::infinity();
    double sum = 0.0, se = 0.0;
#ifdef GK_SIMD_X86
    if (sizeof(T) == 4 && avx) {
      float m;
      row_stats_avx2((const float*)zr, V, &m, &sum, &se);
      mx = (T)m;
    } else
#endif
    {
      for (int j = 0; j < V; ++j) {
        mx = std::max(mx, zr[j]);
        sum += (double)zr[j];
      }
      for (int j = 0; j < V; ++j) se += (double)std::exp(zr[j] - mx);
    }
    const double l = (double)mx + std::log(se);
    lse[r] = (T)l;
    const long long yr = y[r];
    if (yr == c.ignore_index || yr < 0 || yr >= V) {
      loss[r] = T(0);  // the Python side rejects out-of-range targets that are not ignore_index
    } else {
      loss[r] = (T)((1.0 - c.eps) * (l - (double)zr[yr]) + c.eps * (l - sum / (double)V));
    }
  }
}

template <typename T>
void backward_rows(T* z, const int64_t* y, const T* lse, const T* g, const LceChunk& c, bool capped) {
  const int V = c.V;
  const bool cap = c.softcap > 0;
  const T cc = (T)c.softcap, inv_c = cap ? (T)(1.0 / c.softcap) : T(1);
  const T eps_v = (T)(c.eps / V), on = (T)(1.0 - c.eps);
  const bool avx = simd::cpu_has_avx2_fma();
#pragma omp parallel for schedule(static)
  for (long long r = 0; r < c.rows; ++r) {
    T* zr = z + (size_t)r * V;
    const T gr = g[r];
    if (gr == T(0)) {
      std::fill(zr, zr + V, T(0));
      continue;
    }
    const T l = lse[r];
    const long long yr = y[r];
    const bool has_y = yr >= 0 && yr < V;
    const T zy = has_y ? zr[yr] : T(0);  // the raw logit of the target, before it is overwritten
    if (cap && capped) {  // z already holds c * tanh(u / c): the tanh is z / c
      for (int j = 0; j < V; ++j) {
        const T th = zr[j] * inv_c;
        zr[j] = gr * (std::exp(zr[j] - l) - eps_v) * (T(1) - th * th);
      }
    } else if (cap) {
      for (int j = 0; j < V; ++j) {
        const T th = std::tanh(zr[j] * inv_c);
        zr[j] = gr * (std::exp(cc * th - l) - eps_v) * (T(1) - th * th);
      }
    } else {
#ifdef GK_SIMD_X86
      if (sizeof(T) == 4 && avx)
        row_grad_avx2((float*)zr, V, (float)l, (float)gr, (float)eps_v);
      else
#endif
        for (int j = 0; j < V; ++j) zr[j] = gr * (std::exp(zr[j] - l) - eps_v);
    }
    if (has_y) {
      const T th = cap ? (capped ? zy * inv_c : std::tanh(zy * inv_c)) : T(0);
      zr[yr] -= gr * on * (cap ? T(1) - th * th : T(1));
    }
  }
}

}  // namespace

void lce_chunk_forward_cpu(DType dt, void* z, const int64_t* y, void* loss, void* lse, const LceChunk& c) {
  if (c.rows <= 0 || c.V <= 0) return;
  switch (dt) {
    case DType::F32:
      forward_rows<float>((float*)z, y, (float*)loss, (float*)lse, c);
      break;
    case DType::F64:
      forward_rows<double>((double*)z, y, (double*)loss, (double*)lse, c);
      break;
    default:
      throw Error(std::string("linear_cross_entropy cpu: unsupported dtype ") + dtype_name(dt));
  }
}

void lce_chunk_backward_cpu(DType dt, void* z, const int64_t* y, const void* lse, const void* g, const LceChunk& c,
                            bool z_capped) {
  if (c.rows <= 0 || c.V <= 0) return;
  switch (dt) {
    case DType::F32:
      backward_rows<float>((float*)z, y, (const float*)lse, (const float*)g, c, z_capped);
      break;
    case DType::F64:
      backward_rows<double>((double*)z, y, (const double*)lse, (const double*)g, c, z_capped);
      break;
    default:
      throw Error(std::string("linear_cross_entropy cpu: unsupported dtype ") + dtype_name(dt));
  }
}

}  // namespace gkcore
