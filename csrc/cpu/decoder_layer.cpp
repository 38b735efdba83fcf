// msd_decoder_layer_cpu: one Llama decoder layer as a single call, for decode-sized steps.
//
// It runs exactly the kernels of the separate C calls (linear, rope_kv_write, tree_attention,
// add_rms_norm, silu_mul), in the same order, on the same operands, so its outputs are theirs bit
// for bit (the engine's per-op path for decode-sized steps; past 16 rows that path switches to
// torch's GEMMs and elementwise ops, and the engine to it). What it removes is the ~10 trips through
// Python per layer and the torch temporaries between them. Measured on SmolLM2-135M (2-core
// Xeon, bfloat16): those trips cost ~3 ms of a ~15 ms decode step, and the gaps they leave
// between linear calls let the thread pool's workers fall asleep during tree verification.
//
// Intermediates live in one per-thread scratch buffer, grown to the largest step seen.
#include <cstddef>
#include <cstdint>
#include <vector>

#include "cpu/buffer.h"
#include "internal.h"

namespace msd::cpu {
namespace {

// Offsets are rounded up to a cache line, so that no two intermediates share one.
int64_t align_bytes(int64_t bytes) { return (bytes + 63) / 64 * 64; }

}  // namespace

msd_status decoder_layer(const msd_decoder_layer& w, const DecoderStep& s, msd_dtype dtype,
                         int num_threads) {
    const int64_t t = s.num_tokens;
    const int64_t qkv_width = (w.num_heads + 2 * w.num_kv_heads) * w.head_dim;
    const int64_t attn_width = w.num_heads * w.head_dim;
    const int64_t bytes = dtype_bytes(dtype);
    // Scratch: qkv [T, qkv_width] | attention out [T, attn_width] | out [T, hidden] |
    // gate_up [T, 2F] | activation [T, F].
    const int64_t sizes[] = {t * qkv_width, t * attn_width, t * w.hidden, t * 2 * w.intermediate,
                             t * w.intermediate};
    int64_t offsets[5];
    int64_t total = 0;
    for (int i = 0; i < 5; ++i) {
        offsets[i] = total;
        total += align_bytes(sizes[i] * bytes);
    }
    thread_local std::vector<uint64_t> scratch;  // 8-byte elements: 8-byte aligned at least
    if (!reserve(scratch, (total + 63) / 8 + 8, "decoder layer intermediates")) {
        return MSD_ERR_OUT_OF_MEMORY;
    }
    auto* base = reinterpret_cast<uint8_t*>(scratch.data());
    base += (64 - reinterpret_cast<uintptr_t>(base) % 64) % 64;
    uint8_t* qkv = base + offsets[0];
    uint8_t* attn = base + offsets[1];
    uint8_t* out = base + offsets[2];
    uint8_t* gate_up = base + offsets[3];
    uint8_t* act = base + offsets[4];

    msd_status status = linear(s.h, w.qkv_weight, nullptr, qkv, t, qkv_width, w.hidden,
                               s.h_row_stride, w.hidden, qkv_width, dtype, num_threads);
    if (status != MSD_OK) return status;
    // q, k, v are views of the qkv rows: heads of head_dim, q's first, then k's, then v's.
    const int64_t q_cols = attn_width, kv_cols = w.num_kv_heads * w.head_dim;
    const RopeKvWrite rope{qkv, qkv + q_cols * bytes, qkv + (q_cols + kv_cols) * bytes,
                           s.cos, s.sin, qkv /* q rotated in place */, s.k_cache, s.v_cache,
                           t, w.num_heads, w.num_kv_heads, w.head_dim, s.start,
                           qkv_width, w.head_dim, qkv_width, w.head_dim, s.table_row_stride,
                           qkv_width, w.head_dim, s.cache_head_stride, s.cache_slot_stride, dtype};
    if ((status = rope_kv_write(rope)) != MSD_OK) return status;
    const int64_t region = s.start + t - s.prefix_len;
    status = tree_attention(qkv, s.k_cache, s.v_cache, s.mask_bits, attn, t, w.num_heads,
                            w.num_kv_heads, w.head_dim, s.prefix_len, region, qkv_width,
                            w.head_dim, s.cache_head_stride, s.cache_slot_stride, attn_width,
                            w.head_dim, w.sm_scale, dtype);
    if (status != MSD_OK) return status;
    status = linear(attn, w.o_weight, nullptr, out, t, w.hidden, attn_width, attn_width,
                    attn_width, w.hidden, dtype, num_threads);
    if (status != MSD_OK) return status;
    status = add_rms_norm(out, s.residual, w.post_attention_norm, s.h, t, w.hidden, w.hidden,
                          s.residual_row_stride, s.h_row_stride, w.rms_norm_eps, dtype);
    if (status != MSD_OK) return status;
    status = linear(s.h, w.gate_up_weight, nullptr, gate_up, t, 2 * w.intermediate, w.hidden,
                    s.h_row_stride, w.hidden, 2 * w.intermediate, dtype, num_threads);
    if (status != MSD_OK) return status;
    status = silu_mul(gate_up, act, t, w.intermediate, 2 * w.intermediate, w.intermediate, dtype);
    if (status != MSD_OK) return status;
    status = linear(act, w.down_weight, nullptr, out, t, w.hidden, w.intermediate,
                    w.intermediate, w.intermediate, w.hidden, dtype, num_threads);
    if (status != MSD_OK) return status;
    if (w.next_norm != nullptr) {
        return add_rms_norm(out, s.residual, w.next_norm, s.h, t, w.hidden, w.hidden,
                            s.residual_row_stride, s.h_row_stride, w.rms_norm_eps, dtype);
    }
    return add_residual(out, s.residual, t, w.hidden, w.hidden, s.residual_row_stride, dtype);
}

}  // namespace msd::cpu
