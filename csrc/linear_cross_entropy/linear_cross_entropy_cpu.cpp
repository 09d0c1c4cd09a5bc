// CPU (OpenMP) linear_cross_entropy: row-wise forward / backward on one logits chunk; see the header.
// One token row per task; every row is reduced in a fixed order, so results do not depend on the
// thread count.
#include "linear_cross_entropy/linear_cross_entropy.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace gkcore {
namespace {

template <typename T>
void forward_rows(T* z, const int64_t* y, T* loss, T* lse, const LceChunk& c) {
  const int V = c.V;
  const bool cap = c.softcap > 0;
  const T cc = (T)c.softcap, inv_c = cap ? (T)(1.0 / c.softcap) : T(1);
#pragma omp parallel for schedule(static)
  for (long long r = 0; r < c.rows; ++r) {
    T* zr = z + (size_t)r * V;
    if (cap)
      for (int j = 0; j < V; ++j) zr[j] = cc * std::tanh(zr[j] * inv_c);
    T mx = -std::numeric_limits<T>::infinity();
    double sum = 0.0;
    for (int j = 0; j < V; ++j) {
      mx = std::max(mx, zr[j]);
      sum += (double)zr[j];
    }
    double se = 0.0;
    for (int j = 0; j < V; ++j) se += (double)std::exp(zr[j] - mx);
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
