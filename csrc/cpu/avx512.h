// The preamble of the AVX-512 kernel files (linear, attention, SwiGLU, RMSNorm, rope): include
// only inside their `#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))`
// block. Every function there carries MSD_AVX512 (or a superset) as its own target attribute
// instead of the file being built with -mavx512f: the library must still load and run on CPUs
// without AVX-512, and calls in only after the CPU was checked. Everything there has internal
// linkage, so no AVX-512 copy of an inline function can be picked by the linker for code that
// runs on other CPUs.
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

namespace msd::cpu {
namespace {

// float32 lanes -> their bfloat16 bits in the low half of each 32-bit lane, rounded to nearest
// even as float_to_bfloat16 (dtype.h) rounds: NaN stays NaN (quieted), overflow gives inf.
MSD_AVX512 inline __m512i bfloat16_bits(__m512 v) {
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd));
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    const __m512i quiet = _mm512_or_si512(bits, _mm512_set1_epi32(0x400000));
    return _mm512_srli_epi32(_mm512_mask_mov_epi32(rounded, nan, quiet), 16);
}

}  // namespace
}  // namespace msd::cpu
