// Decode attention straight from the paged KV cache on CPU: one query token per sequence attends to its
// context_len cached tokens, read in place through the block table (no gather copy, no padding, no mask).
//
// Parallel over sequences. Each sequence walks its blocks in order; a cache block holds every kv head of
// block_size tokens contiguously, so one task reads whole blocks front to back and prefetches the next one
// while computing on the current. (Splitting the work by kv head instead made each task read a third of
// every row from blocks scattered in memory, which the hardware prefetcher cannot follow: in the engine,
// with the cache cold after the layer's matmuls, that was 3x slower.) All query heads of a GQA group reuse
// each K and V row; the scores are softmaxed per head between the K and V passes (a sequence's scores fit in
// L1/L2 at any context this engine serves on CPU).
//
// bf16 caches on a CPU with AVX512-BF16 take a path of their own: q·k with vdpbf16ps straight on the bf16
// rows (no widening copy), 16 tokens' dot products reduced together by one transpose-add, and V rows
// widened in registers for the weighted sum. Other dtypes and CPUs widen each block to float and let the
// compiler vectorise plain loops.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "simd.h"

namespace {

using loraserve_simd::prefetch_range;

template <typename T>
void widen(const T* src, float* dst, int64_t count) {
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) dst[i] = static_cast<float>(src[i]);
}

// In place: exp(s - max) / sum, per head's row of `len` scores.
void softmax_rows(float* scores, int64_t rows, int64_t len) {
  for (int64_t h = 0; h < rows; ++h) {
    float* s = scores + h * len;
    const float top = *std::max_element(s, s + len);
    float total = 0.f;
#pragma omp simd reduction(+ : total)
    for (int64_t t = 0; t < len; ++t) {
      s[t] = std::exp(s[t] - top);
      total += s[t];
    }
    const float inv = 1.f / total;
#pragma omp simd
    for (int64_t t = 0; t < len; ++t) s[t] *= inv;
  }
}

// ---- generic path: each block widened to float -------------------------------------------------------

// Walks a sequence's cache blocks in order: prefetches the next block, widens the current one into `rows`
// and calls fn(first token, token count).
template <typename T, typename Fn>
void for_each_block(const T* cache, const int64_t* table, int64_t len, int64_t block_size, int64_t block_elems,
                    float* rows, Fn&& fn) {
  const int64_t num_blocks = (len + block_size - 1) / block_size;
  for (int64_t blk = 0; blk < num_blocks; ++blk) {
    if (blk + 1 < num_blocks) prefetch_range(cache + table[blk + 1] * block_elems, block_elems);
    const int64_t first = blk * block_size, count = std::min(block_size, len - first);
    widen(cache + table[blk] * block_elems, rows, count * block_elems / block_size);
    fn(first, count);
  }
}

template <typename T, int64_t HEAD_DIM>
void decode_one_sequence(const T* q, const T* k_cache, const T* v_cache, const int64_t* table, int64_t len, T* out,
                         int64_t num_heads, int64_t num_kv_heads, int64_t runtime_head_dim, int64_t block_size, float scale,
                         std::vector<float>& scratch) {
  const int64_t head_dim = HEAD_DIM > 0 ? HEAD_DIM : runtime_head_dim;
  const int64_t group = num_heads / num_kv_heads;
  const int64_t row = num_kv_heads * head_dim;  // one token's K (or V) for every kv head
  const int64_t block_elems = block_size * row;
  scratch.resize(num_heads * head_dim * 2 + num_heads * len + block_elems);
  float* query = scratch.data();
  float* acc = query + num_heads * head_dim;
  float* scores = acc + num_heads * head_dim;  // [num_heads, len]
  float* rows = scores + num_heads * len;      // one block widened to float
  for (int64_t i = 0; i < num_heads * head_dim; ++i) {
    query[i] = static_cast<float>(q[i]) * scale;
    acc[i] = 0.f;
  }
  // One walker serves both passes: with `scoring` it writes q·k into the scores, else it adds p·v to acc.
  auto pass = [&](const T* cache, bool scoring) {
    for_each_block(cache, table, len, block_size, block_elems, rows, [&](int64_t first, int64_t count) {
      for (int64_t t = 0; t < count; ++t) {
        for (int64_t kh = 0; kh < num_kv_heads; ++kh) {
          const float* __restrict vec = rows + t * row + kh * head_dim;
          for (int64_t h = kh * group; h < (kh + 1) * group; ++h) {
            if (scoring) {
              const float* __restrict qh = query + h * head_dim;
              float dot = 0.f;
#pragma omp simd reduction(+ : dot)
              for (int64_t d = 0; d < head_dim; ++d) dot += qh[d] * vec[d];
              scores[h * len + first + t] = dot;
            } else {
              const float p = scores[h * len + first + t];
              float* __restrict a = acc + h * head_dim;
#pragma omp simd
              for (int64_t d = 0; d < head_dim; ++d) a[d] += p * vec[d];
            }
          }
        }
      }
    });
  };
  pass(k_cache, true);
  softmax_rows(scores, num_heads, len);
  pass(v_cache, false);
  for (int64_t i = 0; i < num_heads * head_dim; ++i) out[i] = static_cast<T>(acc[i]);
}

// ---- bf16 with AVX512-BF16 ------------------------------------------------------------------------------

#ifdef LORASERVE_BF16_SIMD
using namespace loraserve_simd;
constexpr int64_t kPrefetch = 2;  // blocks requested ahead of the one being read

template <int64_t HEAD_DIM>
void decode_one_sequence_bf16(const at::BFloat16* q, const at::BFloat16* k_cache, const at::BFloat16* v_cache,
                              const int64_t* table, int64_t len, at::BFloat16* out, int64_t num_heads,
                              int64_t num_kv_heads, int64_t block_size, float scale, std::vector<float>& scratch) {
  static_assert(HEAD_DIM % 32 == 0, "the bf16 path takes head_dim in multiples of 32");
  constexpr int64_t kChunks = HEAD_DIM / 32;  // 32 bf16 values per dot-product instruction
  const int64_t group = num_heads / num_kv_heads;
  const int64_t row = num_kv_heads * HEAD_DIM;
  const int64_t block_elems = block_size * row;
  const int64_t num_blocks = (len + block_size - 1) / block_size;
  scratch.resize(num_heads * len + num_heads * HEAD_DIM);
  float* scores = scratch.data();                // [num_heads, len]
  float* acc = scores + num_heads * len;         // [num_heads, HEAD_DIM]
  std::fill(acc, acc + num_heads * HEAD_DIM, 0.f);

  // Memory-level parallelism: the K blocks kPrefetch ahead and the V block of the same tokens are requested
  // while this block is scored, so the V pass finds its rows on their way in.
  for (int64_t blk = 0; blk < std::min<int64_t>(kPrefetch, num_blocks); ++blk)
    prefetch_range(k_cache + table[blk] * block_elems, block_elems);
  for (int64_t blk = 0; blk < num_blocks; ++blk) {
    if (blk + kPrefetch < num_blocks) prefetch_range(k_cache + table[blk + kPrefetch] * block_elems, block_elems);
    prefetch_range(v_cache + table[blk] * block_elems, block_elems);
    const at::BFloat16* block = k_cache + table[blk] * block_elems;
    const int64_t first = blk * block_size, count = std::min(block_size, len - first);
    for (int64_t t0 = 0; t0 < count; t0 += 16) {
      const int64_t n = std::min<int64_t>(16, count - t0);
      for (int64_t kh = 0; kh < num_kv_heads; ++kh) {
        for (int64_t h = kh * group; h < (kh + 1) * group; ++h) {
          __m512bh qv[kChunks];
          for (int64_t c = 0; c < kChunks; ++c)
            qv[c] = (__m512bh)_mm512_loadu_si512(q + h * HEAD_DIM + 32 * c);
          __m512 partial[16];
          for (int64_t t = 0; t < 16; ++t) {
            __m512 s = _mm512_setzero_ps();
            if (t < n) {
              const at::BFloat16* key = block + (t0 + t) * row + kh * HEAD_DIM;
              for (int64_t c = 0; c < kChunks; ++c)
                s = _mm512_dpbf16_ps(s, qv[c], (__m512bh)_mm512_loadu_si512(key + 32 * c));
            }
            partial[t] = s;
          }
          _mm512_mask_storeu_ps(scores + h * len + first + t0, static_cast<__mmask16>((1u << n) - 1),
                                _mm512_mul_ps(reduce16(partial), _mm512_set1_ps(scale)));
        }
      }
    }
  }

  softmax_rows(scores, num_heads, len);

  constexpr int64_t kVecs = HEAD_DIM / 16;
  for (int64_t blk = 0; blk < num_blocks; ++blk) {
    if (blk + kPrefetch < num_blocks) prefetch_range(v_cache + table[blk + kPrefetch] * block_elems, block_elems);
    const at::BFloat16* block = v_cache + table[blk] * block_elems;
    const int64_t first = blk * block_size, count = std::min(block_size, len - first);
    for (int64_t kh = 0; kh < num_kv_heads; ++kh) {
      for (int64_t h = kh * group; h < (kh + 1) * group; ++h) {
        __m512 a[kVecs];
        for (int64_t i = 0; i < kVecs; ++i) a[i] = _mm512_loadu_ps(acc + h * HEAD_DIM + 16 * i);
        const float* p = scores + h * len + first;
        for (int64_t t = 0; t < count; ++t) {
          const at::BFloat16* value = block + t * row + kh * HEAD_DIM;
          const __m512 weight = _mm512_set1_ps(p[t]);
          for (int64_t i = 0; i < kVecs; ++i) a[i] = _mm512_fmadd_ps(weight, load_bf16(value + 16 * i), a[i]);
        }
        for (int64_t i = 0; i < kVecs; ++i) _mm512_storeu_ps(acc + h * HEAD_DIM + 16 * i, a[i]);
      }
    }
  }
  for (int64_t i = 0; i < num_heads * HEAD_DIM; ++i) out[i] = static_cast<at::BFloat16>(acc[i]);
}
#endif

template <typename T, int64_t HEAD_DIM>
void decode_batch(const T* q, const T* k_cache, const T* v_cache, const int64_t* tables, const int64_t* lens, T* out,
                  int64_t batch, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
                  int64_t max_blocks, float scale) {
#pragma omp parallel
  {
    std::vector<float> scratch;
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t offset = b * num_heads * head_dim;
#ifdef LORASERVE_BF16_SIMD
      if constexpr (std::is_same_v<T, at::BFloat16> && HEAD_DIM > 0 && HEAD_DIM % 32 == 0) {
        decode_one_sequence_bf16<HEAD_DIM>(q + offset, k_cache, v_cache, tables + b * max_blocks, lens[b],
                                           out + offset, num_heads, num_kv_heads, block_size, scale, scratch);
        continue;
      }
#endif
      decode_one_sequence<T, HEAD_DIM>(q + offset, k_cache, v_cache, tables + b * max_blocks, lens[b], out + offset,
                                       num_heads, num_kv_heads, head_dim, block_size, scale, scratch);
    }
  }
}

}  // namespace

torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_tables, torch::Tensor context_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4, "q [B, H, D], caches [blocks, block_size, KVH, D]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "the KV caches must be contiguous");
  q = q.contiguous();
  block_tables = block_tables.contiguous();
  context_lens = context_lens.contiguous();
  auto out = torch::empty_like(q);
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t block_size = k_cache.size(1), kv_heads = k_cache.size(2), max_blocks = block_tables.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::BFloat16, at::ScalarType::Half, q.scalar_type(), "paged_decode", [&] {
    auto run = [&](auto head_dim_constant) {
      decode_batch<scalar_t, decltype(head_dim_constant)::value>(
          q.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(),
          block_tables.data_ptr<int64_t>(), context_lens.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), batch, heads,
          kv_heads, dim, block_size, max_blocks, static_cast<float>(scale));
    };
    if (dim == 64) run(std::integral_constant<int64_t, 64>{});
    else if (dim == 128) run(std::integral_constant<int64_t, 128>{});
    else run(std::integral_constant<int64_t, 0>{});
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over a paged KV cache (CPU)");
}
