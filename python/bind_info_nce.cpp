#include "bindings.h"
#include "info_nce/info_nce.h"

namespace py = pybind11;
using namespace gkcore;

GKCORE_BIND(bind_info_nce) {
  m.def("info_nce_rows_cpu",
        [](int dtype, std::uintptr_t s, std::uintptr_t sm, std::uintptr_t idx, std::uintptr_t mask, long long rows,
           long long N, double alpha, double eps, std::uintptr_t loss, std::uintptr_t lse, std::uintptr_t lse_m,
           bool grad) {
          py::gil_scoped_release nogil;
          info_nce_rows_cpu((DType)dtype, ptr<void>(s), sm ? ptr<const void>(sm) : nullptr,
                            idx ? ptr<const int64_t>(idx) : nullptr, mask ? ptr<const uint8_t>(mask) : nullptr,
                            InfoNceRows{rows, N, alpha, eps}, ptr<void>(loss), ptr<void>(lse),
                            lse_m ? ptr<void>(lse_m) : nullptr, grad);
        },
        "Row-wise log-sum-exp, loss and (with grad) logit gradient p - t of a (rows, N) logits chunk, in place.");
}
