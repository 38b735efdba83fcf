// A small persistent thread pool for the CPU kernels (std::thread, not OpenMP: inside a torch
// process a second OpenMP runtime would fight torch's own for the cores).
#pragma once

#include <cstdint>

namespace msd::cpu {

using ChunkFn = void (*)(void* context, int64_t chunk);

// Calls fn(context, chunk) once for every chunk in [0, chunks) and returns when all have
// returned. The calling thread and up to `threads - 1` pool workers (started on first use)
// claim chunks one at a time from a shared counter, so a worker that is slow to wake takes
// fewer of them instead of holding the call up. Which thread runs a chunk varies from call to
// call: fn's result for a chunk must not depend on it. Without `wake_sleepers`, workers that
// have gone to sleep (idle for longer than the spin, 1 ms by default) are left out, since waking
// one costs more than a short call. Calls from several threads are serialised. `fn` must not throw.
void run_chunks(int threads, int64_t chunks, bool wake_sleepers, ChunkFn fn, void* context);

// Hardware threads this process may run on (its CPU affinity where known), at least 1.
int hardware_threads();

}  // namespace msd::cpu
