// CUDA XLA FFI handlers of fewbit-jax (see handlers.h for the targets).
//
// The logic (code_of, plane layout, hashes, float formats) is codes.h's, the
// same functions the CPU handlers run, so CPU tests exercise it. Packing maps
// one warp to one 32-code word: each lane computes one code and one
// __ballot_sync per plane gathers bit p of the 32 codes into plane p's word.
// All indices are int64 and every kernel uses grid-stride loops, so arrays
// above 2**31 elements work with a bounded grid.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "codes.h"
#include "handlers.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace fewbit {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / kWordBits;
constexpr int64_t kMaxBlocks = int64_t(1) << 16;

int blocks_for(int64_t units, int64_t per_block) {
  const int64_t b = (units + per_block - 1) / per_block;
  return int(std::max<int64_t>(1, std::min(b, kMaxBlocks)));
}

ffi::Error launch_status(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    return ffi::Error::Internal(std::string("fewbit ") + what + ": CUDA launch failed: " +
                                cudaGetErrorString(err));
  }
  return ffi::Error::Success();
}

template <class F>
ffi::Error with_bits(int32_t bits, F&& f) {
  switch (bits) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    default: return check_bits(bits);
  }
  return ffi::Error::Success();
}

// Blocks of kWarpsPerBlock warps for one warp per word of rc's packed planes.
int word_blocks(RowsCols rc) { return blocks_for(rc.rows * words_for(rc.cols), kWarpsPerBlock); }

// Copies the first `count` floats of src into the block's shared `dst`.
__device__ __forceinline__ void stage(float* dst, const float* src, int count) {
  for (int i = threadIdx.x; i < count; i += blockDim.x) dst[i] = src[i];
  __syncthreads();
}

// Calls body(r, w, words, lane, i) for every word (r, w) of the rows x
// words_for(n) words of a plane, one warp per word in a grid-stride loop:
// `lane` is the thread's lane and i = w * 32 + lane its element of row r
// (i >= n in the padding of the last word).
template <class Body>
__device__ __forceinline__ void for_each_word(int64_t rows, int64_t n, const Body& body) {
  const int lane = threadIdx.x % kWordBits;
  const int64_t words = words_for(n);
  const int64_t total = rows * words;
  const int64_t stride = int64_t(gridDim.x) * kWarpsPerBlock;
  for (int64_t wid = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWordBits;
       wid < total; wid += stride) {
    const int64_t r = wid / words, w = wid % words;
    body(r, w, words, lane, w * kWordBits + lane);
  }
}

// Writes the BITS plane words of the warp's word (r, w) from each lane's
// code; lane p stores plane p.
template <int BITS>
__device__ __forceinline__ void ballot_store(uint32_t code, int lane, uint32_t* row,
                                             int64_t words, int64_t w) {
  uint32_t mine = 0;
#pragma unroll
  for (int p = 0; p < BITS; ++p) {
    const uint32_t word = __ballot_sync(0xffffffffu, (code >> p) & 1u);
    if (lane == p) mine = word;
  }
  if (lane < BITS) row[int64_t(lane) * words + w] = mine;
}

template <int BITS>
__global__ void pack_kernel(const uint8_t* codes, uint32_t* planes, int64_t rows, int64_t n) {
  for_each_word(rows, n, [&](int64_t r, int64_t w, int64_t words, int lane, int64_t i) {
    const uint32_t c = i < n ? uint32_t(codes[r * n + i]) : 0u;
    ballot_store<BITS>(c, lane, planes + r * BITS * words, words, w);
  });
}

template <Dtype D, int BITS>
__global__ void quantize_pack_kernel(const typename Storage<D>::type* x, const float* borders,
                                     uint32_t* planes, int64_t rows, int64_t n) {
  __shared__ float sb[(1 << BITS) - 1];
  stage(sb, borders, (1 << BITS) - 1);
  for_each_word(rows, n, [&](int64_t r, int64_t w, int64_t words, int lane, int64_t i) {
    const uint32_t c = i < n ? code_of(load_f32<D>(x, r * n + i), sb, BITS) : 0u;
    ballot_store<BITS>(c, lane, planes + r * BITS * words, words, w);
  });
}

template <Dtype D, int BITS>
__global__ void unpack_scale_kernel(const uint32_t* planes, const float* levels,
                                    const typename Storage<D>::type* g,
                                    typename Storage<D>::type* out, int64_t rows, int64_t n) {
  __shared__ float sl[1 << BITS];
  stage(sl, levels, 1 << BITS);
  for_each_word(rows, n, [&](int64_t r, int64_t w, int64_t words, int lane, int64_t i) {
    if (i >= n) return;
    const uint32_t* row = planes + r * BITS * words;
    uint32_t c = 0;
#pragma unroll
    for (int p = 0; p < BITS; ++p) c |= ((row[int64_t(p) * words + w] >> lane) & 1u) << p;
    const int64_t idx = r * n + i;
    // A zero level gives 0 whatever g is (inf or NaN too), as jax's select.
    const float level = sl[c];
    out[idx] = from_f32<D>(level == 0.0f ? 0.0f : level * load_f32<D>(g, idx));
  });
}

// Count sketch: out[bucket(i), c] += sign(i) * x[r, c] by float atomics
// (the order of the additions, and so the last bits of a sum, may vary).
template <Dtype D>
__global__ void countsketch_kernel(const typename Storage<D>::type* x, const uint32_t* keys,
                                   const uint32_t* row0, float* out, int64_t groups, int64_t R,
                                   int64_t N, int64_t k) {
  const int64_t rows_total = groups * R;
  for (int64_t gr = blockIdx.y; gr < rows_total; gr += gridDim.y) {
    const int64_t g = gr / R, r = gr % R;
    const uint32_t k0 = keys[2 * g], k1 = keys[2 * g + 1];
    const uint32_t i = row0[g] + uint32_t(r);
    const uint32_t b = countsketch_bucket(k0, k1, i, uint32_t(k));
    const float s = countsketch_sign(k0, k1, i);
    float* o = out + (g * k + b) * N;
    const auto* xr = x + gr * N;
    for (int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < N;
         c += int64_t(gridDim.x) * blockDim.x) {
      atomicAdd(o + c, s * load_f32<D>(xr, c));
    }
  }
}

// Dense sketch: a 64 x 64 tile of out (rows j of S^T, columns n of x) per
// block, 4 x 4 per thread, over chunks of 16 rows of S and x staged in shared
// memory; the S chunk is generated in place from the key.
constexpr int kTJ = 64, kTN = 64, kTR = 16;

template <Dtype D, SketchKind K>
__global__ void dense_sketch_kernel(const typename Storage<D>::type* x, const uint32_t* keys,
                                    const uint32_t* row0, float* out, int64_t R, int64_t N,
                                    int64_t k, int64_t g) {
  __shared__ float ss[kTR][kTJ];
  __shared__ float sx[kTR][kTN];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t j0 = int64_t(blockIdx.y) * kTJ, n0 = int64_t(blockIdx.x) * kTN;
  const uint32_t k0 = keys[2 * g], k1 = keys[2 * g + 1], base = row0[g];
  const float inv_root_k = float(1.0 / sqrt(double(k)));  // as fewbit_jax.sketch
  const auto* xg = x + g * R * N;
  float acc[4][4] = {};
  for (int64_t rb = 0; rb < R; rb += kTR) {
    for (int e = threadIdx.x; e < kTR * kTJ; e += kThreads) {
      const int rr = e / kTJ, jj = e % kTJ;
      const int64_t r = rb + rr, j = j0 + jj;
      ss[rr][jj] = (r < R && j < k)
                       ? dense_entry<K>(k0, k1, base + uint32_t(r), uint32_t(j)) * inv_root_k
                       : 0.0f;
    }
    for (int e = threadIdx.x; e < kTR * kTN; e += kThreads) {
      const int rr = e / kTN, nn = e % kTN;
      const int64_t r = rb + rr, c = n0 + nn;
      sx[rr][nn] = (r < R && c < N) ? load_f32<D>(xg, r * N + c) : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int rr = 0; rr < kTR; ++rr) {
      float a[4], b[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        a[q] = ss[rr][ty * 4 + q];
        b[q] = sx[rr][tx * 4 + q];
      }
#pragma unroll
      for (int q = 0; q < 4; ++q)
#pragma unroll
        for (int m = 0; m < 4; ++m) acc[q][m] += a[q] * b[m];
    }
    __syncthreads();
  }
  float* og = out + g * k * N;
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const int64_t j = j0 + ty * 4 + q;
    if (j >= k) continue;
#pragma unroll
    for (int m = 0; m < 4; ++m) {
      const int64_t c = n0 + tx * 4 + m;
      if (c < N) og[j * N + c] = acc[q][m];
    }
  }
}

// The CUDA kernel launches behind the handlers of handlers.h, on checked
// operands, all on the call's stream.
struct Cuda {
  using Ctx = cudaStream_t;

  static ffi::Error pack(cudaStream_t stream, const uint8_t* codes, uint32_t* planes,
                         RowsCols rc, int32_t bits) {
    with_bits(bits, [&](auto b) {
      constexpr int B = decltype(b)::value;
      pack_kernel<B><<<word_blocks(rc), kThreads, 0, stream>>>(codes, planes, rc.rows, rc.cols);
    });
    return launch_status("pack");
  }

  template <Dtype D>
  static ffi::Error quantize_pack(cudaStream_t stream, const typename Storage<D>::type* x,
                                  const float* borders, uint32_t* planes, RowsCols rc,
                                  int32_t bits) {
    with_bits(bits, [&](auto b) {
      constexpr int B = decltype(b)::value;
      quantize_pack_kernel<D, B><<<word_blocks(rc), kThreads, 0, stream>>>(
          x, borders, planes, rc.rows, rc.cols);
    });
    return launch_status("quantize_pack");
  }

  template <Dtype D>
  static ffi::Error unpack_scale(cudaStream_t stream, const uint32_t* planes,
                                 const float* levels, const typename Storage<D>::type* g,
                                 typename Storage<D>::type* out, RowsCols rc, int32_t bits) {
    with_bits(bits, [&](auto b) {
      constexpr int B = decltype(b)::value;
      unpack_scale_kernel<D, B><<<word_blocks(rc), kThreads, 0, stream>>>(
          planes, levels, g, out, rc.rows, rc.cols);
    });
    return launch_status("unpack_scale");
  }

  template <Dtype D, SketchKind K>
  static ffi::Error sketch(cudaStream_t stream, const typename Storage<D>::type* x,
                           const uint32_t* keys, const uint32_t* row0, float* out,
                           int64_t groups, int64_t R, int64_t N, int64_t k) {
    if ((N + kTN - 1) / kTN > int64_t(INT32_MAX)) {
      return ffi::Error::InvalidArgument("fewbit sketch: N is too large for the CUDA grid");
    }
    if constexpr (K == SketchKind::kCountSketch) {
      if (cudaMemsetAsync(out, 0, sizeof(float) * size_t(groups * k * N), stream) !=
          cudaSuccess) {
        return launch_status("sketch (clear)");
      }
      const dim3 grid(unsigned(std::min<int64_t>((N + kThreads - 1) / kThreads, kMaxBlocks)),
                      unsigned(std::min<int64_t>(groups * R, 65535)));
      countsketch_kernel<D><<<grid, kThreads, 0, stream>>>(x, keys, row0, out, groups, R, N, k);
    } else {
      const int64_t tiles_j = (k + kTJ - 1) / kTJ;
      if (tiles_j > 65535) {
        return ffi::Error::InvalidArgument(
            "fewbit sketch: k above 65535 * 64 is not supported on CUDA");
      }
      const dim3 grid(unsigned((N + kTN - 1) / kTN), unsigned(tiles_j));
      for (int64_t g = 0; g < groups; ++g) {
        dense_sketch_kernel<D, K><<<grid, kThreads, 0, stream>>>(x, keys, row0, out, R, N, k, g);
      }
    }
    return launch_status("sketch");
  }
};

}  // namespace
}  // namespace fewbit

FEWBIT_DEFINE_HANDLERS(Cuda, fewbit::Cuda, ffi::PlatformStream<cudaStream_t>)
