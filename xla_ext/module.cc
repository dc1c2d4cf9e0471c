// The nanobind module fewbit_jax._xla_ext: hands the FFI handlers to Python.
//
// registrations() returns {platform: {target name: capsule}}; ext.py passes
// each capsule to jax.ffi.register_ffi_target for its platform.
#include <type_traits>

#include "handlers.h"
#include "nanobind/nanobind.h"
#include "xla/ffi/api/c_api.h"

namespace nb = nanobind;

namespace {

template <typename T>
nb::capsule encapsulate(T* fn) {
  static_assert(std::is_invocable_r_v<XLA_FFI_Error*, T, XLA_FFI_CallFrame*>,
                "an XLA FFI handler must have the signature XLA_FFI_Error*(XLA_FFI_CallFrame*)");
  return nb::capsule(reinterpret_cast<void*>(fn));
}

nb::dict registrations() {
  nb::dict cpu;
  cpu["fewbit_pack"] = encapsulate(FewbitPackCpu);
  cpu["fewbit_quantize_pack"] = encapsulate(FewbitQuantizePackCpu);
  cpu["fewbit_unpack_scale"] = encapsulate(FewbitUnpackScaleCpu);
  cpu["fewbit_sketch_gaussian"] = encapsulate(FewbitSketchGaussianCpu);
  cpu["fewbit_sketch_rademacher"] = encapsulate(FewbitSketchRademacherCpu);
  cpu["fewbit_sketch_countsketch"] = encapsulate(FewbitSketchCountsketchCpu);
  nb::dict out;
  out["cpu"] = cpu;
#ifdef FEWBIT_WITH_CUDA
  nb::dict cuda;
  cuda["fewbit_pack"] = encapsulate(FewbitPackCuda);
  cuda["fewbit_quantize_pack"] = encapsulate(FewbitQuantizePackCuda);
  cuda["fewbit_unpack_scale"] = encapsulate(FewbitUnpackScaleCuda);
  cuda["fewbit_sketch_gaussian"] = encapsulate(FewbitSketchGaussianCuda);
  cuda["fewbit_sketch_rademacher"] = encapsulate(FewbitSketchRademacherCuda);
  cuda["fewbit_sketch_countsketch"] = encapsulate(FewbitSketchCountsketchCuda);
  out["CUDA"] = cuda;
#endif
  return out;
}

}  // namespace

NB_MODULE(_xla_ext, m) {
  m.doc() = "XLA FFI kernels of fewbit_jax (packing of b-bit codes and sketch products).";
  m.def("registrations", &registrations,
        "{platform: {target name: FFI handler capsule}} for jax.ffi.register_ffi_target.");
  m.def("cuda_built", [] {
#ifdef FEWBIT_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "Whether the CUDA kernels were compiled into this module.");
}
