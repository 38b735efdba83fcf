// SwiGLU activation on the CPU: out = silu(gate) * up with the two roundings of
// `F.silu(gate) * up` evaluated in dtype (see msd_silu_mul_cpu in msd_engine.h). The AVX-512
// paths of msd_get_cpu_isa use silu_mul_avx512.cpp; the others the scalar loop here.
#include <algorithm>
#include <cmath>

#include "cpu/dtype.h"
#include "cpu/silu_mul.h"
#include "cpu/thread_pool.h"

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

// Several rows of the AVX-512 path go one row per chunk to the calling thread and the pool's
// awake workers (a verified tree's 6-10 rows of 1536: ~1.2 us each). Each element is computed the
// same way whichever thread takes its row.
constexpr int64_t kMinParallelElements = 4096;
constexpr int kMaxThreads = 256;  // as linear's and attention's

struct RowsJob {
    SiluMulFn fn;
    const unsigned char* gate_up;
    unsigned char* out;
    int64_t inter, gate_up_row_stride, out_row_stride, bytes;
};

void run_row(void* context, int64_t row) {
    const RowsJob& job = *static_cast<const RowsJob*>(context);
    job.fn(job.gate_up + row * job.gate_up_row_stride * job.bytes, job.out + row * job.out_row_stride * job.bytes,
           1, job.inter, job.gate_up_row_stride, job.out_row_stride);
}

}  // namespace

msd_status silu_mul(const void* gate_up, void* out, int64_t rows, int64_t inter,
                    int64_t gate_up_row_stride, int64_t out_row_stride, msd_dtype dtype) {
    if (isa_has_avx512(get_isa())) {
        if (const SiluMulFn fn = silu_mul_avx512(dtype)) {
            if (rows < 2 || rows * inter < kMinParallelElements) {
                fn(gate_up, out, rows, inter, gate_up_row_stride, out_row_stride);
                return MSD_OK;
            }
            RowsJob job{fn, static_cast<const unsigned char*>(gate_up), static_cast<unsigned char*>(out), inter,
                        gate_up_row_stride, out_row_stride, dtype_bytes(dtype)};
            run_chunks(std::min(hardware_threads(), kMaxThreads), rows, false, run_row, &job);
            return MSD_OK;
        }
    }
    return dispatch_dtype(dtype, [&](auto tag) {
        silu_mul_rows<decltype(tag)>(gate_up, out, rows, inter, gate_up_row_stride,
                                     out_row_stride);
    });
}

}  // namespace msd::cpu
