// The XLA FFI handler symbols of fewbit-jax and the checks shared by the CPU
// and CUDA handlers. module.cc hands the symbols to Python; ext.py registers
// them under the target names below.
//
// Targets (the same operands, attributes and results on every platform):
//
//   fewbit_pack            codes u8 (..., n) -> planes u32 (..., bits, W)
//                          attr bits (i32)
//   fewbit_quantize_pack   x f32/bf16/f16/f64 (..., n), borders f32 (2**bits - 1)
//                          -> planes u32 (..., bits, W); attr bits (i32)
//   fewbit_unpack_scale    planes u32 (..., bits, W), levels f32 (2**bits),
//                          g (..., n) -> levels[code] * g in g's dtype;
//                          attr bits (i32)
//   fewbit_sketch_<kind>   x (L..., B, N), keys u32 (L..., G, 2),
//                          row0 u32 (L..., G) -> f32 (L..., G, k, N): the B
//                          rows of x are G groups of R = B / G consecutive
//                          rows, and out[..., g, :, :] is the sketch S^T of
//                          group g with S's rows numbered row0[g] + r; kind
//                          is gaussian, rademacher or countsketch. x has no
//                          group axis so that XLA can hand the kernel the
//                          very array a matmul reads (see fewbit_jax/ext.py).
//
// W = ceil(n / 32). All sizes and offsets are int64.
#pragma once

#include <cstdint>
#include <string>

#include "codes.h"
#include "xla/ffi/api/ffi.h"

namespace fewbit {

namespace ffi = xla::ffi;

// The leading ("row") and last extents of an array of the given dimensions;
// a scalar is one row of one element.
struct RowsCols {
  int64_t rows = 1;
  int64_t cols = 1;
};

inline RowsCols rows_cols(ffi::Span<const int64_t> dims, int64_t trailing = 1) {
  RowsCols rc;
  if (dims.size() == 0) return rc;
  rc.rows = 1;
  const int64_t lead = int64_t(dims.size()) - trailing;
  for (int64_t i = 0; i < lead; ++i) rc.rows *= dims[i];
  rc.cols = dims[dims.size() - 1];
  return rc;
}

inline std::string dims_str(ffi::Span<const int64_t> dims) {
  std::string s = "(";
  for (size_t i = 0; i < dims.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(dims[i]);
  }
  return s + (dims.size() == 1 ? ",)" : ")");
}

inline ffi::Error check_bits(int32_t bits) {
  if (bits < 1 || bits > 8) {
    return ffi::Error::InvalidArgument("fewbit: bits must be in 1..8, got " +
                                       std::to_string(bits));
  }
  return ffi::Error::Success();
}

// Checks that `planes` has the packed shape (..., bits, ceil(n/32)) for an
// array whose shape is `dims` (a scalar counts as (1,)).
inline ffi::Error check_planes(ffi::Span<const int64_t> dims,
                               ffi::Span<const int64_t> planes, int32_t bits,
                               const char* what) {
  const size_t lead = dims.size() == 0 ? 0 : dims.size() - 1;
  const int64_t n = dims.size() == 0 ? 1 : dims[dims.size() - 1];
  bool ok = planes.size() == lead + 2;
  for (size_t i = 0; ok && i < lead; ++i) ok = planes[i] == dims[i];
  ok = ok && planes[lead] == bits && planes[lead + 1] == words_for(n);
  if (!ok) {
    return ffi::Error::InvalidArgument(
        std::string("fewbit: ") + what + " has shape " + dims_str(planes) +
        "; expected (..., bits, ceil(n/32)) = (..., " + std::to_string(bits) +
        ", " + std::to_string(words_for(n)) + ") for an array of shape " +
        dims_str(dims));
  }
  return ffi::Error::Success();
}

inline ffi::Error check_table(int64_t size, int64_t want, const char* what) {
  if (size != want) {
    return ffi::Error::InvalidArgument(std::string("fewbit: ") + what + " has " +
                                       std::to_string(size) + " entries; expected " +
                                       std::to_string(want));
  }
  return ffi::Error::Success();
}

// Checks the shapes of a sketch call; returns the number of groups (over all
// of L... and G) in *groups and the rows per group R in *rows.
inline ffi::Error check_sketch(ffi::Span<const int64_t> x, ffi::Span<const int64_t> keys,
                               ffi::Span<const int64_t> row0,
                               ffi::Span<const int64_t> out, int64_t* groups, int64_t* rows) {
  bool ok = row0.size() >= 1;
  const size_t lead = ok ? row0.size() - 1 : 0;
  ok = ok && x.size() == lead + 2 && keys.size() == lead + 2 && out.size() == lead + 3;
  int64_t g = 1;
  for (size_t i = 0; ok && i < lead; ++i) {
    ok = keys[i] == x[i] && row0[i] == x[i] && out[i] == x[i];
    g *= x[i];
  }
  const int64_t G = ok ? row0[lead] : 0;
  ok = ok && G >= 1 && x[lead] % G == 0 && keys[lead] == G && keys[lead + 1] == 2 &&
       out[lead] == G && out[lead + 1] >= 1 && out[lead + 2] == x[lead + 1];
  if (!ok) {
    return ffi::Error::InvalidArgument(
        "fewbit sketch: expected x (L..., B, N), keys (L..., G, 2), row0 (L..., G) and "
        "result (L..., G, k, N) with G >= 1 dividing B and k >= 1; got x " + dims_str(x) +
        ", keys " + dims_str(keys) + ", row0 " + dims_str(row0) + ", result " +
        dims_str(out));
  }
  if (out[lead + 1] > int64_t(UINT32_MAX)) {
    return ffi::Error::InvalidArgument("fewbit sketch: k must be below 2**32");
  }
  *groups = g * G;
  *rows = x[lead] / G;
  return ffi::Error::Success();
}

}  // namespace fewbit

// CPU handlers (cpu.cc).
XLA_FFI_DECLARE_HANDLER_SYMBOL(FewbitPackCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(FewbitQuantizePackCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(FewbitUnpackScaleCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(FewbitSketchGaussianCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(FewbitSketchRademacherCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(FewbitSketchCountsketchCpu);

#ifdef FEWBIT_WITH_CUDA
// CUDA handlers (cuda.cu).
XLA_FFI_DECLARE_HANDLER_SYMBOL(FewbitPackCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(FewbitQuantizePackCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(FewbitUnpackScaleCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(FewbitSketchGaussianCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(FewbitSketchRademacherCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(FewbitSketchCountsketchCuda);
#endif
