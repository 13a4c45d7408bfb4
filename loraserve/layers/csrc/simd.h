// Helpers shared by the CPU kernels (each kernel is its own extension; this header is compiled into each).
// The AVX512-BF16 ones exist when the compiler targets a CPU that has the instructions (LORASERVE_BF16_SIMD).
#pragma once

#include <torch/extension.h>

#include <algorithm>

namespace loraserve_simd {

// Asks for `rows` rows of `count` elements, `stride` elements apart, ahead of their use: the hardware
// prefetcher follows one sequential stream, not a walk over short pieces of many rows.
template <typename T>
inline void prefetch_range(const T* start, int64_t count) {
  const char* p = reinterpret_cast<const char*>(start);
  for (int64_t offset = 0; offset < count * static_cast<int64_t>(sizeof(T)); offset += 64) __builtin_prefetch(p + offset);
}

template <typename T>
inline void prefetch_rows(const T* start, int64_t rows, int64_t stride, int64_t count) {
  for (int64_t r = 0; r < rows; ++r) prefetch_range(start + r * stride, count);
}

}  // namespace loraserve_simd

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#define LORASERVE_BF16_SIMD 1

namespace loraserve_simd {

// 16 bf16 values widened to float (exact: a bf16 is the top half of a float).
inline __m512 load_bf16(const at::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// The first popcount(mask) of 16 bf16 values widened (the rest read as zero, never touched in memory).
inline __m512 load_bf16_masked(const at::BFloat16* p, __mmask16 mask) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p)), 16));
}

// To the nearest bf16 (even on ties), kept as float.
inline __m512 round_bf16(__m512 v) {
  const __m256i packed = (__m256i)_mm512_cvtneps_pbh(v);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(packed), 16));
}

inline void store_bf16(at::BFloat16* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(v));
}

// v[i] holds 16 partial sums of dot product i; returns the 16 totals, dot product i in lane i.
inline __m512 reduce16(const __m512* v) {
  __m512 w[8], u[4];
  for (int i = 0; i < 8; ++i)
    w[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int j = 0; j < 4; ++j) {
    const __m512d a = _mm512_castps_pd(w[2 * j]), b = _mm512_castps_pd(w[2 * j + 1]);
    u[j] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  // u[j], 128-bit lane L, element e: lane L's partial sum of dot product 4j+e.
  const __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x44), _mm512_shuffle_f32x4(u[0], u[1], 0xEE));
  const __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x44), _mm512_shuffle_f32x4(u[2], u[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, 0x88), _mm512_shuffle_f32x4(s01, s23, 0xDD));
}

inline __m512bh load_pairs(const at::BFloat16* p, __mmask32 mask) {
  return (__m512bh)_mm512_maskz_loadu_epi16(mask, p);
}

// out(t, r, x[t] · a[r]) for `tokens` rows of x and `rows` rows of a (both bf16, `in` long): R rows x TT tokens
// per register block (R * TT = 16 accumulators, reduced together by one transpose-add), 32 features per
// vdpbf16ps (products exact, float sums).
template <int R, int TT, typename Out>
inline void dot_block_bf16(const at::BFloat16* x, int64_t ldx, const at::BFloat16* a, int64_t lda, int64_t in,
                           int64_t tokens, int64_t rows, Out&& out) {
  static_assert(R * TT == 16, "one reduce16 per block");
  const int64_t full = in / 32 * 32;
  const __mmask32 tail = static_cast<__mmask32>((1ull << (in - full)) - 1);
  for (int64_t r0 = 0; r0 < rows; r0 += R) {
    const at::BFloat16* ar[R];
    for (int j = 0; j < R; ++j) ar[j] = a + std::min<int64_t>(r0 + j, rows - 1) * lda;
    for (int64_t t0 = 0; t0 < tokens; t0 += TT) {
      const at::BFloat16* xt[TT];
      for (int j = 0; j < TT; ++j) xt[j] = x + std::min<int64_t>(t0 + j, tokens - 1) * ldx;
      __m512 acc[16];
      for (auto& v : acc) v = _mm512_setzero_ps();
      auto step = [&](int64_t i, __mmask32 mask) {
        __m512bh xv[TT];
        for (int j = 0; j < TT; ++j) xv[j] = load_pairs(xt[j] + i, mask);
        for (int r = 0; r < R; ++r) {
          const __m512bh av = load_pairs(ar[r] + i, mask);
          for (int t = 0; t < TT; ++t) acc[TT * r + t] = _mm512_dpbf16_ps(acc[TT * r + t], av, xv[t]);
        }
      };
      for (int64_t i = 0; i < full; i += 32) step(i, ~__mmask32(0));
      if (tail) step(full, tail);
      alignas(64) float dots[16];
      _mm512_store_ps(dots, reduce16(acc));
      for (int64_t r = 0; r < std::min<int64_t>(R, rows - r0); ++r)
        for (int64_t t = 0; t < std::min<int64_t>(TT, tokens - t0); ++t) out(t0 + t, r0 + r, dots[TT * r + t]);
    }
  }
}

// dot_block_bf16 with the block shape that leaves no lane idle: runs of one or two tokens take taller blocks.
template <typename Out>
inline void dot_rows_bf16(const at::BFloat16* x, int64_t ldx, const at::BFloat16* a, int64_t lda, int64_t in,
                          int64_t tokens, int64_t rows, Out&& out) {
  if (tokens >= 4) {
    dot_block_bf16<4, 4>(x, ldx, a, lda, in, tokens, rows, out);
  } else if (tokens >= 2) {
    dot_block_bf16<8, 2>(x, ldx, a, lda, in, tokens, rows, out);
  } else {
    dot_block_bf16<16, 1>(x, ldx, a, lda, in, tokens, rows, out);
  }
}

}  // namespace loraserve_simd
#endif
