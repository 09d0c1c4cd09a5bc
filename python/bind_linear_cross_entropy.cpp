#include "bindings.h"
#include "linear_cross_entropy/linear_cross_entropy.h"

namespace py = pybind11;
using namespace gkcore;

GKCORE_BIND(bind_linear_cross_entropy) {
  m.def("lce_chunk_forward_cpu",
        [](int dtype, std::uintptr_t z, std::uintptr_t y, std::uintptr_t loss, std::uintptr_t lse, long long rows,
           int V, long long ignore_index, double eps, double softcap) {
          py::gil_scoped_release nogil;
          lce_chunk_forward_cpu((DType)dtype, ptr<void>(z), ptr<const int64_t>(y), ptr<void>(loss), ptr<void>(lse),
                                LceChunk{rows, V, ignore_index, eps, softcap});
        },
        "Row-wise softcap, log-sum-exp and loss of a (rows, V) logits chunk, in place (see csrc).");
  m.def("lce_chunk_backward_cpu",
        [](int dtype, std::uintptr_t z, std::uintptr_t y, std::uintptr_t lse, std::uintptr_t g, long long rows, int V,
           double eps, double softcap, bool z_capped) {
          py::gil_scoped_release nogil;
          lce_chunk_backward_cpu((DType)dtype, ptr<void>(z), ptr<const int64_t>(y), ptr<const void>(lse),
                                 ptr<const void>(g), LceChunk{rows, V, 0, eps, softcap}, z_capped);
        },
        "In place: (rows, V) logits chunk -> gradient of the loss w.r.t. the (uncapped) logits (see csrc).");
}
