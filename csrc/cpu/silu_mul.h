// Internal to the CPU SwiGLU kernel: what silu_mul.cpp (dispatch, scalar path) takes from
// silu_mul_avx512.cpp.
#pragma once

#include <cstdint>

#include "internal.h"

namespace msd::cpu {

// out[i, j] = round(round(silu(gate[i, j])) * up[i, j]) for `rows` rows of `inter` (see
// msd_silu_mul_cpu); gate is the first half of each gate_up row, up the second.
using SiluMulFn = void (*)(const void* gate_up, void* out, int64_t rows, int64_t inter,
                           int64_t gate_up_row_stride, int64_t out_row_stride);

// The AVX-512 rows function for `dtype`, or nullptr where this build has no AVX-512 path.
SiluMulFn silu_mul_avx512(msd_dtype dtype);

}  // namespace msd::cpu
