/* The draft head's fused input from plain C: msd_draft_inputs_cpu on a few float32 rows (text
 * rows, an image row through fc, a bypassed image row), checked against a naive loop. Built and
 * run by ctest (see CMakeLists.txt). */
#include <math.h>
#include <stdint.h>
#include <stdio.h>

#include "msd_engine.h"

#define ROWS 4
#define HIDDEN 6
#define VOCAB 9

/* fc(cat(x, feature)) + bias for one output element, in double. */
static double fc(const float* weight, const float* bias, const float* x, const float* feature,
                 int j) {
    double sum = bias[j];
    for (int c = 0; c < HIDDEN; ++c) sum += (double)weight[j * 2 * HIDDEN + c] * x[c];
    for (int c = 0; c < HIDDEN; ++c) sum += (double)weight[j * 2 * HIDDEN + HIDDEN + c] * feature[c];
    return sum;
}

int main(void) {
    float embed[VOCAB * HIDDEN], features[ROWS * HIDDEN], image_rows[ROWS * HIDDEN];
    float weight[HIDDEN * 2 * HIDDEN], bias[HIDDEN], out[ROWS * HIDDEN];
    const int64_t token_ids[ROWS] = {3, 8, 32000, 32000}; /* image rows' ids are never read */
    const uint8_t is_image[ROWS] = {0, 0, 1, 1};
    for (int i = 0; i < VOCAB * HIDDEN; ++i) embed[i] = (float)((i * 7) % 13) / 13.0f - 0.5f;
    for (int i = 0; i < ROWS * HIDDEN; ++i) {
        features[i] = (float)((i * 5) % 11) / 11.0f - 0.5f;
        image_rows[i] = (float)((i * 3) % 7) - 3.0f;
    }
    for (int i = 0; i < HIDDEN * 2 * HIDDEN; ++i) weight[i] = (float)((i * 11) % 17) / 17.0f - 0.5f;
    for (int j = 0; j < HIDDEN; ++j) bias[j] = 0.1f * (float)j;

    for (int bypass = 0; bypass <= 1; ++bypass) {
        msd_status status = msd_draft_inputs_cpu(
            token_ids, is_image, embed, image_rows, features, weight, bias, out, ROWS, HIDDEN,
            VOCAB, HIDDEN, HIDDEN, HIDDEN, 2 * HIDDEN, HIDDEN, bypass, MSD_FLOAT32, 1);
        if (status != MSD_OK) {
            fprintf(stderr, "msd_draft_inputs_cpu: %s: %s\n", msd_status_string(status),
                    msd_last_error_message());
            return 1;
        }
        for (int t = 0; t < ROWS; ++t) {
            const float* x = is_image[t] ? image_rows + t * HIDDEN : embed + token_ids[t] * HIDDEN;
            for (int j = 0; j < HIDDEN; ++j) {
                const double expected = bypass && is_image[t]
                                            ? x[j]
                                            : fc(weight, bias, x, features + t * HIDDEN, j);
                const double got = out[t * HIDDEN + j];
                if (fabs(got - expected) > 1e-5 * (1.0 + fabs(expected))) {
                    fprintf(stderr, "bypass %d row %d col %d: got %.9g, expected %.9g\n", bypass,
                            t, j, got, expected);
                    return 1;
                }
            }
        }
    }

    /* A text row's token id outside the vocabulary is reported by name. */
    const int64_t bad_ids[ROWS] = {3, VOCAB, 0, 0};
    msd_status status = msd_draft_inputs_cpu(bad_ids, is_image, embed, image_rows, features,
                                             weight, bias, out, ROWS, HIDDEN, VOCAB, HIDDEN,
                                             HIDDEN, HIDDEN, 2 * HIDDEN, HIDDEN, 1, MSD_FLOAT32, 1);
    if (status != MSD_ERR_INVALID_ARGUMENT) {
        fprintf(stderr, "an out-of-range token id was accepted (status %d)\n", (int)status);
        return 1;
    }
    printf("rejected as expected: %s\n", msd_last_error_message());
    printf("OK (cuda compiled: %d, cuda devices: %d)\n", msd_cuda_compiled(),
           msd_cuda_device_count());
    return 0;
}
