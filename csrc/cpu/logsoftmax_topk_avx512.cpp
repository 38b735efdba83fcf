// AVX-512 path of msd_logsoftmax_topk_cpu's row function (target attributes and linkage as
// avx512.h says): one pass for the max, the NaN test and the top-k (only lanes that beat the
// current k-th are offered one by one), then one for the sum of exp(logit - max) with
// exp_avx512.h's exp, in 16 float32 lane sums added up in double. Terms below exp(kExpFloor) are
// left out (logsoftmax_topk.h).
#include "cpu/logsoftmax_topk.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))

#include <limits>

#include "cpu/avx512.h"
#include "cpu/dtype.h"
#include "cpu/exp_avx512.h"
#include "cpu/lanes_avx512.h"

namespace msd::cpu {
namespace {

template <class D>
MSD_AVX512 RowStats row(const void* logits, int64_t n, TopK& best) {
    using L = Lanes<D>;
    const auto* x = static_cast<const typename D::T*>(logits);
    const __m512 minus_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    __m512 max = minus_inf;
    __mmask16 nan = 0;
    alignas(64) float lanes[kLanes];
    for (int64_t c = 0; c < n; c += kLanes) {
        const __mmask16 m = lane_mask(n - c);
        const __m512 v = L::load(x + c, m);
        nan |= _mm512_mask_cmp_ps_mask(m, v, v, _CMP_UNORD_Q);
        max = _mm512_mask_max_ps(max, m, v, max);  // MAXPS gives the second operand (max) for NaN v
        // Lanes that may enter: every valid lane until k are held, then those ranking above the
        // k-th (greater, or NaN: _CMP_NLE_UQ is true for unordered); nothing ranks above a NaN k-th.
        __mmask16 enter = m;
        if (best.full()) {
            const float last = best.last();
            enter = std::isnan(last) ? 0 : _mm512_mask_cmp_ps_mask(m, v, _mm512_set1_ps(last), _CMP_NLE_UQ);
        }
        if (enter) {
            _mm512_store_ps(lanes, v);
            for (int lane = 0; lane < kLanes; ++lane) {
                if (enter >> lane & 1) best.offer(lanes[lane], c + lane);
            }
        }
    }
    const float row_max = _mm512_reduce_max_ps(max);
    if (nan || !std::isfinite(row_max)) return {row_max, std::numeric_limits<double>::quiet_NaN()};
    const __m512 shift = _mm512_set1_ps(row_max);
    const __m512 floor = _mm512_set1_ps(kExpFloor);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t c = 0; c < n; c += kLanes) {
        const __mmask16 m = lane_mask(n - c);
        const __m512 d = _mm512_sub_ps(L::load(x + c, m), shift);
        const __mmask16 terms = m & _mm512_cmp_ps_mask(d, floor, _CMP_GE_OQ);
        sum = _mm512_mask_add_ps(sum, terms, sum, exp_ps(_mm512_max_ps(d, floor)));
    }
    _mm512_store_ps(lanes, sum);
    double total = 0.0;
    for (float s : lanes) total += s;
    return {row_max, total};
}

}  // namespace

TopKRowFn logsoftmax_topk_avx512(msd_dtype dtype) {
    switch (dtype) {
        case MSD_FLOAT32: return row<Float32>;
        case MSD_FLOAT16: return row<Float16>;
        case MSD_BFLOAT16: return row<BFloat16>;
    }
    return nullptr;
}

}  // namespace msd::cpu

#else  // not x86-64 with GCC / Clang: no AVX-512 path

namespace msd::cpu {
TopKRowFn logsoftmax_topk_avx512(msd_dtype) { return nullptr; }
}  // namespace msd::cpu

#endif
