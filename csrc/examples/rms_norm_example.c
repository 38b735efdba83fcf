/* The C API from plain C: RMSNorm over a small float32 array, checked against a naive loop.
 * Built and run by ctest (see CMakeLists.txt); also a template for C/C++ services. */
#include <math.h>
#include <stdio.h>

#include "msd_engine.h"

#define ROWS 3
#define DIM 5
#define STRIDE 8 /* rows padded to 8 elements: the kernel must honour the row stride */

int main(void) {
    float x[ROWS * STRIDE];
    float weight[DIM];
    float out[ROWS * DIM];
    const float eps = 1e-6f;
    for (int i = 0; i < ROWS * STRIDE; ++i) x[i] = (float)((i * 37) % 11) - 5.0f;
    for (int j = 0; j < DIM; ++j) weight[j] = 0.5f + 0.25f * (float)j;

    msd_status status = msd_rms_norm_cpu(x, weight, out, ROWS, DIM, STRIDE, DIM, eps, MSD_FLOAT32);
    if (status != MSD_OK) {
        fprintf(stderr, "msd_rms_norm_cpu: %s: %s\n", msd_status_string(status),
                msd_last_error_message());
        return 1;
    }
    for (int i = 0; i < ROWS; ++i) {
        double sum_squares = 0.0;
        for (int j = 0; j < DIM; ++j) sum_squares += (double)x[i * STRIDE + j] * x[i * STRIDE + j];
        const double inv_rms = 1.0 / sqrt(sum_squares / DIM + eps);
        for (int j = 0; j < DIM; ++j) {
            const double expected = weight[j] * x[i * STRIDE + j] * inv_rms;
            const double got = out[i * DIM + j];
            if (fabs(got - expected) > 1e-5 * (1.0 + fabs(expected))) {
                fprintf(stderr, "row %d col %d: got %.9g, expected %.9g\n", i, j, got, expected);
                return 1;
            }
        }
    }

    /* A bad argument is reported by name. */
    status = msd_rms_norm_cpu(x, weight, out, ROWS, DIM, DIM - 1, DIM, eps, MSD_FLOAT32);
    if (status != MSD_ERR_INVALID_ARGUMENT) {
        fprintf(stderr, "a short x_row_stride was accepted (status %d)\n", (int)status);
        return 1;
    }
    printf("rejected as expected: %s\n", msd_last_error_message());
    printf("OK (cuda compiled: %d, cuda devices: %d)\n", msd_cuda_compiled(), msd_cuda_device_count());
    return 0;
}
