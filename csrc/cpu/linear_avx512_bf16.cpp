// AVX512-BF16 path of msd_linear_cpu for bfloat16 operands: `vdpbf16ps` multiplies pairs of
// bfloat16 values of x and of a weight row and adds both products into one float32 lane, so the
// weights are used as they are read, with no widening, and one instruction does 32 of the
// multiply-adds that take the AVX-512 path's widening plus two FMAs. float32 and float16 use the
// AVX-512 path's kernels. Target attributes and linkage as avx512.h says; linear.cpp calls in only
// after checking the CPU.
//
// Each output (x row i, weight row r) is the same sequence of instructions whatever m is and
// whichever block holds it: lane l accumulates the products of columns 32 j + 2 l and
// 32 j + 2 l + 1 for j = 0, 1, ... (a masked tail zero-fills), and the 16 lanes are summed by
// the same tree. So a row of x gives bit for bit the same output alone (decoding) as among the
// rows of a verified tree, which keeps speculative decoding exact.
#include "cpu/linear.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))

#include <algorithm>

#include "cpu/avx512.h"
#include "cpu/reduce_avx512.h"

#define MSD_AVX512_BF16 \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,f16c,fma")))

namespace msd::cpu {
namespace {

constexpr int kPairLanes = 32;  // bfloat16 columns per vector: 16 float32 lanes x 2
constexpr int kXRows = 4;
constexpr int kRows = kLinearBlockRows;
constexpr int64_t kPrefetchBlocks = 1;  // as in linear_avx512.cpp (measured there)

MSD_AVX512_BF16 inline __m512bh load_pairs(const uint16_t* p) {
    return reinterpret_cast<__m512bh>(_mm512_loadu_si512(p));
}
MSD_AVX512_BF16 inline __m512bh load_pairs(const uint16_t* p, __mmask32 mask) {
    return reinterpret_cast<__m512bh>(_mm512_maskz_loadu_epi16(mask, p));
}

// acc[i][r] += pairwise x[i, c:c+32] . w[r, c:c+32]; with Tail, only the columns in `mask`
// (the others read as zero). Prefetches the same columns `ahead` elements further (0: none).
template <int R, int MB, bool Tail>
MSD_AVX512_BF16 inline __attribute__((always_inline)) void dot_pairs(
    const uint16_t* w, int64_t w_stride, const uint16_t* x, int64_t x_stride, int64_t c,
    __mmask32 mask, int64_t ahead, __m512 (&acc)[MB][R]) {
    __m512bh wv[R];
    for (int r = 0; r < R; ++r) {
        const uint16_t* p = w + r * w_stride + c;
        if (!Tail && ahead != 0) {
            _mm_prefetch(reinterpret_cast<const char*>(p + ahead), _MM_HINT_T0);
        }
        wv[r] = Tail ? load_pairs(p, mask) : load_pairs(p);
    }
    for (int i = 0; i < MB; ++i) {
        const uint16_t* p = x + i * x_stride + c;
        const __m512bh xv = Tail ? load_pairs(p, mask) : load_pairs(p);
        for (int r = 0; r < R; ++r) acc[i][r] = _mm512_dpbf16_ps(acc[i][r], xv, wv[r]);
    }
}

// sums[i * R + r] = dot(x row i, weight row r) over all k columns, for an MB x R block.
template <int R, int MB>
MSD_AVX512_BF16 void dot_block(const uint16_t* w, int64_t w_stride, const uint16_t* x,
                               int64_t x_stride, int64_t k, int64_t ahead, float* sums) {
    __m512 acc[MB][R];
    for (int i = 0; i < MB; ++i)
        for (int r = 0; r < R; ++r) acc[i][r] = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c + kPairLanes <= k; c += kPairLanes) {
        dot_pairs<R, MB, false>(w, w_stride, x, x_stride, c, 0, ahead, acc);
    }
    if (c < k) {
        const __mmask32 mask = static_cast<__mmask32>((uint64_t{1} << (k - c)) - 1u);
        dot_pairs<R, MB, true>(w, w_stride, x, x_stride, c, mask, 0, acc);
    }
    reduce_add_many<MB * R>(&acc[0][0], sums);
}

// Weight rows [col, col + R) against every row of x, kXRows rows at a time: the weight rows
// come from memory for the first group and from L1 for the others.
template <int R>
MSD_AVX512_BF16 void weight_block(const LinearArgs& a, int64_t col) {
    const auto* w = static_cast<const uint16_t*>(a.weight) + col * a.weight_row_stride;
    const int64_t ws = a.weight_row_stride;
    const auto* x_all = static_cast<const uint16_t*>(a.x16);
    for (int64_t i = 0; i < a.m; i += kXRows) {
        const uint16_t* x = x_all + i * a.x16_row_stride;
        const int64_t ahead = i == 0 ? kPrefetchBlocks * kRows * ws : 0;
        float sums[reduced_size(kXRows * R)];
        const int mb = static_cast<int>(std::min<int64_t>(kXRows, a.m - i));
        const int64_t xs = a.x16_row_stride;
        switch (mb) {
            case 4: dot_block<R, 4>(w, ws, x, xs, a.k, ahead, sums); break;
            case 3: dot_block<R, 3>(w, ws, x, xs, a.k, ahead, sums); break;
            case 2: dot_block<R, 2>(w, ws, x, xs, a.k, ahead, sums); break;
            default: dot_block<R, 1>(w, ws, x, xs, a.k, ahead, sums); break;
        }
        store_block<BFloat16>(a, sums, i, mb, col, R);
    }
}

// One pass over all MB (5 or 6) rows of x, as linear_avx512.cpp's wide_rows: MB x R
// accumulators + R weight vectors + 1 x vector within the 32 zmm registers.
template <int MB>
constexpr int kWideRows = (31 - 1) / (MB + 1);

template <int MB, int R>
MSD_AVX512_BF16 void wide_block(const LinearArgs& a, int64_t col) {
    const auto* w = static_cast<const uint16_t*>(a.weight) + col * a.weight_row_stride;
    const int64_t ws = a.weight_row_stride;
    float sums[reduced_size(MB * R)];
    dot_block<R, MB>(w, ws, static_cast<const uint16_t*>(a.x16), a.x16_row_stride, a.k,
                     R == 1 ? 0 : kPrefetchBlocks * R * ws, sums);
    store_block<BFloat16>(a, sums, 0, MB, col, R);
}

template <int MB>
MSD_AVX512_BF16 void wide_rows(const LinearArgs& a, int64_t begin, int64_t end) {
    constexpr int R = kWideRows<MB>;
    int64_t col = begin;
    for (; col + R <= end; col += R) wide_block<MB, R>(a, col);
    for (; col < end; ++col) wide_block<MB, 1>(a, col);
}

MSD_AVX512_BF16 void rows_bfloat16(const LinearArgs& a, int64_t begin, int64_t end) {
    switch (a.m) {
        case 5: return wide_rows<5>(a, begin, end);
        case 6: return wide_rows<6>(a, begin, end);
        default: break;
    }
    int64_t col = begin;
    for (; col + kRows <= end; col += kRows) weight_block<kRows>(a, col);
    for (; col < end; ++col) weight_block<1>(a, col);
}

}  // namespace

const LinearKernels* linear_kernels_avx512_bf16() {
    const LinearKernels* avx512 = linear_kernels_avx512();
    if (avx512 == nullptr) return nullptr;
    static const LinearKernels kernels = [avx512] {
        LinearKernels k = *avx512;
        k.rows[MSD_BFLOAT16] = rows_bfloat16;
        k.bfloat16_reads_x16 = true;
        return k;
    }();
    return &kernels;
}

}  // namespace msd::cpu

#else  // not x86-64 with GCC / Clang: no AVX512-BF16 path

namespace msd::cpu {
const LinearKernels* linear_kernels_avx512_bf16() { return nullptr; }
}  // namespace msd::cpu

#endif
