// 16 float32 lanes of a dtype for the AVX-512 elementwise kernels (SwiGLU, RMSNorm, rope):
// include after avx512.h and dtype.h, inside the x86-64 GCC / Clang block (see avx512.h).
#pragma once

namespace msd::cpu {
namespace {

constexpr int kLanes = 16;

// The first `count` of 16 lanes (all 16 for count >= 16).
MSD_AVX512 inline __mmask16 lane_mask(int64_t count) {
    return count >= kLanes ? static_cast<__mmask16>(0xffff)
                           : static_cast<__mmask16>((1u << count) - 1u);
}

// Storage traits for 16 lanes: load widens to float32 (masked lanes read as 0), store rounds to
// nearest even as the scalar D::store does (NaN stays a quiet NaN).
template <class D>
struct Lanes;
template <>
struct Lanes<Float32> {
    MSD_AVX512 static __m512 load(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
    MSD_AVX512 static void store(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
    MSD_AVX512 static __m512 round(__m512 v) { return v; }
};
template <>
struct Lanes<Float16> {
    MSD_AVX512 static __m512 load(const uint16_t* p, __mmask16 m) {
        return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
    }
    MSD_AVX512 static __m256i pack(__m512 v) {
        return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    }
    MSD_AVX512 static void store(uint16_t* p, __m512 v, __mmask16 m) {
        _mm256_mask_storeu_epi16(p, m, pack(v));
    }
    MSD_AVX512 static __m512 round(__m512 v) { return _mm512_cvtph_ps(pack(v)); }
};
template <>
struct Lanes<BFloat16> {
    MSD_AVX512 static __m512 load(const uint16_t* p, __mmask16 m) {
        const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
        return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
    }
    // The bfloat16 bits in the low half of each 32-bit lane.
    MSD_AVX512 static __m512i pack(__m512 v) { return bfloat16_bits(v); }
    MSD_AVX512 static void store(uint16_t* p, __m512 v, __mmask16 m) {
        _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(pack(v)));
    }
    MSD_AVX512 static __m512 round(__m512 v) {
        return _mm512_castsi512_ps(_mm512_slli_epi32(pack(v), 16));
    }
};

}  // namespace
}  // namespace msd::cpu
