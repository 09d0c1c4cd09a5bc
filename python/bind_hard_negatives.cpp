#include "bindings.h"
#include "hard_negatives/hard_negatives.h"

#include <pybind11/stl.h>

namespace py = pybind11;
using namespace gkcore;

GKCORE_BIND(bind_hard_negatives) {
  m.def("hard_negatives_cpu",
        [](int dtype, std::uintptr_t sim, double scale, std::uint32_t seed_lo, std::uint32_t seed_hi,
           std::uintptr_t group_ids, std::uintptr_t neg_text, std::uintptr_t col_val, std::uintptr_t col_idx,
           int row0, int rows, int B) {
          py::gil_scoped_release nogil;
          hard_negatives_cpu((DType)dtype, ptr<void>(sim), scale, seed_lo, seed_hi, ptr<const int64_t>(group_ids),
                             ptr<int64_t>(neg_text), ptr<void>(col_val), ptr<int64_t>(col_idx),
                             HardNegShape{row0, rows, B});
        });
  m.def("philox4x32_10",
        [](std::uint32_t c0, std::uint32_t c1, std::uint32_t c2, std::uint32_t c3, std::uint32_t k0,
           std::uint32_t k1) {
          const uint32_t ctr[4] = {c0, c1, c2, c3}, key[2] = {k0, k1};
          uint32_t out[4];
          philox4x32_10(ctr, key, out);
          return std::vector<std::uint32_t>{out[0], out[1], out[2], out[3]};
        },
        "Philox4x32-10 of one counter (c0..c3) and key (k0, k1); returns the four output words.");
}
