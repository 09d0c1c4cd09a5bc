// CPU (OpenMP) region_attention: one task per (batch, head), static schedule; see the header.
//
// Per task: the patch keys/values of the head are packed into a contiguous (N, D) tile (any input
// strides), the R region keys/values are pooled from it with the factorised RoIAlign weights (each a
// sum over the cells of a small rectangle), giving the key tile [Kr; k] (L = R [+ N] rows, padded with
// masked zero keys to a multiple of 16) in both layouts (rows for P V and dS K, transposed for q K^T
// and dO V^T). Queries run in blocks of BP rows against key blocks of BL with an online softmax. The
// small products use register tiles (common/simd.h; AVX2/FMA when the CPU has it, float32).
//
// Backward (everything recomputed from q, k, v, lse): per block, P = exp(s - lse), dVa += P^T dO,
// dS = P (dO V^T - delta), dKa += dS^T q, dq += dS Ka; then dk, dv of the patches are the patch rows of
// dKa, dVa plus the pooling transpose W^T dKr, summed region by region in a fixed order.
#include "region_attention/region_attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "common/simd.h"
#include "region_pool/roi_math.h"

namespace gkcore {
namespace {

constexpr int BP = 64;   // query rows per block
constexpr int BL = 128;  // keys per block (a multiple of 16)

inline int round_up(int x, int m) { return (x + m - 1) / m * m; }

// --------------------------------------------------------------------------------- pooling weights
// Factorised pooling weights of the R regions of one batch item (bins averaged):
// W[r, row * gw + col] = wy[r, row] * wx[r, col] * sc[r], nonzero only for rows [r0, r1) x cols [c0, c1).
template <typename T>
struct Regions {
  long long b = -1;
  std::vector<T> wy, wx, sc;
  std::vector<int> r0, r1, c0, c1;

  void build(const T* boxes, long long bi, const RegionAttnShape& s) {
    if (bi == b) return;
    b = bi;
    const int R = s.R;
    wy.assign((size_t)R * s.gh, T(0));
    wx.assign((size_t)R * s.gw, T(0));
    sc.assign(R, T(0));
    r0.assign(R, 0);
    r1.assign(R, 0);
    c0.assign(R, 0);
    c1.assign(R, 0);
    for (int r = 0; r < R; ++r) {
      const T* bx = boxes + ((size_t)bi * R + r) * 4;
      const RoiGeom<T> g = roi_geom<T>(bx[0], bx[1], bx[2], bx[3], s.gh, s.gw, s.oh, s.ow, s.sampling_ratio,
                                       s.aligned);
      axis_weights(g, s.gh, s.gw, 0, s.oh, 0, s.ow, wy.data() + (size_t)r * s.gh, wx.data() + (size_t)r * s.gw,
                   &r0[r], &r1[r], &c0[r], &c1[r]);
      sc[r] = g.inv_count / T(s.oh * s.ow);
    }
  }
};

// dst (D) = sum_n W[r, n] src[n, :]   (src rows of D, row-major grid)
template <typename T>
void pool_region(const Regions<T>& g, int r, int gh, int gw, const T* src, int D, T* dst) {
  std::fill(dst, dst + D, T(0));
  const T* wy = g.wy.data() + (size_t)r * gh;
  const T* wx = g.wx.data() + (size_t)r * gw;
  for (int row = g.r0[r]; row < g.r1[r]; ++row) {
    const T a = wy[row] * g.sc[r];
    if (a == T(0)) continue;
    for (int col = g.c0[r]; col < g.c1[r]; ++col) {
      const T w = a * wx[col];
      if (w == T(0)) continue;
      const T* x = src + ((size_t)row * gw + col) * D;
#pragma omp simd
      for (int d = 0; d < D; ++d) dst[d] += w * x[d];
    }
  }
}

// dst[n, :] += W[r, n] grad (D)   (the pooling transpose of one region)
template <typename T>
void unpool_region(const Regions<T>& g, int r, int gh, int gw, const T* grad, int D, T* dst) {
  const T* wy = g.wy.data() + (size_t)r * gh;
  const T* wx = g.wx.data() + (size_t)r * gw;
  for (int row = g.r0[r]; row < g.r1[r]; ++row) {
    const T a = wy[row] * g.sc[r];
    if (a == T(0)) continue;
    for (int col = g.c0[r]; col < g.c1[r]; ++col) {
      const T w = a * wx[col];
      if (w == T(0)) continue;
      T* x = dst + ((size_t)row * gw + col) * D;
#pragma omp simd
      for (int d = 0; d < D; ++d) x[d] += w * grad[d];
    }
  }
}

// ------------------------------------------------------------------------------------- row helpers
// s[j] = -inf where valid[j] == 0; returns max_j s[j]
template <typename T>
T mask_max_plain(T* s, const T* valid, int n) {
  T m = -std::numeric_limits<T>::infinity();
  for (int j = 0; j < n; ++j) {
    if (valid[j] == T(0)) s[j] = -std::numeric_limits<T>::infinity();
    m = std::max(m, s[j]);
  }
  return m;
}

// s[j] = exp(s[j] - sub) (exactly 0 for s[j] = -inf); returns the sum
template <typename T>
T exp_sum_plain(T* s, int n, T sub) {
  T sum = T(0);
  for (int j = 0; j < n; ++j) {
    s[j] = std::exp(s[j] - sub);
    sum += s[j];
  }
  return sum;
}

// s[j] = valid[j] ? exp(s[j] - sub) : 0   (sub = +inf gives 0)
template <typename T>
void exp_mask_plain(T* s, int n, T sub, const T* valid) {
  for (int j = 0; j < n; ++j) s[j] = valid[j] != T(0) ? std::exp(s[j] - sub) : T(0);
}

// dp[j] = p[j] * (dp[j] - delta)
template <typename T>
void dsoft_plain(T* dp, const T* p, int n, T delta) {
  for (int j = 0; j < n; ++j) dp[j] = p[j] * (dp[j] - delta);
}

#ifdef GK_SIMD_X86
__attribute__((target("avx2,fma"), noinline)) float mask_max_avx2(float* s, const float* valid, int n) {
  const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  const __m256 zero = _mm256_setzero_ps();
  __m256 mx = ninf;
  int j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 keep = _mm256_cmp_ps(_mm256_loadu_ps(valid + j), zero, _CMP_NEQ_OQ);
    const __m256 x = _mm256_blendv_ps(ninf, _mm256_loadu_ps(s + j), keep);
    _mm256_storeu_ps(s + j, x);
    mx = _mm256_max_ps(mx, x);
  }
  float m = simd::hmax8(mx);
  for (; j < n; ++j) {
    if (valid[j] == 0.0f) s[j] = -std::numeric_limits<float>::infinity();
    m = std::max(m, s[j]);
  }
  return m;
}

__attribute__((target("avx2,fma"), noinline)) float exp_sum_avx2(float* s, int n, float sub) {
  const __m256 o = _mm256_set1_ps(sub);
  __m256 acc = _mm256_setzero_ps();
  int j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 e = simd::exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), o));
    _mm256_storeu_ps(s + j, e);
    acc = _mm256_add_ps(acc, e);
  }
  float sum = simd::hsum8(acc);
  for (; j < n; ++j) {
    s[j] = std::exp(s[j] - sub);
    sum += s[j];
  }
  return sum;
}

__attribute__((target("avx2,fma"), noinline)) void exp_mask_avx2(float* s, int n, float sub, const float* valid) {
  const __m256 o = _mm256_set1_ps(sub);
  int j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 e = simd::exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), o));
    _mm256_storeu_ps(s + j, _mm256_mul_ps(e, _mm256_loadu_ps(valid + j)));
  }
  for (; j < n; ++j) s[j] = valid[j] != 0.0f ? std::exp(s[j] - sub) : 0.0f;
}

__attribute__((target("avx2,fma"), noinline)) void dsoft_avx2(float* dp, const float* p, int n, float delta) {
  const __m256 dl = _mm256_set1_ps(delta);
  int j = 0;
  for (; j + 8 <= n; j += 8)
    _mm256_storeu_ps(dp + j, _mm256_mul_ps(_mm256_loadu_ps(p + j), _mm256_sub_ps(_mm256_loadu_ps(dp + j), dl)));
  for (; j < n; ++j) dp[j] = p[j] * (dp[j] - delta);
}
#endif

template <typename T, bool V>
GK_ALWAYS_INLINE T mask_max(T* s, const T* valid, int n) {
#ifdef GK_SIMD_X86
  if constexpr (V && sizeof(T) == 4) return mask_max_avx2((float*)s, (const float*)valid, n);
#endif
  return mask_max_plain(s, valid, n);
}

template <typename T, bool V>
GK_ALWAYS_INLINE T exp_sum(T* s, int n, T sub) {
#ifdef GK_SIMD_X86
  if constexpr (V && sizeof(T) == 4) return exp_sum_avx2((float*)s, n, (float)sub);
#endif
  return exp_sum_plain(s, n, sub);
}

template <typename T, bool V>
GK_ALWAYS_INLINE void exp_mask(T* s, int n, T sub, const T* valid) {
#ifdef GK_SIMD_X86
  if constexpr (V && sizeof(T) == 4) return exp_mask_avx2((float*)s, n, (float)sub, (const float*)valid);
#endif
  exp_mask_plain(s, n, sub, valid);
}

template <typename T, bool V>
GK_ALWAYS_INLINE void dsoft(T* dp, const T* p, int n, T delta) {
#ifdef GK_SIMD_X86
  if constexpr (V && sizeof(T) == 4) return dsoft_avx2((float*)dp, (const float*)p, n, (float)delta);
#endif
  dsoft_plain(dp, p, n, delta);
}

// ------------------------------------------------------------------------------------------ tiles
template <typename T>
struct Work {
  int L = 0, Lp = 0;
  std::vector<T> K, Vv;    // (N, D) packed patch keys / values of the head
  std::vector<T> Ka, Va;   // (Lp, D) keys [Kr; k] and values [Vr; v], zero rows past L
  std::vector<T> KT, VT;   // (D, Lp) the same, transposed
  std::vector<T> Q;        // (P, D) scale * q
  std::vector<T> valid;    // (Lp,) 1 for a key that takes part, 0 for masked regions and padding
  std::vector<T> S, dP;    // (BP, BL) score / probability and gradient tiles
  std::vector<T> acc;      // (BP, D) output accumulator (forward), dq accumulator (backward: (P, D))
  std::vector<T> m, l;     // (BP,) running max and sum
  std::vector<T> dKa, dVa; // (Lp, D) key / value gradients (backward)
  std::vector<T> delta;    // (P,) rowsum(dO * O)
};

template <typename T>
void pack(const T* src, long long s_n, long long s_d, int rows, int D, T mul, T* dst) {
  for (int n = 0; n < rows; ++n) {
    const T* x = src + n * s_n;
    T* y = dst + (size_t)n * D;
    if (s_d == 1) {
#pragma omp simd
      for (int d = 0; d < D; ++d) y[d] = mul * x[d];
    } else {
      for (int d = 0; d < D; ++d) y[d] = mul * x[d * s_d];
    }
  }
}

template <typename T>
void transpose(const T* src, int rows, int D, int ld_dst, T* dst) {  // dst[d * ld_dst + j] = src[j * D + d]
  for (int j = 0; j < rows; ++j)
    for (int d = 0; d < D; ++d) dst[(size_t)d * ld_dst + j] = src[(size_t)j * D + d];
}

// Builds the key and value tiles of head (b, h) in w: Ka / Va rows, KT always, VT when want_vt.
template <typename T>
void build_keys(const T* k, const T* v, const uint8_t* mask, long long b, int h, const RegionAttnShape& s,
                const Regions<T>& g, bool want_va, bool want_vt, Work<T>& w) {
  const int N = s.N, D = s.D, R = s.R;
  const int L = R + (s.attend_patches ? N : 0);
  const int Lp = round_up(std::max(L, 1), 16);
  w.L = L;
  w.Lp = Lp;
  w.K.resize((size_t)N * D);
  w.Vv.resize((size_t)N * D);
  pack(k + b * s.sk[0] + h * s.sk[1], s.sk[2], s.sk[3], N, D, T(1), w.K.data());
  pack(v + b * s.sv[0] + h * s.sv[1], s.sv[2], s.sv[3], N, D, T(1), w.Vv.data());
  w.Ka.assign((size_t)Lp * D, T(0));
  w.Va.assign((size_t)Lp * D, T(0));
  for (int r = 0; r < R; ++r) {
    pool_region(g, r, s.gh, s.gw, w.K.data(), D, w.Ka.data() + (size_t)r * D);
    pool_region(g, r, s.gh, s.gw, w.Vv.data(), D, w.Va.data() + (size_t)r * D);
  }
  if (s.attend_patches) {
    std::memcpy(w.Ka.data() + (size_t)R * D, w.K.data(), sizeof(T) * N * D);
    std::memcpy(w.Va.data() + (size_t)R * D, w.Vv.data(), sizeof(T) * N * D);
  }
  w.KT.assign((size_t)D * Lp, T(0));
  transpose(w.Ka.data(), L, D, Lp, w.KT.data());
  if (want_vt) {
    w.VT.assign((size_t)D * Lp, T(0));
    transpose(w.Va.data(), L, D, Lp, w.VT.data());
  }
  (void)want_va;
  w.valid.assign(Lp, T(0));
  const uint8_t* mb = mask ? mask + b * R : nullptr;
  for (int j = 0; j < L; ++j) w.valid[j] = (j < R && mb && !mb[j]) ? T(0) : T(1);
}

// ---------------------------------------------------------------------------------------- forward
template <typename T, bool V>
void forward_task(const T* q, const T* k, const T* v, const T* boxes, const uint8_t* mask, T* out, T* lse, T* weights,
                  long long b, int h, const RegionAttnShape& s, Regions<T>& g, Work<T>& w) {
  const int P = s.P, D = s.D;
  const T inf = std::numeric_limits<T>::infinity();
  g.build(boxes, b, s);
  build_keys(k, v, mask, b, h, s, g, true, false, w);
  const int L = w.L, Lp = w.Lp;
  w.Q.resize((size_t)P * D);
  pack(q + b * s.sq[0] + h * s.sq[1], s.sq[2], s.sq[3], P, D, (T)s.scale, w.Q.data());
  w.S.resize((size_t)BP * BL);
  w.acc.resize((size_t)BP * D);
  w.m.resize(BP);
  w.l.resize(BP);
  const long long bh = b * s.H + h;
  T* ob = out + bh * P * D;
  T* lb = lse + bh * P;
  T* wb = weights ? weights + bh * P * L : nullptr;
  for (int p0 = 0; p0 < P; p0 += BP) {
    const int pb = std::min(BP, P - p0);
    std::fill(w.m.begin(), w.m.end(), -inf);
    std::fill(w.l.begin(), w.l.end(), T(0));
    std::fill(w.acc.begin(), w.acc.end(), T(0));
    for (int j0 = 0; j0 < Lp; j0 += BL) {
      const int nb = std::min(BL, Lp - j0);
      T* S = w.S.data();
      for (int i = 0; i < pb; ++i) std::fill(S + (size_t)i * BL, S + (size_t)i * BL + nb, T(0));
      simd::gemm_acc<T, V>(pb, nb, D, w.Q.data() + (size_t)p0 * D, D, 1, w.KT.data() + j0, Lp, S, BL);
      for (int i = 0; i < pb; ++i) {
        T* si = S + (size_t)i * BL;
        const T mx = mask_max<T, V>(si, w.valid.data() + j0, nb);
        if (wb) {  // park the raw scores; normalised once the row's log-sum-exp is known
          const int nj = std::min(nb, L - j0);
          if (nj > 0) std::memcpy(wb + (size_t)(p0 + i) * L + j0, si, sizeof(T) * nj);
        }
        const T mo = w.m[i];
        const T mn = std::max(mo, mx);
        if (mn == -inf) {  // every key so far masked
          std::fill(si, si + nb, T(0));
          continue;
        }
        const T alpha = mo == -inf ? T(0) : std::exp(mo - mn);
        const T rs = exp_sum<T, V>(si, nb, mn);
        w.l[i] = w.l[i] * alpha + rs;
        if (alpha != T(1)) {
          T* a = w.acc.data() + (size_t)i * D;
#pragma omp simd
          for (int d = 0; d < D; ++d) a[d] *= alpha;
        }
        w.m[i] = mn;
      }
      simd::gemm_acc<T, V>(pb, D, nb, S, BL, 1, w.Va.data() + (size_t)j0 * D, D, w.acc.data(), D);
    }
    for (int i = 0; i < pb; ++i) {
      const T li = w.l[i];
      T* o = ob + (size_t)(p0 + i) * D;
      const T* a = w.acc.data() + (size_t)i * D;
      if (li > T(0)) {
        const T inv = T(1) / li;
        for (int d = 0; d < D; ++d) o[d] = a[d] * inv;
        lb[p0 + i] = w.m[i] + std::log(li);
      } else {
        std::fill(o, o + D, T(0));
        lb[p0 + i] = inf;
      }
      if (wb) {
        T* wr = wb + (size_t)(p0 + i) * L;
        const T lr = lb[p0 + i];
        for (int j = 0; j < L; ++j) wr[j] = std::exp(wr[j] - lr);  // masked (-inf) and all-masked rows: 0
      }
    }
  }
}

// --------------------------------------------------------------------------------------- backward
template <typename T, bool V>
void backward_task(const T* q, const T* k, const T* v, const T* boxes, const uint8_t* mask, const T* go,
                   const T* out, const T* lse, T* dq, T* dk, T* dv, long long b, int h, const RegionAttnShape& s,
                   Regions<T>& g, Work<T>& w) {
  const int P = s.P, D = s.D, N = s.N, R = s.R;
  g.build(boxes, b, s);
  build_keys(k, v, mask, b, h, s, g, false, true, w);
  const int Lp = w.Lp;
  w.Q.resize((size_t)P * D);
  pack(q + b * s.sq[0] + h * s.sq[1], s.sq[2], s.sq[3], P, D, (T)s.scale, w.Q.data());
  const long long bh = b * s.H + h;
  const T* dO = go + bh * P * D;
  const T* O = out + bh * P * D;
  const T* lb = lse + bh * P;
  w.delta.resize(P);
  for (int i = 0; i < P; ++i) {
    T acc = T(0);
    for (int d = 0; d < D; ++d) acc += dO[(size_t)i * D + d] * O[(size_t)i * D + d];
    w.delta[i] = acc;
  }
  w.S.resize((size_t)BP * BL);
  w.dP.resize((size_t)BP * BL);
  w.acc.assign((size_t)P * D, T(0));
  w.dKa.assign((size_t)Lp * D, T(0));
  w.dVa.assign((size_t)Lp * D, T(0));
  for (int p0 = 0; p0 < P; p0 += BP) {
    const int pb = std::min(BP, P - p0);
    const T* Qb = w.Q.data() + (size_t)p0 * D;
    const T* dOb = dO + (size_t)p0 * D;
    for (int j0 = 0; j0 < Lp; j0 += BL) {
      const int nb = std::min(BL, Lp - j0);
      T* S = w.S.data();
      T* dP = w.dP.data();
      for (int i = 0; i < pb; ++i) {
        std::fill(S + (size_t)i * BL, S + (size_t)i * BL + nb, T(0));
        std::fill(dP + (size_t)i * BL, dP + (size_t)i * BL + nb, T(0));
      }
      simd::gemm_acc<T, V>(pb, nb, D, Qb, D, 1, w.KT.data() + j0, Lp, S, BL);
      for (int i = 0; i < pb; ++i) exp_mask<T, V>(S + (size_t)i * BL, nb, lb[p0 + i], w.valid.data() + j0);
      // dVa[j] += sum_i P[i, j] dO[i]
      simd::gemm_acc<T, V>(nb, D, pb, S, 1, BL, dOb, D, w.dVa.data() + (size_t)j0 * D, D);
      // dP = dO V^T, then dS = P (dP - delta)
      simd::gemm_acc<T, V>(pb, nb, D, dOb, D, 1, w.VT.data() + j0, Lp, dP, BL);
      for (int i = 0; i < pb; ++i) dsoft<T, V>(dP + (size_t)i * BL, S + (size_t)i * BL, nb, w.delta[p0 + i]);
      // dKa[j] += sum_i dS[i, j] (scale q_i);  dq_i += sum_j dS[i, j] Ka[j]  (times scale below)
      simd::gemm_acc<T, V>(nb, D, pb, dP, 1, BL, Qb, D, w.dKa.data() + (size_t)j0 * D, D);
      simd::gemm_acc<T, V>(pb, D, nb, dP, BL, 1, w.Ka.data() + (size_t)j0 * D, D, w.acc.data() + (size_t)p0 * D, D);
    }
  }
  const T sc = (T)s.scale;
  T* dqb = dq + bh * P * D;
  for (size_t i = 0; i < (size_t)P * D; ++i) dqb[i] = sc * w.acc[i];
  T* dkb = dk + bh * N * D;
  T* dvb = dv + bh * N * D;
  if (s.attend_patches) {
    std::memcpy(dkb, w.dKa.data() + (size_t)R * D, sizeof(T) * N * D);
    std::memcpy(dvb, w.dVa.data() + (size_t)R * D, sizeof(T) * N * D);
  } else {
    std::fill(dkb, dkb + (size_t)N * D, T(0));
    std::fill(dvb, dvb + (size_t)N * D, T(0));
  }
  for (int r = 0; r < R; ++r) {
    unpool_region(g, r, s.gh, s.gw, w.dKa.data() + (size_t)r * D, D, dkb);
    unpool_region(g, r, s.gh, s.gw, w.dVa.data() + (size_t)r * D, D, dvb);
  }
}

// ------------------------------------------------------------------------------------------ drivers
template <typename T, bool V>
void forward_all(const T* q, const T* k, const T* v, const T* boxes, const uint8_t* mask, T* out, T* lse, T* weights,
                 const RegionAttnShape& s) {
  const long long tasks = (long long)s.B * s.H;
#pragma omp parallel
  {
    Regions<T> g;
    Work<T> w;
#pragma omp for schedule(static)
    for (long long t = 0; t < tasks; ++t)
      forward_task<T, V>(q, k, v, boxes, mask, out, lse, weights, t / s.H, (int)(t % s.H), s, g, w);
  }
}

template <typename T, bool V>
void backward_all(const T* q, const T* k, const T* v, const T* boxes, const uint8_t* mask, const T* go, const T* out,
                  const T* lse, T* dq, T* dk, T* dv, const RegionAttnShape& s) {
  const long long tasks = (long long)s.B * s.H;
#pragma omp parallel
  {
    Regions<T> g;
    Work<T> w;
#pragma omp for schedule(static)
    for (long long t = 0; t < tasks; ++t)
      backward_task<T, V>(q, k, v, boxes, mask, go, out, lse, dq, dk, dv, t / s.H, (int)(t % s.H), s, g, w);
  }
}

void check(const RegionAttnShape& s) {
  if (s.B < 0 || s.H < 0 || s.P < 0 || s.R < 0 || s.D <= 0 || s.gh <= 0 || s.gw <= 0 || s.N != s.gh * s.gw ||
      s.oh <= 0 || s.ow <= 0)
    throw Error("region_attention (cpu): bad shape");
}

}  // namespace

void region_attention_forward_cpu(DType dt, const void* q, const void* k, const void* v, const void* boxes,
                                  const uint8_t* mask, void* out, void* lse, void* weights, const RegionAttnShape& s) {
  check(s);
  if ((long long)s.B * s.H * s.P == 0) return;
  const bool avx = simd::cpu_has_avx2_fma();
  switch (dt) {
    case DType::F32:
      if (avx)
        return forward_all<float, true>((const float*)q, (const float*)k, (const float*)v, (const float*)boxes, mask,
                                        (float*)out, (float*)lse, (float*)weights, s);
      return forward_all<float, false>((const float*)q, (const float*)k, (const float*)v, (const float*)boxes, mask,
                                       (float*)out, (float*)lse, (float*)weights, s);
    case DType::F64:
      return forward_all<double, false>((const double*)q, (const double*)k, (const double*)v, (const double*)boxes,
                                        mask, (double*)out, (double*)lse, (double*)weights, s);
    default:
      throw Error(std::string("region_attention (cpu): unsupported dtype ") + dtype_name(dt));
  }
}

void region_attention_backward_cpu(DType dt, const void* q, const void* k, const void* v, const void* boxes,
                                   const uint8_t* mask, const void* grad_out, const void* out, const void* lse,
                                   void* dq, void* dk, void* dv, const RegionAttnShape& s) {
  check(s);
  if ((long long)s.B * s.H == 0) return;
  const bool avx = simd::cpu_has_avx2_fma();
  switch (dt) {
    case DType::F32:
      if (avx)
        return backward_all<float, true>((const float*)q, (const float*)k, (const float*)v, (const float*)boxes,
                                         mask, (const float*)grad_out, (const float*)out, (const float*)lse,
                                         (float*)dq, (float*)dk, (float*)dv, s);
      return backward_all<float, false>((const float*)q, (const float*)k, (const float*)v, (const float*)boxes, mask,
                                        (const float*)grad_out, (const float*)out, (const float*)lse, (float*)dq,
                                        (float*)dk, (float*)dv, s);
    case DType::F64:
      return backward_all<double, false>((const double*)q, (const double*)k, (const double*)v,
                                         (const double*)boxes, mask, (const double*)grad_out, (const double*)out,
                                         (const double*)lse, (double*)dq, (double*)dk, (double*)dv, s);
    default:
      throw Error(std::string("region_attention (cpu): unsupported dtype ") + dtype_name(dt));
  }
}

}  // namespace gkcore
