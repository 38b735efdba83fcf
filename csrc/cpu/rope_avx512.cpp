// AVX-512 head-row function of msd_rope_kv_write_cpu: 16 (d, d + half) pairs at a time with the
// scalar path's roundings (each product and each sum rounded to the dtype on its own), so the
// bits are those of rope_kv_write.cpp and of torch. float32 needs the multiplies and adds kept
// apart: no FMA contraction in this file. Target attributes and linkage as avx512.h says;
// rope_kv_write.cpp calls in only on the AVX-512 paths of msd_get_cpu_isa.
#include "cpu/no_fp_contract.h"  // first: before any arithmetic

#include "cpu/rope.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))

#include "cpu/avx512.h"
#include "cpu/dtype.h"
#include "cpu/lanes_avx512.h"

namespace msd::cpu {
namespace {

template <class D>
MSD_AVX512 void rotate(const void* src, const void* c, const void* s, int64_t half, void* dst) {
    using L = Lanes<D>;
    using T = typename D::T;
    const T* x = static_cast<const T*>(src);
    const T* cs = static_cast<const T*>(c);
    const T* sn = static_cast<const T*>(s);
    T* y = static_cast<T*>(dst);
    for (int64_t d = 0; d < half; d += kLanes) {
        const __mmask16 m = lane_mask(half - d);
        // Both halves are read before either is written: dst may be src.
        const __m512 x1 = L::load(x + d, m);
        const __m512 x2 = L::load(x + half + d, m);
        const __m512 a1 = L::round(_mm512_mul_ps(x1, L::load(cs + d, m)));
        const __m512 b1 = L::round(_mm512_mul_ps(x2, L::load(sn + d, m)));
        const __m512 a2 = L::round(_mm512_mul_ps(x2, L::load(cs + half + d, m)));
        const __m512 b2 = L::round(_mm512_mul_ps(x1, L::load(sn + half + d, m)));
        L::store(y + d, _mm512_sub_ps(a1, b1), m);
        L::store(y + half + d, _mm512_add_ps(a2, b2), m);
    }
}

}  // namespace

RotateFn rope_rotate_avx512(msd_dtype dtype) {
    switch (dtype) {
        case MSD_FLOAT32: return rotate<Float32>;
        case MSD_FLOAT16: return rotate<Float16>;
        case MSD_BFLOAT16: return rotate<BFloat16>;
    }
    return nullptr;
}

}  // namespace msd::cpu

#else  // not x86-64 with GCC / Clang: no AVX-512 path

namespace msd::cpu {
RotateFn rope_rotate_avx512(msd_dtype) { return nullptr; }
}  // namespace msd::cpu

#endif
