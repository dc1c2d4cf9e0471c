// The XLA FFI handlers of fewbit-jax, written once for every platform: each
// handler checks its operands, picks the kernel for their dtype and calls the
// platform's launch of it (cpu.cc, cuda.cu). module.cc hands the symbols to
// Python; fewbit_jax/_ffi/_load.py registers them under the target names below.
//
// Targets (the same operands, attributes and results on every platform):
//
//   fewbit_pack            codes u8 (..., n) -> planes u32 (..., bits, W)
//                          attr bits (i32)
//   fewbit_quantize_pack   x f32/bf16/f16/f64 (..., n), borders f32 (2**bits - 1)
//                          -> planes u32 (..., bits, W); attr bits (i32)
//   fewbit_unpack_scale    planes u32 (..., bits, W), levels f32 (2**bits),
//                          g (..., n) -> levels[code] * g in g's dtype (0 for a 0 level);
//                          attr bits (i32)
//   fewbit_sketch_<kind>   x (L..., B, N), keys u32 (L..., G, 2),
//                          row0 u32 (L..., G) -> f32 (L..., G, k, N): the B
//                          rows of x are G groups of R = B / G consecutive
//                          rows, and out[..., g, :, :] is the sketch S^T of
//                          group g with S's rows numbered row0[g] + r; kind
//                          is gaussian, rademacher or countsketch. x has no
//                          group axis so that XLA can hand the kernel the
//                          very array a matmul reads (see fewbit_jax/_ffi/_sketch_op.py).
//
// W = ceil(n / 32). All sizes and offsets are int64.
#pragma once

#include <cstdint>
#include <string>
#include <type_traits>

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

// ---------------------------------------------------------------------------
// Dtype dispatch.

template <Dtype D>
using DtypeTag = std::integral_constant<Dtype, D>;

// Returns f(DtypeTag<D>{}) for the Dtype D of `type`: float32, bfloat16,
// float16, and float64 where kWithF64; any other type is the InvalidArgument
// error `what`.
template <bool kWithF64, class F>
ffi::Error with_dtype(ffi::DataType type, const char* what, F&& f) {
  switch (type) {
    case ffi::F32: return f(DtypeTag<Dtype::kF32>{});
    case ffi::BF16: return f(DtypeTag<Dtype::kBF16>{});
    case ffi::F16: return f(DtypeTag<Dtype::kF16>{});
    case ffi::F64:
      if constexpr (kWithF64) return f(DtypeTag<Dtype::kF64>{});
      break;
    default: break;
  }
  return ffi::Error::InvalidArgument(what);
}

// The data of `buffer` as elements of dtype D.
template <Dtype D, class B>
typename Storage<D>::type* data_as(const B& buffer) {
  return static_cast<typename Storage<D>::type*>(buffer.untyped_data());
}

// ---------------------------------------------------------------------------
// The handlers. P is a platform: a type with the context its kernels run in,
// P::Ctx, and their launches on checked operands (arrays viewed as rows of
// the last axis, see RowsCols), each returning the launch's error:
//
//   P::pack(ctx, codes, planes, rc, bits)
//   P::quantize_pack<D>(ctx, x, borders, planes, rc, bits)
//   P::unpack_scale<D>(ctx, planes, levels, g, out, rc, bits)
//   P::sketch<D, K>(ctx, x, keys, row0, out, groups, R, N, k)

template <class P>
ffi::Error Pack(typename P::Ctx ctx, ffi::Buffer<ffi::U8> codes,
                ffi::ResultBuffer<ffi::U32> planes, int32_t bits) {
  if (auto e = check_bits(bits); !e.success()) return e;
  if (auto e = check_planes(codes.dimensions(), planes->dimensions(), bits, "packed result");
      !e.success()) {
    return e;
  }
  return P::pack(ctx, codes.typed_data(), planes->typed_data(), rows_cols(codes.dimensions()),
                 bits);
}

template <class P>
ffi::Error QuantizePack(typename P::Ctx ctx, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> borders,
                        ffi::ResultBuffer<ffi::U32> planes, int32_t bits) {
  if (auto e = check_bits(bits); !e.success()) return e;
  if (auto e = check_table(int64_t(borders.element_count()), (int64_t(1) << bits) - 1,
                           "borders");
      !e.success()) {
    return e;
  }
  if (auto e = check_planes(x.dimensions(), planes->dimensions(), bits, "packed result");
      !e.success()) {
    return e;
  }
  const RowsCols rc = rows_cols(x.dimensions());
  return with_dtype<true>(
      x.element_type(), "fewbit quantize_pack: x must be float32, bfloat16, float16 or float64",
      [&](auto dtype) {
        constexpr Dtype D = decltype(dtype)::value;
        return P::template quantize_pack<D>(ctx, data_as<D>(x), borders.typed_data(),
                                            planes->typed_data(), rc, bits);
      });
}

template <class P>
ffi::Error UnpackScale(typename P::Ctx ctx, ffi::Buffer<ffi::U32> planes,
                       ffi::Buffer<ffi::F32> levels, ffi::AnyBuffer g,
                       ffi::Result<ffi::AnyBuffer> out, int32_t bits) {
  if (auto e = check_bits(bits); !e.success()) return e;
  if (auto e = check_table(int64_t(levels.element_count()), int64_t(1) << bits, "levels");
      !e.success()) {
    return e;
  }
  if (auto e = check_planes(g.dimensions(), planes.dimensions(), bits, "packed codes");
      !e.success()) {
    return e;
  }
  if (out->element_type() != g.element_type() ||
      out->element_count() != g.element_count()) {
    return ffi::Error::InvalidArgument(
        "fewbit unpack_scale: the result must have the dtype and shape of g");
  }
  const RowsCols rc = rows_cols(g.dimensions());
  return with_dtype<false>(
      g.element_type(), "fewbit unpack_scale: g must be float32, bfloat16 or float16",
      [&](auto dtype) {
        constexpr Dtype D = decltype(dtype)::value;
        return P::template unpack_scale<D>(ctx, planes.typed_data(), levels.typed_data(),
                                           data_as<D>(g), data_as<D>(*out), rc, bits);
      });
}

// Group g's rows are rows g * R .. of x, viewed as (groups * R, N).
template <class P, SketchKind K>
ffi::Error Sketch(typename P::Ctx ctx, ffi::AnyBuffer x, ffi::Buffer<ffi::U32> keys,
                  ffi::Buffer<ffi::U32> row0, ffi::ResultBuffer<ffi::F32> out) {
  int64_t groups = 1, R = 0;
  if (auto e = check_sketch(x.dimensions(), keys.dimensions(), row0.dimensions(),
                            out->dimensions(), &groups, &R);
      !e.success()) {
    return e;
  }
  const auto xd = x.dimensions();
  const auto od = out->dimensions();
  const int64_t N = xd[xd.size() - 1];
  const int64_t k = od[od.size() - 2];
  return with_dtype<true>(
      x.element_type(), "fewbit sketch: x must be float32, bfloat16, float16 or float64",
      [&](auto dtype) {
        constexpr Dtype D = decltype(dtype)::value;
        return P::template sketch<D, K>(ctx, data_as<D>(x), keys.typed_data(),
                                        row0.typed_data(), out->typed_data(), groups, R, N, k);
      });
}

}  // namespace fewbit

// Defines the handler symbols Fewbit<target>SUFFIX (declared below) of the
// platform P, whose kernels take the FFI context CTX (decoded as P::Ctx).
#define FEWBIT_DEFINE_HANDLERS(SUFFIX, P, CTX)                                         \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(FewbitPack##SUFFIX, ::fewbit::Pack<P>,                 \
                                ::xla::ffi::Ffi::Bind()                                \
                                    .Ctx<CTX>()                                        \
                                    .Arg<::xla::ffi::Buffer<::xla::ffi::U8>>()         \
                                    .Ret<::xla::ffi::Buffer<::xla::ffi::U32>>()        \
                                    .Attr<int32_t>("bits"));                           \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(FewbitQuantizePack##SUFFIX, ::fewbit::QuantizePack<P>, \
                                ::xla::ffi::Ffi::Bind()                                \
                                    .Ctx<CTX>()                                        \
                                    .Arg<::xla::ffi::AnyBuffer>()                      \
                                    .Arg<::xla::ffi::Buffer<::xla::ffi::F32>>()        \
                                    .Ret<::xla::ffi::Buffer<::xla::ffi::U32>>()        \
                                    .Attr<int32_t>("bits"));                           \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(FewbitUnpackScale##SUFFIX, ::fewbit::UnpackScale<P>,   \
                                ::xla::ffi::Ffi::Bind()                                \
                                    .Ctx<CTX>()                                        \
                                    .Arg<::xla::ffi::Buffer<::xla::ffi::U32>>()        \
                                    .Arg<::xla::ffi::Buffer<::xla::ffi::F32>>()        \
                                    .Arg<::xla::ffi::AnyBuffer>()                      \
                                    .Ret<::xla::ffi::AnyBuffer>()                      \
                                    .Attr<int32_t>("bits"));                           \
  FEWBIT_DEFINE_SKETCH(FewbitSketchGaussian##SUFFIX, P, CTX, kGaussian)                \
  FEWBIT_DEFINE_SKETCH(FewbitSketchRademacher##SUFFIX, P, CTX, kRademacher)            \
  FEWBIT_DEFINE_SKETCH(FewbitSketchCountsketch##SUFFIX, P, CTX, kCountSketch)

#define FEWBIT_DEFINE_SKETCH(NAME, P, CTX, KIND)                                  \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(NAME, (::fewbit::Sketch<P, ::fewbit::SketchKind::KIND>), \
                                ::xla::ffi::Ffi::Bind()                           \
                                    .Ctx<CTX>()                                   \
                                    .Arg<::xla::ffi::AnyBuffer>()                 \
                                    .Arg<::xla::ffi::Buffer<::xla::ffi::U32>>()   \
                                    .Arg<::xla::ffi::Buffer<::xla::ffi::U32>>()   \
                                    .Ret<::xla::ffi::Buffer<::xla::ffi::F32>>());

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
