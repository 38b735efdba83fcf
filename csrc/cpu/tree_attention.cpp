// msd_tree_attention_cpu: tiling, tree masks and threads around the micro-kernels of
// attention_{scalar,avx2,avx512}.cpp (semantics in msd_engine.h).
//
// A task is one kv head and a block of up to 64 of its G * T query rows (row r = g * T + t is
// query t of head kv_head * G + g). It widens its queries once (pre-scaled by sm_scale * log2 e,
// so the softmax runs in base 2), then walks the keys in blocks of 64: scores for all rows,
// the mask, one online-softmax step per row, and the P.V product, so each K/V block is read
// from memory once for every row of the task. Blocks of the masked region start at prefix_len,
// which puts a block's mask bits of one query in two int32 words, and a region block that no
// row of the task sees (half of them in a causal prefill) is skipped.
//
// A decode-sized masked step (a region of at most 64 keys: a verified tree, a draft level)
// instead has each query row walk exactly the keys it sees, as one dense sequence cut into the
// blocks of 64 that a step without a mask cuts from slot 0 (`attend_dense_tail`). A tree node's
// arithmetic is then the arithmetic of the same token decoded alone after its ancestors, bit for
// bit, since the micro-kernels depend neither on the other rows nor on where a key lives. So
// greedy speculative decoding gives plain decoding's tokens exactly, in float32 and in 16-bit
// precisions alike. Weighing masked keys 0 in place would not: they shift the visible keys'
// lanes in the softmax sum, and a region that starts its own block regroups the online softmax.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <new>
#include <numeric>
#include <stdexcept>
#include <vector>

#include "cpu/attention.h"
#include "cpu/linear.h"  // the 16-bit -> float32 row wideners
#include "cpu/thread_pool.h"

namespace msd::cpu {
namespace {

constexpr int kBlockKeys = kAttentionBlockKeys;
// A dense tail: the prefix past its last full block (< 64 keys) and a region of <= 64 keys.
constexpr int kTailKeys = 2 * kBlockKeys;
constexpr int kBlockRows = kAttentionBlockRows;
constexpr int kMinBlockRows = 4;  // the AVX-512 kernels' register block
constexpr float kLog2e = 1.4426950408889634f;
// Work is counted in multiply-adds of the two products, rows * keys * head_dim. Below this a
// call takes a few microseconds; above it the second core pays off even when the call's tasks
// split unevenly (3 kv heads on 2 threads). Measured inside the layer call (SmolLM2, bfloat16,
// the pool's worker still spinning from the linear before): one query row, 150 / 250 / 400
// cached keys, 20 / 36 / 52 -> 15 / 24 / 38 us a layer; 4 rows over 150 keys, 35 -> 23 us.
constexpr int64_t kMinParallelWork = int64_t{1} << 16;
// A sleeping worker is woken only for calls this large (~1 ms): see linear.cpp's kWakeMinBytes.
constexpr int64_t kWakeMinWork = int64_t{1} << 24;
constexpr int kMaxThreads = 256;

struct Kernels {
    const AttentionKernels* attention;
    WidenFn widen;  // nullptr for float32: K/V rows are read in place
};

Kernels kernels_for(msd_cpu_isa isa, msd_dtype dtype) {
    const LinearKernels* linear = linear_kernels_scalar();
    const AttentionKernels* attention = attention_kernels_scalar();
    if (isa_has_avx512(isa)) {  // AVX512, AVX512_BF16 and AMX differ in bfloat16 linears only
        linear = linear_kernels_avx512();
        attention = attention_kernels_avx512();
    } else if (isa == MSD_CPU_ISA_AVX2) {
        linear = linear_kernels_avx2();
        attention = attention_kernels_avx2();
    }
    const WidenFn widen = dtype == MSD_FLOAT16    ? linear->widen_half
                          : dtype == MSD_BFLOAT16 ? linear->widen_bfloat16
                                                  : nullptr;
    return {attention, widen};
}

struct Job {
    const void* q;
    const void* k_cache;
    const void* v_cache;
    const int32_t* mask_bits;  // nullptr: no mask (then region_start == num_keys)
    void* out;
    int64_t num_queries, group, num_rows, head_dim;
    int64_t block_rows, row_blocks;  // each kv head's rows in row_blocks blocks of block_rows
    int64_t region_start;  // prefix_len, or num_keys without a mask
    int64_t num_keys;      // prefix_len + region
    int64_t mask_words;
    int64_t q_row_stride, q_head_stride, kv_head_stride, kv_slot_stride;
    int64_t out_row_stride, out_head_stride;
    float qk_scale;  // sm_scale * log2(e)
    msd_dtype dtype;
    Kernels kernels;
    std::atomic<bool> out_of_memory{false};
};

// One thread's buffers, grown to the largest head_dim seen and kept between calls.
struct Scratch {
    std::vector<float> q, acc, k, v, s, max, sum, alpha;
    // K/V row pointers of a block or of a dense tail, and one query's gathered subset of them.
    std::vector<const float*> k_rows, v_rows, k_seen, v_seen;

    void reserve(int64_t head_dim) {
        const auto block = static_cast<size_t>(kBlockRows * head_dim);
        if (q.size() >= block) return;
        q.resize(block);
        acc.resize(block);
        k.resize(static_cast<size_t>(kTailKeys * head_dim));
        v.resize(static_cast<size_t>(kTailKeys * head_dim));
        s.resize(static_cast<size_t>(kBlockRows * kBlockKeys));
        max.resize(kBlockRows);
        sum.resize(kBlockRows);
        alpha.resize(kBlockRows);
        for (auto* rows : {&k_rows, &v_rows, &k_seen, &v_seen}) rows->resize(kTailKeys);
    }
};

// Bits [j0, j0 + keys) of query t's mask row, as bits [0, keys). j0 is a multiple of 64.
uint64_t visible_bits(const Job& job, int64_t t, int64_t j0, int keys) {
    const int32_t* row = job.mask_bits + t * job.mask_words;
    const int64_t word = j0 / 32;
    uint64_t bits = static_cast<uint32_t>(row[word]);
    if (word + 1 < job.mask_words) bits |= uint64_t{static_cast<uint32_t>(row[word + 1])} << 32;
    return keys >= 64 ? bits : bits & ((uint64_t{1} << keys) - 1);
}

// Pointers to the `keys` float32 rows of a cache from `slot`: in place for float32, widened
// into `buffer` otherwise.
void kv_rows(const Job& job, const void* cache, int64_t kv_head, int64_t slot, int keys,
             float* buffer, const float** rows) {
    const int64_t offset = kv_head * job.kv_head_stride + slot * job.kv_slot_stride;
    if (job.kernels.widen == nullptr) {
        const float* base = static_cast<const float*>(cache) + offset;
        for (int n = 0; n < keys; ++n) rows[n] = base + n * job.kv_slot_stride;
        return;
    }
    job.kernels.widen(static_cast<const uint16_t*>(cache) + offset, job.kv_slot_stride, keys,
                      job.head_dim, buffer);
    for (int n = 0; n < keys; ++n) rows[n] = buffer + n * job.head_dim;
}

// One block of keys [slot, slot + keys) for the task's `rows` rows; visible[m] holds row m's
// mask bits, or visible is nullptr when every key is visible.
void key_block(const Job& job, Scratch& w, int64_t kv_head, int rows, int64_t slot, int keys,
               const uint64_t* visible) {
    const AttentionKernels& kernels = *job.kernels.attention;
    const int64_t d = job.head_dim;
    kv_rows(job, job.k_cache, kv_head, slot, keys, w.k.data(), w.k_rows.data());
    kernels.scores(w.q.data(), d, rows, w.k_rows.data(), keys, d, w.s.data(), kBlockKeys);
    for (int m = 0; m < rows; ++m) {
        float* s = w.s.data() + m * kBlockKeys;
        if (visible != nullptr && visible[m] != (~uint64_t{0} >> (64 - keys))) {
            for (int n = 0; n < keys; ++n) {
                if (((visible[m] >> n) & 1u) == 0) s[n] = -std::numeric_limits<float>::infinity();
            }
        }
        w.alpha[m] = kernels.softmax_row(s, keys, &w.max[m], &w.sum[m]);
    }
    kv_rows(job, job.v_cache, kv_head, slot, keys, w.v.data(), w.v_rows.data());
    kernels.accumulate(w.s.data(), kBlockKeys, rows, w.v_rows.data(), keys, d, w.alpha.data(),
                       w.acc.data(), d);
}

// The keys from tail_start (the prefix's last full block end) to num_keys, for a region of at
// most kBlockKeys: each row gathers the ones it sees (the prefix's rest, then its visible region
// keys in slot order) and walks them in blocks of kBlockKeys, as an unmasked step would. The
// rows of one query (its heads in this kv group: rows m, m + num_queries, ...) see the same keys,
// so they go through the micro-kernels together, which compute each row as they would alone.
// (One row per call made the AVX-512 kernels compute their whole 4-row register block for it: 4x
// the tail's arithmetic. SmolLM2 shapes, 8 tree rows, 100 cached tokens: 63 -> 41 us a layer.)
void attend_dense_tail(const Job& job, Scratch& w, int64_t kv_head, int64_t row0, int rows,
                       int64_t tail_start) {
    const AttentionKernels& kernels = *job.kernels.attention;
    const int64_t d = job.head_dim;
    const int prefix_rest = static_cast<int>(job.region_start - tail_start);
    const int region = static_cast<int>(job.num_keys - job.region_start);
    kv_rows(job, job.k_cache, kv_head, tail_start, prefix_rest + region, w.k.data(), w.k_rows.data());
    kv_rows(job, job.v_cache, kv_head, tail_start, prefix_rest + region, w.v.data(), w.v_rows.data());
    const int queries = static_cast<int>(job.num_queries);
    for (int m0 = 0; m0 < std::min(rows, queries); ++m0) {
        const int group = (rows - m0 + queries - 1) / queries;  // rows m0, m0 + queries, ...
        const uint64_t visible = visible_bits(job, (row0 + m0) % job.num_queries, 0, region);
        int seen = 0;
        for (int n = 0; n < prefix_rest + region; ++n) {
            if (n >= prefix_rest && ((visible >> (n - prefix_rest)) & 1u) == 0) continue;
            w.k_seen[seen] = w.k_rows[n];
            w.v_seen[seen++] = w.v_rows[n];
        }
        float* s = w.s.data() + m0 * kBlockKeys;
        for (int n0 = 0; n0 < seen; n0 += kBlockKeys) {
            const int keys = std::min(kBlockKeys, seen - n0);
            kernels.scores(w.q.data() + m0 * d, queries * d, group, w.k_seen.data() + n0, keys, d,
                           s, queries * kBlockKeys);
            for (int i = 0; i < group; ++i) {
                const int m = m0 + i * queries;
                w.alpha[i] = kernels.softmax_row(s + i * queries * kBlockKeys, keys, &w.max[m],
                                                 &w.sum[m]);
            }
            kernels.accumulate(s, queries * kBlockKeys, group, w.v_seen.data() + n0, keys, d,
                               w.alpha.data(), w.acc.data() + m0 * d, queries * d);
        }
    }
}

template <class D>
void load_queries(const Job& job, int64_t kv_head, int64_t row0, int rows, float* q) {
    using T = typename D::T;
    for (int m = 0; m < rows; ++m) {
        const int64_t r = row0 + m;
        const int64_t head = kv_head * job.group + r / job.num_queries;
        const T* src = static_cast<const T*>(job.q) + (r % job.num_queries) * job.q_row_stride +
                       head * job.q_head_stride;
        float* dst = q + m * job.head_dim;
        for (int64_t c = 0; c < job.head_dim; ++c) dst[c] = D::load(src[c]) * job.qk_scale;
    }
}

template <class D>
void store_rows(const Job& job, const Scratch& w, int64_t kv_head, int64_t row0, int rows) {
    using T = typename D::T;
    for (int m = 0; m < rows; ++m) {
        const int64_t r = row0 + m;
        const int64_t head = kv_head * job.group + r / job.num_queries;
        T* dst = static_cast<T*>(job.out) + (r % job.num_queries) * job.out_row_stride +
                 head * job.out_head_stride;
        const float sum = w.sum[m];
        const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;  // a row that saw nothing: zeros
        const float* acc = w.acc.data() + m * job.head_dim;
        for (int64_t c = 0; c < job.head_dim; ++c) dst[c] = D::store(acc[c] * inv);
    }
}

template <class D>
void attend(const Job& job, Scratch& w, int64_t kv_head, int64_t row0, int rows) {
    load_queries<D>(job, kv_head, row0, rows, w.q.data());
    std::fill(w.max.begin(), w.max.begin() + rows, -std::numeric_limits<float>::infinity());
    std::fill(w.sum.begin(), w.sum.begin() + rows, 0.0f);
    std::fill(w.acc.begin(), w.acc.begin() + rows * job.head_dim, 0.0f);
    const bool dense_tail =
        job.mask_bits != nullptr && job.num_keys - job.region_start <= kBlockKeys;
    const int64_t shared_end =
        dense_tail ? job.region_start - job.region_start % kBlockKeys : job.region_start;
    for (int64_t slot = 0; slot < shared_end; slot += kBlockKeys) {
        const int keys = static_cast<int>(std::min<int64_t>(kBlockKeys, shared_end - slot));
        key_block(job, w, kv_head, rows, slot, keys, nullptr);
    }
    if (dense_tail) {
        attend_dense_tail(job, w, kv_head, row0, rows, shared_end);
        store_rows<D>(job, w, kv_head, row0, rows);
        return;
    }
    uint64_t visible[kBlockRows];
    for (int64_t slot = job.region_start; slot < job.num_keys; slot += kBlockKeys) {
        const int keys = static_cast<int>(std::min<int64_t>(kBlockKeys, job.num_keys - slot));
        uint64_t any = 0;
        for (int m = 0; m < rows; ++m) {
            visible[m] = visible_bits(job, (row0 + m) % job.num_queries, slot - job.region_start,
                                      keys);
            any |= visible[m];
        }
        if (any != 0) key_block(job, w, kv_head, rows, slot, keys, visible);
    }
    store_rows<D>(job, w, kv_head, row0, rows);
}

void run_task(void* context, int64_t task) {
    Job& job = *static_cast<Job*>(context);
    thread_local Scratch scratch;
    try {
        scratch.reserve(job.head_dim);
    } catch (const std::bad_alloc&) {
        job.out_of_memory.store(true, std::memory_order_relaxed);
        return;
    } catch (const std::length_error&) {
        job.out_of_memory.store(true, std::memory_order_relaxed);
        return;
    }
    const int64_t kv_head = task / job.row_blocks;
    const int64_t row0 = task % job.row_blocks * job.block_rows;
    const int rows = static_cast<int>(std::min<int64_t>(job.block_rows, job.num_rows - row0));
    dispatch_dtype(job.dtype, [&](auto tag) {
        attend<decltype(tag)>(job, scratch, kv_head, row0, rows);
    });
}

// Rows per task: at most kBlockRows, and with several threads small enough that the tasks
// come in a multiple of the thread count (3 kv heads on 2 threads: 6 tasks, not 3), down to
// kMinBlockRows rows (each task reads its kv head's K/V once more).
int64_t rows_per_task(int64_t num_rows, int64_t num_kv_heads, int threads) {
    int64_t blocks = (num_rows + kBlockRows - 1) / kBlockRows;
    if (threads > 1) {
        const int64_t per_head = threads / std::gcd(static_cast<int64_t>(threads), num_kv_heads);
        blocks = std::max(blocks, per_head);
    }
    blocks = std::min(blocks, (num_rows + kMinBlockRows - 1) / kMinBlockRows);
    const int64_t rows = (num_rows + blocks - 1) / blocks;
    return (rows + kMinBlockRows - 1) / kMinBlockRows * kMinBlockRows;
}

}  // namespace

msd_status tree_attention(const void* q, const void* k_cache, const void* v_cache,
                          const int32_t* mask_bits, void* out, int64_t num_queries,
                          int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                          int64_t prefix_len, int64_t region, int64_t q_row_stride,
                          int64_t q_head_stride, int64_t kv_head_stride, int64_t kv_slot_stride,
                          int64_t out_row_stride, int64_t out_head_stride, float sm_scale,
                          msd_dtype dtype) {
    Job job;
    job.q = q;
    job.k_cache = k_cache;
    job.v_cache = v_cache;
    job.mask_bits = mask_bits;
    job.out = out;
    job.num_queries = num_queries;
    job.group = num_heads / num_kv_heads;
    job.num_rows = job.group * num_queries;
    job.head_dim = head_dim;
    job.num_keys = prefix_len + region;
    job.region_start = mask_bits != nullptr ? prefix_len : job.num_keys;
    job.mask_words = (region + 31) / 32;
    job.q_row_stride = q_row_stride;
    job.q_head_stride = q_head_stride;
    job.kv_head_stride = kv_head_stride;
    job.kv_slot_stride = kv_slot_stride;
    job.out_row_stride = out_row_stride;
    job.out_head_stride = out_head_stride;
    job.qk_scale = sm_scale * kLog2e;
    job.dtype = dtype;
    job.kernels = kernels_for(get_isa(), dtype);

    const int64_t work = num_kv_heads * job.num_rows * job.num_keys * head_dim;
    const int threads = work < kMinParallelWork ? 1 : std::min(hardware_threads(), kMaxThreads);
    job.block_rows = rows_per_task(job.num_rows, num_kv_heads, threads);
    job.row_blocks = (job.num_rows + job.block_rows - 1) / job.block_rows;
    run_chunks(threads, num_kv_heads * job.row_blocks, work >= kWakeMinWork, run_task, &job);
    if (job.out_of_memory.load(std::memory_order_relaxed)) {
        return set_error(MSD_ERR_OUT_OF_MEMORY, "cannot allocate the attention scratch for "
                         "head_dim %lld", static_cast<long long>(head_dim));
    }
    return MSD_OK;
}

}  // namespace msd::cpu
