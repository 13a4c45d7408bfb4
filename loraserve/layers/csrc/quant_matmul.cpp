// y = x · Wᵀ (+ bias) with W held quantized: int4 or int8 values, a scale per group of `group` input features
// and optionally an offset, w[n, k] = q[n, k] · scale[n, k / group] + offset[n, k / group] (CPU; x, bias and y
// all bf16, or all float32).
//
// Torch's own int4/int8 weight-only kernels are GEMV-shaped: fast for one token, 2-3x slower than this one at
// 64 (docs/benchmarks.md). Two paths, both reading only the quantized bytes:
//   up to kFewTokens tokens (matmul_rows): each row's integers meet x directly, no de-quantized copy;
//   more (matmul_tiles): each work item de-quantizes kTileRows rows into bf16 in cache (exactly the values a
//   bf16 copy of the de-quantized weight would hold: the float value rounded once), interleaves them into
//   feature pairs and runs blocks of kTokens tokens against them with vdpbf16ps, so the de-quantizing is paid
//   once per weight per call and the arithmetic is the bf16 matmul's.
// float32 activations take the same two paths with float arithmetic throughout (tiles hold the de-quantized
// floats unrounded, one FMA per feature instead of one vdpbf16ps per pair): a float32 model on a quantized base
// runs at float32 matmul speed instead of de-quantizing whole weights every call.
//
// Layouts (layers/quantized.py packs them): int4 holds two values per byte, in chunks of 32 features where
// byte i of a chunk holds feature i (low nibble) and feature i + 16 (high nibble), unsigned 0..15 (GGUF's
// Q4_0/Q4_1 order); int8 holds one signed value per byte. Scales and offsets are float or half, [N, K / group].
#include "simd.h"

#include <cstring>
#include <type_traits>
#include <vector>

#ifdef LORASERVE_BF16_SIMD
namespace {

using namespace loraserve_simd;

constexpr int64_t kTileRows = 32;

inline float scalar(float v) {
  return v;
}

inline float scalar(at::Half v) {  // the F16C instruction: c10's portable conversion is a dozen integer ops
  return _cvtsh_ss(v.x);
}

struct Weight {
  const uint8_t* data;
  int64_t n, k, group, bits;
};

// Features [f, f + 16) of row `row` (f a multiple of 16) as float: in a 32-feature int4 chunk the first 16 are
// the low nibbles of its 16 bytes, the next 16 the high ones.
inline __m512 load16(const Weight& w, int64_t row, int64_t f) {
  if (w.bits == 4) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w.data + (row * w.k + (f & ~int64_t(31))) / 2));
    const __m512i v = _mm512_cvtepu8_epi32(bytes);
    return _mm512_cvtepi32_ps(f & 16 ? _mm512_srli_epi32(v, 4) : _mm512_and_si512(v, _mm512_set1_epi32(0xF)));
  }
  const auto* q = reinterpret_cast<const __m128i*>(w.data + row * w.k + f);
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q)));
}

// Up to 16 scales or offsets (float or half) widened to float; lanes past the mask read as zero.
inline __m512 load16_masked(const float* p, __mmask16 mask) {
  return _mm512_maskz_loadu_ps(mask, p);
}

inline __m512 load16_masked(const at::Half* p, __mmask16 mask) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p));
}

// Activations, bias and output are bf16 or float (X): loads widen to float, stores round to X.
inline __m512 load_x_masked(const float* p, __mmask16 mask) {
  return _mm512_maskz_loadu_ps(mask, p);
}

inline __m512 load_x_masked(const at::BFloat16* p, __mmask16 mask) {
  return load_bf16_masked(p, mask);
}

inline void store_x(float* p, __m512 v) {
  _mm512_storeu_ps(p, v);
}

inline void store_x(at::BFloat16* p, __m512 v) {
  store_bf16(p, v);
}

inline void store_x_masked(float* p, __mmask16 mask, __m512 v) {
  _mm512_mask_storeu_ps(p, mask, v);
}

inline void store_x_masked(at::BFloat16* p, __mmask16 mask, __m512 v) {
  _mm256_mask_storeu_epi16(p, mask, (__m256i)_mm512_cvtneps_pbh(v));
}

// Row `row` of W into `out` as X (bf16: the float value rounded once), group by group (no division in the
// loop: group sizes need not be powers of two).
template <typename S, bool kOffset, typename X>
void dequantize_row(const Weight& w, const S* scales, const S* offsets, int64_t row, X* out) {
  const int64_t groups = w.k / w.group;
  for (int64_t g = 0; g < groups; ++g) {
    const __m512 s = _mm512_set1_ps(scalar(scales[row * groups + g]));
    const __m512 o = kOffset ? _mm512_set1_ps(scalar(offsets[row * groups + g])) : _mm512_setzero_ps();
    for (int64_t f = g * w.group; f < (g + 1) * w.group; f += 16) {
      const __m512 v = kOffset ? _mm512_fmadd_ps(load16(w, row, f), s, o) : _mm512_mul_ps(load16(w, row, f), s);
      store_x(out + f, v);
    }
  }
}

// 16 rows of 16 32-bit words (bf16 pairs), rows `stride` words apart, written transposed into `out` (16 words
// per output row, `out_stride` apart): out[j][i] = in[i][j].
inline void transpose16(const uint32_t* in, int64_t stride, uint32_t* out, int64_t out_stride) {
  __m512i r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(in + i * stride);
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  // r[4i + c], 128-bit lane L: rows 4i..4i+3 of column 4L + c
  for (int i = 0; i < 2; ++i)
    for (int c = 0; c < 4; ++c) {
      t[8 * i + c] = _mm512_shuffle_i32x4(r[8 * i + c], r[8 * i + 4 + c], 0x88);
      t[8 * i + 4 + c] = _mm512_shuffle_i32x4(r[8 * i + c], r[8 * i + 4 + c], 0xDD);
    }
  // t[8i + c]: lanes rows 8i..8i+3 / 8i+4..8i+7 of columns c, 8 + c; t[8i + 4 + c] the same of 4 + c, 12 + c
  for (int c = 0; c < 4; ++c) {
    _mm512_storeu_si512(out + c * out_stride, _mm512_shuffle_i32x4(t[c], t[8 + c], 0x88));
    _mm512_storeu_si512(out + (c + 8) * out_stride, _mm512_shuffle_i32x4(t[c], t[8 + c], 0xDD));
    _mm512_storeu_si512(out + (c + 4) * out_stride, _mm512_shuffle_i32x4(t[4 + c], t[12 + c], 0x88));
    _mm512_storeu_si512(out + (c + 12) * out_stride, _mm512_shuffle_i32x4(t[4 + c], t[12 + c], 0xDD));
  }
}

// y[t, 0:32] for T tokens against a tile of 32 rows in word-interleaved form, b[p * 32 + n] holding word p of
// row n. bf16: a word is a feature pair, every vdpbf16ps multiplies a broadcast pair of x by 16 rows; float: a
// word is one feature, one FMA per broadcast feature and 16 rows. 2 x T accumulators either way.
template <int T, typename X>
inline void tile_tokens(const uint32_t* x, int64_t ldx, const uint32_t* b, int64_t words, int64_t rows,
                        const X* bias, X* y, int64_t ldy) {
  __m512 acc[T][2];
  for (int t = 0; t < T; ++t) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
  for (int64_t p = 0; p < words; ++p) {
    const __m512i b0 = _mm512_loadu_si512(b + p * 32), b1 = _mm512_loadu_si512(b + p * 32 + 16);
    _Pragma("GCC unroll 12") for (int t = 0; t < T; ++t) {
      const __m512i xv = _mm512_set1_epi32(static_cast<int>(x[t * ldx + p]));
      if constexpr (std::is_same_v<X, float>) {
        acc[t][0] = _mm512_fmadd_ps(_mm512_castsi512_ps(xv), _mm512_castsi512_ps(b0), acc[t][0]);
        acc[t][1] = _mm512_fmadd_ps(_mm512_castsi512_ps(xv), _mm512_castsi512_ps(b1), acc[t][1]);
      } else {
        acc[t][0] = _mm512_dpbf16_ps(acc[t][0], (__m512bh)xv, (__m512bh)b0);
        acc[t][1] = _mm512_dpbf16_ps(acc[t][1], (__m512bh)xv, (__m512bh)b1);
      }
    }
  }
  const __mmask16 m0 = static_cast<__mmask16>((1u << std::min<int64_t>(rows, 16)) - 1);
  const __mmask16 m1 = static_cast<__mmask16>((1u << std::clamp<int64_t>(rows - 16, 0, 16)) - 1);
  __m512 bias0 = _mm512_setzero_ps(), bias1 = _mm512_setzero_ps();
  if (bias != nullptr) bias0 = load_x_masked(bias, m0), bias1 = load_x_masked(bias + 16, m1);
  for (int t = 0; t < T; ++t) {
    store_x_masked(y + t * ldy, m0, _mm512_add_ps(acc[t][0], bias0));
    store_x_masked(y + t * ldy + 16, m1, _mm512_add_ps(acc[t][1], bias1));
  }
}

constexpr int kTokens = 12;  // tokens per register block: 24 accumulators, 2 tile vectors, 1 broadcast

template <typename X, int T = kTokens>
inline void tile_tail(int tokens, const uint32_t* x, int64_t ldx, const uint32_t* b, int64_t words, int64_t rows,
                      const X* bias, X* y, int64_t ldy) {
  if constexpr (T > 0) {
    if (tokens == T) return tile_tokens<T>(x, ldx, b, words, rows, bias, y, ldy);
    return tile_tail<X, T - 1>(tokens, x, ldx, b, words, rows, bias, y, ldy);
  }
}

// Few tokens (decode of a handful of sequences): no tile. Each row's integers meet x directly, the scales applied
// once per partial sum and the offsets through per-group sums of x (w = q·s + o, so x·w = s·Σ q·x + o·Σ x);
// 16 rows at a time end in one transpose-add.
//   int4 (bf16 x, groups of whole chunks): 64 bytes (4 chunks, 128 values) per load; each nibble, and-ed out
//   and interleaved with the byte 0x43, is the bf16 word 0x43nn, exactly 128 + q, so one and / shift and one
//   unpack per 32 values give vdpbf16ps its operand (the 128 · Σ x this adds is taken off with the offsets).
//   The unpacks interleave within 128-bit lanes, so x is permuted once per call into the order they produce,
//   and lane group L of each partial sum holds chunk L alone: one vector of 4 chunk scales scales all four.
//   Otherwise (int8, odd groups): values widened to float and FMA'd into float copies of x.
//   float32 x: no factoring (its cancellation would cost float32 bits): each weight is de-quantized exactly,
//   q·s + o, and FMA'd into x, the de-quantize-then-matmul reference in another summation order.
template <typename S, bool kOffset, int T, typename X>
void matmul_rows(const X* x, const Weight& w, const S* scales, const S* offsets, const X* bias, X* y) {
  const int64_t groups = w.k / w.group, blocks = (w.n + 15) / 16;
  constexpr bool exact = std::is_same_v<X, float>;
  const bool nibbles = !exact && w.bits == 4 && w.group % 32 == 0;
  const int64_t chunks = w.k / 32, quads = (chunks + 3) / 4;  // int4: 128-value loads, the last one masked
  std::vector<float> xf(nibbles ? 0 : T * w.k), xsum(T * groups, 0.f);
  std::vector<at::BFloat16> xp(nibbles ? T * quads * 128 : 0, at::BFloat16(0.f));
  for (int t = 0; t < T; ++t) {  // vectors throughout: a scalar pass costs as much as a small matmul
    const X* xt = x + t * w.k;
    for (int64_t g = 0; g < groups; ++g) {
      __m512 sum = _mm512_setzero_ps();
      for (int64_t i = g * w.group; i < (g + 1) * w.group; i += 16) {
        const __m512 v = load_x_masked(xt + i, __mmask16(0xFFFF));
        sum = _mm512_add_ps(sum, v);
        if (!nibbles) _mm512_storeu_ps(&xf[t * w.k + i], v);
      }
      xsum[t * groups + g] = _mm512_reduce_add_ps(sum);
    }
    if (nibbles)  // features 32L + 8u .. + 8 of a quad go to words 32u + 8L .. + 8 (u: which unpack, L: lane)
      for (int64_t c = 0; c < chunks; ++c)
        for (int u = 0; u < 4; ++u)
          std::memcpy(&xp[t * quads * 128 + (c / 4) * 128 + u * 32 + (c % 4) * 8], xt + c * 32 + u * 8, 16);
  }
  const __m512i nibble = _mm512_set1_epi8(0x0F), bf16_128 = _mm512_set1_epi8(0x43);
  const __m512i spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
#pragma omp parallel
  {
  // one per thread, refilled per row: the row's group scales, and (int4) its chunk scales in quads
  // (both padded to whole quads: the last quad's scale load reads 4)
  std::vector<float> row_scales(std::max(groups, quads * 4), 0.f), chunk_scales(nibbles ? quads * 4 : 0, 0.f);
#pragma omp for schedule(static)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    __m512 totals[T][16];
    for (int r = 0; r < 16; ++r) {
      const int64_t row = std::min(blk * 16 + r, w.n - 1);
      __m512 total[T];
      for (int t = 0; t < T; ++t) total[t] = _mm512_setzero_ps();
      // the row's scales widened 16 at a time; its offsets (less 128 · scale for int4's 128 + q) meet the
      // per-group sums of x the same way, in lanes that the final transpose-add sums with the rest
      for (int64_t g = 0; g < groups; g += 16) {
        const __mmask16 mask = static_cast<__mmask16>((1u << std::min<int64_t>(16, groups - g)) - 1);
        const __m512 s = load16_masked(scales + row * groups + g, mask);
        _mm512_mask_storeu_ps(row_scales.data() + g, mask, s);
        __m512 o = kOffset ? load16_masked(offsets + row * groups + g, mask) : _mm512_setzero_ps();
        if (nibbles) o = _mm512_fnmadd_ps(s, _mm512_set1_ps(128.f), o);
        if ((kOffset || nibbles) && !exact)
          for (int t = 0; t < T; ++t)
            total[t] = _mm512_fmadd_ps(o, _mm512_maskz_loadu_ps(mask, &xsum[t * groups + g]), total[t]);
      }
      if (nibbles) {
        const float* row_chunk_scales = row_scales.data();  // groups of 32 (GGUF's): a chunk is a group
        if (w.group != 32) {
          for (int64_t g = 0, c = 0; g < groups; ++g)
            for (const int64_t end = c + w.group / 32; c < end; ++c) chunk_scales[c] = row_scales[g];
          row_chunk_scales = chunk_scales.data();
        }
        const uint8_t* data = w.data + row * w.k / 2;
        for (int64_t q = 0; q < quads; ++q) {
          const int64_t left = std::min<int64_t>(4, chunks - q * 4);
          const __m512i bytes = _mm512_maskz_loadu_epi8(left == 4 ? ~__mmask64(0) : (__mmask64(1) << (16 * left)) - 1,
                                                        data + q * 64);
          const __m512i low = _mm512_and_si512(bytes, nibble);
          const __m512i high = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), nibble);
          const __m512bh v[4] = {(__m512bh)_mm512_unpacklo_epi8(low, bf16_128),
                                 (__m512bh)_mm512_unpackhi_epi8(low, bf16_128),
                                 (__m512bh)_mm512_unpacklo_epi8(high, bf16_128),
                                 (__m512bh)_mm512_unpackhi_epi8(high, bf16_128)};
          const __m512 scale = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_loadu_ps(row_chunk_scales + q * 4)));
          for (int t = 0; t < T; ++t) {
            const at::BFloat16* xq = xp.data() + t * quads * 128 + q * 128;
            __m512 part = _mm512_dpbf16_ps(_mm512_setzero_ps(), v[0], (__m512bh)_mm512_loadu_si512(xq));
            part = _mm512_dpbf16_ps(part, v[1], (__m512bh)_mm512_loadu_si512(xq + 32));
            part = _mm512_dpbf16_ps(part, v[2], (__m512bh)_mm512_loadu_si512(xq + 64));
            part = _mm512_dpbf16_ps(part, v[3], (__m512bh)_mm512_loadu_si512(xq + 96));
            total[t] = _mm512_fmadd_ps(part, scale, total[t]);
          }
        }
      } else if (exact) {  // float32: each weight de-quantized as q·s + o (exact in float), then dotted with x
        for (int64_t g = 0; g < groups; ++g) {
          const __m512 scale = _mm512_set1_ps(row_scales[g]);
          const __m512 offset = kOffset ? _mm512_set1_ps(scalar(offsets[row * groups + g])) : _mm512_setzero_ps();
          for (int64_t f = g * w.group; f < (g + 1) * w.group; f += 16) {
            const __m512 wv = _mm512_fmadd_ps(load16(w, row, f), scale, offset);
            for (int t = 0; t < T; ++t) total[t] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(&xf[t * w.k + f]), total[t]);
          }
        }
      } else {
        for (int64_t g = 0; g < groups; ++g) {
          __m512 part[T];
          for (int t = 0; t < T; ++t) part[t] = _mm512_setzero_ps();
          for (int64_t f = g * w.group; f < (g + 1) * w.group; f += 16) {
            const __m512 q = load16(w, row, f);
            for (int t = 0; t < T; ++t) part[t] = _mm512_fmadd_ps(q, _mm512_loadu_ps(&xf[t * w.k + f]), part[t]);
          }
          const __m512 scale = _mm512_set1_ps(row_scales[g]);
          for (int t = 0; t < T; ++t) total[t] = _mm512_fmadd_ps(part[t], scale, total[t]);
        }
      }
      for (int t = 0; t < T; ++t) totals[t][r] = total[t];
    }
    const int64_t rows = std::min<int64_t>(16, w.n - blk * 16);
    const __mmask16 mask = static_cast<__mmask16>((1u << rows) - 1);
    const __m512 bias_v = bias != nullptr ? load_x_masked(bias + blk * 16, mask) : _mm512_setzero_ps();
    for (int t = 0; t < T; ++t)
      store_x_masked(y + t * w.n + blk * 16, mask, _mm512_add_ps(reduce16(totals[t]), bias_v));
  }
  }
}

constexpr int kFewTokens = 4;  // up to this many tokens take matmul_rows

template <typename S, bool kOffset, typename X, int T = kFewTokens>
void matmul_few(int64_t m, const X* x, const Weight& w, const S* scales, const S* offsets, const X* bias, X* y) {
  if constexpr (T > 0) {
    if (m == T) return matmul_rows<S, kOffset, T>(x, w, scales, offsets, bias, y);
    return matmul_few<S, kOffset, X, T - 1>(m, x, w, scales, offsets, bias, y);
  }
}

template <typename S, bool kOffset, typename X>
void matmul_tiles(const X* x, int64_t m, const Weight& w, const S* scales, const S* offsets, const X* bias, X* y) {
  if (m <= kFewTokens) return matmul_few<S, kOffset>(m, x, w, scales, offsets, bias, y);
  // a row is `words` 32-bit words: bf16 feature pairs, or single float features
  const int64_t tiles = (w.n + kTileRows - 1) / kTileRows, words = w.k * sizeof(X) / 4;
  const auto* x32 = reinterpret_cast<const uint32_t*>(x);
#pragma omp parallel
  {
    std::vector<X> rows_buf(kTileRows * w.k);
    std::vector<uint32_t> tile(words * kTileRows);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t row0 = t * kTileRows, rows = std::min(kTileRows, w.n - row0);
      if (t + 1 < tiles) {  // the next tile's quantized rows arrive while this one is used
        prefetch_range(w.data + (row0 + kTileRows) * w.k * w.bits / 8,
                       std::min(kTileRows, w.n - row0 - kTileRows) * w.k * w.bits / 8);
      }
      for (int64_t r = 0; r < kTileRows; ++r)  // rows past the end repeat the last one (never stored)
        dequantize_row<S, kOffset>(w, scales, offsets, row0 + std::min(r, rows - 1), rows_buf.data() + r * w.k);
      const auto* rows32 = reinterpret_cast<const uint32_t*>(rows_buf.data());
      for (int64_t half = 0; half < kTileRows; half += 16)
        for (int64_t p = 0; p < words; p += 16)
          transpose16(rows32 + half * words + p, words, tile.data() + p * kTileRows + half, kTileRows);
      const X* tile_bias = bias != nullptr ? bias + row0 : nullptr;
      for (int64_t t0 = 0; t0 < m; t0 += kTokens) {
        const int tokens = static_cast<int>(std::min<int64_t>(kTokens, m - t0));
        tile_tail(tokens, x32 + t0 * words, words, tile.data(), words, rows, tile_bias, y + t0 * w.n + row0, w.n);
      }
    }
  }
}

}  // namespace
#endif

// x [M, K] bf16 or float; data uint8 [N, K / 2] (bits 4) or int8 [N, K] (bits 8); scales [N, K / group] float
// or half; offsets like scales or None; bias [N] like x or None; y like x. K must be a multiple of 32 and group.
torch::Tensor quant_matmul(torch::Tensor x, torch::Tensor data, int64_t bits, int64_t group, torch::Tensor scales,
                           c10::optional<torch::Tensor> offsets, c10::optional<torch::Tensor> bias) {
#ifdef LORASERVE_BF16_SIMD
  const auto dtype = x.scalar_type();
  TORCH_CHECK((dtype == at::kBFloat16 || dtype == at::kFloat) && x.dim() == 2,
              "quant_matmul takes a 2-D bfloat16 or float32 x");
  TORCH_CHECK(bits == 4 || bits == 8, "quant_matmul: bits must be 4 or 8");
  x = x.contiguous();
  const int64_t m = x.size(0), k = x.size(1), n = data.size(0);
  TORCH_CHECK(k % 32 == 0 && k % group == 0 && group % 16 == 0, "quant_matmul: K must be a multiple of 32 and group");
  TORCH_CHECK(data.is_contiguous() && data.size(1) * 8 == k * bits, "quant_matmul: data does not match x");
  TORCH_CHECK(scales.is_contiguous() && scales.size(0) == n && scales.size(1) == k / group, "quant_matmul: scales");
  const bool has_offsets = offsets.has_value() && offsets->defined();
  if (has_offsets) TORCH_CHECK(offsets->is_contiguous() && offsets->sizes() == scales.sizes() &&
                               offsets->scalar_type() == scales.scalar_type(), "quant_matmul: offsets like scales");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) TORCH_CHECK(bias->scalar_type() == dtype && bias->numel() == n, "quant_matmul: bias like x");
  auto y = torch::empty({m, n}, x.options());
  const Weight w{reinterpret_cast<const uint8_t*>(data.data_ptr()), n, k, group, bits};
  const torch::Tensor bias_c = has_bias ? bias->contiguous() : torch::Tensor();  // kept alive for the call
  auto run = [&](auto* xp, auto* s, auto* o) {
    using X = std::remove_const_t<std::remove_pointer_t<decltype(xp)>>;
    using S = std::remove_const_t<std::remove_pointer_t<decltype(s)>>;
    const X* bp = has_bias ? bias_c.data_ptr<X>() : nullptr;
    X* yp = y.data_ptr<X>();
    if (o != nullptr) {
      matmul_tiles<S, true>(xp, m, w, s, o, bp, yp);
    } else {
      matmul_tiles<S, false>(xp, m, w, s, static_cast<const S*>(nullptr), bp, yp);
    }
  };
  auto with_scales = [&](auto* xp) {
    if (scales.scalar_type() == at::kFloat) {
      run(xp, scales.data_ptr<float>(), has_offsets ? offsets->data_ptr<float>() : nullptr);
    } else {
      TORCH_CHECK(scales.scalar_type() == at::kHalf, "quant_matmul: scales must be float or half");
      run(xp, scales.data_ptr<at::Half>(), has_offsets ? offsets->data_ptr<at::Half>() : nullptr);
    }
  };
  if (dtype == at::kFloat) {
    with_scales(x.data_ptr<float>());
  } else {
    with_scales(x.data_ptr<at::BFloat16>());
  }
  return y;
#else
  TORCH_CHECK(false, "quant_matmul needs a CPU with AVX512-BF16");
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quant_matmul", &quant_matmul, "x W^T with W int4/int8 group-quantized (CPU, bf16 or float32)");
#ifdef LORASERVE_BF16_SIMD
  m.attr("available") = true;
#else
  m.attr("available") = false;  // built, but this CPU has no AVX512-BF16: the PyTorch path serves
#endif
}
