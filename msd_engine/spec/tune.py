"""Per-device tuning of the draft tree, cached per device and model (and draft).

Without a draft (EAGLE-2's rule): time the target's verify forward over T tree tokens for each
candidate T, divide by an assumed acceptance gain of a tree that size, take the argmin of
`total_tokens`. With a draft and prompts (`tune_tree`): run speculative decoding for each candidate
tree shape (top_k, depth, total_tokens) and keep the fastest measured one (`pick_tree`: a tie
within 2% goes to the shallower tree): the draft's real acceptance and the device's real draft and
verify costs decide. GPUs verify 60 tokens for about the
price of one; a CPU pays for every token, so its candidates are far smaller trees. `tune_tree` times
plain decoding over the same prompts too, and records each tree's round cost in plain steps: the
break-even tokens per round under which `PausePolicy` lets plain steps stand in for rounds.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from msd_engine import native
from msd_engine.config import ModelConfig
from msd_engine.model.llava import LlavaModel
from msd_engine.kv_cache import KVCache
from msd_engine.spec.tree import TreeParams
from msd_engine.weights import hash_file

# EAGLE-2's GPU candidates and gains.
GPU_CANDIDATES = {40: 1.0, 48: 1.05, 50: 1.07, 56: 1.1, 60: 1.13}
# CPU: a tree of T nodes gains roughly log(T) in accepted length over small trees; these gains are
# that curve anchored at T = 4 (an assumption, stated; `msd-engine tune` prints the raw timings too).
CPU_CANDIDATES = {4: 1.0, 6: 1.12, 8: 1.2, 12: 1.3, 16: 1.37, 24: 1.45, 32: 1.5}


def cache_file() -> Path:
    root = os.environ.get("MSD_ENGINE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "msd-engine")
    return Path(root) / "tune.json"


# Raised when a change to the engine moves what drafting or verifying costs on the CPU, so that
# trees tuned before it are measured again (2: one native call per CPU decoder layer; 3: AVX-512
# norms and rope, two-core attention from smaller steps, numpy argmax, 1 ms pool spin; 4: the
# draft's extend and drafting step as one native call each; 5: measured trees carry their round
# cost in plain steps, which `Engine.load(pause_below="auto")` reads).
CPU_COST_REVISION = 5


def device_key(device: torch.device) -> str:
    """The device as the tuning cache tells them apart. On the CPU this includes the native kernels'
    SIMD path: it sets what a verified row costs (a 16-row bfloat16 linear costs 1.1-1.8x a 1-row one
    on AMX, 2.4-3.9x on the AVX-512 path, `bench_cpu_linear.py --isas`), so a tree tuned on one path
    is not the best on another. CPU keys also carry CPU_COST_REVISION."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    isa = f":{native.cpu_isa()}" if native.is_built() else ""
    return (f"cpu:{platform.processor() or platform.machine()}{isa}:{torch.get_num_threads()}threads"
            f":r{CPU_COST_REVISION}")


def model_key(config: ModelConfig, dtype: torch.dtype) -> str:
    digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
    return f"{config.name or 'model'}:{digest}:{str(dtype).replace('torch.', '')}"


# Tree shapes `tune_tree` measures: (top_k, depth, total_tokens).
# A CPU pays for every drafted row and every verified token, so its trees are small and narrow.
# Measured on a 2-core Xeon: a 5-node verify cost 1.15x a plain step (bench_e2e), and the CPU
# linear at 8 rows 1.4-2x its 1-row time (bench_cpu_linear), so deep narrow trees of 6-8 nodes are
# candidates beside the shallow ones. With bfloat16 on AMX a 16-row linear costs 1.1-1.8x a 1-row
# one, while each level of depth costs a draft forward and top-k (~1.7 ms a level there): depth-2
# trees, and wider 8-node trees, too. The 12- and 16-node deep trees, (6,5,12) and (6,6,16), measured slowest in
# every tuning of the demo pair on that Xeon, in both precisions, so they are no longer candidates.
# Once each layer became one native call (cost revision 2), a bfloat16 verify got cheaper and a draft
# level (forward + top-k over 8192 rows, ~1.3 ms) became the larger share: depth-1 trees are
# candidates, and (3,4,8) and (4,5,10), the slowest in both precisions then, were dropped.
CPU_TREES = (TreeParams(3, 1, 3), TreeParams(3, 1, 4), TreeParams(4, 1, 6),
             TreeParams(2, 2, 3), TreeParams(2, 2, 4), TreeParams(3, 2, 4), TreeParams(4, 2, 8),
             TreeParams(2, 3, 5), TreeParams(2, 4, 6), TreeParams(3, 3, 6), TreeParams(4, 3, 6),
             TreeParams(3, 3, 8), TreeParams(4, 4, 8), TreeParams(4, 2, 10), TreeParams(4, 3, 10),
             TreeParams(6, 2, 10), TreeParams(6, 3, 12))
GPU_TREES = (TreeParams(10, 5, 40), TreeParams(10, 5, 50), TreeParams(10, 6, 60), TreeParams(12, 6, 64))


def trees_for(device: torch.device) -> tuple[TreeParams, ...]:
    return GPU_TREES if device.type == "cuda" else CPU_TREES


def scratch_tree(trees) -> TreeParams:
    """A tree whose drafter scratch and depth fit every one of `trees` (what to load the engine with)."""
    k, d = max(t.top_k for t in trees), max(t.depth for t in trees)
    return TreeParams(k, d, min(max(t.total_tokens for t in trees), TreeParams(k, d, 1).max_nodes))


@dataclass(frozen=True)
class TreeTuning:
    """What `tune_tree` measured: the tree `pick_tree` picks, each tree's decode tokens/s, plain
    decoding's tokens/s over the same prompts, and each tree's round cost in plain steps (a round's
    drafting + verifying + accepting time over a plain step's; the tokens per round at which
    speculation breaks even, what `PausePolicy.break_even` wants)."""

    best: TreeParams
    rates: dict
    plain_tokens_per_s: float
    round_costs: dict


def tune_tree(engine, prompts, trees, max_new_tokens: int = 64) -> TreeTuning:
    """Measure speculative greedy decoding with each of `trees`, and plain decoding, over `prompts`
    [(text, image or None)] on `engine` (loaded with a draft and a tree from `scratch_tree`)."""
    if engine.drafter is None:
        raise ValueError("tune_tree needs an engine loaded with a draft")
    if not prompts:
        raise ValueError("tune_tree needs at least one prompt")
    loaded, pause = engine.tree, engine.pause
    trees = tuple(trees)
    steps, seconds, rounds = dict.fromkeys(trees, 0), dict.fromkeys(trees, 0.0), dict.fromkeys(trees, 0)
    plain_steps, plain_seconds = 0, 0.0
    try:
        engine.pause = None  # every step a round: the rounds themselves are measured
        engine.generate(prompts[0][0], image=prompts[0][1], max_new_tokens=8, speculative=True)  # warm-up
        # Prompt by prompt, every tree in turn: a machine whose speed drifts during the tuning
        # (other tenants, clocks) then weighs on every tree alike, not on the ones measured last.
        for text, image in prompts:
            s = engine.generate(text, image=image, max_new_tokens=max_new_tokens, speculative=False).stats
            plain_steps += max(s["new_tokens"] - 1, 0)
            plain_seconds += s["decode_ms"] / 1e3
            for tree in trees:
                engine.tree = tree
                s = engine.generate(text, image=image, max_new_tokens=max_new_tokens, speculative=True).stats
                n = max(s["new_tokens"] - 1, 0)
                if n and s["decode_tokens_per_s"] > 0:
                    steps[tree] += n
                    seconds[tree] += n / s["decode_tokens_per_s"]
                    rounds[tree] += s["verify_forwards"]
    finally:
        engine.tree, engine.pause = loaded, pause
    rates = {tree: steps[tree] / seconds[tree] if seconds[tree] else 0.0 for tree in trees}
    plain_rate = plain_steps / plain_seconds if plain_seconds else 0.0
    costs = {tree: (seconds[tree] / rounds[tree]) * plain_rate for tree in trees if rounds[tree] and plain_rate}
    return TreeTuning(pick_tree(rates), rates, plain_rate, costs)


# Trees measured within this fraction of the fastest count as tied (see pick_tree).
TIE_TOLERANCE = 0.02


def pick_tree(rates: dict[TreeParams, float], tolerance: float = TIE_TOLERANCE) -> TreeParams:
    """The tree to use given measured {tree: tokens/s}: of those within `tolerance` of the fastest,
    the one with the fewest draft levels, then the fewest nodes, then the fastest.

    A tie goes to the cheaper tree because the measurement favours deep trees: tuning runs on
    prompts the draft was trained on, where its multi-step guesses are better than on new ones,
    and a few prompts cannot tell trees 2% apart. On the demo pair with the float32 target the
    tuner measured (4,3,6) 1.4% ahead of (3,1,4) on training prompts; on the held-out prompts
    (bench_e2e, same run) (3,1,4) was 3% faster overall and 8% on text."""
    if not rates:
        raise ValueError("pick_tree needs at least one measured tree")
    if not 0.0 <= tolerance < 1.0:
        raise ValueError(f"tolerance must be in [0, 1), got {tolerance}")
    fastest = max(rates.values())
    tied = [tree for tree, rate in rates.items() if rate >= fastest * (1.0 - tolerance)]
    return min(tied, key=lambda t: (t.depth, t.total_tokens, -rates[t]))


def draft_key(draft_dir: Path, draft_dtype: Optional[torch.dtype] = None,
              target_dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """Identifies a converted draft: its config and its whole weights file, and the precision it
    runs in where that is not the target's (None when the directory is not a draft; loading it then
    says why). The whole file: a retrained draft can differ only past its first megabytes (the
    frozen embedding table comes first), and its measured tree must not be reused (~0.15 s per
    130 MB here)."""
    draft_dir = Path(draft_dir)
    weights = draft_dir / "model.safetensors"
    if not (draft_dir / "config.json").is_file() or not weights.is_file():
        return None
    key = hash_file(weights, hashlib.sha256((draft_dir / "config.json").read_bytes())).hexdigest()[:16]
    if draft_dtype is not None and draft_dtype != target_dtype:
        key += "@" + str(draft_dtype).removeprefix("torch.")
    return key


def candidates_for(device: torch.device) -> dict[int, float]:
    return GPU_CANDIDATES if device.type == "cuda" else CPU_CANDIDATES


def time_verify(model: LlavaModel, cache: KVCache, tree_size: int, prefix: int, repeats: int) -> float:
    """Median ms of one target forward (+ logits) over `tree_size` tokens after `prefix` cached ones."""
    device = model.text.embed_tokens.device
    vocab = model.config.text.vocab_size
    tokens = torch.randint(0, vocab, (tree_size,), device=device)
    # A chain-shaped mask: the cost of verification does not depend on the tree's shape.
    mask = torch.ones(tree_size, tree_size, dtype=torch.bool, device=device).tril()
    step = model.text.plan_step(prefix + torch.arange(tree_size, device=device), prefix, mask)
    times = []
    with torch.inference_mode():
        for i in range(repeats + 2):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            model.text.logits(model.text.forward(model.text.embed(tokens), step, cache))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= 2:  # warm-up
                times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def tune_total_tokens(model: LlavaModel, cache: KVCache, device: torch.device, prefix: int = 640,
                      repeats: int = 5) -> tuple[int, dict[int, float]]:
    """(best total_tokens, {T: median verify ms}) for this device and model."""
    cands = candidates_for(device)
    prefix = max(0, min(prefix, cache.max_seq_len - max(cands)))
    timings = {t: time_verify(model, cache, t, prefix, repeats) for t in cands}
    best = min(cands, key=lambda t: timings[t] / cands[t])
    return best, timings


def _entry_key(config: ModelConfig, dtype: torch.dtype, draft: Optional[str]) -> str:
    return model_key(config, dtype) + (f"|draft:{draft}" if draft else "")


def _read_table() -> dict:
    path = cache_file()
    if not path.is_file():
        return {}
    try:
        table = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}  # a damaged cache is only a missed optimisation; `tune` rewrites it
    return table if isinstance(table, dict) else {}


def _cached_entry(device: torch.device, key: str) -> Optional[dict]:
    """The cache's entry for `key` on this device; None when absent or not a table (a damaged
    cache is only a missed optimisation)."""
    entries = _read_table().get(device_key(device))
    entry = entries.get(key) if isinstance(entries, dict) else None
    return entry if isinstance(entry, dict) else None


def load_tuned(device: torch.device, config: ModelConfig, dtype: torch.dtype,
               draft: Optional[str] = None) -> Optional[TreeParams]:
    """The tuned tree for this device and model: the one measured with `draft` (a `draft_key`) if
    there is one, else the verify-timed size; None when nothing was tuned."""
    for key in ([_entry_key(config, dtype, draft)] if draft else []) + [_entry_key(config, dtype, None)]:
        entry = _cached_entry(device, key)
        if entry:
            try:
                tree = entry.get("tree") or {"total_tokens": entry["total_tokens"]}
                return TreeParams(**{k: int(v) for k, v in tree.items()})
            except (KeyError, TypeError, ValueError):
                return None
    return None


def _tree_name(tree: TreeParams) -> str:
    return f"{tree.top_k},{tree.depth},{tree.total_tokens}"


def load_tuned_round_cost(device: torch.device, config: ModelConfig, dtype: torch.dtype, draft: str,
                          tree: TreeParams) -> Optional[float]:
    """The round cost in plain steps the tuner measured for `tree` with `draft` (a `draft_key`) on
    this device and model; None when it measured none."""
    entry = _cached_entry(device, _entry_key(config, dtype, draft))
    costs = entry.get("round_cost_plain_steps") if entry else None
    cost = costs.get(_tree_name(tree)) if isinstance(costs, dict) else None
    # a damaged entry is only a missed optimisation, as in load_tuned
    ok = isinstance(cost, (int, float)) and not isinstance(cost, bool) and 0 < cost < float("inf")
    return float(cost) if ok else None


def save_tuned(device: torch.device, config: ModelConfig, dtype: torch.dtype, best,
               timings: dict, draft: Optional[str] = None, round_costs: Optional[dict] = None,
               plain_tokens_per_s: Optional[float] = None) -> Path:
    """Cache `best` (a total_tokens int from the verify timing, or a measured TreeParams, with the
    measured trees' `round_costs` and plain decoding's rate where given)."""
    path = cache_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    table = _read_table()
    if isinstance(best, TreeParams):
        entry = {"tree": {"top_k": best.top_k, "depth": best.depth, "total_tokens": best.total_tokens},
                 "tokens_per_s": {_tree_name(t): v for t, v in timings.items()}}
        if round_costs:
            entry["round_cost_plain_steps"] = {_tree_name(t): v for t, v in round_costs.items()}
        if plain_tokens_per_s:
            entry["plain_tokens_per_s"] = plain_tokens_per_s
    else:
        entry = {"total_tokens": int(best), "verify_ms": {str(k): v for k, v in timings.items()}}
    table.setdefault(device_key(device), {})[_entry_key(config, dtype, draft)] = entry
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(table, indent=2) + "\n")
    tmp.replace(path)
    return path


def save_tree_tuning(device: torch.device, config: ModelConfig, dtype: torch.dtype, tuning: TreeTuning,
                     draft: Optional[str]) -> Path:
    """Cache what `tune_tree` measured: its best tree, every tree's rate and round cost, plain decoding's rate."""
    return save_tuned(device, config, dtype, tuning.best, tuning.rates, draft=draft, round_costs=tuning.round_costs,
                      plain_tokens_per_s=tuning.plain_tokens_per_s)
