// Shared by the CUDA kernels: storage traits, dtype dispatch, reductions and error checks.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "internal.h"

namespace msd::cuda {

// Storage traits, as in cpu/dtype.h: load() widens to float32, store() rounds to nearest even.
struct Float32 {
    using T = float;
    __device__ static float load(T v) { return v; }
    __device__ static T store(float f) { return f; }
};
struct Float16 {
    using T = __half;
    __device__ static float load(T v) { return __half2float(v); }
    __device__ static T store(float f) { return __float2half_rn(f); }
};
struct BFloat16 {
    using T = __nv_bfloat16;
    __device__ static float load(T v) { return __bfloat162float(v); }
    __device__ static T store(float f) { return __float2bfloat16_rn(f); }
};

template <class D>
__device__ inline float round_to(float f) {
    return D::load(D::store(f));
}

template <class Kernel>
msd_status dispatch_dtype(msd_dtype dtype, Kernel&& kernel) {
    switch (dtype) {
        case MSD_FLOAT32: return kernel(Float32{});
        case MSD_FLOAT16: return kernel(Float16{});
        case MSD_BFLOAT16: return kernel(BFloat16{});
    }
    return set_error(MSD_ERR_UNSUPPORTED_DTYPE, "dtype %d is not a msd_dtype",
                     static_cast<int>(dtype));
}

// After every launch: a bad configuration or an earlier asynchronous fault surfaces here.
inline msd_status check_launch(const char* kernel) {
    const cudaError_t error = cudaGetLastError();
    if (error == cudaSuccess) return MSD_OK;
    return set_error(MSD_ERR_CUDA, "%s launch failed: %s (%s)", kernel, cudaGetErrorName(error),
                     cudaGetErrorString(error));
}

inline cudaStream_t as_stream(void* stream) { return static_cast<cudaStream_t>(stream); }

// Blocks are whole warps; grids stride over rows so that any row count fits one launch.
constexpr int kWarp = 32;
constexpr int64_t kMaxGrid = 1 << 20;

inline unsigned grid_for(int64_t units) {
    return static_cast<unsigned>(std::min<int64_t>(units, kMaxGrid));
}

__device__ inline float warp_sum(float v) {
    for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// Sum over the block, returned to every thread. Safe to call once per loop iteration: the
// second barrier keeps the next call's writes behind this call's reads.
__device__ inline float block_sum(float v) {
    __shared__ float warp_sums[kWarp];
    __shared__ float total;
    const int lane = threadIdx.x % kWarp;
    const int warp = threadIdx.x / kWarp;
    v = warp_sum(v);
    if (lane == 0) warp_sums[warp] = v;
    __syncthreads();
    if (warp == 0) {
        const int warps = blockDim.x / kWarp;
        v = warp_sum(lane < warps ? warp_sums[lane] : 0.0f);
        if (lane == 0) total = v;
    }
    __syncthreads();
    return total;
}

}  // namespace msd::cuda
