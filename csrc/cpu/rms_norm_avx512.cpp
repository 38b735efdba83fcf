// AVX-512 row functions of the CPU RMSNorm kernels, 16 elements at a time, bit for bit those of
// rms_norm.cpp: the squares are float32 products widened to double and summed in the same
// kSumLanes = 16 partial sums (lanes 0-7 in one vector, 8-15 in another), combined in the same
// pairwise order; the scaling and the residual add are elementwise with the same roundings.
// Target attributes and linkage as avx512.h says; rms_norm.cpp calls in only on the AVX-512
// paths of msd_get_cpu_isa. No FMA contraction here (no multiply feeds an add of the same type
// today; a later edit must not fuse one silently).
#include "cpu/no_fp_contract.h"  // first: before any arithmetic

#include "cpu/rms_norm.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))

#include <cmath>

#include "cpu/avx512.h"
#include "cpu/dtype.h"
#include "cpu/lanes_avx512.h"

namespace msd::cpu {
namespace {

static_assert(kSumLanes == kLanes, "one partial sum per lane of a 16-lane vector");

template <class D>
MSD_AVX512 float inverse_rms(const void* x, int64_t dim, float eps) {
    using L = Lanes<D>;
    const typename D::T* row = static_cast<const typename D::T*>(x);
    __m512d low = _mm512_setzero_pd();   // partial sums of lanes 0-7
    __m512d high = _mm512_setzero_pd();  // lanes 8-15
    for (int64_t j = 0; j < dim; j += kLanes) {
        const __m512 v = L::load(row + j, lane_mask(dim - j));  // masked lanes add +0.0
        const __m512 squares = _mm512_mul_ps(v, v);
        low = _mm512_add_pd(low, _mm512_cvtps_pd(_mm512_castps512_ps256(squares)));
        high = _mm512_add_pd(high, _mm512_cvtps_pd(_mm256_castpd_ps(
                                       _mm512_extractf64x4_pd(_mm512_castps_pd(squares), 1))));
    }
    const __m512d eight = _mm512_add_pd(low, high);  // partial[k] += partial[k + 8]
    const __m256d four = _mm256_add_pd(_mm512_castpd512_pd256(eight),
                                       _mm512_extractf64x4_pd(eight, 1));
    const __m128d two = _mm_add_pd(_mm256_castpd256_pd128(four), _mm256_extractf128_pd(four, 1));
    const double sum = _mm_cvtsd_f64(_mm_add_sd(two, _mm_unpackhi_pd(two, two)));
    const float mean = static_cast<float>(sum / static_cast<double>(dim));
    return 1.0f / std::sqrt(mean + eps);
}

template <class D>
MSD_AVX512 void normalize_row(const void* x, const void* weight, void* out, int64_t dim,
                              float inv_rms) {
    using L = Lanes<D>;
    using T = typename D::T;
    const T* xs = static_cast<const T*>(x);
    const T* w = static_cast<const T*>(weight);
    T* o = static_cast<T*>(out);
    const __m512 scale = _mm512_set1_ps(inv_rms);
    for (int64_t j = 0; j < dim; j += kLanes) {
        const __mmask16 m = lane_mask(dim - j);
        const __m512 h = L::round(_mm512_mul_ps(L::load(xs + j, m), scale));
        L::store(o + j, _mm512_mul_ps(L::load(w + j, m), h), m);
    }
}

template <class D>
MSD_AVX512 void add_row(const void* x, void* residual, int64_t dim) {
    using L = Lanes<D>;
    using T = typename D::T;
    const T* xs = static_cast<const T*>(x);
    T* r = static_cast<T*>(residual);
    for (int64_t j = 0; j < dim; j += kLanes) {
        const __mmask16 m = lane_mask(dim - j);
        L::store(r + j, _mm512_add_ps(L::load(r + j, m), L::load(xs + j, m)), m);
    }
}

}  // namespace

bool norm_rows_avx512(msd_dtype dtype, NormRowKernels* kernels) {
    switch (dtype) {
        case MSD_FLOAT32:
            *kernels = {inverse_rms<Float32>, normalize_row<Float32>, add_row<Float32>};
            return true;
        case MSD_FLOAT16:
            *kernels = {inverse_rms<Float16>, normalize_row<Float16>, add_row<Float16>};
            return true;
        case MSD_BFLOAT16:
            *kernels = {inverse_rms<BFloat16>, normalize_row<BFloat16>, add_row<BFloat16>};
            return true;
    }
    return false;
}

}  // namespace msd::cpu

#else  // not x86-64 with GCC / Clang: no AVX-512 path

namespace msd::cpu {
bool norm_rows_avx512(msd_dtype, NormRowKernels*) { return false; }
}  // namespace msd::cpu

#endif
