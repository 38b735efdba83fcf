// KV-cache compaction after acceptance: every (kv, layer, head) plane of the arena in one launch,
// one block per plane (grid-strided), slot start + nodes[j] -> start + j (see msd_engine.h).
//
// In place, as in triton_kernels/kv_compact.py: destinations go in chunks of increasing j; a
// chunk reads all its sources into registers, then a barrier, then writes. A chunk writes slots
// j < (c + 1) * M while every source of a later chunk is nodes[j'] >= j' >= (c + 1) * M, and the
// barrier orders every thread's reads of a chunk before any thread's writes (a destination may
// be the source of an earlier j of the same chunk). Slots are copied as raw 2- or 4-byte words.
#include "cuda/common.cuh"

namespace msd::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kItems = 8;  // elements each thread holds per chunk

template <class W>
__global__ void kv_compact_kernel(W* __restrict__ arena, const int64_t* __restrict__ nodes,
                                  int64_t planes, int64_t max_slots, int64_t head_dim,
                                  int64_t start, int64_t num_nodes) {
    constexpr int64_t kChunkElements = int64_t{kThreads} * kItems;
    const int64_t slots_per_chunk = head_dim < kChunkElements ? kChunkElements / head_dim : 1;
    for (int64_t plane = blockIdx.x; plane < planes; plane += gridDim.x) {
        W* base = arena + (plane * max_slots + start) * head_dim;
        if (slots_per_chunk == 1) {
            // Rows longer than a chunk, one slot at a time. Each thread copies the same columns
            // of every slot, in increasing j, so it only ever touches its own elements and
            // program order already puts each read before the write that could clobber it.
            for (int64_t j = 0; j < num_nodes; ++j) {
                const W* src = base + nodes[j] * head_dim;
                W* dst = base + j * head_dim;
                for (int64_t c = threadIdx.x; c < head_dim; c += kThreads) dst[c] = src[c];
            }
            continue;
        }
        for (int64_t first = 0; first < num_nodes; first += slots_per_chunk) {
            const int64_t left = num_nodes - first;
            const int64_t slots = left < slots_per_chunk ? left : slots_per_chunk;
            const int64_t count = slots * head_dim;
            W held[kItems];
#pragma unroll
            for (int i = 0; i < kItems; ++i) {
                const int64_t e = threadIdx.x + int64_t{i} * kThreads;
                if (e < count) {
                    held[i] = base[nodes[first + e / head_dim] * head_dim + e % head_dim];
                }
            }
            __syncthreads();  // every read of this chunk before any write
#pragma unroll
            for (int i = 0; i < kItems; ++i) {
                const int64_t e = threadIdx.x + int64_t{i} * kThreads;
                if (e < count) base[(first + e / head_dim) * head_dim + e % head_dim] = held[i];
            }
            // No second barrier: a later chunk's reads are of slots no earlier chunk writes.
        }
    }
}

}  // namespace

msd_status kv_compact(void* arena, int64_t planes, int64_t max_slots, int64_t head_dim,
                      int64_t start, const int64_t* nodes, int64_t num_nodes, msd_dtype dtype,
                      void* stream) {
    if (num_nodes == 0) return MSD_OK;
    const unsigned grid = grid_for(planes);
    if (dtype == MSD_FLOAT32) {
        kv_compact_kernel<uint32_t><<<grid, kThreads, 0, as_stream(stream)>>>(
            static_cast<uint32_t*>(arena), nodes, planes, max_slots, head_dim, start, num_nodes);
    } else {
        kv_compact_kernel<uint16_t><<<grid, kThreads, 0, as_stream(stream)>>>(
            static_cast<uint16_t*>(arena), nodes, planes, max_slots, head_dim, start, num_nodes);
    }
    return check_launch("kv_compact_kernel");
}

}  // namespace msd::cuda
