// The CPU kernels' thread pool (see thread_pool.h).
//
// A call hands each worker it wants a ticket. An idle worker polls its ticket for a while (see
// kDefaultSpinMicroseconds), so that the ~120 kernel calls of a decode step skip the futex
// round trip, then sleeps in std::atomic::wait, leaving its core to others. Waking a sleeping
// worker takes 30-50 us on this KVM guest (as long as streaming a 1 MB weight), which is why
// work is claimed in chunks rather than split up front: the caller starts at once, and a late
// worker takes only what is left. Waking also costs the caller a futex syscall (~8 us here),
// so a short call leaves sleeping workers alone.
//
// Workers are never joined: the pool is leaked on purpose. Joining in a static destructor
// would run during interpreter teardown, after other threads may have been stopped mid-call,
// and could hang or touch freed state; at exit the sleeping workers vanish with the process.
#include "cpu/thread_pool.h"

#include <algorithm>
#include <atomic>
#include <cassert>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <system_error>
#include <thread>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#endif
#if defined(__linux__)
#include <sched.h>
#endif

#include "internal.h"  // set_spin_microseconds

namespace msd::cpu {
namespace {

// How long a waiting thread polls before it sleeps. Measured on SmolLM2-135M decoding (2-core
// KVM guest, torch ops between our linear calls): the gaps between consecutive linear calls
// of one step are ~10 us (around silu_mul), ~21 us (norms) and ~71 us (attention), p95 92 us;
// between steps ~340 us. A spin of a few microseconds let the worker fall asleep before most
// calls, and each wake-up costs the caller ~8 us and the worker ~30-40 us. Since a decoder layer
// became one call, the gaps left are those of speculative decoding's Python between the draft's
// calls (top-k, tree selection, acceptance: 100-300 us); a worker asleep there left the draft's
// small linears (< 1 MiB, which do not wake it) to one core. Measured on 6 text prompts (bfloat16
// target, tree (3,1,4)): drafting 2.5-2.6 -> 2.15-2.2 ms a round with 300 us or 1 ms of spin
// over 100 us. 1 ms of polling is also all an idle engine spends before its worker sleeps.
constexpr int kDefaultSpinMicroseconds = 1000;
std::atomic<int> g_spin_microseconds{kDefaultSpinMicroseconds};

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
}

// A word one thread sleeps on. std::atomic::notify_one makes a futex syscall whenever any
// thread sleeps on a word in the same bucket of libstdc++'s 16-entry waiter table (every
// 64-byte aligned word lands in one bucket), so notifiers first check `asleep`. The flag and
// the value are both written and read seq_cst: either the sleeper sees the new value before it
// sleeps, or the notifier sees the flag.
struct alignas(64) WaitWord {
    std::atomic<uint32_t> value{0};
    std::atomic<bool> asleep{false};  // in value.wait (or about to be)

    // Returns the value once it differs from `old` (acquire): polls for the spin time, then
    // sleeps.
    uint32_t await_change(uint32_t old) {
        uint32_t now = value.load(std::memory_order_acquire);
        if (now != old) return now;
        const std::chrono::microseconds spin{g_spin_microseconds.load(std::memory_order_relaxed)};
        const auto deadline = std::chrono::steady_clock::now() + spin;
        do {
            for (int i = 0; i < 32; ++i) cpu_relax();
            now = value.load(std::memory_order_acquire);
            if (now != old) return now;
        } while (std::chrono::steady_clock::now() < deadline);
        asleep.store(true, std::memory_order_seq_cst);
        while ((now = value.load(std::memory_order_seq_cst)) == old) {
            value.wait(old, std::memory_order_acquire);
        }
        asleep.store(false, std::memory_order_relaxed);
        return now;
    }

    void store(uint32_t v) {
        value.store(v, std::memory_order_seq_cst);
        if (asleep.load(std::memory_order_seq_cst)) value.notify_one();
    }

    void add(uint32_t v) {
        value.fetch_add(v, std::memory_order_seq_cst);
        if (asleep.load(std::memory_order_seq_cst)) value.notify_one();
    }
};

class Pool {
public:
    void run(int threads, int64_t chunks, bool wake_sleepers, ChunkFn fn, void* context) {
        std::lock_guard<std::mutex> lock(mutex_);
        const uint32_t generation = ++generation_;
        const int helpers = grow(std::min<int64_t>(threads, chunks) - 1);
        // Published by the release store of next_; not rewritten before done_ reaches chunks.
        assert(chunks > 0 && chunks <= int64_t{UINT32_MAX});
        fn_.store(fn, std::memory_order_relaxed);
        context_.store(context, std::memory_order_relaxed);
        chunks_.store(static_cast<uint32_t>(chunks), std::memory_order_relaxed);
        done_.value.store(0, std::memory_order_relaxed);
        next_.store(uint64_t{generation} << 32 | static_cast<uint64_t>(chunks),
                    std::memory_order_release);
        for (int w = 0; w < helpers; ++w) {
            WaitWord& ticket = *tickets_[w];
            if (!wake_sleepers && ticket.asleep.load(std::memory_order_relaxed)) continue;
            ticket.store(generation);
        }
        claim_chunks(generation);
        const auto total = static_cast<uint32_t>(chunks);
        uint32_t done = done_.value.load(std::memory_order_acquire);
        while (done != total) done = done_.await_change(done);  // chunks workers still run
    }

private:
    // Runs chunks of call `generation` until none are left. A chunk is claimed by counting
    // next_ down from the call's chunk count; the generation in its top half makes a late
    // worker's claim fail once the call it woke for has handed out every chunk.
    void claim_chunks(uint32_t generation) {
        uint64_t next = next_.load(std::memory_order_acquire);
        while ((next >> 32) == generation && (next & 0xffffffffu) != 0) {
            if (!next_.compare_exchange_weak(next, next - 1, std::memory_order_acq_rel,
                                             std::memory_order_acquire)) {
                continue;  // `next` now holds the current value
            }
            // A claimed chunk pins the call: fn_, context_ and chunks_ are still this call's.
            // Chunks run in ascending order, so that one thread alone streams memory forwards.
            const uint32_t remaining = static_cast<uint32_t>(next & 0xffffffffu);
            fn_.load(std::memory_order_relaxed)(
                context_.load(std::memory_order_relaxed),
                int64_t{chunks_.load(std::memory_order_relaxed)} - remaining);
            done_.add(1);
            next = next_.load(std::memory_order_acquire);
        }
    }

    // Starts workers until `wanted` exist (or the system refuses more); returns how many do.
    int grow(int wanted) {
        while (static_cast<int>(tickets_.size()) < wanted) {
            tickets_.push_back(std::make_unique<WaitWord>());
            try {
                std::thread(&Pool::work, this, tickets_.back().get()).detach();
            } catch (const std::system_error&) {
                tickets_.pop_back();
                break;  // fewer threads claim the chunks: same result, slower
            }
        }
        return std::min(wanted, static_cast<int>(tickets_.size()));
    }

    // A worker: each new value of its ticket is the generation of a call that wants it.
    void work(WaitWord* ticket) {
        uint32_t seen = 0;
        for (;;) {
            seen = ticket->await_change(seen);
            claim_chunks(seen);
        }
    }

    std::mutex mutex_;  // one run() at a time
    uint32_t generation_ = 0;
    std::vector<std::unique_ptr<WaitWord>> tickets_;  // one per worker
    std::atomic<ChunkFn> fn_{nullptr};
    std::atomic<void*> context_{nullptr};
    std::atomic<uint32_t> chunks_{0};
    alignas(64) std::atomic<uint64_t> next_{0};  // generation << 32 | chunks not yet claimed
    WaitWord done_;                              // chunks of this call finished
};

std::atomic<Pool*> g_pool{nullptr};

// A forked child has the parent's pool object but none of its threads (and maybe a locked
// mutex): it starts a fresh pool, leaking the copy.
void forget_pool_after_fork() { g_pool.store(nullptr, std::memory_order_relaxed); }

Pool& pool() {
    Pool* current = g_pool.load(std::memory_order_acquire);
    if (current != nullptr) return *current;
#if defined(__unix__) || defined(__APPLE__)
    static const int registered = pthread_atfork(nullptr, nullptr, forget_pool_after_fork);
    (void)registered;
#endif
    Pool* fresh = new Pool;  // never deleted: see the top of this file
    if (g_pool.compare_exchange_strong(current, fresh, std::memory_order_acq_rel)) return *fresh;
    delete fresh;  // another thread won the race; `current` now holds its pool
    return *current;
}

}  // namespace

void run_chunks(int threads, int64_t chunks, bool wake_sleepers, ChunkFn fn, void* context) {
    if (threads <= 1 || chunks <= 1) {
        for (int64_t chunk = 0; chunk < chunks; ++chunk) fn(context, chunk);
        return;
    }
    pool().run(threads, chunks, wake_sleepers, fn, context);
}

void set_spin_microseconds(int microseconds) {
    g_spin_microseconds.store(microseconds, std::memory_order_relaxed);
}

int hardware_threads() {
#if defined(__linux__)
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) return std::max(1, CPU_COUNT(&set));
#endif
    return std::max(1u, std::thread::hardware_concurrency());
}

}  // namespace msd::cpu
