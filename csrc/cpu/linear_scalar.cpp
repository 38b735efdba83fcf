// Portable path of msd_linear_cpu, for CPUs (or builds) without AVX2: one weight row at a time
// against every row of x, so each row still comes from memory once. Eight partial sums per dot
// product keep the rounding error near the SIMD paths' (and let the compiler vectorise).
#include "cpu/linear.h"

namespace msd::cpu {
namespace {

constexpr int kLanes = 8;

template <class D>
float dot(const float* x, const typename D::T* w, int64_t k) {
    float lanes[kLanes] = {};
    int64_t c = 0;
    for (; c + kLanes <= k; c += kLanes) {
        for (int l = 0; l < kLanes; ++l) lanes[l] += x[c + l] * D::load(w[c + l]);
    }
    float sum = 0.0f;
    for (int l = 0; l < kLanes; ++l) sum += lanes[l];
    for (; c < k; ++c) sum += x[c] * D::load(w[c]);
    return sum;
}

template <class D>
void rows(const LinearArgs& a, int64_t begin, int64_t end) {
    for (int64_t col = begin; col < end; ++col) {
        const auto* w = static_cast<const typename D::T*>(a.weight) + col * a.weight_row_stride;
        for (int64_t i = 0; i < a.m; ++i) {
            const float sum = dot<D>(a.x + i * a.x_row_stride, w, a.k);
            store_block<D>(a, &sum, i, 1, col, 1);
        }
    }
}

template <class D>
void widen(const void* src, int64_t src_row_stride, int64_t rows, int64_t k, float* dst) {
    for (int64_t i = 0; i < rows; ++i) {
        const auto* s = static_cast<const typename D::T*>(src) + i * src_row_stride;
        for (int64_t c = 0; c < k; ++c) dst[i * k + c] = D::load(s[c]);
    }
}

const LinearKernels kKernels = {
    {rows<Float32>, rows<Float16>, rows<BFloat16>}, widen<Float16>, widen<BFloat16>, false};

}  // namespace

const LinearKernels* linear_kernels_scalar() { return &kKernels; }

}  // namespace msd::cpu
