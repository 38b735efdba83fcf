/* A whole Llama decoder layer from plain C with msd_decoder_layer_cpu, checked bit for bit
 * against the separate kernel calls it stands for. Tiny float32 sizes (GQA: 4 query heads on 2
 * kv heads), a 3-token step after 5 cached tokens, a tree mask. Built and run by ctest; also a
 * template for C/C++ services that run their own decode loop. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "msd_engine.h"

#define HIDDEN 16
#define HEADS 4
#define KV_HEADS 2
#define HEAD_DIM 4
#define INTER 24
#define QKV ((HEADS + 2 * KV_HEADS) * HEAD_DIM)
#define T 3
#define SLOTS 16
#define START 5
#define EPS 1e-5f

static float qkv_w[QKV * HIDDEN], o_w[HIDDEN * HEADS * HEAD_DIM], gate_up_w[2 * INTER * HIDDEN];
static float down_w[HIDDEN * INTER], post_norm[HIDDEN], next_norm[HIDDEN];
static float cos_t[T * HEAD_DIM], sin_t[T * HEAD_DIM];

static float value(int i, int salt) { return (float)((i * 37 + salt * 11) % 17 - 8) / 16.0f; }

static int check(msd_status status, const char* what) {
    if (status == MSD_OK) return 0;
    fprintf(stderr, "%s: %s: %s\n", what, msd_status_string(status), msd_last_error_message());
    return 1;
}

/* The layer by separate calls, as msd_engine.h spells it out. */
static int by_parts(float* h, float* residual, float* k_cache, float* v_cache, const int32_t* mask) {
    float qkv[T * QKV], attn[T * HEADS * HEAD_DIM], out[T * HIDDEN], gate_up[T * 2 * INTER], act[T * INTER];
    const float scale = 1.0f / sqrtf((float)HEAD_DIM);
    if (check(msd_linear_cpu(h, qkv_w, NULL, qkv, T, QKV, HIDDEN, HIDDEN, HIDDEN, QKV, MSD_FLOAT32, 0), "qkv") ||
        check(msd_rope_kv_write_cpu(qkv, qkv + HEADS * HEAD_DIM, qkv + (HEADS + KV_HEADS) * HEAD_DIM, cos_t,
                                    sin_t, qkv, k_cache, v_cache, T, HEADS, KV_HEADS, HEAD_DIM, START, SLOTS,
                                    QKV, HEAD_DIM, QKV, HEAD_DIM, HEAD_DIM, QKV, HEAD_DIM, SLOTS * HEAD_DIM,
                                    HEAD_DIM, MSD_FLOAT32), "rope") ||
        check(msd_tree_attention_cpu(qkv, k_cache, v_cache, mask, attn, T, HEADS, KV_HEADS, HEAD_DIM, START, T,
                                     QKV, HEAD_DIM, SLOTS * HEAD_DIM, HEAD_DIM, HEADS * HEAD_DIM, HEAD_DIM,
                                     scale, MSD_FLOAT32), "attention") ||
        check(msd_linear_cpu(attn, o_w, NULL, out, T, HIDDEN, HEADS * HEAD_DIM, HEADS * HEAD_DIM,
                             HEADS * HEAD_DIM, HIDDEN, MSD_FLOAT32, 0), "o") ||
        check(msd_add_rms_norm_cpu(out, residual, post_norm, h, T, HIDDEN, HIDDEN, HIDDEN, HIDDEN, EPS,
                                   MSD_FLOAT32), "post norm") ||
        check(msd_linear_cpu(h, gate_up_w, NULL, gate_up, T, 2 * INTER, HIDDEN, HIDDEN, HIDDEN, 2 * INTER,
                             MSD_FLOAT32, 0), "gate_up") ||
        check(msd_silu_mul_cpu(gate_up, act, T, INTER, 2 * INTER, INTER, MSD_FLOAT32), "silu_mul") ||
        check(msd_linear_cpu(act, down_w, NULL, out, T, HIDDEN, INTER, INTER, INTER, HIDDEN, MSD_FLOAT32, 0),
              "down") ||
        check(msd_add_rms_norm_cpu(out, residual, next_norm, h, T, HIDDEN, HIDDEN, HIDDEN, HIDDEN, EPS,
                                   MSD_FLOAT32), "next norm")) {
        return 1;
    }
    return 0;
}

int main(void) {
    for (int i = 0; i < QKV * HIDDEN; ++i) qkv_w[i] = value(i, 1);
    for (int i = 0; i < HIDDEN * HEADS * HEAD_DIM; ++i) o_w[i] = value(i, 2);
    for (int i = 0; i < 2 * INTER * HIDDEN; ++i) gate_up_w[i] = value(i, 3);
    for (int i = 0; i < HIDDEN * INTER; ++i) down_w[i] = value(i, 4);
    for (int i = 0; i < HIDDEN; ++i) post_norm[i] = 1.0f + value(i, 5) / 4, next_norm[i] = 1.0f + value(i, 6) / 4;
    for (int t = 0; t < T; ++t) {  /* RoPE tables at positions START + depth (0, 1, 1: a root, two children) */
        const int position = START + (t == 0 ? 0 : 1);
        for (int d = 0; d < HEAD_DIM; ++d) {
            const float freq = powf(10000.0f, -(float)(2 * (d % (HEAD_DIM / 2))) / HEAD_DIM);
            cos_t[t * HEAD_DIM + d] = cosf(position * freq);
            sin_t[t * HEAD_DIM + d] = sinf(position * freq);
        }
    }
    const int32_t mask[T] = {0x1, 0x3, 0x5}; /* node 0: itself; nodes 1 and 2: the root and themselves */

    float h[2][T * HIDDEN], residual[2][T * HIDDEN], k_cache[2][KV_HEADS * SLOTS * HEAD_DIM],
        v_cache[2][KV_HEADS * SLOTS * HEAD_DIM];
    for (int copy = 0; copy < 2; ++copy) {
        for (int i = 0; i < T * HIDDEN; ++i) h[copy][i] = value(i, 7), residual[copy][i] = 2 * value(i, 8);
        for (int i = 0; i < KV_HEADS * SLOTS * HEAD_DIM; ++i) k_cache[copy][i] = value(i, 9), v_cache[copy][i] = value(i, 10);
    }

    const msd_decoder_layer layer = {qkv_w, o_w, post_norm, gate_up_w, down_w, next_norm, HIDDEN, HEADS,
                                     KV_HEADS, HEAD_DIM, INTER, EPS, 1.0f / sqrtf((float)HEAD_DIM)};
    if (check(msd_decoder_layer_cpu(&layer, h[0], residual[0], T, HIDDEN, HIDDEN, cos_t, sin_t, HEAD_DIM,
                                    k_cache[0], v_cache[0], SLOTS, SLOTS * HEAD_DIM, HEAD_DIM, START, START,
                                    mask, MSD_FLOAT32, 0), "msd_decoder_layer_cpu") ||
        by_parts(h[1], residual[1], k_cache[1], v_cache[1], mask)) {
        return 1;
    }
    if (memcmp(h[0], h[1], sizeof h[0]) != 0 || memcmp(residual[0], residual[1], sizeof residual[0]) != 0 ||
        memcmp(k_cache[0], k_cache[1], sizeof k_cache[0]) != 0 || memcmp(v_cache[0], v_cache[1], sizeof v_cache[0]) != 0) {
        fprintf(stderr, "the one-call layer differs from the separate calls\n");
        return 1;
    }

    /* A bad argument is reported by name, and nothing is written: copy 0 still equals copy 1. */
    const msd_status status = msd_decoder_layer_cpu(&layer, h[0], residual[0], T, HIDDEN, HIDDEN, cos_t, sin_t,
                                                    HEAD_DIM, k_cache[0], v_cache[0], SLOTS, SLOTS * HEAD_DIM,
                                                    HEAD_DIM, START, START + 1, mask, MSD_FLOAT32, 0);
    if (status != MSD_ERR_INVALID_ARGUMENT) {
        fprintf(stderr, "prefix_len > start was accepted (status %d)\n", (int)status);
        return 1;
    }
    if (memcmp(h[0], h[1], sizeof h[0]) != 0 || memcmp(residual[0], residual[1], sizeof residual[0]) != 0 ||
        memcmp(k_cache[0], k_cache[1], sizeof k_cache[0]) != 0 || memcmp(v_cache[0], v_cache[1], sizeof v_cache[0]) != 0) {
        fprintf(stderr, "a rejected call wrote to its outputs\n");
        return 1;
    }
    printf("rejected as expected: %s\n", msd_last_error_message());
    printf("OK: one call == %d separate calls, bit for bit\n", 9);
    return 0;
}
