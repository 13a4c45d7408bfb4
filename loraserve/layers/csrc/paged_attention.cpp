// Decode attention straight from the paged KV cache on CPU: one query token per sequence attends to its
// context_len cached tokens, read in place through the block table (no gather copy, no padding, no mask).
// Parallel over (sequence, kv head); the query heads sharing a kv head (GQA) reuse each K/V row once read.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <vector>

template <typename T>
static void decode_attention_kernel(const T* q, const T* k_cache, const T* v_cache, const int64_t* tables,
                                    const int64_t* context_lens, T* out, int64_t batch, int64_t num_heads,
                                    int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
                                    int64_t max_blocks, float scale) {
  const int64_t group = num_heads / num_kv_heads;
  const int64_t row_stride = num_kv_heads * head_dim;  // between tokens in the cache
#pragma omp parallel for collapse(2) schedule(dynamic, 1)
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t h = 0; h < num_kv_heads; ++h) {
      const int64_t len = context_lens[b];
      std::vector<float> query(group * head_dim), scores(group * len), acc(group * head_dim, 0.f);
      for (int64_t g = 0; g < group; ++g)
        for (int64_t d = 0; d < head_dim; ++d)
          query[g * head_dim + d] = static_cast<float>(q[(b * num_heads + h * group + g) * head_dim + d]) * scale;
      const int64_t* table = tables + b * max_blocks;
      for (int64_t t = 0; t < len; ++t) {
        const T* key = k_cache + (table[t / block_size] * block_size + t % block_size) * row_stride + h * head_dim;
        for (int64_t g = 0; g < group; ++g) {
          float dot = 0.f;
          const float* qg = query.data() + g * head_dim;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < head_dim; ++d) dot += qg[d] * static_cast<float>(key[d]);
          scores[g * len + t] = dot;
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        float* s = scores.data() + g * len;
        const float top = *std::max_element(s, s + len);
        float total = 0.f;
        for (int64_t t = 0; t < len; ++t) {
          s[t] = std::exp(s[t] - top);
          total += s[t];
        }
        const float inv = 1.f / total;
        for (int64_t t = 0; t < len; ++t) s[t] *= inv;
      }
      for (int64_t t = 0; t < len; ++t) {
        const T* value = v_cache + (table[t / block_size] * block_size + t % block_size) * row_stride + h * head_dim;
        for (int64_t g = 0; g < group; ++g) {
          const float p = scores[g * len + t];
          float* a = acc.data() + g * head_dim;
#pragma omp simd
          for (int64_t d = 0; d < head_dim; ++d) a[d] += p * static_cast<float>(value[d]);
        }
      }
      for (int64_t g = 0; g < group; ++g)
        for (int64_t d = 0; d < head_dim; ++d)
          out[(b * num_heads + h * group + g) * head_dim + d] = static_cast<T>(acc[g * head_dim + d]);
    }
  }
}

torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_tables, torch::Tensor context_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4, "q [B, H, D], caches [blocks, block_size, KVH, D]");
  q = q.contiguous();
  block_tables = block_tables.contiguous();
  context_lens = context_lens.contiguous();
  auto out = torch::empty_like(q);
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t block_size = k_cache.size(1), kv_heads = k_cache.size(2), max_blocks = block_tables.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::BFloat16, at::ScalarType::Half, q.scalar_type(), "paged_decode", [&] {
    decode_attention_kernel<scalar_t>(q.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(),
                                      block_tables.data_ptr<int64_t>(), context_lens.data_ptr<int64_t>(),
                                      out.data_ptr<scalar_t>(), batch, heads, kv_heads, dim, block_size, max_blocks,
                                      static_cast<float>(scale));
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over a paged KV cache (CPU)");
}
