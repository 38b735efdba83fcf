// SwiGLU activation, element-wise: grid x strides over columns, grid y over rows (no 64-bit
// division per element); the same two roundings as the CPU kernel (see msd_engine.h).
#include "cuda/common.cuh"

namespace msd::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGridY = 65535;  // CUDA's limit on gridDim.y

template <class D>
__global__ void silu_mul_kernel(const typename D::T* __restrict__ gate_up,
                                typename D::T* __restrict__ out, int64_t rows, int64_t inter,
                                int64_t gate_up_row_stride, int64_t out_row_stride) {
    const int64_t col_step = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
        const typename D::T* gate = gate_up + row * gate_up_row_stride;
        typename D::T* out_row = out + row * out_row_stride;
        for (int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
             col < inter; col += col_step) {
            const float g = D::load(gate[col]);
            // expf, not __expf: the fast intrinsic is off by far more than an ulp for large |g|.
            const float silu = round_to<D>(g / (1.0f + expf(-g)));
            out_row[col] = D::store(silu * D::load(gate[inter + col]));
        }
    }
}

}  // namespace

msd_status silu_mul(const void* gate_up, void* out, int64_t rows, int64_t inter,
                    int64_t gate_up_row_stride, int64_t out_row_stride, msd_dtype dtype,
                    void* stream) {
    const dim3 grid(grid_for((inter + kThreads - 1) / kThreads),
                    static_cast<unsigned>(std::min(rows, kMaxGridY)));
    return dispatch_dtype(dtype, [&](auto tag) {
        using D = decltype(tag);
        using T = typename D::T;
        silu_mul_kernel<D><<<grid, kThreads, 0, as_stream(stream)>>>(
            static_cast<const T*>(gate_up), static_cast<T*>(out), rows, inter,
            gate_up_row_stride, out_row_stride);
        return check_launch("silu_mul_kernel");
    });
}

}  // namespace msd::cuda
