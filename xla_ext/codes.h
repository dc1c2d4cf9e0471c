// Logic shared by the CPU (cpu.cc) and CUDA (cuda.cu) kernels of fewbit-jax.
//
// Every function here is the single C++ definition of something that
// fewbit_jax also defines in jnp (the pure-JAX path); the two must agree bit
// for bit, and tests/test_ext.py checks that they do:
//
//   code_of        fewbit_jax/codes.py:compute_codes
//   plane layout   fewbit_jax/codes.py:pack / unpack
//   mix32, hash4   fewbit_jax/rng.py:mix32 / hash4
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FEWBIT_HD __host__ __device__ __forceinline__
#else
#define FEWBIT_HD inline
#endif

namespace fewbit {

// Number of codes packed into one uint32 word of a bit plane.
constexpr int kWordBits = 32;

// Number of words per bit plane for a last axis of n elements.
FEWBIT_HD int64_t words_for(int64_t n) { return (n + kWordBits - 1) / kWordBits; }

// The code of x: the number of the 2**bits - 1 ascending `borders` that are
// strictly less than x (searchsorted side="left"), found by a branch-free
// binary search. NaN compares false everywhere and gets code 0.
FEWBIT_HD uint32_t code_of(float x, const float* borders, int bits) {
  uint32_t pos = 0;
  for (int s = bits - 1; s >= 0; --s) {
    const uint32_t cand = pos + (1u << s);
    pos = (borders[cand - 1] < x) ? cand : pos;
  }
  return pos;
}

// Code `c` of element t (0 <= t < 32) of a word contributes bit p of c to
// bit t of plane p's word: plane p of a row is sum_t ((c_t >> p) & 1) << t.
FEWBIT_HD uint32_t plane_bit(uint32_t code, int plane, int t) {
  return ((code >> plane) & 1u) << t;
}

// A 32-bit integer finaliser with low bias (lowbias32: shifts 16, 15, 16).
FEWBIT_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

// Counter-based hash of a 64-bit key (k0, k1) and two counters (a, b): the
// one definition of randomness behind every sketch.
FEWBIT_HD uint32_t hash4(uint32_t k0, uint32_t k1, uint32_t a, uint32_t b) {
  uint32_t h = mix32(a ^ k0 ^ 0x9e3779b9u);
  h = mix32(h ^ b ^ 0x85ebca6bu);
  return mix32(h ^ k1 ^ 0xc2b2ae35u);
}

}  // namespace fewbit
