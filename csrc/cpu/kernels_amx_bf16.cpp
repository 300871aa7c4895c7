// panel_gemm.h's bfloat16 kernel on AMX (chosen at run time where the CPU has
// AMX-BF16 and Linux grants the tile state): C (m, n) = A (m, k) @ B (k, n) +
// beta C with A and B in bfloat16 and C in float32.
//
// tdpbf16ps multiplies a 16 x 32 tile of A by a 32 x 16 tile of B held as 16
// rows of 16 pairs (B[2q][col], B[2q + 1][col]), which is the layout
// pack_panels_pairs already gives a panel's first and second 16 columns (rows
// of 128 bytes, a tile row being the first or second 64 of them). Each product
// of two bfloat16 is exact in float32 and summed in float32, as in the
// AVX512-BF16 kernel (up to the order of the sums); subnormal inputs count as
// zero and subnormal results are flushed, as there.
//
// Blocking: a block of 2 x 2 tiles of C (32 rows x one panel of 32 columns)
// stays in tile registers for the whole k loop, the other four of the eight
// tiles holding A's two row tiles and B's two column tiles of one step of 32 k;
// the blocks of rows run panel by panel.
// A is first copied into a zero-padded buffer of whole tiles (rows to 16, k
// to 32; the padded k meets the panel's zero rows), so that no tile reads
// past A's rows; C comes back through a tile-sized buffer, which keeps the
// columns and rows past n and m unwritten and applies beta.
#include "panel_gemm.h"

#if VK_AMX_BF16_KERNEL
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstring>
#include <vector>

namespace varlen {
namespace amx_bf16 {

bool request_tile_state() {
  constexpr long kArchReqXcompPerm = 0x1023;  // arch_prctl: ask for an XSAVE feature
  constexpr long kXfeatureTileData = 18;      // the AMX tile data
  static const bool granted =
      syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureTileData) == 0;
  return granted;
}

namespace {

constexpr int kTileRows = 16;  // rows of a tile (of A and C; pairs of k of B)
constexpr int kTileK = 32;     // bfloat16 k of A's tile row (64 bytes)

// A (m, k) copied into rows_pad x k_pad bfloat16, zero past m and k, in a
// buffer of this thread's (kept between calls). At the baseline ISA: no
// template is instantiated under the kernel's target below.
const uint16_t* padded_a(const uint16_t* A, int64_t lda, int64_t m, int64_t k, int64_t rows_pad,
                         int64_t k_pad) {
  thread_local std::vector<uint16_t> buffer;
  if (buffer.size() < size_t(rows_pad * k_pad)) buffer.resize(size_t(rows_pad * k_pad));
  uint16_t* out = buffer.data();
  for (int64_t r = 0; r < rows_pad; ++r) {
    uint16_t* row = out + r * k_pad;
    const int64_t copied = r < m ? k : 0;
    if (copied > 0) std::memcpy(row, A + r * lda, size_t(copied) * sizeof(uint16_t));
    std::memset(row + copied, 0, size_t(k_pad - copied) * sizeof(uint16_t));
  }
  return out;
}

}  // namespace
}  // namespace amx_bf16
}  // namespace varlen

// Only the kernel below is compiled for AMX (the headers above stay at the
// baseline ISA, like the rest of the extension).
#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,amx-tile,amx-bf16")

namespace varlen {
namespace amx_bf16 {
namespace {

// The tile configuration (palette 1): tiles 0-3 C (row tile i, column tile j
// in tile 2i + j: 16 rows x 16 floats), 4-5 A (16 rows x 32 bfloat16), 6-7 B
// (16 rows x 16 pairs). All 64 bytes a row.
struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

void load_config() {
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof(cfg));
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = kTileRows;
  }
  _tile_loadconfig(&cfg);
}

// C rows [0, rows) x cols [0, cols) (+ beta C) from the block's tiles, stored
// to out (up to 32 rows x 32 floats).
void write_back(float (*out)[kPanel], int64_t rows, int64_t cols, float beta, float* C,
                int64_t ldc) {
  const __mmask16 lo = cols >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << cols) - 1);
  const __mmask16 hi = cols >= 32 ? __mmask16(0xFFFF)
                       : cols > 16 ? __mmask16((1u << (cols - 16)) - 1)
                                   : __mmask16(0);
  for (int64_t r = 0; r < rows; ++r) {
    float* c = C + r * ldc;
    __m512 v0 = _mm512_load_ps(out[r]), v1 = _mm512_load_ps(out[r] + 16);
    if (beta != 0.f) {
      const __m512 b = _mm512_set1_ps(beta);
      v0 = _mm512_fmadd_ps(b, _mm512_maskz_loadu_ps(lo, c), v0);
      v1 = _mm512_fmadd_ps(b, _mm512_maskz_loadu_ps(hi, c + 16), v1);
    }
    _mm512_mask_storeu_ps(c, lo, v0);
    _mm512_mask_storeu_ps(c + 16, hi, v1);
  }
}

// One block: RT row tiles of the padded A (row stride k_pad) times one panel
// (ktiles tiles of 16 pairs), into C rows [0, rows) x cols [0, cols).
template <int RT>
void block(const uint16_t* a, int64_t k_pad, const uint16_t* panel, int64_t ktiles, int64_t rows,
           int64_t cols, float beta, float* C, int64_t ldc) {
  const int64_t a_bytes = k_pad * int64_t(sizeof(uint16_t));
  constexpr int64_t kPanelBytes = kPanel * 2 * sizeof(uint16_t);  // a row of pairs: 128
  _tile_zero(0);
  _tile_zero(1);
  if constexpr (RT == 2) {
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t kt = 0; kt < ktiles; ++kt) {
    const uint16_t* b = panel + kt * kTileRows * 2 * kPanel;
    _tile_loadd(4, a + kt * kTileK, a_bytes);
    _tile_loadd(6, b, kPanelBytes);
    _tile_loadd(7, b + 2 * 16, kPanelBytes);  // columns 16..31: the second 64 bytes
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if constexpr (RT == 2) {
      _tile_loadd(5, a + kTileRows * k_pad + kt * kTileK, a_bytes);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  alignas(64) float out[2 * kTileRows][kPanel];
  constexpr int64_t kOutBytes = kPanel * sizeof(float);
  _tile_stored(0, &out[0][0], kOutBytes);
  _tile_stored(1, &out[0][16], kOutBytes);
  if constexpr (RT == 2) {
    _tile_stored(2, &out[16][0], kOutBytes);
    _tile_stored(3, &out[16][16], kOutBytes);
  }
  write_back(out, rows, cols, beta, C, ldc);
}

}  // namespace

void panel_gemm(int64_t m, int64_t n, int64_t k, const c10::BFloat16* A, int64_t lda,
                const c10::BFloat16* packed_b, float beta, float* C, int64_t ldc) {
  static_assert(kPanel == 32, "a panel is two tiles of 16 columns");
  static_assert(kPairTile == kTileRows, "a panel's rows are whole tiles");
  if (m <= 0 || n <= 0) return;
  const int64_t ktiles = panel_pair_rows(k) / kTileRows;  // each 32 k
  const int64_t k_pad = ktiles * kTileK;
  const int64_t rows_pad = (m + kTileRows - 1) / kTileRows * kTileRows;
  const uint16_t* a = padded_a(reinterpret_cast<const uint16_t*>(A), lda, m, k, rows_pad, k_pad);
  const auto* b = reinterpret_cast<const uint16_t*>(packed_b);
  const int64_t panel_elems = panel_pair_elems(k, kPanel);  // one panel
  load_config();
  // Panels outer: a panel (64 KiB at k = 1024) stays in cache for every block
  // of rows, and all of B streams once a call.
  for (int64_t p = 0; p * kPanel < n; ++p) {
    const int64_t col = p * kPanel, cols = n - col < kPanel ? n - col : kPanel;
    for (int64_t r = 0; r < m; r += 2 * kTileRows) {
      const int64_t rows = m - r < 2 * kTileRows ? m - r : 2 * kTileRows;
      if (rows > kTileRows)
        block<2>(a + r * k_pad, k_pad, b + p * panel_elems, ktiles, rows, cols, beta,
                 C + r * ldc + col, ldc);
      else
        block<1>(a + r * k_pad, k_pad, b + p * panel_elems, ktiles, rows, cols, beta,
                 C + r * ldc + col, ldc);
    }
  }
  _tile_release();
}

}  // namespace amx_bf16
}  // namespace varlen
#pragma GCC pop_options

#else  // not built (see VK_AMX_BF16_KERNEL): never chosen, cpu_has_amx_bf16() is false
#include <c10/util/Exception.h>
namespace varlen {
namespace amx_bf16 {
bool request_tile_state() { return false; }
void panel_gemm(int64_t, int64_t, int64_t, const c10::BFloat16*, int64_t, const c10::BFloat16*,
                float, float*, int64_t) {
  TORCH_INTERNAL_ASSERT(false, "the AMX kernel is not in this build");
}
}  // namespace amx_bf16
}  // namespace varlen
#endif
