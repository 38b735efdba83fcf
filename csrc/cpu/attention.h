// Internal to the CPU tree attention: what tree_attention.cpp (tiling, masks, threads) hands to
// the per-ISA micro-kernels in attention_scalar.cpp, attention_avx2.cpp, attention_avx512.cpp.
// Everything here is float32: 16-bit K/V blocks are widened before they get here.
#pragma once

#include <cstdint>

namespace msd::cpu {

// Keys per block (a row of scores); also the largest `keys` the kernels below are given.
constexpr int kAttentionBlockKeys = 64;
// Query rows per block; also the largest `rows`.
constexpr int kAttentionBlockRows = 64;

struct AttentionKernels {
    // s[m * s_stride + n] = dot(q row m, k[n]) over d columns, for m < rows, n < keys. Keys
    // (and values below) come as row pointers, so a query can walk the keys it sees, gathered
    // from anywhere, as one dense block. Each (row, key) sum runs over the columns in one fixed
    // order, whatever the other rows and keys of the call: a score does not depend on how the
    // rows and keys are blocked.
    // Rows of s must have room for `keys` rounded up to a multiple of 4 (they may be written).
    void (*scores)(const float* q, int64_t q_stride, int rows, const float* const* k, int keys,
                   int64_t d, float* s, int64_t s_stride);
    // One online-softmax step of one query row over a block of `keys` scores (base-2 logits,
    // -inf = not visible): with m' = max(*max, max_n s[n]), turns s[n] into exp2(s[n] - m'),
    // sets *sum = *sum * alpha + sum_n s[n] and *max = m', and returns
    // alpha = exp2(old *max - m'), the factor for what was accumulated so far. A row with
    // nothing visible yet (m' = -inf) gets s = 0 and alpha = 1.
    float (*softmax_row)(float* s, int keys, float* max, float* sum);
    // acc[m, :] = alpha[m] * acc[m, :] + sum_n p[m * p_stride + n] * v[n][:] over d columns,
    // for m < rows, n < keys; the sum over n runs in key order, per row.
    void (*accumulate)(const float* p, int64_t p_stride, int rows, const float* const* v,
                       int keys, int64_t d, const float* alpha, float* acc, int64_t acc_stride);
};

// The tables, or nullptr for a path this build cannot compile (AVX on non-x86 hosts). Which
// one runs follows msd_get_cpu_isa, as for msd_linear_cpu.
const AttentionKernels* attention_kernels_scalar();
const AttentionKernels* attention_kernels_avx2();
const AttentionKernels* attention_kernels_avx512();

}  // namespace msd::cpu
