// The draft's log-softmax top-k on the CPU (msd_logsoftmax_topk_cpu in msd_engine.h): per row, the
// k largest logits and their log-probabilities, (logit - max) - log(sum exp(logit - max)) as
// torch's log_softmax computes them. The AVX-512 paths of msd_get_cpu_isa use
// logsoftmax_topk_avx512.cpp; the others the scalar loop here.
#include <cmath>
#include <limits>

#include "cpu/dtype.h"
#include "cpu/logsoftmax_topk.h"

namespace msd::cpu {
namespace {

template <class D>
RowStats row_scalar(const void* logits, int64_t n, TopK& best) {
    const auto* x = static_cast<const typename D::T*>(logits);
    float max = -std::numeric_limits<float>::infinity();
    bool nan = false;
    for (int64_t j = 0; j < n; ++j) {
        const float v = D::load(x[j]);
        best.offer(v, j);
        nan = nan || std::isnan(v);
        max = v > max ? v : max;
    }
    if (nan || !std::isfinite(max)) return {max, std::numeric_limits<double>::quiet_NaN()};
    double sum = 0.0;
    for (int64_t j = 0; j < n; ++j) {
        const float d = D::load(x[j]) - max;
        if (d >= kExpFloor) sum += std::exp(d);
    }
    return {max, sum};
}

TopKRowFn row_function(msd_dtype dtype) {
    if (isa_has_avx512(get_isa())) {
        if (const TopKRowFn fn = logsoftmax_topk_avx512(dtype)) return fn;
    }
    switch (dtype) {
        case MSD_FLOAT32: return row_scalar<Float32>;
        case MSD_FLOAT16: return row_scalar<Float16>;
        case MSD_BFLOAT16: return row_scalar<BFloat16>;
    }
    return nullptr;
}

}  // namespace

msd_status logsoftmax_topk(const void* logits, float* values, int64_t* indices, int64_t rows,
                           int64_t n, int64_t k, int64_t logits_row_stride, msd_dtype dtype) {
    const TopKRowFn row = row_function(dtype);
    if (row == nullptr) {
        return set_error(MSD_ERR_UNSUPPORTED_DTYPE, "dtype %d is not a msd_dtype", static_cast<int>(dtype));
    }
    const int64_t element = dtype_bytes(dtype);
    for (int64_t i = 0; i < rows; ++i) {
        TopK best{values + i * k, indices + i * k, k};
        const RowStats stats =
            row(static_cast<const char*>(logits) + i * logits_row_stride * element, n, best);
        // torch's order of operations: (logit - max) - log(sum). NaN anywhere makes the row NaN;
        // a +inf logit gives inf - inf = NaN too, as in torch.
        const float log_sum = static_cast<float>(std::log(stats.sum));
        for (int64_t j = 0; j < k; ++j) best.values[j] = (best.values[j] - stats.max) - log_sum;
    }
    return MSD_OK;
}

}  // namespace msd::cpu
