// y[t] += c · (x[t] · A[slot]ᵀ) · B[slot] for runs of tokens that share an adapter slot and a coefficient c (a
// request's lora_scale, times its weight in a mix), decode tokens and short prefill chunks of all slots in one
// call (CPU). A mix applies several adapters to the same tokens: its runs cover the same rows, one per adapter,
// and sit next to each other in the run list; the expand sums them in registers and writes y once.
//
// Decode gives each adapter a handful of tokens, so the BLAS route costs two tiny matmuls per adapter per
// layer, each paying ~15 us of fixed overhead whatever its size. Here the whole step is two parallel passes:
//   shrink: s[t, :width] = x[t] · A[slot]ᵀ for every token (work items: 32 tokens of a run x 16 rank rows);
//   expand: y[t, cols]  += s[t, rows] · B[slot, rows, cols] (work items: a run, or a mix's runs, x one part's 64 columns).
// Each item reads its A rows or B columns once and applies them to every token of the run (tiles of tokens
// loop inside, so the weights stay in L1 while the run's activations stream past): an adapter's weights are
// read once per step however many of its tokens there are. Items are split among threads in order (static
// schedule), so each thread walks its weights front to back and the hardware prefetcher keeps up; with a
// dynamic schedule the weights, cold after the base matmuls, took twice as long to arrive. Packed layers (qkv, gate_up) store B
// block-diagonally (part p's rank rows only touch part p's output columns), so the expand visits only those
// blocks: the work is each adapter's own rank times the real output width.
//
// bf16 on a CPU with AVX512-BF16 dots x with A by vdpbf16ps on the bf16 rows (products exact, float sums) and
// widens B in registers; the shrunk s stays float. Other dtypes use plain loops the compiler vectorises.
#include "simd.h"

#include <algorithm>
#include <vector>

namespace {

using loraserve_simd::prefetch_range;
using loraserve_simd::prefetch_rows;

constexpr int64_t kShrinkRows = 16;   // A rows per shrink item
constexpr int64_t kShrinkTokens = 32; // tokens per shrink item: a long run (one adapter for the batch) still
                                      // gives every thread work
constexpr int64_t kExpandCols = 64;   // B columns per expand item
constexpr int64_t kTileTokens = 8;    // tokens per tile of the portable expand

struct Layout {
  int64_t in, out, max_width, num_parts;
  const int64_t* part_rows;  // [slots, parts, 2]: rank rows [begin, end) of each part in each slot
  const int64_t* part_cols;  // [parts, 2]: output columns [begin, end) of each part
};

struct Run {
  int64_t slot, begin, end;
  float coef;
};

struct ShrinkItem {
  int64_t run, row0, row1, token0, token1;  // tokens counted from the run's first
};

// Runs [first, last) cover the same rows (one run, or a mix's adapters).
struct ExpandItem {
  int64_t first, last, part, col0, col1;
};

// One adapter's share of an expand: its shrunk values, its B rows of the part, how many.
template <typename T>
struct Piece {
  const float* s;
  const T* b;
  int64_t rows;
};

// s[t * lds + r] = x[t] · a[r] for `tokens` rows of x and `rows` rows of a.
template <typename T>
void shrink_block(const T* x, const T* a, int64_t in, int64_t tokens, int64_t rows, float* s, int64_t lds) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* ar = a + r * in;
    for (int64_t t = 0; t < tokens; ++t) {
      const T* xt = x + t * in;
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t i = 0; i < in; ++i) dot += static_cast<float>(xt[i]) * static_cast<float>(ar[i]);
      s[t * lds + r] = dot;
    }
  }
}

// y[t, :cols] += Σ_pieces Σ_w s[t * lds + w] · b[w, :cols] for `tokens` rows.
template <typename T>
void expand_block(const Piece<T>* pieces, int64_t num_pieces, int64_t lds, int64_t ldb, int64_t cols, int64_t tokens,
                  T* y, int64_t ldy) {
  for (int64_t t0 = 0; t0 < tokens; t0 += kTileTokens) {
    const int64_t nt = std::min(kTileTokens, tokens - t0);
    float acc[kTileTokens][kExpandCols] = {};
    for (int64_t p = 0; p < num_pieces; ++p) {
      const Piece<T>& piece = pieces[p];
      for (int64_t w = 0; w < piece.rows; ++w) {
        float brow[kExpandCols] = {};
        for (int64_t o = 0; o < cols; ++o) brow[o] = static_cast<float>(piece.b[w * ldb + o]);
        for (int64_t t = 0; t < nt; ++t) {
          const float sv = piece.s[(t0 + t) * lds + w];
#pragma omp simd
          for (int64_t o = 0; o < kExpandCols; ++o) acc[t][o] += sv * brow[o];
        }
      }
    }
    for (int64_t t = 0; t < nt; ++t) {
      T* yt = y + (t0 + t) * ldy;
      for (int64_t o = 0; o < cols; ++o) yt[o] = static_cast<T>(static_cast<float>(yt[o]) + acc[t][o]);
    }
  }
}

#ifdef LORASERVE_BF16_SIMD
using namespace loraserve_simd;

template <>
void shrink_block<at::BFloat16>(const at::BFloat16* x, const at::BFloat16* a, int64_t in, int64_t tokens,
                                int64_t rows, float* s, int64_t lds) {
  dot_rows_bf16(x, in, a, in, in, tokens, rows, [&](int64_t t, int64_t r, float v) { s[t * lds + r] = v; });
}

// NT tokens x 64 columns per register tile: NT x 4 accumulators and 4 widened B vectors, reused across the
// tile and summed over every piece. Every bound is a constant so the accumulators stay in registers.
template <int NT>
void expand_tile_bf16(const Piece<at::BFloat16>* pieces, int64_t num_pieces, int64_t t0, int64_t lds, int64_t ldb,
                      const __mmask16* masks, at::BFloat16* y, int64_t ldy) {
  constexpr int kVecs = kExpandCols / 16;
  __m512 acc[NT][kVecs];
  _Pragma("GCC unroll 4") for (int t = 0; t < NT; ++t)
    _Pragma("GCC unroll 4") for (int v = 0; v < kVecs; ++v) acc[t][v] = _mm512_setzero_ps();
  for (int64_t p = 0; p < num_pieces; ++p) {
    const float* s = pieces[p].s + t0 * lds;
    const at::BFloat16* b = pieces[p].b;
    for (int64_t w = 0; w < pieces[p].rows; ++w) {  // full-width vectors: masked loads read zeros past the columns
      __m512 bv[kVecs];
      _Pragma("GCC unroll 4") for (int v = 0; v < kVecs; ++v) bv[v] = load_bf16_masked(b + w * ldb + 16 * v, masks[v]);
      _Pragma("GCC unroll 4") for (int t = 0; t < NT; ++t) {
        const __m512 sv = _mm512_set1_ps(s[t * lds + w]);
        _Pragma("GCC unroll 4") for (int v = 0; v < kVecs; ++v) acc[t][v] = _mm512_fmadd_ps(sv, bv[v], acc[t][v]);
      }
    }
  }
  _Pragma("GCC unroll 4") for (int t = 0; t < NT; ++t)
    _Pragma("GCC unroll 4") for (int v = 0; v < kVecs; ++v) {
      const __m512 sum = _mm512_add_ps(load_bf16_masked(y + t * ldy + 16 * v, masks[v]), acc[t][v]);
      _mm256_mask_storeu_epi16(y + t * ldy + 16 * v, masks[v], (__m256i)_mm512_cvtneps_pbh(sum));
    }
}

template <>
void expand_block<at::BFloat16>(const Piece<at::BFloat16>* pieces, int64_t num_pieces, int64_t lds, int64_t ldb,
                                int64_t cols, int64_t tokens, at::BFloat16* y, int64_t ldy) {
  __mmask16 masks[kExpandCols / 16];
  for (int64_t v = 0; v < kExpandCols / 16; ++v)
    masks[v] = static_cast<__mmask16>((1u << std::clamp<int64_t>(cols - 16 * v, 0, 16)) - 1);
  int64_t t = 0;
  for (; t + 4 <= tokens; t += 4) expand_tile_bf16<4>(pieces, num_pieces, t, lds, ldb, masks, y + t * ldy, ldy);
  switch (tokens - t) {
    case 3: expand_tile_bf16<3>(pieces, num_pieces, t, lds, ldb, masks, y + t * ldy, ldy); break;
    case 2: expand_tile_bf16<2>(pieces, num_pieces, t, lds, ldb, masks, y + t * ldy, ldy); break;
    case 1: expand_tile_bf16<1>(pieces, num_pieces, t, lds, ldb, masks, y + t * ldy, ldy); break;
    default: break;
  }
}
#endif

template <typename T>
void add_runs(T* y, const T* x, const T* lora_a, const T* lora_b, const std::vector<Run>& runs, const Layout& L) {
  auto rows_of = [&](int64_t slot, int64_t part) { return L.part_rows + (slot * L.num_parts + part) * 2; };
  auto width_of = [&](int64_t slot) {
    int64_t width = 0;
    for (int64_t p = 0; p < L.num_parts; ++p) width = std::max(width, rows_of(slot, p)[1]);
    return width;
  };
  const int64_t num_runs = static_cast<int64_t>(runs.size());
  std::vector<ShrinkItem> shrinks;
  std::vector<ExpandItem> expands;
  std::vector<int64_t> offsets;  // each run's first row in the shrunk buffer
  int64_t total = 0;
  for (int64_t r = 0; r < num_runs; ++r) {
    offsets.push_back(total);
    total += runs[r].end - runs[r].begin;
    const int64_t width = width_of(runs[r].slot), tokens = runs[r].end - runs[r].begin;
    for (int64_t t = 0; t < tokens; t += kShrinkTokens)
      for (int64_t w = 0; w < width; w += kShrinkRows)
        shrinks.push_back({r, w, std::min(width, w + kShrinkRows), t, std::min(tokens, t + kShrinkTokens)});
  }
  for (int64_t first = 0, last = 0; first < num_runs; first = last) {
    for (last = first + 1; last < num_runs && runs[last].begin == runs[first].begin &&
                           runs[last].end == runs[first].end; ++last) {
    }
    for (int64_t p = 0; p < L.num_parts; ++p) {
      bool targeted = false;  // by any adapter of the group
      for (int64_t r = first; r < last; ++r) targeted |= rows_of(runs[r].slot, p)[1] > rows_of(runs[r].slot, p)[0];
      if (!targeted) continue;
      for (int64_t c = L.part_cols[2 * p]; c < L.part_cols[2 * p + 1]; c += kExpandCols)
        expands.push_back({first, last, p, c, std::min(L.part_cols[2 * p + 1], c + kExpandCols)});
    }
  }
  if (shrinks.empty()) return;
  const int64_t lds = L.max_width;
  std::vector<float> shrunk(total * lds);
  const int64_t num_shrinks = static_cast<int64_t>(shrinks.size()), num_expands = static_cast<int64_t>(expands.size());
#pragma omp parallel
  {
    std::vector<Piece<T>> pieces;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < num_shrinks; ++i) {
      const ShrinkItem& item = shrinks[i];
      const Run& run = runs[item.run];
      if (i + 1 < num_shrinks) {  // the next item's A rows are on their way while these are used
        const ShrinkItem& next = shrinks[i + 1];
        prefetch_range(lora_a + (runs[next.run].slot * L.max_width + next.row0) * L.in,
                       (next.row1 - next.row0) * L.in);
      }
      float* s = shrunk.data() + (offsets[item.run] + item.token0) * lds + item.row0;
      const int64_t tokens = item.token1 - item.token0, rows = item.row1 - item.row0;
      shrink_block<T>(x + (run.begin + item.token0) * L.in, lora_a + (run.slot * L.max_width + item.row0) * L.in,
                      L.in, tokens, rows, s, lds);
      if (run.coef != 1.f)  // c · B(Ax) = B(c · Ax): the coefficient scales the few shrunk values
        for (int64_t t = 0; t < tokens; ++t)
          for (int64_t w = 0; w < rows; ++w) s[t * lds + w] *= run.coef;
    }
    // the implicit barrier: every shrink is done before any expand reads it
#pragma omp for schedule(static)
    for (int64_t i = 0; i < num_expands; ++i) {
      const ExpandItem& item = expands[i];
      if (i + 1 < num_expands) {  // B is read in short pieces of many rows: ask for the next item's ahead
        const ExpandItem& next = expands[i + 1];
        const int64_t* next_rows = rows_of(runs[next.first].slot, next.part);
        prefetch_rows(lora_b + (runs[next.first].slot * L.max_width + next_rows[0]) * L.out + next.col0,
                      next_rows[1] - next_rows[0], L.out, next.col1 - next.col0);
      }
      pieces.clear();
      for (int64_t r = item.first; r < item.last; ++r) {
        const int64_t* rows = rows_of(runs[r].slot, item.part);
        if (rows[1] > rows[0])
          pieces.push_back({shrunk.data() + offsets[r] * lds + rows[0],
                            lora_b + (runs[r].slot * L.max_width + rows[0]) * L.out + item.col0, rows[1] - rows[0]});
      }
      const Run& run = runs[item.first];
      expand_block<T>(pieces.data(), static_cast<int64_t>(pieces.size()), lds, L.out, item.col1 - item.col0,
                      run.end - run.begin, y + run.begin * L.out + item.col0, L.out);
    }
  }
}

}  // namespace

// y [T, out] (updated in place), x [T, in], lora_a [slots, W, in], lora_b [slots, W, out], all one dtype;
// runs [N, 3] int64 (slot, begin, end) over y's rows: two runs cover the same rows (a mix) or none, and runs over
// the same rows are adjacent; coefs [N] float32, each run's coefficient; part_rows [slots, parts, 2];
// part_cols [parts, 2].
void lora_add_runs(torch::Tensor y, torch::Tensor x, torch::Tensor lora_a, torch::Tensor lora_b, torch::Tensor runs,
                   torch::Tensor coefs, torch::Tensor part_rows, torch::Tensor part_cols) {
  TORCH_CHECK(y.is_contiguous() && x.is_contiguous() && lora_a.is_contiguous() && lora_b.is_contiguous(),
              "lora_add_runs needs contiguous tensors");
  TORCH_CHECK(x.scalar_type() == y.scalar_type() && lora_a.scalar_type() == y.scalar_type() &&
                  lora_b.scalar_type() == y.scalar_type(), "lora_add_runs needs one dtype");
  TORCH_CHECK(coefs.scalar_type() == at::kFloat && coefs.numel() == runs.size(0), "lora_add_runs: one float32 "
              "coefficient per run");
  runs = runs.contiguous();
  coefs = coefs.contiguous();
  part_rows = part_rows.contiguous();
  part_cols = part_cols.contiguous();
  std::vector<Run> run_list(runs.size(0));
  const int64_t* r = runs.data_ptr<int64_t>();
  const float* c = coefs.data_ptr<float>();
  for (size_t i = 0; i < run_list.size(); ++i) run_list[i] = {r[3 * i], r[3 * i + 1], r[3 * i + 2], c[i]};
  const Layout layout{x.size(1), y.size(1), lora_a.size(1), part_cols.size(0), part_rows.data_ptr<int64_t>(),
                      part_cols.data_ptr<int64_t>()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::BFloat16, at::ScalarType::Half, y.scalar_type(), "lora_add_runs", [&] {
    add_runs<scalar_t>(y.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), lora_a.data_ptr<scalar_t>(),
                       lora_b.data_ptr<scalar_t>(), run_list, layout);
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lora_add_runs", &lora_add_runs, "y += c x A[slot]^T B[slot] over runs of tokens (CPU)");
}
