// RoIAlign sampling geometry on a token grid, shared by the CPU and CUDA kernels (and mirrored by
// gkcore/reference/region_pool.py and kernels/region_pool.py). Semantics of torchvision.ops.roi_align
// with spatial_scale = grid size (boxes are normalised to [0, 1]).
#pragma once
#include <cmath>

#if defined(__CUDACC__)
#define GK_HD __host__ __device__ __forceinline__
#else
#define GK_HD inline
#endif

namespace gkcore {

template <typename A>
struct RoiGeom {
  A start_x, start_y;  // top-left corner in grid coordinates
  A bin_w, bin_h;      // bin size in grid cells
  int grid_w, grid_h;  // samples per bin along x and y
  A inv_count;         // 1 / max(grid_w * grid_h, 1)
};

// box: (x0, y0, x1, y1) normalised; gh, gw: grid size; oh, ow: output bins.
template <typename A>
GK_HD RoiGeom<A> roi_geom(A x0, A y0, A x1, A y1, int gh, int gw, int oh, int ow, int sampling_ratio,
                          bool aligned) {
  RoiGeom<A> g;
  const A off = aligned ? A(0.5) : A(0);
  g.start_x = x0 * A(gw) - off;
  g.start_y = y0 * A(gh) - off;
  A rw = x1 * A(gw) - off - g.start_x;
  A rh = y1 * A(gh) - off - g.start_y;
  if (!aligned) {
    rw = rw > A(1) ? rw : A(1);
    rh = rh > A(1) ? rh : A(1);
  }
  g.bin_w = rw / A(ow);
  g.bin_h = rh / A(oh);
  g.grid_h = sampling_ratio > 0 ? sampling_ratio : (int)ceil(rh / A(oh));
  g.grid_w = sampling_ratio > 0 ? sampling_ratio : (int)ceil(rw / A(ow));
  int count = g.grid_h * g.grid_w;
  g.inv_count = A(1) / A(count > 1 ? count : 1);
  return g;
}

// Bilinear corners of point (y, x) on an H x W grid. Returns false when the point lies outside
// [-1, H] x [-1, W] (it contributes zero). idx[k] are flat indices y * W + x; w[k] their weights.
template <typename A>
GK_HD bool bilinear(A y, A x, int H, int W, int idx[4], A w[4]) {
  if (y < A(-1) || y > A(H) || x < A(-1) || x > A(W)) return false;
  if (y <= A(0)) y = A(0);
  if (x <= A(0)) x = A(0);
  int yl = (int)y, xl = (int)x, yh, xh;
  if (yl >= H - 1) {
    yh = yl = H - 1;
    y = (A)yl;
  } else {
    yh = yl + 1;
  }
  if (xl >= W - 1) {
    xh = xl = W - 1;
    x = (A)xl;
  } else {
    xh = xl + 1;
  }
  const A ly = y - A(yl), lx = x - A(xl);
  const A hy = A(1) - ly, hx = A(1) - lx;
  idx[0] = yl * W + xl; w[0] = hy * hx;
  idx[1] = yl * W + xh; w[1] = hy * lx;
  idx[2] = yh * W + xl; w[2] = ly * hx;
  idx[3] = yh * W + xh; w[3] = ly * lx;
  return true;
}

// Sample point (iy, ix) of bin (ph, pw).
template <typename A>
GK_HD void sample_point(const RoiGeom<A>& g, int ph, int pw, int iy, int ix, A* y, A* x) {
  *y = g.start_y + A(ph) * g.bin_h + (A(iy) + A(0.5)) * g.bin_h / A(g.grid_h);
  *x = g.start_x + A(pw) * g.bin_w + (A(ix) + A(0.5)) * g.bin_w / A(g.grid_w);
}

}  // namespace gkcore
