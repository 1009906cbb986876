#include "engine/moe_types.h"

namespace moetune {

const char* dtype_name(DType d) {
  switch (d) {
    case DType::kBf16:
      return "bfloat16";
    case DType::kF32:
      return "float32";
    case DType::kI32:
      return "int32";
    case DType::kI64:
      return "int64";
    case DType::kU8:
      return "uint8";
  }
  return "?";
}

const char* proj_name(Proj p) {
  switch (p) {
    case Proj::kGate:
      return "gate";
    case Proj::kUp:
      return "up";
    case Proj::kDown:
      return "down";
  }
  return "?";
}

}  // namespace moetune
