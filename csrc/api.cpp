// The C API: argument checks, then dispatch to the CPU or CUDA kernels. Every check names
// the argument it rejects in msd_last_error_message(); kernels never see invalid input.
#include <cmath>
#include <cstdarg>
#include <cstdio>

#include "internal.h"

namespace msd {
namespace {

thread_local char last_error[512] = "";

// Each check returns MSD_OK or sets the error; CHECK_ARG returns early on failure.
#define CHECK_ARG(expr)                                    \
    do {                                                   \
        const msd_status check_status_ = (expr);           \
        if (check_status_ != MSD_OK) return check_status_; \
    } while (0)

msd_status check_pointer(const void* p, const char* name) {
    if (p != nullptr) return MSD_OK;
    return set_error(MSD_ERR_INVALID_ARGUMENT, "%s is a null pointer", name);
}

msd_status check_positive(int64_t value, const char* name) {
    if (value > 0) return MSD_OK;
    return set_error(MSD_ERR_INVALID_ARGUMENT, "%s must be positive, got %lld", name,
                     static_cast<long long>(value));
}

msd_status check_stride(int64_t stride, int64_t row_length, const char* name) {
    if (stride >= row_length) return MSD_OK;
    return set_error(MSD_ERR_INVALID_ARGUMENT, "%s (%lld) is smaller than the row length (%lld)",
                     name, static_cast<long long>(stride), static_cast<long long>(row_length));
}

msd_status check_eps(float eps) {
    if (std::isfinite(eps) && eps >= 0.0f) return MSD_OK;
    return set_error(MSD_ERR_INVALID_ARGUMENT, "eps must be finite and >= 0, got %g",
                     static_cast<double>(eps));
}

msd_status check_dtype(msd_dtype dtype) {
    const int value = static_cast<int>(dtype);
    if (value == MSD_FLOAT32 || value == MSD_FLOAT16 || value == MSD_BFLOAT16) return MSD_OK;
    return set_error(MSD_ERR_UNSUPPORTED_DTYPE,
                     "dtype %d is not one of MSD_FLOAT32, MSD_FLOAT16, MSD_BFLOAT16", value);
}

msd_status check_rms_norm(const void* x, const void* weight, const void* out, int64_t rows,
                          int64_t dim, int64_t x_row_stride, int64_t out_row_stride, float eps,
                          msd_dtype dtype) {
    clear_error();
    CHECK_ARG(check_pointer(x, "x"));
    CHECK_ARG(check_pointer(weight, "weight"));
    CHECK_ARG(check_pointer(out, "out"));
    CHECK_ARG(check_positive(rows, "rows"));
    CHECK_ARG(check_positive(dim, "dim"));
    CHECK_ARG(check_stride(x_row_stride, dim, "x_row_stride"));
    CHECK_ARG(check_stride(out_row_stride, dim, "out_row_stride"));
    CHECK_ARG(check_eps(eps));
    return check_dtype(dtype);
}

msd_status check_add_rms_norm(const void* x, const void* residual, const void* weight,
                              const void* out, int64_t rows, int64_t dim, int64_t x_row_stride,
                              int64_t residual_row_stride, int64_t out_row_stride, float eps,
                              msd_dtype dtype) {
    CHECK_ARG(check_rms_norm(x, weight, out, rows, dim, x_row_stride, out_row_stride, eps, dtype));
    CHECK_ARG(check_pointer(residual, "residual"));
    return check_stride(residual_row_stride, dim, "residual_row_stride");
}

msd_status check_silu_mul(const void* gate_up, const void* out, int64_t rows, int64_t inter,
                          int64_t gate_up_row_stride, int64_t out_row_stride, msd_dtype dtype) {
    clear_error();
    CHECK_ARG(check_pointer(gate_up, "gate_up"));
    CHECK_ARG(check_pointer(out, "out"));
    CHECK_ARG(check_positive(rows, "rows"));
    CHECK_ARG(check_positive(inter, "inter"));
    CHECK_ARG(check_stride(gate_up_row_stride, 2 * inter, "gate_up_row_stride"));
    CHECK_ARG(check_stride(out_row_stride, inter, "out_row_stride"));
    return check_dtype(dtype);
}

msd_status check_linear(const void* x, const void* weight, const void* out, int64_t m, int64_t n,
                        int64_t k, int64_t x_row_stride, int64_t weight_row_stride,
                        int64_t out_row_stride, msd_dtype dtype) {
    clear_error();
    CHECK_ARG(check_pointer(x, "x"));
    CHECK_ARG(check_pointer(weight, "weight"));
    CHECK_ARG(check_pointer(out, "out"));  // bias may be NULL
    CHECK_ARG(check_positive(m, "m"));
    CHECK_ARG(check_positive(n, "n"));
    CHECK_ARG(check_positive(k, "k"));
    CHECK_ARG(check_stride(x_row_stride, k, "x_row_stride"));
    CHECK_ARG(check_stride(weight_row_stride, k, "weight_row_stride"));
    CHECK_ARG(check_stride(out_row_stride, n, "out_row_stride"));
    return check_dtype(dtype);
}

#if !defined(MSD_ENGINE_WITH_CUDA)
msd_status cuda_not_compiled(const char* function) {
    return set_error(MSD_ERR_NOT_COMPILED,
                     "%s: libmsd_kernels was built without CUDA (MSD_ENGINE_WITH_CUDA=OFF)",
                     function);
}
#endif

}  // namespace

msd_status set_error(msd_status status, const char* format, ...) {
    va_list args;
    va_start(args, format);
    std::vsnprintf(last_error, sizeof last_error, format, args);
    va_end(args);
    return status;
}

void clear_error() { last_error[0] = '\0'; }

}  // namespace msd

extern "C" {

const char* msd_status_string(msd_status status) {
    switch (status) {
        case MSD_OK: return "ok";
        case MSD_ERR_INVALID_ARGUMENT: return "invalid argument";
        case MSD_ERR_UNSUPPORTED_DTYPE: return "unsupported dtype";
        case MSD_ERR_CUDA: return "CUDA error";
        case MSD_ERR_NOT_COMPILED: return "not compiled";
        case MSD_ERR_OUT_OF_MEMORY: return "out of memory";
    }
    return "unknown status";
}

const char* msd_last_error_message(void) { return msd::last_error; }

int msd_cuda_compiled(void) {
#if defined(MSD_ENGINE_WITH_CUDA)
    return 1;
#else
    return 0;
#endif
}

int msd_cuda_device_count(void) {
#if defined(MSD_ENGINE_WITH_CUDA)
    return msd::cuda::device_count();
#else
    return 0;
#endif
}

msd_status msd_rms_norm_cpu(const void* x, const void* weight, void* out, int64_t rows,
                            int64_t dim, int64_t x_row_stride, int64_t out_row_stride, float eps,
                            msd_dtype dtype) {
    CHECK_ARG(msd::check_rms_norm(x, weight, out, rows, dim, x_row_stride, out_row_stride, eps,
                                  dtype));
    return msd::cpu::rms_norm(x, weight, out, rows, dim, x_row_stride, out_row_stride, eps, dtype);
}

msd_status msd_add_rms_norm_cpu(const void* x, void* residual, const void* weight, void* out,
                                int64_t rows, int64_t dim, int64_t x_row_stride,
                                int64_t residual_row_stride, int64_t out_row_stride, float eps,
                                msd_dtype dtype) {
    CHECK_ARG(msd::check_add_rms_norm(x, residual, weight, out, rows, dim, x_row_stride,
                                      residual_row_stride, out_row_stride, eps, dtype));
    return msd::cpu::add_rms_norm(x, residual, weight, out, rows, dim, x_row_stride,
                                  residual_row_stride, out_row_stride, eps, dtype);
}

msd_status msd_silu_mul_cpu(const void* gate_up, void* out, int64_t rows, int64_t inter,
                            int64_t gate_up_row_stride, int64_t out_row_stride, msd_dtype dtype) {
    CHECK_ARG(msd::check_silu_mul(gate_up, out, rows, inter, gate_up_row_stride, out_row_stride,
                                  dtype));
    return msd::cpu::silu_mul(gate_up, out, rows, inter, gate_up_row_stride, out_row_stride,
                              dtype);
}

msd_status msd_linear_cpu(const void* x, const void* weight, const void* bias, void* out,
                          int64_t m, int64_t n, int64_t k, int64_t x_row_stride,
                          int64_t weight_row_stride, int64_t out_row_stride, msd_dtype dtype,
                          int num_threads) {
    CHECK_ARG(msd::check_linear(x, weight, out, m, n, k, x_row_stride, weight_row_stride,
                                out_row_stride, dtype));
    return msd::cpu::linear(x, weight, bias, out, m, n, k, x_row_stride, weight_row_stride,
                            out_row_stride, dtype, num_threads);
}

msd_status msd_set_cpu_spin_us(int microseconds) {
    msd::clear_error();
    if (microseconds < 0 || microseconds > 1000000) {
        return msd::set_error(MSD_ERR_INVALID_ARGUMENT,
                              "microseconds must be in [0, 1000000], got %d", microseconds);
    }
    msd::cpu::set_spin_microseconds(microseconds);
    return MSD_OK;
}

msd_cpu_isa msd_get_cpu_isa(void) { return msd::cpu::get_isa(); }

msd_status msd_set_cpu_isa(int isa) {
    msd::clear_error();
    return msd::cpu::set_isa(isa);
}

#if defined(MSD_ENGINE_WITH_CUDA)

msd_status msd_rms_norm_cuda(const void* x, const void* weight, void* out, int64_t rows,
                             int64_t dim, int64_t x_row_stride, int64_t out_row_stride, float eps,
                             msd_dtype dtype, void* stream) {
    CHECK_ARG(msd::check_rms_norm(x, weight, out, rows, dim, x_row_stride, out_row_stride, eps,
                                  dtype));
    return msd::cuda::rms_norm(x, weight, out, rows, dim, x_row_stride, out_row_stride, eps,
                               dtype, stream);
}

msd_status msd_add_rms_norm_cuda(const void* x, void* residual, const void* weight, void* out,
                                 int64_t rows, int64_t dim, int64_t x_row_stride,
                                 int64_t residual_row_stride, int64_t out_row_stride, float eps,
                                 msd_dtype dtype, void* stream) {
    CHECK_ARG(msd::check_add_rms_norm(x, residual, weight, out, rows, dim, x_row_stride,
                                      residual_row_stride, out_row_stride, eps, dtype));
    return msd::cuda::add_rms_norm(x, residual, weight, out, rows, dim, x_row_stride,
                                   residual_row_stride, out_row_stride, eps, dtype, stream);
}

msd_status msd_silu_mul_cuda(const void* gate_up, void* out, int64_t rows, int64_t inter,
                             int64_t gate_up_row_stride, int64_t out_row_stride, msd_dtype dtype,
                             void* stream) {
    CHECK_ARG(msd::check_silu_mul(gate_up, out, rows, inter, gate_up_row_stride, out_row_stride,
                                  dtype));
    return msd::cuda::silu_mul(gate_up, out, rows, inter, gate_up_row_stride, out_row_stride,
                               dtype, stream);
}

#else  // !MSD_ENGINE_WITH_CUDA: the symbols exist so that callers link either way.

msd_status msd_rms_norm_cuda(const void*, const void*, void*, int64_t, int64_t, int64_t, int64_t,
                             float, msd_dtype, void*) {
    return msd::cuda_not_compiled("msd_rms_norm_cuda");
}

msd_status msd_add_rms_norm_cuda(const void*, void*, const void*, void*, int64_t, int64_t,
                                 int64_t, int64_t, int64_t, float, msd_dtype, void*) {
    return msd::cuda_not_compiled("msd_add_rms_norm_cuda");
}

msd_status msd_silu_mul_cuda(const void*, void*, int64_t, int64_t, int64_t, int64_t, msd_dtype,
                             void*) {
    return msd::cuda_not_compiled("msd_silu_mul_cuda");
}

#endif

}  // extern "C"
