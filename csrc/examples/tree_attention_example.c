/* The C API from plain C: tree-masked attention over a small float32 KV cache (GQA, a prefix
 * and a masked region), checked against a naive loop. Built and run by ctest (CMakeLists.txt). */
#include <math.h>
#include <stdint.h>
#include <stdio.h>

#include "msd_engine.h"

#define T 3       /* queries: the last T of the region slots */
#define HQ 4      /* query heads */
#define HKV 2     /* kv heads: query head h reads kv head h / 2 */
#define D 5       /* head dim */
#define PREFIX 6  /* slots every query sees */
#define REGION 4  /* masked slots after the prefix */
#define SLOTS 12  /* cache capacity; slots past PREFIX + REGION hold NaN, never read */
#define Q_ROW (HQ * D + 3) /* q rows padded: the kernel must honour the row stride */

/* Bit j of row i: query i sees region slot j. An earlier scratch slot (j = 0) is visible to
 * query 0 only; each query sees itself (j = 1 + i) and its predecessors, as a chain would. */
static int visible(int i, int j) { return j == 0 ? i == 0 : j - 1 <= i; }

int main(void) {
    float q[T * Q_ROW];
    float k[HKV * SLOTS * D];
    float v[HKV * SLOTS * D];
    float out[T * HQ * D];
    int32_t mask_bits[T]; /* ceil(REGION / 32) = 1 word per query */
    for (int i = 0; i < T * Q_ROW; ++i) q[i] = (float)((i * 37) % 17) / 8.0f - 1.0f;
    for (int i = 0; i < HKV * SLOTS * D; ++i) {
        const int slot = (i / D) % SLOTS;
        k[i] = slot < PREFIX + REGION ? (float)((i * 29) % 13) / 6.0f - 1.0f : NAN;
        v[i] = slot < PREFIX + REGION ? (float)((i * 23) % 11) - 5.0f : NAN;
    }
    for (int i = 0; i < T; ++i) {
        mask_bits[i] = 0;
        for (int j = 0; j < REGION; ++j) mask_bits[i] |= visible(i, j) << j;
    }
    const float scale = 1.0f / sqrtf((float)D);
    msd_status status = msd_tree_attention_cpu(q, k, v, mask_bits, out, T, HQ, HKV, D, PREFIX,
                                               REGION, Q_ROW, D, SLOTS * D, D, HQ * D, D, scale,
                                               MSD_FLOAT32);
    if (status != MSD_OK) {
        fprintf(stderr, "msd_tree_attention_cpu: %s: %s\n", msd_status_string(status),
                msd_last_error_message());
        return 1;
    }
    for (int i = 0; i < T; ++i) {
        for (int h = 0; h < HQ; ++h) {
            const float* qi = q + i * Q_ROW + h * D;
            const float* kh = k + (h / (HQ / HKV)) * SLOTS * D;
            const float* vh = v + (h / (HQ / HKV)) * SLOTS * D;
            double scores[PREFIX + REGION];
            double max = -INFINITY;
            double total = 0.0;
            for (int s = 0; s < PREFIX + REGION; ++s) {
                double dot = 0.0;
                for (int c = 0; c < D; ++c) dot += (double)qi[c] * kh[s * D + c];
                const int seen = s < PREFIX || visible(i, s - PREFIX);
                scores[s] = seen ? dot * scale : -INFINITY;
                if (scores[s] > max) max = scores[s];
            }
            for (int s = 0; s < PREFIX + REGION; ++s) total += exp(scores[s] - max);
            for (int c = 0; c < D; ++c) {
                double expected = 0.0;
                for (int s = 0; s < PREFIX + REGION; ++s) {
                    if (scores[s] != -INFINITY) expected += exp(scores[s] - max) * vh[s * D + c];
                }
                expected /= total;
                const double got = out[(i * HQ + h) * D + c];
                if (!(fabs(got - expected) <= 1e-5 * (1.0 + fabs(expected)))) {
                    fprintf(stderr, "query %d head %d col %d: got %.9g, expected %.9g\n", i, h, c,
                            got, expected);
                    return 1;
                }
            }
        }
    }

    /* A bad argument is reported by name. */
    status = msd_tree_attention_cpu(q, k, v, mask_bits, out, T, HQ, HKV, D, PREFIX, T - 1, Q_ROW,
                                    D, SLOTS * D, D, HQ * D, D, scale, MSD_FLOAT32);
    if (status != MSD_ERR_INVALID_ARGUMENT) {
        fprintf(stderr, "a region shorter than the queries was accepted (status %d)\n",
                (int)status);
        return 1;
    }
    printf("rejected as expected: %s\n", msd_last_error_message());
    printf("OK (cuda compiled: %d, cuda devices: %d)\n", msd_cuda_compiled(),
           msd_cuda_device_count());
    return 0;
}
