// msd_linear_cpu: picks the SIMD path, widens (or, for the AMX path, packs) 16-bit x rows once,
// and cuts the output columns (= weight rows) into contiguous chunks for the thread pool. Every
// output is computed by the same instructions whichever thread runs its chunk, so results do not
// depend on the threads.
// The kernels are in linear_{scalar,avx2,avx512,avx512_bf16,amx}.cpp; semantics in msd_engine.h.
#include <algorithm>
#include <atomic>
#include <vector>

#include "cpu/buffer.h"
#include "cpu/linear.h"
#include "cpu/thread_pool.h"

namespace msd::cpu {
namespace {

static_assert(MSD_FLOAT32 == 0 && MSD_FLOAT16 == 1 && MSD_BFLOAT16 == 2,
              "LinearKernels::rows is indexed by msd_dtype");

// Below this many weights one call takes a few microseconds: waking a worker costs as much.
constexpr int64_t kMinParallelWeights = int64_t{1} << 15;
// Chunks (the unit a thread claims) are a multiple of this many output columns, so that no two
// threads write into the same 64-byte line of a row of out (when out is 64-byte aligned, as
// torch's allocations are)...
constexpr int64_t kColumnAlign = 16;
// ...and at least this many weight bytes: claiming one (an atomic on a line both cores write)
// and restarting the prefetch stream at its start then cost a few percent of streaming it...
constexpr int64_t kMinChunkBytes = 128 << 10;
// ...and small enough that each thread gets several: the last chunk to finish sets the time.
constexpr int64_t kChunksPerThread = 16;
// A sleeping worker is woken only for calls that stream at least this many weight bytes:
// waking costs the caller ~8 us (a futex syscall; an IPI in a VM) and the worker starts
// ~30-40 us later, when a smaller call (~40 us on one core) is over.
constexpr int64_t kWakeMinBytes = int64_t{1} << 20;
// More threads than this is a caller's mistake rather than a plan; clamped (results don't
// depend on the thread count).
constexpr int kMaxThreads = 256;

bool cpu_has(int isa) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                      __builtin_cpu_supports("f16c");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                        linear_kernels_avx512() != nullptr;
    switch (isa) {
        case MSD_CPU_ISA_SCALAR: return true;
        case MSD_CPU_ISA_AVX2: return avx2 && linear_kernels_avx2() != nullptr;
        case MSD_CPU_ISA_AVX512: return avx512;
        case MSD_CPU_ISA_AVX512_BF16:
            return avx512 && __builtin_cpu_supports("avx512bf16") &&
                   linear_kernels_avx512_bf16() != nullptr;
        case MSD_CPU_ISA_AMX: return avx512 && linear_kernels_amx() != nullptr;
    }
    return false;
#else
    return isa == MSD_CPU_ISA_SCALAR;
#endif
}

msd_cpu_isa best_isa() {
    static const msd_cpu_isa best = [] {
        for (const msd_cpu_isa isa : {MSD_CPU_ISA_AMX, MSD_CPU_ISA_AVX512_BF16, MSD_CPU_ISA_AVX512,
                                      MSD_CPU_ISA_AVX2}) {
            if (cpu_has(isa)) return isa;
        }
        return MSD_CPU_ISA_SCALAR;
    }();
    return best;
}

std::atomic<int> g_forced_isa{-1};  // msd_set_cpu_isa's choice, -1 = best_isa()

const LinearKernels& kernels_for(msd_cpu_isa isa) {
    switch (isa) {
        case MSD_CPU_ISA_AMX: return *linear_kernels_amx();
        case MSD_CPU_ISA_AVX512_BF16: return *linear_kernels_avx512_bf16();
        case MSD_CPU_ISA_AVX512: return *linear_kernels_avx512();
        case MSD_CPU_ISA_AVX2: return *linear_kernels_avx2();
        case MSD_CPU_ISA_SCALAR: break;
    }
    return *linear_kernels_scalar();
}

int thread_count(int64_t n, int64_t k, int num_threads) {
    if (n * k < kMinParallelWeights) return 1;
    return std::min(num_threads > 0 ? num_threads : hardware_threads(), kMaxThreads);
}

// Output columns per chunk for `threads` threads (all n when single-threaded).
int64_t chunk_columns(int64_t n, int64_t row_bytes, int threads) {
    if (threads <= 1) return n;
    const int64_t by_bytes = (kMinChunkBytes + row_bytes - 1) / row_bytes;
    const int64_t by_count = n / (int64_t{threads} * kChunksPerThread);
    const int64_t columns = std::max(by_bytes, by_count);
    return (columns + kColumnAlign - 1) / kColumnAlign * kColumnAlign;
}

struct Job {
    LinearArgs args;
    LinearRowsFn rows;
    int64_t n;
    int64_t chunk_columns;
};

void run_chunk(void* context, int64_t chunk) {
    const Job& job = *static_cast<const Job*>(context);
    const int64_t begin = chunk * job.chunk_columns;
    job.rows(job.args, begin, std::min(job.n, begin + job.chunk_columns));
}

}  // namespace

msd_cpu_isa get_isa() {
    const int forced = g_forced_isa.load(std::memory_order_relaxed);
    return forced < 0 ? best_isa() : static_cast<msd_cpu_isa>(forced);
}

msd_status set_isa(int isa) {
    if (isa == -1) {
        g_forced_isa.store(-1, std::memory_order_relaxed);
        return MSD_OK;
    }
    if (isa < MSD_CPU_ISA_SCALAR || isa > MSD_CPU_ISA_AMX) {
        return set_error(MSD_ERR_INVALID_ARGUMENT, "isa %d is not -1 or an msd_cpu_isa", isa);
    }
    if (!cpu_has(isa)) {
        return set_error(MSD_ERR_INVALID_ARGUMENT,
                         "isa %d is not supported by this CPU or build (best: %d)", isa,
                         static_cast<int>(best_isa()));
    }
    g_forced_isa.store(isa, std::memory_order_relaxed);
    return MSD_OK;
}

// Output columns [0, n) in chunks on the calling thread and up to num_threads - 1 pool workers,
// with the kernels of the path `linear` looked up once (args.x widened or x16 packed for them).
static void run_linear(const LinearKernels& kernels, const LinearArgs& args, int64_t n,
                       msd_dtype dtype, int num_threads) {
    const int threads = thread_count(n, args.k, num_threads);
    const int64_t row_bytes = args.k * dtype_bytes(dtype);
    Job job{args, kernels.rows[dtype], n, chunk_columns(n, row_bytes, threads)};
    run_chunks(threads, (n + job.chunk_columns - 1) / job.chunk_columns,
               n * row_bytes >= kWakeMinBytes, run_chunk, &job);
}

msd_status linear(const void* x, const void* weight, const void* bias, void* out, int64_t m,
                  int64_t n, int64_t k, int64_t x_row_stride, int64_t weight_row_stride,
                  int64_t out_row_stride, msd_dtype dtype, int num_threads) {
    const LinearKernels& kernels = kernels_for(get_isa());  // once: x's preparation follows it
    LinearArgs args{static_cast<const float*>(x), x_row_stride, weight, weight_row_stride,
                    bias, out, out_row_stride, m, k, x, x_row_stride};
    const bool widens = dtype == MSD_FLOAT16 ||
                        (dtype == MSD_BFLOAT16 && !kernels.bfloat16_reads_x16);
    if (dtype != MSD_FLOAT32) args.x = nullptr;
    // Read by every chunk, so packed or widened here once, into buffers grown to the largest
    // call seen on this thread.
    if (dtype == MSD_BFLOAT16 && kernels.pack_bfloat16_x != nullptr) {
        thread_local std::vector<uint16_t> packed;
        if (!reserve(packed, kernels.pack_bfloat16_x(x, x_row_stride, m, k, nullptr), "packed x")) {
            return MSD_ERR_OUT_OF_MEMORY;
        }
        kernels.pack_bfloat16_x(x, x_row_stride, m, k, packed.data());
        args.x16 = packed.data();
    }
    if (widens) {
        thread_local std::vector<float> widened;
        if (!reserve(widened, m * k, "widened x")) return MSD_ERR_OUT_OF_MEMORY;
        const WidenFn widen = dtype == MSD_FLOAT16 ? kernels.widen_half : kernels.widen_bfloat16;
        widen(x, x_row_stride, m, k, widened.data());
        args.x = widened.data();
        args.x_row_stride = k;
    }
    run_linear(kernels, args, n, dtype, num_threads);
    return MSD_OK;
}

}  // namespace msd::cpu
