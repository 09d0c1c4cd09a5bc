#include "bindings.h"
#include "region_pool/region_pool.h"

namespace py = pybind11;
using namespace gkcore;

namespace {
RegionPoolShape make_shape(int B, int R, int gh, int gw, int C, int oh, int ow, int sampling_ratio,
                           bool aligned, bool reduce) {
  return RegionPoolShape{B, R, gh, gw, C, oh, ow, sampling_ratio, aligned, reduce};
}
}  // namespace

GKCORE_BIND(bind_region_pool) {
  m.def("region_pool_forward_cpu",
        [](int dtype, std::uintptr_t tokens, std::uintptr_t boxes, std::uintptr_t out, int B, int R, int gh,
           int gw, int C, int oh, int ow, int sampling_ratio, bool aligned, bool reduce) {
          py::gil_scoped_release nogil;
          region_pool_forward_cpu((DType)dtype, ptr<void>(tokens), ptr<void>(boxes), ptr<void>(out),
                                  make_shape(B, R, gh, gw, C, oh, ow, sampling_ratio, aligned, reduce));
        });
  m.def("region_pool_backward_cpu",
        [](int dtype, std::uintptr_t grad_out, std::uintptr_t boxes, std::uintptr_t grad_tokens, int B, int R,
           int gh, int gw, int C, int oh, int ow, int sampling_ratio, bool aligned, bool reduce) {
          py::gil_scoped_release nogil;
          region_pool_backward_cpu((DType)dtype, ptr<void>(grad_out), ptr<void>(boxes), ptr<void>(grad_tokens),
                                   make_shape(B, R, gh, gw, C, oh, ow, sampling_ratio, aligned, reduce));
        });
#ifdef GKCORE_WITH_CUDA
  m.def("region_pool_forward_cuda",
        [](int dtype, std::uintptr_t tokens, std::uintptr_t boxes, std::uintptr_t out, int B, int R, int gh,
           int gw, int C, int oh, int ow, int sampling_ratio, bool aligned, bool reduce, std::uintptr_t stream) {
          py::gil_scoped_release nogil;
          region_pool_forward_cuda((DType)dtype, ptr<void>(tokens), ptr<void>(boxes), ptr<void>(out),
                                   make_shape(B, R, gh, gw, C, oh, ow, sampling_ratio, aligned, reduce),
                                   ptr<void>(stream));
        });
  m.def("region_pool_backward_cuda",
        [](int dtype, std::uintptr_t grad_out, std::uintptr_t boxes, std::uintptr_t grad_tokens, int B, int R,
           int gh, int gw, int C, int oh, int ow, int sampling_ratio, bool aligned, bool reduce,
           std::uintptr_t stream) {
          py::gil_scoped_release nogil;
          region_pool_backward_cuda((DType)dtype, ptr<void>(grad_out), ptr<void>(boxes), ptr<void>(grad_tokens),
                                    make_shape(B, R, gh, gw, C, oh, ow, sampling_ratio, aligned, reduce),
                                    ptr<void>(stream));
        });
#endif
}
