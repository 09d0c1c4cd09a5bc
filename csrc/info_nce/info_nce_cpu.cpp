// info_nce on the CPU: row blocks of 64 queries (one per OpenMP task, static schedule) sweep the keys in
// tiles of 96 with an online log-sum-exp. Logit tiles are kept transposed, S^T (keys x queries), so the
// per-row reductions (max, sum) run down the columns with full vectors. Small GEMMs use an AVX2/FMA
// 6x16 register kernel when the CPU has it (runtime check), plain loops otherwise (and for float64).
#include "info_nce/info_nce.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define GK_X86 1
#endif
#ifdef GKCORE_WITH_OPENMP
#include <omp.h>
#endif

namespace gkcore {
namespace {

constexpr int BM = 64;  // queries per row block (multiple of 16)
constexpr int BN = 96;  // keys per tile (multiple of 6)

#define GK_INLINE inline __attribute__((always_inline))

// ------------------------------------------------------------------------------------------ GEMM
// C[r * ldc + c] += sum_{kk < K} A[r * ars + kk * acs] * B[kk * ldb + c]   for r < R, c < NC
template <typename T>
GK_INLINE void gemm_acc_plain(int R, int NC, int K, const T* A, long ars, long acs, const T* B, long ldb, T* C,
                              long ldc, int c_begin = 0) {
  for (int r = 0; r < R; ++r) {
    T* cr = C + r * ldc;
    for (int kk = 0; kk < K; ++kk) {
      const T a = A[r * ars + kk * acs];
      if (a == T(0)) continue;
      const T* b = B + kk * ldb;
      for (int c = c_begin; c < NC; ++c) cr[c] += a * b[c];
    }
  }
}

#ifdef GK_X86
template <int RR>
__attribute__((target("avx2,fma"))) GK_INLINE void mk16(int K, const float* A, long ars, long acs, const float* B,
                                                         long ldb, float* C, long ldc) {
  __m256 c0[RR], c1[RR];
#pragma GCC unroll 6
  for (int r = 0; r < RR; ++r) {
    c0[r] = _mm256_loadu_ps(C + r * ldc);
    c1[r] = _mm256_loadu_ps(C + r * ldc + 8);
  }
  for (int kk = 0; kk < K; ++kk) {
    const __m256 b0 = _mm256_loadu_ps(B + kk * ldb);
    const __m256 b1 = _mm256_loadu_ps(B + kk * ldb + 8);
    const float* a = A + kk * acs;
#pragma GCC unroll 6
    for (int r = 0; r < RR; ++r) {
      const __m256 av = _mm256_broadcast_ss(a + r * ars);
      c0[r] = _mm256_fmadd_ps(av, b0, c0[r]);
      c1[r] = _mm256_fmadd_ps(av, b1, c1[r]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < RR; ++r) {
    _mm256_storeu_ps(C + r * ldc, c0[r]);
    _mm256_storeu_ps(C + r * ldc + 8, c1[r]);
  }
}

__attribute__((target("avx2,fma"), noinline)) void gemm_acc_avx2(int R, int NC, int K, const float* A, long ars,
                                                                 long acs, const float* B, long ldb, float* C,
                                                                 long ldc) {
  int c0 = 0;
  for (; c0 + 16 <= NC; c0 += 16) {
    int r0 = 0;
    for (; r0 + 6 <= R; r0 += 6) mk16<6>(K, A + r0 * ars, ars, acs, B + c0, ldb, C + r0 * ldc + c0, ldc);
    const float* Ar = A + r0 * ars;
    float* Cr = C + r0 * ldc + c0;
    switch (R - r0) {
      case 5: mk16<5>(K, Ar, ars, acs, B + c0, ldb, Cr, ldc); break;
      case 4: mk16<4>(K, Ar, ars, acs, B + c0, ldb, Cr, ldc); break;
      case 3: mk16<3>(K, Ar, ars, acs, B + c0, ldb, Cr, ldc); break;
      case 2: mk16<2>(K, Ar, ars, acs, B + c0, ldb, Cr, ldc); break;
      case 1: mk16<1>(K, Ar, ars, acs, B + c0, ldb, Cr, ldc); break;
      default: break;
    }
  }
  if (c0 < NC) gemm_acc_plain<float>(R, NC, K, A, ars, acs, B, ldb, C, ldc, c0);
}

// exp for x in [-87, 88]: 2^n * p(r), r = x - n ln2 (Cephes-style degree-6 polynomial, ~1 ulp)
__attribute__((target("avx2,fma"))) GK_INLINE __m256 exp256(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.0f)), _mm256_set1_ps(-87.0f));
  const __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500E-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507E-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073E-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894E-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459E-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201E-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  __m256i n = _mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127));
  n = _mm256_slli_epi32(n, 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(n));
}
#endif

#ifdef GK_X86
__attribute__((target("avx2,fma"), noinline)) void tile_exp_avx2(float* ST, int nb, const float* off, float* colsum) {
  for (int c = 0; c < BM; c += 8) {
    const __m256 o = _mm256_loadu_ps(off + c);
    __m256 acc = _mm256_setzero_ps();
    for (int j = 0; j < nb; ++j) {
      float* p = ST + j * BM + c;
      const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(p), o));
      _mm256_storeu_ps(p, e);
      acc = _mm256_add_ps(acc, e);
    }
    _mm256_storeu_ps(colsum + c, _mm256_add_ps(_mm256_loadu_ps(colsum + c), acc));
  }
}
#endif

// ST (nb x BM) <- exp(ST - off[col]); colsum[col] += sum over the nb rows. Columns: BM.
template <typename T, bool V>
GK_INLINE void tile_exp(T* ST, int nb, const T* off, T* colsum) {
#ifdef GK_X86
  if constexpr (V) {
    tile_exp_avx2(ST, nb, off, colsum);
    return;
  }
#endif
  for (int j = 0; j < nb; ++j) {
    T* p = ST + j * BM;
    for (int c = 0; c < BM; ++c) {
      p[c] = std::exp(p[c] - off[c]);
      colsum[c] += p[c];
    }
  }
}

template <typename T, bool V>
GK_INLINE void gemm_acc(int R, int NC, int K, const T* A, long ars, long acs, const T* B, long ldb, T* C, long ldc) {
#ifdef GK_X86
  if constexpr (V) {
    gemm_acc_avx2(R, NC, K, A, ars, acs, B, ldb, C, ldc);
    return;
  }
#endif
  gemm_acc_plain<T>(R, NC, K, A, ars, acs, B, ldb, C, ldc);
}

template <typename T>
struct Ctx {
  const T *q, *k, *qm;
  const int64_t* idx;
  const uint8_t* mask;
  long long M, N;
  int D;
  T scale, alpha, eps;
  bool soft;
};

template <typename T>
struct Scratch {
  std::vector<T> QT, QmT, ST, SmT, Ablk, Amblk, Yk;
  T m[BM], z[BM], mm[BM], zm[BM], W[BM], ssum[BM], msum[BM], cnt[BM], tm[BM], corr[BM], aux[BM], aux2[BM];
  void init(int D, bool soft, bool rows) {
    QT.assign((size_t)D * BM, T(0));
    ST.assign((size_t)BN * BM, T(0));
    if (soft) {
      QmT.assign((size_t)D * BM, T(0));
      SmT.assign((size_t)BN * BM, T(0));
    }
    if (rows) {
      Ablk.assign((size_t)BM * D, T(0));
      if (soft) Amblk.assign((size_t)BM * D, T(0));
      Yk.assign((size_t)BM * D, T(0));
    }
  }
};

// QT (D x BM) = scale * q[r0 + i, d], zero-padded columns
template <typename T>
GK_INLINE void pack_qt(const T* q, long long r0, int mb, int D, T scale, T* QT) {
  std::fill(QT, QT + (size_t)D * BM, T(0));
  for (int i = 0; i < mb; ++i) {
    const T* qi = q + (r0 + i) * (long long)D;
    for (int d = 0; d < D; ++d) QT[(size_t)d * BM + i] = scale * qi[d];
  }
}

// tm[c] = max over rows of ST; mnew = max(mold, tm); corr = exp(mold - mnew); mold <- mnew
template <typename T>
GK_INLINE void tile_max_update(const T* ST, int nb, T* mold, T* corr, T* tm) {
  for (int c = 0; c < BM; ++c) tm[c] = -std::numeric_limits<T>::infinity();
  for (int j = 0; j < nb; ++j) {
    const T* p = ST + j * BM;
    for (int c = 0; c < BM; ++c) tm[c] = std::max(tm[c], p[c]);
  }
  for (int c = 0; c < BM; ++c) {
    const T mn = std::max(mold[c], tm[c]);
    corr[c] = (mold[c] == -std::numeric_limits<T>::infinity()) ? T(0) : std::exp(mold[c] - mn);
    mold[c] = mn;
  }
}

template <typename T>
GK_INLINE void scale_rows(T* X, int mb, int D, const T* f) {
  for (int i = 0; i < mb; ++i) {
    T* x = X + (size_t)i * D;
    const T a = f[i];
    for (int d = 0; d < D; ++d) x[d] *= a;
  }
}

// ------------------------------------------------------------------------------------------ forward
template <typename T, bool V>
GK_INLINE void fwd_block(const Ctx<T>& c, long long r0, Scratch<T>& w, T* loss, T* lse, T* lse_m, T* A,
                         const T* ksum) {
  const int D = c.D;
  const long long N = c.N;
  const int mb = (int)std::min<long long>(BM, c.M - r0);
  const bool fused = A != nullptr;
  const T inf = std::numeric_limits<T>::infinity();
  pack_qt(c.q, r0, mb, D, c.scale, w.QT.data());
  if (c.soft) pack_qt(c.qm, r0, mb, D, c.scale, w.QmT.data());
  for (int i = 0; i < BM; ++i) {
    w.m[i] = -inf; w.z[i] = 0; w.mm[i] = -inf; w.zm[i] = 0; w.W[i] = 0; w.ssum[i] = 0; w.msum[i] = 0; w.cnt[i] = 0;
  }
  if (fused) {
    std::fill(w.Ablk.begin(), w.Ablk.end(), T(0));
    if (c.soft) std::fill(w.Amblk.begin(), w.Amblk.end(), T(0));
    if (c.mask) std::fill(w.Yk.begin(), w.Yk.end(), T(0));
  }
  T* ST = w.ST.data();
  T* SmT = c.soft ? w.SmT.data() : nullptr;
  for (long long j0 = 0; j0 < N; j0 += BN) {
    const int nb = (int)std::min<long long>(BN, N - j0);
    const T* Kb = c.k + j0 * D;
    std::fill(ST, ST + (size_t)nb * BM, T(0));
    gemm_acc<T, V>(nb, BM, D, Kb, D, 1, w.QT.data(), BM, ST, BM);
    if (c.eps > 0) {
      for (int j = 0; j < nb; ++j)
        for (int i = 0; i < BM; ++i) w.ssum[i] += ST[j * BM + i];
    }
    if (!c.mask) {
      // the positive's logit is read from the same tile as the max and the sum (not recomputed by a
      // separate dot product), so that m - pos is exactly 0 when the positive is the largest logit
      for (int i = 0; i < mb; ++i) {
        const long long j = c.idx[r0 + i];
        if (j >= j0 && j < j0 + nb) w.msum[i] = ST[(j - j0) * BM + i];
      }
    } else {
      for (int i = 0; i < mb; ++i) {
        const uint8_t* mr = c.mask + (r0 + i) * N + j0;
        for (int j = 0; j < nb; ++j) {
          if (!mr[j]) continue;
          w.msum[i] += ST[j * BM + i];
          w.cnt[i] += 1;
          if (fused) {
            T* y = w.Yk.data() + (size_t)i * D;
            const T* kj = Kb + (size_t)j * D;
            for (int d = 0; d < D; ++d) y[d] += kj[d];
          }
        }
      }
    }
    if (c.soft) {
      std::fill(SmT, SmT + (size_t)nb * BM, T(0));
      gemm_acc<T, V>(nb, BM, D, Kb, D, 1, w.QmT.data(), BM, SmT, BM);
      tile_max_update(SmT, nb, w.mm, w.corr, w.tm);
      for (int i = 0; i < BM; ++i) { w.zm[i] *= w.corr[i]; w.W[i] *= w.corr[i]; }
      if (fused) scale_rows(w.Amblk.data(), mb, D, w.corr);
      tile_exp<T, V>(SmT, nb, w.mm, w.zm);
      for (int j = 0; j < nb; ++j)
        for (int i = 0; i < BM; ++i) w.W[i] += SmT[j * BM + i] * ST[j * BM + i];
      if (fused) gemm_acc<T, V>(mb, D, nb, SmT, 1, BM, Kb, D, w.Amblk.data(), D);
    }
    tile_max_update(ST, nb, w.m, w.corr, w.tm);
    for (int i = 0; i < BM; ++i) w.z[i] *= w.corr[i];
    if (fused) scale_rows(w.Ablk.data(), mb, D, w.corr);
    tile_exp<T, V>(ST, nb, w.m, w.z);
    if (fused) gemm_acc<T, V>(mb, D, nb, ST, 1, BM, Kb, D, w.Ablk.data(), D);
  }
  const T eps = c.eps, alpha = c.alpha;
  const T cy = (1 - eps) * (1 - alpha), cs = (1 - eps) * alpha, ce = eps / T(N);
  for (int i = 0; i < mb; ++i) {
    const long long row = r0 + i;
    const T l = w.m[i] + std::log(w.z[i]);
    lse[row] = l;
    bool valid;
    T pos = 0;
    const T* ky = nullptr;
    if (c.mask) {
      valid = w.cnt[i] > 0;
      if (valid) pos = w.msum[i] / w.cnt[i];
    } else {
      const long long j = c.idx[row];
      valid = j >= 0;
      if (valid) {
        ky = c.k + j * D;
        pos = w.msum[i];
      }
    }
    T soft = 0, lm = 0;
    if (c.soft) {
      lm = w.mm[i] + std::log(w.zm[i]);
      lse_m[row] = lm;
      soft = w.W[i] / w.zm[i];
    }
    const T tsum = cy * pos + cs * soft + eps * (w.ssum[i] / T(N));
    // log z + (m - tsum), not lse - tsum: lse is rounded at the size of the largest logit (about the
    // scale), while the loss of an easy row is far smaller; the difference is formed before rounding
    loss[row] = valid ? std::log(w.z[i]) + (w.m[i] - tsum) : T(0);
    if (fused) {
      T* Ar = A + row * D;
      const T* ap = w.Ablk.data() + (size_t)i * D;
      const T iz = T(1) / w.z[i];
      for (int d = 0; d < D; ++d) Ar[d] = ap[d] * iz;
      if (c.soft) {
        const T* am = w.Amblk.data() + (size_t)i * D;
        const T f = cs / w.zm[i];
        for (int d = 0; d < D; ++d) Ar[d] -= f * am[d];
      }
      if (c.mask) {
        if (valid) {
          const T* y = w.Yk.data() + (size_t)i * D;
          const T f = cy / w.cnt[i];
          for (int d = 0; d < D; ++d) Ar[d] -= f * y[d];
        }
      } else if (ky) {
        for (int d = 0; d < D; ++d) Ar[d] -= cy * ky[d];
      }
      if (eps > 0)
        for (int d = 0; d < D; ++d) Ar[d] -= ce * ksum[d];
    }
  }
}

// ------------------------------------------------------------------------------------------ backward
template <typename T, bool V>
GK_INLINE void bwd_block(const Ctx<T>& c, long long r0, Scratch<T>& w, const T* lse, const T* lse_m, const T* g,
                         T* A, T* Cacc) {
  const int D = c.D;
  const long long N = c.N;
  const int mb = (int)std::min<long long>(BM, c.M - r0);
  const T eps = c.eps, alpha = c.alpha;
  const T cy = (1 - eps) * (1 - alpha), cs = (1 - eps) * alpha, ce = eps / T(N);
  pack_qt(c.q, r0, mb, D, c.scale, w.QT.data());
  if (c.soft) pack_qt(c.qm, r0, mb, D, c.scale, w.QmT.data());
  // per-row constants; aux = lse, aux2 = lse_m, W = g, cnt = 1 / mask count (0: none)
  for (int i = 0; i < BM; ++i) {
    const bool in = i < mb;
    w.aux[i] = in ? lse[r0 + i] : T(0);
    w.aux2[i] = (in && c.soft) ? lse_m[r0 + i] : T(0);
    w.W[i] = in ? g[r0 + i] : T(0);
    w.cnt[i] = 0;
  }
  if (c.mask) {
    for (int i = 0; i < mb; ++i) {
      const uint8_t* mr = c.mask + (r0 + i) * N;
      long long n = 0;
      for (long long j = 0; j < N; ++j) n += mr[j] != 0;
      w.cnt[i] = n > 0 ? T(1) / T(n) : T(0);
    }
  }
  if (A) std::fill(w.Ablk.begin(), w.Ablk.end(), T(0));
  for (int i = 0; i < BM; ++i) w.tm[i] = 0;
  T* ST = w.ST.data();
  T* SmT = c.soft ? w.SmT.data() : nullptr;
  for (long long j0 = 0; j0 < N; j0 += BN) {
    const int nb = (int)std::min<long long>(BN, N - j0);
    const T* Kb = c.k + j0 * D;
    std::fill(ST, ST + (size_t)nb * BM, T(0));
    gemm_acc<T, V>(nb, BM, D, Kb, D, 1, w.QT.data(), BM, ST, BM);
    tile_exp<T, V>(ST, nb, w.aux, w.tm);  // P^T (tm: unused column sums)
    if (c.soft) {
      std::fill(SmT, SmT + (size_t)nb * BM, T(0));
      gemm_acc<T, V>(nb, BM, D, Kb, D, 1, w.QmT.data(), BM, SmT, BM);
      tile_exp<T, V>(SmT, nb, w.aux2, w.tm);
      for (size_t e = 0; e < (size_t)nb * BM; ++e) ST[e] -= cs * SmT[e];
    }
    if (ce != T(0))
      for (size_t e = 0; e < (size_t)nb * BM; ++e) ST[e] -= ce;
    if (c.mask) {
      for (int i = 0; i < mb; ++i) {
        if (w.cnt[i] == T(0)) continue;
        const uint8_t* mr = c.mask + (r0 + i) * N + j0;
        const T f = cy * w.cnt[i];
        for (int j = 0; j < nb; ++j)
          if (mr[j]) ST[j * BM + i] -= f;
      }
    } else {
      for (int i = 0; i < mb; ++i) {
        const long long j = c.idx[r0 + i];
        if (j >= j0 && j < j0 + nb) ST[(j - j0) * BM + i] -= cy;
      }
    }
    // ST now holds G^T = (P - T)^T
    if (A) gemm_acc<T, V>(mb, D, nb, ST, 1, BM, Kb, D, w.Ablk.data(), D);
    if (Cacc) {
      for (int j = 0; j < nb; ++j)
        for (int i = 0; i < BM; ++i) ST[j * BM + i] *= w.W[i];
      gemm_acc<T, V>(nb, D, mb, ST, BM, 1, c.q + r0 * D, D, Cacc + j0 * D, D);
    }
  }
  if (A) std::memcpy(A + r0 * D, w.Ablk.data(), sizeof(T) * (size_t)mb * D);
}

#ifdef GK_X86
bool cpu_has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}
__attribute__((target("avx2,fma"))) void fwd_block_avx2(const Ctx<float>& c, long long r0, Scratch<float>& w,
                                                        float* loss, float* lse, float* lse_m, float* A,
                                                        const float* ksum) {
  fwd_block<float, true>(c, r0, w, loss, lse, lse_m, A, ksum);
}
__attribute__((target("avx2,fma"))) void bwd_block_avx2(const Ctx<float>& c, long long r0, Scratch<float>& w,
                                                        const float* lse, const float* lse_m, const float* g,
                                                        float* A, float* Cacc) {
  bwd_block<float, true>(c, r0, w, lse, lse_m, g, A, Cacc);
}
#else
bool cpu_has_avx2() { return false; }
#endif

template <typename T>
void fwd_dispatch(const Ctx<T>& c, long long r0, Scratch<T>& w, T* loss, T* lse, T* lse_m, T* A, const T* ksum) {
#ifdef GK_X86
  if constexpr (std::is_same<T, float>::value) {
    if (cpu_has_avx2()) return fwd_block_avx2(c, r0, w, loss, lse, lse_m, A, ksum);
  }
#endif
  fwd_block<T, false>(c, r0, w, loss, lse, lse_m, A, ksum);
}

template <typename T>
void bwd_dispatch(const Ctx<T>& c, long long r0, Scratch<T>& w, const T* lse, const T* lse_m, const T* g, T* A,
                  T* Cacc) {
#ifdef GK_X86
  if constexpr (std::is_same<T, float>::value) {
    if (cpu_has_avx2()) return bwd_block_avx2(c, r0, w, lse, lse_m, g, A, Cacc);
  }
#endif
  bwd_block<T, false>(c, r0, w, lse, lse_m, g, A, Cacc);
}

template <typename T>
Ctx<T> make_ctx(const void* q, const void* k, const void* qm, const int64_t* idx, const uint8_t* mask,
                const InfoNceShape& s) {
  if ((idx == nullptr) == (mask == nullptr)) throw Error("info_nce: exactly one of idx / mask must be given");
  if (s.M < 0 || s.N < 1 || s.D < 1) throw Error("info_nce: bad shape");
  Ctx<T> c;
  c.q = static_cast<const T*>(q);
  c.k = static_cast<const T*>(k);
  c.qm = static_cast<const T*>(qm);
  c.idx = idx;
  c.mask = mask;
  c.M = s.M;
  c.N = s.N;
  c.D = s.D;
  c.scale = (T)s.scale;
  c.alpha = (T)s.alpha;
  c.eps = (T)s.eps;
  c.soft = qm != nullptr && s.alpha > 0;
  return c;
}

int num_threads() {
#ifdef GKCORE_WITH_OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

template <typename T>
void forward_impl(const Ctx<T>& c, T* loss, T* lse, T* lse_m, T* A) {
  const long long nblk = (c.M + BM - 1) / BM;
  std::vector<T> ksum;
  if (A && c.eps > 0) {
    ksum.assign(c.D, T(0));
    for (long long j = 0; j < c.N; ++j)
      for (int d = 0; d < c.D; ++d) ksum[d] += c.k[j * c.D + d];
  }
  const T* ks = ksum.empty() ? nullptr : ksum.data();
#pragma omp parallel if (nblk > 1)
  {
    Scratch<T> w;
    w.init(c.D, c.soft, A != nullptr);
#pragma omp for schedule(static)
    for (long long b = 0; b < nblk; ++b) fwd_dispatch(c, b * BM, w, loss, lse, lse_m, A, ks);
  }
}

template <typename T>
void backward_impl(const Ctx<T>& c, const T* lse, const T* lse_m, const T* g, T* A, T* C) {
  const long long nblk = (c.M + BM - 1) / BM;
  const size_t ND = (size_t)c.N * c.D;
  const int nt = (int)std::max<long long>(1, std::min<long long>(num_threads(), nblk));
  // thread 0 accumulates into C itself, the others into private buffers reduced in a fixed order
  std::vector<std::vector<T>> priv(C ? nt - 1 : 0);
  if (C) std::fill(C, C + ND, T(0));
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    int tid = 0;
#ifdef GKCORE_WITH_OPENMP
    tid = omp_get_thread_num();
#endif
    Scratch<T> w;
    w.init(c.D, c.soft, A != nullptr);
    T* Cacc = nullptr;
    if (C) {
      if (tid == 0) {
        Cacc = C;
      } else {
        priv[tid - 1].assign(ND, T(0));
        Cacc = priv[tid - 1].data();
      }
    }
#pragma omp for schedule(static)
    for (long long b = 0; b < nblk; ++b) bwd_dispatch(c, b * BM, w, lse, lse_m, g, A, Cacc);
  }
  if (C && nt > 1) {
#pragma omp parallel for schedule(static)
    for (long long e = 0; e < (long long)ND; ++e) {
      T s = C[e];
      for (int t = 0; t < nt - 1; ++t) s += priv[t][e];
      C[e] = s;
    }
  }
}

}  // namespace

void info_nce_forward_cpu(DType dt, const void* q, const void* k, const void* qm, const int64_t* idx,
                          const uint8_t* mask, const InfoNceShape& s, void* loss, void* lse, void* lse_m, void* A) {
  if (dt == DType::F32) {
    forward_impl(make_ctx<float>(q, k, qm, idx, mask, s), static_cast<float*>(loss), static_cast<float*>(lse),
                 static_cast<float*>(lse_m), static_cast<float*>(A));
  } else if (dt == DType::F64) {
    forward_impl(make_ctx<double>(q, k, qm, idx, mask, s), static_cast<double*>(loss), static_cast<double*>(lse),
                 static_cast<double*>(lse_m), static_cast<double*>(A));
  } else {
    throw Error(std::string("info_nce cpu: unsupported dtype ") + dtype_name(dt) + " (float32, float64)");
  }
}

void info_nce_backward_cpu(DType dt, const void* q, const void* k, const void* qm, const int64_t* idx,
                           const uint8_t* mask, const InfoNceShape& s, const void* lse, const void* lse_m,
                           const void* g, void* A, void* C) {
  if (dt == DType::F32) {
    backward_impl(make_ctx<float>(q, k, qm, idx, mask, s), static_cast<const float*>(lse),
                  static_cast<const float*>(lse_m), static_cast<const float*>(g), static_cast<float*>(A),
                  static_cast<float*>(C));
  } else if (dt == DType::F64) {
    backward_impl(make_ctx<double>(q, k, qm, idx, mask, s), static_cast<const double*>(lse),
                  static_cast<const double*>(lse_m), static_cast<const double*>(g), static_cast<double*>(A),
                  static_cast<double*>(C));
  } else {
    throw Error(std::string("info_nce cpu: unsupported dtype ") + dtype_name(dt) + " (float32, float64)");
  }
}

}  // namespace gkcore
