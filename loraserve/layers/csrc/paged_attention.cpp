// Decode attention straight from the paged KV cache on CPU: one query token per sequence attends to its
// context_len cached tokens, read in place through the block table (no gather copy, no padding, no mask).
//
// Parallel over sequences. Each sequence walks its blocks in order; a cache block holds every kv head of
// block_size tokens contiguously, so one task reads whole blocks front to back and prefetches the next one
// while computing on the current. (Splitting the work by kv head instead made each task read a third of
// every row from blocks scattered in memory, which the hardware prefetcher cannot follow: in the engine,
// with the cache cold after the layer's matmuls, that was 3x slower.) Rows are widened to float once per
// block and all query heads of a GQA group reuse them; the scores are softmaxed per head between the K and V
// passes (a sequence's scores fit in L1/L2 at any context this engine serves on CPU).
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

namespace {

template <typename T>
void prefetch_block(const T* start, int64_t count) {
  const char* p = reinterpret_cast<const char*>(start);
  for (int64_t offset = 0; offset < count * static_cast<int64_t>(sizeof(T)); offset += 64) __builtin_prefetch(p + offset);
}

template <typename T>
void widen(const T* src, float* dst, int64_t count) {
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) dst[i] = static_cast<float>(src[i]);
}

// Walks a sequence's cache blocks in order: prefetches the next block, widens the current one into `rows`
// and calls fn(first token, token count).
template <typename T, typename Fn>
void for_each_block(const T* cache, const int64_t* table, int64_t len, int64_t block_size, int64_t block_elems,
                    float* rows, Fn&& fn) {
  const int64_t num_blocks = (len + block_size - 1) / block_size;
  for (int64_t blk = 0; blk < num_blocks; ++blk) {
    if (blk + 1 < num_blocks) prefetch_block(cache + table[blk + 1] * block_elems, block_elems);
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

  for_each_block(k_cache, table, len, block_size, block_elems, rows, [&](int64_t first, int64_t count) {
    for (int64_t t = 0; t < count; ++t) {
      for (int64_t kh = 0; kh < num_kv_heads; ++kh) {
        const float* __restrict key = rows + t * row + kh * head_dim;
        for (int64_t g = 0; g < group; ++g) {
          const int64_t h = kh * group + g;
          const float* __restrict qh = query + h * head_dim;
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < head_dim; ++d) dot += qh[d] * key[d];
          scores[h * len + first + t] = dot;
        }
      }
    }
  });

  for (int64_t h = 0; h < num_heads; ++h) {
    float* s = scores + h * len;
    const float top = *std::max_element(s, s + len);
    float total = 0.f;
    for (int64_t t = 0; t < len; ++t) {
      s[t] = std::exp(s[t] - top);
      total += s[t];
    }
    const float inv = 1.f / total;
    for (int64_t t = 0; t < len; ++t) s[t] *= inv;
  }

  for_each_block(v_cache, table, len, block_size, block_elems, rows, [&](int64_t first, int64_t count) {
    for (int64_t t = 0; t < count; ++t) {
      for (int64_t kh = 0; kh < num_kv_heads; ++kh) {
        const float* __restrict value = rows + t * row + kh * head_dim;
        for (int64_t g = 0; g < group; ++g) {
          const int64_t h = kh * group + g;
          const float p = scores[h * len + first + t];
          float* __restrict a = acc + h * head_dim;
#pragma omp simd
          for (int64_t d = 0; d < head_dim; ++d) a[d] += p * value[d];
        }
      }
    }
  });
  for (int64_t i = 0; i < num_heads * head_dim; ++i) out[i] = static_cast<T>(acc[i]);
}

// Common head sizes get a compile-time head_dim so the per-head loops unroll fully; others use the generic path.
template <typename T, int64_t HEAD_DIM>
void decode_batch(const T* q, const T* k_cache, const T* v_cache, const int64_t* tables, const int64_t* lens, T* out,
                  int64_t batch, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
                  int64_t max_blocks, float scale) {
#pragma omp parallel
  {
    std::vector<float> scratch;
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < batch; ++b)
      decode_one_sequence<T, HEAD_DIM>(q + b * num_heads * head_dim, k_cache, v_cache, tables + b * max_blocks, lens[b],
                                       out + b * num_heads * head_dim, num_heads, num_kv_heads, head_dim, block_size,
                                       scale, scratch);
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
