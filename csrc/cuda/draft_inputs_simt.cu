// msd_draft_inputs_cuda on CUDA cores: float32, and 16-bit inputs the tensor-core kernel cannot
// take (rows not 16-byte aligned, devices before sm_80). A block is 8 warps x 4 fc_weight rows =
// 32 output columns for up to 16 rows (1, 4 or 16 by T). Per step, each lane holds a 16-byte
// vector of each of its warp's 4 weight rows (the next step's loads already in flight; one
// element when rows are not aligned), the block stages the rows' x for those inputs as float32
// in shared memory, laid out so that the lanes' float4 reads hit distinct banks, and each lane
// adds into 4 x ROWS partial sums (each x read from shared memory serves 4 weight rows). The
// partial sums are reduced across the warp at the end.
#include <cstring>

#include "cuda/draft_inputs.cuh"

namespace msd::cuda::draft {
namespace {

constexpr int kSimtThreads = 256;
constexpr int kSimtRowsPerWarp = 4;  // fc_weight rows per warp
static_assert(kSimtThreads / kWarp * kSimtRowsPerWarp == kColumns, "8 warps x 4 rows");

// VEC consecutive elements at p: one 16-byte load when VEC elements are 16 bytes (the caller
// guarantees the alignment), else element by element.
template <class T, int VEC>
__device__ inline void load_vec(const T* p, T (&v)[VEC]) {
    if constexpr (VEC * sizeof(T) == 16) {
        const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
        memcpy(v, &raw, sizeof raw);
    } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) v[j] = p[j];
    }
}

// Where element j of lane l's VEC inputs sits in a shared row of kWarp * VEC floats: groups of
// four are laid out lane after lane, so that the lanes' float4 reads hit distinct banks.
template <int VEC>
__device__ inline int slot(int lane, int j) {
    return VEC >= 4 ? (j / 4) * (kWarp * 4) + lane * 4 + j % 4 : lane * VEC + j;
}

// Reads lane `lane`'s VEC floats of a shared row laid out by slot().
template <int VEC>
__device__ inline void read_slots(const float* row, int lane, float (&x)[VEC]) {
    if constexpr (VEC >= 4) {
#pragma unroll
        for (int q = 0; q < VEC / 4; ++q) {
            const float4 f = *reinterpret_cast<const float4*>(row + q * kWarp * 4 + lane * 4);
            x[4 * q] = f.x;
            x[4 * q + 1] = f.y;
            x[4 * q + 2] = f.z;
            x[4 * q + 3] = f.w;
        }
    } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) x[j] = row[lane * VEC + j];
    }
}

// The lane's VEC inputs at column k of its warp's weight rows n0 .. n0 + 3 (zeros past the ends).
template <class D, int VEC>
__device__ inline void load_weights(const DraftInputs& a, int64_t n0, int64_t k,
                                    typename D::T (&w)[kSimtRowsPerWarp][VEC]) {
    using T = typename D::T;
    const T* weight = static_cast<const T*>(a.fc_weight);
#pragma unroll
    for (int r = 0; r < kSimtRowsPerWarp; ++r) {
        if (n0 + r < a.hidden && k < 2 * a.hidden) {
            load_vec<T, VEC>(weight + (n0 + r) * a.fc_weight_row_stride + k, w[r]);
        } else {
#pragma unroll
            for (int j = 0; j < VEC; ++j) w[r][j] = D::store(0.0f);
        }
    }
}

// x[row0 + i, k0 : k0 + kWarp * VEC] as float32 into xs[i] (slot() layout), zeros past the ends.
template <class D, int ROWS, int VEC>
__device__ inline void stage_inputs(const DraftInputs& a, int64_t k0, const typename D::T* const* src,
                                    const typename D::T* const* feat, const int* kind,
                                    float (*xs)[kWarp * VEC]) {
    using T = typename D::T;
    for (int e = threadIdx.x; e < ROWS * kWarp; e += kSimtThreads) {
        const int i = e / kWarp;
        const int lane = e % kWarp;
        const int64_t k = k0 + int64_t{lane} * VEC;
        float v[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) v[j] = 0.0f;
        if (kind[i] != kPadding && k < 2 * a.hidden) {
            // With VEC > 1, hidden % VEC == 0: a vector never straddles the two halves.
            T raw[VEC];
            load_vec<T, VEC>(k < a.hidden ? src[i] + k : feat[i] + (k - a.hidden), raw);
#pragma unroll
            for (int j = 0; j < VEC; ++j) v[j] = D::load(raw[j]);
        }
        if constexpr (VEC >= 4) {
#pragma unroll
            for (int q = 0; q < VEC / 4; ++q) {
                *reinterpret_cast<float4*>(&xs[i][slot<VEC>(lane, 4 * q)]) =
                    make_float4(v[4 * q], v[4 * q + 1], v[4 * q + 2], v[4 * q + 3]);
            }
        } else {
#pragma unroll
            for (int j = 0; j < VEC; ++j) xs[i][slot<VEC>(lane, j)] = v[j];
        }
    }
}

// ROWS rows x 32 columns per block; VEC: inputs per lane per step (16 bytes' worth when every
// row is 16-byte aligned, else 1).
template <class D, int ROWS, int VEC>
__global__ void __launch_bounds__(kSimtThreads) draft_inputs_simt_kernel(const DraftInputs a) {
    using T = typename D::T;
    constexpr int kStep = kWarp * VEC;  // inputs per step
    constexpr int R = kSimtRowsPerWarp;
    __shared__ __align__(16) float xs[ROWS][kStep];
    __shared__ const T* src[ROWS];
    __shared__ const T* feat[ROWS];
    __shared__ int kind[ROWS];

    const int lane = threadIdx.x % kWarp;
    const int64_t row0 = static_cast<int64_t>(blockIdx.x) * ROWS;
    const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kColumns + (threadIdx.x / kWarp) * R;
    const int any_fc = describe_rows<T, ROWS>(a, row0, src, feat, kind);

    float acc[R][ROWS];
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int t = 0; t < ROWS; ++t) acc[r][t] = 0.0f;
    }
    if (any_fc) {
        const int64_t width = 2 * a.hidden;
        T next[R][VEC];
        load_weights<D, VEC>(a, n0, int64_t{lane} * VEC, next);
        for (int64_t k0 = 0; k0 < width; k0 += kStep) {
            float w[R][VEC];
#pragma unroll
            for (int r = 0; r < R; ++r) {
#pragma unroll
                for (int j = 0; j < VEC; ++j) w[r][j] = D::load(next[r][j]);
            }
            if (k0 + kStep < width) load_weights<D, VEC>(a, n0, k0 + kStep + lane * VEC, next);
            __syncthreads();  // every warp is done with the previous step's xs
            stage_inputs<D, ROWS, VEC>(a, k0, src, feat, kind, xs);
            __syncthreads();
#pragma unroll
            for (int t = 0; t < ROWS; ++t) {
                float x[VEC];
                read_slots<VEC>(xs[t], lane, x);
#pragma unroll
                for (int r = 0; r < R; ++r) {
#pragma unroll
                    for (int j = 0; j < VEC; ++j) acc[r][t] = fmaf(w[r][j], x[j], acc[r][t]);
                }
            }
        }
    }
    // Every lane ends with the warp's sum; output (t, r) is written by lane (t * R + r) % 32.
#pragma unroll
    for (int t = 0; t < ROWS; ++t) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const float sum = warp_sum(acc[r][t]);
            if (lane == (t * R + r) % kWarp) finish<D>(a, kind[t], src[t], row0 + t, n0 + r, sum);
        }
    }
}

template <class D, int ROWS>
msd_status launch_rows(const DraftInputs& a, unsigned column_blocks, cudaStream_t stream) {
    constexpr int kVec = 16 / static_cast<int>(sizeof(typename D::T));
    const dim3 grid(static_cast<unsigned>((a.rows + ROWS - 1) / ROWS), column_blocks);
    if (vector_loads_ok(a, kVec)) {
        draft_inputs_simt_kernel<D, ROWS, kVec><<<grid, kSimtThreads, 0, stream>>>(a);
    } else {
        draft_inputs_simt_kernel<D, ROWS, 1><<<grid, kSimtThreads, 0, stream>>>(a);
    }
    return check_launch("draft_inputs_simt_kernel");
}

}  // namespace

msd_status launch_simt(const DraftInputs& a, unsigned column_blocks, cudaStream_t stream) {
    return dispatch_dtype(a.dtype, [&](auto tag) {
        using D = decltype(tag);
        if (a.rows <= 1) return launch_rows<D, 1>(a, column_blocks, stream);
        if (a.rows <= 4) return launch_rows<D, 4>(a, column_blocks, stream);
        return launch_rows<D, 16>(a, column_blocks, stream);
    });
}

}  // namespace msd::cuda::draft
