// info_nce on the CPU: the row passes over one chunk of BLAS-computed logits (see the header). float32
// rows run 8-wide AVX2 passes (exp of common/simd.h) when the CPU has them, plain loops otherwise (and
// for float64). Per row: max and sum of the logits, the sum of exp (log-sum-exp), the same for the
// soft-target logits, then the loss and, with grad, G = p - t in place.
#include "info_nce/info_nce.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "common/simd.h"

namespace gkcore {
namespace {

// ------------------------------------------------------------------------------------------- plain
template <typename T>
void max_sum_plain(const T* s, long long n, T* mx, double* sum) {
  T m = -std::numeric_limits<T>::infinity();
  double a = 0.0;
  for (long long j = 0; j < n; ++j) {
    m = std::max(m, s[j]);
    a += (double)s[j];
  }
  *mx = m;
  *sum = a;
}

template <typename T>
double exp_sum_plain(const T* s, long long n, T sub) {
  double a = 0.0;
  for (long long j = 0; j < n; ++j) a += (double)std::exp(s[j] - sub);
  return a;
}

// returns sum_j exp(sm_j - lm) s_j; with write, s_j <- exp(s_j - l) - cs exp(sm_j - lm) - ce
// (sm null: the soft terms are left out)
template <typename T>
double grad_plain(T* s, const T* sm, long long n, T l, T lm, T cs, T ce, bool write) {
  double w = 0.0;
  for (long long j = 0; j < n; ++j) {
    const T pm = sm ? std::exp(sm[j] - lm) : T(0);
    w += (double)(pm * s[j]);
    if (write) s[j] = std::exp(s[j] - l) - cs * pm - ce;
  }
  return w;
}

#ifdef GK_SIMD_X86
__attribute__((target("avx2,fma"), noinline)) void max_sum_avx2(const float* s, long long n, float* mx,
                                                                 double* sum) {
  __m256 m0 = _mm256_set1_ps(-std::numeric_limits<float>::infinity()), m1 = m0;
  __m256 a0 = _mm256_setzero_ps(), a1 = a0;
  long long j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m256 x = _mm256_loadu_ps(s + j), y = _mm256_loadu_ps(s + j + 8);
    m0 = _mm256_max_ps(m0, x);
    m1 = _mm256_max_ps(m1, y);
    a0 = _mm256_add_ps(a0, x);
    a1 = _mm256_add_ps(a1, y);
  }
  float m = simd::hmax8(_mm256_max_ps(m0, m1));
  double a = (double)simd::hsum8(a0) + (double)simd::hsum8(a1);
  for (; j < n; ++j) {
    m = std::max(m, s[j]);
    a += (double)s[j];
  }
  *mx = m;
  *sum = a;
}

__attribute__((target("avx2,fma"), noinline)) double exp_sum_avx2(const float* s, long long n, float sub) {
  const __m256 o = _mm256_set1_ps(sub);
  __m256 a0 = _mm256_setzero_ps(), a1 = a0;
  long long j = 0;
  for (; j + 16 <= n; j += 16) {
    a0 = _mm256_add_ps(a0, simd::exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), o)));
    a1 = _mm256_add_ps(a1, simd::exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j + 8), o)));
  }
  double a = (double)simd::hsum8(a0) + (double)simd::hsum8(a1);
  for (; j < n; ++j) a += (double)std::exp(s[j] - sub);
  return a;
}

__attribute__((target("avx2,fma"), noinline)) double grad_avx2(float* s, const float* sm, long long n, float l,
                                                               float lm, float cs, float ce, bool write) {
  const __m256 lv = _mm256_set1_ps(l), lmv = _mm256_set1_ps(lm), csv = _mm256_set1_ps(cs), cev = _mm256_set1_ps(ce);
  __m256 w0 = _mm256_setzero_ps();
  long long j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 x = _mm256_loadu_ps(s + j);
    __m256 g = _mm256_sub_ps(simd::exp8(_mm256_sub_ps(x, lv)), cev);
    if (sm) {
      const __m256 pm = simd::exp8(_mm256_sub_ps(_mm256_loadu_ps(sm + j), lmv));
      w0 = _mm256_fmadd_ps(pm, x, w0);
      g = _mm256_fnmadd_ps(csv, pm, g);
    }
    if (write) _mm256_storeu_ps(s + j, g);
  }
  double w = (double)simd::hsum8(w0);
  for (; j < n; ++j) {
    const float pm = sm ? std::exp(sm[j] - lm) : 0.0f;
    w += (double)(pm * s[j]);
    if (write) s[j] = std::exp(s[j] - l) - cs * pm - ce;
  }
  return w;
}
#endif

template <typename T>
void rows_impl(T* s, const T* sm, const int64_t* idx, const uint8_t* mask, const InfoNceRows& c, T* loss, T* lse,
               T* lse_m, bool grad) {
  const long long N = c.N;
  const T eps = (T)c.eps, alpha = (T)c.alpha;
  const T cy = (1 - eps) * (1 - alpha), cs = (1 - eps) * alpha, ce = eps / T(N);
  const bool soft = sm != nullptr;
#ifdef GK_SIMD_X86
  const bool avx = sizeof(T) == 4 && simd::cpu_has_avx2_fma();
#endif
#pragma omp parallel for schedule(static)
  for (long long r = 0; r < c.rows; ++r) {
    T* sr = s + r * N;
    const T* smr = soft ? sm + r * N : nullptr;
    T mx, mxm = T(0);
    double ssum, se, sem = 1.0, dummy;
#ifdef GK_SIMD_X86
    if (avx) {
      float m;
      max_sum_avx2((const float*)sr, N, &m, &ssum);
      mx = (T)m;
      se = exp_sum_avx2((const float*)sr, N, (float)mx);
      if (soft) {
        max_sum_avx2((const float*)smr, N, &m, &dummy);
        mxm = (T)m;
        sem = exp_sum_avx2((const float*)smr, N, (float)mxm);
      }
    } else
#endif
    {
      max_sum_plain(sr, N, &mx, &ssum);
      se = exp_sum_plain(sr, N, mx);
      if (soft) {
        max_sum_plain(smr, N, &mxm, &dummy);
        sem = exp_sum_plain(smr, N, mxm);
      }
    }
    const T lz = (T)std::log(se);
    const T l = mx + lz;
    const T lm = soft ? mxm + (T)std::log(sem) : T(0);
    lse[r] = l;
    if (soft) lse_m[r] = lm;
    // the positive's logit(s), read from the same buffer as the max and the sums
    bool valid;
    T pos = 0, cnt = 0;
    if (mask) {
      const uint8_t* mr = mask + r * N;
      double a = 0.0;
      for (long long j = 0; j < N; ++j)
        if (mr[j]) {
          a += (double)sr[j];
          cnt += 1;
        }
      valid = cnt > 0;
      if (valid) pos = (T)(a / (double)cnt);
    } else {
      const long long j = idx[r];
      valid = j >= 0 && j < N;
      if (valid) pos = sr[j];
    }
    const bool write = grad && valid;
    double wsum = 0.0;
    if (soft || write) {
#ifdef GK_SIMD_X86
      if (avx)
        wsum = grad_avx2((float*)sr, (const float*)smr, N, (float)l, (float)lm, (float)cs, (float)ce, write);
      else
#endif
        wsum = grad_plain(sr, smr, N, l, lm, cs, ce, write);
    }
    const T soft_t = soft ? (T)wsum : T(0);  // sum_j p^m_j s_j
    const T tsum = cy * pos + cs * soft_t + eps * (T)(ssum / (double)N);
    // log z + (m - tsum), not lse - tsum: lse is rounded at the size of the largest logit (about the
    // scale), while the loss of an easy row is far smaller; the difference is formed before rounding
    loss[r] = valid ? lz + (mx - tsum) : T(0);
    if (grad) {
      if (!valid) {
        std::fill(sr, sr + N, T(0));
      } else if (mask) {
        const uint8_t* mr = mask + r * N;
        const T yv = cy / cnt;
        for (long long j = 0; j < N; ++j)
          if (mr[j]) sr[j] -= yv;
      } else {
        sr[idx[r]] -= cy;
      }
    }
  }
}

}  // namespace

void info_nce_rows_cpu(DType dt, void* s, const void* sm, const int64_t* idx, const uint8_t* mask,
                       const InfoNceRows& c, void* loss, void* lse, void* lse_m, bool grad) {
  if (c.rows <= 0 || c.N <= 0) return;
  if ((idx == nullptr) == (mask == nullptr)) throw Error("info_nce (cpu): exactly one of idx / mask must be given");
  switch (dt) {
    case DType::F32:
      return rows_impl<float>((float*)s, (const float*)sm, idx, mask, c, (float*)loss, (float*)lse, (float*)lse_m,
                              grad);
    case DType::F64:
      return rows_impl<double>((double*)s, (const double*)sm, idx, mask, c, (double*)loss, (double*)lse,
                               (double*)lse_m, grad);
    default:
      throw Error(std::string("info_nce (cpu): unsupported dtype ") + dtype_name(dt));
  }
}

}  // namespace gkcore
