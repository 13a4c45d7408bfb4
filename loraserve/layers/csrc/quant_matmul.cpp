// y = x · Wᵀ (+ bias) with W held quantized: int4 or int8 values, a scale per group of `group` input features
// and optionally an offset, w[n, k] = q[n, k] · scale[n, k / group] + offset[n, k / group] (CPU, bf16).
//
// Torch's own int4/int8 weight-only kernels are GEMV-shaped: fast for one token, ~10x slower than the bf16
// matmul at 64 (docs/benchmarks.md). Here each work item de-quantizes a tile of kTileRows weight rows into a
// bf16 buffer that stays in L1 (exactly the values a bf16 copy of the de-quantized weight would hold: the
// float value rounded once) and dots every token against it with vdpbf16ps, so the de-quantizing is paid
// once per weight per call and the arithmetic is the bf16 matmul's. Memory traffic is the quantized bytes.
//
// Layouts (layers/quantized.py packs them): int4 holds two values per byte, in chunks of 32 features where
// byte i of a chunk holds feature i (low nibble) and feature i + 16 (high nibble), unsigned 0..15 (GGUF's
// Q4_0/Q4_1 order); int8 holds one signed value per byte. Scales and offsets are float or half, [N, K / group].
#include "simd.h"

#include <vector>

#ifdef LORASERVE_BF16_SIMD
namespace {

using namespace loraserve_simd;

constexpr int64_t kTileRows = 16;

template <typename S>
inline float scalar(S v) {
  return static_cast<float>(v);
}

struct Weight {
  const uint8_t* data;
  int64_t n, k, group, bits;
};

// Row `row` of W, features [0, k), into `out` as bf16.
template <typename S, bool kOffset>
void dequantize_row(const Weight& w, const S* scales, const S* offsets, int64_t row, at::BFloat16* out) {
  const int64_t groups = w.k / w.group;
  const S* srow = scales + row * groups;
  const S* orow = kOffset ? offsets + row * groups : nullptr;
  auto affine = [&](__m512 q, int64_t feature) {
    const int64_t g = feature / w.group;
    const __m512 s = _mm512_set1_ps(scalar(srow[g]));
    return kOffset ? _mm512_fmadd_ps(q, s, _mm512_set1_ps(scalar(orow[g]))) : _mm512_mul_ps(q, s);
  };
  for (int64_t c = 0; c < w.k; c += 32) {
    __m512 lo, hi;
    if (w.bits == 4) {
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w.data + (row * w.k + c) / 2));
      const __m512i v = _mm512_cvtepu8_epi32(bytes);
      lo = _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(0xF)));
      hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
    } else {
      const int8_t* q = reinterpret_cast<const int8_t*>(w.data) + row * w.k + c;
      lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))));
      hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16))));
    }
    const __m512bh pair = _mm512_cvtne2ps_pbh(affine(hi, c + 16), affine(lo, c));
    _mm512_storeu_si512(reinterpret_cast<void*>(out + c), (__m512i)pair);
  }
}

template <typename S, bool kOffset>
void matmul_tiles(const at::BFloat16* x, int64_t m, const Weight& w, const S* scales, const S* offsets,
                  const at::BFloat16* bias, at::BFloat16* y) {
  const int64_t tiles = (w.n + kTileRows - 1) / kTileRows;
#pragma omp parallel
  {
    std::vector<at::BFloat16> tile(kTileRows * w.k);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t row0 = t * kTileRows, rows = std::min(kTileRows, w.n - row0);
      if (t + 1 < tiles) {  // the next tile's quantized rows arrive while this one is used
        prefetch_range(w.data + (row0 + kTileRows) * w.k * w.bits / 8,
                       std::min(kTileRows, w.n - row0 - kTileRows) * w.k * w.bits / 8);
      }
      for (int64_t r = 0; r < rows; ++r) dequantize_row<S, kOffset>(w, scales, offsets, row0 + r, tile.data() + r * w.k);
      dot_rows_bf16(x, w.k, tile.data(), w.k, w.k, m, rows, [&](int64_t token, int64_t r, float v) {
        if (bias != nullptr) v += static_cast<float>(bias[row0 + r]);
        y[token * w.n + row0 + r] = static_cast<at::BFloat16>(v);
      });
    }
  }
}

}  // namespace
#endif

// x [M, K] bf16; data uint8 [N, K / 2] (bits 4) or int8 [N, K] (bits 8); scales [N, K / group] float or half;
// offsets like scales or None; bias [N] bf16 or None. K must be a multiple of 32 and of group.
torch::Tensor quant_matmul(torch::Tensor x, torch::Tensor data, int64_t bits, int64_t group, torch::Tensor scales,
                           c10::optional<torch::Tensor> offsets, c10::optional<torch::Tensor> bias) {
#ifdef LORASERVE_BF16_SIMD
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2, "quant_matmul takes a 2-D bfloat16 x");
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
  if (has_bias) TORCH_CHECK(bias->scalar_type() == at::kBFloat16 && bias->numel() == n, "quant_matmul: bias");
  auto y = torch::empty({m, n}, x.options());
  const Weight w{reinterpret_cast<const uint8_t*>(data.data_ptr()), n, k, group, bits};
  const auto* xp = x.data_ptr<at::BFloat16>();
  const auto* bp = has_bias ? bias->contiguous().data_ptr<at::BFloat16>() : nullptr;
  auto* yp = y.data_ptr<at::BFloat16>();
  auto run = [&](auto* s, auto* o) {
    using S = std::remove_const_t<std::remove_pointer_t<decltype(s)>>;
    if (o != nullptr) {
      matmul_tiles<S, true>(xp, m, w, s, o, bp, yp);
    } else {
      matmul_tiles<S, false>(xp, m, w, s, static_cast<const S*>(nullptr), bp, yp);
    }
  };
  if (scales.scalar_type() == at::kFloat) {
    run(scales.data_ptr<float>(), has_offsets ? offsets->data_ptr<float>() : nullptr);
  } else {
    TORCH_CHECK(scales.scalar_type() == at::kHalf, "quant_matmul: scales must be float or half");
    run(scales.data_ptr<at::Half>(), has_offsets ? offsets->data_ptr<at::Half>() : nullptr);
  }
  return y;
#else
  TORCH_CHECK(false, "quant_matmul needs a CPU with AVX512-BF16");
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quant_matmul", &quant_matmul, "x W^T with W int4/int8 group-quantized (CPU, bf16)");
#ifdef LORASERVE_BF16_SIMD
  m.attr("available") = true;
#else
  m.attr("available") = false;  // built, but this CPU has no AVX512-BF16: the PyTorch path serves
#endif
}
