// CPU XLA FFI handlers of fewbit-jax (see handlers.h for the targets).
//
// Work is split into tasks over independent output slices and run on XLA's
// intra-op thread pool, so each element of a result is written by one task
// and results do not depend on the number of threads.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "codes.h"
#include "handlers.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace fewbit {
namespace {

// Runs f(0) .. f(n_tasks - 1) on the calling thread and the pool. Tasks are
// claimed from a shared counter, so the caller finishes everything itself if
// the pool is busy; it only waits for tasks that another thread has claimed.
// A pool thread that starts after the call returned finds nothing to claim
// and touches only the shared state it owns.
void parallel_for(ffi::ThreadPool& pool, int64_t n_tasks,
                  const std::function<void(int64_t)>& f) {
  const int64_t threads = pool.num_threads();
  if (n_tasks <= 1 || threads <= 1) {
    for (int64_t t = 0; t < n_tasks; ++t) f(t);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    int64_t n_tasks = 0;
    int64_t done = 0;
    std::mutex mu;
    std::condition_variable cv;
    const std::function<void(int64_t)>* f = nullptr;
  };
  auto state = std::make_shared<State>();
  state->n_tasks = n_tasks;
  state->f = &f;
  auto work = [](const std::shared_ptr<State>& s) {
    int64_t finished = 0;
    for (int64_t t; (t = s->next.fetch_add(1)) < s->n_tasks;) {
      (*s->f)(t);
      ++finished;
    }
    if (finished) {
      std::lock_guard<std::mutex> lock(s->mu);
      s->done += finished;
      if (s->done == s->n_tasks) s->cv.notify_all();
    }
  };
  const int64_t helpers = std::min(threads, n_tasks) - 1;
  for (int64_t h = 0; h < helpers; ++h) {
    pool.Schedule([state, work] { work(state); });
  }
  work(state);
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done == state->n_tasks; });
}

// Splits `total` units into at most `max_tasks` contiguous ranges of at least
// `min_units` units.
struct Chunks {
  int64_t count;
  int64_t size;
};

Chunks chunks(int64_t total, int64_t min_units, int64_t max_tasks) {
  if (total <= 0) return {0, 1};
  int64_t count = std::max<int64_t>(1, std::min(max_tasks, total / std::max<int64_t>(min_units, 1)));
  const int64_t size = (total + count - 1) / count;
  count = (total + size - 1) / size;
  return {count, size};
}

int64_t max_tasks(ffi::ThreadPool& pool) {
  return std::max<int64_t>(1, pool.num_threads()) * 4;
}

// Where the work of one sketch group runs: split over the pool, or on the
// calling thread when the groups themselves are spread over the pool.
struct Exec {
  ffi::ThreadPool* pool;  // nullptr: serial
  int64_t threads() const { return pool ? std::max<int64_t>(1, pool->num_threads()) : 1; }
  void run(int64_t n_tasks, const std::function<void(int64_t)>& f) const {
    if (pool != nullptr) {
      parallel_for(*pool, n_tasks, f);
    } else {
      for (int64_t t = 0; t < n_tasks; ++t) f(t);
    }
  }
};

// The CPU kernels behind the handlers of handlers.h, on checked operands.
struct Cpu {
  using Ctx = ffi::ThreadPool;
  static ffi::Error pack(ffi::ThreadPool& pool, const uint8_t* cd, uint32_t* out, RowsCols rc,
                         int32_t bits);
  template <Dtype D>
  static ffi::Error quantize_pack(ffi::ThreadPool& pool, const typename Storage<D>::type* x,
                                  const float* borders, uint32_t* out, RowsCols rc,
                                  int32_t bits);
  template <Dtype D>
  static ffi::Error unpack_scale(ffi::ThreadPool& pool, const uint32_t* planes,
                                 const float* levels, const typename Storage<D>::type* g,
                                 typename Storage<D>::type* out, RowsCols rc, int32_t bits);
  template <Dtype D, SketchKind K>
  static ffi::Error sketch(ffi::ThreadPool& pool, const typename Storage<D>::type* x,
                           const uint32_t* kw, const uint32_t* r0, float* o, int64_t groups,
                           int64_t R, int64_t N, int64_t k);
};

// ---------------------------------------------------------------------------
// Word kernels: 32 elements at a time, as loops of fixed length over the 32
// lanes that the compiler vectorises. Each is built twice, for AVX2+FMA
// (x86-64-v3: Haswell, Zen and later) and for baseline x86-64, and picked at
// load time by CPU features.

#define FEWBIT_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))

// Codes of 32 float32 values: the count of borders strictly below x, which
// for ascending borders is code_of's binary search (searchsorted side="left";
// NaN compares false, code 0). Compares are cheaper than the search's
// dependent lookups up to 15 borders.
FEWBIT_CLONES
void codes_by_count(const float* xf, const float* borders, int n_borders, uint32_t* c) {
  for (int t = 0; t < kWordBits; ++t) c[t] = 0;
  for (int i = 0; i < n_borders; ++i) {
    const float b = borders[i];
    for (int t = 0; t < kWordBits; ++t) c[t] += (b < xf[t]) ? 1u : 0u;
  }
}

FEWBIT_CLONES
void codes_by_search(const float* xf, const float* borders, int bits, uint32_t* c) {
  for (int t = 0; t < kWordBits; ++t) c[t] = code_of(xf[t], borders, bits);
}

// planes[p * words + w] = sum_t ((c[t] >> p) & 1) << t for p < bits.
FEWBIT_CLONES
void pack_word(const uint32_t* c, int bits, uint32_t* planes_row, int64_t words, int64_t w) {
  for (int p = 0; p < bits; ++p) {
    uint32_t acc = 0;
    for (int t = 0; t < kWordBits; ++t) acc |= plane_bit(c[t], p, t);
    planes_row[p * words + w] = acc;
  }
}

// The 32 codes of a word from its `bits` plane words pw[p].
FEWBIT_CLONES
void unpack_word(const uint32_t* pw, int bits, uint32_t* c) {
  for (int t = 0; t < kWordBits; ++t) c[t] = 0;
  for (int p = 0; p < bits; ++p) {
    const uint32_t word = pw[p];
    for (int t = 0; t < kWordBits; ++t) c[t] |= ((word >> t) & 1u) << p;
  }
}

// level * g, and 0 for a zero level whatever g is (inf or NaN too): a zero
// level is a zero derivative, which jax's gradients give as a select.
inline float scale_one(float level, float g) { return level == 0.0f ? 0.0f : level * g; }

void scale_word_generic(const uint32_t* c, const float* levels, int bits, const float* g,
                        float* out) {
  (void)bits;
  for (int t = 0; t < kWordBits; ++t) out[t] = scale_one(levels[c[t]], g[t]);
}

#if defined(__x86_64__)
// With AVX2 a table of up to 8 levels sits in one register and vpermps looks
// 8 codes up at once (a gather per element is the slow part otherwise).
__attribute__((target("avx2,fma")))
void scale_word_avx2(const uint32_t* c, const float* levels, int bits, const float* g,
                     float* out) {
  if (bits > 3) {
    for (int t = 0; t < kWordBits; ++t) out[t] = scale_one(levels[c[t]], g[t]);
    return;
  }
  float table[8] = {};
  for (int i = 0; i < (1 << bits); ++i) table[i] = levels[i];
  const __m256 lv = _mm256_loadu_ps(table);
  for (int t = 0; t < kWordBits; t += 8) {
    const __m256i idx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + t));
    const __m256 l = _mm256_permutevar8x32_ps(lv, idx);
    const __m256 prod = _mm256_mul_ps(l, _mm256_loadu_ps(g + t));
    const __m256 nonzero = _mm256_cmp_ps(l, _mm256_setzero_ps(), _CMP_NEQ_UQ);
    _mm256_storeu_ps(out + t, _mm256_and_ps(prod, nonzero));  // scale_one, 8 lanes
  }
}
#endif

using ScaleWordFn = void (*)(const uint32_t*, const float*, int, const float*, float*);

ScaleWordFn pick_scale_word() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2")) return scale_word_avx2;
#endif
  return scale_word_generic;
}

// levels[c[t]] * g[t] for the 32 lanes of a word.
void scale_word(const uint32_t* c, const float* levels, int bits, const float* g, float* out) {
  static const ScaleWordFn fn = pick_scale_word();
  fn(c, levels, bits, g, out);
}

// Widens up to 32 stored elements to float32, zero-filling the rest.
template <Dtype D>
inline void load_word(const typename Storage<D>::type* x, int m, float* xf) {
  for (int t = 0; t < m; ++t) xf[t] = load_f32<D>(x, t);
  for (int t = m; t < kWordBits; ++t) xf[t] = 0.0f;
}

// Row ranges sized so a task handles at least ~64K elements.
Chunks row_chunks(ffi::ThreadPool& pool, int64_t rows, int64_t n) {
  const int64_t min_rows = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(n, 1));
  return chunks(rows, min_rows, max_tasks(pool));
}

ffi::Error Cpu::pack(ffi::ThreadPool& pool, const uint8_t* cd, uint32_t* out, RowsCols rc,
                     int32_t bits) {
  const int64_t n = rc.cols, words = words_for(n);
  const Chunks ch = row_chunks(pool, rc.rows, n);
  parallel_for(pool, ch.count, [&](int64_t task) {
    const int64_t r0 = task * ch.size, r1 = std::min(rc.rows, r0 + ch.size);
    uint32_t c[kWordBits];
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t w = 0; w < words; ++w) {
        const int64_t i0 = w * kWordBits;
        const int m = int(std::min<int64_t>(kWordBits, n - i0));
        for (int t = 0; t < m; ++t) c[t] = cd[r * n + i0 + t];
        for (int t = m; t < kWordBits; ++t) c[t] = 0;
        pack_word(c, bits, out + r * bits * words, words, w);
      }
    }
  });
  return ffi::Error::Success();
}

template <Dtype D>
ffi::Error Cpu::quantize_pack(ffi::ThreadPool& pool, const typename Storage<D>::type* x,
                              const float* borders, uint32_t* out, RowsCols rc, int32_t bits) {
  const int64_t n = rc.cols, words = words_for(n);
  const int n_borders = (1 << bits) - 1;
  const Chunks ch = row_chunks(pool, rc.rows, n);
  parallel_for(pool, ch.count, [&](int64_t task) {
    const int64_t r0 = task * ch.size, r1 = std::min(rc.rows, r0 + ch.size);
    float xf[kWordBits];
    uint32_t c[kWordBits];
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t w = 0; w < words; ++w) {
        const int64_t i0 = w * kWordBits;
        const int m = int(std::min<int64_t>(kWordBits, n - i0));
        load_word<D>(x + r * n + i0, m, xf);
        if (bits <= 4) codes_by_count(xf, borders, n_borders, c);
        else codes_by_search(xf, borders, bits, c);
        for (int t = m; t < kWordBits; ++t) c[t] = 0;  // padding has code 0
        pack_word(c, bits, out + r * bits * words, words, w);
      }
    }
  });
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------
// levels[code] * g: codes rebuilt a word at a time, the product in float32
// and rounded once to g's dtype.

template <Dtype D>
ffi::Error Cpu::unpack_scale(ffi::ThreadPool& pool, const uint32_t* planes, const float* levels,
                             const typename Storage<D>::type* g, typename Storage<D>::type* out,
                             RowsCols rc, int32_t bits) {
  const int64_t n = rc.cols, words = words_for(n);
  const Chunks ch = row_chunks(pool, rc.rows, n);
  parallel_for(pool, ch.count, [&](int64_t task) {
    const int64_t r0 = task * ch.size, r1 = std::min(rc.rows, r0 + ch.size);
    uint32_t pw[8], c[kWordBits];
    float gf[kWordBits], of[kWordBits];
    for (int64_t r = r0; r < r1; ++r) {
      const uint32_t* row = planes + r * bits * words;
      for (int64_t w = 0; w < words; ++w) {
        for (int p = 0; p < bits; ++p) pw[p] = row[p * words + w];
        unpack_word(pw, bits, c);
        const int64_t i0 = r * n + w * kWordBits;
        const int m = int(std::min<int64_t>(kWordBits, n - w * kWordBits));
        if constexpr (D == Dtype::kF32) {
          if (m == kWordBits) {
            scale_word(c, levels, bits, g + i0, out + i0);
            continue;
          }
        }
        load_word<D>(g + i0, m, gf);
        for (int t = m; t < kWordBits; ++t) c[t] = 0;
        scale_word(c, levels, bits, gf, of);
        for (int t = 0; t < m; ++t) out[i0 + t] = from_f32<D>(of[t]);
      }
    }
  });
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------
// Sketches. out[g] (k, N) = S^T x[g] with S (R, k) generated on the fly.

constexpr int kRowBlock = 256;  // rows of S (and x) per tile
constexpr int kColBlock = 48;   // columns of S (rows of the result) per tile
constexpr int kTileJ = 6;       // sketch columns per micro-tile (12 accumulators)
constexpr int kLanes = 16;      // columns of x per micro-tile

typedef float v8f __attribute__((vector_size(32)));

// acc[q] (16 floats as two v8f) += S[r, j + q] * x[r, 0:16] over the rows of a
// tile, for kTileJ consecutive sketch columns; then adds acc into the result.
FEWBIT_CLONES
void micro_tile(const float* st, int rows, int j, const float* xc, float* const* out_rows,
                int64_t n0, int valid) {
  v8f acc[kTileJ][2] = {};
  for (int r = 0; r < rows; ++r) {
    v8f x0, x1;
    std::memcpy(&x0, xc + r * kLanes, sizeof x0);
    std::memcpy(&x1, xc + r * kLanes + 8, sizeof x1);
    const float* s = st + int64_t(r) * kColBlock + j;
    for (int q = 0; q < kTileJ; ++q) {
      const v8f sv = {s[q], s[q], s[q], s[q], s[q], s[q], s[q], s[q]};
      acc[q][0] += sv * x0;
      acc[q][1] += sv * x1;
    }
  }
  for (int q = 0; q < kTileJ; ++q) {
    float* o = out_rows[q];
    if (o == nullptr) continue;
    float tmp[kLanes];
    std::memcpy(tmp, &acc[q][0], sizeof(v8f));
    std::memcpy(tmp + 8, &acc[q][1], sizeof(v8f));
    for (int l = 0; l < valid; ++l) o[n0 + l] += tmp[l];
  }
}

template <Dtype D, SketchKind K>
void dense_sketch_group(const Exec& ex, const typename Storage<D>::type* x,
                        uint32_t k0, uint32_t k1, uint32_t row0, int64_t R, int64_t N,
                        int64_t k, float* out) {
  std::fill(out, out + k * N, 0.0f);
  // The scale as fewbit_jax.sketch writes it: float32(1 / sqrt(k)) from double.
  const float inv_root_k = float(1.0 / std::sqrt(double(k)));
  const int64_t jblocks = (k + kColBlock - 1) / kColBlock;
  const int64_t nlanes = (N + kLanes - 1) / kLanes;
  // Split the columns of x too when there are fewer column blocks of S than
  // threads (each split regenerates its S tiles).
  const int64_t want = ex.threads();
  const int64_t nsplit = std::max<int64_t>(1, std::min(nlanes, (want + jblocks - 1) / jblocks));
  const int64_t lanes_per = (nlanes + nsplit - 1) / nsplit;
  ex.run(jblocks * nsplit, [&](int64_t task) {
    const int64_t jb = task / nsplit, ns = task % nsplit;
    const int64_t j0 = jb * kColBlock, jn = std::min<int64_t>(kColBlock, k - j0);
    const int64_t l0 = ns * lanes_per, l1 = std::min(nlanes, l0 + lanes_per);
    std::vector<float> st(size_t(kRowBlock) * kColBlock);
    std::vector<float> xc(size_t(kRowBlock) * kLanes);
    for (int64_t rb = 0; rb < R; rb += kRowBlock) {
      const int rows = int(std::min<int64_t>(kRowBlock, R - rb));
      for (int r = 0; r < rows; ++r) {
        const uint32_t i = row0 + uint32_t(rb + r);
        float* srow = st.data() + int64_t(r) * kColBlock;
        for (int64_t jj = 0; jj < jn; ++jj) {
          srow[jj] = dense_entry<K>(k0, k1, i, uint32_t(j0 + jj)) * inv_root_k;
        }
        for (int64_t jj = jn; jj < kColBlock; ++jj) srow[jj] = 0.0f;
      }
      for (int64_t lane = l0; lane < l1; ++lane) {
        const int64_t n0 = lane * kLanes;
        const int valid = int(std::min<int64_t>(kLanes, N - n0));
        for (int r = 0; r < rows; ++r) {
          const int64_t base = (rb + r) * N + n0;
          float* dst = xc.data() + r * kLanes;
          for (int l = 0; l < valid; ++l) dst[l] = load_f32<D>(x, base + l);
          for (int l = valid; l < kLanes; ++l) dst[l] = 0.0f;
        }
        for (int64_t jj = 0; jj < jn; jj += kTileJ) {
          float* rows_out[kTileJ];
          for (int q = 0; q < kTileJ; ++q) {
            rows_out[q] = (jj + q < jn) ? out + (j0 + jj + q) * N : nullptr;
          }
          micro_tile(st.data(), rows, int(jj), xc.data(), rows_out, n0, valid);
        }
      }
    }
  });
}

template <Dtype D>
void countsketch_group(const Exec& ex, const typename Storage<D>::type* x,
                       uint32_t k0, uint32_t k1, uint32_t row0, int64_t R, int64_t N,
                       int64_t k, float* out) {
  std::fill(out, out + k * N, 0.0f);
  // Tasks own disjoint column ranges, so every output element is summed in
  // row order by one thread.
  const Chunks ch = chunks(N, 128, ex.threads() * 4);
  ex.run(ch.count, [&](int64_t t) {
    const int64_t c0 = t * ch.size, c1 = std::min(N, c0 + ch.size);
    for (int64_t r = 0; r < R; ++r) {
      const uint32_t i = row0 + uint32_t(r);
      const uint32_t b = countsketch_bucket(k0, k1, i, uint32_t(k));
      const float s = countsketch_sign(k0, k1, i);
      float* o = out + int64_t(b) * N;
      const int64_t base = r * N;
      for (int64_t c = c0; c < c1; ++c) o[c] += s * load_f32<D>(x, base + c);
    }
  });
}

template <Dtype D, SketchKind K>
ffi::Error Cpu::sketch(ffi::ThreadPool& pool, const typename Storage<D>::type* x,
                       const uint32_t* kw, const uint32_t* r0, float* o, int64_t groups,
                       int64_t R, int64_t N, int64_t k) {
  // With at least as many groups (sketch blocks, vmapped problems) as
  // threads, each task takes whole groups: splitting one small group would
  // regenerate its S tiles in every split and synchronise the pool once per
  // group. Either way every output element is summed in the same row order
  // by one thread, so the result does not depend on the split.
  const bool by_group = groups > 1 && groups >= Exec{&pool}.threads();
  const Exec inner{by_group ? nullptr : &pool};
  auto one = [&](int64_t g) {
    const auto* xg = x + g * R * N;
    float* og = o + g * k * N;
    if constexpr (K == SketchKind::kCountSketch) {
      countsketch_group<D>(inner, xg, kw[2 * g], kw[2 * g + 1], r0[g], R, N, k, og);
    } else {
      dense_sketch_group<D, K>(inner, xg, kw[2 * g], kw[2 * g + 1], r0[g], R, N, k, og);
    }
  };
  if (by_group) {
    parallel_for(pool, groups, one);
  } else {
    for (int64_t g = 0; g < groups; ++g) one(g);
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace fewbit

FEWBIT_DEFINE_HANDLERS(Cpu, fewbit::Cpu, ffi::ThreadPool)
