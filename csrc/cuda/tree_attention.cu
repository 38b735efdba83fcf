// Tree-masked attention over the KV cache, flash-decoding style (the design of
// triton_kernels/tree_attention.py; semantics in msd_engine.h).
//
// The keys [0, prefix_len + region) are cut into `splits` ranges of whole 32-key tiles; the grid
// is (kv head, split, block of 16 query rows), a query row being r = g * T + t (query t of head
// kv_head * G + g), so every K/V tile is loaded once into shared memory (as float32) for all the
// G * T rows of its kv head that the block holds. Per tile, each of the 4 warps scores its 4
// rows against the tile's 32 keys (one key per lane), applies the mask, takes an online-softmax
// step in base 2 with warp shuffles, and leaves the probabilities in shared memory; then every
// thread adds P.V into the accumulators of its (column, rows). With one split the block writes
// the output; otherwise it writes a float32 partial (normalised) and its log-sum-exp to the
// workspace, and a second kernel combines the splits of each row.
#include <cmath>

#include "cuda/common.cuh"

namespace msd::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / kWarp;
constexpr int kBlockRows = 16;                        // query rows per block
constexpr int kTileKeys = 32;                         // keys per K/V tile: one per lane
constexpr int kRowsPerWarp = kBlockRows / kWarps;     // rows scored by each warp
constexpr int kTargetBlocksPerSm = 2;                 // about two waves
constexpr int64_t kMaxGridZ = 65535;
constexpr float kLog2e = 1.4426950408889634f;
static_assert(kTileKeys == kWarp, "a tile has one key per lane");
static_assert(kTileKeys == attention_plan::kTileKeys, "the split plan rounds to whole tiles");

struct Params {
    const void* q;
    const void* k_cache;
    const void* v_cache;
    const int32_t* mask_bits;  // nullptr: every key visible
    void* out;
    float* part_out;  // [splits, Hkv, rows, D], or nullptr with one split (write `out`)
    float* part_lse;  // [splits, Hkv, rows], base 2
    int64_t num_queries, group, num_rows, prefix_len, num_keys, split_len, mask_words;
    int64_t q_row_stride, q_head_stride, kv_head_stride, kv_slot_stride;
    int64_t out_row_stride, out_head_stride;
    float qk_scale;  // sm_scale * log2(e)
};

__device__ inline float warp_max(float v) {
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    }
    return v;
}

// Whether query row r (< num_rows) sees `key` (< num_keys).
__device__ inline bool visible(const Params& p, int64_t r, int64_t key) {
    if (p.mask_bits == nullptr || key < p.prefix_len) return true;
    const int64_t j = key - p.prefix_len;
    const int32_t word = p.mask_bits[(r % p.num_queries) * p.mask_words + j / 32];
    return ((static_cast<uint32_t>(word) >> (j % 32)) & 1u) != 0;
}

template <class D, int HEAD_DIM>
__global__ void __launch_bounds__(kThreads) tree_attention_split_kernel(const Params p) {
    using T = typename D::T;
    static_assert(kThreads % HEAD_DIM == 0, "whole row groups of columns");
    constexpr int kRowGroups = kThreads / HEAD_DIM;     // threads sharing a column
    constexpr int kAccRows = kBlockRows / kRowGroups;  // accumulators per thread
    __shared__ float q_tile[kBlockRows][HEAD_DIM];
    __shared__ float k_tile[kTileKeys][HEAD_DIM + 1];  // +1: lanes read distinct banks
    __shared__ float v_tile[kTileKeys][HEAD_DIM];
    __shared__ float p_tile[kBlockRows][kTileKeys];
    __shared__ float row_alpha[kBlockRows];
    __shared__ float row_sum[kBlockRows];

    const int64_t kv_head = blockIdx.x;
    const int64_t num_kv_heads = gridDim.x;
    const int64_t split = blockIdx.y;
    const int64_t row0 = static_cast<int64_t>(blockIdx.z) * kBlockRows;
    const int tid = threadIdx.x;
    const int lane = tid % kWarp;
    const int warp = tid / kWarp;

    for (int e = tid; e < kBlockRows * HEAD_DIM; e += kThreads) {
        const int m = e / HEAD_DIM;
        const int c = e % HEAD_DIM;
        const int64_t r = row0 + m;
        float value = 0.0f;
        if (r < p.num_rows) {
            const int64_t head = kv_head * p.group + r / p.num_queries;
            value = D::load(static_cast<const T*>(p.q)[(r % p.num_queries) * p.q_row_stride +
                                                       head * p.q_head_stride + c]);
        }
        q_tile[m][c] = value;
    }

    // Softmax state of the warp's rows (warp * kRowsPerWarp + i), the same in every lane.
    float row_max[kRowsPerWarp];
    float row_l[kRowsPerWarp];
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
        row_max[i] = -INFINITY;
        row_l[i] = 0.0f;
    }
    const int col = tid % HEAD_DIM;
    const int row_group = tid / HEAD_DIM;  // rows row_group + j * kRowGroups
    float acc[kAccRows];
#pragma unroll
    for (int j = 0; j < kAccRows; ++j) acc[j] = 0.0f;

    const T* k_base = static_cast<const T*>(p.k_cache) + kv_head * p.kv_head_stride;
    const T* v_base = static_cast<const T*>(p.v_cache) + kv_head * p.kv_head_stride;
    const int64_t lo = split * p.split_len;
    const int64_t hi = lo + p.split_len < p.num_keys ? lo + p.split_len : p.num_keys;
    for (int64_t tile = lo; tile < hi; tile += kTileKeys) {
        __syncthreads();  // the previous tile's readers are done (the first time: q_tile is in)
        // A fixed trip count, unrolled: many loads in flight per thread before the stores.
#pragma unroll 8
        for (int it = 0; it < kTileKeys * HEAD_DIM / kThreads; ++it) {
            const int e = tid + it * kThreads;
            const int n = e / HEAD_DIM;
            const int c = e % HEAD_DIM;
            const int64_t key = tile + n;
            float k_value = 0.0f;
            float v_value = 0.0f;
            if (key < hi) {  // slots past the range are never read (they may hold NaN)
                k_value = D::load(k_base[key * p.kv_slot_stride + c]);
                v_value = D::load(v_base[key * p.kv_slot_stride + c]);
            }
            k_tile[n][c] = k_value;
            v_tile[n][c] = v_value;
        }
        __syncthreads();

        const int64_t key = tile + lane;
        float score[kRowsPerWarp];
    #pragma unroll
        for (int i = 0; i < kRowsPerWarp; ++i) score[i] = 0.0f;
        for (int c = 0; c < HEAD_DIM; ++c) {
            const float k_value = k_tile[lane][c];
#pragma unroll
            for (int i = 0; i < kRowsPerWarp; ++i) {
                score[i] = fmaf(q_tile[warp * kRowsPerWarp + i][c], k_value, score[i]);
            }
        }
    #pragma unroll
        for (int i = 0; i < kRowsPerWarp; ++i) {
            const int m = warp * kRowsPerWarp + i;
            const int64_t r = row0 + m;
            const bool seen = key < hi && r < p.num_rows && visible(p, r, key);
            const float s = seen ? score[i] * p.qk_scale : -INFINITY;
            const float new_max = fmaxf(row_max[i], warp_max(s));
            // Nothing visible yet: subtract 0, so that exp2 gives 0 rather than NaN.
            const float shift = new_max == -INFINITY ? 0.0f : new_max;
            const float prob = exp2f(s - shift);
            const float alpha = exp2f(row_max[i] - shift);
            row_l[i] = row_l[i] * alpha + warp_sum(prob);
            row_max[i] = new_max;
            p_tile[m][lane] = prob;
            if (lane == 0) row_alpha[m] = alpha;
        }
        __syncthreads();

    #pragma unroll
        for (int j = 0; j < kAccRows; ++j) acc[j] *= row_alpha[row_group + j * kRowGroups];
        for (int n = 0; n < kTileKeys; ++n) {
            const float v_value = v_tile[n][col];
#pragma unroll
            for (int j = 0; j < kAccRows; ++j) {
                acc[j] = fmaf(p_tile[row_group + j * kRowGroups][n], v_value, acc[j]);
            }
        }
    }

    if (lane == 0) {
    #pragma unroll
        for (int i = 0; i < kRowsPerWarp; ++i) {
            const int m = warp * kRowsPerWarp + i;
            const int64_t r = row0 + m;
            row_sum[m] = row_l[i];
            if (p.part_out != nullptr && r < p.num_rows) {
                p.part_lse[(split * num_kv_heads + kv_head) * p.num_rows + r] =
                    row_l[i] > 0.0f ? row_max[i] + log2f(row_l[i]) : -INFINITY;
            }
        }
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < kAccRows; ++j) {
        const int m = row_group + j * kRowGroups;
        const int64_t r = row0 + m;
        if (r >= p.num_rows) continue;
        const float sum = row_sum[m];
        const float value = sum > 0.0f ? acc[j] / sum : 0.0f;  // a row that saw nothing: zeros
        if (p.part_out != nullptr) {
            p.part_out[((split * num_kv_heads + kv_head) * p.num_rows + r) * HEAD_DIM + col] =
                value;
        } else {
            const int64_t head = kv_head * p.group + r / p.num_queries;
            static_cast<T*>(p.out)[(r % p.num_queries) * p.out_row_stride +
                                   head * p.out_head_stride + col] = D::store(value);
        }
    }
}

// One block of head_dim threads per (row, kv head): the splits' partials weighted by
// exp2(lse - max lse); splits that saw nothing (lse = -inf) weigh 0.
template <class D>
__global__ void tree_attention_reduce_kernel(const Params p, int64_t num_splits) {
    using T = typename D::T;
    const int64_t r = blockIdx.x;
    const int64_t kv_head = blockIdx.y;
    const int64_t num_kv_heads = gridDim.y;
    const int col = threadIdx.x;
    const int head_dim = blockDim.x;
    float max_lse = -INFINITY;
    for (int64_t s = 0; s < num_splits; ++s) {
        max_lse = fmaxf(max_lse, p.part_lse[(s * num_kv_heads + kv_head) * p.num_rows + r]);
    }
    const float shift = max_lse == -INFINITY ? 0.0f : max_lse;
    float total = 0.0f;
    float value = 0.0f;
    for (int64_t s = 0; s < num_splits; ++s) {
        const int64_t part = (s * num_kv_heads + kv_head) * p.num_rows + r;
        const float weight = exp2f(p.part_lse[part] - shift);
        total += weight;
        value = fmaf(weight, p.part_out[part * head_dim + col], value);
    }
    const int64_t head = kv_head * p.group + r / p.num_queries;
    static_cast<T*>(p.out)[(r % p.num_queries) * p.out_row_stride + head * p.out_head_stride +
                           col] = D::store(total > 0.0f ? value / total : 0.0f);
}

msd_status check_cuda(cudaError_t error, const char* what) {
    if (error == cudaSuccess) return MSD_OK;
    cudaGetLastError();  // clear it, so that it does not surface at the next launch's check
    return set_error(MSD_ERR_CUDA, "%s failed: %s (%s)", what, cudaGetErrorName(error),
                     cudaGetErrorString(error));
}

template <class D, int HEAD_DIM>
msd_status launch(const Params& p, int64_t num_kv_heads, int64_t splits, int64_t row_blocks,
                  cudaStream_t stream) {
    const dim3 grid(static_cast<unsigned>(num_kv_heads), static_cast<unsigned>(splits),
                    static_cast<unsigned>(row_blocks));
    tree_attention_split_kernel<D, HEAD_DIM><<<grid, kThreads, 0, stream>>>(p);
    const msd_status status = check_launch("tree_attention_split_kernel");
    if (status != MSD_OK || splits == 1) return status;
    const dim3 reduce_grid(static_cast<unsigned>(p.num_rows), static_cast<unsigned>(num_kv_heads));
    tree_attention_reduce_kernel<D><<<reduce_grid, HEAD_DIM, 0, stream>>>(p, splits);
    return check_launch("tree_attention_reduce_kernel");
}

}  // namespace

msd_status tree_attention(const void* q, const void* k_cache, const void* v_cache,
                          const int32_t* mask_bits, void* out, int64_t num_queries,
                          int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                          int64_t prefix_len, int64_t region, int64_t q_row_stride,
                          int64_t q_head_stride, int64_t kv_head_stride, int64_t kv_slot_stride,
                          int64_t out_row_stride, int64_t out_head_stride, float sm_scale,
                          msd_dtype dtype, void* workspace, int64_t workspace_bytes,
                          void* stream) {
    const int64_t group = num_heads / num_kv_heads;
    const int64_t num_rows = group * num_queries;
    const int64_t row_blocks = (num_rows + kBlockRows - 1) / kBlockRows;
    if (row_blocks > kMaxGridZ || num_kv_heads > kMaxGridZ) {
        return set_error(MSD_ERR_INVALID_ARGUMENT,
                         "num_queries * num_heads / num_kv_heads (%lld) or num_kv_heads (%lld) "
                         "is too large for one launch",
                         static_cast<long long>(num_rows), static_cast<long long>(num_kv_heads));
    }
    int device = 0;
    int sms = 0;
    msd_status status = check_cuda(cudaGetDevice(&device), "cudaGetDevice");
    if (status != MSD_OK) return status;
    status = check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device),
                        "cudaDeviceGetAttribute(MultiProcessorCount)");
    if (status != MSD_OK) return status;

    // Splits: enough blocks for ~2 waves, >= kMinKeysPerSplit keys each, as many as fit.
    const int64_t num_keys = prefix_len + region;
    const int64_t blocks_per_split = num_kv_heads * row_blocks;
    const int64_t by_occupancy =
        (int64_t{kTargetBlocksPerSm} * sms + blocks_per_split - 1) / blocks_per_split;
    const int64_t by_workspace =
        workspace_bytes / attention_plan::bytes_per_split(num_rows * num_kv_heads, head_dim);
    int64_t splits = std::max<int64_t>(
        1, std::min({attention_plan::max_splits(num_keys), by_occupancy, by_workspace}));
    const int64_t keys_per_split = (num_keys + splits - 1) / splits;
    const int64_t split_len = (keys_per_split + kTileKeys - 1) / kTileKeys * kTileKeys;
    splits = (num_keys + split_len - 1) / split_len;

    Params p{};
    p.q = q;
    p.k_cache = k_cache;
    p.v_cache = v_cache;
    p.mask_bits = mask_bits;
    p.out = out;
    if (splits > 1) {
        p.part_out = static_cast<float*>(workspace);
        p.part_lse = p.part_out + splits * num_kv_heads * num_rows * head_dim;
    }
    p.num_queries = num_queries;
    p.group = group;
    p.num_rows = num_rows;
    p.prefix_len = prefix_len;
    p.num_keys = num_keys;
    p.split_len = split_len;
    p.mask_words = (region + 31) / 32;
    p.q_row_stride = q_row_stride;
    p.q_head_stride = q_head_stride;
    p.kv_head_stride = kv_head_stride;
    p.kv_slot_stride = kv_slot_stride;
    p.out_row_stride = out_row_stride;
    p.out_head_stride = out_head_stride;
    p.qk_scale = sm_scale * kLog2e;
    const cudaStream_t s = as_stream(stream);
    return dispatch_dtype(dtype, [&](auto tag) {
        using D = decltype(tag);
        return head_dim == 64 ? launch<D, 64>(p, num_kv_heads, splits, row_blocks, s)
                              : launch<D, 128>(p, num_kv_heads, splits, row_blocks, s);
    });
}

}  // namespace msd::cuda
