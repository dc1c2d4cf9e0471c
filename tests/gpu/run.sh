#!/usr/bin/env bash
# On a machine with an NVIDIA GPU and jax with CUDA (pip install "jax[cuda13]"
# or "jax[cuda12]"): build the extension with its CUDA kernels, run the GPU
# parity tests, the bandwidth benchmark of each kernel against the
# pure-JAX path, and the measurement that picks each op's default path.
#
#   bash tests/gpu/run.sh            # build, test, benchmark
#   FEWBIT_GPU_SKIP_BUILD=1 bash tests/gpu/run.sh   # reuse the installed build
set -euo pipefail
cd "$(dirname "$0")/../.."

python - <<'PY'
import jax
if jax.default_backend() != "gpu":
  raise SystemExit(f"no GPU backend (jax sees {jax.devices()}); install jax with CUDA")
print("devices:", jax.devices())
PY

if [[ -z "${FEWBIT_GPU_SKIP_BUILD:-}" ]]; then
  command -v nvcc >/dev/null || { echo "nvcc not on PATH: the CUDA kernels cannot be built" >&2; exit 1; }
  # The build needs jax (for the XLA FFI headers), nanobind and
  # scikit-build-core in this environment; --no-build-isolation uses them.
  python -m pip install -q "scikit-build-core>=0.10" "nanobind>=2.4"
  python -m pip install -q "pytest>=8" "hypothesis>=6"
  FEWBIT_CUDA=ON python -m pip install -q --no-build-isolation --no-deps .
fi

python -c "from fewbit_jax import ext; print('fewbit_jax.ext platforms:', ext.platforms()); assert 'cuda' in ext.platforms()"
python -m pytest -q -p no:cacheprovider tests/gpu tests/test_ext.py tests/test_ffi_*.py
python tests/gpu/bench_bandwidth.py "$@"
# The path measurement on the GPU: with the tests above passed, its MEASURED
# line can go into fewbit_jax/_ffi/_path.py (and its table into the README).
python -m benchmarks.bench_paths
