// Registration of pybind11 bindings: each python/bind_<op>.cpp adds its functions to gkcore._C with
//   GKCORE_BIND(bind_myop) { m.def(...); }
// so that new ops need no edit of a central file.
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>
#include <vector>

namespace gkcore {
using BindFn = void (*)(pybind11::module_&);
std::vector<BindFn>& bind_registry();
struct BindRegistrar {
  explicit BindRegistrar(BindFn f) { bind_registry().push_back(f); }
};
// Raw pointers travel from Python as integers (tensor.data_ptr()).
template <typename T>
inline T* ptr(std::uintptr_t p) { return reinterpret_cast<T*>(p); }
}  // namespace gkcore

#define GKCORE_BIND(fn)                                                \
  static void fn(pybind11::module_& m);                                \
  static ::gkcore::BindRegistrar fn##_registrar_instance(fn);          \
  static void fn(pybind11::module_& m)
