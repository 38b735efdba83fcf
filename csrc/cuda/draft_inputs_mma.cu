// msd_draft_inputs_cuda on tensor cores: float16 / bfloat16 with every row 16-byte aligned, on
// sm_80+. A block is 4 warps, 32 output columns (fc_weight rows) x BM rows (16, 32 or 64 by T).
// x and weight tiles of 128 inputs go through a 3-4 stage cp.async pipeline (about 24 KiB of
// weights in flight per block; x is gathered chunk by chunk from embed / image_rows / features
// straight into its tile), and the warps multiply them with wmma 16x16x16 into float32
// accumulators: warp w takes row group w % (BM / 16) and, when there are fewer row groups than
// warps, every (4 / groups)-th k-step of a tile; the epilogue adds those partial sums.
#include <mma.h>

#include "cuda/draft_inputs.cuh"

namespace msd::cuda::draft {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int kMmaThreads = 128;
constexpr int kMmaWarps = kMmaThreads / kWarp;
constexpr int kMmaK = 128;               // inputs per pipeline stage
constexpr int kMmaChunks = kMmaK / 8;    // 16-byte chunks per staged row
constexpr int kMmaLd = kMmaK + 8;        // staged row length: +16 bytes staggers the banks
constexpr int kOutLd = kColumns + 4;     // float32 accumulators in the epilogue
constexpr int kMmaStaticBytes = 2048;    // bound on the kernel's static shared memory

template <int BM>
__host__ __device__ constexpr int mma_stages() {
    return BM >= 64 ? 3 : 4;  // keeps every shape within 99 KiB (sm_86/89's opt-in limit)
}

template <int BM>
__host__ __device__ constexpr int mma_smem_bytes() {
    return mma_stages<BM>() * (BM + kColumns) * kMmaLd * 2;
}

__device__ inline void cp_async16(void* smem, const void* global) {
    const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(address), "l"(global));
}

__device__ inline void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int PENDING>
__device__ inline void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING) : "memory");
}

// BM rows (16, 32 or 64) x 32 columns per block; the row groups of 16 are spread over the warps
// and, when there are fewer groups than warps, the k-steps of each stage too.
template <class D, int BM>
__global__ void __launch_bounds__(kMmaThreads) draft_inputs_mma_kernel(const DraftInputs a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    __trap();  // cp.async and bfloat16 fragments need sm_80; the host never launches this here
#else
    using T = typename D::T;
    constexpr int kStages = mma_stages<BM>();
    constexpr int kRowGroups = BM / 16;
    constexpr int kKGroups = kMmaWarps / kRowGroups;
    constexpr int kStageElements = (BM + kColumns) * kMmaLd;
    static_assert(kMmaWarps % kRowGroups == 0, "whole row groups per warp");
    static_assert(BM * kKGroups * kOutLd * 4 <= mma_smem_bytes<BM>(), "epilogue fits the stages");
    extern __shared__ __align__(128) unsigned char smem[];
    __shared__ const T* src[BM];
    __shared__ const T* feat[BM];
    __shared__ int kind[BM];

    const int warp = threadIdx.x / kWarp;
    const int row_group = warp % kRowGroups;
    const int k_group = warp / kRowGroups;
    const int64_t row0 = static_cast<int64_t>(blockIdx.x) * BM;
    const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kColumns;
    const int64_t width = 2 * a.hidden;
    const T* weight = static_cast<const T*>(a.fc_weight);
    T* stages = reinterpret_cast<T*>(smem);
    const int any_fc = describe_rows<T, BM>(a, row0, src, feat, kind);
    // Warp-uniform: wmma calls are collective.
    const bool active = any_fc && row0 + row_group * 16 < a.rows;

    // x[row0 + i, k0 : k0 + kMmaK] and fc_weight[n0 + r, k0 : k0 + kMmaK] into stage `stage`, in
    // 16-byte chunks (hidden % 8 == 0: a chunk lies within one half of x); zeros past the ends.
    auto load_stage = [&](int stage, int64_t k0) {
        T* xs = stages + stage * kStageElements;
        T* ws = xs + BM * kMmaLd;
        for (int c = threadIdx.x; c < BM * kMmaChunks; c += kMmaThreads) {
            const int i = c / kMmaChunks;
            const int64_t k = k0 + (c % kMmaChunks) * 8;
            T* dst = xs + i * kMmaLd + (c % kMmaChunks) * 8;
            if (kind[i] == kPadding || k >= width) {
                *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
            } else {
                cp_async16(dst, k < a.hidden ? src[i] + k : feat[i] + (k - a.hidden));
            }
        }
        for (int c = threadIdx.x; c < kColumns * kMmaChunks; c += kMmaThreads) {
            const int r = c / kMmaChunks;
            const int64_t k = k0 + (c % kMmaChunks) * 8;
            T* dst = ws + r * kMmaLd + (c % kMmaChunks) * 8;
            if (n0 + r >= a.hidden || k >= width) {
                *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
            } else {
                cp_async16(dst, weight + (n0 + r) * a.fc_weight_row_stride + k);
            }
        }
    };

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
    wmma::fill_fragment(acc[0], 0.0f);
    wmma::fill_fragment(acc[1], 0.0f);
    if (any_fc) {
        const int64_t tiles = (width + kMmaK - 1) / kMmaK;
        // One commit group per tile, empty ones included, so that "tile kt has landed" is
        // always "at most kStages - 2 groups pending" at iteration kt.
        for (int s = 0; s < kStages - 1; ++s) {
            if (s < tiles) load_stage(s, int64_t{s} * kMmaK);
            cp_async_commit();
        }
        for (int64_t kt = 0; kt < tiles; ++kt) {
            cp_async_wait<kStages - 2>();
            __syncthreads();  // tile kt visible to all; everyone is done with tile kt - 1
            const int64_t ahead = kt + kStages - 1;
            if (ahead < tiles) load_stage(static_cast<int>(ahead % kStages), ahead * kMmaK);
            cp_async_commit();
            if (active) {
                const T* xs = stages + (kt % kStages) * kStageElements;
                const T* ws = xs + BM * kMmaLd;
                wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> x_frag;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> w_frag;
#pragma unroll
                for (int ks = k_group; ks < kMmaK / 16; ks += kKGroups) {
                    wmma::load_matrix_sync(x_frag, xs + row_group * 16 * kMmaLd + ks * 16, kMmaLd);
#pragma unroll
                    for (int f = 0; f < 2; ++f) {
                        // Column n of B (16 x 16) is fc_weight row n0 + 16 f + n: col-major.
                        wmma::load_matrix_sync(w_frag, ws + f * 16 * kMmaLd + ks * 16, kMmaLd);
                        wmma::mma_sync(acc[f], x_frag, w_frag, acc[f]);
                    }
                }
            }
        }
    }
    cp_async_wait<0>();
    __syncthreads();  // the stages are free: reuse them for the accumulators
    float* sums = reinterpret_cast<float*>(smem);  // [kKGroups][BM][kOutLd]
    if (active) {
#pragma unroll
        for (int f = 0; f < 2; ++f) {
            wmma::store_matrix_sync(sums + (k_group * BM + row_group * 16) * kOutLd + f * 16,
                                    acc[f], kOutLd, wmma::mem_row_major);
        }
    }
    __syncthreads();
    for (int e = threadIdx.x; e < BM * kColumns; e += kMmaThreads) {
        const int i = e / kColumns;
        const int j = e % kColumns;
        float sum = 0.0f;
        if (kind[i] == kFc) {
#pragma unroll
            for (int g = 0; g < kKGroups; ++g) sum += sums[(g * BM + i) * kOutLd + j];
        }
        finish<D>(a, kind[i], src[i], row0 + i, n0 + j, sum);
    }
#endif
}

msd_status cuda_failure(const char* what, cudaError_t error) {
    cudaGetLastError();  // reported here: must not resurface at the next launch's check
    return set_error(MSD_ERR_CUDA, "%s failed: %s (%s)", what, cudaGetErrorName(error),
                     cudaGetErrorString(error));
}

// Whether the current device can run the mma kernel with `smem_bytes` of dynamic shared memory.
msd_status mma_supported(int smem_bytes, bool* supported) {
    int device = 0, major = 0, optin = 0;
    cudaError_t error = cudaGetDevice(&device);
    if (error == cudaSuccess) {
        error = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    }
    if (error == cudaSuccess) {
        error = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    }
    if (error != cudaSuccess) return cuda_failure("querying the device", error);
    *supported = major >= 8 && smem_bytes + kMmaStaticBytes <= optin;
    return MSD_OK;
}

template <class D, int BM>
msd_status launch_block_rows(const DraftInputs& a, unsigned column_blocks, cudaStream_t stream,
                             bool* launched) {
    constexpr int kBytes = mma_smem_bytes<BM>();
    bool supported = false;
    const msd_status status = mma_supported(kBytes, &supported);
    if (status != MSD_OK || !supported) return status;
    // Per launch rather than once: the attribute is per device, and this is a cheap host call
    // that is legal during stream capture.
    const cudaError_t error = cudaFuncSetAttribute(
        draft_inputs_mma_kernel<D, BM>, cudaFuncAttributeMaxDynamicSharedMemorySize, kBytes);
    if (error != cudaSuccess) return cuda_failure("cudaFuncSetAttribute", error);
    const dim3 grid(static_cast<unsigned>((a.rows + BM - 1) / BM), column_blocks);
    draft_inputs_mma_kernel<D, BM><<<grid, kMmaThreads, kBytes, stream>>>(a);
    *launched = true;
    return check_launch("draft_inputs_mma_kernel");
}

template <class D>
msd_status launch_typed(const DraftInputs& a, unsigned column_blocks, cudaStream_t stream,
                        bool* launched) {
    if (a.rows <= 16) return launch_block_rows<D, 16>(a, column_blocks, stream, launched);
    if (a.rows <= 32) return launch_block_rows<D, 32>(a, column_blocks, stream, launched);
    return launch_block_rows<D, 64>(a, column_blocks, stream, launched);
}

}  // namespace

msd_status launch_mma(const DraftInputs& a, unsigned column_blocks, cudaStream_t stream,
                      bool* launched) {
    *launched = false;
    if (!vector_loads_ok(a, 8)) return MSD_OK;
    if (a.dtype == MSD_FLOAT16) return launch_typed<Float16>(a, column_blocks, stream, launched);
    if (a.dtype == MSD_BFLOAT16) return launch_typed<BFloat16>(a, column_blocks, stream, launched);
    return MSD_OK;  // float32: CUDA cores
}

}  // namespace msd::cuda::draft
