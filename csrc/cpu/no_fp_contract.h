// Included first by the kernel files whose float32 multiplies and adds must each be rounded on
// their own, as torch rounds them (rope's `x * cos + rotate_half(x) * sin`, the norms): turns off
// the compiler's contraction of a multiply and an add into one FMA for the rest of the file.
// (x86-64 baseline builds have no FMA to contract to, but AVX-512 functions and aarch64 do.)
#pragma once

#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif
