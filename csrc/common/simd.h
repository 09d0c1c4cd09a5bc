// Small CPU building blocks shared by the fused CPU kernels: a runtime AVX2/FMA check, an 8-wide exp,
// and a register-tiled "C += A B" for the small matrix tiles of attention-like kernels.
//
// The library is compiled for the baseline x86-64 ISA (one wheel for every CPU); the AVX2 paths are
// separate functions with target attributes, chosen at run time (`cpu_has_avx2_fma()`). float64 and
// non-x86 builds use the plain loops, which the compiler vectorises for the baseline ISA.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define GK_SIMD_X86 1
#endif

#define GK_ALWAYS_INLINE inline __attribute__((always_inline))

namespace gkcore {
namespace simd {

inline bool cpu_has_avx2_fma() {
#ifdef GK_SIMD_X86
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

// ------------------------------------------------------------------------------------------- plain
// C[r * ldc + c] += sum_{t < K} A[r * ars + t * acs] * B[t * ldb + c]   for r < M, c0 <= c < NC
template <typename T>
GK_ALWAYS_INLINE void gemm_acc_plain(int M, int NC, int K, const T* A, long ars, long acs, const T* B, long ldb,
                                     T* C, long ldc, int c0 = 0) {
  for (int r = 0; r < M; ++r) {
    T* cr = C + r * ldc;
    for (int t = 0; t < K; ++t) {
      const T a = A[r * ars + t * acs];
      const T* b = B + t * ldb;
#pragma omp simd
      for (int c = c0; c < NC; ++c) cr[c] += a * b[c];
    }
  }
}

#ifdef GK_SIMD_X86
// exp(x) for 8 floats: 2^n * p(r) with n = round(x / ln 2), r = x - n ln 2 (two-part ln 2), p a degree-6
// polynomial (relative error about 2 ulp). x below -87.5 (and -inf) gives exactly 0; x is capped at 88.
__attribute__((target("avx2,fma"))) GK_ALWAYS_INLINE __m256 exp8(__m256 x) {
  const __m256 zero_below = _mm256_cmp_ps(x, _mm256_set1_ps(-87.5f), _CMP_GE_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.5f)), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.4426950408889634f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), zero_below);
}

__attribute__((target("avx2,fma"))) GK_ALWAYS_INLINE float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma"))) GK_ALWAYS_INLINE float hmax8(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// RR x 16 register tile: C[r, 0:16] += sum_t A[r, t] B[t, 0:16]
template <int RR>
__attribute__((target("avx2,fma"))) GK_ALWAYS_INLINE void tile16(int K, const float* A, long ars, long acs,
                                                                  const float* B, long ldb, float* C, long ldc) {
  __m256 lo[RR], hi[RR];
#pragma GCC unroll 6
  for (int r = 0; r < RR; ++r) {
    lo[r] = _mm256_loadu_ps(C + r * ldc);
    hi[r] = _mm256_loadu_ps(C + r * ldc + 8);
  }
  for (int t = 0; t < K; ++t) {
    const __m256 b0 = _mm256_loadu_ps(B + t * ldb);
    const __m256 b1 = _mm256_loadu_ps(B + t * ldb + 8);
    const float* a = A + t * acs;
#pragma GCC unroll 6
    for (int r = 0; r < RR; ++r) {
      const __m256 av = _mm256_broadcast_ss(a + r * ars);
      lo[r] = _mm256_fmadd_ps(av, b0, lo[r]);
      hi[r] = _mm256_fmadd_ps(av, b1, hi[r]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < RR; ++r) {
    _mm256_storeu_ps(C + r * ldc, lo[r]);
    _mm256_storeu_ps(C + r * ldc + 8, hi[r]);
  }
}

// RR x 8 register tile (the 8-wide column remainder)
template <int RR>
__attribute__((target("avx2,fma"))) GK_ALWAYS_INLINE void tile8(int K, const float* A, long ars, long acs,
                                                                 const float* B, long ldb, float* C, long ldc) {
  __m256 c[RR];
#pragma GCC unroll 6
  for (int r = 0; r < RR; ++r) c[r] = _mm256_loadu_ps(C + r * ldc);
  for (int t = 0; t < K; ++t) {
    const __m256 b0 = _mm256_loadu_ps(B + t * ldb);
    const float* a = A + t * acs;
#pragma GCC unroll 6
    for (int r = 0; r < RR; ++r) c[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(a + r * ars), b0, c[r]);
  }
#pragma GCC unroll 6
  for (int r = 0; r < RR; ++r) _mm256_storeu_ps(C + r * ldc, c[r]);
}

template <int W>
__attribute__((target("avx2,fma"))) GK_ALWAYS_INLINE void rows_tile(int M, int K, const float* A, long ars, long acs,
                                                                     const float* B, long ldb, float* C, long ldc) {
  int r = 0;
  for (; r + 6 <= M; r += 6) {
    if constexpr (W == 16) tile16<6>(K, A + r * ars, ars, acs, B, ldb, C + r * ldc, ldc);
    else tile8<6>(K, A + r * ars, ars, acs, B, ldb, C + r * ldc, ldc);
  }
  const float* Ar = A + r * ars;
  float* Cr = C + r * ldc;
#define GK_TILE_CASE(n)                                   \
  case n:                                                 \
    if constexpr (W == 16) tile16<n>(K, Ar, ars, acs, B, ldb, Cr, ldc); \
    else tile8<n>(K, Ar, ars, acs, B, ldb, Cr, ldc);      \
    break;
  switch (M - r) {
    GK_TILE_CASE(5)
    GK_TILE_CASE(4)
    GK_TILE_CASE(3)
    GK_TILE_CASE(2)
    GK_TILE_CASE(1)
    default: break;
  }
#undef GK_TILE_CASE
}

__attribute__((target("avx2,fma"), noinline)) inline void gemm_acc_avx2(int M, int NC, int K, const float* A,
                                                                        long ars, long acs, const float* B, long ldb,
                                                                        float* C, long ldc) {
  int c = 0;
  for (; c + 16 <= NC; c += 16) rows_tile<16>(M, K, A, ars, acs, B + c, ldb, C + c, ldc);
  for (; c + 8 <= NC; c += 8) rows_tile<8>(M, K, A, ars, acs, B + c, ldb, C + c, ldc);
  if (c < NC) gemm_acc_plain<float>(M, NC, K, A, ars, acs, B, ldb, C, ldc, c);
}
#endif

// C += A B with the AVX2 tiles when V (float only), plain loops otherwise.
template <typename T, bool V>
GK_ALWAYS_INLINE void gemm_acc(int M, int NC, int K, const T* A, long ars, long acs, const T* B, long ldb, T* C,
                               long ldc) {
  if (M <= 0 || NC <= 0 || K <= 0) return;
#ifdef GK_SIMD_X86
  if constexpr (V && sizeof(T) == 4) {
    gemm_acc_avx2(M, NC, K, (const float*)A, ars, acs, (const float*)B, ldb, (float*)C, ldc);
    return;
  }
#endif
  gemm_acc_plain<T>(M, NC, K, A, ars, acs, B, ldb, C, ldc);
}

}  // namespace simd
}  // namespace gkcore
