// The preamble of the AVX-512 kernel files (linear, attention, SwiGLU): include only inside their
// `#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))` block. Every function
// there carries MSD_AVX512 (or a superset) as its own target attribute instead of the file being
// built with -mavx512f: the library must still load and run on CPUs without AVX-512, and calls in
// only after the CPU was checked. Everything there has internal linkage, so no AVX-512 copy of an
// inline function can be picked by the linker for code that runs on other CPUs.
#pragma once

// GCC 12's AVX-512 headers start several intrinsics from `__m512 __Y = __Y;`, which its own
// -Wuninitialized then flags at every use (GCC PR 105593, fixed in GCC 13). Must precede the
// include: the warnings point into the header.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>

#define MSD_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,f16c,fma")))
