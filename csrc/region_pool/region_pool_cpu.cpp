// CPU (OpenMP) region_pool. Forward: one task per (batch, region). Backward: one task per
// (batch, channel chunk), each walking regions, bins and samples in a fixed order, so the result is
// bitwise reproducible whatever the thread count.
//
// With reduce (bins averaged into one feature per region) the RoIAlign weights factor into row x column
// weights (axis_weights in roi_math.h): a region is the weighted sum of the cells of a small rectangle,
// each cell read once, whatever the number of bins and samples (output_size 7 has 49 bins x 4 samples x
// 4 corners per region, mostly the same few cells), and the backward adds at most R terms per cell.
#include <algorithm>
#include <cstring>
#include <vector>

#include "region_pool/region_pool.h"
#include "region_pool/roi_math.h"

namespace gkcore {
namespace {

template <typename T>
void forward_impl(const T* tokens, const T* boxes, T* out, const RegionPoolShape& s) {
  const int N = s.gh * s.gw, C = s.C, nb = s.oh * s.ow;
  const long long tasks = (long long)s.B * s.R;
#pragma omp parallel
  {
    std::vector<T> acc((size_t)C), wy((size_t)s.gh), wx((size_t)s.gw);
#pragma omp for schedule(static)
    for (long long t = 0; t < tasks; ++t) {
      const int b = (int)(t / s.R);
      const T* bx = boxes + t * 4;
      const T* tok = tokens + (size_t)b * N * C;
      const RoiGeom<T> g = roi_geom<T>(bx[0], bx[1], bx[2], bx[3], s.gh, s.gw, s.oh, s.ow,
                                       s.sampling_ratio, s.aligned);
      T* o_region = out + (size_t)t * (s.reduce ? 1 : nb) * C;
      if (s.reduce) {
        int r0, r1, c0, c1;
        axis_weights(g, s.gh, s.gw, 0, s.oh, 0, s.ow, wy.data(), wx.data(), &r0, &r1, &c0, &c1);
        const T scale = g.inv_count / T(nb);
        std::fill(o_region, o_region + C, T(0));
        for (int row = r0; row < r1; ++row) {
          const T a = wy[row] * scale;
          if (a == T(0)) continue;
          for (int col = c0; col < c1; ++col) {
            const T w = a * wx[col];
            if (w == T(0)) continue;
            const T* x = tok + ((size_t)row * s.gw + col) * C;
#pragma omp simd
            for (int c = 0; c < C; ++c) o_region[c] += w * x[c];
          }
        }
        continue;
      }
      for (int ph = 0; ph < s.oh; ++ph) {
        for (int pw = 0; pw < s.ow; ++pw) {
          std::fill(acc.begin(), acc.end(), T(0));
          for (int iy = 0; iy < g.grid_h; ++iy) {
            for (int ix = 0; ix < g.grid_w; ++ix) {
              T y, x;
              sample_point(g, ph, pw, iy, ix, &y, &x);
              int idx[4];
              T w[4];
              if (!bilinear(y, x, s.gh, s.gw, idx, w)) continue;
              const T* r0 = tok + (size_t)idx[0] * C;
              const T* r1 = tok + (size_t)idx[1] * C;
              const T* r2 = tok + (size_t)idx[2] * C;
              const T* r3 = tok + (size_t)idx[3] * C;
              T* a = acc.data();
#pragma omp simd
              for (int c = 0; c < C; ++c) a[c] += w[0] * r0[c] + w[1] * r1[c] + w[2] * r2[c] + w[3] * r3[c];
            }
          }
          T* o = o_region + (size_t)(ph * s.ow + pw) * C;
          for (int c = 0; c < C; ++c) o[c] = acc[c] * g.inv_count;
        }
      }
    }
  }
}

// reduce: grad_tokens[b, n] = sum_r W[r, n] grad_out[b, r] with the factorised weights, regions in a
// fixed order; one task per (batch, channel chunk), its (N, chunk) slice accumulated in place.
template <typename T>
void backward_reduce(const T* grad_out, const T* boxes, T* grad_tokens, const RegionPoolShape& s) {
  const int N = s.gh * s.gw, C = s.C, nb = s.oh * s.ow, R = s.R;
  const int chunk = std::max(16, std::min(C, 256));
  const int nchunks = (C + chunk - 1) / chunk;
  const long long tasks = (long long)s.B * nchunks;
#pragma omp parallel
  {
    std::vector<T> wy((size_t)R * s.gh), wx((size_t)R * s.gw), sc(R);
    std::vector<int> rr((size_t)R * 4);
    int b_done = -1;
#pragma omp for schedule(static)
    for (long long t = 0; t < tasks; ++t) {
      const int b = (int)(t / nchunks);
      const int c0 = (int)(t % nchunks) * chunk;
      const int w_ = std::min(C, c0 + chunk) - c0;
      if (b != b_done) {  // the weights of batch item b, shared by its channel chunks
        for (int r = 0; r < R; ++r) {
          const T* bx = boxes + ((size_t)b * R + r) * 4;
          const RoiGeom<T> g = roi_geom<T>(bx[0], bx[1], bx[2], bx[3], s.gh, s.gw, s.oh, s.ow, s.sampling_ratio,
                                           s.aligned);
          int* q = rr.data() + (size_t)r * 4;
          axis_weights(g, s.gh, s.gw, 0, s.oh, 0, s.ow, wy.data() + (size_t)r * s.gh, wx.data() + (size_t)r * s.gw,
                       q, q + 1, q + 2, q + 3);
          sc[r] = g.inv_count / T(nb);
        }
        b_done = b;
      }
      T* gt = grad_tokens + (size_t)b * N * C + c0;
      for (int n = 0; n < N; ++n) std::fill(gt + (size_t)n * C, gt + (size_t)n * C + w_, T(0));
      for (int r = 0; r < R; ++r) {
        const int* q = rr.data() + (size_t)r * 4;
        const T* go = grad_out + ((size_t)b * R + r) * C + c0;
        const T* wyr = wy.data() + (size_t)r * s.gh;
        const T* wxr = wx.data() + (size_t)r * s.gw;
        for (int row = q[0]; row < q[1]; ++row) {
          const T a = wyr[row] * sc[r];
          if (a == T(0)) continue;
          for (int col = q[2]; col < q[3]; ++col) {
            const T w = a * wxr[col];
            if (w == T(0)) continue;
            T* dst = gt + ((size_t)row * s.gw + col) * C;
#pragma omp simd
            for (int c = 0; c < w_; ++c) dst[c] += w * go[c];
          }
        }
      }
    }
  }
}

template <typename T>
void backward_impl(const T* grad_out, const T* boxes, T* grad_tokens, const RegionPoolShape& s) {
  if (s.reduce) return backward_reduce(grad_out, boxes, grad_tokens, s);
  const int N = s.gh * s.gw, C = s.C, nb = s.oh * s.ow;
  // Channel chunks give parallelism when B is small; each chunk is owned by one task.
  const int chunk = std::max(16, std::min(C, 256));
  const int nchunks = (C + chunk - 1) / chunk;
  const long long tasks = (long long)s.B * nchunks;
  // Each token can receive thousands of contributions (regions x bins x samples x corners): they are
  // summed in double, then rounded once, so the result does not drift with the number of regions.
#pragma omp parallel
  {
  std::vector<double> acc;
#pragma omp for schedule(static)
  for (long long t = 0; t < tasks; ++t) {
    const int b = (int)(t / nchunks);
    const int c0 = (int)(t % nchunks) * chunk;
    const int c1 = std::min(C, c0 + chunk);
    const int w_ = c1 - c0;
    acc.assign((size_t)N * w_, 0.0);
    for (int r = 0; r < s.R; ++r) {
      const T* bx = boxes + ((size_t)b * s.R + r) * 4;
      const RoiGeom<T> g = roi_geom<T>(bx[0], bx[1], bx[2], bx[3], s.gh, s.gw, s.oh, s.ow,
                                       s.sampling_ratio, s.aligned);
      const T* go_region = grad_out + ((size_t)b * s.R + r) * (s.reduce ? 1 : nb) * C;
      const T scale = s.reduce ? g.inv_count / T(nb) : g.inv_count;
      for (int ph = 0; ph < s.oh; ++ph) {
        for (int pw = 0; pw < s.ow; ++pw) {
          const T* go = s.reduce ? go_region : go_region + (size_t)(ph * s.ow + pw) * C;
          for (int iy = 0; iy < g.grid_h; ++iy) {
            for (int ix = 0; ix < g.grid_w; ++ix) {
              T y, x;
              sample_point(g, ph, pw, iy, ix, &y, &x);
              int idx[4];
              T w[4];
              if (!bilinear(y, x, s.gh, s.gw, idx, w)) continue;
              for (int k = 0; k < 4; ++k) {
                const double wk = (double)(w[k] * scale);
                double* dst = acc.data() + (size_t)idx[k] * w_;
                const T* src = go + c0;
#pragma omp simd
                for (int c = 0; c < w_; ++c) dst[c] += wk * (double)src[c];
              }
            }
          }
        }
      }
    }
    T* gt = grad_tokens + (size_t)b * N * C;
    for (int n = 0; n < N; ++n)
      for (int c = 0; c < w_; ++c) gt[(size_t)n * C + c0 + c] = (T)acc[(size_t)n * w_ + c];
  }
  }
}

}  // namespace

void region_pool_forward_cpu(DType dt, const void* tokens, const void* boxes, void* out,
                             const RegionPoolShape& s) {
  switch (dt) {
    case DType::F32:
      return forward_impl((const float*)tokens, (const float*)boxes, (float*)out, s);
    case DType::F64:
      return forward_impl((const double*)tokens, (const double*)boxes, (double*)out, s);
    default:
      throw Error(std::string("region_pool (cpu): unsupported dtype ") + dtype_name(dt));
  }
}

void region_pool_backward_cpu(DType dt, const void* grad_out, const void* boxes, void* grad_tokens,
                              const RegionPoolShape& s) {
  switch (dt) {
    case DType::F32:
      return backward_impl((const float*)grad_out, (const float*)boxes, (float*)grad_tokens, s);
    case DType::F64:
      return backward_impl((const double*)grad_out, (const double*)boxes, (double*)grad_tokens, s);
    default:
      throw Error(std::string("region_pool (cpu): unsupported dtype ") + dtype_name(dt));
  }
}

}  // namespace gkcore
