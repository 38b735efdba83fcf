// msd_rope_kv_write_cpu: rope(q) -> q_out, rope(k) -> k_cache, v -> v_cache (semantics in
// msd_engine.h). Each product and each sum is rounded to the dtype on its own, as torch's
// `x * cos + rotate_half(x) * sin` does in that dtype; for float32 that needs the multiplies and
// adds kept apart, hence no FMA contraction here (x86-64 builds have no FMA to contract to, but
// aarch64's baseline does). Each (d, d + h) pair is read before either output is written, which
// makes q_out == q safe. The AVX-512 paths of msd_get_cpu_isa rotate with rope_avx512.cpp's
// function, which gives these bits.
#include "cpu/no_fp_contract.h"  // first: before any arithmetic

#include <cstring>

#include "cpu/dtype.h"
#include "cpu/rope.h"

namespace msd::cpu {
namespace {

// rope of one head row: src -> dst, c / s the token's cos / sin rows.
template <class D>
void rotate(const void* src_row, const void* c_row, const void* s_row, int64_t half,
            void* dst_row) {
    using T = typename D::T;
    const T* src = static_cast<const T*>(src_row);
    const T* c = static_cast<const T*>(c_row);
    const T* s = static_cast<const T*>(s_row);
    T* dst = static_cast<T*>(dst_row);
    for (int64_t d = 0; d < half; ++d) {
        const float x1 = D::load(src[d]);
        const float x2 = D::load(src[half + d]);
        const float a1 = round_to<D>(x1 * D::load(c[d]));
        const float b1 = round_to<D>(x2 * D::load(s[d]));
        const float a2 = round_to<D>(x2 * D::load(c[half + d]));
        const float b2 = round_to<D>(x1 * D::load(s[half + d]));
        dst[d] = D::store(a1 - b1);
        dst[half + d] = D::store(a2 + b2);
    }
}

template <class D>
void rope_kv_write_typed(const RopeKvWrite& a) {
    using T = typename D::T;
    RotateFn fn = isa_has_avx512(get_isa()) ? rope_rotate_avx512(a.dtype) : nullptr;
    if (fn == nullptr) fn = rotate<D>;
    const int64_t half = a.head_dim / 2;
    for (int64_t t = 0; t < a.tokens; ++t) {
        const T* c = static_cast<const T*>(a.cos) + t * a.table_row_stride;
        const T* s = static_cast<const T*>(a.sin) + t * a.table_row_stride;
        for (int64_t i = 0; i < a.heads; ++i) {
            fn(static_cast<const T*>(a.q) + t * a.q_row_stride + i * a.q_head_stride, c, s, half,
               static_cast<T*>(a.q_out) + t * a.q_out_row_stride + i * a.q_out_head_stride);
        }
        const int64_t slot = (a.start + t) * a.cache_slot_stride;
        for (int64_t g = 0; g < a.kv_heads; ++g) {
            const int64_t in = t * a.kv_row_stride + g * a.kv_head_stride;
            const int64_t out = g * a.cache_head_stride + slot;
            fn(static_cast<const T*>(a.k) + in, c, s, half, static_cast<T*>(a.k_cache) + out);
            std::memcpy(static_cast<T*>(a.v_cache) + out, static_cast<const T*>(a.v) + in,
                        static_cast<size_t>(a.head_dim) * sizeof(T));
        }
    }
}

}  // namespace

msd_status rope_kv_write(const RopeKvWrite& a) {
    return dispatch_dtype(a.dtype, [&](auto tag) { rope_kv_write_typed<decltype(tag)>(a); });
}

}  // namespace msd::cpu
