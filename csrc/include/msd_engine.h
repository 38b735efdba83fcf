/* msd_engine.h: the torch-free C API of the msd_engine kernel library (libmsd_kernels).
 *
 * Conventions shared by every kernel:
 *   - Tensors are raw pointers to row-major 2-D arrays [rows, cols]. Elements inside a row are
 *     contiguous; consecutive rows are `*_row_stride` ELEMENTS apart (not bytes), and a row
 *     stride must be >= the row's length.
 *   - `dtype` gives the element type of every tensor argument of the call (they all share it).
 *   - Every function returns an msd_status. On failure, msd_last_error_message() returns a
 *     thread-local text that names the offending argument; nothing has been written.
 *   - CUDA variants take a `cudaStream_t` passed as `void*` (NULL = legacy default stream),
 *     are asynchronous, and need device pointers. They return MSD_ERR_NOT_COMPILED when the
 *     library was built without CUDA.
 *   - Accumulation is in float32; the roundings to `dtype` are spelled out per kernel so that
 *     outputs match the PyTorch formulations the engine uses as references.
 */
#ifndef MSD_ENGINE_H
#define MSD_ENGINE_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    MSD_OK = 0,
    MSD_ERR_INVALID_ARGUMENT,
    MSD_ERR_UNSUPPORTED_DTYPE,
    MSD_ERR_CUDA,
    MSD_ERR_NOT_COMPILED,
    MSD_ERR_OUT_OF_MEMORY
} msd_status;

typedef enum { MSD_FLOAT32, MSD_FLOAT16, MSD_BFLOAT16 } msd_dtype;

/* A static, human-readable name for a status ("ok", "invalid argument", ...). */
const char* msd_status_string(msd_status status);

/* Detail about the last kernel call (msd_*_cpu / msd_*_cuda) on this thread when it failed,
 * naming the bad argument; "" when it succeeded. Valid until this thread's next kernel call. */
const char* msd_last_error_message(void);

/* 1 if the library was built with its CUDA kernels, else 0. */
int msd_cuda_compiled(void);

/* Number of usable CUDA devices: 0 when not compiled with CUDA, with no driver or no device.
 * Never fails. */
int msd_cuda_device_count(void);

/* RMSNorm as transformers' LlamaRMSNorm computes it, per row of length `dim`:
 *     h   = x32 * (1 / sqrt(mean(x32 * x32) + eps))      in float32 (x32 = float(x))
 *     out = weight * round_dtype(h)                       product rounded to dtype
 * `weight` has `dim` contiguous elements. `out` may be `x` itself (in place). */
msd_status msd_rms_norm_cpu(const void* x, const void* weight, void* out, int64_t rows,
                            int64_t dim, int64_t x_row_stride, int64_t out_row_stride,
                            float eps, msd_dtype dtype);
msd_status msd_rms_norm_cuda(const void* x, const void* weight, void* out, int64_t rows,
                             int64_t dim, int64_t x_row_stride, int64_t out_row_stride,
                             float eps, msd_dtype dtype, void* stream);

/* Fused residual add + RMSNorm, per row:
 *     residual = round_dtype(residual + x)      (in place, as `residual += x` does in dtype)
 *     out      = rms_norm(residual)             (as msd_rms_norm_*)
 * `out` may be `x` itself; it must not overlap `residual`. */
msd_status msd_add_rms_norm_cpu(const void* x, void* residual, const void* weight, void* out,
                                int64_t rows, int64_t dim, int64_t x_row_stride,
                                int64_t residual_row_stride, int64_t out_row_stride, float eps,
                                msd_dtype dtype);
msd_status msd_add_rms_norm_cuda(const void* x, void* residual, const void* weight, void* out,
                                 int64_t rows, int64_t dim, int64_t x_row_stride,
                                 int64_t residual_row_stride, int64_t out_row_stride, float eps,
                                 msd_dtype dtype, void* stream);

/* SwiGLU activation. `gate_up` is [rows, 2 * inter]: gate in columns [0, inter), up in
 * [inter, 2 * inter). `out` is [rows, inter]. Per element, mirroring `F.silu(gate) * up`
 * evaluated in dtype (two roundings; both are the identity for float32):
 *     s   = round_dtype(g / (1 + exp(-g)))    in float32, g = float(gate)
 *     out = round_dtype(float(s) * float(up))
 * `out` must not overlap `gate_up`. CPU: exp is glibc's on the scalar and AVX2 paths of
 * msd_get_cpu_isa and a polynomial (within ~2 float32 ulps; 0 and inf past float32's range) on
 * the AVX-512 ones, where rows * inter >= 4096 spreads the rows over the calling thread and
 * msd_linear_cpu's pool's awake workers (each element computed the same way on any thread). */
msd_status msd_silu_mul_cpu(const void* gate_up, void* out, int64_t rows, int64_t inter,
                            int64_t gate_up_row_stride, int64_t out_row_stride, msd_dtype dtype);
msd_status msd_silu_mul_cuda(const void* gate_up, void* out, int64_t rows, int64_t inter,
                             int64_t gate_up_row_stride, int64_t out_row_stride, msd_dtype dtype,
                             void* stream);

/* Linear layer (torch's F.linear) for a few rows of x, streaming the weight once:
 *     out[i, j] = round_dtype(sum_c float(x[i, c]) * float(weight[j, c]) + float(bias[j]))
 * for i < m, j < n, c < k. x is [m, k], weight [n, k] (torch's Linear layout), bias [n]
 * contiguous or NULL, out [m, n]. The sum and the bias add are in float32 and rounded to dtype
 * once at the end (for float32 the result differs from torch's only by summation order: 16
 * interleaved partial sums on the AVX-512 path, 8 on the others, then a tree; bfloat16 on the
 * AVX512_BF16 and AMX paths sums exact products of pairs in hardware order).
 * Made for m <= 16 (decoding): each weight row is read from memory once for all m rows of x;
 * larger m is correct but slower than a real GEMM.
 * Runs on the calling thread and up to `num_threads - 1` workers of a pool inside the library
 * (<= 0: one thread per hardware thread; problems under ~32k weights run on the calling thread
 * alone), which claim contiguous chunks of output columns as they become free; a worker that
 * has gone to sleep (see msd_set_cpu_spin_us) is woken only for calls reading >= 1 MiB of
 * weights. Each output is computed the same way whichever thread runs it and whatever the
 * other rows of x are: the result depends on the SIMD path (msd_get_cpu_isa) but not on the
 * threads or on m, so a row verified among others equals the same row decoded alone.
 * Concurrent calls from several threads are serialised. `out` must not overlap x, weight or
 * bias. */
msd_status msd_linear_cpu(const void* x, const void* weight, const void* bias, void* out,
                          int64_t m, int64_t n, int64_t k, int64_t x_row_stride,
                          int64_t weight_row_stride, int64_t out_row_stride, msd_dtype dtype,
                          int num_threads);

/* The k most likely tokens of each row of logits [rows, n] (row i at logits + i *
 * logits_row_stride elements), as torch.topk(torch.log_softmax(logits.float(), -1), k) gives
 * them: values [rows, k] float32 (contiguous) are the log-probabilities
 *     (logit - max) - log(sum_j exp(logit_j - max)),   best first,
 * and indices [rows, k] int64 their columns. Equal logits come in ascending column order; NaN ranks
 * above every number, and a row holding a NaN or +inf comes out NaN, as torch's does. On the
 * AVX-512 paths the sum is in float32 lanes added in double with a polynomial exp (within ~2 ulps);
 * on the others in double with glibc's exp. Terms under exp(-87) are left out. Runs on
 * the calling thread (a draft step's few rows over a reduced vocabulary take microseconds);
 * 1 <= k <= n. */
msd_status msd_logsoftmax_topk_cpu(const void* logits, float* values, int64_t* indices,
                                   int64_t rows, int64_t n, int64_t k, int64_t logits_row_stride,
                                   msd_dtype dtype);

/* Tree-masked attention over a KV cache, as msd_engine.ops.TorchOps.cached_attention computes it
 * (decode T = 1, draft-tree steps, verification, prefill). Element (t, h, d) of
 *     q    [T, num_heads, D]      is q[t * q_row_stride + h * q_head_stride + d],
 *     out  [T, num_heads, D]      is out[t * out_row_stride + h * out_head_stride + d],
 * and slot s of kv head g of k_cache / v_cache [num_kv_heads, S, D] is
 *     cache[g * kv_head_stride + s * kv_slot_stride + d]   (both caches share these strides),
 * with T = num_queries and D = head_dim (each head's D elements contiguous). Query head h reads kv
 * head h / (num_heads / num_kv_heads) (GQA). Query t attends to slots [0, prefix_len + region):
 * every slot < prefix_len, and slot prefix_len + j iff bit j % 32 of
 * mask_bits[t * ceil(region / 32) + j / 32] is set (mask_bits: int32 [T, ceil(region / 32)],
 * contiguous; NULL = every region slot visible). The queries' own entries are the last T region
 * slots, so region >= T. Per query and head, in float32 (online softmax in base 2):
 *     out = round_dtype(softmax(sm_scale * q . k_s) . v_s)    over the visible slots s,
 * and zeros for a query that sees no slot (torch's SDPA gives NaN there). Slots at or past
 * prefix_len + region are never read (they may hold anything, NaN included). Every stride is in
 * elements and must be >= head_dim; the [T, num_heads] rows of `out` must not overlap each other,
 * q or the caches.
 * CPU: K/V are read in blocks of 64 slots, each used for all (num_heads / num_kv_heads) * T
 * query rows of its kv head that a task holds; tasks are (kv head, block of <= 64 rows), run on
 * the calling thread and msd_linear_cpu's pool (small problems on the calling thread alone).
 * Each output is computed the same way whichever thread runs it; the arithmetic follows the
 * SIMD path of msd_get_cpu_isa. With a mask and region <= 64, a query's output depends only on
 * the sequence of slots it sees: it is bit for bit the output of a mask-free call (T = 1) whose
 * slots are those, in order. So a tree node's attention equals that of the same token decoded
 * alone after its ancestors, and verification agrees exactly with plain decoding. */
msd_status msd_tree_attention_cpu(const void* q, const void* k_cache, const void* v_cache,
                                  const int32_t* mask_bits, void* out, int64_t num_queries,
                                  int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                                  int64_t prefix_len, int64_t region, int64_t q_row_stride,
                                  int64_t q_head_stride, int64_t kv_head_stride,
                                  int64_t kv_slot_stride, int64_t out_row_stride,
                                  int64_t out_head_stride, float sm_scale, msd_dtype dtype);
/* CUDA: flash-decoding. The slots [0, prefix_len + region) are cut into splits of whole 32-slot
 * tiles; one block per (kv head, split, 16 query rows) loads each K/V tile once for all its rows
 * and writes a float32 partial output and log-sum-exp to `workspace`; a second kernel combines
 * the splits. head_dim must be 64 or 128. `workspace` (device memory, 4-byte aligned) bounds the
 * splits: msd_tree_attention_cuda_workspace_bytes gives the size for the most the kernel may
 * use; a smaller one (even NULL with 0 bytes) means fewer splits (one split writes `out`
 * directly), the same result up to float32 rounding. No allocation and no synchronisation: the
 * call can be captured in a CUDA graph. */
msd_status msd_tree_attention_cuda(const void* q, const void* k_cache, const void* v_cache,
                                   const int32_t* mask_bits, void* out, int64_t num_queries,
                                   int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                                   int64_t prefix_len, int64_t region, int64_t q_row_stride,
                                   int64_t q_head_stride, int64_t kv_head_stride,
                                   int64_t kv_slot_stride, int64_t out_row_stride,
                                   int64_t out_head_stride, float sm_scale, msd_dtype dtype,
                                   void* workspace, int64_t workspace_bytes, void* stream);
/* Bytes of workspace msd_tree_attention_cuda may use for these sizes (0 when one split will do),
 * into *bytes. Depends on the sizes only, not on the device. Works without CUDA too. */
msd_status msd_tree_attention_cuda_workspace_bytes(int64_t num_queries, int64_t num_heads,
                                                   int64_t head_dim, int64_t prefix_len,
                                                   int64_t region, int64_t* bytes);

/* KV-cache compaction after acceptance, every layer, head, K and V in one call. `arena` is a
 * contiguous [num_kv, num_layers, num_kv_heads, max_slots, head_dim] array (num_kv = 2: K, V);
 * in each of its num_kv * num_layers * num_kv_heads [max_slots, head_dim] planes, for
 * j = 0, 1, ..., num_nodes - 1 in this order, slot start + nodes[j] is copied to slot start + j.
 * In place, hence j <= nodes[j] (true for the ascending accepted nodes, root first): no slot is
 * overwritten before it is read. Needs start + nodes[j] < max_slots. num_nodes may be 0 (no-op;
 * nodes may then be NULL). `nodes` is int64: a host pointer for the CPU (its values are
 * checked), a device pointer for CUDA (not checked: reading it would synchronise the stream). */
msd_status msd_kv_compact_cpu(void* arena, int64_t num_kv, int64_t num_layers,
                              int64_t num_kv_heads, int64_t max_slots, int64_t head_dim,
                              int64_t start, const int64_t* nodes, int64_t num_nodes,
                              msd_dtype dtype);
msd_status msd_kv_compact_cuda(void* arena, int64_t num_kv, int64_t num_layers,
                               int64_t num_kv_heads, int64_t max_slots, int64_t head_dim,
                               int64_t start, const int64_t* nodes, int64_t num_nodes,
                               msd_dtype dtype, void* stream);

/* The draft head's layer inputs, as msd_engine.ops.TorchOps.draft_inputs computes them: the
 * embedding gather, fc over [embedding row, target feature] + bias, and MSD's visual bypass, in
 * one call and without materialising the [T, 2H] concatenation. For t < num_rows (= T),
 * H = hidden:
 *     x_t    = image_rows[t]           if is_image[t] and image_rows != NULL,
 *              embed[0]                if is_image[t] and image_rows == NULL,
 *              embed[token_ids[t]]     otherwise (token_ids[t] in [0, vocab_size));
 *     out[t] = round_dtype(sum_c float(fc_weight[j, c]) * float(x_t[c])
 *                          + sum_c float(fc_weight[j, H + c]) * float(features[t][c])
 *                          + float(fc_bias[j]))        for j < H, summed in float32;
 *     with `bypass` != 0 (MSD mode), rows with is_image[t] are out[t] = x_t, copied exactly.
 * embed [vocab_size, H], image_rows / features / out [T, H], fc_weight [H, 2H] (torch's Linear
 * layout: embedding columns first, then the feature's), fc_bias [H] contiguous or NULL (no
 * bias). image_rows and features may also repeat one row for every t (row stride 0, as torch's
 * expand gives: a draft step's children share their parent's feature). token_ids (int64 [T]) and is_image (uint8 [T], nonzero = image; NULL = no image row)
 * are host pointers for the CPU, device pointers for CUDA; token ids of image rows are never
 * read. The CPU variant checks the token ids (MSD_ERR_INVALID_ARGUMENT naming the first bad
 * one); the CUDA variant cannot without synchronising, and writes NaN across a row whose token
 * id is out of range instead of reading out of bounds. `out` must not overlap any input.
 * CPU: the fc rows (all but bypassed image rows) are gathered into one [rows, 2H] buffer and
 * handed to msd_linear_cpu (its SIMD path, thread pool and `num_threads`), so each fc_weight
 * row is read once for all of them; bypassed rows are copied. */
msd_status msd_draft_inputs_cpu(const int64_t* token_ids, const uint8_t* is_image,
                                const void* embed, const void* image_rows, const void* features,
                                const void* fc_weight, const void* fc_bias, void* out,
                                int64_t num_rows, int64_t hidden, int64_t vocab_size,
                                int64_t embed_row_stride, int64_t image_rows_row_stride,
                                int64_t features_row_stride, int64_t fc_weight_row_stride,
                                int64_t out_row_stride, int bypass, msd_dtype dtype,
                                int num_threads);
/* CUDA: a skinny GEMM bound by reading fc_weight once. Each block owns a slice of output columns
 * (= fc_weight rows) and a block of rows; it gathers its rows' inputs (embedding or image row,
 * then feature) tile by tile into shared memory and streams its weight rows past them, so each
 * weight element is read once per row block (up to 64 rows with tensor cores, 16 without).
 * float16 / bfloat16 with every row 16-byte aligned (pointers and row strides, hidden % 8 == 0)
 * run on tensor cores (sm_80+, float32 accumulators); everything else on a CUDA-core kernel.
 * A row block whose rows are all bypassed skips the GEMM. No allocation, no synchronisation:
 * the call can be captured in a CUDA graph. */
msd_status msd_draft_inputs_cuda(const int64_t* token_ids, const uint8_t* is_image,
                                 const void* embed, const void* image_rows, const void* features,
                                 const void* fc_weight, const void* fc_bias, void* out,
                                 int64_t num_rows, int64_t hidden, int64_t vocab_size,
                                 int64_t embed_row_stride, int64_t image_rows_row_stride,
                                 int64_t features_row_stride, int64_t fc_weight_row_stride,
                                 int64_t out_row_stride, int bypass, msd_dtype dtype,
                                 void* stream);

/* Rotary embedding of q and k fused with the KV-cache write, one call per attention layer, as
 * msd_engine.ops.TorchOps.rope_kv_write computes it. For t < T = num_tokens, with a head row
 * x = (x1 | x2) of q or k (halves of h = head_dim / 2 elements) and c = cos[t], s = sin[t]
 * (transformers' tables: [T, head_dim], halves duplicated), rope(x) = (y1 | y2) with
 *     y1 = round_dtype(round_dtype(x1 * c[:h]) - round_dtype(x2 * s[:h])),
 *     y2 = round_dtype(round_dtype(x2 * c[h:]) + round_dtype(x1 * s[h:])),
 * products and sums in float32, each rounded to dtype as `x * cos + rotate_half(x) * sin` does
 * in dtype (float32: separate multiplies and adds, no FMA), so the results are torch's bit for
 * bit. Then
 *     q_out[t, i]           = rope(q[t, i])     i < num_heads
 *     k_cache[g, start + t] = rope(k[t, g])     g < num_kv_heads
 *     v_cache[g, start + t] = v[t, g]
 * Element (t, i, d) of q [T, num_heads, D] is q[t * q_row_stride + i * q_head_stride + d]; k and
 * v [T, num_kv_heads, D] share kv_row_stride / kv_head_stride (views of one fused qkv output),
 * q_out [T, num_heads, D] has its own; cos and sin share table_row_stride; slot s of kv head g
 * of k_cache / v_cache [num_kv_heads, num_slots, D] is cache[g * cache_head_stride +
 * s * cache_slot_stride + d] (both caches). head_dim is even; start + T <= num_slots. q_out may
 * be q itself (in place); otherwise no output may overlap an input or another output. */
msd_status msd_rope_kv_write_cpu(const void* q, const void* k, const void* v, const void* cos,
                                 const void* sin, void* q_out, void* k_cache, void* v_cache,
                                 int64_t num_tokens, int64_t num_heads, int64_t num_kv_heads,
                                 int64_t head_dim, int64_t start, int64_t num_slots,
                                 int64_t q_row_stride, int64_t q_head_stride,
                                 int64_t kv_row_stride, int64_t kv_head_stride,
                                 int64_t table_row_stride, int64_t q_out_row_stride,
                                 int64_t q_out_head_stride, int64_t cache_head_stride,
                                 int64_t cache_slot_stride, msd_dtype dtype);
/* CUDA: one thread per (token, head, pair (d, d + h)) of q, k and v alike, so a decode step
 * (T = 1) still spreads over (num_heads + 2 num_kv_heads) * h threads; nothing is read twice.
 * No allocation, no synchronisation (capturable in a CUDA graph). */
msd_status msd_rope_kv_write_cuda(const void* q, const void* k, const void* v, const void* cos,
                                  const void* sin, void* q_out, void* k_cache, void* v_cache,
                                  int64_t num_tokens, int64_t num_heads, int64_t num_kv_heads,
                                  int64_t head_dim, int64_t start, int64_t num_slots,
                                  int64_t q_row_stride, int64_t q_head_stride,
                                  int64_t kv_row_stride, int64_t kv_head_stride,
                                  int64_t table_row_stride, int64_t q_out_row_stride,
                                  int64_t q_out_head_stride, int64_t cache_head_stride,
                                  int64_t cache_slot_stride, msd_dtype dtype, void* stream);

/* One Llama decoder layer in one call (CPU), for decode-sized steps: the sequence of kernels
 * above that a layer is, on one thread's scratch memory, with nothing returned to the caller in
 * between. The weights, all in `dtype` with contiguous rows (row stride = row length):
 *   qkv_weight [(num_heads + 2 num_kv_heads) * head_dim, hidden]: q's rows, then k's, then v's;
 *   o_weight [hidden, num_heads * head_dim]; gate_up_weight [2 * intermediate, hidden]: gate's
 *   rows, then up's; down_weight [hidden, intermediate]; post_attention_norm and next_norm
 *   [hidden] (next_norm: the next layer's input norm or the model's final norm; NULL: none). */
typedef struct {
    const void* qkv_weight;
    const void* o_weight;
    const void* post_attention_norm;
    const void* gate_up_weight;
    const void* down_weight;
    const void* next_norm;
    int64_t hidden;
    int64_t num_heads;
    int64_t num_kv_heads;
    int64_t head_dim;
    int64_t intermediate;
    float rms_norm_eps;
    float sm_scale;
} msd_decoder_layer;

/* `h` [T, hidden] holds the layer's normed input on entry and `residual` [T, hidden] the
 * residual stream (T = num_tokens; row strides h_row_stride / residual_row_stride; the two must
 * not overlap). With q, k, v the head-sized column blocks of qkv, the call computes, each step
 * by the kernel named and rounded as that kernel documents:
 *     qkv       = msd_linear_cpu(h, qkv_weight)
 *     q         = rope(q); cache slots [start, start + T) get rope(k), v   (msd_rope_kv_write_cpu)
 *     a         = msd_tree_attention_cpu(q; prefix_len, region = start + T - prefix_len,
 *                                        mask_bits, sm_scale)
 *     residual += msd_linear_cpu(a, o_weight);  h = rms_norm(residual) * post_attention_norm
 *     residual += msd_linear_cpu(silu_mul(msd_linear_cpu(h, gate_up_weight)), down_weight)
 *     h         = rms_norm(residual) * next_norm        (next_norm NULL: h keeps the MLP input)
 * (each `residual +=` and norm as msd_add_rms_norm_cpu; with next_norm NULL the last add alone),
 * so the results equal those of the separate calls bit for bit. cos / sin [T, head_dim] share
 * table_row_stride; k_cache / v_cache [num_kv_heads, num_slots, head_dim] share the head and
 * slot strides; 0 <= prefix_len <= start and start + T <= num_slots; mask_bits as for
 * msd_tree_attention_cpu (NULL: every region slot visible). The linears run on the thread pool
 * as msd_linear_cpu describes (`num_threads`), the attention as msd_tree_attention_cpu does,
 * SwiGLU as msd_silu_mul_cpu does, the rest on the calling thread. On failure (a bad argument, or
 * MSD_ERR_OUT_OF_MEMORY for the scratch) nothing has been written when the arguments are at
 * fault; an allocation failure midway may leave h, residual and the cache slots partly written. */
msd_status msd_decoder_layer_cpu(const msd_decoder_layer* layer, void* h, void* residual,
                                 int64_t num_tokens, int64_t h_row_stride,
                                 int64_t residual_row_stride, const void* cos, const void* sin,
                                 int64_t table_row_stride, void* k_cache, void* v_cache,
                                 int64_t num_slots, int64_t cache_head_stride,
                                 int64_t cache_slot_stride, int64_t start, int64_t prefix_len,
                                 const int32_t* mask_bits, msd_dtype dtype, int num_threads);

/* The draft head for msd_draft_tree_cpu, all in one dtype with contiguous rows: `layer` (its
 * next_norm NULL: the draft layer ends without a norm; its input is not normed either), embed
 * [vocab_size, hidden] (the target's embedding), fc_weight [hidden, 2 hidden] (embedding columns
 * first, then the feature's), fc_bias [hidden] or NULL, lm_head [draft_vocab, hidden] with
 * vocab_ids [draft_vocab] the target ids of its rows (NULL: row r is token r, draft_vocab <=
 * vocab_size), the rotary tables cos / sin [max_positions, head_dim], and the draft's KV cache
 * k_cache / v_cache [num_kv_heads, num_slots, head_dim] (head and slot strides in elements); `dtype`
 * is theirs, and the calls' operands (last_hidden, features, hidden) are in it too. */
typedef struct {
    const msd_decoder_layer* layer;
    const void* embed;
    int64_t vocab_size;
    const void* fc_weight;
    const void* fc_bias;
    const void* lm_head;
    const int64_t* vocab_ids;
    int64_t draft_vocab;
    const void* cos;
    const void* sin;
    int64_t max_positions;
    void* k_cache;
    void* v_cache;
    int64_t num_slots;
    int64_t cache_head_stride;
    int64_t cache_slot_stride;
    msd_dtype dtype;
} msd_draft_head;

/* Commits num_tokens (1..16) text tokens to the draft (CPU), as
 * msd_engine.spec.drafter.TreeDrafter.extend computes them with the per-call kernels: row t is
 * x_t = fc([embed[token_ids[t]], features[t]]) + fc_bias (msd_draft_inputs_cpu), then the layer with
 * h = residual = x (msd_decoder_layer_cpu) at position committed + t, writing cache slot
 * committed + t and seeing the slots before committed and the rows up to t (causal). hidden
 * [num_tokens, hidden] (row stride hidden_row_stride) receives the layer's output rows. features
 * [num_tokens, hidden] has row stride features_row_stride (0: one row for all); token ids must lie
 * in [0, vocab_size); committed + num_tokens <= num_slots and <= max_positions. */
msd_status msd_draft_extend_cpu(const msd_draft_head* head, const int64_t* token_ids, const void* features,
                                int64_t num_tokens, int64_t features_row_stride, int64_t committed, void* hidden,
                                int64_t hidden_row_stride, int num_threads);

/* One EAGLE-2 drafting step of the draft head (CPU), as msd_engine.spec.drafter.TreeDrafter.draft
 * computes it with the per-call kernels (the same kernels on the same operands, so the same tree):
 *   level 0: the top_k tokens of log_softmax(lm_head @ last_hidden) (msd_linear_cpu, then
 *            msd_logsoftmax_topk_cpu), scores = their log-probs;
 *   level l = 1..depth: the top_k frontier nodes (level 1: level 0's) go through the draft:
 *            x = fc([embed[token], parent hidden]) + fc_bias (msd_draft_inputs_cpu), the layer with
 *            h = residual = x (msd_decoder_layer_cpu) at position committed + l - 1, writing cache
 *            slots committed + (l - 1) top_k + i and seeing the committed prefix, its ancestors'
 *            slots and its own; each node's top_k children score its score + their log-probs
 *            (float32), and the top_k best children of the level (ties to the earlier, NaN first)
 *            are the next frontier, their hidden the layer's output rows of their parents;
 * then the tree: the root (root_token) and the total_tokens - 1 best candidates of all levels
 * (ties to the earlier created; a parent always outranks its child), in creation order.
 * tokens / parents [min(total_tokens, 1 + top_k + depth top_k^2)] receive the nodes' target token
 * ids and parent node indices (-1 for the root), num_nodes their count. last_hidden [hidden] is
 * the draft's output at the last committed position. Needs 1 <= top_k <= min(16, draft_vocab),
 * depth >= 0, total_tokens >= 1, committed + depth top_k <= num_slots and committed + depth <=
 * max_positions; a vocab_ids entry outside [0, vocab_size) that a step maps fails with
 * MSD_ERR_INVALID_ARGUMENT. Scratch is per thread; the kernels use msd_linear_cpu's pool as their
 * own calls do (`num_threads` for the linears). A NaN in the draft's scores that would keep a child
 * without its parent fails with MSD_ERR_INVALID_ARGUMENT (the draft is broken, not the call). */
msd_status msd_draft_tree_cpu(const msd_draft_head* head, const void* last_hidden, int64_t committed,
                              int64_t root_token, int64_t top_k, int64_t depth, int64_t total_tokens,
                              int64_t* tokens, int64_t* parents, int64_t* num_nodes, int num_threads);

/* How long the CPU thread pool's idle workers poll for work before they sleep, in [0, 10^6]
 * microseconds (default 1000: covers the gaps between the calls of a decode step or of a
 * speculative round, Python's tree work included, so workers stay awake while the engine
 * generates and sleep 1 ms after it stops). Lower it when other threads
 * (torch's) need the cores between our calls; 0 sleeps at once. Process-wide. */
msd_status msd_set_cpu_spin_us(int microseconds);

/* SIMD code paths of the CPU kernels that have several (msd_linear_cpu, msd_tree_attention_cpu,
 * msd_silu_mul_cpu, msd_logsoftmax_topk_cpu; msd_rms_norm_cpu, msd_add_rms_norm_cpu and msd_rope_kv_write_cpu, whose
 * AVX-512 paths give the scalar paths' bits). */
typedef enum {
    MSD_CPU_ISA_SCALAR = 0,
    MSD_CPU_ISA_AVX2 = 1,
    MSD_CPU_ISA_AVX512 = 2,
    MSD_CPU_ISA_AVX512_BF16 = 3,
    MSD_CPU_ISA_AMX = 4
} msd_cpu_isa;

/* The path in use: the best one this CPU and build support, unless msd_set_cpu_isa forced
 * another. AVX2 means AVX2 + FMA + F16C; AVX512 means AVX-512 F/BW/VL + FMA + F16C;
 * AVX512_BF16 is AVX512 plus AVX512-BF16, which changes only bfloat16 linear layers: they
 * multiply the bfloat16 values of x and weight in pairs (vdpbf16ps: exact products, float32
 * sums, subnormal inputs and sums flushed to zero) instead of widening them to float32 first;
 * AMX is AVX512 plus AMX-TILE and AMX-BF16 (and the Linux permission to use them), which does
 * the same products of bfloat16 linear layers on the tile multiplier (TDPBF16PS). */
msd_cpu_isa msd_get_cpu_isa(void);

/* Testing hook: forces `isa` (an msd_cpu_isa) for later calls, or -1 to restore the best one.
 * Fails with MSD_ERR_INVALID_ARGUMENT when this CPU or build cannot run `isa`. Process-wide;
 * not meant to be called while kernels run on other threads. */
msd_status msd_set_cpu_isa(int isa);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* MSD_ENGINE_H */
