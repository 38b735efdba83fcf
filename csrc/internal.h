// Internal to libmsd_kernels: the error slot and the kernel entry points behind the C API.
// api.cpp checks every argument before calling these, so kernels may assume valid input.
#pragma once

#include "msd_engine.h"

namespace msd {

// Formats a message into this thread's error slot and returns `status`, so that failures read
// `return set_error(MSD_ERR_CUDA, "...", ...);`.
msd_status set_error(msd_status status, const char* format, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
void clear_error();

// Bytes per element of `dtype` (float32: 4; float16, bfloat16: 2).
inline int64_t dtype_bytes(msd_dtype dtype) { return dtype == MSD_FLOAT32 ? 4 : 2; }

// One msd_draft_inputs_* call after api.cpp's checks (semantics in msd_engine.h). Strides are
// in elements; `bypass` is false whenever is_image is null.
struct DraftInputs {
    const int64_t* token_ids;
    const uint8_t* is_image;  // nullptr: no image row
    const void* embed;
    const void* image_rows;  // nullptr: image rows read embed[0]
    const void* features;
    const void* fc_weight;
    const void* fc_bias;  // nullptr: no bias
    void* out;
    int64_t rows;
    int64_t hidden;
    int64_t vocab_size;
    int64_t embed_row_stride;
    int64_t image_rows_row_stride;
    int64_t features_row_stride;
    int64_t fc_weight_row_stride;
    int64_t out_row_stride;
    bool bypass;
    msd_dtype dtype;
};

// One msd_rope_kv_write_* call after api.cpp's checks (semantics in msd_engine.h).
struct RopeKvWrite {
    const void* q;
    const void* k;
    const void* v;
    const void* cos;
    const void* sin;
    void* q_out;
    void* k_cache;
    void* v_cache;
    int64_t tokens;
    int64_t heads;
    int64_t kv_heads;
    int64_t head_dim;
    int64_t start;
    int64_t q_row_stride;
    int64_t q_head_stride;
    int64_t kv_row_stride;
    int64_t kv_head_stride;
    int64_t table_row_stride;
    int64_t q_out_row_stride;
    int64_t q_out_head_stride;
    int64_t cache_head_stride;
    int64_t cache_slot_stride;
    msd_dtype dtype;
};

// One msd_decoder_layer_cpu call's step operands after api.cpp's checks (semantics in
// msd_engine.h).
struct DecoderStep {
    void* h;
    void* residual;
    int64_t num_tokens;
    int64_t h_row_stride;
    int64_t residual_row_stride;
    const void* cos;
    const void* sin;
    int64_t table_row_stride;
    void* k_cache;
    void* v_cache;
    int64_t cache_head_stride;
    int64_t cache_slot_stride;
    int64_t start;
    int64_t prefix_len;
    const int32_t* mask_bits;
};

namespace cpu {
msd_status rms_norm(const void* x, const void* weight, void* out, int64_t rows, int64_t dim,
                    int64_t x_row_stride, int64_t out_row_stride, float eps, msd_dtype dtype);
msd_status add_rms_norm(const void* x, void* residual, const void* weight, void* out,
                        int64_t rows, int64_t dim, int64_t x_row_stride,
                        int64_t residual_row_stride, int64_t out_row_stride, float eps,
                        msd_dtype dtype);
// residual += x per row, rounded to dtype (add_rms_norm's add, without the norm).
msd_status add_residual(const void* x, void* residual, int64_t rows, int64_t dim,
                        int64_t x_row_stride, int64_t residual_row_stride, msd_dtype dtype);
msd_status silu_mul(const void* gate_up, void* out, int64_t rows, int64_t inter,
                    int64_t gate_up_row_stride, int64_t out_row_stride, msd_dtype dtype);
msd_status linear(const void* x, const void* weight, const void* bias, void* out, int64_t m,
                  int64_t n, int64_t k, int64_t x_row_stride, int64_t weight_row_stride,
                  int64_t out_row_stride, msd_dtype dtype, int num_threads);
msd_status logsoftmax_topk(const void* logits, float* values, int64_t* indices, int64_t rows,
                           int64_t n, int64_t k, int64_t logits_row_stride, msd_dtype dtype);
msd_status tree_attention(const void* q, const void* k_cache, const void* v_cache,
                          const int32_t* mask_bits, void* out, int64_t num_queries,
                          int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                          int64_t prefix_len, int64_t region, int64_t q_row_stride,
                          int64_t q_head_stride, int64_t kv_head_stride, int64_t kv_slot_stride,
                          int64_t out_row_stride, int64_t out_head_stride, float sm_scale,
                          msd_dtype dtype);
msd_status kv_compact(void* arena, int64_t planes, int64_t max_slots, int64_t head_dim,
                      int64_t start, const int64_t* nodes, int64_t num_nodes, msd_dtype dtype);
msd_status draft_inputs(const DraftInputs& args, int num_threads);
msd_status rope_kv_write(const RopeKvWrite& args);
msd_status decoder_layer(const msd_decoder_layer& layer, const DecoderStep& step, msd_dtype dtype,
                         int num_threads);
msd_status draft_extend(const msd_draft_head& head, const int64_t* token_ids, const void* features,
                        int64_t m, int64_t features_row_stride, int64_t committed, void* hidden,
                        int64_t hidden_row_stride, int num_threads);
msd_status draft_tree(const msd_draft_head& head, const void* last_hidden, int64_t committed,
                      int64_t root_token, int64_t top_k, int64_t depth, int64_t total_tokens, int64_t* tokens,
                      int64_t* parents, int64_t* num_nodes, int num_threads);
msd_cpu_isa get_isa();
// Whether a SIMD path includes AVX-512 F/BW/VL (the kernels other than linear use its AVX-512 code).
inline bool isa_has_avx512(msd_cpu_isa isa) {
    return isa == MSD_CPU_ISA_AVX512 || isa == MSD_CPU_ISA_AVX512_BF16 || isa == MSD_CPU_ISA_AMX;
}
msd_status set_isa(int isa);
void set_spin_microseconds(int microseconds);  // in thread_pool.cpp, checked by api.cpp
}  // namespace cpu

// The CUDA tree attention's split plan, in api.cpp (host arithmetic, built with or without CUDA).
namespace attention_plan {
constexpr int64_t kTileKeys = 32;           // keys per K/V tile of the CUDA kernel
constexpr int64_t kMinKeysPerSplit = 256;   // below this a split's partial costs more than it saves
constexpr int64_t kMaxSplits = 64;
int64_t max_splits(int64_t num_keys);       // in [1, kMaxSplits]
int64_t bytes_per_split(int64_t num_rows, int64_t head_dim);  // partial outputs + LSEs
}  // namespace attention_plan

#if defined(MSD_ENGINE_WITH_CUDA)
namespace cuda {
int device_count();
msd_status rms_norm(const void* x, const void* weight, void* out, int64_t rows, int64_t dim,
                    int64_t x_row_stride, int64_t out_row_stride, float eps, msd_dtype dtype,
                    void* stream);
msd_status add_rms_norm(const void* x, void* residual, const void* weight, void* out,
                        int64_t rows, int64_t dim, int64_t x_row_stride,
                        int64_t residual_row_stride, int64_t out_row_stride, float eps,
                        msd_dtype dtype, void* stream);
msd_status silu_mul(const void* gate_up, void* out, int64_t rows, int64_t inter,
                    int64_t gate_up_row_stride, int64_t out_row_stride, msd_dtype dtype,
                    void* stream);
msd_status tree_attention(const void* q, const void* k_cache, const void* v_cache,
                          const int32_t* mask_bits, void* out, int64_t num_queries,
                          int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                          int64_t prefix_len, int64_t region, int64_t q_row_stride,
                          int64_t q_head_stride, int64_t kv_head_stride, int64_t kv_slot_stride,
                          int64_t out_row_stride, int64_t out_head_stride, float sm_scale,
                          msd_dtype dtype, void* workspace, int64_t workspace_bytes,
                          void* stream);
msd_status kv_compact(void* arena, int64_t planes, int64_t max_slots, int64_t head_dim,
                      int64_t start, const int64_t* nodes, int64_t num_nodes, msd_dtype dtype,
                      void* stream);
msd_status draft_inputs(const DraftInputs& args, void* stream);
msd_status rope_kv_write(const RopeKvWrite& args, void* stream);
}  // namespace cuda
#endif

}  // namespace msd
