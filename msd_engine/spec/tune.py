"""Per-device tuning of the tree size `total_tokens` (EAGLE-2's rule), cached per device and model.

Time the target's verify forward over T tree tokens for each candidate T, divide by the expected
acceptance gain of a tree that size, take the argmin. GPUs verify 60 tokens for about the price of
one; a CPU pays for every token, so its candidates are far smaller trees.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Optional

import torch

from msd_engine.config import ModelConfig
from msd_engine.model.llava import LlavaModel
from msd_engine.kv_cache import KVCache

# EAGLE-2's GPU candidates and gains.
GPU_CANDIDATES = {40: 1.0, 48: 1.05, 50: 1.07, 56: 1.1, 60: 1.13}
# CPU: a tree of T nodes gains roughly log(T) in accepted length over small trees; these gains are
# that curve anchored at T = 4 (an assumption, stated; `msd-engine tune` prints the raw timings too).
CPU_CANDIDATES = {4: 1.0, 6: 1.12, 8: 1.2, 12: 1.3, 16: 1.37, 24: 1.45, 32: 1.5}


def cache_file() -> Path:
    root = os.environ.get("MSD_ENGINE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "msd-engine")
    return Path(root) / "tune.json"


def device_key(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{platform.processor() or platform.machine()}:{torch.get_num_threads()}threads"


def model_key(config: ModelConfig, dtype: torch.dtype) -> str:
    digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
    return f"{config.name or 'model'}:{digest}:{str(dtype).replace('torch.', '')}"


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


def load_tuned(device: torch.device, config: ModelConfig, dtype: torch.dtype) -> Optional[int]:
    path = cache_file()
    if not path.is_file():
        return None
    try:
        table = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # a damaged cache is only a missed optimisation; `tune` rewrites it
    entry = table.get(device_key(device), {}).get(model_key(config, dtype))
    return int(entry["total_tokens"]) if entry else None


def save_tuned(device: torch.device, config: ModelConfig, dtype: torch.dtype, best: int,
               timings: dict[int, float]) -> Path:
    path = cache_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    table = {}
    if path.is_file():
        try:
            table = json.loads(path.read_text())
        except json.JSONDecodeError:
            table = {}
    table.setdefault(device_key(device), {})[model_key(config, dtype)] = {
        "total_tokens": best, "verify_ms": {str(k): v for k, v in timings.items()}}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(table, indent=2) + "\n")
    tmp.replace(path)
    return path
