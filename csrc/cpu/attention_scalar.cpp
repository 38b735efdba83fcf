// Portable path of msd_tree_attention_cpu's micro-kernels (see attention.h), for CPUs or builds
// without AVX2; plain loops the compiler may vectorise with the baseline ISA.
#include <algorithm>
#include <cmath>
#include <limits>

#include "cpu/attention.h"

namespace msd::cpu {
namespace {

constexpr int64_t kChunk = 64;  // accumulate: columns summed per pass over a block's keys

void scores(const float* q, int64_t q_stride, int rows, const float* const* k, int keys,
            int64_t d, float* s, int64_t s_stride) {
    for (int m = 0; m < rows; ++m) {
        const float* qm = q + m * q_stride;
        for (int n = 0; n < keys; ++n) {
            const float* kn = k[n];
            float dot = 0.0f;
            for (int64_t c = 0; c < d; ++c) dot += qm[c] * kn[c];
            s[m * s_stride + n] = dot;
        }
    }
}

float softmax_row(float* s, int keys, float* max, float* sum) {
    float block_max = -std::numeric_limits<float>::infinity();
    for (int n = 0; n < keys; ++n) block_max = std::max(block_max, s[n]);
    const float new_max = std::max(*max, block_max);
    if (new_max == -std::numeric_limits<float>::infinity()) {
        std::fill(s, s + keys, 0.0f);
        return 1.0f;
    }
    float total = 0.0f;
    for (int n = 0; n < keys; ++n) {
        s[n] = std::exp2(s[n] - new_max);
        total += s[n];
    }
    const float alpha = std::exp2(*max - new_max);
    *sum = *sum * alpha + total;
    *max = new_max;
    return alpha;
}

void accumulate(const float* p, int64_t p_stride, int rows, const float* const* v, int keys,
                int64_t d, const float* alpha, float* acc, int64_t acc_stride) {
    // The block's sum starts from zero and is added to the rescaled accumulator at the end:
    // summing in two levels keeps float32's error from growing with every key.
    for (int m = 0; m < rows; ++m) {
        float* am = acc + m * acc_stride;
        for (int64_t c0 = 0; c0 < d; c0 += kChunk) {
            const int64_t width = std::min<int64_t>(kChunk, d - c0);
            float block[kChunk] = {};
            for (int n = 0; n < keys; ++n) {
                const float pn = p[m * p_stride + n];
                const float* vn = v[n] + c0;
                for (int64_t c = 0; c < width; ++c) block[c] += pn * vn[c];
            }
            for (int64_t c = 0; c < width; ++c) am[c0 + c] = am[c0 + c] * alpha[m] + block[c];
        }
    }
}

const AttentionKernels kKernels = {scores, softmax_row, accumulate};

}  // namespace

const AttentionKernels* attention_kernels_scalar() { return &kKernels; }

}  // namespace msd::cpu
