// Horizontal sums of many 16-lane float32 accumulators at once, for the linear kernels' register
// blocks: include after avx512.h, inside the x86-64 GCC / Clang block (see avx512.h).
//
// Each accumulator is summed by the pairing tree of _mm512_reduce_add_ps (lane j with lane j + 8,
// then j + 4, j + 2, j + 1), so every sum is bit for bit what that intrinsic gives: a float add
// is commutative, and the tree's pairs are the same. But 16 accumulators are transposed into one
// vector as they are summed, ~3 instructions each instead of ~8. Measured on a 2-core Xeon without
// AMX, one thread, weights [64, 576] in L1, m = 16, medians of 5 runs: float32 10.1 -> 9.1 us,
// bfloat16 (vdpbf16ps) 17.2 -> 15.8 us. Blocks of fewer than 8 accumulators keep the intrinsic.
#pragma once

namespace msd::cpu {
namespace {

// Rounds a count of accumulators up to whole vectors of 16 sums.
constexpr int reduced_size(int n) { return (n + 15) / 16 * 16; }

// sums[j] = the 16-lane sum of acc[j] for j < 16 (acc[j] for j >= N read as zero vectors).
template <int N>
MSD_AVX512 inline __attribute__((always_inline)) void reduce_16(const __m512* acc, float* sums) {
    static_assert(N >= 1 && N <= 16, "one vector of sums");
    __m512 half[8];  // [A's j + (j+8) | B's] for the pairs (2p, 2p+1)
    for (int p = 0; p < 8; ++p) {
        const __m512 a = 2 * p < N ? acc[2 * p] : _mm512_setzero_ps();
        const __m512 b = 2 * p + 1 < N ? acc[2 * p + 1] : _mm512_setzero_ps();
        half[p] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 2, 3, 2)),
                                _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(1, 0, 1, 0)));
    }
    __m512 quarter[4];  // 128-bit lane q: accumulator 4p + q's j + (j+4)
    for (int p = 0; p < 4; ++p) {
        const __m512 a = half[2 * p], b = half[2 * p + 1];
        quarter[p] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 1, 3, 1)),
                                   _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(2, 0, 2, 0)));
    }
    __m512 pairs[2];  // lane q: [acc 8p+q's j + (j+2) for j = 0, 1 | acc 8p+4+q's]
    for (int p = 0; p < 2; ++p) {
        const __m512d a = _mm512_castps_pd(quarter[2 * p]), b = _mm512_castps_pd(quarter[2 * p + 1]);
        pairs[p] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                                 _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    // Lane 4 q + s holds accumulator 4 s + q's sum; the permutation puts sum j in lane j.
    const __m512 mixed =
        _mm512_add_ps(_mm512_shuffle_ps(pairs[0], pairs[1], _MM_SHUFFLE(2, 0, 2, 0)),
                      _mm512_shuffle_ps(pairs[0], pairs[1], _MM_SHUFFLE(3, 1, 3, 1)));
    const __m512i order = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
    _mm512_storeu_ps(sums, _mm512_permutexvar_ps(order, mixed));
}

// sums[j] = the 16-lane sum of acc[j] for j < N; `sums` has room for reduced_size(N) floats.
template <int N>
MSD_AVX512 inline __attribute__((always_inline)) void reduce_add_many(const __m512* acc,
                                                                      float* sums) {
    if constexpr (N < 8) {
        // A one-row block (decoding): padding to 16 cost more than it saved (bfloat16 lm_head from
        // DRAM, m = 1, 2 threads: 2047 -> 2300 us, medians of 12); the intrinsic pairs lanes alike.
        for (int j = 0; j < N; ++j) sums[j] = _mm512_reduce_add_ps(acc[j]);
    } else if constexpr (N > 16) {
        reduce_16<16>(acc, sums);
        reduce_add_many<N - 16>(acc + 16, sums + 16);
    } else {
        reduce_16<N>(acc, sums);
    }
}

}  // namespace
}  // namespace msd::cpu
