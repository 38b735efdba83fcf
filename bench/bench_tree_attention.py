"""Tree-masked attention at LLaVA-1.5-7B shapes: Triton vs CUDA vs torch SDPA vs flex_attention.

One verification step's attention for one layer: T tree tokens (a random draft tree, each row
seeing its ancestors and itself) over P cached prefix slots plus the tree's own T slots. T = 1
is a plain decode step (no mask, as generation.py runs it). Per shape and dtype, each
implementation is timed with CUDA events around single calls after warm-up, with L2 flushed
before every call (in a real step the other layers' weights evict this layer's K/V), and
reported as median / p10 / p90 microseconds, achieved GB/s of K/V bytes read and its fraction
of the device-to-device copy bandwidth measured in the same run, and speedup over SDPA. Every
implementation's output is checked once per shape against a float32 reference (max abs error).

  sdpa    TorchOps.cached_attention: dense bool mask built per call, F.scaled_dot_product_attention
  triton  msd_engine.triton_kernels.tree_attention.tree_attention (pre-packed mask bits)
  cuda    msd_engine.native.tree_attention, what the `cuda` op table runs (`cpu` on a CPU)
  flex    torch.compile(flex_attention) with a BlockMask built once per step (plan_us)

    python bench/bench_tree_attention.py                          # H100/H200: fp16 + bf16, MHA
    python bench/bench_tree_attention.py --kv-heads 32 8 --dtype float16
    python bench/bench_tree_attention.py --smoke --out /tmp/t.json  # tiny CPU shapes (CI)

Writes bench/results/tree_attention_<device>.json (device name, torch/triton versions, rows).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from msd_engine import native  # noqa: E402
from msd_engine.kv_cache import pack_mask  # noqa: E402
from msd_engine.ops.torch_ops import TorchOps  # noqa: E402
from msd_engine.spec.tree import TreeParams, build_tree  # noqa: E402

IMPLS = ("sdpa", "triton", "cuda", "flex")
FLUSH_BYTES = 256 * 2**20  # > 2x the L2 of an H100 / H200 (50 MB)
COPY_BYTES = 1 << 30       # the bandwidth buffer: far beyond any cache
SMOKE = {"heads": 4, "kv_heads": [2], "head_dim": 32, "prefix": [40], "tree": [1, 7], "repeats": 2, "warmup": 0}


# ---- timing helpers (bench_draft_head.py imports these) --------------------------------------------
def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def device_slug(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def device_info(device: torch.device) -> dict:
    try:
        import triton
        triton_version: Optional[str] = triton.__version__
    except ImportError:  # e.g. not a Linux machine: the Triton rows are then skipped
        triton_version = None
    info = {"device": device.type, "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
            else (platform.processor() or platform.machine()), "torch": torch.__version__,
            "triton": triton_version, "cuda": torch.version.cuda, "triton_interpret": interpreting(),
            "native_built": native.is_built()}
    if device.type == "cpu":
        info["threads"] = torch.get_num_threads()
    return info


def require_device(name: str, smoke: bool, script: str) -> torch.device:
    """The device to time on; exits with a message (not a traceback) where it cannot run."""
    if smoke:
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"{script}: no CUDA device visible (torch {torch.__version__}); these timings need a GPU. "
                 "Run with --smoke for the tiny CPU check, or --device cpu for CPU timings.")
    if device.type == "cuda" and interpreting():
        sys.exit(f"{script}: TRITON_INTERPRET is set, so Triton kernels would run in the interpreter; "
                 "unset it (or set TRITON_INTERPRET=0) for GPU timings")
    return device


def time_calls(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> list[float]:
    """Seconds per call of `fn`. On CUDA: events around each call, L2 flushed before each. The
    flush (~0.1 ms of GPU work) lets the host queue the call meanwhile, so the time is the GPU's,
    unless launching `fn` takes the host longer than that: then, as in an un-graphed step, the
    launch overhead shows."""
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return times
    flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device=device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    torch.cuda.synchronize(device)
    for start, end in events:
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) * 1e-3 for start, end in events]


def summarize(times: list[float], nbytes: Optional[int] = None, copy_gbps: Optional[float] = None) -> dict:
    """Median / p10 / p90 in microseconds; with `nbytes`, achieved GB/s and its fraction of the copy rate."""
    ordered = sorted(times)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    median = statistics.median(ordered)
    row = {"median_us": median * 1e6, "p10_us": pick(0.1) * 1e6, "p90_us": pick(0.9) * 1e6, "repeats": len(times)}
    if nbytes is not None:
        row["GBps"] = nbytes / median / 1e9
        if copy_gbps:
            row["fraction_of_copy"] = row["GBps"] / copy_gbps
    return row


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 20) -> dict:
    """Median device-to-device copy rate, read + write bytes counted (STREAM convention)."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    times = time_calls(lambda: dst.copy_(src), device, repeats, warmup=3)
    return {"copy_GBps": 2 * src.numel() * 4 / statistics.median(times) / 1e9, "buffer_MB": nbytes / 2**20}


def write_report(out: Path, report: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


# ---- inputs ------------------------------------------------------------------------------------------
def random_tree_mask(num_nodes: int, max_depth: int, gen: torch.Generator) -> torch.Tensor:
    """bool [T, T] of a random draft tree: node i's parent is an earlier node of depth < max_depth,
    row i = ancestors of i and i itself (`DraftTree.mask`, as verification uses it)."""
    parents, depths = [-1], [0]
    for i in range(1, num_nodes):
        choices = [j for j in range(i) if depths[j] < max_depth]
        parent = choices[int(torch.randint(len(choices), (1,), generator=gen))]
        parents.append(parent)
        depths.append(depths[parent] + 1)
    return build_tree(torch.zeros(num_nodes, dtype=torch.int64), torch.tensor(parents)).mask


def make_case(heads: int, kv_heads: int, head_dim: int, prefix: int, tree: int, dtype: torch.dtype,
              device: torch.device, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(tree, heads, head_dim, generator=gen)                    # [T, Hq, D]
    k_cache = torch.randn(kv_heads, prefix + tree, head_dim, generator=gen)  # [Hkv, S, D]
    v_cache = torch.randn(kv_heads, prefix + tree, head_dim, generator=gen)
    mask = None if tree == 1 else random_tree_mask(tree, TreeParams().depth + 1, gen).to(device)  # [T, T]
    return {"q": q.to(device, dtype), "k": k_cache.to(device, dtype), "v": v_cache.to(device, dtype),
            "prefix": prefix, "tree": tree, "mask": mask, "bits": None if mask is None else pack_mask(mask)}


def reference(case: dict) -> torch.Tensor:
    """float32 attention, written out: q [T, Hq, D] -> [T, Hq, D]."""
    q, k, v = case["q"].float(), case["k"].float(), case["v"].float()
    group = q.shape[1] // k.shape[0]
    k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)       # [Hq, L, D]
    scores = torch.einsum("thd,hld->htl", q, k) / q.shape[-1] ** 0.5          # [Hq, T, L]
    if case["mask"] is not None:
        visible = torch.ones(q.shape[0], k.shape[1], dtype=torch.bool, device=q.device)
        visible[:, case["prefix"]:] = case["mask"]
        scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("htl,hld->thd", scores.softmax(-1), v)


# ---- implementations: each returns the call to time, or why it cannot run -----------------------------
def sdpa_impl(case: dict, device: torch.device):
    ops = TorchOps()
    return lambda: ops.cached_attention(case["q"], case["k"], case["v"], case["prefix"], case["mask"])


def triton_impl(case: dict, device: torch.device):
    if device.type != "cuda" and not interpreting():
        return "skipped: Triton needs a CUDA device (or TRITON_INTERPRET=1 on a CPU)"
    if interpreting() and case["q"].dtype == torch.bfloat16:
        return "skipped: the Triton interpreter cannot compute bfloat16"
    try:
        from msd_engine.triton_kernels.tree_attention import tree_attention
    except ImportError as exc:  # the package maps triton_kernels/ in at install time
        return f"skipped: msd_engine.triton_kernels does not import (pip install -e .): {exc}"
    region = case["tree"]
    return lambda: tree_attention(case["q"], case["k"], case["v"], case["prefix"], case["bits"], region)


def native_impl(case: dict, device: torch.device):
    if not native.is_built():
        return "skipped: msd_engine._C is not built (pip install -e .)"
    if device.type == "cuda" and not native.cuda_compiled():
        return "skipped: msd_engine._C was built without CUDA (MSD_ENGINE_CUDA=1 pip install -e .)"
    if device.type == "cuda" and case["q"].shape[-1] not in native.CUDA_ATTENTION_HEAD_DIMS:
        return f"skipped: the CUDA kernel is built for head dims {native.CUDA_ATTENTION_HEAD_DIMS}"
    region = case["tree"]
    return lambda: native.tree_attention(case["q"], case["k"], case["v"], case["prefix"], case["bits"], region)


def block_mask(case: dict, device: torch.device):
    """flex_attention's BlockMask of the case's tree (None for T = 1): the step's plan."""
    from torch.nn.attention.flex_attention import create_block_mask
    prefix, tree, mask = case["prefix"], case["tree"], case["mask"]
    if mask is None:
        return None

    def visible(b, h, q_idx, kv_idx):  # prefix slots for all, tree slots through the mask
        return (kv_idx < prefix) | mask[q_idx, (kv_idx - prefix).clamp(min=0)]
    return create_block_mask(visible, None, None, tree, prefix + tree, device=device)


def flex_impl(case: dict, device: torch.device):
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError as exc:
        return f"skipped: torch {torch.__version__} has no flex_attention ({exc})"
    q = case["q"].transpose(0, 1)[None]            # [1, Hq, T, D]
    k, v = case["k"][None], case["v"][None]        # [1, Hkv, L, D]
    plan = block_mask(case, device)
    # Compiled on the GPU (eager flex materialises the scores); eager on a CPU smoke run.
    attend = torch.compile(flex_attention) if device.type == "cuda" else flex_attention
    gqa = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}  # the keyword is torch >= 2.5
    return lambda: attend(q, k, v, block_mask=plan, **gqa)[0].transpose(0, 1)


def compile_errors() -> tuple[type, ...]:
    """torch.compile failures (flex): dynamo's own, and inductor's where this torch has the class.
    Imported here, not at the top: torch._dynamo costs seconds to import, and only flex needs it."""
    import torch._dynamo.exc as dynamo_exc
    import torch._inductor.exc as inductor_exc
    found = vars(inductor_exc)
    return (dynamo_exc.TorchDynamoException,) + tuple(found[n] for n in ("InductorError",) if n in found)


FACTORIES = {"sdpa": sdpa_impl, "triton": triton_impl, "cuda": native_impl, "flex": flex_impl}


def bench_case(case: dict, impls: list[str], device: torch.device, repeats: int, warmup: int,
               copy_gbps: Optional[float]) -> dict:
    q, k = case["q"], case["k"]
    kv_bytes = 2 * k.shape[0] * (case["prefix"] + case["tree"]) * k.shape[2] * k.element_size()
    exact = reference(case)
    row = {"dtype": str(q.dtype).removeprefix("torch."), "prefix": case["prefix"], "tree": case["tree"],
           "heads": q.shape[1], "kv_heads": k.shape[0], "head_dim": q.shape[2], "kv_bytes": kv_bytes, "impls": {}}
    for name in impls:
        label = "cpu" if name == "cuda" and device.type == "cpu" else name
        made = FACTORIES[name](case, device)
        if isinstance(made, str):
            row["impls"][label] = {"skipped": made.removeprefix("skipped: ")}
            continue
        try:
            out = made()
        except compile_errors() as exc:  # flex only; recorded, so the other rows survive
            row["impls"][label] = {"skipped": f"compile failed: {type(exc).__name__}: {str(exc).splitlines()[0]}"}
            continue
        result = summarize(time_calls(made, device, repeats, warmup), kv_bytes, copy_gbps)
        result["max_abs_err"] = (out.float() - exact).abs().max().item()
        if name == "flex" and case["mask"] is not None:  # built once per step, shared by all layers
            plan = time_calls(lambda: block_mask(case, device), device, max(2, min(repeats, 20)), warmup=1)
            result["plan_us"] = statistics.median(plan) * 1e6
        row["impls"][label] = result
    base = row["impls"].get("sdpa", {}).get("median_us")
    for result in row["impls"].values():
        if base and "median_us" in result:
            result["speedup_vs_sdpa"] = base / result["median_us"]
    return row


def print_row(row: dict) -> None:
    cells = []
    for name, r in row["impls"].items():
        if "skipped" in r:
            cells.append(f"{name} skipped")
        else:
            frac = f" {100 * r['fraction_of_copy']:3.0f}%" if "fraction_of_copy" in r else ""
            cells.append(f"{name} {r['median_us']:8.1f} [{r['p10_us']:.1f}, {r['p90_us']:.1f}] us"
                         f"{frac} x{r.get('speedup_vs_sdpa', float('nan')):.2f} err {r['max_abs_err']:.1e}")
    print(f"{row['dtype']:>8} Hkv={row['kv_heads']:<2} P={row['prefix']:<5} T={row['tree']:<3} | " + " | ".join(cells))


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", nargs="+", default=None, help="default float16 bfloat16 (smoke: float32)")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, nargs="+", default=[32], help="e.g. 32 8 adds a GQA group of 4")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--prefix", type=int, nargs="+", default=[600, 1200, 2400, 4000])
    ap.add_argument("--tree", type=int, nargs="+", default=[1, 16, 32, 60, 64])
    ap.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--out", type=Path, default=None, help="default bench/results/tree_attention_<device>.json")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes on the CPU, 2 repeats (CI: the script still runs); Triton only under "
                         "TRITON_INTERPRET=1")
    args = ap.parse_args()
    if args.smoke:
        args.heads, args.kv_heads, args.head_dim = SMOKE["heads"], SMOKE["kv_heads"], SMOKE["head_dim"]
        args.prefix, args.tree = SMOKE["prefix"], SMOKE["tree"]
        args.repeats, args.warmup = min(args.repeats, SMOKE["repeats"]), SMOKE["warmup"]
    args.dtype = args.dtype or (["float32"] if args.smoke else ["float16", "bfloat16"])
    for kv_heads in args.kv_heads:
        if kv_heads < 1 or args.heads % kv_heads:
            ap.error(f"--kv-heads {kv_heads} must divide --heads {args.heads}")
    return args


def main() -> None:
    args = parse_args()
    device = require_device(args.device, args.smoke, "bench_tree_attention")
    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    if "flex" in args.impls and device.type == "cuda":
        import torch._dynamo.config as dynamo_config
        dynamo_config.cache_size_limit = 1024  # one flex compilation per shape and dtype
    bandwidth = copy_bandwidth(device, 16 * 2**20 if args.smoke else COPY_BYTES)
    info = device_info(device)
    print(f"{info['device_name']}: copy {bandwidth['copy_GBps']:.0f} GB/s (read + write); torch {info['torch']}, "
          f"triton {info['triton']}; times: median [p10, p90], % of copy rate, x vs sdpa, max abs err vs float32")
    rows = []
    for dtype in args.dtype:
        for kv_heads in args.kv_heads:
            for prefix in args.prefix:
                for tree in args.tree:
                    case = make_case(args.heads, kv_heads, args.head_dim, prefix, tree, getattr(torch, dtype),
                                     device, seed=prefix * 1000 + tree)
                    rows.append(bench_case(case, args.impls, device, args.repeats, args.warmup,
                                           bandwidth["copy_GBps"]))
                    print_row(rows[-1])
    skipped = {(name, r["skipped"]) for row in rows for name, r in row["impls"].items() if "skipped" in r}
    for name, reason in sorted(skipped):
        print(f"{name} skipped: {reason}")
    out = args.out or ROOT / "bench" / "results" / f"tree_attention_{device_slug(device)}.json"
    write_report(out, {**info, "smoke": args.smoke, "bandwidth": bandwidth, "repeats": args.repeats,
                       "warmup": args.warmup, "l2_flushed": device.type == "cuda", "rows": rows})


if __name__ == "__main__":
    main()
