// RMSNorm and fused residual-add + RMSNorm on the CPU, one row at a time (rows in parallel
// when built with OpenMP). Semantics and roundings: see msd_rms_norm_cpu in msd_engine.h. The
// AVX-512 paths of msd_get_cpu_isa use rms_norm_avx512.cpp's row functions, which give the
// scalar ones' bits (rms_norm.h).
#include <cmath>

#include "cpu/dtype.h"
#include "cpu/rms_norm.h"

namespace msd::cpu {
namespace {

// The float32 squares are summed in double, so the mean has no accumulation error worth the
// name whatever the row length; in kSumLanes partial sums (lane j % kSumLanes) combined pairwise,
// the order the AVX-512 path's vectors take.
template <class D>
float inverse_rms(const void* x, int64_t dim, float eps) {
    const typename D::T* row = static_cast<const typename D::T*>(x);
    double partial[kSumLanes] = {};
    for (int64_t j = 0; j < dim; ++j) {
        const float v = D::load(row[j]);
        partial[j % kSumLanes] += static_cast<double>(v * v);
    }
    for (int width = kSumLanes / 2; width > 0; width /= 2) {
        for (int k = 0; k < width; ++k) partial[k] += partial[k + width];
    }
    const float mean = static_cast<float>(partial[0] / static_cast<double>(dim));
    return 1.0f / std::sqrt(mean + eps);
}

// out = weight * round_dtype(x * inv_rms), the product rounded to dtype as torch does it.
template <class D>
void normalize_row(const void* x, const void* weight, void* out, int64_t dim, float inv_rms) {
    using T = typename D::T;
    const T* xs = static_cast<const T*>(x);
    const T* w = static_cast<const T*>(weight);
    T* o = static_cast<T*>(out);
    for (int64_t j = 0; j < dim; ++j) {
        const float h = round_to<D>(D::load(xs[j]) * inv_rms);
        o[j] = D::store(D::load(w[j]) * h);
    }
}

// r[j] = round_dtype(r[j] + x[j]): `residual += x` in dtype.
template <class D>
void add_row(const void* x, void* residual, int64_t dim) {
    using T = typename D::T;
    const T* xs = static_cast<const T*>(x);
    T* r = static_cast<T*>(residual);
    for (int64_t j = 0; j < dim; ++j) r[j] = D::store(D::load(r[j]) + D::load(xs[j]));
}

// The row functions for dtype on the current SIMD path (an error for a dtype that is none).
msd_status row_kernels(msd_dtype dtype, NormRowKernels* kernels) {
    if (isa_has_avx512(get_isa()) && norm_rows_avx512(dtype, kernels)) return MSD_OK;
    return dispatch_dtype(dtype, [&](auto tag) {
        using D = decltype(tag);
        *kernels = {inverse_rms<D>, normalize_row<D>, add_row<D>};
    });
}

const uint8_t* row_at(const void* base, int64_t row, int64_t stride, int64_t bytes) {
    return static_cast<const uint8_t*>(base) + row * stride * bytes;
}

uint8_t* row_at(void* base, int64_t row, int64_t stride, int64_t bytes) {
    return static_cast<uint8_t*>(base) + row * stride * bytes;
}

}  // namespace

msd_status rms_norm(const void* x, const void* weight, void* out, int64_t rows, int64_t dim,
                    int64_t x_row_stride, int64_t out_row_stride, float eps, msd_dtype dtype) {
    NormRowKernels k;
    if (const msd_status status = row_kernels(dtype, &k); status != MSD_OK) return status;
    const int64_t bytes = dtype_bytes(dtype);
#pragma omp parallel for schedule(static) if (rows * dim >= (1 << 16))
    for (int64_t i = 0; i < rows; ++i) {
        const uint8_t* row = row_at(x, i, x_row_stride, bytes);
        k.normalize(row, weight, row_at(out, i, out_row_stride, bytes), dim,
                    k.inverse_rms(row, dim, eps));
    }
    return MSD_OK;
}

msd_status add_rms_norm(const void* x, void* residual, const void* weight, void* out,
                        int64_t rows, int64_t dim, int64_t x_row_stride,
                        int64_t residual_row_stride, int64_t out_row_stride, float eps,
                        msd_dtype dtype) {
    NormRowKernels k;
    if (const msd_status status = row_kernels(dtype, &k); status != MSD_OK) return status;
    const int64_t bytes = dtype_bytes(dtype);
#pragma omp parallel for schedule(static) if (rows * dim >= (1 << 16))
    for (int64_t i = 0; i < rows; ++i) {
        uint8_t* r_row = row_at(residual, i, residual_row_stride, bytes);
        k.add(row_at(x, i, x_row_stride, bytes), r_row, dim);
        k.normalize(r_row, weight, row_at(out, i, out_row_stride, bytes), dim,
                    k.inverse_rms(r_row, dim, eps));
    }
    return MSD_OK;
}

msd_status add_residual(const void* x, void* residual, int64_t rows, int64_t dim,
                        int64_t x_row_stride, int64_t residual_row_stride, msd_dtype dtype) {
    NormRowKernels k;
    if (const msd_status status = row_kernels(dtype, &k); status != MSD_OK) return status;
    const int64_t bytes = dtype_bytes(dtype);
    for (int64_t i = 0; i < rows; ++i) {
        k.add(row_at(x, i, x_row_stride, bytes), row_at(residual, i, residual_row_stride, bytes),
              dim);
    }
    return MSD_OK;
}

}  // namespace msd::cpu
