// AVX-512 path of msd_tree_attention_cpu's micro-kernels (see attention.h). Each function has
// its own target attribute and internal linkage, for the reasons given in avx512.h.
// Columns past the last multiple of 16 are handled with masked loads and stores, so a float32
// K/V row is read in place with no access past its head_dim elements.
#include "cpu/attention.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))

#include <algorithm>
#include <cmath>
#include <limits>

#include "cpu/avx512.h"

namespace msd::cpu {
namespace {

constexpr int kLanes = 16;
// scores: 4 query rows x 4 keys of accumulators (16 zmm) + 4 key vectors + 1 query vector.
constexpr int kScoreRows = 4;
constexpr int kScoreKeys = 4;
// accumulate: 4 rows x 4 column vectors (64 columns) of accumulators + 4 value vectors + p.
constexpr int kAccRows = 4;
constexpr int kAccVectors = 4;

MSD_AVX512 inline __mmask16 lanes_mask(int64_t remaining) {
    if (remaining >= kLanes) return 0xffff;
    return remaining <= 0 ? 0 : static_cast<__mmask16>((1u << remaining) - 1u);
}

MSD_AVX512 inline __m256 fold_to_256(__m512 v) {
    const __m256 high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    return _mm256_add_ps(_mm512_castps512_ps256(v), high);
}

// Lane i of the result = the sum of all lanes of v[i].
MSD_AVX512 inline __m128 sum_each(const __m512 v[4]) {
    const __m256 ab = _mm256_hadd_ps(fold_to_256(v[0]), fold_to_256(v[1]));
    const __m256 cd = _mm256_hadd_ps(fold_to_256(v[2]), fold_to_256(v[3]));
    const __m256 abcd = _mm256_hadd_ps(ab, cd);  // per 128-bit half: partial sums of a, b, c, d
    return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

// Partial groups reuse the last valid row / key (computed, never stored): no tail variants.
MSD_AVX512 void scores(const float* q, int64_t q_stride, int rows, const float* const* k,
                       int keys, int64_t d, float* s, int64_t s_stride) {
    for (int m0 = 0; m0 < rows; m0 += kScoreRows) {
        const float* qr[kScoreRows];
        for (int i = 0; i < kScoreRows; ++i) qr[i] = q + std::min(m0 + i, rows - 1) * q_stride;
        for (int n0 = 0; n0 < keys; n0 += kScoreKeys) {
            const float* kr[kScoreKeys];
            for (int j = 0; j < kScoreKeys; ++j) {
                kr[j] = k[std::min(n0 + j, keys - 1)];
            }
            __m512 acc[kScoreRows][kScoreKeys];
            for (int i = 0; i < kScoreRows; ++i)
                for (int j = 0; j < kScoreKeys; ++j) acc[i][j] = _mm512_setzero_ps();
            for (int64_t c = 0; c < d; c += kLanes) {
                const __mmask16 mask = lanes_mask(d - c);
                __m512 kv[kScoreKeys];
                for (int j = 0; j < kScoreKeys; ++j) kv[j] = _mm512_maskz_loadu_ps(mask, kr[j] + c);
                for (int i = 0; i < kScoreRows; ++i) {
                    const __m512 qv = _mm512_maskz_loadu_ps(mask, qr[i] + c);
                    for (int j = 0; j < kScoreKeys; ++j) {
                        acc[i][j] = _mm512_fmadd_ps(qv, kv[j], acc[i][j]);
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

// 2^x for x <= 0 (and -inf, NaN): 2^round(x) * p(x - round(x)), p a degree-6 minimax fit of
// 2^f on [-1/2, 1/2] (relative error < 1 float32 ulp); below 2^-126 the result is exactly 0,
// so masked scores (-inf) weigh nothing.
MSD_AVX512 inline __m512 exp2_nonpositive(__m512 x) {
    const __m512 r = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(x, r);
    __m512 p = _mm512_set1_ps(1.5345764404628426e-04f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3399930903688073e-03f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6184890717267990e-03f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5503286421298980e-02f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022646248340607e-01f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718246459960e-01f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    const __m512 y = _mm512_scalef_ps(p, r);
    const __mmask16 tiny = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-126.0f), _CMP_LT_OQ);
    return _mm512_mask_mov_ps(y, tiny, _mm512_setzero_ps());
}

MSD_AVX512 float softmax_row(float* s, int keys, float* max, float* sum) {
    const float neg_inf = -std::numeric_limits<float>::infinity();
    __m512 block_max = _mm512_set1_ps(neg_inf);
    for (int n = 0; n < keys; n += kLanes) {
        const __m512 v = _mm512_mask_loadu_ps(_mm512_set1_ps(neg_inf), lanes_mask(keys - n), s + n);
        block_max = _mm512_max_ps(block_max, v);
    }
    const float new_max = std::max(*max, _mm512_reduce_max_ps(block_max));
    if (new_max == neg_inf) {
        std::fill(s, s + keys, 0.0f);
        return 1.0f;
    }
    const __m512 shift = _mm512_set1_ps(new_max);
    __m512 total = _mm512_setzero_ps();
    for (int n = 0; n < keys; n += kLanes) {
        const __mmask16 mask = lanes_mask(keys - n);
        const __m512 v = _mm512_mask_loadu_ps(_mm512_set1_ps(neg_inf), mask, s + n);
        const __m512 p = exp2_nonpositive(_mm512_sub_ps(v, shift));  // masked lanes: 0
        _mm512_mask_storeu_ps(s + n, mask, p);
        total = _mm512_add_ps(total, p);
    }
    const float alpha = std::exp2(*max - new_max);
    *sum = *sum * alpha + _mm512_reduce_add_ps(total);
    *max = new_max;
    return alpha;
}

// Columns in chunks of 64 (4 vectors, masked past d), rows in groups of 4 (partial groups reuse
// the last row, stored once); each value row is loaded once per row group. The block's sum
// starts from zero and is added to the rescaled accumulator at the end: summing in two levels
// (64 keys, then blocks) keeps float32's error from growing with every key of a long context.
MSD_AVX512 void accumulate(const float* p, int64_t p_stride, int rows, const float* const* v,
                           int keys, int64_t d, const float* alpha, float* acc,
                           int64_t acc_stride) {
    for (int64_t c0 = 0; c0 < d; c0 += kAccVectors * kLanes) {
        __mmask16 mask[kAccVectors];
        for (int j = 0; j < kAccVectors; ++j) mask[j] = lanes_mask(d - c0 - j * kLanes);
        for (int m0 = 0; m0 < rows; m0 += kAccRows) {
            int row[kAccRows];
            __m512 a[kAccRows][kAccVectors];
            for (int i = 0; i < kAccRows; ++i) {
                row[i] = std::min(m0 + i, rows - 1);
                for (int j = 0; j < kAccVectors; ++j) a[i][j] = _mm512_setzero_ps();
            }
            for (int n = 0; n < keys; ++n) {
                __m512 vv[kAccVectors];
                const float* vn = v[n] + c0;
                for (int j = 0; j < kAccVectors; ++j) {
                    vv[j] = _mm512_maskz_loadu_ps(mask[j], vn + j * kLanes);
                }
                for (int i = 0; i < kAccRows; ++i) {
                    const __m512 pv = _mm512_set1_ps(p[row[i] * p_stride + n]);
                    for (int j = 0; j < kAccVectors; ++j) {
                        a[i][j] = _mm512_fmadd_ps(pv, vv[j], a[i][j]);
                    }
                }
            }
            // Per column vector, every row's old value is read before any is written, so a
            // repeated row computes and stores the same value again.
            for (int j = 0; j < kAccVectors; ++j) {
                __m512 sum[kAccRows];
                for (int i = 0; i < kAccRows; ++i) {
                    const float* src = acc + row[i] * acc_stride + c0 + j * kLanes;
                    sum[i] = _mm512_fmadd_ps(_mm512_set1_ps(alpha[row[i]]),
                                             _mm512_maskz_loadu_ps(mask[j], src), a[i][j]);
                }
                for (int i = 0; i < kAccRows; ++i) {
                    _mm512_mask_storeu_ps(acc + row[i] * acc_stride + c0 + j * kLanes, mask[j],
                                          sum[i]);
                }
            }
        }
    }
}

const AttentionKernels kKernels = {scores, softmax_row, accumulate};

}  // namespace

const AttentionKernels* attention_kernels_avx512() { return &kKernels; }

}  // namespace msd::cpu

#else  // not x86-64 with GCC / Clang: no AVX-512 path

namespace msd::cpu {
const AttentionKernels* attention_kernels_avx512() { return nullptr; }
}  // namespace msd::cpu

#endif
