// AVX2 + FMA path of msd_tree_attention_cpu's micro-kernels: attention_avx512.cpp's structure
// on 8 lanes and 16 ymm registers (so fewer rows per register block). Columns past the last
// multiple of 8 use masked loads and stores (vmaskmov), so nothing past a row's d is read.
#include "cpu/attention.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>

#define MSD_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace msd::cpu {
namespace {

constexpr int kLanes = 8;
// scores: 2 rows x 4 keys of accumulators + 4 key vectors + 1 query vector = 13 ymm.
constexpr int kScoreRows = 2;
constexpr int kScoreKeys = 4;
// accumulate: 2 rows x 4 column vectors (32 columns) + 4 value vectors + p = 13 ymm.
constexpr int kAccRows = 2;
constexpr int kAccVectors = 4;

// All-ones in the lanes below `remaining` (a vmaskmov mask).
MSD_AVX2 inline __m256i lanes_mask(int64_t remaining) {
    const int count = static_cast<int>(std::clamp<int64_t>(remaining, 0, kLanes));
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(count), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// Lane i of the result = the sum of all lanes of v[i].
MSD_AVX2 inline __m128 sum_each(const __m256 v[4]) {
    const __m256 ab = _mm256_hadd_ps(v[0], v[1]);
    const __m256 cd = _mm256_hadd_ps(v[2], v[3]);
    const __m256 abcd = _mm256_hadd_ps(ab, cd);
    return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

MSD_AVX2 inline float horizontal_max(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}

MSD_AVX2 inline float horizontal_sum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

MSD_AVX2 void scores(const float* q, int64_t q_stride, int rows, const float* const* k,
                     int keys, int64_t d, float* s, int64_t s_stride) {
    for (int m0 = 0; m0 < rows; m0 += kScoreRows) {
        const float* qr[kScoreRows];
        for (int i = 0; i < kScoreRows; ++i) qr[i] = q + std::min(m0 + i, rows - 1) * q_stride;
        for (int n0 = 0; n0 < keys; n0 += kScoreKeys) {
            const float* kr[kScoreKeys];
            for (int j = 0; j < kScoreKeys; ++j) {
                kr[j] = k[std::min(n0 + j, keys - 1)];
            }
            __m256 acc[kScoreRows][kScoreKeys];
            for (int i = 0; i < kScoreRows; ++i)
                for (int j = 0; j < kScoreKeys; ++j) acc[i][j] = _mm256_setzero_ps();
            int64_t c = 0;
            for (; c + kLanes <= d; c += kLanes) {
                __m256 kv[kScoreKeys];
                for (int j = 0; j < kScoreKeys; ++j) kv[j] = _mm256_loadu_ps(kr[j] + c);
                for (int i = 0; i < kScoreRows; ++i) {
                    const __m256 qv = _mm256_loadu_ps(qr[i] + c);
                    for (int j = 0; j < kScoreKeys; ++j) {
                        acc[i][j] = _mm256_fmadd_ps(qv, kv[j], acc[i][j]);
                    }
                }
            }
            if (c < d) {
                const __m256i mask = lanes_mask(d - c);
                __m256 kv[kScoreKeys];
                for (int j = 0; j < kScoreKeys; ++j) kv[j] = _mm256_maskload_ps(kr[j] + c, mask);
                for (int i = 0; i < kScoreRows; ++i) {
                    const __m256 qv = _mm256_maskload_ps(qr[i] + c, mask);
                    for (int j = 0; j < kScoreKeys; ++j) {
                        acc[i][j] = _mm256_fmadd_ps(qv, kv[j], acc[i][j]);
                    }
                }
            }
            // All rows: a repeated last row stores the same sums again (a variable trip
            // count here would keep acc in memory instead of registers).
            for (int i = 0; i < kScoreRows; ++i) {
                _mm_storeu_ps(s + std::min(m0 + i, rows - 1) * s_stride + n0, sum_each(acc[i]));
            }
        }
    }
}

// 2^x for x <= 0 (and -inf, NaN), as in attention_avx512.cpp; the power of two is built in the
// exponent bits (x is clamped to -127 first, where the result is 0 anyway; NaN passes through).
MSD_AVX2 inline __m256 exp2_nonpositive(__m256 x) {
    const __m256 clamped = _mm256_max_ps(_mm256_set1_ps(-127.0f), x);  // NaN x stays NaN
    const __m256 r = _mm256_round_ps(clamped, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 f = _mm256_sub_ps(clamped, r);
    __m256 p = _mm256_set1_ps(1.5345764404628426e-04f);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3399930903688073e-03f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.6184890717267990e-03f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.5503286421298980e-02f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.4022646248340607e-01f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.9314718246459960e-01f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    const __m256i exponent = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(r), _mm256_set1_epi32(127)), 23);
    const __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(exponent));
    const __m256 tiny = _mm256_cmp_ps(x, _mm256_set1_ps(-126.0f), _CMP_LT_OQ);
    return _mm256_andnot_ps(tiny, y);
}

MSD_AVX2 float softmax_row(float* s, int keys, float* max, float* sum) {
    const float neg_inf = -std::numeric_limits<float>::infinity();
    const __m256 neg_inf_v = _mm256_set1_ps(neg_inf);
    __m256 block_max = neg_inf_v;
    for (int n = 0; n < keys; n += kLanes) {
        const __m256i mask = lanes_mask(keys - n);
        const __m256 v = _mm256_blendv_ps(neg_inf_v, _mm256_maskload_ps(s + n, mask),
                                          _mm256_castsi256_ps(mask));
        block_max = _mm256_max_ps(block_max, v);
    }
    const float new_max = std::max(*max, horizontal_max(block_max));
    if (new_max == neg_inf) {
        std::fill(s, s + keys, 0.0f);
        return 1.0f;
    }
    const __m256 shift = _mm256_set1_ps(new_max);
    __m256 total = _mm256_setzero_ps();
    for (int n = 0; n < keys; n += kLanes) {
        const __m256i mask = lanes_mask(keys - n);
        const __m256 v = _mm256_maskload_ps(s + n, mask);
        // Lanes past `keys` load 0 and give exp2(-new_max): dropped from the sum and the store.
        const __m256 p = _mm256_and_ps(exp2_nonpositive(_mm256_sub_ps(v, shift)),
                                       _mm256_castsi256_ps(mask));
        _mm256_maskstore_ps(s + n, mask, p);
        total = _mm256_add_ps(total, p);
    }
    const float alpha = std::exp2(*max - new_max);
    *sum = *sum * alpha + horizontal_sum(total);
    *max = new_max;
    return alpha;
}

// One chunk of up to 32 columns from c0 for every row; kMasked for the last, partial chunk
// (the masks would not fit in the registers beside the accumulators of full chunks). The
// block's sum is added to the rescaled accumulator at the end, as in attention_avx512.cpp.
template <bool kMasked>
MSD_AVX2 void accumulate_chunk(const float* p, int64_t p_stride, int rows,
                               const float* const* v, int keys, int64_t d, int64_t c0,
                               const float* alpha, float* acc, int64_t acc_stride) {
    __m256i mask[kAccVectors];
    for (int j = 0; j < kAccVectors; ++j) mask[j] = lanes_mask(d - c0 - j * kLanes);
    const auto load = [&](const float* src, int j) MSD_AVX2 {
        return kMasked ? _mm256_maskload_ps(src, mask[j]) : _mm256_loadu_ps(src);
    };
    for (int m0 = 0; m0 < rows; m0 += kAccRows) {
        int row[kAccRows];
        __m256 a[kAccRows][kAccVectors];
        for (int i = 0; i < kAccRows; ++i) {
            row[i] = std::min(m0 + i, rows - 1);
            for (int j = 0; j < kAccVectors; ++j) a[i][j] = _mm256_setzero_ps();
        }
        for (int n = 0; n < keys; ++n) {
            __m256 vv[kAccVectors];
            const float* vn = v[n] + c0;
            for (int j = 0; j < kAccVectors; ++j) vv[j] = load(vn + j * kLanes, j);
            for (int i = 0; i < kAccRows; ++i) {
                const __m256 pv = _mm256_broadcast_ss(p + row[i] * p_stride + n);
                for (int j = 0; j < kAccVectors; ++j) a[i][j] = _mm256_fmadd_ps(pv, vv[j], a[i][j]);
            }
        }
        // Per column vector, every row's old value is read before any is written, so a
        // repeated row computes and stores the same value again.
        for (int j = 0; j < kAccVectors; ++j) {
            __m256 sum[kAccRows];
            for (int i = 0; i < kAccRows; ++i) {
                const float* src = acc + row[i] * acc_stride + c0 + j * kLanes;
                sum[i] = _mm256_fmadd_ps(_mm256_set1_ps(alpha[row[i]]), load(src, j), a[i][j]);
            }
            for (int i = 0; i < kAccRows; ++i) {
                float* dst = acc + row[i] * acc_stride + c0 + j * kLanes;
                if (kMasked) {
                    _mm256_maskstore_ps(dst, mask[j], sum[i]);
                } else {
                    _mm256_storeu_ps(dst, sum[i]);
                }
            }
        }
    }
}

MSD_AVX2 void accumulate(const float* p, int64_t p_stride, int rows, const float* const* v,
                         int keys, int64_t d, const float* alpha, float* acc,
                         int64_t acc_stride) {
    constexpr int64_t kChunk = kAccVectors * kLanes;
    int64_t c0 = 0;
    for (; c0 + kChunk <= d; c0 += kChunk) {
        accumulate_chunk<false>(p, p_stride, rows, v, keys, d, c0, alpha, acc, acc_stride);
    }
    if (c0 < d) {
        accumulate_chunk<true>(p, p_stride, rows, v, keys, d, c0, alpha, acc, acc_stride);
    }
}

const AttentionKernels kKernels = {scores, softmax_row, accumulate};

}  // namespace

const AttentionKernels* attention_kernels_avx2() { return &kKernels; }

}  // namespace msd::cpu

#else  // not x86-64 with GCC / Clang: no AVX2 path

namespace msd::cpu {
const AttentionKernels* attention_kernels_avx2() { return nullptr; }
}  // namespace msd::cpu

#endif
