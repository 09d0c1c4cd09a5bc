// CUDA region_pool.
// Forward: one block per (region, batch); threads stride over channels, so every token-row load is
// coalesced. Backward: deterministic by construction, with no atomics. One block owns one batch item
// and a tile of channels; its accumulator for all N tokens of that tile lives in shared memory, and
// each (token, channel) cell is updated by exactly one thread, which walks regions, bins and samples
// in a fixed order.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <string>

#include "region_pool/region_pool.h"
#include "region_pool/roi_math.h"

namespace gkcore {
namespace {

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

template <typename T> __device__ __forceinline__ float to_f(T v) { return (float)v; }
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ double to_acc(double v) { return v; }
template <typename T> __device__ __forceinline__ float to_acc(T v) { return to_f<T>(v); }

template <typename T> __device__ __forceinline__ T from_acc(float v) { return (T)v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <typename T> __device__ __forceinline__ T from_acc(double v) { return (T)v; }

// Box coordinates are float for float/half/bfloat16 tokens and double for double tokens.
template <typename T> struct BoxT { using type = float; };
template <> struct BoxT<double> { using type = double; };

template <typename T>
__global__ void region_pool_fwd_kernel(const T* __restrict__ tokens, const typename BoxT<T>::type* __restrict__ boxes,
                                       T* __restrict__ out, RegionPoolShape s) {
  using A = typename Acc<T>::type;
  const int r = blockIdx.x, b = blockIdx.y;
  const int N = s.gh * s.gw, C = s.C, nb = s.oh * s.ow;
  const auto* bx = boxes + ((size_t)b * s.R + r) * 4;
  const RoiGeom<A> g = roi_geom<A>((A)bx[0], (A)bx[1], (A)bx[2], (A)bx[3], s.gh, s.gw, s.oh, s.ow,
                                   s.sampling_ratio, s.aligned);
  const T* tok = tokens + (size_t)b * N * C;
  T* o_region = out + ((size_t)b * s.R + r) * (s.reduce ? 1 : nb) * C;
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    A total = A(0);
    for (int ph = 0; ph < s.oh; ++ph) {
      for (int pw = 0; pw < s.ow; ++pw) {
        A acc = A(0);
        for (int iy = 0; iy < g.grid_h; ++iy) {
          for (int ix = 0; ix < g.grid_w; ++ix) {
            A y, x;
            sample_point(g, ph, pw, iy, ix, &y, &x);
            int idx[4];
            A w[4];
            if (!bilinear(y, x, s.gh, s.gw, idx, w)) continue;
            acc += w[0] * to_acc(tok[(size_t)idx[0] * C + c]) + w[1] * to_acc(tok[(size_t)idx[1] * C + c]) +
                   w[2] * to_acc(tok[(size_t)idx[2] * C + c]) + w[3] * to_acc(tok[(size_t)idx[3] * C + c]);
          }
        }
        if (s.reduce) total += acc;
        else o_region[(size_t)(ph * s.ow + pw) * C + c] = from_acc<T>(acc * g.inv_count);
      }
    }
    if (s.reduce) o_region[c] = from_acc<T>(total * g.inv_count / A(nb));
  }
}

template <typename T>
__global__ void region_pool_bwd_kernel(const T* __restrict__ grad_out, const typename BoxT<T>::type* __restrict__ boxes,
                                       T* __restrict__ grad_tokens, RegionPoolShape s, int ctile) {
  using A = typename Acc<T>::type;
  extern __shared__ unsigned char smem_raw[];
  A* acc = reinterpret_cast<A*>(smem_raw);  // [N][ctile]
  const int b = blockIdx.y;
  const int c0 = blockIdx.x * ctile;
  const int N = s.gh * s.gw, C = s.C, nb = s.oh * s.ow;
  const int cl = threadIdx.x % ctile;        // channel within the tile
  const int grp = threadIdx.x / ctile;       // which tokens this thread owns: n % groups == grp
  const int groups = blockDim.x / ctile;
  const int c = c0 + cl;
  for (int i = threadIdx.x; i < N * ctile; i += blockDim.x) acc[i] = A(0);
  __syncthreads();
  if (c < C && grp < groups) {
    for (int r = 0; r < s.R; ++r) {
      const auto* bx = boxes + ((size_t)b * s.R + r) * 4;
      const RoiGeom<A> g = roi_geom<A>((A)bx[0], (A)bx[1], (A)bx[2], (A)bx[3], s.gh, s.gw, s.oh, s.ow,
                                       s.sampling_ratio, s.aligned);
      const T* go_region = grad_out + ((size_t)b * s.R + r) * (s.reduce ? 1 : nb) * C;
      const A scale = s.reduce ? g.inv_count / A(nb) : g.inv_count;
      for (int ph = 0; ph < s.oh; ++ph) {
        for (int pw = 0; pw < s.ow; ++pw) {
          const A go = to_acc(s.reduce ? go_region[c] : go_region[(size_t)(ph * s.ow + pw) * C + c]) * scale;
          for (int iy = 0; iy < g.grid_h; ++iy) {
            for (int ix = 0; ix < g.grid_w; ++ix) {
              A y, x;
              sample_point(g, ph, pw, iy, ix, &y, &x);
              int idx[4];
              A w[4];
              if (!bilinear(y, x, s.gh, s.gw, idx, w)) continue;
#pragma unroll
              for (int k = 0; k < 4; ++k)
                if (idx[k] % groups == grp) acc[idx[k] * ctile + cl] += w[k] * go;
            }
          }
        }
      }
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < N * ctile; i += blockDim.x) {
    const int n = i / ctile, cc = c0 + i % ctile;
    if (cc < C) grad_tokens[((size_t)b * N + n) * C + cc] = from_acc<T>(acc[i]);
  }
}

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw Error(std::string("region_pool (cuda): ") + what + ": " + cudaGetErrorString(e));
}

template <typename T>
void launch_fwd(const void* tokens, const void* boxes, void* out, const RegionPoolShape& s, cudaStream_t st) {
  if (s.B == 0 || s.R == 0 || s.C == 0) return;
  const int threads = s.C >= 256 ? 256 : (s.C >= 128 ? 128 : 64);
  dim3 grid(s.R, s.B);
  region_pool_fwd_kernel<T><<<grid, threads, 0, st>>>((const T*)tokens, (const typename BoxT<T>::type*)boxes,
                                                        (T*)out, s);
  check(cudaGetLastError(), "forward launch");
}

template <typename T>
void launch_bwd(const void* grad_out, const void* boxes, void* grad_tokens, const RegionPoolShape& s,
                cudaStream_t st) {
  using A = typename Acc<T>::type;
  if (s.B == 0 || s.C == 0) return;
  const int N = s.gh * s.gw;
  const size_t limit = 48 * 1024;
  int ctile = 32;
  while (ctile > 1 && (size_t)N * ctile * sizeof(A) > limit) ctile /= 2;
  if ((size_t)N * ctile * sizeof(A) > limit)
    throw Error("region_pool (cuda): token grid too large for the backward's shared-memory tile");
  const int threads = 128;
  dim3 grid((s.C + ctile - 1) / ctile, s.B);
  region_pool_bwd_kernel<T><<<grid, threads, (size_t)N * ctile * sizeof(A), st>>>(
      (const T*)grad_out, (const typename BoxT<T>::type*)boxes, (T*)grad_tokens, s, ctile);
  check(cudaGetLastError(), "backward launch");
}

}  // namespace

void region_pool_forward_cuda(DType dt, const void* tokens, const void* boxes, void* out,
                              const RegionPoolShape& s, void* stream) {
  auto st = (cudaStream_t)stream;
  switch (dt) {
    case DType::F32: return launch_fwd<float>(tokens, boxes, out, s, st);
    case DType::F64: return launch_fwd<double>(tokens, boxes, out, s, st);
    case DType::F16: return launch_fwd<__half>(tokens, boxes, out, s, st);
    case DType::BF16: return launch_fwd<__nv_bfloat16>(tokens, boxes, out, s, st);
  }
}

void region_pool_backward_cuda(DType dt, const void* grad_out, const void* boxes, void* grad_tokens,
                               const RegionPoolShape& s, void* stream) {
  auto st = (cudaStream_t)stream;
  switch (dt) {
    case DType::F32: return launch_bwd<float>(grad_out, boxes, grad_tokens, s, st);
    case DType::F64: return launch_bwd<double>(grad_out, boxes, grad_tokens, s, st);
    case DType::F16: return launch_bwd<__half>(grad_out, boxes, grad_tokens, s, st);
    case DType::BF16: return launch_bwd<__nv_bfloat16>(grad_out, boxes, grad_tokens, s, st);
  }
}

}  // namespace gkcore
