// Internal to the CPU rope kernel: the head-row function rope_kv_write.cpp (loops, scalar path)
// takes from rope_avx512.cpp.
#pragma once

#include <cstdint>

#include "internal.h"

namespace msd::cpu {

// rope of one head row of 2 * half elements: src -> dst (dst may be src), c / s the token's
// cos / sin rows; roundings as msd_rope_kv_write_cpu documents.
using RotateFn = void (*)(const void* src, const void* c, const void* s, int64_t half, void* dst);

// The AVX-512 head-row function for `dtype`, or nullptr where this build has no AVX-512 path.
RotateFn rope_rotate_avx512(msd_dtype dtype);

}  // namespace msd::cpu
