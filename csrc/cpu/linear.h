// Internal to the CPU linear kernel: what linear.cpp (dispatch, threads) hands to the per-ISA
// kernels in linear_{scalar,avx2,avx512,avx512_bf16,amx}.cpp (the tree attention also uses the
// x wideners).
#pragma once

#include <cstdint>

#include "cpu/dtype.h"

namespace msd::cpu {

// One call's operands. `x` is float32: float16 / bfloat16 rows are widened once per call (by
// the ISA's `widen`) before any weight is read; float32 rows are used in place. A kernel table
// with `bfloat16_reads_x16` instead reads bfloat16 rows as they are, from `x16` (then `x` is
// unset).
struct LinearArgs {
    const float* x;
    int64_t x_row_stride;
    const void* weight;  // [n, k] in dtype
    int64_t weight_row_stride;
    const void* bias;  // [n] in dtype, or nullptr
    void* out;         // [m, n] in dtype
    int64_t out_row_stride;
    int64_t m;
    int64_t k;
    // For kernels with bfloat16_reads_x16: the caller's bfloat16 rows [m, k] with their row stride,
    // or (pack_bfloat16_x set) the packed rows, whose layout the kernel knows (stride unused).
    const void* x16 = nullptr;
    int64_t x16_row_stride = 0;
};

// Computes output columns [row_begin, row_end) (= weight rows) for all m rows of x.
using LinearRowsFn = void (*)(const LinearArgs& args, int64_t row_begin, int64_t row_end);
// Widens `rows` rows of `k` 16-bit values (float16 or bfloat16, row stride `src_row_stride`)
// into `dst` [rows, k] float32.
using WidenFn = void (*)(const void* src, int64_t src_row_stride, int64_t rows, int64_t k,
                         float* dst);

// Packs `m` bfloat16 rows of `k` values (row stride `src_row_stride`) into `dst`, in the layout
// a table's rows[MSD_BFLOAT16] reads from LinearArgs::x16; returns the uint16 count it writes,
// and only that (nothing is written) when dst is nullptr.
using PackFn = int64_t (*)(const void* src, int64_t src_row_stride, int64_t m, int64_t k,
                           uint16_t* dst);

// One SIMD path: a rows kernel per dtype (indexed by msd_dtype) and the x wideners (also used
// by the tree attention for K/V rows).
struct LinearKernels {
    LinearRowsFn rows[3];
    WidenFn widen_half;
    WidenFn widen_bfloat16;
    bool bfloat16_reads_x16 = false;  // rows[MSD_BFLOAT16] reads LinearArgs::x16, not x
    PackFn pack_bfloat16_x = nullptr;  // if set, x16 is x packed by this, not x as given
};

// The tables, or nullptr for a path this build cannot compile (AVX on non-x86 hosts).
const LinearKernels* linear_kernels_scalar();
const LinearKernels* linear_kernels_avx2();
const LinearKernels* linear_kernels_avx512();
const LinearKernels* linear_kernels_avx512_bf16();  // AVX-512's, with bfloat16 via vdpbf16ps
const LinearKernels* linear_kernels_amx();  // AVX-512's, with bfloat16 on AMX tiles

// Weight rows per register block: each block's rows are read from memory once and re-read
// from L1 for every group of x rows.
constexpr int kLinearBlockRows = 4;

// Writes the `x_rows` x `weight_rows` block of dot products `sums` (row-major, `weight_rows`
// per x row) to out[x_row + i, col + r], adding the bias in float32 before the one rounding.
template <class D>
inline void store_block(const LinearArgs& a, const float* sums, int64_t x_row, int x_rows,
                        int64_t col, int weight_rows) {
    using T = typename D::T;
    const T* bias = static_cast<const T*>(a.bias);
    for (int i = 0; i < x_rows; ++i) {
        T* out = static_cast<T*>(a.out) + (x_row + i) * a.out_row_stride + col;
        for (int r = 0; r < weight_rows; ++r) {
            const float sum = sums[i * weight_rows + r];
            out[r] = D::store(bias ? sum + D::load(bias[col + r]) : sum);
        }
    }
}

}  // namespace msd::cpu
