"""CPU skinny GEMM: msd `native.linear` (1 and 2 threads) vs torch `F.linear` on decode shapes.

For SmolLM2-135M's decode matmuls and m rows of x, prints median microseconds and achieved
GB/s (weight bytes / time) next to the machine's measured read and copy bandwidth, and the
Python overhead of one `native.linear` call. Weights rotate through enough copies (>= 128 MB)
that every call streams its weight from DRAM, as it does in decoding, where ~0.5 GB of
weights pass through a 32 MB L3 per token. Writes bench/results/cpu_linear.json.

    python bench/bench_cpu_linear.py
    python bench/bench_cpu_linear.py --dtypes float32 --ms 1
    python bench/bench_cpu_linear.py --dtypes bfloat16 --ms 1 5 8 16 --isas avx512 avx512_bf16 amx

With --isas, each shape is also timed (2 threads) on each of those SIMD paths of this CPU, taking
turns call by call so that all see the same machine, and the ratios to the first are printed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import timeit
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from msd_engine import native  # noqa: E402

# SmolLM2-135M: hidden 576, 9 query + 3 kv heads of 64, MLP 1536, vocab 49152.
SHAPES = {  # name: (n, k) of weight [n, k]
    "qkv": (960, 576),
    "o_proj": (576, 576),
    "gate_up": (3072, 576),
    "down": (576, 1536),
    "lm_head": (49152, 576),
}
WORKING_SET_BYTES = 128 * 2**20  # > 2x this machine's L3: weights come from DRAM
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def time_calls(fn, min_repeats: int = 15, budget_s: float = 0.3) -> list[float]:
    """Seconds per call of `fn(i)` for i = 0, 1, ... after 3 warm-up calls."""
    for i in range(3):
        fn(i)
    times, start, i = [], time.perf_counter(), 3
    while len(times) < min_repeats or time.perf_counter() - start < budget_s:
        t = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t)
        i += 1
    return times


def summary(times: list[float], nbytes: int) -> dict:
    q = statistics.quantiles(times, n=10)
    median = statistics.median(times)
    return {"median_us": median * 1e6, "p10_us": q[0] * 1e6, "p90_us": q[-1] * 1e6,
            "GBps": nbytes / median / 1e9}


def memory_bandwidth(elements: int = 64 * 2**20, repeats: int = 15) -> dict:
    """Median read (`sum()`) and copy bandwidth over initialised buffers far beyond the caches."""
    src = torch.randn(elements)
    dst = torch.randn_like(src)
    nbytes = src.numel() * src.element_size()
    read = statistics.median(time_calls(lambda i: src.sum(), repeats, 0.0))
    copy = statistics.median(time_calls(lambda i: dst.copy_(src), repeats, 0.0))
    return {"read_GBps": nbytes / read / 1e9,
            "copy_GBps": 2 * nbytes / copy / 1e9}  # STREAM convention: read + write


def bench_shape(n: int, k: int, m: int, dtype: torch.dtype) -> dict:
    nbytes = n * k * dtype.itemsize
    copies = -(-WORKING_SET_BYTES // nbytes)
    weights = [torch.randn(n, k).to(dtype) for _ in range(copies)]
    x = torch.randn(m, k).to(dtype)
    out = torch.empty(m, n, dtype=dtype)
    runs = {
        "torch": lambda i: F.linear(x, weights[i % copies], out=out),
        "msd_1t": lambda i: native.linear(x, weights[i % copies], out=out, num_threads=1),
        "msd_2t": lambda i: native.linear(x, weights[i % copies], out=out, num_threads=2),
    }
    results = {}
    for name, fn in runs.items():
        if name == "msd_2t":
            wake_worker()
        results[name] = summary(time_calls(fn), nbytes)
    return results


def compare_isas(n: int, k: int, m: int, dtype: torch.dtype, isas: list[str],
                 rounds: int = 30) -> dict:
    """Median 2-thread microseconds per call on each SIMD path in `isas`; the paths take turns
    (one call each per round) so that a noisy neighbour slows them all alike, each call on a
    weight copy no recent call has read (so every path streams from DRAM)."""
    nbytes = n * k * dtype.itemsize
    copies = max(-(-WORKING_SET_BYTES // nbytes), len(isas) + 1)
    weights = [torch.randn(n, k).to(dtype) for _ in range(copies)]
    x = torch.randn(m, k).to(dtype)
    out = torch.empty(m, n, dtype=dtype)
    times = {isa: [] for isa in isas}
    call = 0
    try:
        wake_worker()
        for i in range(rounds + 3):
            for isa in isas:
                native.set_cpu_isa(isa)
                weight = weights[call % copies]
                call += 1
                started = time.perf_counter()
                native.linear(x, weight, out=out, num_threads=2)
                if i >= 3:
                    times[isa].append(time.perf_counter() - started)
    finally:
        native.set_cpu_isa(None)
    return {isa: statistics.median(t) * 1e6 for isa, t in times.items()}


def wake_worker() -> None:
    """One call large enough to wake a sleeping pool worker: a call under 1 MiB leaves it asleep
    (waking costs more than such a call), so after the torch runs the 2-thread runs of small
    shapes would be single-threaded. In decoding the step's large calls keep it awake."""
    native.linear(torch.randn(1, 576), torch.randn(1024, 576), num_threads=2)


def python_overhead(number: int = 20000) -> dict:
    """Microseconds per call on a [1, 16] x [1, 16] problem (the kernel itself is ~0.1 us)."""
    x, w, out = torch.randn(1, 1, 16), torch.randn(1, 16), torch.empty(1, 1, 1)
    from msd_engine import _C
    raw = (x.data_ptr(), w.data_ptr(), 0, out.data_ptr(), 1, 1, 16, 16, 16, 1, _C.FLOAT32, 1)
    calls = {
        "C binding": lambda: _C.linear_cpu(*raw),
        "native.linear(x, w, out=out)": lambda: native.linear(x, w, out=out),
        "native.linear(x, w)": lambda: native.linear(x, w),
        "F.linear(x, w, out=out)": lambda: F.linear(x, w, out=out),
        "F.linear(x, w)": lambda: F.linear(x, w),
    }
    return {name: min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6
            for name, fn in calls.items()}


def other_processes_cpu_s() -> float | None:
    """CPU seconds the whole machine has been busy minus this process's own (Linux), or None."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, _, _, irq, softirq = map(int, f.readline().split()[1:8])
    except (OSError, ValueError):
        return None
    own = os.times()
    return ((user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")
            - own.user - own.system)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--ms", nargs="+", type=int, default=[1, 4, 8, 16])
    parser.add_argument("--isas", nargs="+", default=[], choices=list(native.CPU_ISAS),
                        help="also compare these SIMD paths side by side (ratios to the first)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cpu_linear.json")
    args = parser.parse_args()

    others_before = other_processes_cpu_s()
    bandwidth = memory_bandwidth()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, msd path "
          f"{native.cpu_isa()}; read {bandwidth['read_GBps']:.1f} GB/s, "
          f"copy {bandwidth['copy_GBps']:.1f} GB/s")
    print(f"{'dtype':>8} {'shape':>8} {'n x k':>11} {'m':>3} |"
          f"{'torch us':>9} {'GB/s':>5} |{'msd 1t us':>10} {'GB/s':>5} |"
          f"{'msd 2t us':>10} {'GB/s':>5} {'%read':>6}")
    results = []
    for dtype_name in args.dtypes:
        for shape, (n, k) in SHAPES.items():
            for m in args.ms:
                r = bench_shape(n, k, m, DTYPES[dtype_name])
                results.append({"dtype": dtype_name, "shape": shape, "n": n, "k": k, "m": m, **r})
                print(f"{dtype_name:>8} {shape:>8} {f'{n}x{k}':>11} {m:>3} |"
                      f"{r['torch']['median_us']:9.1f} {r['torch']['GBps']:5.1f} |"
                      f"{r['msd_1t']['median_us']:10.1f} {r['msd_1t']['GBps']:5.1f} |"
                      f"{r['msd_2t']['median_us']:10.1f} {r['msd_2t']['GBps']:5.1f} "
                      f"{100 * r['msd_2t']['GBps'] / bandwidth['read_GBps']:5.0f}%", flush=True)
    comparison = []
    if args.isas:
        for isa in args.isas:
            try:
                native.set_cpu_isa(isa)
            except ValueError as exc:
                parser.error(str(exc))
            finally:
                native.set_cpu_isa(None)
        print(f"2 threads, us per call by SIMD path (ratio: {args.isas[0]} time / this path's)")
        for dtype_name in args.dtypes:
            for shape, (n, k) in SHAPES.items():
                for m in args.ms:
                    us = compare_isas(n, k, m, DTYPES[dtype_name], args.isas)
                    comparison.append({"dtype": dtype_name, "shape": shape, "n": n, "k": k, "m": m,
                                       "median_us": us})
                    print(f"{dtype_name:>8} {shape:>8} {m:>3} | " + " | ".join(
                        f"{isa} {us[isa]:8.1f} ({us[args.isas[0]] / us[isa]:.2f}x)"
                        for isa in args.isas), flush=True)
    overhead = python_overhead()
    print("per-call time, tiny problem (us): " +
          ", ".join(f"{name} {us:.2f}" for name, us in overhead.items()))
    # Other processes on a 2-core machine distort everything above: say how much they ran.
    others_cpu_s = None
    if others_before is not None:
        others_cpu_s = other_processes_cpu_s() - others_before
        print(f"other processes used {others_cpu_s:.1f} CPU-s during the run"
              f"{'  (machine was busy: rerun when idle)' if others_cpu_s > 1.0 else ''}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": {"cpu": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                    "msd_cpu_isa": native.cpu_isa()},
        "bandwidth": bandwidth, "working_set_bytes": WORKING_SET_BYTES, "other_processes_cpu_s": others_cpu_s,
        "results": results, "isa_comparison": comparison, "call_overhead_us": overhead}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
