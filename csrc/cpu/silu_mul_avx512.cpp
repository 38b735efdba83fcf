// AVX-512 path of msd_silu_mul_cpu: 16 elements at a time, the same two roundings as the scalar
// path (silu(gate) rounded to dtype, then the product), with exp from a polynomial instead of
// glibc's. Target attributes and linkage as avx512.h says; silu_mul.cpp calls in only on the
// AVX-512 paths of msd_get_cpu_isa.
//
// exp(x) = 2^n * e^r with x first clamped to [-104, 88.8] (outside it exp is 0 or inf in float32),
// n = round(x / ln 2) and r = x - n ln 2 (ln 2 split in two so that r is exact to float32
// precision), e^r by its degree-7 Taylor polynomial on |r| <= ln2 / 2 (truncation < 5e-9 relative,
// under a tenth of a float32 ulp), and 2^n applied by vscalefps, which gives 0 and inf past
// float32's range. So exp is within ~2 ulps of the true value (0 / inf at the ends, NaN for NaN),
// like the exps of glibc and of torch (Sleef); the tests check the result against torch's
// F.silu(gate) * up, infinities and NaN included.
#include "cpu/silu_mul.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))

#include "cpu/avx512.h"
#include "cpu/dtype.h"
#include "cpu/lanes_avx512.h"

namespace msd::cpu {
namespace {

MSD_AVX512 inline __m512 exp_ps(__m512 x) {
    // exp underflows to 0 below -104 and overflows to inf above 88.8: clamping there keeps n and r
    // finite for every input (inf and huge values included), and keeps NaN (MAXPS / MINPS return
    // their second operand when one is NaN).
    x = _mm512_min_ps(_mm512_set1_ps(88.8f), _mm512_max_ps(_mm512_set1_ps(-104.0f), x));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860682030941723212e-6f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    // NaN x: n and r are NaN, and so is the result.
    return _mm512_scalef_ps(p, n);
}

template <class D>
MSD_AVX512 void rows(const void* gate_up, void* out, int64_t rows, int64_t inter,
                     int64_t gate_up_row_stride, int64_t out_row_stride) {
    using T = typename D::T;
    using L = Lanes<D>;
    for (int64_t i = 0; i < rows; ++i) {
        const T* gate = static_cast<const T*>(gate_up) + i * gate_up_row_stride;
        const T* up = gate + inter;
        T* o = static_cast<T*>(out) + i * out_row_stride;
        for (int64_t j = 0; j < inter; j += kLanes) {
            const __mmask16 m = lane_mask(inter - j);
            const __m512 g = L::load(gate + j, m);
            // torch's silu formula, x / (1 + exp(-x)), rounded to dtype before the product.
            const __m512 e = exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g));
            const __m512 silu = L::round(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e)));
            L::store(o + j, _mm512_mul_ps(silu, L::load(up + j, m)), m);
        }
    }
}

}  // namespace

SiluMulFn silu_mul_avx512(msd_dtype dtype) {
    switch (dtype) {
        case MSD_FLOAT32: return rows<Float32>;
        case MSD_FLOAT16: return rows<Float16>;
        case MSD_BFLOAT16: return rows<BFloat16>;
    }
    return nullptr;
}

}  // namespace msd::cpu

#else  // not x86-64 with GCC / Clang: no AVX-512 path

namespace msd::cpu {
SiluMulFn silu_mul_avx512(msd_dtype) { return nullptr; }
}  // namespace msd::cpu

#endif
