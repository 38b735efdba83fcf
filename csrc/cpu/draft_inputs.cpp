// msd_draft_inputs_cpu: the draft head's fused input (semantics in msd_engine.h).
//
// The rows that go through fc (all but the bypassed image rows) are gathered into one buffer
// [m, 2H] in dtype, each row's embedding (or image row) then its feature, and handed to
// msd_linear_cpu as x: the linear kernel (SIMD path, widening, thread pool) streams each
// fc_weight row once for all m rows and adds the bias before the one rounding. Outputs go
// straight to `out` when every row is an fc row; otherwise to a scratch [m, H] that is then
// scattered to the fc rows of `out`. Bypassed rows are byte copies of their source row.
#include <cstring>
#include <vector>

#include "cpu/buffer.h"
#include "internal.h"

namespace msd::cpu {
namespace {


bool bypassed(const DraftInputs& a, int64_t t) { return a.bypass && a.is_image[t] != 0; }

// The first H inputs of row t (image row, embed[0] or the token's embedding), in dtype.
const unsigned char* source_row(const DraftInputs& a, int64_t t) {
    const int64_t bytes = dtype_bytes(a.dtype);
    const bool image = a.is_image != nullptr && a.is_image[t] != 0;
    if (image && a.image_rows != nullptr) {
        return static_cast<const unsigned char*>(a.image_rows) + t * a.image_rows_row_stride * bytes;
    }
    const int64_t token = image ? 0 : a.token_ids[t];
    return static_cast<const unsigned char*>(a.embed) + token * a.embed_row_stride * bytes;
}

}  // namespace

msd_status draft_inputs(const DraftInputs& a, int num_threads) {
    const int64_t hidden = a.hidden;
    const int64_t width = 2 * hidden;
    const int64_t bytes = dtype_bytes(a.dtype);
    const int64_t row_bytes = hidden * bytes;
    auto* out = static_cast<unsigned char*>(a.out);

    // Grown to the largest call seen on this thread, like msd_linear_cpu's widening buffer.
    thread_local std::vector<int64_t> fc_rows;
    thread_local std::vector<unsigned char> x;
    thread_local std::vector<unsigned char> scratch;
    if (!reserve(fc_rows, a.rows, "the fc row list")) return MSD_ERR_OUT_OF_MEMORY;
    int64_t m = 0;
    for (int64_t t = 0; t < a.rows; ++t) {
        if (bypassed(a, t)) {
            std::memcpy(out + t * a.out_row_stride * bytes, source_row(a, t),
                        static_cast<size_t>(row_bytes));
        } else {
            fc_rows[m++] = t;
        }
    }
    if (m == 0) return MSD_OK;

    if (!reserve(x, m * 2 * row_bytes, "the gathered fc inputs")) return MSD_ERR_OUT_OF_MEMORY;
    const auto* features = static_cast<const unsigned char*>(a.features);
    for (int64_t i = 0; i < m; ++i) {
        const int64_t t = fc_rows[i];
        unsigned char* row = x.data() + i * 2 * row_bytes;
        std::memcpy(row, source_row(a, t), static_cast<size_t>(row_bytes));
        std::memcpy(row + row_bytes, features + t * a.features_row_stride * bytes,
                    static_cast<size_t>(row_bytes));
    }

    const bool direct = m == a.rows;  // fc row i is out row i
    if (!direct && !reserve(scratch, m * row_bytes, "the fc outputs")) {
        return MSD_ERR_OUT_OF_MEMORY;
    }
    const msd_status status =
        linear(x.data(), a.fc_weight, a.fc_bias, direct ? a.out : static_cast<void*>(scratch.data()),
               m, hidden, width, width, a.fc_weight_row_stride, direct ? a.out_row_stride : hidden,
               a.dtype, num_threads);
    if (status != MSD_OK) return status;
    if (!direct) {
        for (int64_t i = 0; i < m; ++i) {
            std::memcpy(out + fc_rows[i] * a.out_row_stride * bytes, scratch.data() + i * row_bytes,
                        static_cast<size_t>(row_bytes));
        }
    }
    return MSD_OK;
}

}  // namespace msd::cpu
