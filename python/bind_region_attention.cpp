#include <pybind11/stl.h>

#include "bindings.h"
#include "region_attention/region_attention.h"

namespace py = pybind11;
using namespace gkcore;

namespace {
RegionAttnShape make_shape(int B, int H, int P, int N, int R, int D, int gh, int gw, int output_size,
                           int sampling_ratio, bool aligned, bool attend_patches, double scale,
                           const std::vector<long long>& sq, const std::vector<long long>& sk,
                           const std::vector<long long>& sv) {
  if (sq.size() != 4 || sk.size() != 4 || sv.size() != 4)
    throw std::invalid_argument("region_attention: strides must have 4 entries");
  RegionAttnShape s{B, H, P, N, R, D, gh, gw, output_size, output_size, sampling_ratio, aligned, attend_patches,
                    scale, {}, {}, {}};
  for (int i = 0; i < 4; ++i) {
    s.sq[i] = sq[i];
    s.sk[i] = sk[i];
    s.sv[i] = sv[i];
  }
  return s;
}
}  // namespace

GKCORE_BIND(bind_region_attention) {
  m.def("region_attention_forward_cpu",
        [](int dtype, std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t boxes, std::uintptr_t mask,
           std::uintptr_t out, std::uintptr_t lse, std::uintptr_t weights, int B, int H, int P, int N, int R, int D,
           int gh, int gw, int output_size, int sampling_ratio, bool aligned, bool attend_patches, double scale,
           std::vector<long long> sq, std::vector<long long> sk, std::vector<long long> sv) {
          const RegionAttnShape s = make_shape(B, H, P, N, R, D, gh, gw, output_size, sampling_ratio, aligned,
                                               attend_patches, scale, sq, sk, sv);
          py::gil_scoped_release nogil;
          region_attention_forward_cpu((DType)dtype, ptr<void>(q), ptr<void>(k), ptr<void>(v), ptr<void>(boxes),
                                       mask ? ptr<uint8_t>(mask) : nullptr, ptr<void>(out), ptr<void>(lse),
                                       weights ? ptr<void>(weights) : nullptr, s);
        },
        "Fused region-pooled attention forward (see csrc/region_attention/region_attention.h).");
  m.def("region_attention_backward_cpu",
        [](int dtype, std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t boxes, std::uintptr_t mask,
           std::uintptr_t grad_out, std::uintptr_t out, std::uintptr_t lse, std::uintptr_t dq, std::uintptr_t dk,
           std::uintptr_t dv, int B, int H, int P, int N, int R, int D, int gh, int gw, int output_size,
           int sampling_ratio, bool aligned, bool attend_patches, double scale, std::vector<long long> sq,
           std::vector<long long> sk, std::vector<long long> sv) {
          const RegionAttnShape s = make_shape(B, H, P, N, R, D, gh, gw, output_size, sampling_ratio, aligned,
                                               attend_patches, scale, sq, sk, sv);
          py::gil_scoped_release nogil;
          region_attention_backward_cpu((DType)dtype, ptr<void>(q), ptr<void>(k), ptr<void>(v), ptr<void>(boxes),
                                        mask ? ptr<uint8_t>(mask) : nullptr, ptr<void>(grad_out), ptr<void>(out),
                                        ptr<void>(lse), ptr<void>(dq), ptr<void>(dk), ptr<void>(dv), s);
        },
        "Fused region-pooled attention backward: dq (per batch item), dk, dv (see csrc).");
}
