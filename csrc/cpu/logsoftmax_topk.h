// Internal to the CPU log-softmax top-k kernel: what logsoftmax_topk.cpp (dispatch, scalar path)
// and logsoftmax_topk_avx512.cpp share.
#pragma once

#include <cmath>
#include <cstdint>

#include "internal.h"

namespace msd::cpu {

// The k best (value, index) pairs offered so far, best first, in the caller's output arrays.
// A value ranks above another when it is larger or when it is NaN and the other is not (torch's
// order); equal values keep the order they were offered in, so a row offered left to right keeps
// ties in ascending index.
struct TopK {
    float* values;
    int64_t* indices;
    int64_t k;
    int64_t size = 0;

    static bool above(float a, float b) { return std::isnan(a) ? !std::isnan(b) : a > b; }
    bool full() const { return size == k; }
    // The value an offer must rank above to get in once full.
    float last() const { return values[k - 1]; }

    void offer(float value, int64_t index) {
        if (full() && !above(value, last())) return;
        int64_t j = full() ? k - 1 : size++;
        for (; j > 0 && above(value, values[j - 1]); --j) {
            values[j] = values[j - 1];
            indices[j] = indices[j - 1];
        }
        values[j] = value;
        indices[j] = index;
    }
};

// Terms exp(logit - max) below exp(-87) (1.6e-38, near float32's smallest normal, 1.2e-38) are left out
// of the sum: against the max's own term of 1 they are below float32's resolution even summed over
// a million columns, and computing them would make subnormals, which cost the x86 cores a
// microcode assist each (measured: 4 rows of 8192 bfloat16 logits of spread ~25, 166 us with
// them, ~20 without).
constexpr float kExpFloor = -87.0f;

// One row of n logits: fills values[0..k) with the k largest logits as float32 (best first, ties
// in ascending index, NaN first) and indices[0..k) with their columns, and returns
// (max, sum over the row of exp(logit - max)) for the log-softmax, with NaN as the sum when a
// logit is NaN or the max is not finite (+inf, or a row of -inf: torch gives NaN there too).
struct RowStats {
    float max;
    double sum;
};
using TopKRowFn = RowStats (*)(const void* logits, int64_t n, TopK& best);

// The AVX-512 row function for `dtype`, or nullptr where this build has no AVX-512 path.
TopKRowFn logsoftmax_topk_avx512(msd_dtype dtype);

}  // namespace msd::cpu
