// float16 / bfloat16 <-> float32 conversions for the CPU kernels, written out by hand so that
// the library needs neither F16C nor a C++23 <stdfloat>. Rounding is to nearest, ties to even,
// as torch's `.to(torch.float16 / torch.bfloat16)` does; NaN stays NaN, overflow gives inf.
#pragma once

#include <cstdint>
#include <cstring>

#include "internal.h"

namespace msd::cpu {

inline uint32_t float_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    return u;
}

inline float bits_float(uint32_t u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

inline float half_to_float(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t exponent = (h >> 10) & 0x1fu;
    const uint32_t mantissa = h & 0x3ffu;
    if (exponent == 0x1fu) return bits_float(sign | 0x7f800000u | (mantissa << 13));  // inf, NaN
    if (exponent == 0) {
        // Zero or subnormal: mantissa * 2^-24, exact in float32.
        const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-08f;
        return sign ? -magnitude : magnitude;
    }
    return bits_float(sign | ((exponent + (127 - 15)) << 23) | (mantissa << 13));
}

inline uint16_t float_to_half(float f) {
    const uint32_t bits = float_bits(f);
    const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
    uint32_t magnitude = bits & 0x7fffffffu;
    if (magnitude > 0x7f800000u) return sign | 0x7e00u | ((magnitude >> 13) & 0x3ffu);  // NaN
    if (magnitude >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 rounds to inf
    if (magnitude < 0x38800000u) {
        // Below 2^-14 (half's smallest normal): adding 0.5 puts the value in a binade whose
        // float32 ulp is 2^-24, half's subnormal step, so the FPU's own round-to-nearest-even
        // does the rounding; the low bits are then the half's subnormal mantissa.
        const float shifted = bits_float(magnitude) + 0.5f;
        return sign | static_cast<uint16_t>(float_bits(shifted) - 0x3f000000u);
    }
    // Normal: rebias the exponent (127 -> 15) and round the 13 dropped bits to nearest even.
    const uint32_t odd = (magnitude >> 13) & 1u;
    magnitude += (static_cast<uint32_t>(15 - 127) << 23) + 0xfffu + odd;
    return sign | static_cast<uint16_t>(magnitude >> 13);
}

inline float bfloat16_to_float(uint16_t b) { return bits_float(static_cast<uint32_t>(b) << 16); }

inline uint16_t float_to_bfloat16(float f) {
    uint32_t bits = float_bits(f);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
    bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest even; overflow carries to inf
    return static_cast<uint16_t>(bits >> 16);
}

// Storage traits: `T` is what sits in memory, load() widens to float32, store() rounds back.
struct Float32 {
    using T = float;
    static float load(T v) { return v; }
    static T store(float f) { return f; }
};
struct Float16 {
    using T = uint16_t;
    static float load(T v) { return half_to_float(v); }
    static T store(float f) { return float_to_half(f); }
};
struct BFloat16 {
    using T = uint16_t;
    static float load(T v) { return bfloat16_to_float(v); }
    static T store(float f) { return float_to_bfloat16(f); }
};

// Rounds a float32 to the storage type and back: the value torch holds after `.to(dtype)`.
template <class D>
inline float round_to(float f) {
    return D::load(D::store(f));
}

// Calls `kernel(Tag{})` with the storage traits for `dtype`: one switch instead of one per op.
template <class Kernel>
msd_status dispatch_dtype(msd_dtype dtype, Kernel&& kernel) {
    switch (dtype) {
        case MSD_FLOAT32: kernel(Float32{}); return MSD_OK;
        case MSD_FLOAT16: kernel(Float16{}); return MSD_OK;
        case MSD_BFLOAT16: kernel(BFloat16{}); return MSD_OK;
    }
    return set_error(MSD_ERR_UNSUPPORTED_DTYPE, "dtype %d is not a msd_dtype", static_cast<int>(dtype));
}

}  // namespace msd::cpu
