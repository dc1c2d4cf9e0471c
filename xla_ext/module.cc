// The nanobind module fewbit_jax._xla_ext: hands the FFI handlers to Python.
//
// registrations() returns {platform: {target name: capsule}};
// fewbit_jax/_ffi/_load.py passes each capsule to
// jax.ffi.register_ffi_target for its platform.
#include <array>
#include <iterator>

#include "handlers.h"
#include "nanobind/nanobind.h"
#include "xla/ffi/api/c_api.h"

namespace nb = nanobind;

namespace {

using Handler = XLA_FFI_Error*(XLA_FFI_CallFrame*);

// The target names, in the order in which targets() takes a platform's handlers.
constexpr const char* kTargets[] = {
    "fewbit_pack",           "fewbit_quantize_pack",     "fewbit_unpack_scale",
    "fewbit_sketch_gaussian", "fewbit_sketch_rademacher", "fewbit_sketch_countsketch"};

// {target name: capsule} for one platform's handlers.
nb::dict targets(const std::array<Handler*, std::size(kTargets)>& handlers) {
  nb::dict d;
  for (size_t i = 0; i < handlers.size(); ++i) {
    d[kTargets[i]] = nb::capsule(reinterpret_cast<void*>(handlers[i]));
  }
  return d;
}

nb::dict registrations() {
  nb::dict out;
  out["cpu"] = targets({FewbitPackCpu, FewbitQuantizePackCpu, FewbitUnpackScaleCpu,
                        FewbitSketchGaussianCpu, FewbitSketchRademacherCpu,
                        FewbitSketchCountsketchCpu});
#ifdef FEWBIT_WITH_CUDA
  out["CUDA"] = targets({FewbitPackCuda, FewbitQuantizePackCuda, FewbitUnpackScaleCuda,
                         FewbitSketchGaussianCuda, FewbitSketchRademacherCuda,
                         FewbitSketchCountsketchCuda});
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
