// y[t] += (x[t] · A[slot]ᵀ) · B[slot] for runs of decode tokens that share an adapter slot, all slots in one
// call (CPU).
//
// Decode gives each adapter a handful of tokens, so the BLAS route costs two tiny matmuls per adapter per
// layer, and each of those pays ~15 us of fixed overhead whatever its size: that, not arithmetic, made LoRA
// cost 40% of a bf16 decode step. Here every run is cut into tiles of up to kTile tokens; a tile widens each
// A row (and B row) to float once and applies it to all its tokens, accumulating in float. Packed layers
// (qkv, gate_up) store B block-diagonally (part p's rank rows only touch part p's output columns), so the
// expand visits only those blocks: the work is the adapter's real rank times the real output width.
#include <torch/extension.h>

#include <algorithm>
#include <vector>

namespace {

constexpr int64_t kTile = 8;  // tokens sharing each widened A / B row

struct Layout {
  int64_t in, out, max_width, num_parts;
  const int64_t* part_rows;  // [slots, parts, 2]: rank rows [begin, end) of each part in each slot
  const int64_t* part_cols;  // [parts, 2]: output columns [begin, end) of each part
};

template <typename T>
void widen(const T* src, float* dst, int64_t count) {
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) dst[i] = static_cast<float>(src[i]);
}

// Register blocks: the shrink keeps kRowBlock A rows x kTile tokens of partial dot products, the expand kTile
// tokens x kColBlock output columns of sums, so each widened weight vector feeds several FMAs. Loops run
// to the full tile (missing tokens are zero rows) so their bounds are constants the compiler unrolls.
constexpr int64_t kRowBlock = 2;
constexpr int64_t kColBlock = 32;

template <typename T>
void add_tile(T* y, const T* x, const T* lora_a, const T* lora_b, int64_t slot, int64_t first, int64_t count,
              const Layout& L, std::vector<float>& scratch) {
  const int64_t* rows = L.part_rows + slot * L.num_parts * 2;
  int64_t width = 0;
  for (int64_t p = 0; p < L.num_parts; ++p) width = std::max(width, rows[2 * p + 1]);
  if (width == 0) return;
  const int64_t padded_width = (width + kRowBlock - 1) / kRowBlock * kRowBlock;
  scratch.assign(kTile * L.in + kRowBlock * L.in + kColBlock + kTile * padded_width, 0.f);
  float* xs = scratch.data();                  // [kTile, in], zero rows past count
  float* a_rows = xs + kTile * L.in;           // kRowBlock A rows widened
  float* b_row = a_rows + kRowBlock * L.in;    // kColBlock columns of one B row widened
  float* shrunk = b_row + kColBlock;           // [padded_width, kTile]
  for (int64_t t = 0; t < count; ++t) widen(x + (first + t) * L.in, xs + t * L.in, L.in);

  const T* a = lora_a + slot * L.max_width * L.in;
  for (int64_t w0 = 0; w0 < width; w0 += kRowBlock) {
    const int64_t rows_here = std::min(kRowBlock, width - w0);
    widen(a + w0 * L.in, a_rows, rows_here * L.in);
    for (int64_t t = 0; t < kTile; ++t) {
      const float* xt = xs + t * L.in;
      float dots[kRowBlock] = {};
      for (int64_t r = 0; r < kRowBlock; ++r) {
        const float* ar = a_rows + r * L.in;
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t i = 0; i < L.in; ++i) dot += xt[i] * ar[i];
        dots[r] = dot;
      }
      for (int64_t r = 0; r < kRowBlock; ++r) shrunk[(w0 + r) * kTile + t] = dots[r];
    }
  }

  const T* b = lora_b + slot * L.max_width * L.out;
  for (int64_t p = 0; p < L.num_parts; ++p) {
    const int64_t r0 = rows[2 * p], r1 = rows[2 * p + 1];
    if (r0 == r1) continue;  // part not targeted by this adapter
    for (int64_t c0 = L.part_cols[2 * p]; c0 < L.part_cols[2 * p + 1]; c0 += kColBlock) {
      const int64_t n = std::min(kColBlock, L.part_cols[2 * p + 1] - c0);
      float acc[kTile][kColBlock] = {};
      for (int64_t w = r0; w < r1; ++w) {
        widen(b + w * L.out + c0, b_row, n);
        const float* s = shrunk + w * kTile;
        for (int64_t t = 0; t < kTile; ++t)
#pragma omp simd
          for (int64_t o = 0; o < kColBlock; ++o) acc[t][o] += s[t] * b_row[o];
      }
      for (int64_t t = 0; t < count; ++t) {
        T* yt = y + (first + t) * L.out + c0;
        for (int64_t o = 0; o < n; ++o) yt[o] = static_cast<T>(static_cast<float>(yt[o]) + acc[t][o]);
      }
    }
  }
}

template <typename T>
void add_runs(T* y, const T* x, const T* lora_a, const T* lora_b, const int64_t* runs, int64_t num_runs,
              const Layout& L) {
  std::vector<int64_t> tiles;  // (slot, first token, count) triples
  for (int64_t r = 0; r < num_runs; ++r)
    for (int64_t first = runs[3 * r + 1]; first < runs[3 * r + 2]; first += kTile)
      tiles.insert(tiles.end(), {runs[3 * r], first, std::min(kTile, runs[3 * r + 2] - first)});
  const int64_t num_tiles = static_cast<int64_t>(tiles.size()) / 3;
#pragma omp parallel
  {
    std::vector<float> scratch;
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < num_tiles; ++i)
      add_tile<T>(y, x, lora_a, lora_b, tiles[3 * i], tiles[3 * i + 1], tiles[3 * i + 2], L, scratch);
  }
}

}  // namespace

// y [T, out] (updated in place), x [T, in], lora_a [slots, W, in], lora_b [slots, W, out], all one dtype;
// runs [N, 3] int64 (slot, begin, end) over y's rows; part_rows [slots, parts, 2]; part_cols [parts, 2].
void lora_add_runs(torch::Tensor y, torch::Tensor x, torch::Tensor lora_a, torch::Tensor lora_b, torch::Tensor runs,
                   torch::Tensor part_rows, torch::Tensor part_cols) {
  TORCH_CHECK(y.is_contiguous() && x.is_contiguous() && lora_a.is_contiguous() && lora_b.is_contiguous(),
              "lora_add_runs needs contiguous tensors");
  TORCH_CHECK(x.scalar_type() == y.scalar_type() && lora_a.scalar_type() == y.scalar_type() &&
                  lora_b.scalar_type() == y.scalar_type(), "lora_add_runs needs one dtype");
  runs = runs.contiguous();
  part_rows = part_rows.contiguous();
  part_cols = part_cols.contiguous();
  const Layout layout{x.size(1), y.size(1), lora_a.size(1), part_cols.size(0), part_rows.data_ptr<int64_t>(),
                      part_cols.data_ptr<int64_t>()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::BFloat16, at::ScalarType::Half, y.scalar_type(), "lora_add_runs", [&] {
    add_runs<scalar_t>(y.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), lora_a.data_ptr<scalar_t>(),
                       lora_b.data_ptr<scalar_t>(), runs.data_ptr<int64_t>(), runs.size(0), layout);
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lora_add_runs", &lora_add_runs, "y += x A[slot]^T B[slot] over runs of tokens (CPU)");
}
