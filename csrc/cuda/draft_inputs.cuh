// Shared by the two kernels of msd_draft_inputs_cuda (draft_inputs_mma.cu, draft_inputs_simt.cu)
// and their dispatcher (draft_inputs.cu): the block's row table, the epilogue, the launchers.
#pragma once

#include <cstdint>

#include "cuda/common.cuh"

namespace msd::cuda::draft {

// What a row of the block does.
enum RowKind : int { kFc = 0, kBypass = 1, kBadToken = 2, kPadding = 3 };

constexpr int kColumns = 32;  // output columns (= fc_weight rows) per block, both kernels

// Row t's kind, the first H inputs (`*src`) and its feature row (`*feat`). A row with a bad token
// reads embed[0] instead, which is valid memory; its output is NaN.
template <class T>
__device__ inline RowKind describe_row(const DraftInputs& a, int64_t t, const T** src,
                                       const T** feat) {
    const T* embed = static_cast<const T*>(a.embed);
    *feat = static_cast<const T*>(a.features) + t * a.features_row_stride;
    const bool image = a.is_image != nullptr && a.is_image[t] != 0;
    if (image && a.image_rows != nullptr) {
        *src = static_cast<const T*>(a.image_rows) + t * a.image_rows_row_stride;
    } else {
        const int64_t token = image ? 0 : a.token_ids[t];
        if (token < 0 || token >= a.vocab_size) {
            *src = embed;
            return kBadToken;
        }
        *src = embed + token * a.embed_row_stride;
    }
    return image && a.bypass ? kBypass : kFc;
}

// Fills the block's row table for rows [row0, row0 + ROWS); returns, to every thread, whether
// any of them goes through fc. Doubles as the barrier after the table is written.
template <class T, int ROWS>
__device__ inline int describe_rows(const DraftInputs& a, int64_t row0, const T** src,
                                    const T** feat, int* kind) {
    static_assert(ROWS <= 128, "one thread per row");
    int fc = 0;
    if (threadIdx.x < ROWS) {
        const int64_t t = row0 + threadIdx.x;
        const T* s = static_cast<const T*>(a.embed);
        const T* f = static_cast<const T*>(a.features);
        const RowKind k = t < a.rows ? describe_row(a, t, &s, &f) : kPadding;
        src[threadIdx.x] = s;
        feat[threadIdx.x] = f;
        kind[threadIdx.x] = k;
        fc = k == kFc;
    }
    return __syncthreads_or(fc);
}

// Writes out[t, n] (n < H) from the float32 dot product `sum`, by the row's kind.
template <class D>
__device__ inline void finish(const DraftInputs& a, int kind, const typename D::T* src, int64_t t,
                              int64_t n, float sum) {
    using T = typename D::T;
    if (kind == kPadding || n >= a.hidden) return;
    T* out = static_cast<T*>(a.out) + t * a.out_row_stride + n;
    if (kind == kFc) {
        const T* bias = static_cast<const T*>(a.fc_bias);
        *out = D::store(bias != nullptr ? sum + D::load(bias[n]) : sum);
    } else if (kind == kBypass) {
        *out = src[n];  // the layer input itself, bit for bit
    } else {
        *out = D::store(__int_as_float(0x7fc00000));  // kBadToken: a visible NaN row
    }
}

// Whether every row the kernels read (embed, image_rows, features, fc_weight) and each half of
// x starts on a 16-byte boundary, given `vec` elements per 16 bytes.
inline bool vector_loads_ok(const DraftInputs& a, int64_t vec) {
    const auto aligned = [vec](const void* p, int64_t row_stride) {
        return reinterpret_cast<uintptr_t>(p) % 16 == 0 && row_stride % vec == 0;
    };
    return a.hidden % vec == 0 && aligned(a.embed, a.embed_row_stride) &&
           aligned(a.features, a.features_row_stride) &&
           aligned(a.fc_weight, a.fc_weight_row_stride) &&
           (a.image_rows == nullptr || aligned(a.image_rows, a.image_rows_row_stride));
}

// Launches the tensor-core kernel when it can run here (float16 / bfloat16, vector_loads_ok(a, 8),
// an sm_80+ device with the shared memory it needs): *launched says whether it did.
msd_status launch_mma(const DraftInputs& a, unsigned column_blocks, cudaStream_t stream,
                      bool* launched);
// Launches the CUDA-core kernel (any dtype and alignment).
msd_status launch_simt(const DraftInputs& a, unsigned column_blocks, cudaStream_t stream);

}  // namespace msd::cuda::draft
