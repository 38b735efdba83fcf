// AVX2 + FMA + F16C path of msd_linear_cpu: the AVX-512 kernel's structure (see
// linear_avx512.cpp, also for why the target is set per function) on 8 lanes and 16 ymm
// registers, with the columns past the last multiple of 8 summed by scalar code.
#include "cpu/linear.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))

#include <immintrin.h>

#include <algorithm>

#define MSD_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace msd::cpu {
namespace {

constexpr int kLanes = 8;
// x rows per register block: 2 x 4 accumulators + 4 weight vectors + 1 x vector of 16 ymm.
constexpr int kXRows = 2;
constexpr int kRows = kLinearBlockRows;

template <class D>
struct Wide;
template <>
struct Wide<Float32> {
    MSD_AVX2 static __m256 load(const float* p) { return _mm256_loadu_ps(p); }
};
template <>
struct Wide<BFloat16> {
    MSD_AVX2 static __m256 load(const uint16_t* p) {
        const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
};
template <>
struct Wide<Float16> {
    MSD_AVX2 static __m256 load(const uint16_t* p) {
        return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    }
};

MSD_AVX2 inline float horizontal_sum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// sums[i * R + r] = dot(x row i, weight row r) for an MB x R block (see linear_avx512.cpp).
template <class D, int R, int MB>
MSD_AVX2 void dot_block(const typename D::T* w, int64_t w_stride, const float* x,
                        int64_t x_stride, int64_t k, int64_t ahead, float* sums) {
    __m256 acc[MB][R];
    for (int i = 0; i < MB; ++i)
        for (int r = 0; r < R; ++r) acc[i][r] = _mm256_setzero_ps();
    int64_t c = 0;
    for (; c + kLanes <= k; c += kLanes) {
        __m256 wv[R];
        for (int r = 0; r < R; ++r) {
            const typename D::T* p = w + r * w_stride + c;
            if (ahead != 0) _mm_prefetch(reinterpret_cast<const char*>(p + ahead), _MM_HINT_T0);
            wv[r] = Wide<D>::load(p);
        }
        for (int i = 0; i < MB; ++i) {
            const __m256 xv = _mm256_loadu_ps(x + i * x_stride + c);
            for (int r = 0; r < R; ++r) acc[i][r] = _mm256_fmadd_ps(xv, wv[r], acc[i][r]);
        }
    }
    const int64_t tail_begin = c;
    for (int i = 0; i < MB; ++i) {
        for (int r = 0; r < R; ++r) {
            float tail = 0.0f;
            for (c = tail_begin; c < k; ++c) {
                tail += x[i * x_stride + c] * D::load(w[r * w_stride + c]);
            }
            sums[i * R + r] = horizontal_sum(acc[i][r]) + tail;
        }
    }
}

template <class D, int R>
MSD_AVX2 void weight_block(const LinearArgs& a, int64_t col) {
    const auto* w = static_cast<const typename D::T*>(a.weight) + col * a.weight_row_stride;
    const int64_t ws = a.weight_row_stride;
    for (int64_t i = 0; i < a.m; i += kXRows) {
        const float* x = a.x + i * a.x_row_stride;
        const int64_t ahead = i == 0 ? kRows * ws : 0;  // next block (see linear_avx512.cpp)
        float sums[kXRows * R];
        const int mb = static_cast<int>(std::min<int64_t>(kXRows, a.m - i));
        if (mb == 2) {
            dot_block<D, R, 2>(w, ws, x, a.x_row_stride, a.k, ahead, sums);
        } else {
            dot_block<D, R, 1>(w, ws, x, a.x_row_stride, a.k, ahead, sums);
        }
        store_block<D>(a, sums, i, mb, col, R);
    }
}

template <class D>
MSD_AVX2 void rows(const LinearArgs& a, int64_t begin, int64_t end) {
    int64_t col = begin;
    for (; col + kRows <= end; col += kRows) weight_block<D, kRows>(a, col);
    for (; col < end; ++col) weight_block<D, 1>(a, col);
}

template <class D>
MSD_AVX2 void widen(const void* src, int64_t src_row_stride, int64_t rows, int64_t k,
                    float* dst) {
    for (int64_t i = 0; i < rows; ++i) {
        const auto* s = static_cast<const typename D::T*>(src) + i * src_row_stride;
        float* d = dst + i * k;
        int64_t c = 0;
        for (; c + kLanes <= k; c += kLanes) _mm256_storeu_ps(d + c, Wide<D>::load(s + c));
        for (; c < k; ++c) d[c] = D::load(s[c]);
    }
}

const LinearKernels kKernels = {
    {rows<Float32>, rows<Float16>, rows<BFloat16>}, widen<Float16>, widen<BFloat16>, false};

}  // namespace

const LinearKernels* linear_kernels_avx2() { return &kKernels; }

}  // namespace msd::cpu

#else  // not x86-64 with GCC / Clang: no AVX2 path

namespace msd::cpu {
const LinearKernels* linear_kernels_avx2() { return nullptr; }
}  // namespace msd::cpu

#endif
