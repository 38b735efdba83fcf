// exp over 16 float32 lanes for the AVX-512 kernels (SwiGLU, log-softmax): include after
// avx512.h, inside the x86-64 GCC / Clang block (see avx512.h).
//
// exp(x) = 2^n * e^r with x first clamped to [-104, 88.8] (outside it exp is 0 or inf in float32),
// n = round(x / ln 2) and r = x - n ln 2 (ln 2 split in two so that r is exact to float32
// precision), e^r by its degree-7 Taylor polynomial on |r| <= ln2 / 2 (truncation < 5e-9 relative,
// under a tenth of a float32 ulp), and 2^n applied by vscalefps, which gives 0 and inf past
// float32's range. So exp is within ~2 ulps of the true value (0 / inf at the ends, NaN for NaN),
// like the exps of glibc and of torch (Sleef).
#pragma once

namespace msd::cpu {
namespace {

MSD_AVX512 inline __m512 exp_ps(__m512 x) {
    // exp underflows to 0 below -104 and overflows to inf above 88.8: clamping there keeps n and r
    // finite for every input (inf and huge values included), and keeps NaN (MAXPS / MINPS return
    // their second operand when one is NaN).
    x = _mm512_min_ps(_mm512_set1_ps(88.8f), _mm512_max_ps(_mm512_set1_ps(-104.0f), x));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860682030941723212e-6f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    // NaN x: n and r are NaN, and so is the result.
    return _mm512_scalef_ps(p, n);
}

}  // namespace
}  // namespace msd::cpu
