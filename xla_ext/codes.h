// Logic shared by the CPU (cpu.cc) and CUDA (cuda.cu) kernels of fewbit-jax.
//
// Every function here is the single C++ definition of something that
// fewbit_jax also defines in jnp (the pure-JAX path); the two must agree bit
// for bit, and tests/test_ext.py checks that they do:
//
//   code_of        fewbit_jax/codes.py:compute_codes
//   plane layout   fewbit_jax/codes.py:pack / unpack
//   mix32, hash4   fewbit_jax/_rng.py:mix32 / hash4
//   uniform01, gaussian   fewbit_jax/_rng.py:uniform01 / gaussian
//   sketch entries        fewbit_jax/_hash.py:entry / bucket / sign / rows_matrix
//                         (gaussian, rademacher, countsketch; the hash counters too)
//   dtype rounding        XLA's f32 -> bf16 / f16 conversion (round to nearest even)
#pragma once

#include <cstdint>
#include <cstring>
#include <cmath>
#include <type_traits>

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

// ---------------------------------------------------------------------------
// Float formats. bf16 and f16 travel as their uint16 bit patterns; they are
// widened to float32 exactly and narrowed with round-to-nearest-even, as XLA
// does, so a product computed in float32 and narrowed once is the correctly
// rounded product in the narrow type (the float32 product of two bf16 or two
// f16 numbers is exact).

// The bits of a uint32 as a float32 (To = float) or back (To = uint32_t).
template <class To, class From>
FEWBIT_HD To bit_cast(From from) {
  static_assert(sizeof(To) == 4 && sizeof(From) == 4, "bit_cast is for float32 and uint32");
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<To, float>) return __uint_as_float(from);
  else return __float_as_uint(from);
#else
  To to;
  std::memcpy(&to, &from, sizeof to);
  return to;
#endif
}

FEWBIT_HD float as_float(uint32_t u) { return bit_cast<float>(u); }
FEWBIT_HD uint32_t as_uint(float f) { return bit_cast<uint32_t>(f); }

FEWBIT_HD float bf16_to_float(uint16_t h) { return as_float(uint32_t(h) << 16); }

FEWBIT_HD uint16_t float_to_bf16(float f) {
  uint32_t u = as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

FEWBIT_HD float f16_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  if (exp == 0) {  // zero or subnormal: mant * 2**-24, exact in float32
    const float v = float(mant) * 5.9604644775390625e-08f;
    return as_float(as_uint(v) | sign);
  }
  if (exp == 31) return as_float(sign | 0x7f800000u | (mant << 13));
  return as_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

FEWBIT_HD uint16_t float_to_f16(float x) {
  uint32_t f = as_uint(x);
  const uint32_t sign = f & 0x80000000u;
  f ^= sign;
  uint32_t o;
  if (f >= 0x47800000u) {  // >= 65536, Inf or NaN
    o = (f > 0x7f800000u) ? 0x7e00u : 0x7c00u;
  } else if (f < 0x38800000u) {  // below 2**-14: subnormal or zero
    // Adding 0.5 puts the f16 subnormal mantissa in the low bits, rounded by
    // the float32 addition itself (round to nearest even).
    o = as_uint(as_float(f) + 0.5f) - 0x3f000000u;
  } else {
    const uint32_t mant_odd = (f >> 13) & 1u;
    f += (uint32_t(15 - 127) << 23) + 0xfffu;
    f += mant_odd;
    o = f >> 13;  // a carry into the exponent rounds 65520.. up to Inf
  }
  return uint16_t(o | (sign >> 16));
}

// Element types understood by the kernels (the FFI's data types, mapped to
// one small enum that CUDA code can use too).
enum class Dtype : int { kF32 = 0, kBF16 = 1, kF16 = 2, kF64 = 3 };

template <Dtype D> struct Storage;
template <> struct Storage<Dtype::kF32> { using type = float; };
template <> struct Storage<Dtype::kBF16> { using type = uint16_t; };
template <> struct Storage<Dtype::kF16> { using type = uint16_t; };
template <> struct Storage<Dtype::kF64> { using type = double; };

// Widens one stored element to float32 (f64 is rounded to nearest, as
// x.astype(float32) does).
template <Dtype D>
FEWBIT_HD float load_f32(const typename Storage<D>::type* p, int64_t i) {
  if constexpr (D == Dtype::kF32) return p[i];
  else if constexpr (D == Dtype::kBF16) return bf16_to_float(p[i]);
  else if constexpr (D == Dtype::kF16) return f16_to_float(p[i]);
  else return float(p[i]);
}

// Rounds a float32 to the storage type (round to nearest even).
template <Dtype D>
FEWBIT_HD typename Storage<D>::type from_f32(float v) {
  if constexpr (D == Dtype::kF32) return v;
  else if constexpr (D == Dtype::kBF16) return float_to_bf16(v);
  else if constexpr (D == Dtype::kF16) return float_to_f16(v);
  else return double(v);
}

// ---------------------------------------------------------------------------
// Sketch entries. Row i runs over the flattened leading positions of the
// sketched array (as uint32, wrapping like jnp's uint32 arithmetic), column
// j over 0..k-1.

// uint32 bits to a float in (0, 1]: ((bits >> 8) + 1) * 2**-24.
FEWBIT_HD float uniform01(uint32_t bits) {
  return float((bits >> 8) + 1u) * (1.0f / 16777216.0f);
}

// Standard normal draw at (a, b) by Box-Muller on hash4 columns 2b, 2b + 1.
FEWBIT_HD float gaussian(uint32_t k0, uint32_t k1, uint32_t a, uint32_t b) {
  const float u1 = uniform01(hash4(k0, k1, a, b * 2u));
  const float u2 = uniform01(hash4(k0, k1, a, b * 2u + 1u));
  return sqrtf(-2.0f * logf(u1)) * cosf(float(2.0 * 3.14159265358979) * u2);
}

// +1 or -1 from the top bit of hash4.
FEWBIT_HD float rademacher_sign(uint32_t k0, uint32_t k1, uint32_t a, uint32_t b) {
  return 1.0f - 2.0f * float(hash4(k0, k1, a, b) >> 31);
}

// Count sketch: row i goes to bucket hash4(i, 0) % k with sign from hash4(i, 1).
FEWBIT_HD uint32_t countsketch_bucket(uint32_t k0, uint32_t k1, uint32_t i, uint32_t k) {
  return hash4(k0, k1, i, 0u) % k;
}

FEWBIT_HD float countsketch_sign(uint32_t k0, uint32_t k1, uint32_t i) {
  return rademacher_sign(k0, k1, i, 1u);
}

enum class SketchKind : int { kGaussian = 0, kRademacher = 1, kCountSketch = 2 };

// Entry S[i, j] of a dense sketch before its 1/sqrt(k) scale.
template <SketchKind K>
FEWBIT_HD float dense_entry(uint32_t k0, uint32_t k1, uint32_t i, uint32_t j) {
  if constexpr (K == SketchKind::kGaussian) return gaussian(k0, k1, i, j);
  else return rademacher_sign(k0, k1, i, j);
}

}  // namespace fewbit
