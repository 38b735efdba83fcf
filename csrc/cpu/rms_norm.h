// Internal to the CPU RMSNorm kernels: the row functions rms_norm.cpp (dispatch, scalar path)
// takes from rms_norm_avx512.cpp. Both paths give the same bits: the sum of squares has one
// fixed order (kSumLanes partial sums in double, lane j % kSumLanes, then halved pairwise), and
// the rest is elementwise with the same roundings. (A row holding two different NaNs may keep
// either one's payload: only that the result is NaN is the same.)
#pragma once

#include <cstdint>

#include "internal.h"

namespace msd::cpu {

constexpr int kSumLanes = 16;

struct NormRowKernels {
    // 1 / sqrt(mean(x32 * x32) + eps) of one row of `dim` elements.
    float (*inverse_rms)(const void* row, int64_t dim, float eps);
    // out[j] = round(weight[j] * round(x[j] * inv_rms)).
    void (*normalize)(const void* x, const void* weight, void* out, int64_t dim, float inv_rms);
    // residual[j] = round(residual[j] + x[j]).
    void (*add)(const void* x, void* residual, int64_t dim);
};

// The AVX-512 row functions for `dtype`; false where this build has no AVX-512 path.
bool norm_rows_avx512(msd_dtype dtype, NormRowKernels* kernels);

}  // namespace msd::cpu
