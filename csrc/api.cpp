// The C API: argument checks, then dispatch to the CPU or CUDA kernels. Every check names
// the argument it rejects in msd_last_error_message(); kernels never see invalid input.
#include <cmath>
#include <cstdarg>
#include <cstdio>

#include "internal.h"

namespace msd {
namespace {

thread_local char last_error[512] = "";

// Each check returns MSD_OK or sets the error; CHECK_ARG returns early on failure.
#define CHECK_ARG(expr)                                    \
    do {                                                   \
        const msd_status check_status_ = (expr);           \
        if (check_status_ != MSD_OK) return check_status_; \
    } while (0)

msd_status check_pointer(const void* p, const char* name) {
    if (p != nullptr) return MSD_OK;
    return set_error(MSD_ERR_INVALID_ARGUMENT, "%s is a null pointer", name);
}

msd_status check_positive(int64_t value, const char* name) {
    if (value > 0) return MSD_OK;
    return set_error(MSD_ERR_INVALID_ARGUMENT, "%s must be positive, got %lld", name,
                     static_cast<long long>(value));
}

msd_status check_stride(int64_t stride, int64_t row_length, const char* name) {
    if (stride >= row_length) return MSD_OK;
    return set_error(MSD_ERR_INVALID_ARGUMENT, "%s (%lld) is smaller than the row length (%lld)",
                     name, static_cast<long long>(stride), static_cast<long long>(row_length));
}

msd_status check_eps(float eps) {
    if (std::isfinite(eps) && eps >= 0.0f) return MSD_OK;
    return set_error(MSD_ERR_INVALID_ARGUMENT, "eps must be finite and >= 0, got %g",
                     static_cast<double>(eps));
}

msd_status check_dtype(msd_dtype dtype) {
    const int value = static_cast<int>(dtype);
    if (value == MSD_FLOAT32 || value == MSD_FLOAT16 || value == MSD_BFLOAT16) return MSD_OK;
    return set_error(MSD_ERR_UNSUPPORTED_DTYPE,
                     "dtype %d is not one of MSD_FLOAT32, MSD_FLOAT16, MSD_BFLOAT16", value);
}

msd_status check_rms_norm(const void* x, const void* weight, const void* out, int64_t rows,
                          int64_t dim, int64_t x_row_stride, int64_t out_row_stride, float eps,
                          msd_dtype dtype) {
    clear_error();
    CHECK_ARG(check_pointer(x, "x"));
    CHECK_ARG(check_pointer(weight, "weight"));
    CHECK_ARG(check_pointer(out, "out"));
    CHECK_ARG(check_positive(rows, "rows"));
    CHECK_ARG(check_positive(dim, "dim"));
    CHECK_ARG(check_stride(x_row_stride, dim, "x_row_stride"));
    CHECK_ARG(check_stride(out_row_stride, dim, "out_row_stride"));
    CHECK_ARG(check_eps(eps));
    return check_dtype(dtype);
}

msd_status check_add_rms_norm(const void* x, const void* residual, const void* weight,
                              const void* out, int64_t rows, int64_t dim, int64_t x_row_stride,
                              int64_t residual_row_stride, int64_t out_row_stride, float eps,
                              msd_dtype dtype) {
    CHECK_ARG(check_rms_norm(x, weight, out, rows, dim, x_row_stride, out_row_stride, eps, dtype));
    CHECK_ARG(check_pointer(residual, "residual"));
    return check_stride(residual_row_stride, dim, "residual_row_stride");
}

msd_status check_silu_mul(const void* gate_up, const void* out, int64_t rows, int64_t inter,
                          int64_t gate_up_row_stride, int64_t out_row_stride, msd_dtype dtype) {
    clear_error();
    CHECK_ARG(check_pointer(gate_up, "gate_up"));
    CHECK_ARG(check_pointer(out, "out"));
    CHECK_ARG(check_positive(rows, "rows"));
    CHECK_ARG(check_positive(inter, "inter"));
    CHECK_ARG(check_stride(gate_up_row_stride, 2 * inter, "gate_up_row_stride"));
    CHECK_ARG(check_stride(out_row_stride, inter, "out_row_stride"));
    return check_dtype(dtype);
}

msd_status check_linear(const void* x, const void* weight, const void* out, int64_t m, int64_t n,
                        int64_t k, int64_t x_row_stride, int64_t weight_row_stride,
                        int64_t out_row_stride, msd_dtype dtype) {
    clear_error();
    CHECK_ARG(check_pointer(x, "x"));
    CHECK_ARG(check_pointer(weight, "weight"));
    CHECK_ARG(check_pointer(out, "out"));  // bias may be NULL
    CHECK_ARG(check_positive(m, "m"));
    CHECK_ARG(check_positive(n, "n"));
    CHECK_ARG(check_positive(k, "k"));
    CHECK_ARG(check_stride(x_row_stride, k, "x_row_stride"));
    CHECK_ARG(check_stride(weight_row_stride, k, "weight_row_stride"));
    CHECK_ARG(check_stride(out_row_stride, n, "out_row_stride"));
    return check_dtype(dtype);
}

msd_status check_non_negative(int64_t value, const char* name) {
    if (value >= 0) return MSD_OK;
    return set_error(MSD_ERR_INVALID_ARGUMENT, "%s must be >= 0, got %lld", name,
                     static_cast<long long>(value));
}

// The queries, kv heads and region of a tree attention call (everything but pointers/strides).
msd_status check_attention_sizes(int64_t num_queries, int64_t num_heads, int64_t num_kv_heads,
                                 int64_t head_dim, int64_t prefix_len, int64_t region) {
    CHECK_ARG(check_positive(num_queries, "num_queries"));
    CHECK_ARG(check_positive(num_heads, "num_heads"));
    CHECK_ARG(check_positive(num_kv_heads, "num_kv_heads"));
    CHECK_ARG(check_positive(head_dim, "head_dim"));
    if (num_heads % num_kv_heads != 0) {
        return set_error(MSD_ERR_INVALID_ARGUMENT,
                         "num_heads (%lld) is not a multiple of num_kv_heads (%lld)",
                         static_cast<long long>(num_heads), static_cast<long long>(num_kv_heads));
    }
    CHECK_ARG(check_non_negative(prefix_len, "prefix_len"));
    if (region < num_queries) {
        return set_error(MSD_ERR_INVALID_ARGUMENT,
                         "region (%lld) is smaller than num_queries (%lld): the queries' own "
                         "entries are the last num_queries region slots",
                         static_cast<long long>(region), static_cast<long long>(num_queries));
    }
    return MSD_OK;
}

// Distinct (row, head) rows of an output `name` (strides `row_name`, `head_name`), given
// strides >= head_dim: heads nested inside rows ([T, H, D]) or rows inside heads ([H, T, D]).
msd_status check_out_rows(int64_t num_rows, int64_t num_heads, int64_t head_dim,
                          int64_t row_stride, int64_t head_stride, const char* name = "out",
                          const char* row_name = "out_row_stride",
                          const char* head_name = "out_head_stride") {
    if (num_rows == 1 || num_heads == 1 || row_stride >= num_heads * head_stride ||
        head_stride >= num_rows * row_stride) {
        return MSD_OK;
    }
    return set_error(MSD_ERR_INVALID_ARGUMENT,
                     "%s (%lld) and %s (%lld) make the [%lld, %lld] rows of %lld elements of %s "
                     "overlap",
                     row_name, static_cast<long long>(row_stride), head_name,
                     static_cast<long long>(head_stride), static_cast<long long>(num_rows),
                     static_cast<long long>(num_heads), static_cast<long long>(head_dim), name);
}

msd_status check_tree_attention(const void* q, const void* k_cache, const void* v_cache,
                                const void* out, int64_t num_queries, int64_t num_heads,
                                int64_t num_kv_heads, int64_t head_dim, int64_t prefix_len,
                                int64_t region, int64_t q_row_stride, int64_t q_head_stride,
                                int64_t kv_head_stride, int64_t kv_slot_stride,
                                int64_t out_row_stride, int64_t out_head_stride, float sm_scale,
                                msd_dtype dtype) {
    clear_error();
    CHECK_ARG(check_pointer(q, "q"));
    CHECK_ARG(check_pointer(k_cache, "k_cache"));
    CHECK_ARG(check_pointer(v_cache, "v_cache"));
    CHECK_ARG(check_pointer(out, "out"));  // mask_bits may be NULL
    CHECK_ARG(check_attention_sizes(num_queries, num_heads, num_kv_heads, head_dim, prefix_len,
                                    region));
    CHECK_ARG(check_stride(q_row_stride, head_dim, "q_row_stride"));
    CHECK_ARG(check_stride(q_head_stride, head_dim, "q_head_stride"));
    CHECK_ARG(check_stride(kv_head_stride, head_dim, "kv_head_stride"));
    CHECK_ARG(check_stride(kv_slot_stride, head_dim, "kv_slot_stride"));
    CHECK_ARG(check_stride(out_row_stride, head_dim, "out_row_stride"));
    CHECK_ARG(check_stride(out_head_stride, head_dim, "out_head_stride"));
    CHECK_ARG(check_out_rows(num_queries, num_heads, head_dim, out_row_stride, out_head_stride));
    if (!std::isfinite(sm_scale)) {
        return set_error(MSD_ERR_INVALID_ARGUMENT, "sm_scale must be finite, got %g",
                         static_cast<double>(sm_scale));
    }
    return check_dtype(dtype);
}

msd_status check_kv_compact(const void* arena, int64_t num_kv, int64_t num_layers,
                            int64_t num_kv_heads, int64_t max_slots, int64_t head_dim,
                            int64_t start, const void* nodes, int64_t num_nodes,
                            msd_dtype dtype) {
    clear_error();
    CHECK_ARG(check_pointer(arena, "arena"));
    CHECK_ARG(check_positive(num_kv, "num_kv"));
    CHECK_ARG(check_positive(num_layers, "num_layers"));
    CHECK_ARG(check_positive(num_kv_heads, "num_kv_heads"));
    CHECK_ARG(check_positive(max_slots, "max_slots"));
    CHECK_ARG(check_positive(head_dim, "head_dim"));
    CHECK_ARG(check_non_negative(start, "start"));
    CHECK_ARG(check_non_negative(num_nodes, "num_nodes"));
    if (num_nodes > 0) CHECK_ARG(check_pointer(nodes, "nodes"));
    if (start + num_nodes > max_slots) {
        return set_error(MSD_ERR_INVALID_ARGUMENT,
                         "start (%lld) + num_nodes (%lld) exceeds max_slots (%lld)",
                         static_cast<long long>(start), static_cast<long long>(num_nodes),
                         static_cast<long long>(max_slots));
    }
    return check_dtype(dtype);
}

// Host-side values of the CPU variant's nodes: j <= nodes[j] < max_slots - start.
msd_status check_nodes(const int64_t* nodes, int64_t num_nodes, int64_t start,
                       int64_t max_slots) {
    for (int64_t j = 0; j < num_nodes; ++j) {
        if (nodes[j] < j || start + nodes[j] >= max_slots) {
            return set_error(MSD_ERR_INVALID_ARGUMENT,
                             "nodes[%lld] = %lld: expected nodes[j] >= j (ascending) and start "
                             "(%lld) + nodes[j] < max_slots (%lld)",
                             static_cast<long long>(j), static_cast<long long>(nodes[j]),
                             static_cast<long long>(start), static_cast<long long>(max_slots));
        }
    }
    return MSD_OK;
}

msd_status check_rope_kv_write(const void* q, const void* k, const void* v, const void* cos,
                               const void* sin, void* q_out, void* k_cache, void* v_cache,
                               int64_t num_tokens, int64_t num_heads, int64_t num_kv_heads,
                               int64_t head_dim, int64_t start, int64_t num_slots,
                               int64_t q_row_stride, int64_t q_head_stride, int64_t kv_row_stride,
                               int64_t kv_head_stride, int64_t table_row_stride,
                               int64_t q_out_row_stride, int64_t q_out_head_stride,
                               int64_t cache_head_stride, int64_t cache_slot_stride,
                               msd_dtype dtype, RopeKvWrite* args) {
    clear_error();
    const void* pointers[] = {q, k, v, cos, sin, q_out, k_cache, v_cache};
    const char* names[] = {"q", "k", "v", "cos", "sin", "q_out", "k_cache", "v_cache"};
    for (int i = 0; i < 8; ++i) CHECK_ARG(check_pointer(pointers[i], names[i]));
    CHECK_ARG(check_positive(num_tokens, "num_tokens"));
    CHECK_ARG(check_positive(num_heads, "num_heads"));
    CHECK_ARG(check_positive(num_kv_heads, "num_kv_heads"));
    CHECK_ARG(check_positive(head_dim, "head_dim"));
    if (head_dim % 2 != 0) {
        return set_error(MSD_ERR_INVALID_ARGUMENT, "head_dim must be even, got %lld",
                         static_cast<long long>(head_dim));
    }
    CHECK_ARG(check_non_negative(start, "start"));
    CHECK_ARG(check_positive(num_slots, "num_slots"));
    if (start + num_tokens > num_slots) {
        return set_error(MSD_ERR_INVALID_ARGUMENT,
                         "start (%lld) + num_tokens (%lld) exceeds num_slots (%lld)",
                         static_cast<long long>(start), static_cast<long long>(num_tokens),
                         static_cast<long long>(num_slots));
    }
    CHECK_ARG(check_stride(q_row_stride, head_dim, "q_row_stride"));
    CHECK_ARG(check_stride(q_head_stride, head_dim, "q_head_stride"));
    CHECK_ARG(check_stride(kv_row_stride, head_dim, "kv_row_stride"));
    CHECK_ARG(check_stride(kv_head_stride, head_dim, "kv_head_stride"));
    CHECK_ARG(check_stride(table_row_stride, head_dim, "table_row_stride"));
    CHECK_ARG(check_stride(q_out_row_stride, head_dim, "q_out_row_stride"));
    CHECK_ARG(check_stride(q_out_head_stride, head_dim, "q_out_head_stride"));
    CHECK_ARG(check_stride(cache_head_stride, head_dim, "cache_head_stride"));
    CHECK_ARG(check_stride(cache_slot_stride, head_dim, "cache_slot_stride"));
    CHECK_ARG(check_out_rows(num_tokens, num_heads, head_dim, q_out_row_stride,
                             q_out_head_stride, "q_out", "q_out_row_stride",
                             "q_out_head_stride"));
    CHECK_ARG(check_out_rows(num_slots, num_kv_heads, head_dim, cache_slot_stride,
                             cache_head_stride, "k_cache / v_cache", "cache_slot_stride",
                             "cache_head_stride"));
    CHECK_ARG(check_dtype(dtype));
    *args = RopeKvWrite{q, k, v, cos, sin, q_out, k_cache, v_cache, num_tokens, num_heads,
                        num_kv_heads, head_dim, start, q_row_stride, q_head_stride,
                        kv_row_stride, kv_head_stride, table_row_stride, q_out_row_stride,
                        q_out_head_stride, cache_head_stride, cache_slot_stride, dtype};
    return MSD_OK;
}

// A read-only [rows, length] input may also repeat one row for all (stride 0, torch's expand).
msd_status check_input_stride(int64_t stride, int64_t row_length, const char* name) {
    if (stride == 0 || stride >= row_length) return MSD_OK;
    return set_error(MSD_ERR_INVALID_ARGUMENT,
                     "%s (%lld) must be 0 (one row for all) or at least the row length (%lld)",
                     name, static_cast<long long>(stride), static_cast<long long>(row_length));
}

// The pointers, sizes and strides of a msd_draft_inputs_* call; fills `args` when they pass.
msd_status check_draft_inputs(const int64_t* token_ids, const uint8_t* is_image,
                              const void* embed, const void* image_rows, const void* features,
                              const void* fc_weight, const void* fc_bias, void* out,
                              int64_t num_rows, int64_t hidden, int64_t vocab_size,
                              int64_t embed_row_stride, int64_t image_rows_row_stride,
                              int64_t features_row_stride, int64_t fc_weight_row_stride,
                              int64_t out_row_stride, int bypass, msd_dtype dtype,
                              DraftInputs* args) {
    clear_error();
    CHECK_ARG(check_pointer(token_ids, "token_ids"));
    CHECK_ARG(check_pointer(embed, "embed"));
    CHECK_ARG(check_pointer(features, "features"));
    CHECK_ARG(check_pointer(fc_weight, "fc_weight"));
    CHECK_ARG(check_pointer(out, "out"));  // is_image, image_rows and fc_bias may be NULL
    if (image_rows != nullptr && is_image == nullptr) {
        return set_error(MSD_ERR_INVALID_ARGUMENT,
                         "image_rows is given but is_image is NULL: which rows are images?");
    }
    CHECK_ARG(check_positive(num_rows, "num_rows"));
    CHECK_ARG(check_positive(hidden, "hidden"));
    CHECK_ARG(check_positive(vocab_size, "vocab_size"));
    CHECK_ARG(check_stride(embed_row_stride, hidden, "embed_row_stride"));
    if (image_rows != nullptr) {
        CHECK_ARG(check_input_stride(image_rows_row_stride, hidden, "image_rows_row_stride"));
    }
    CHECK_ARG(check_input_stride(features_row_stride, hidden, "features_row_stride"));
    CHECK_ARG(check_stride(fc_weight_row_stride, 2 * hidden, "fc_weight_row_stride"));
    CHECK_ARG(check_stride(out_row_stride, hidden, "out_row_stride"));
    CHECK_ARG(check_dtype(dtype));
    *args = DraftInputs{token_ids, is_image, embed, image_rows, features, fc_weight, fc_bias, out,
                        num_rows, hidden, vocab_size, embed_row_stride, image_rows_row_stride,
                        features_row_stride, fc_weight_row_stride, out_row_stride,
                        bypass != 0 && is_image != nullptr, dtype};
    return MSD_OK;
}

// Host-side token ids of the CPU variant: in [0, vocab_size) wherever they are read.
msd_status check_token_ids(const DraftInputs& args) {
    for (int64_t t = 0; t < args.rows; ++t) {
        if (args.is_image != nullptr && args.is_image[t] != 0) continue;  // never read
        const int64_t token = args.token_ids[t];
        if (token < 0 || token >= args.vocab_size) {
            return set_error(MSD_ERR_INVALID_ARGUMENT,
                             "token_ids[%lld] = %lld is outside [0, vocab_size = %lld)",
                             static_cast<long long>(t), static_cast<long long>(token),
                             static_cast<long long>(args.vocab_size));
        }
    }
    return MSD_OK;
}

// Whether byte ranges [a, a + a_bytes) and [b, b + b_bytes) share a byte.
bool overlaps(const void* a, int64_t a_bytes, const void* b, int64_t b_bytes) {
    const auto a0 = reinterpret_cast<uintptr_t>(a), b0 = reinterpret_cast<uintptr_t>(b);
    return a0 < b0 + static_cast<uintptr_t>(b_bytes) && b0 < a0 + static_cast<uintptr_t>(a_bytes);
}

msd_status check_decoder_weights(const msd_decoder_layer* layer) {
    CHECK_ARG(check_pointer(layer, "layer"));
    const void* pointers[] = {layer->qkv_weight, layer->o_weight, layer->post_attention_norm,
                              layer->gate_up_weight, layer->down_weight};
    const char* names[] = {"layer->qkv_weight", "layer->o_weight", "layer->post_attention_norm",
                           "layer->gate_up_weight", "layer->down_weight"};
    for (int i = 0; i < 5; ++i) CHECK_ARG(check_pointer(pointers[i], names[i]));  // next_norm may be NULL
    CHECK_ARG(check_positive(layer->hidden, "layer->hidden"));
    CHECK_ARG(check_positive(layer->intermediate, "layer->intermediate"));
    CHECK_ARG(check_attention_sizes(1, layer->num_heads, layer->num_kv_heads, layer->head_dim, 0, 1));
    if (layer->head_dim % 2 != 0) {
        return set_error(MSD_ERR_INVALID_ARGUMENT, "layer->head_dim must be even, got %lld",
                         static_cast<long long>(layer->head_dim));
    }
    CHECK_ARG(check_eps(layer->rms_norm_eps));
    if (!std::isfinite(layer->sm_scale)) {
        return set_error(MSD_ERR_INVALID_ARGUMENT, "layer->sm_scale must be finite, got %g",
                         static_cast<double>(layer->sm_scale));
    }
    return MSD_OK;
}

// The step operands of a msd_decoder_layer_cpu call, gathered into `s`.
msd_status check_decoder_layer(const msd_decoder_layer* layer, const DecoderStep& s,
                               int64_t num_slots, msd_dtype dtype) {
    clear_error();
    CHECK_ARG(check_decoder_weights(layer));
    const void* pointers[] = {s.h, s.residual, s.cos, s.sin, s.k_cache, s.v_cache};
    const char* names[] = {"h", "residual", "cos", "sin", "k_cache", "v_cache"};
    for (int i = 0; i < 6; ++i) CHECK_ARG(check_pointer(pointers[i], names[i]));  // mask_bits may be NULL
    CHECK_ARG(check_positive(s.num_tokens, "num_tokens"));
    CHECK_ARG(check_stride(s.h_row_stride, layer->hidden, "h_row_stride"));
    CHECK_ARG(check_stride(s.residual_row_stride, layer->hidden, "residual_row_stride"));
    CHECK_ARG(check_stride(s.table_row_stride, layer->head_dim, "table_row_stride"));
    CHECK_ARG(check_positive(num_slots, "num_slots"));
    CHECK_ARG(check_stride(s.cache_head_stride, layer->head_dim, "cache_head_stride"));
    CHECK_ARG(check_stride(s.cache_slot_stride, layer->head_dim, "cache_slot_stride"));
    CHECK_ARG(check_out_rows(num_slots, layer->num_kv_heads, layer->head_dim, s.cache_slot_stride,
                             s.cache_head_stride, "k_cache / v_cache", "cache_slot_stride",
                             "cache_head_stride"));
    CHECK_ARG(check_non_negative(s.start, "start"));
    if (s.start + s.num_tokens > num_slots) {
        return set_error(MSD_ERR_INVALID_ARGUMENT,
                         "start (%lld) + num_tokens (%lld) exceeds num_slots (%lld)",
                         static_cast<long long>(s.start), static_cast<long long>(s.num_tokens),
                         static_cast<long long>(num_slots));
    }
    if (s.prefix_len < 0 || s.prefix_len > s.start) {
        return set_error(MSD_ERR_INVALID_ARGUMENT, "prefix_len (%lld) must be in [0, start = %lld]",
                         static_cast<long long>(s.prefix_len), static_cast<long long>(s.start));
    }
    CHECK_ARG(check_dtype(dtype));
    const int64_t element = dtype_bytes(dtype);
    const int64_t rows_bytes_h = ((s.num_tokens - 1) * s.h_row_stride + layer->hidden) * element;
    const int64_t rows_bytes_r =
        ((s.num_tokens - 1) * s.residual_row_stride + layer->hidden) * element;
    if (overlaps(s.h, rows_bytes_h, s.residual, rows_bytes_r)) {
        return set_error(MSD_ERR_INVALID_ARGUMENT, "h and residual overlap");
    }
    return MSD_OK;
}

// The draft head's weights, tables and cache (msd_draft_tree_cpu, msd_draft_extend_cpu).
msd_status check_draft_head(const msd_draft_head* head) {
    CHECK_ARG(check_pointer(head, "head"));
    CHECK_ARG(check_decoder_weights(head->layer));
    if (head->layer->next_norm != nullptr) {
        return set_error(MSD_ERR_INVALID_ARGUMENT,
                         "head->layer->next_norm must be NULL (no norm after the draft layer)");
    }
    const void* pointers[] = {head->embed, head->fc_weight, head->lm_head, head->cos, head->sin, head->k_cache,
                              head->v_cache};
    const char* names[] = {"head->embed", "head->fc_weight", "head->lm_head", "head->cos", "head->sin",
                           "head->k_cache", "head->v_cache"};
    for (int i = 0; i < 7; ++i) CHECK_ARG(check_pointer(pointers[i], names[i]));  // fc_bias, vocab_ids may be NULL
    CHECK_ARG(check_positive(head->vocab_size, "head->vocab_size"));
    CHECK_ARG(check_positive(head->draft_vocab, "head->draft_vocab"));
    CHECK_ARG(check_positive(head->max_positions, "head->max_positions"));
    CHECK_ARG(check_positive(head->num_slots, "head->num_slots"));
    if (head->vocab_ids == nullptr && head->draft_vocab > head->vocab_size) {
        return set_error(MSD_ERR_INVALID_ARGUMENT,
                         "head->draft_vocab (%lld) exceeds head->vocab_size (%lld) with no head->vocab_ids",
                         static_cast<long long>(head->draft_vocab), static_cast<long long>(head->vocab_size));
    }
    CHECK_ARG(check_dtype(head->dtype));
    CHECK_ARG(check_stride(head->cache_head_stride, head->layer->head_dim, "head->cache_head_stride"));
    CHECK_ARG(check_stride(head->cache_slot_stride, head->layer->head_dim, "head->cache_slot_stride"));
    CHECK_ARG(check_out_rows(head->num_slots, head->layer->num_kv_heads, head->layer->head_dim,
                             head->cache_slot_stride, head->cache_head_stride, "head->k_cache / v_cache",
                             "head->cache_slot_stride", "head->cache_head_stride"));
    return MSD_OK;
}

#if !defined(MSD_ENGINE_WITH_CUDA)
msd_status cuda_not_compiled(const char* function) {
    return set_error(MSD_ERR_NOT_COMPILED,
                     "%s: libmsd_kernels was built without CUDA (MSD_ENGINE_WITH_CUDA=OFF)",
                     function);
}
#endif

}  // namespace

namespace attention_plan {

int64_t max_splits(int64_t num_keys) {
    const int64_t by_length = (num_keys + kMinKeysPerSplit - 1) / kMinKeysPerSplit;
    return by_length < 1 ? 1 : (by_length > kMaxSplits ? kMaxSplits : by_length);
}

int64_t bytes_per_split(int64_t num_rows, int64_t head_dim) {
    return num_rows * (head_dim + 1) * static_cast<int64_t>(sizeof(float));
}

}  // namespace attention_plan

msd_status set_error(msd_status status, const char* format, ...) {
    va_list args;
    va_start(args, format);
    std::vsnprintf(last_error, sizeof last_error, format, args);
    va_end(args);
    return status;
}

void clear_error() { last_error[0] = '\0'; }

}  // namespace msd

extern "C" {

const char* msd_status_string(msd_status status) {
    switch (status) {
        case MSD_OK: return "ok";
        case MSD_ERR_INVALID_ARGUMENT: return "invalid argument";
        case MSD_ERR_UNSUPPORTED_DTYPE: return "unsupported dtype";
        case MSD_ERR_CUDA: return "CUDA error";
        case MSD_ERR_NOT_COMPILED: return "not compiled";
        case MSD_ERR_OUT_OF_MEMORY: return "out of memory";
    }
    return "unknown status";
}

const char* msd_last_error_message(void) { return msd::last_error; }

int msd_cuda_compiled(void) {
#if defined(MSD_ENGINE_WITH_CUDA)
    return 1;
#else
    return 0;
#endif
}

int msd_cuda_device_count(void) {
#if defined(MSD_ENGINE_WITH_CUDA)
    return msd::cuda::device_count();
#else
    return 0;
#endif
}

msd_status msd_rms_norm_cpu(const void* x, const void* weight, void* out, int64_t rows,
                            int64_t dim, int64_t x_row_stride, int64_t out_row_stride, float eps,
                            msd_dtype dtype) {
    CHECK_ARG(msd::check_rms_norm(x, weight, out, rows, dim, x_row_stride, out_row_stride, eps,
                                  dtype));
    return msd::cpu::rms_norm(x, weight, out, rows, dim, x_row_stride, out_row_stride, eps, dtype);
}

msd_status msd_add_rms_norm_cpu(const void* x, void* residual, const void* weight, void* out,
                                int64_t rows, int64_t dim, int64_t x_row_stride,
                                int64_t residual_row_stride, int64_t out_row_stride, float eps,
                                msd_dtype dtype) {
    CHECK_ARG(msd::check_add_rms_norm(x, residual, weight, out, rows, dim, x_row_stride,
                                      residual_row_stride, out_row_stride, eps, dtype));
    return msd::cpu::add_rms_norm(x, residual, weight, out, rows, dim, x_row_stride,
                                  residual_row_stride, out_row_stride, eps, dtype);
}

msd_status msd_silu_mul_cpu(const void* gate_up, void* out, int64_t rows, int64_t inter,
                            int64_t gate_up_row_stride, int64_t out_row_stride, msd_dtype dtype) {
    CHECK_ARG(msd::check_silu_mul(gate_up, out, rows, inter, gate_up_row_stride, out_row_stride,
                                  dtype));
    return msd::cpu::silu_mul(gate_up, out, rows, inter, gate_up_row_stride, out_row_stride,
                              dtype);
}

msd_status msd_linear_cpu(const void* x, const void* weight, const void* bias, void* out,
                          int64_t m, int64_t n, int64_t k, int64_t x_row_stride,
                          int64_t weight_row_stride, int64_t out_row_stride, msd_dtype dtype,
                          int num_threads) {
    CHECK_ARG(msd::check_linear(x, weight, out, m, n, k, x_row_stride, weight_row_stride,
                                out_row_stride, dtype));
    return msd::cpu::linear(x, weight, bias, out, m, n, k, x_row_stride, weight_row_stride,
                            out_row_stride, dtype, num_threads);
}

msd_status msd_logsoftmax_topk_cpu(const void* logits, float* values, int64_t* indices,
                                   int64_t rows, int64_t n, int64_t k, int64_t logits_row_stride,
                                   msd_dtype dtype) {
    msd::clear_error();
    CHECK_ARG(msd::check_pointer(logits, "logits"));
    CHECK_ARG(msd::check_pointer(values, "values"));
    CHECK_ARG(msd::check_pointer(indices, "indices"));
    CHECK_ARG(msd::check_positive(rows, "rows"));
    CHECK_ARG(msd::check_positive(n, "n"));
    CHECK_ARG(msd::check_positive(k, "k"));
    if (k > n) {
        return msd::set_error(MSD_ERR_INVALID_ARGUMENT, "k (%lld) is larger than the row length n (%lld)",
                              static_cast<long long>(k), static_cast<long long>(n));
    }
    CHECK_ARG(msd::check_stride(logits_row_stride, n, "logits_row_stride"));
    CHECK_ARG(msd::check_dtype(dtype));
    return msd::cpu::logsoftmax_topk(logits, values, indices, rows, n, k, logits_row_stride, dtype);
}

msd_status msd_tree_attention_cpu(const void* q, const void* k_cache, const void* v_cache,
                                  const int32_t* mask_bits, void* out, int64_t num_queries,
                                  int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                                  int64_t prefix_len, int64_t region, int64_t q_row_stride,
                                  int64_t q_head_stride, int64_t kv_head_stride,
                                  int64_t kv_slot_stride, int64_t out_row_stride,
                                  int64_t out_head_stride, float sm_scale, msd_dtype dtype) {
    CHECK_ARG(msd::check_tree_attention(q, k_cache, v_cache, out, num_queries, num_heads,
                                        num_kv_heads, head_dim, prefix_len, region, q_row_stride,
                                        q_head_stride, kv_head_stride, kv_slot_stride,
                                        out_row_stride, out_head_stride, sm_scale, dtype));
    return msd::cpu::tree_attention(q, k_cache, v_cache, mask_bits, out, num_queries, num_heads,
                                    num_kv_heads, head_dim, prefix_len, region, q_row_stride,
                                    q_head_stride, kv_head_stride, kv_slot_stride, out_row_stride,
                                    out_head_stride, sm_scale, dtype);
}

msd_status msd_tree_attention_cuda_workspace_bytes(int64_t num_queries, int64_t num_heads,
                                                   int64_t head_dim, int64_t prefix_len,
                                                   int64_t region, int64_t* bytes) {
    msd::clear_error();
    CHECK_ARG(msd::check_pointer(bytes, "bytes"));
    CHECK_ARG(msd::check_attention_sizes(num_queries, num_heads, 1, head_dim, prefix_len, region));
    const int64_t splits = msd::attention_plan::max_splits(prefix_len + region);
    *bytes = splits <= 1 ? 0
                         : splits * msd::attention_plan::bytes_per_split(num_heads * num_queries,
                                                                         head_dim);
    return MSD_OK;
}

msd_status msd_kv_compact_cpu(void* arena, int64_t num_kv, int64_t num_layers,
                              int64_t num_kv_heads, int64_t max_slots, int64_t head_dim,
                              int64_t start, const int64_t* nodes, int64_t num_nodes,
                              msd_dtype dtype) {
    CHECK_ARG(msd::check_kv_compact(arena, num_kv, num_layers, num_kv_heads, max_slots, head_dim,
                                    start, nodes, num_nodes, dtype));
    CHECK_ARG(msd::check_nodes(nodes, num_nodes, start, max_slots));
    return msd::cpu::kv_compact(arena, num_kv * num_layers * num_kv_heads, max_slots, head_dim,
                                start, nodes, num_nodes, dtype);
}

msd_status msd_draft_inputs_cpu(const int64_t* token_ids, const uint8_t* is_image,
                                const void* embed, const void* image_rows, const void* features,
                                const void* fc_weight, const void* fc_bias, void* out,
                                int64_t num_rows, int64_t hidden, int64_t vocab_size,
                                int64_t embed_row_stride, int64_t image_rows_row_stride,
                                int64_t features_row_stride, int64_t fc_weight_row_stride,
                                int64_t out_row_stride, int bypass, msd_dtype dtype,
                                int num_threads) {
    msd::DraftInputs args;
    CHECK_ARG(msd::check_draft_inputs(token_ids, is_image, embed, image_rows, features, fc_weight,
                                      fc_bias, out, num_rows, hidden, vocab_size,
                                      embed_row_stride, image_rows_row_stride,
                                      features_row_stride, fc_weight_row_stride, out_row_stride,
                                      bypass, dtype, &args));
    CHECK_ARG(msd::check_token_ids(args));
    return msd::cpu::draft_inputs(args, num_threads);
}

msd_status msd_rope_kv_write_cpu(const void* q, const void* k, const void* v, const void* cos,
                                 const void* sin, void* q_out, void* k_cache, void* v_cache,
                                 int64_t num_tokens, int64_t num_heads, int64_t num_kv_heads,
                                 int64_t head_dim, int64_t start, int64_t num_slots,
                                 int64_t q_row_stride, int64_t q_head_stride,
                                 int64_t kv_row_stride, int64_t kv_head_stride,
                                 int64_t table_row_stride, int64_t q_out_row_stride,
                                 int64_t q_out_head_stride, int64_t cache_head_stride,
                                 int64_t cache_slot_stride, msd_dtype dtype) {
    msd::RopeKvWrite args;
    CHECK_ARG(msd::check_rope_kv_write(q, k, v, cos, sin, q_out, k_cache, v_cache, num_tokens,
                                       num_heads, num_kv_heads, head_dim, start, num_slots,
                                       q_row_stride, q_head_stride, kv_row_stride,
                                       kv_head_stride, table_row_stride, q_out_row_stride,
                                       q_out_head_stride, cache_head_stride, cache_slot_stride,
                                       dtype, &args));
    return msd::cpu::rope_kv_write(args);
}

msd_status msd_decoder_layer_cpu(const msd_decoder_layer* layer, void* h, void* residual,
                                 int64_t num_tokens, int64_t h_row_stride,
                                 int64_t residual_row_stride, const void* cos, const void* sin,
                                 int64_t table_row_stride, void* k_cache, void* v_cache,
                                 int64_t num_slots, int64_t cache_head_stride,
                                 int64_t cache_slot_stride, int64_t start, int64_t prefix_len,
                                 const int32_t* mask_bits, msd_dtype dtype, int num_threads) {
    const msd::DecoderStep step{h, residual, num_tokens, h_row_stride, residual_row_stride, cos, sin,
                                table_row_stride, k_cache, v_cache, cache_head_stride,
                                cache_slot_stride, start, prefix_len, mask_bits};
    CHECK_ARG(msd::check_decoder_layer(layer, step, num_slots, dtype));
    return msd::cpu::decoder_layer(*layer, step, dtype, num_threads);
}

msd_status msd_draft_extend_cpu(const msd_draft_head* head, const int64_t* token_ids, const void* features,
                                int64_t num_tokens, int64_t features_row_stride, int64_t committed, void* hidden,
                                int64_t hidden_row_stride, int num_threads) {
    msd::clear_error();
    CHECK_ARG(msd::check_draft_head(head));
    CHECK_ARG(msd::check_pointer(token_ids, "token_ids"));
    CHECK_ARG(msd::check_pointer(features, "features"));
    CHECK_ARG(msd::check_pointer(hidden, "hidden"));
    if (num_tokens < 1 || num_tokens > 16) {
        return msd::set_error(MSD_ERR_INVALID_ARGUMENT, "num_tokens must be in [1, 16], got %lld",
                              static_cast<long long>(num_tokens));
    }
    const int64_t h = head->layer->hidden;
    CHECK_ARG(msd::check_input_stride(features_row_stride, h, "features_row_stride"));
    CHECK_ARG(msd::check_stride(hidden_row_stride, h, "hidden_row_stride"));
    CHECK_ARG(msd::check_non_negative(committed, "committed"));
    if (committed > head->num_slots - num_tokens || committed > head->max_positions - num_tokens) {
        return msd::set_error(MSD_ERR_INVALID_ARGUMENT,
                              "committed (%lld) + num_tokens (%lld) exceeds num_slots (%lld) or max_positions (%lld)",
                              static_cast<long long>(committed), static_cast<long long>(num_tokens),
                              static_cast<long long>(head->num_slots), static_cast<long long>(head->max_positions));
    }
    msd::DraftInputs rows{};  // the ids as msd_draft_inputs_cpu checks them
    rows.token_ids = token_ids;
    rows.rows = num_tokens;
    rows.vocab_size = head->vocab_size;
    CHECK_ARG(msd::check_token_ids(rows));
    return msd::cpu::draft_extend(*head, token_ids, features, num_tokens, features_row_stride, committed, hidden,
                                  hidden_row_stride, num_threads);
}

msd_status msd_draft_tree_cpu(const msd_draft_head* head, const void* last_hidden, int64_t committed,
                              int64_t root_token, int64_t top_k, int64_t depth, int64_t total_tokens,
                              int64_t* tokens, int64_t* parents, int64_t* num_nodes, int num_threads) {
    msd::clear_error();
    CHECK_ARG(msd::check_draft_head(head));
    const void* pointers[] = {last_hidden, tokens, parents, num_nodes};
    const char* names[] = {"last_hidden", "tokens", "parents", "num_nodes"};
    for (int i = 0; i < 4; ++i) CHECK_ARG(msd::check_pointer(pointers[i], names[i]));
    if (top_k < 1 || top_k > 16 || top_k > head->draft_vocab) {
        return msd::set_error(MSD_ERR_INVALID_ARGUMENT, "top_k must be in [1, min(16, draft_vocab = %lld)], got %lld",
                              static_cast<long long>(head->draft_vocab), static_cast<long long>(top_k));
    }
    CHECK_ARG(msd::check_non_negative(depth, "depth"));
    CHECK_ARG(msd::check_positive(total_tokens, "total_tokens"));
    CHECK_ARG(msd::check_non_negative(committed, "committed"));
    if (depth > head->num_slots || committed > head->num_slots - depth * top_k || depth > head->max_positions ||
        committed > head->max_positions - depth) {
        return msd::set_error(MSD_ERR_INVALID_ARGUMENT,
                              "committed (%lld) + depth (%lld) x top_k (%lld) scratch slots exceed num_slots (%lld), "
                              "or committed + depth exceeds max_positions (%lld)",
                              static_cast<long long>(committed), static_cast<long long>(depth),
                              static_cast<long long>(top_k), static_cast<long long>(head->num_slots),
                              static_cast<long long>(head->max_positions));
    }
    return msd::cpu::draft_tree(*head, last_hidden, committed, root_token, top_k, depth, total_tokens, tokens,
                                parents, num_nodes, num_threads);
}

msd_status msd_set_cpu_spin_us(int microseconds) {
    msd::clear_error();
    if (microseconds < 0 || microseconds > 1000000) {
        return msd::set_error(MSD_ERR_INVALID_ARGUMENT,
                              "microseconds must be in [0, 1000000], got %d", microseconds);
    }
    msd::cpu::set_spin_microseconds(microseconds);
    return MSD_OK;
}

msd_cpu_isa msd_get_cpu_isa(void) { return msd::cpu::get_isa(); }

msd_status msd_set_cpu_isa(int isa) {
    msd::clear_error();
    return msd::cpu::set_isa(isa);
}

#if defined(MSD_ENGINE_WITH_CUDA)

msd_status msd_rms_norm_cuda(const void* x, const void* weight, void* out, int64_t rows,
                             int64_t dim, int64_t x_row_stride, int64_t out_row_stride, float eps,
                             msd_dtype dtype, void* stream) {
    CHECK_ARG(msd::check_rms_norm(x, weight, out, rows, dim, x_row_stride, out_row_stride, eps,
                                  dtype));
    return msd::cuda::rms_norm(x, weight, out, rows, dim, x_row_stride, out_row_stride, eps,
                               dtype, stream);
}

msd_status msd_add_rms_norm_cuda(const void* x, void* residual, const void* weight, void* out,
                                 int64_t rows, int64_t dim, int64_t x_row_stride,
                                 int64_t residual_row_stride, int64_t out_row_stride, float eps,
                                 msd_dtype dtype, void* stream) {
    CHECK_ARG(msd::check_add_rms_norm(x, residual, weight, out, rows, dim, x_row_stride,
                                      residual_row_stride, out_row_stride, eps, dtype));
    return msd::cuda::add_rms_norm(x, residual, weight, out, rows, dim, x_row_stride,
                                   residual_row_stride, out_row_stride, eps, dtype, stream);
}

msd_status msd_silu_mul_cuda(const void* gate_up, void* out, int64_t rows, int64_t inter,
                             int64_t gate_up_row_stride, int64_t out_row_stride, msd_dtype dtype,
                             void* stream) {
    CHECK_ARG(msd::check_silu_mul(gate_up, out, rows, inter, gate_up_row_stride, out_row_stride,
                                  dtype));
    return msd::cuda::silu_mul(gate_up, out, rows, inter, gate_up_row_stride, out_row_stride,
                               dtype, stream);
}

msd_status msd_tree_attention_cuda(const void* q, const void* k_cache, const void* v_cache,
                                   const int32_t* mask_bits, void* out, int64_t num_queries,
                                   int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                                   int64_t prefix_len, int64_t region, int64_t q_row_stride,
                                   int64_t q_head_stride, int64_t kv_head_stride,
                                   int64_t kv_slot_stride, int64_t out_row_stride,
                                   int64_t out_head_stride, float sm_scale, msd_dtype dtype,
                                   void* workspace, int64_t workspace_bytes, void* stream) {
    CHECK_ARG(msd::check_tree_attention(q, k_cache, v_cache, out, num_queries, num_heads,
                                        num_kv_heads, head_dim, prefix_len, region, q_row_stride,
                                        q_head_stride, kv_head_stride, kv_slot_stride,
                                        out_row_stride, out_head_stride, sm_scale, dtype));
    if (head_dim != 64 && head_dim != 128) {
        return msd::set_error(MSD_ERR_INVALID_ARGUMENT,
                              "head_dim %lld is not supported by msd_tree_attention_cuda "
                              "(64 or 128)", static_cast<long long>(head_dim));
    }
    CHECK_ARG(msd::check_non_negative(workspace_bytes, "workspace_bytes"));
    if (workspace_bytes > 0) CHECK_ARG(msd::check_pointer(workspace, "workspace"));
    return msd::cuda::tree_attention(q, k_cache, v_cache, mask_bits, out, num_queries, num_heads,
                                     num_kv_heads, head_dim, prefix_len, region, q_row_stride,
                                     q_head_stride, kv_head_stride, kv_slot_stride,
                                     out_row_stride, out_head_stride, sm_scale, dtype, workspace,
                                     workspace_bytes, stream);
}

msd_status msd_kv_compact_cuda(void* arena, int64_t num_kv, int64_t num_layers,
                               int64_t num_kv_heads, int64_t max_slots, int64_t head_dim,
                               int64_t start, const int64_t* nodes, int64_t num_nodes,
                               msd_dtype dtype, void* stream) {
    CHECK_ARG(msd::check_kv_compact(arena, num_kv, num_layers, num_kv_heads, max_slots, head_dim,
                                    start, nodes, num_nodes, dtype));
    return msd::cuda::kv_compact(arena, num_kv * num_layers * num_kv_heads, max_slots, head_dim,
                                 start, nodes, num_nodes, dtype, stream);
}

msd_status msd_draft_inputs_cuda(const int64_t* token_ids, const uint8_t* is_image,
                                 const void* embed, const void* image_rows, const void* features,
                                 const void* fc_weight, const void* fc_bias, void* out,
                                 int64_t num_rows, int64_t hidden, int64_t vocab_size,
                                 int64_t embed_row_stride, int64_t image_rows_row_stride,
                                 int64_t features_row_stride, int64_t fc_weight_row_stride,
                                 int64_t out_row_stride, int bypass, msd_dtype dtype,
                                 void* stream) {
    msd::DraftInputs args;
    CHECK_ARG(msd::check_draft_inputs(token_ids, is_image, embed, image_rows, features, fc_weight,
                                      fc_bias, out, num_rows, hidden, vocab_size,
                                      embed_row_stride, image_rows_row_stride,
                                      features_row_stride, fc_weight_row_stride, out_row_stride,
                                      bypass, dtype, &args));
    return msd::cuda::draft_inputs(args, stream);
}

msd_status msd_rope_kv_write_cuda(const void* q, const void* k, const void* v, const void* cos,
                                  const void* sin, void* q_out, void* k_cache, void* v_cache,
                                  int64_t num_tokens, int64_t num_heads, int64_t num_kv_heads,
                                  int64_t head_dim, int64_t start, int64_t num_slots,
                                  int64_t q_row_stride, int64_t q_head_stride,
                                  int64_t kv_row_stride, int64_t kv_head_stride,
                                  int64_t table_row_stride, int64_t q_out_row_stride,
                                  int64_t q_out_head_stride, int64_t cache_head_stride,
                                  int64_t cache_slot_stride, msd_dtype dtype,
                                  void* stream) {
    msd::RopeKvWrite args;
    CHECK_ARG(msd::check_rope_kv_write(q, k, v, cos, sin, q_out, k_cache, v_cache, num_tokens,
                                       num_heads, num_kv_heads, head_dim, start, num_slots,
                                       q_row_stride, q_head_stride, kv_row_stride,
                                       kv_head_stride, table_row_stride, q_out_row_stride,
                                       q_out_head_stride, cache_head_stride, cache_slot_stride,
                                       dtype, &args));
    return msd::cuda::rope_kv_write(args, stream);
}

#else  // !MSD_ENGINE_WITH_CUDA: the symbols exist so that callers link either way.

msd_status msd_rms_norm_cuda(const void*, const void*, void*, int64_t, int64_t, int64_t, int64_t,
                             float, msd_dtype, void*) {
    return msd::cuda_not_compiled("msd_rms_norm_cuda");
}

msd_status msd_add_rms_norm_cuda(const void*, void*, const void*, void*, int64_t, int64_t,
                                 int64_t, int64_t, int64_t, float, msd_dtype, void*) {
    return msd::cuda_not_compiled("msd_add_rms_norm_cuda");
}

msd_status msd_silu_mul_cuda(const void*, void*, int64_t, int64_t, int64_t, int64_t, msd_dtype,
                             void*) {
    return msd::cuda_not_compiled("msd_silu_mul_cuda");
}

msd_status msd_tree_attention_cuda(const void*, const void*, const void*, const int32_t*, void*,
                                   int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                                   int64_t, int64_t, int64_t, int64_t, int64_t, float, msd_dtype,
                                   void*, int64_t, void*) {
    return msd::cuda_not_compiled("msd_tree_attention_cuda");
}

msd_status msd_kv_compact_cuda(void*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                               const int64_t*, int64_t, msd_dtype, void*) {
    return msd::cuda_not_compiled("msd_kv_compact_cuda");
}

msd_status msd_draft_inputs_cuda(const int64_t*, const uint8_t*, const void*, const void*,
                                 const void*, const void*, const void*, void*, int64_t, int64_t,
                                 int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int,
                                 msd_dtype, void*) {
    return msd::cuda_not_compiled("msd_draft_inputs_cuda");
}

msd_status msd_rope_kv_write_cuda(const void*, const void*, const void*, const void*,
                                  const void*, void*, void*, void*, int64_t, int64_t, int64_t,
                                  int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                                  int64_t, int64_t, int64_t, int64_t, int64_t, msd_dtype, void*) {
    return msd::cuda_not_compiled("msd_rope_kv_write_cuda");
}

#endif

}  // extern "C"
