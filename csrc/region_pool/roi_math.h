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

// One axis of the bilinear interpolation: the two grid lines around coordinate c on an axis of G cells
// and their weights. Returns false when c lies outside [-1, G] (the sample contributes zero); nearer
// coordinates are clamped to the border.
template <typename A>
GK_HD bool linear_corners(A c, int G, int* lo, int* hi, A* wlo, A* whi) {
  if (c < A(-1) || c > A(G)) return false;
  if (c <= A(0)) c = A(0);
  int l = (int)c, h;
  if (l >= G - 1) {
    h = l = G - 1;
    c = (A)l;
  } else {
    h = l + 1;
  }
  const A lw = c - A(l);
  *lo = l;
  *hi = h;
  *wlo = A(1) - lw;
  *whi = lw;
  return true;
}

// Bilinear corners of point (y, x) on an H x W grid. Returns false when the point lies outside
// [-1, H] x [-1, W] (it contributes zero). idx[k] are flat indices y * W + x; w[k] their weights.
template <typename A>
GK_HD bool bilinear(A y, A x, int H, int W, int idx[4], A w[4]) {
  int yl, yh, xl, xh;
  A hy, ly, hx, lx;
  if (!linear_corners(y, H, &yl, &yh, &hy, &ly)) return false;
  if (!linear_corners(x, W, &xl, &xh, &hx, &lx)) return false;
  idx[0] = yl * W + xl; w[0] = hy * hx;
  idx[1] = yl * W + xh; w[1] = hy * lx;
  idx[2] = yh * W + xl; w[2] = ly * hx;
  idx[3] = yh * W + xh; w[3] = ly * lx;
  return true;
}

// Coordinate of sample i (of `grid` per bin) in bin p along one axis.
template <typename A>
GK_HD A sample_coord(A start, A bin, int grid, int p, int i) {
  return start + A(p) * bin + (A(i) + A(0.5)) * bin / A(grid);
}

// Sample point (iy, ix) of bin (ph, pw).
template <typename A>
GK_HD void sample_point(const RoiGeom<A>& g, int ph, int pw, int iy, int ix, A* y, A* x) {
  *y = sample_coord(g.start_y, g.bin_h, g.grid_h, ph, iy);
  *x = sample_coord(g.start_x, g.bin_w, g.grid_w, pw, ix);
}

// RoIAlign weights factor over the two axes: the samples of the bins form a full product grid, a
// sample is valid iff its y and its x are each in range, and its bilinear weight is wy * wx. So the
// pooling weight of grid cell (row, col) for bins ph0 <= ph < ph1 and pw0 <= pw < pw1 is
//   W[row * gw + col] = wy[row] * wx[col] * inv_count,
//   wy[row] = sum over ph in [ph0, ph1), iy < grid_h of the y-weights on grid line `row` (wx likewise).
// Writes wy (gh entries) and wx (gw entries); returns, in lo/hi, the first and one-past-last nonzero
// row and column (lo == hi when every sample is outside).
template <typename A>
GK_HD void axis_weights(const RoiGeom<A>& g, int gh, int gw, int ph0, int ph1, int pw0, int pw1, A* wy, A* wx,
                        int* row_lo, int* row_hi, int* col_lo, int* col_hi) {
  for (int i = 0; i < gh; ++i) wy[i] = A(0);
  for (int i = 0; i < gw; ++i) wx[i] = A(0);
  int rlo = gh, rhi = 0, clo = gw, chi = 0;
  for (int p = ph0; p < ph1; ++p)
    for (int i = 0; i < g.grid_h; ++i) {
      int l, h;
      A wl, wh;
      if (!linear_corners(sample_coord(g.start_y, g.bin_h, g.grid_h, p, i), gh, &l, &h, &wl, &wh)) continue;
      wy[l] += wl;
      wy[h] += wh;
      rlo = l < rlo ? l : rlo;
      rhi = h + 1 > rhi ? h + 1 : rhi;
    }
  for (int p = pw0; p < pw1; ++p)
    for (int i = 0; i < g.grid_w; ++i) {
      int l, h;
      A wl, wh;
      if (!linear_corners(sample_coord(g.start_x, g.bin_w, g.grid_w, p, i), gw, &l, &h, &wl, &wh)) continue;
      wx[l] += wl;
      wx[h] += wh;
      clo = l < clo ? l : clo;
      chi = h + 1 > chi ? h + 1 : chi;
    }
  if (rlo >= rhi || clo >= chi) rlo = rhi = clo = chi = 0;
  *row_lo = rlo;
  *row_hi = rhi;
  *col_lo = clo;
  *col_hi = chi;
}

}  // namespace gkcore
