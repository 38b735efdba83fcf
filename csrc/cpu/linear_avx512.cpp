// AVX-512 path of msd_linear_cpu (target attributes and linkage: see avx512.h); linear.cpp
// calls into this table only after __builtin_cpu_supports said yes.
#include "cpu/linear.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))

#include <algorithm>

#include "cpu/avx512.h"
#include "cpu/reduce_avx512.h"

namespace msd::cpu {
namespace {

constexpr int kLanes = 16;
// x rows per register block: 4 x 4 accumulators + 4 weight vectors + 1 x vector of 32 zmm.
constexpr int kXRows = 4;
constexpr int kRows = kLinearBlockRows;
// The first x-row group prefetches the block this many blocks ahead: short rows (576 bf16 =
// 18 lines) leave the hardware prefetchers little time to ramp up per row; measured from DRAM,
// one block ahead lifts one core's bfloat16 rate from ~17 to ~27 GB/s (float32: unchanged).
constexpr int64_t kPrefetchBlocks = 1;

// 16 consecutive values widened to float32: all of them, or the lanes in `mask` (others 0).
// bfloat16 is the top half of a float32, so widening it is a shift.
template <class D>
struct Wide;
template <>
struct Wide<Float32> {
    MSD_AVX512 static __m512 load(const float* p) { return _mm512_loadu_ps(p); }
    MSD_AVX512 static __m512 load(const float* p, __mmask16 mask) {
        return _mm512_maskz_loadu_ps(mask, p);
    }
};
template <>
struct Wide<BFloat16> {
    MSD_AVX512 static __m512 widen(__m256i h) {
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    MSD_AVX512 static __m512 load(const uint16_t* p) {
        return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    }
    MSD_AVX512 static __m512 load(const uint16_t* p, __mmask16 mask) {
        return widen(_mm256_maskz_loadu_epi16(mask, p));
    }
};
template <>
struct Wide<Float16> {
    MSD_AVX512 static __m512 load(const uint16_t* p) {
        return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    }
    MSD_AVX512 static __m512 load(const uint16_t* p, __mmask16 mask) {
        return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p));
    }
};

// acc[i][r] += x[i, c:c+16] * w[r, c:c+16]; with Tail, only the lanes in `mask`. Also
// prefetches the same columns `ahead` elements further on (0: none).
template <class D, int R, int MB, bool Tail>
MSD_AVX512 inline __attribute__((always_inline)) void fma_columns(
    const typename D::T* w, int64_t w_stride, const float* x, int64_t x_stride, int64_t c,
    __mmask16 mask, int64_t ahead, __m512 (&acc)[MB][R]) {
    __m512 wv[R];
    for (int r = 0; r < R; ++r) {
        const typename D::T* p = w + r * w_stride + c;
        if (!Tail && ahead != 0) {
            _mm_prefetch(reinterpret_cast<const char*>(p + ahead), _MM_HINT_T0);
        }
        wv[r] = Tail ? Wide<D>::load(p, mask) : Wide<D>::load(p);
    }
    for (int i = 0; i < MB; ++i) {
        const float* p = x + i * x_stride + c;
        const __m512 xv = Tail ? _mm512_maskz_loadu_ps(mask, p) : _mm512_loadu_ps(p);
        for (int r = 0; r < R; ++r) acc[i][r] = _mm512_fmadd_ps(xv, wv[r], acc[i][r]);
    }
}

// sums[i * R + r] = dot(x row i, weight row r) over all k columns, for an MB x R block. Each
// lane accumulates every 16th product; the 16 lanes are summed at the end.
template <class D, int R, int MB>
MSD_AVX512 void dot_block(const typename D::T* w, int64_t w_stride, const float* x,
                          int64_t x_stride, int64_t k, int64_t ahead, float* sums) {
    __m512 acc[MB][R];
    for (int i = 0; i < MB; ++i)
        for (int r = 0; r < R; ++r) acc[i][r] = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c + kLanes <= k; c += kLanes) {
        fma_columns<D, R, MB, false>(w, w_stride, x, x_stride, c, 0, ahead, acc);
    }
    if (c < k) {
        const __mmask16 mask = static_cast<__mmask16>((1u << (k - c)) - 1u);
        fma_columns<D, R, MB, true>(w, w_stride, x, x_stride, c, mask, 0, acc);
    }
    reduce_add_many<MB * R>(&acc[0][0], sums);
}

// Weight rows [col, col + R) against every row of x, kXRows x rows at a time: the R rows come
// from memory for the first group and from L1 for the others.
template <class D, int R>
MSD_AVX512 void weight_block(const LinearArgs& a, int64_t col) {
    const auto* w = static_cast<const typename D::T*>(a.weight) + col * a.weight_row_stride;
    const int64_t ws = a.weight_row_stride;
    for (int64_t i = 0; i < a.m; i += kXRows) {
        const float* x = a.x + i * a.x_row_stride;
        const int64_t xs = a.x_row_stride;
        // Only the first group reads the rows from memory; it prefetches the next block's.
        const int64_t ahead = i == 0 ? kPrefetchBlocks * kRows * ws : 0;
        float sums[reduced_size(kXRows * R)];
        const int mb = static_cast<int>(std::min<int64_t>(kXRows, a.m - i));
        switch (mb) {
            case 4: dot_block<D, R, 4>(w, ws, x, xs, a.k, ahead, sums); break;
            case 3: dot_block<D, R, 3>(w, ws, x, xs, a.k, ahead, sums); break;
            case 2: dot_block<D, R, 2>(w, ws, x, xs, a.k, ahead, sums); break;
            default: dot_block<D, R, 1>(w, ws, x, xs, a.k, ahead, sums); break;
        }
        store_block<D>(a, sums, i, mb, col, R);
    }
}

// Weight rows for one pass over all MB (5 or 6) rows of x: MB x R accumulators + R weight
// vectors + 1 x vector within the 32 zmm registers (R = 5 or 4). Split as 4 + (MB - 4) rows, every
// weight block is read twice, the second time from L1 without prefetching; what that costs
// depends on the core. Measured (bench_cpu_linear, 2 threads, float32): on an AMD EPYC m = 5 cost
// what m = 8 costs, 1.4x m = 1; on an Intel Xeon with AVX-512 one pass is 0-7% faster at m = 5..6
// and 5-15% slower at m = 7..8 (R = 3 leaves too few weight rows per x load), so 7 and 8 stay split.
template <int MB>
constexpr int kWideRows = (31 - 1) / (MB + 1);

template <class D, int MB, int R>
MSD_AVX512 void wide_block(const LinearArgs& a, int64_t col) {
    const auto* w = static_cast<const typename D::T*>(a.weight) + col * a.weight_row_stride;
    const int64_t ws = a.weight_row_stride;
    float sums[reduced_size(MB * R)];
    dot_block<D, R, MB>(w, ws, a.x, a.x_row_stride, a.k, R == 1 ? 0 : kPrefetchBlocks * R * ws, sums);
    store_block<D>(a, sums, 0, MB, col, R);
}

template <class D, int MB>
MSD_AVX512 void wide_rows(const LinearArgs& a, int64_t begin, int64_t end) {
    constexpr int R = kWideRows<MB>;
    int64_t col = begin;
    for (; col + R <= end; col += R) wide_block<D, MB, R>(a, col);
    for (; col < end; ++col) wide_block<D, MB, 1>(a, col);
}

template <class D>
MSD_AVX512 void rows(const LinearArgs& a, int64_t begin, int64_t end) {
    switch (a.m) {
        case 5: return wide_rows<D, 5>(a, begin, end);
        case 6: return wide_rows<D, 6>(a, begin, end);
        default: break;
    }
    int64_t col = begin;
    for (; col + kRows <= end; col += kRows) weight_block<D, kRows>(a, col);
    for (; col < end; ++col) weight_block<D, 1>(a, col);
}

template <class D>
MSD_AVX512 void widen(const void* src, int64_t src_row_stride, int64_t rows, int64_t k,
                      float* dst) {
    for (int64_t i = 0; i < rows; ++i) {
        const auto* s = static_cast<const typename D::T*>(src) + i * src_row_stride;
        float* d = dst + i * k;
        int64_t c = 0;
        for (; c + kLanes <= k; c += kLanes) _mm512_storeu_ps(d + c, Wide<D>::load(s + c));
        if (c < k) {
            const __mmask16 mask = static_cast<__mmask16>((1u << (k - c)) - 1u);
            _mm512_mask_storeu_ps(d + c, mask, Wide<D>::load(s + c, mask));
        }
    }
}

const LinearKernels kKernels = {
    {rows<Float32>, rows<Float16>, rows<BFloat16>}, widen<Float16>, widen<BFloat16>, false};

}  // namespace

const LinearKernels* linear_kernels_avx512() { return &kKernels; }

}  // namespace msd::cpu

#else  // not x86-64 with GCC / Clang: no AVX-512 path

namespace msd::cpu {
const LinearKernels* linear_kernels_avx512() { return nullptr; }
}  // namespace msd::cpu

#endif
