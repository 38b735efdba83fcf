// AVX-512 path of msd_silu_mul_cpu: 16 elements at a time, the same two roundings as the scalar
// path (silu(gate) rounded to dtype, then the product), with exp from a polynomial instead of
// glibc's. Target attributes and linkage as avx512.h says; silu_mul.cpp calls in only on the
// AVX-512 paths of msd_get_cpu_isa.
//
// exp is exp_avx512.h's (within ~2 ulps, like the exps of glibc and of torch's Sleef); the tests
// check the result against torch's F.silu(gate) * up, infinities and NaN included.
#include "cpu/silu_mul.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))

#include "cpu/avx512.h"
#include "cpu/dtype.h"
#include "cpu/exp_avx512.h"
#include "cpu/lanes_avx512.h"

namespace msd::cpu {
namespace {

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
