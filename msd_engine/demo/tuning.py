"""The demo's draft tree for this machine: measured once with the shipped draft, then cached.

Without a tuned tree the engine drafts the paper's GPU tree (60 nodes), which a CPU pays for node by
node: a speculative round would then cost several plain steps. So the first `msd-engine demo` on a
machine runs `tune_tree` (the engine's measured tuning, as `msd-engine tune --draft` does) over a
few training prompts (never held-out ones) and caches the fastest tree (a tie within 2% going to
the shallower one, `spec.tune.pick_tree`) for this device, target and draft; later runs read it.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch

from msd_engine.demo.assets import DRAFT_DTYPE, TRAIN_PROMPTS, demo_home, export_photo, load_prompts
from msd_engine.spec.tree import TreeParams

TUNE_PROMPTS = 8          # training prompts measured: half with a photograph
TUNE_MAX_NEW_TOKENS = 64  # tokens per measured generation


def tuning_prompts(count: int = TUNE_PROMPTS) -> list[tuple[str, Optional[Path]]]:
    """The first count/2 image and count - count/2 text-only training prompts, photographs exported."""
    items = load_prompts(TRAIN_PROMPTS)
    images = [p for p in items if p.get("image")][:count // 2]
    texts = [p for p in items if not p.get("image")][:count - len(images)]
    folder = demo_home() / "images"
    return [(p["prompt"], export_photo(p["image"], folder) if p.get("image") else None) for p in images + texts]


def ensure_tuned_tree(target: Path, draft: Path, device: str = "cpu", dtype: str = "float32",
                      progress: bool = True) -> TreeParams:
    """The cached tree for (device, target in `dtype`, draft in DRAFT_DTYPE), measured now if there is none."""
    from msd_engine.config import ModelConfig
    from msd_engine.engine import Engine, resolve_dtype
    from msd_engine.spec.tune import draft_key, load_tuned, save_tree_tuning, scratch_tree, trees_for, tune_tree
    from msd_engine.weights import CONFIG_FILE

    dev = torch.device(device)
    config = ModelConfig.load(Path(target) / CONFIG_FILE)
    target_dtype = resolve_dtype(dtype, config)
    key = draft_key(Path(draft), resolve_dtype(DRAFT_DTYPE, config), target_dtype)
    tuned = load_tuned(dev, config, target_dtype, key)
    if tuned is not None:
        return tuned
    trees = trees_for(dev)
    if progress:
        print(f"measuring the draft tree for this machine ({len(trees)} shapes x {TUNE_PROMPTS} prompts, once) ...",
              flush=True)
    started = time.perf_counter()
    engine = Engine.load(target, device=device, dtype=dtype, max_seq_len=2048, draft=draft,
                         tree=scratch_tree(trees), draft_dtype=DRAFT_DTYPE)
    tuning = tune_tree(engine, tuning_prompts(), trees, TUNE_MAX_NEW_TOKENS)
    best = tuning.best
    path = save_tree_tuning(dev, engine.config, target_dtype, tuning, draft=key)
    if progress:
        cost = tuning.round_costs.get(best)
        print(f"tree top_k={best.top_k} depth={best.depth} total_tokens={best.total_tokens} "
              f"({tuning.rates[best]:.1f} tok/s, plain decoding {tuning.plain_tokens_per_s:.1f}"
              + (f"; a round costs {cost:.2f} plain steps" if cost else "")
              + f"; {time.perf_counter() - started:.0f} s; cached in {path})", flush=True)
    return best
