// AMX path of msd_linear_cpu for bfloat16 operands (float32 and float16 use the AVX-512
// kernels). The product is computed transposed, out^T = weight . x^T, so that the weight is
// the tile multiplier's A operand and is read as it lies in memory: an A tile is 16 weight rows
// x 32 columns, loaded with the weight's row stride. x is the B operand: linear() packs it once
// per call (pack_x below) into the pair-interleaved layout B tiles need, 16 pairs of columns x
// up to 16 rows of x per tile, zero-filled past k. C tiles hold 16 weight rows x the x rows in
// float32; their sums get the bias and the one rounding in store_block.
//
// Each output (x row i, weight row n) comes from the same instructions whatever m is and
// whichever block holds it: TDPBF16PS computes each C element from one row of A and one column
// of B, and every output sums the same k blocks in the same order (the last one zero-padded
// when k % 32 != 0). So a row of x gives bit for bit the same output alone as among the rows of
// a verified tree, which keeps speculative decoding exact.
//
// Tile registers: 0, 1 = C for weight rows [col, col + 16) and [col + 16, col + 32); 2, 3 = their
// A tiles; 4 = B. A block of 32 weight rows is streamed once per group of 16 x rows (more than
// one group only for m > 16, as in prefill).
#include "cpu/linear.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && defined(__linux__)

#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include "cpu/avx512.h"
#include "cpu/dtype.h"
#include "cpu/lanes_avx512.h"

// A superset of MSD_AVX512 (avx512.h), so that its helpers inline here; the AMX path is only
// taken where the AVX-512 one (which needs FMA and F16C too) is available.
#define MSD_AMX __attribute__((target("avx512f,avx512bw,avx512vl,f16c,fma,amx-tile,amx-bf16")))

namespace msd::cpu {
namespace {

constexpr int kTileRows = 16;    // weight rows per A / C tile; pairs of columns per B tile
constexpr int kTileCols = 32;    // bfloat16 columns of k per A tile (64 bytes)
constexpr int kMaxXRows = 16;    // x rows per B / C tile (64 bytes of float32)
constexpr int kBlockRows = 2 * kTileRows;

// The x rows one B tile covers: all m when m <= 16, else groups of 16 (the last zero-padded).
int64_t group_rows(int64_t m) { return std::min<int64_t>(m, kMaxXRows); }
int64_t k_blocks(int64_t k) { return (k + kTileCols - 1) / kTileCols; }

// Packed x: [group][k block][pair p < 16][x row j < group_rows][2], element (j, 2p + h) of the
// block being x[group * group_rows + j, block * 32 + 2p + h], zero past m and k. Within a group,
// column pair q (= block * 16 + p) of row j is pair q * group_rows + j: a transpose of the rows'
// 32-bit column pairs, done once per call (it is on the hot path: every linear of every step).
int64_t pack_x(const void* src, int64_t src_row_stride, int64_t m, int64_t k, uint16_t* dst) {
    const int64_t rows = group_rows(m);
    const int64_t groups = (m + rows - 1) / rows;
    const int64_t group_elems = k_blocks(k) * kTileRows * rows * 2;
    const int64_t size = groups * group_elems;
    if (dst == nullptr) return size;
    std::memset(dst, 0, static_cast<size_t>(size) * sizeof(uint16_t));
    const auto* x = static_cast<const uint16_t*>(src);
    const int64_t pairs = k / 2;
    for (int64_t i = 0; i < m; ++i) {
        const uint16_t* row = x + i * src_row_stride;
        uint16_t* out = dst + (i / rows) * group_elems + (i % rows) * 2;
        for (int64_t q = 0; q < pairs; ++q) std::memcpy(out + q * rows * 2, row + 2 * q, 4);
        if (k % 2 != 0) out[pairs * rows * 2] = row[k - 1];
    }
    return size;
}

struct alignas(64) TileConfig {
    uint8_t palette = 1;
    uint8_t start_row = 0;
    uint8_t reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
};

MSD_AMX void configure(int64_t x_rows) {
    TileConfig config;
    const auto x_bytes = static_cast<uint16_t>(x_rows * 4);
    for (int t : {0, 1}) {  // C: 16 weight rows x x_rows float32
        config.rows[t] = kTileRows;
        config.colsb[t] = x_bytes;
    }
    for (int t : {2, 3}) {  // A: 16 weight rows x 32 bfloat16
        config.rows[t] = kTileRows;
        config.colsb[t] = kTileCols * 2;
    }
    config.rows[4] = kTileRows;  // B: 16 column pairs x x_rows pairs
    config.colsb[4] = x_bytes;
    _tile_loadconfig(&config);
}

// The A tile of weight rows [row, row + 16) and columns [c, c + 32) as a pointer and byte
// stride to load it from: the weight itself, or `pad` holding the rows < rows_valid and
// columns < cols_valid of it and zeros elsewhere.
const uint16_t* a_tile(const uint16_t* w, int64_t ws, int64_t rows_valid, int64_t cols_valid,
                       uint16_t* pad, int64_t* stride_bytes) {
    if (rows_valid == kTileRows && cols_valid == kTileCols) {
        *stride_bytes = ws * 2;
        return w;
    }
    std::memset(pad, 0, kTileRows * kTileCols * sizeof(uint16_t));
    for (int64_t r = 0; r < rows_valid; ++r) {
        std::memcpy(pad + r * kTileCols, w + r * ws, static_cast<size_t>(cols_valid) * 2);
    }
    *stride_bytes = kTileCols * 2;
    return pad;
}

// C tiles 0 and 1 -> out rows [x_row, x_row + x_rows) at columns [col, col + rows_valid): each
// x row's 32 sums are a column of the stored tiles, gathered 16 at a time, plus the bias in
// float32, rounded as store_block rounds. (A scalar transpose and store cost ~0.8 us per block
// at 16 x rows, a quarter of streaming the block's 36 KB of lm_head or gate_up weights.)
MSD_AMX void store_tiles(const LinearArgs& a, int64_t x_row, int64_t x_rows, int64_t col,
                         int64_t rows_valid) {
    alignas(64) float c[kBlockRows][kMaxXRows];
    _tile_stored(0, c[0], kMaxXRows * 4);
    _tile_stored(1, c[kTileRows], kMaxXRows * 4);
    const __mmask32 valid = rows_valid >= kBlockRows ? ~__mmask32{0} : (__mmask32{1} << rows_valid) - 1;
    const auto low = static_cast<__mmask16>(valid), high = static_cast<__mmask16>(valid >> 16);
    using L = Lanes<BFloat16>;
    __m512 bias0 = _mm512_setzero_ps(), bias1 = _mm512_setzero_ps();
    if (a.bias != nullptr) {
        const auto* b = static_cast<const uint16_t*>(a.bias) + col;
        bias0 = L::load(b, low);
        bias1 = L::load(b + kTileRows, high);
    }
    // Element (r, i) of a stored tile is c[r][i]: lane r of column i is at r * 16 + i.
    const __m512i rows = _mm512_mullo_epi32(
        _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi32(kMaxXRows));
    for (int64_t i = 0; i < x_rows; ++i) {
        const __m512i index = _mm512_add_epi32(rows, _mm512_set1_epi32(static_cast<int>(i)));
        __m512 sums0 = _mm512_i32gather_ps(index, c[0], 4);
        __m512 sums1 = _mm512_i32gather_ps(index, c[kTileRows], 4);
        if (a.bias != nullptr) {  // as store_block: sum + bias, one float32 add
            sums0 = _mm512_add_ps(sums0, bias0);
            sums1 = _mm512_add_ps(sums1, bias1);
        }
        auto* out = static_cast<uint16_t*>(a.out) + (x_row + i) * a.out_row_stride + col;
        L::store(out, sums0, low);
        L::store(out + kTileRows, sums1, high);
    }
}

// Weight rows [col, col + rows_valid) (rows_valid <= 32) against every row of x.
// No software prefetch: unlike the AVX-512 kernels' (linear_avx512.cpp), prefetching the rows of
// the block 1, 2 or 4 ahead (T0, T1 or T2 hints) made the calls slower on this machine's Xeon,
// measured with the variants taking turns call by call from DRAM: 2-37% slower with 2 threads
// on the layer shapes (gate_up, down), 0-8% on lm_head; 2-21% slower with 1 thread.
MSD_AMX void weight_block(const LinearArgs& a, int64_t col, int64_t rows_valid) {
    const auto* w = static_cast<const uint16_t*>(a.weight) + col * a.weight_row_stride;
    const int64_t ws = a.weight_row_stride;
    const int64_t rows = group_rows(a.m);
    const int64_t blocks = k_blocks(a.k);
    const int64_t block_elems = kTileRows * rows * 2;
    const auto* x = static_cast<const uint16_t*>(a.x16);
    const int64_t rows0 = std::min<int64_t>(rows_valid, kTileRows);
    const int64_t rows1 = rows_valid - rows0;
    alignas(64) uint16_t pad0[kTileRows * kTileCols];
    alignas(64) uint16_t pad1[kTileRows * kTileCols];
    for (int64_t g = 0, x_row = 0; x_row < a.m; ++g, x_row += rows) {
        _tile_zero(0);
        _tile_zero(1);
        const uint16_t* xg = x + g * blocks * block_elems;
        for (int64_t b = 0; b < blocks; ++b) {
            const int64_t c = b * kTileCols;
            const int64_t cols = std::min<int64_t>(kTileCols, a.k - c);
            int64_t s0 = 0, s1 = 0;
            _tile_loadd(2, a_tile(w + c, ws, rows0, cols, pad0, &s0), s0);
            _tile_loadd(4, xg + b * block_elems, rows * 4);
            _tile_dpbf16ps(0, 2, 4);
            if (rows1 > 0) {
                _tile_loadd(3, a_tile(w + kTileRows * ws + c, ws, rows1, cols, pad1, &s1), s1);
                _tile_dpbf16ps(1, 3, 4);
            }
        }
        store_tiles(a, x_row, std::min(rows, a.m - x_row), col, rows_valid);
    }
}

MSD_AMX void rows_bfloat16(const LinearArgs& a, int64_t begin, int64_t end) {
    configure(group_rows(a.m));
    for (int64_t col = begin; col < end; col += kBlockRows) {
        weight_block(a, col, std::min<int64_t>(kBlockRows, end - col));
    }
    _tile_release();
}

// Linux hands out AMX tile state only to processes that ask for it (once per process).
bool os_allows_amx() {
    constexpr long kArchReqXcompPerm = 0x1023;
    constexpr long kXfeatureXtiledata = 18;
    static const bool allowed =
        syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
    return allowed;
}

}  // namespace

const LinearKernels* linear_kernels_amx() {
    static const LinearKernels* const table = []() -> const LinearKernels* {
        const LinearKernels* avx512 = linear_kernels_avx512();
        if (avx512 == nullptr || !__builtin_cpu_supports("amx-tile") ||
            !__builtin_cpu_supports("amx-bf16") || !os_allows_amx()) {
            return nullptr;
        }
        static LinearKernels kernels = *avx512;
        kernels.rows[MSD_BFLOAT16] = rows_bfloat16;
        kernels.bfloat16_reads_x16 = true;
        kernels.pack_bfloat16_x = pack_x;
        return &kernels;
    }();
    return table;
}

}  // namespace msd::cpu

#else  // not x86-64 Linux with GCC / Clang: no AMX path

namespace msd::cpu {
const LinearKernels* linear_kernels_amx() { return nullptr; }
}  // namespace msd::cpu

#endif
