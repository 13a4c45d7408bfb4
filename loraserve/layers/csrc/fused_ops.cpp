// The small per-layer operations of a decoder, each fused into one pass over its rows (CPU, bf16).
//
// A decode step at 64 sequences runs ~35 tiny ATen ops per layer (RMSNorm's float/pow/mean/rsqrt/mul/cast,
// rotary's slices/neg/cat/mul/add, two index_copy_ for the KV cache, chunk/silu/mul); each reads and writes
// its whole tensor and pays the dispatcher, which summed to ~8 ms of a ~50 ms step. Here each group is one
// call. Every kernel rounds where the PyTorch path rounds (a bf16 result of each bf16 PyTorch op), so the two
// paths agree to the last bit or, where an exp or a float reduction's order enters, to one bf16 ulp
// (tests/test_cpu_kernels.py).
#include <torch/extension.h>

#include <cmath>
#include <cstring>

#include "simd.h"

namespace {

template <typename T>
inline float f(T v) { return static_cast<float>(v); }

// Rounded to T and back: what a T-typed PyTorch op stores.
template <typename T>
inline float round_to(float v) { return static_cast<float>(static_cast<T>(v)); }

template <typename T>
void rms_norm_rows(const T* x, const T* weight, T* out, int64_t rows, int64_t dim, float eps, bool offset,
                   T* residual) {
#pragma omp parallel for if (rows * dim >= (1 << 16))
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * dim;
    T* o = out + r * dim;
    const T* src = xr;
    if (residual != nullptr) {  // residual += x, the stream the next layer adds to; normalise the sum
      T* res = residual + r * dim;
      for (int64_t i = 0; i < dim; ++i) res[i] = static_cast<T>(f(xr[i]) + f(res[i]));
      src = res;
    }
    // The mean square in double: a float running sum over thousands of features drifts by more than the
    // float32 path may (PyTorch sums pairwise).
    double sum = 0.0;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < dim; ++i) {
      const double v = f(src[i]);
      sum += v * v;
    }
    const float inv = static_cast<float>(1.0 / std::sqrt(static_cast<double>(static_cast<float>(sum / dim) + eps)));
    for (int64_t i = 0; i < dim; ++i) {
      const float h = f(src[i]) * inv;
      // Llama: weight * h.to(dtype) (a T multiply); Gemma: (h * (1 + weight)).to(dtype) in float.
      o[i] = offset ? static_cast<T>(h * (1.f + f(weight[i]))) : static_cast<T>(f(weight[i]) * round_to<T>(h));
    }
  }
}

// out = x * cos + rotate_half(x) * sin over the first `rot` features of each head, each product rounded to T
// as PyTorch's T ops round them; features past `rot` are left as they are.
template <typename T>
void rotate_rows(T* x, int64_t token_stride, const T* cos, const T* sin, int64_t tokens, int64_t heads, int64_t dim,
                 int64_t rot) {
  const int64_t half = rot / 2;
  for (int64_t t = 0; t < tokens; ++t) {
    const T* c = cos + t * rot;
    const T* s = sin + t * rot;
    for (int64_t h = 0; h < heads; ++h) {
      T* v = x + t * token_stride + h * dim;
      float lo[256], hi[256];
      for (int64_t i = 0; i < half; ++i) {
        lo[i] = f(v[i]);
        hi[i] = f(v[i + half]);
      }
      for (int64_t i = 0; i < half; ++i) {
        v[i] = static_cast<T>(round_to<T>(lo[i] * f(c[i])) + round_to<T>(-hi[i] * f(s[i])));
        v[i + half] = static_cast<T>(round_to<T>(hi[i] * f(c[i + half])) + round_to<T>(lo[i] * f(s[i + half])));
      }
    }
  }
}

template <typename T>
void scatter_rows(const T* src, int64_t token_stride, T* cache, const int64_t* slots, int64_t tokens, int64_t row) {
  for (int64_t t = 0; t < tokens; ++t)
    std::copy(src + t * token_stride, src + t * token_stride + row, cache + slots[t] * row);
}

template <bool GELU>
inline float gate_scalar(float x) {
  if constexpr (GELU) {  // the tanh approximation, as gelu_pytorch_tanh
    const float inner = 0.7978845608028654f * (x + 0.044715f * x * x * x);
    return 0.5f * x * (1.f + std::tanh(inner));
  } else {
    return x / (1.f + std::exp(-x));
  }
}

#ifdef LORASERVE_BF16_SIMD
using namespace loraserve_simd;
// exp for 16 floats: 2^n * e^r with |r| <= ln2/2 and Cephes' degree-6 polynomial (about 1 ulp); large inputs
// saturate to inf / 0 as std::exp does.
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.7f)), _mm512_set1_ps(-103.9f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500E-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

template <bool GELU>
inline __m512 gate16(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.f);
  if constexpr (GELU) {  // 0.5 x (1 + tanh(y)) = x - x / (exp(2y) + 1)
    const __m512 x3 = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
    const __m512 y = _mm512_mul_ps(_mm512_set1_ps(2.f * 0.7978845608028654f),
                                   _mm512_fmadd_ps(_mm512_set1_ps(0.044715f), x3, x));
    return _mm512_sub_ps(x, _mm512_div_ps(x, _mm512_add_ps(exp16(y), one)));
  } else {
    return _mm512_div_ps(x, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), x))));
  }
}

#endif

template <typename T, bool GELU>
void gated_rows(const T* gate_up, T* out, int64_t rows, int64_t inter) {
#pragma omp parallel for if (rows * inter >= (1 << 16))
  for (int64_t r = 0; r < rows; ++r) {
    const T* g = gate_up + r * 2 * inter;
    const T* u = g + inter;
    T* o = out + r * inter;
    int64_t i = 0;
#ifdef LORASERVE_BF16_SIMD
    for (; i + 16 <= inter; i += 16)
      store_bf16(o + i, _mm512_mul_ps(round_bf16(gate16<GELU>(load_bf16(g + i))), load_bf16(u + i)));
#endif
    for (; i < inter; ++i) o[i] = static_cast<T>(round_to<T>(gate_scalar<GELU>(f(g[i]))) * f(u[i]));
  }
}

// First index of each row's largest value; a NaN counts as larger than any number (as torch.argmax).
template <typename T>
int64_t argmax_row(const T* x, int64_t n) {
  int64_t i = 0, best = 0;
  float top = -INFINITY;
#ifdef LORASERVE_BF16_SIMD
  if (n >= 16) {
    __m512 vmax = _mm512_set1_ps(-INFINITY);
    __m512i vidx = _mm512_setzero_si512(), lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __mmask16 nan = 0;
    for (; i + 16 <= n; i += 16) {
      const __m512 v = load_bf16(x + i);
      // NaN by its bits: -ffast-math lets the compiler assume a float comparison never sees one.
      nan |= _mm512_cmpgt_epu32_mask(_mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(0x7fffffff)),
                                     _mm512_set1_epi32(0x7f800000));
      const __mmask16 greater = _mm512_cmp_ps_mask(v, vmax, _CMP_GT_OQ);
      vmax = _mm512_mask_mov_ps(vmax, greater, v);
      vidx = _mm512_mask_mov_epi32(vidx, greater, _mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int>(i))));
    }
    if (nan) {  // rare: let the plain scan below find the first NaN
      i = 0;
    } else {
      alignas(64) float values[16];
      alignas(64) int32_t indices[16];
      _mm512_store_ps(values, vmax);
      _mm512_store_si512(indices, vidx);
      top = values[0];
      best = indices[0];
      for (int l = 1; l < 16; ++l)
        if (values[l] > top || (values[l] == top && indices[l] < best)) top = values[l], best = indices[l];
    }
  }
#endif
  for (; i < n; ++i) {
    const float v = f(x[i]);
    uint32_t bits;
    std::memcpy(&bits, &v, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return i;  // NaN, tested on the bits (see above)
    if (v > top) top = v, best = i;
  }
  return best;
}

template <typename T>
void argmax_rows(const T* x, int64_t* out, int64_t rows, int64_t vocab) {
#pragma omp parallel for if (rows * vocab >= (1 << 18))
  for (int64_t r = 0; r < rows; ++r) out[r] = argmax_row<T>(x + r * vocab, vocab);
}

// bf16 only: float32 runs PyTorch's own ops, the reference path (cpu_kernels.cpu_kernel).
#define DISPATCH(tensor, name, ...) \
  AT_DISPATCH_SWITCH(tensor.scalar_type(), name, AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

void check(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.is_contiguous() && t.device().is_cpu(), what, " must be a contiguous CPU tensor");
}

}  // namespace

// out = RMSNorm(x) with `weight`; with `residual`: residual += x first (in place) and the sum is normalised.
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps, bool offset,
                       c10::optional<torch::Tensor> residual) {
  x = x.contiguous();
  check(weight, "weight");
  auto out = torch::empty_like(x);
  const int64_t dim = x.size(-1), rows = x.numel() / dim;
  if (residual.has_value()) check(*residual, "residual");
  DISPATCH(x, "rms_norm", [&] {
    rms_norm_rows<scalar_t>(x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows, dim,
                            static_cast<float>(eps), offset,
                            residual.has_value() ? residual->data_ptr<scalar_t>() : nullptr);
  });
  return out;
}

// Rotary on q [T, H, D] and k [T, KVH, D] in place (cos, sin: [T, rot]), then k and v into the caches
// [blocks, block_size, KVH, D] at the flat slots `slot_mapping` [T]. q, k, v may be views into one packed
// qkv row (any token stride; each token's heads contiguous).
void rotary_kv_write(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor cos, torch::Tensor sin,
                     torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slot_mapping) {
  for (auto* t : {&cos, &sin, &k_cache, &v_cache, &slot_mapping}) check(*t, "rotary_kv_write inputs");
  for (auto* t : {&q, &k, &v})
    TORCH_CHECK(t->dim() == 3 && t->stride(2) == 1 && t->stride(1) == t->size(2), "q, k, v: [T, heads, D] rows");
  const int64_t tokens = q.size(0), dim = q.size(2), rot = cos.size(-1);
  TORCH_CHECK(rot <= dim && rot % 2 == 0 && rot <= 512, "rotary dim must be even and at most head_dim");
  DISPATCH(q, "rotary_kv_write", [&] {
    rotate_rows<scalar_t>(q.data_ptr<scalar_t>(), q.stride(0), cos.data_ptr<scalar_t>(), sin.data_ptr<scalar_t>(),
                          tokens, q.size(1), dim, rot);
    rotate_rows<scalar_t>(k.data_ptr<scalar_t>(), k.stride(0), cos.data_ptr<scalar_t>(), sin.data_ptr<scalar_t>(),
                          tokens, k.size(1), dim, rot);
    const int64_t row = k.size(1) * dim;
    scatter_rows<scalar_t>(k.data_ptr<scalar_t>(), k.stride(0), k_cache.data_ptr<scalar_t>(),
                           slot_mapping.data_ptr<int64_t>(), tokens, row);
    scatter_rows<scalar_t>(v.data_ptr<scalar_t>(), v.stride(0), v_cache.data_ptr<scalar_t>(),
                           slot_mapping.data_ptr<int64_t>(), tokens, row);
  });
}

// act(gate) * up for a packed [T, 2I] gate_up; act "silu" or "gelu_tanh".
torch::Tensor gated_activation(torch::Tensor gate_up, const std::string& act) {
  gate_up = gate_up.contiguous();
  const int64_t inter = gate_up.size(-1) / 2, rows = gate_up.numel() / gate_up.size(-1);
  auto sizes = gate_up.sizes().vec();
  sizes.back() = inter;
  auto out = torch::empty(sizes, gate_up.options());
  TORCH_CHECK(act == "silu" || act == "gelu_tanh", "gated_activation: act must be silu or gelu_tanh");
  DISPATCH(gate_up, "gated_activation", [&] {
    if (act == "silu") gated_rows<scalar_t, false>(gate_up.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows, inter);
    else gated_rows<scalar_t, true>(gate_up.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows, inter);
  });
  return out;
}

// Row-wise argmax of logits [rows, vocab] (greedy sampling), int64.
torch::Tensor argmax(torch::Tensor logits) {
  check(logits, "logits");
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) < (int64_t{1} << 31), "argmax: [rows, vocab] logits");
  auto out = torch::empty({logits.size(0)}, logits.options().dtype(torch::kLong));
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  DISPATCH(logits, "argmax", [&] { argmax_rows<scalar_t>(logits.data_ptr<scalar_t>(), out.data_ptr<int64_t>(), rows, vocab); });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("argmax", &argmax, "row-wise argmax, first index of the largest value, NaN largest (CPU)");
  m.def("rms_norm", &rms_norm, "RMSNorm of rows, optionally after residual += x (CPU)");
  m.def("rotary_kv_write", &rotary_kv_write, "rotary on q, k in place, then k, v into the paged caches (CPU)");
  m.def("gated_activation", &gated_activation, "act(gate) * up of a packed gate_up (CPU)");
}
