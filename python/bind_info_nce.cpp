#include "bindings.h"
#include "info_nce/info_nce.h"

namespace py = pybind11;
using namespace gkcore;

GKCORE_BIND(bind_info_nce) {
  m.def("info_nce_forward_cpu",
        [](int dtype, std::uintptr_t q, std::uintptr_t k, std::uintptr_t qm, std::uintptr_t idx, std::uintptr_t mask,
           double scale, double alpha, double eps, std::uintptr_t loss, std::uintptr_t lse, std::uintptr_t lse_m,
           std::uintptr_t A, long long M, long long N, int D) {
          py::gil_scoped_release nogil;
          info_nce_forward_cpu((DType)dtype, ptr<void>(q), ptr<void>(k), qm ? ptr<void>(qm) : nullptr,
                               idx ? ptr<int64_t>(idx) : nullptr, mask ? ptr<uint8_t>(mask) : nullptr,
                               InfoNceShape{M, N, D, scale, alpha, eps}, ptr<void>(loss), ptr<void>(lse),
                               lse_m ? ptr<void>(lse_m) : nullptr, A ? ptr<void>(A) : nullptr);
        });
  m.def("info_nce_backward_cpu",
        [](int dtype, std::uintptr_t q, std::uintptr_t k, std::uintptr_t qm, std::uintptr_t idx, std::uintptr_t mask,
           double scale, double alpha, double eps, std::uintptr_t lse, std::uintptr_t lse_m, std::uintptr_t g,
           std::uintptr_t A, std::uintptr_t C, long long M, long long N, int D) {
          py::gil_scoped_release nogil;
          info_nce_backward_cpu((DType)dtype, ptr<void>(q), ptr<void>(k), qm ? ptr<void>(qm) : nullptr,
                                idx ? ptr<int64_t>(idx) : nullptr, mask ? ptr<uint8_t>(mask) : nullptr,
                                InfoNceShape{M, N, D, scale, alpha, eps}, ptr<void>(lse),
                                lse_m ? ptr<void>(lse_m) : nullptr, ptr<void>(g), A ? ptr<void>(A) : nullptr,
                                C ? ptr<void>(C) : nullptr);
        });
}
