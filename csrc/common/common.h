// Shared helpers for gkcore's torch-free kernels.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>

namespace gkcore {

// Element types the launchers understand (matches gkcore/_ext.py DTYPE_CODES).
enum class DType : int { F32 = 0, F64 = 1, F16 = 2, BF16 = 3 };

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "float32";
    case DType::F64: return "float64";
    case DType::F16: return "float16";
    case DType::BF16: return "bfloat16";
  }
  return "unknown";
}

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

}  // namespace gkcore
