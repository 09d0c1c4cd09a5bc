// gkcore._C: the CPU kernels (always) and the CUDA kernels (when built with nvcc).
#include "bindings.h"

#include <string>
#ifdef GKCORE_WITH_OPENMP
#include <omp.h>
#endif

namespace gkcore {
std::vector<BindFn>& bind_registry() {
  static std::vector<BindFn> fns;
  return fns;
}
}  // namespace gkcore

PYBIND11_MODULE(_C, m) {
  m.doc() = "gkcore compiled kernels (torch-free: raw pointers, shapes, strides and a stream)";
  m.def("has_cuda", []() {
#ifdef GKCORE_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
  m.def("cuda_archs", []() {
#ifdef GKCORE_WITH_CUDA
    return std::string(GKCORE_CUDA_ARCHS);
#else
    return std::string();
#endif
  });
  m.def("has_openmp", []() {
#ifdef GKCORE_WITH_OPENMP
    return true;
#else
    return false;
#endif
  });
  m.def("omp_max_threads", []() {
#ifdef GKCORE_WITH_OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
  });
  for (auto fn : gkcore::bind_registry()) fn(m);
}
