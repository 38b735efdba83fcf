// SwiGLU activation on the CPU: out = silu(gate) * up with the two roundings of
// `F.silu(gate) * up` evaluated in dtype (see msd_silu_mul_cpu in msd_engine.h). The AVX-512
// paths of msd_get_cpu_isa use silu_mul_avx512.cpp; the others the scalar loop here.
#include <cmath>

#include "cpu/dtype.h"
#include "cpu/silu_mul.h"

namespace msd::cpu {
namespace {

template <class D>
void silu_mul_rows(const void* gate_up, void* out, int64_t rows, int64_t inter,
                   int64_t gate_up_row_stride, int64_t out_row_stride) {
    using T = typename D::T;
    const T* in = static_cast<const T*>(gate_up);
    T* os = static_cast<T*>(out);
#pragma omp parallel for schedule(static) if (rows * inter >= (1 << 16))
    for (int64_t i = 0; i < rows; ++i) {
        const T* gate = in + i * gate_up_row_stride;
        const T* up = gate + inter;
        T* o = os + i * out_row_stride;
        for (int64_t j = 0; j < inter; ++j) {
            const float g = D::load(gate[j]);
            // torch's silu formula, x / (1 + exp(-x)), rounded to dtype before the product.
            const float silu = round_to<D>(g / (1.0f + std::exp(-g)));
            o[j] = D::store(silu * D::load(up[j]));
        }
    }
}

}  // namespace

msd_status silu_mul(const void* gate_up, void* out, int64_t rows, int64_t inter,
                    int64_t gate_up_row_stride, int64_t out_row_stride, msd_dtype dtype) {
    if (isa_has_avx512(get_isa())) {
        if (const SiluMulFn fn = silu_mul_avx512(dtype)) {
            fn(gate_up, out, rows, inter, gate_up_row_stride, out_row_stride);
            return MSD_OK;
        }
    }
    return dispatch_dtype(dtype, [&](auto tag) {
        silu_mul_rows<decltype(tag)>(gate_up, out, rows, inter, gate_up_row_stride,
                                     out_row_stride);
    });
}

}  // namespace msd::cpu
