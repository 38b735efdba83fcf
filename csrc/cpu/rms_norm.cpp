// RMSNorm and fused residual-add + RMSNorm on the CPU, one row at a time (rows in parallel
// when built with OpenMP). Semantics and roundings: see msd_rms_norm_cpu in msd_engine.h.
#include <cmath>

#include "cpu/dtype.h"

namespace msd::cpu {
namespace {

// The float32 sum of squares is accumulated in double: the mean then has no accumulation
// error worth the name, whatever the row length.
template <class D>
float inverse_rms(const typename D::T* row, int64_t dim, float eps) {
    double sum_squares = 0.0;
    for (int64_t j = 0; j < dim; ++j) {
        const float v = D::load(row[j]);
        sum_squares += static_cast<double>(v * v);
    }
    const float mean = static_cast<float>(sum_squares / static_cast<double>(dim));
    return 1.0f / std::sqrt(mean + eps);
}

// out = weight * round_dtype(x * inv_rms), the product rounded to dtype as torch does it.
template <class D>
void normalize_row(const typename D::T* x, const typename D::T* weight, typename D::T* out,
                   int64_t dim, float inv_rms) {
    for (int64_t j = 0; j < dim; ++j) {
        const float h = round_to<D>(D::load(x[j]) * inv_rms);
        out[j] = D::store(D::load(weight[j]) * h);
    }
}

// r[j] = round_dtype(r[j] + x[j]): `residual += x` in dtype.
template <class D>
void add_row(const typename D::T* x, typename D::T* r, int64_t dim) {
    for (int64_t j = 0; j < dim; ++j) r[j] = D::store(D::load(r[j]) + D::load(x[j]));
}

template <class D>
void rms_norm_rows(const void* x, const void* weight, void* out, int64_t rows, int64_t dim,
                   int64_t x_row_stride, int64_t out_row_stride, float eps) {
    using T = typename D::T;
    const T* xs = static_cast<const T*>(x);
    const T* w = static_cast<const T*>(weight);
    T* os = static_cast<T*>(out);
#pragma omp parallel for schedule(static) if (rows * dim >= (1 << 16))
    for (int64_t i = 0; i < rows; ++i) {
        const T* row = xs + i * x_row_stride;
        normalize_row<D>(row, w, os + i * out_row_stride, dim, inverse_rms<D>(row, dim, eps));
    }
}

template <class D>
void add_rms_norm_rows(const void* x, void* residual, const void* weight, void* out, int64_t rows,
                       int64_t dim, int64_t x_row_stride, int64_t residual_row_stride,
                       int64_t out_row_stride, float eps) {
    using T = typename D::T;
    const T* xs = static_cast<const T*>(x);
    T* rs = static_cast<T*>(residual);
    const T* w = static_cast<const T*>(weight);
    T* os = static_cast<T*>(out);
#pragma omp parallel for schedule(static) if (rows * dim >= (1 << 16))
    for (int64_t i = 0; i < rows; ++i) {
        const T* x_row = xs + i * x_row_stride;
        T* r_row = rs + i * residual_row_stride;
        add_row<D>(x_row, r_row, dim);
        normalize_row<D>(r_row, w, os + i * out_row_stride, dim, inverse_rms<D>(r_row, dim, eps));
    }
}

}  // namespace

msd_status rms_norm(const void* x, const void* weight, void* out, int64_t rows, int64_t dim,
                    int64_t x_row_stride, int64_t out_row_stride, float eps, msd_dtype dtype) {
    return dispatch_dtype(dtype, [&](auto tag) {
        rms_norm_rows<decltype(tag)>(x, weight, out, rows, dim, x_row_stride, out_row_stride, eps);
    });
}

msd_status add_rms_norm(const void* x, void* residual, const void* weight, void* out,
                        int64_t rows, int64_t dim, int64_t x_row_stride,
                        int64_t residual_row_stride, int64_t out_row_stride, float eps,
                        msd_dtype dtype) {
    return dispatch_dtype(dtype, [&](auto tag) {
        add_rms_norm_rows<decltype(tag)>(x, residual, weight, out, rows, dim, x_row_stride,
                                         residual_row_stride, out_row_stride, eps);
    });
}

msd_status add_residual(const void* x, void* residual, int64_t rows, int64_t dim,
                        int64_t x_row_stride, int64_t residual_row_stride, msd_dtype dtype) {
    return dispatch_dtype(dtype, [&](auto tag) {
        using D = decltype(tag);
        using T = typename D::T;
        for (int64_t i = 0; i < rows; ++i) {
            add_row<D>(static_cast<const T*>(x) + i * x_row_stride,
                       static_cast<T*>(residual) + i * residual_row_stride, dim);
        }
    });
}

}  // namespace msd::cpu
