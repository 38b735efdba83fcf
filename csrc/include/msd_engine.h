/* msd_engine.h: the torch-free C API of the msd_engine kernel library (libmsd_kernels).
 *
 * Conventions shared by every kernel:
 *   - Tensors are raw pointers to row-major 2-D arrays [rows, cols]. Elements inside a row are
 *     contiguous; consecutive rows are `*_row_stride` ELEMENTS apart (not bytes), and a row
 *     stride must be >= the row's length.
 *   - `dtype` gives the element type of every tensor argument of the call (they all share it).
 *   - Every function returns an msd_status. On failure, msd_last_error_message() returns a
 *     thread-local text that names the offending argument; nothing has been written.
 *   - CUDA variants take a `cudaStream_t` passed as `void*` (NULL = legacy default stream),
 *     are asynchronous, and need device pointers. They return MSD_ERR_NOT_COMPILED when the
 *     library was built without CUDA.
 *   - Accumulation is in float32; the roundings to `dtype` are spelled out per kernel so that
 *     outputs match the PyTorch formulations the engine uses as references.
 */
#ifndef MSD_ENGINE_H
#define MSD_ENGINE_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    MSD_OK = 0,
    MSD_ERR_INVALID_ARGUMENT,
    MSD_ERR_UNSUPPORTED_DTYPE,
    MSD_ERR_CUDA,
    MSD_ERR_NOT_COMPILED
} msd_status;

typedef enum { MSD_FLOAT32, MSD_FLOAT16, MSD_BFLOAT16 } msd_dtype;

/* A static, human-readable name for a status ("ok", "invalid argument", ...). */
const char* msd_status_string(msd_status status);

/* Detail about the last kernel call (msd_*_cpu / msd_*_cuda) on this thread when it failed,
 * naming the bad argument; "" when it succeeded. Valid until this thread's next kernel call. */
const char* msd_last_error_message(void);

/* 1 if the library was built with its CUDA kernels, else 0. */
int msd_cuda_compiled(void);

/* Number of usable CUDA devices: 0 when not compiled with CUDA, with no driver or no device.
 * Never fails. */
int msd_cuda_device_count(void);

/* RMSNorm as transformers' LlamaRMSNorm computes it, per row of length `dim`:
 *     h   = x32 * (1 / sqrt(mean(x32 * x32) + eps))      in float32 (x32 = float(x))
 *     out = weight * round_dtype(h)                       product rounded to dtype
 * `weight` has `dim` contiguous elements. `out` may be `x` itself (in place). */
msd_status msd_rms_norm_cpu(const void* x, const void* weight, void* out, int64_t rows,
                            int64_t dim, int64_t x_row_stride, int64_t out_row_stride,
                            float eps, msd_dtype dtype);
msd_status msd_rms_norm_cuda(const void* x, const void* weight, void* out, int64_t rows,
                             int64_t dim, int64_t x_row_stride, int64_t out_row_stride,
                             float eps, msd_dtype dtype, void* stream);

/* Fused residual add + RMSNorm, per row:
 *     residual = round_dtype(residual + x)      (in place, as `residual += x` does in dtype)
 *     out      = rms_norm(residual)             (as msd_rms_norm_*)
 * `out` may be `x` itself; it must not overlap `residual`. */
msd_status msd_add_rms_norm_cpu(const void* x, void* residual, const void* weight, void* out,
                                int64_t rows, int64_t dim, int64_t x_row_stride,
                                int64_t residual_row_stride, int64_t out_row_stride, float eps,
                                msd_dtype dtype);
msd_status msd_add_rms_norm_cuda(const void* x, void* residual, const void* weight, void* out,
                                 int64_t rows, int64_t dim, int64_t x_row_stride,
                                 int64_t residual_row_stride, int64_t out_row_stride, float eps,
                                 msd_dtype dtype, void* stream);

/* SwiGLU activation. `gate_up` is [rows, 2 * inter]: gate in columns [0, inter), up in
 * [inter, 2 * inter). `out` is [rows, inter]. Per element, mirroring `F.silu(gate) * up`
 * evaluated in dtype (two roundings; both are the identity for float32):
 *     s   = round_dtype(g / (1 + exp(-g)))    in float32, g = float(gate)
 *     out = round_dtype(float(s) * float(up))
 * `out` must not overlap `gate_up`. */
msd_status msd_silu_mul_cpu(const void* gate_up, void* out, int64_t rows, int64_t inter,
                            int64_t gate_up_row_stride, int64_t out_row_stride, msd_dtype dtype);
msd_status msd_silu_mul_cuda(const void* gate_up, void* out, int64_t rows, int64_t inter,
                             int64_t gate_up_row_stride, int64_t out_row_stride, msd_dtype dtype,
                             void* stream);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* MSD_ENGINE_H */
