// RMSNorm and fused residual-add + RMSNorm: one block per row (grid-strided), float32
// accumulation, the same two roundings as the CPU kernels (see msd_engine.h).
#include "cuda/common.cuh"

namespace msd::cuda {
namespace {

// Each thread re-reads in the second pass exactly the elements it read (and, in the fused
// kernel, wrote) in the first, so `out` may be `x`: hence no __restrict__ on those two.
template <class D>
__global__ void rms_norm_kernel(const typename D::T* x,
                                const typename D::T* __restrict__ weight, typename D::T* out,
                                int64_t rows, int64_t dim, int64_t x_row_stride,
                                int64_t out_row_stride, float eps) {
    for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
        const typename D::T* x_row = x + row * x_row_stride;
        typename D::T* out_row = out + row * out_row_stride;
        float sum_squares = 0.0f;
        for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) {
            const float v = D::load(x_row[j]);
            sum_squares += v * v;
        }
        const float inv_rms = 1.0f / sqrtf(block_sum(sum_squares) / static_cast<float>(dim) + eps);
        for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) {
            const float h = round_to<D>(D::load(x_row[j]) * inv_rms);
            out_row[j] = D::store(D::load(weight[j]) * h);
        }
    }
}

template <class D>
__global__ void add_rms_norm_kernel(const typename D::T* x, typename D::T* __restrict__ residual,
                                    const typename D::T* __restrict__ weight, typename D::T* out,
                                    int64_t rows, int64_t dim, int64_t x_row_stride,
                                    int64_t residual_row_stride, int64_t out_row_stride, float eps) {
    for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
        const typename D::T* x_row = x + row * x_row_stride;
        typename D::T* r_row = residual + row * residual_row_stride;
        typename D::T* out_row = out + row * out_row_stride;
        float sum_squares = 0.0f;
        for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) {
            const typename D::T r = D::store(D::load(r_row[j]) + D::load(x_row[j]));
            r_row[j] = r;
            const float v = D::load(r);
            sum_squares += v * v;
        }
        const float inv_rms = 1.0f / sqrtf(block_sum(sum_squares) / static_cast<float>(dim) + eps);
        for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) {
            const float h = round_to<D>(D::load(r_row[j]) * inv_rms);
            out_row[j] = D::store(D::load(weight[j]) * h);
        }
    }
}

// About four elements per thread, whole warps, at most 1024 threads.
unsigned threads_for(int64_t dim) {
    const int64_t warps = (dim + 4 * kWarp - 1) / (4 * kWarp);
    return static_cast<unsigned>(kWarp * std::min<int64_t>(std::max<int64_t>(warps, 1), 32));
}

}  // namespace

msd_status rms_norm(const void* x, const void* weight, void* out, int64_t rows, int64_t dim,
                    int64_t x_row_stride, int64_t out_row_stride, float eps, msd_dtype dtype,
                    void* stream) {
    return dispatch_dtype(dtype, [&](auto tag) {
        using D = decltype(tag);
        using T = typename D::T;
        rms_norm_kernel<D><<<grid_for(rows), threads_for(dim), 0, as_stream(stream)>>>(
            static_cast<const T*>(x), static_cast<const T*>(weight), static_cast<T*>(out), rows,
            dim, x_row_stride, out_row_stride, eps);
        return check_launch("rms_norm_kernel");
    });
}

msd_status add_rms_norm(const void* x, void* residual, const void* weight, void* out,
                        int64_t rows, int64_t dim, int64_t x_row_stride,
                        int64_t residual_row_stride, int64_t out_row_stride, float eps,
                        msd_dtype dtype, void* stream) {
    return dispatch_dtype(dtype, [&](auto tag) {
        using D = decltype(tag);
        using T = typename D::T;
        add_rms_norm_kernel<D><<<grid_for(rows), threads_for(dim), 0, as_stream(stream)>>>(
            static_cast<const T*>(x), static_cast<T*>(residual), static_cast<const T*>(weight),
            static_cast<T*>(out), rows, dim, x_row_stride, residual_row_stride, out_row_stride,
            eps);
        return check_launch("add_rms_norm_kernel");
    });
}

}  // namespace msd::cuda
