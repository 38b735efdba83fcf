// msd_draft_inputs_cuda (semantics in msd_engine.h): embedding gather, fc over [embedding or
// image row, target feature] + bias and the visual bypass, in one launch.
//
// At batch 1 this is a skinny GEMM, out [T, H] = x [T, 2H] . fc_weight [H, 2H]^T, bound by
// reading fc_weight once (64 MiB for H = 4096 in 16 bits) while T is small. Both kernels use
// the grid (row block, 32-column slice), row blocks fastest so that the blocks sharing a weight
// slice run together and meet in L2. Each block gathers its rows' x tile by tile into shared
// memory (the first H columns from embed[token] or the image row, the last H from the feature:
// the concatenation exists one tile at a time) and streams its fc_weight rows past it once:
//   * draft_inputs_mma.cu: tensor cores, for float16 / bfloat16 with 16-byte aligned rows on
//     sm_80+; up to 64 rows per block, so a draft step (T <= 64) reads fc_weight once;
//   * draft_inputs_simt.cu: CUDA cores, everything else (float32 included); up to 16 rows per
//     block.
// Both add the bias in float32 and round once; a row block with no fc row (all bypassed image
// rows, as in the image span of a prompt) skips the GEMM and only copies.
#include "cuda/draft_inputs.cuh"

namespace msd::cuda {
namespace {

constexpr int64_t kMaxColumnBlocks = 65535;                // gridDim.y
constexpr int64_t kMaxRowBlocks = (int64_t{1} << 31) - 1;  // gridDim.x, at one row per block

}  // namespace

msd_status draft_inputs(const DraftInputs& a, void* stream_ptr) {
    const int64_t columns = (a.hidden + draft::kColumns - 1) / draft::kColumns;
    if (columns > kMaxColumnBlocks || a.rows > kMaxRowBlocks) {
        return set_error(MSD_ERR_INVALID_ARGUMENT,
                         "hidden (%lld) or num_rows (%lld) is too large for one launch of "
                         "msd_draft_inputs_cuda", static_cast<long long>(a.hidden),
                         static_cast<long long>(a.rows));
    }
    const unsigned column_blocks = static_cast<unsigned>(columns);
    cudaStream_t stream = as_stream(stream_ptr);
    bool launched = false;
    const msd_status status = draft::launch_mma(a, column_blocks, stream, &launched);
    if (status != MSD_OK || launched) return status;
    return draft::launch_simt(a, column_blocks, stream);
}

}  // namespace msd::cuda
