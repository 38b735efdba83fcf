// Rotary embedding of q and k fused with the KV-cache write (semantics in msd_engine.h): one
// launch per attention layer instead of torch's cat / mul / mul / add per tensor plus two copies.
//
// One thread per (token, head, pair (d, d + h)) of the token's q heads, then k heads, then v
// heads (a v "pair" is copied as it is), so even a decode step (T = 1) has
// (Hq + 2 Hkv) * D / 2 threads; consecutive threads take consecutive d of a head, so every load
// and store is coalesced, and nothing is read twice. The grid strides over tokens (x) and over a
// token's pairs (y). Multiplies and adds use the _rn intrinsics, which are never contracted
// into FMAs: float32 rounds like torch's separate mul and add, bit for bit.
#include "cuda/common.cuh"

namespace msd::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGridY = 65535;

// Pair d of one head row: rope(src) -> dst, given the token's cos / sin rows.
template <class D>
__device__ inline void rotate_pair(const typename D::T* src, const typename D::T* c,
                                   const typename D::T* s, int64_t half, int64_t d,
                                   typename D::T* dst) {
    const float x1 = D::load(src[d]);
    const float x2 = D::load(src[half + d]);
    const float a1 = round_to<D>(__fmul_rn(x1, D::load(c[d])));
    const float b1 = round_to<D>(__fmul_rn(x2, D::load(s[d])));
    const float a2 = round_to<D>(__fmul_rn(x2, D::load(c[half + d])));
    const float b2 = round_to<D>(__fmul_rn(x1, D::load(s[half + d])));
    dst[d] = D::store(__fsub_rn(a1, b1));  // read both halves first: dst may be src (q in place)
    dst[half + d] = D::store(__fadd_rn(a2, b2));
}

template <class D>
__global__ void __launch_bounds__(kThreads) rope_kv_write_kernel(const RopeKvWrite a) {
    using T = typename D::T;
    const int64_t half = a.head_dim / 2;
    const int64_t pairs = (a.heads + 2 * a.kv_heads) * half;  // per token
    const int64_t first = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
    const int64_t step = static_cast<int64_t>(gridDim.y) * blockDim.x;
    for (int64_t t = blockIdx.x; t < a.tokens; t += gridDim.x) {
        const T* c = static_cast<const T*>(a.cos) + t * a.table_row_stride;
        const T* s = static_cast<const T*>(a.sin) + t * a.table_row_stride;
        const int64_t slot = (a.start + t) * a.cache_slot_stride;
        for (int64_t u = first; u < pairs; u += step) {
            const int64_t head = u / half;
            const int64_t d = u % half;
            if (head < a.heads) {
                rotate_pair<D>(static_cast<const T*>(a.q) + t * a.q_row_stride +
                                   head * a.q_head_stride,
                               c, s, half, d,
                               static_cast<T*>(a.q_out) + t * a.q_out_row_stride +
                                   head * a.q_out_head_stride);
                continue;
            }
            const int64_t g = (head - a.heads) % a.kv_heads;
            const int64_t in = t * a.kv_row_stride + g * a.kv_head_stride;
            const int64_t out = g * a.cache_head_stride + slot;
            if (head < a.heads + a.kv_heads) {
                rotate_pair<D>(static_cast<const T*>(a.k) + in, c, s, half, d,
                               static_cast<T*>(a.k_cache) + out);
            } else {
                const T* v = static_cast<const T*>(a.v) + in;
                T* v_cache = static_cast<T*>(a.v_cache) + out;
                v_cache[d] = v[d];
                v_cache[half + d] = v[half + d];
            }
        }
    }
}

}  // namespace

msd_status rope_kv_write(const RopeKvWrite& a, void* stream) {
    const int64_t pairs = (a.heads + 2 * a.kv_heads) * (a.head_dim / 2);
    const dim3 grid(grid_for(a.tokens),
                    static_cast<unsigned>(std::min<int64_t>((pairs + kThreads - 1) / kThreads,
                                                            kMaxGridY)));
    return dispatch_dtype(a.dtype, [&](auto tag) {
        using D = decltype(tag);
        rope_kv_write_kernel<D><<<grid, kThreads, 0, as_stream(stream)>>>(a);
        return check_launch("rope_kv_write_kernel");
    });
}

}  // namespace msd::cuda
