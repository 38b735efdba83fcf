"""One draft step of the MSD/EAGLE draft head at LLaVA-1.5-7B shapes, per backend, vs a target step.

The real `DraftModel` (random weights, shapes from `DraftConfig`) runs one tree level as
`TreeDrafter.draft` does: k = top_k frontier rows, P committed draft positions plus the
scratch slots of the earlier levels. Timed per backend (torch, triton, cuda; cpu on a CPU):
  draft_inputs   ops.draft_inputs: fc(cat(embedding, feature)) + bias           (model.inputs)
  draft_forward  the draft layer on a pre-built plan                              (model.forward)
  lm_head_topk   lm_head + log-softmax + top-k + frontier sort        (model.top_k, expand_topk)
  draft_step     all of the above plus the step's mask and plan, as one drafter level
  lm_head_topk_reduced, draft_step_reduced   the same over a reduced vocabulary (--draft-vocab N)
and, for the ratio "draft step / target decode step", one random-weight target Llama layer:
  target_layer_decode / target_layer_verify  T = 1 (no mask) / T = tree tokens (tree mask)
  target_lm_head_decode / target_lm_head_verify
target step estimate = num_layers x layer + lm_head (the final norm and embedding gather are
left out: a few microseconds). Each component: median [p10, p90] us (CUDA events around single
calls, L2 flushed before each) and achieved GB/s of its weight (+ KV) bytes as a fraction of
the device-to-device copy bandwidth measured in the same run.

    python bench/bench_draft_head.py                           # H100/H200: float16, all backends
    python bench/bench_draft_head.py --draft-vocab 8192 --prefix 1200 --top-k 10
    python bench/bench_draft_head.py --smoke --out /tmp/d.json   # tiny CPU shapes (CI)

Writes bench/results/draft_head_<device>.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_tree_attention import (copy_bandwidth, device_info, device_slug, interpreting,  # noqa: E402
                                  random_tree_mask, require_device, summarize, time_calls, write_report)
from msd_engine import native  # noqa: E402
from msd_engine.config import ModelConfig, TextConfig, preset  # noqa: E402
from msd_engine.draft.config import DraftConfig  # noqa: E402
from msd_engine.draft.init import draft_config_for  # noqa: E402
from msd_engine.draft.model import DraftModel  # noqa: E402
from msd_engine.draft.weights import DRAFT_VOCAB_KEY, draft_expected_shapes  # noqa: E402
from msd_engine.kv_cache import KVCache  # noqa: E402
from msd_engine.model.llama import LlamaModel  # noqa: E402
from msd_engine.ops import TorchOps, get_ops  # noqa: E402
from msd_engine.spec.tree import TreeParams, expand_topk  # noqa: E402
from msd_engine.weights import expected_shapes  # noqa: E402

SMOKE_TEXT = TextConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                        num_kv_heads=4)
SMOKE_DRAFT_VOCAB = 128
LEVEL = 3  # the timed tree level: the two before it hold scratch entries


def random_weights(shapes: dict[str, tuple], dtype: torch.dtype, device: torch.device, vocab: int,
                   seed: int) -> dict[str, torch.Tensor]:
    """Norm weights 1, biases 0, matrices N(0, 0.02^2), a draft vocabulary of distinct token ids;
    drawn on `device` (a 7B layer's 200M values would take seconds on the host)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        if name == DRAFT_VOCAB_KEY:
            out[name] = torch.randperm(vocab, generator=gen, device=device)[:shape[0]].sort().values
        elif name.endswith("norm.weight"):
            out[name] = torch.ones(shape, dtype=dtype, device=device)
        elif name.endswith("bias"):
            out[name] = torch.zeros(shape, dtype=dtype, device=device)
        else:
            out[name] = (torch.randn(shape, generator=gen, device=device) * 0.02).to(dtype)
    return out


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class Timer:
    """Collects the timed pieces of one backend: name -> (summary, bytes read)."""

    def __init__(self, device: torch.device, repeats: int, warmup: int, copy_gbps: float):
        self.device, self.repeats, self.warmup, self.copy_gbps = device, repeats, warmup, copy_gbps
        self.results: dict[str, dict] = {}

    def time(self, name: str, fn, bytes_read: Optional[int] = None) -> None:
        times = time_calls(fn, self.device, self.repeats, self.warmup)
        self.results[name] = {**summarize(times, bytes_read, self.copy_gbps), "bytes": bytes_read}

    def us(self, name: str) -> float:
        return self.results[name]["median_us"]


def draft_level(model: DraftModel, cache: KVCache, tokens: torch.Tensor, parent_hidden: torch.Tensor,
                scores: torch.Tensor, ancestors: torch.Tensor, committed: int, top_k: int) -> torch.Tensor:
    """One level of `TreeDrafter.draft`: inputs, mask, plan, layer, top-k, frontier choice."""
    n = tokens.shape[0]
    x = model.inputs(tokens, parent_hidden)                                       # [k, H]
    mask = torch.cat([ancestors, torch.eye(n, dtype=torch.bool, device=x.device)], dim=1)
    positions = torch.full((n,), committed + LEVEL - 1, device=x.device)
    step = model.plan_step(positions, committed + ancestors.shape[1], mask, prefix_len=committed)
    hidden = model.forward(x, step, cache)                                        # [k, H]
    _, _, parent_slot, next_idx = expand_topk(scores, *model.top_k(hidden, top_k))
    return hidden[parent_slot[next_idx]]


def bench_draft(timer: Timer, ops: TorchOps, cfg: DraftConfig, weights: dict, lm_head: torch.Tensor,
                prefix: int, top_k: int, gen: torch.Generator) -> None:
    """The draft over the full vocabulary; with cfg.draft_vocab_size, its top-k and step once more
    over the reduced vocabulary (DraftModel keeps the lm_head rows of `draft_vocab`)."""
    device = lm_head.device
    scratch = (LEVEL - 1) * top_k
    slots = prefix + scratch + top_k
    full_weights = {k: w for k, w in weights.items() if k != DRAFT_VOCAB_KEY}
    model = DraftModel(dataclasses.replace(cfg, draft_vocab_size=0), full_weights, lm_head, ops, slots)
    cache = KVCache(1, cfg.num_kv_heads, slots, cfg.head_dim, lm_head.dtype, device)
    tokens = torch.randint(cfg.vocab_size, (top_k,), generator=gen).to(device)
    parent_hidden = torch.randn(top_k, cfg.hidden_size, generator=gen).to(device, lm_head.dtype)
    scores = -torch.rand(top_k, generator=gen).to(device)
    # Each node sees one scratch slot per earlier level (its ancestors) and itself.
    ancestors = torch.zeros(top_k, scratch, dtype=torch.bool, device=device)  # [k, scratch]
    for level in range(LEVEL - 1):
        ancestors[torch.arange(top_k), level * top_k + torch.randint(top_k, (top_k,), generator=gen)] = True
    mask = torch.cat([ancestors, torch.eye(top_k, dtype=torch.bool, device=device)], dim=1)
    step = model.plan_step(torch.full((top_k,), prefix + LEVEL - 1, device=device), prefix + scratch, mask,
                           prefix_len=prefix)
    x = model.inputs(tokens, parent_hidden)
    hidden = model.forward(x, step, cache)
    layer = model.layer
    kv_bytes = 2 * nbytes(cache.keys[0][:, :slots])
    timer.time("draft_inputs", lambda: model.inputs(tokens, parent_hidden), nbytes(model.fc_weight))
    timer.time("draft_forward", lambda: model.forward(x, step, cache),
               nbytes(layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj) + kv_bytes)
    timer.time("lm_head_topk", lambda: expand_topk(scores, *model.top_k(hidden, top_k)), nbytes(model.lm_head))
    step_fn = lambda m: lambda: draft_level(m, cache, tokens, parent_hidden, scores, ancestors, prefix, top_k)  # noqa: E731
    timer.time("draft_step", step_fn(model))
    if cfg.draft_vocab_size:
        small = DraftModel(cfg, weights, lm_head, ops, slots)
        timer.time("lm_head_topk_reduced", lambda: expand_topk(scores, *small.top_k(hidden, top_k)),
                   nbytes(small.lm_head))
        timer.time("draft_step_reduced", step_fn(small))


def bench_target(timer: Timer, ops: TorchOps, text: TextConfig, weights: dict, prefix: int, tree_tokens: int,
                 gen: torch.Generator) -> None:
    """One target layer at T = 1 and T = tree_tokens, and the lm_head at both."""
    model = LlamaModel(dataclasses.replace(text, num_layers=1), weights, ops, max_seq_len=prefix + tree_tokens)
    device, dtype = model.lm_head.device, model.lm_head.dtype
    cache = KVCache(1, text.num_kv_heads, prefix + tree_tokens, text.head_dim, dtype, device)
    layer = model.layers[0]
    layer_bytes = nbytes(layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj)
    kv_row = 2 * nbytes(cache.keys[0][:, :1])
    mask = random_tree_mask(tree_tokens, TreeParams().depth + 1, gen).to(device)   # [T, T]
    depths = mask.sum(1) - 1                                                      # ancestors per node
    for label, t, step_mask, positions in (("decode", 1, None, torch.tensor([prefix], device=device)),
                                           ("verify", tree_tokens, mask, prefix + depths)):
        step = model.plan_step(positions, prefix, step_mask)
        x = torch.randn(t, text.hidden_size, generator=gen).to(device, dtype)
        hidden = model.forward(x, step, cache)
        timer.time(f"target_layer_{label}", lambda: model.forward(x, step, cache),
                   layer_bytes + kv_row * (prefix + t))
        timer.time(f"target_lm_head_{label}", lambda: model.logits(hidden), nbytes(model.lm_head))


def backend_unavailable(name: str, device: torch.device) -> Optional[str]:
    """Why `name` cannot run on `device`, or None."""
    if name == "triton":
        if device.type != "cuda" and not interpreting():
            return "Triton needs a CUDA device (or TRITON_INTERPRET=1 on a CPU)"
        try:
            import msd_engine.triton_kernels  # noqa: F401
        except ImportError as exc:  # the package maps triton_kernels/ in at install time
            return f"msd_engine.triton_kernels does not import (pip install -e .): {exc}"
    if name in ("cuda", "cpu") and not native.is_built():
        return "msd_engine._C is not built (pip install -e .)"
    if name == "cuda" and (device.type != "cuda" or not native.cuda_compiled()):
        return "needs a CUDA device and msd_engine._C built with CUDA (MSD_ENGINE_CUDA=1 pip install -e .)"
    if name == "cpu" and device.type != "cpu":
        return "the C++ CPU kernels need --device cpu"
    return None


def bench_backend(name: str, dtype: torch.dtype, device: torch.device, args, text: TextConfig, cfg: DraftConfig,
                  copy_gbps: float) -> dict:
    row = {"backend": name, "dtype": str(dtype).removeprefix("torch.")}
    reason = backend_unavailable(name, device)
    if reason is None and interpreting() and name == "triton" and dtype == torch.bfloat16:
        reason = "the Triton interpreter cannot compute bfloat16"
    if reason is not None:
        return {**row, "skipped": reason}
    ops = get_ops(name, device)
    row["kernels"] = {op: name if getattr(type(ops), op) is not getattr(TorchOps, op) else "torch reference"
                      for op in ("draft_inputs", "rope_kv_write", "attention", "logsoftmax_topk", "linear")}
    gen = torch.Generator().manual_seed(0)
    target = random_weights(expected_shapes(ModelConfig(text=dataclasses.replace(text, num_layers=1))),
                            dtype, device, text.vocab_size, seed=1)
    draft = random_weights({k: s for k, s in draft_expected_shapes(cfg).items() if k != "embed_tokens.weight"},
                           dtype, device, text.vocab_size, seed=2)
    draft["embed_tokens.weight"] = target["text.embed_tokens.weight"]  # the draft's is the target's copy
    timer = Timer(device, args.repeats, args.warmup, copy_gbps)
    bench_draft(timer, ops, cfg, draft, target["text.lm_head.weight"], args.prefix, args.top_k, gen)
    bench_target(timer, ops, text, target, args.prefix, args.tree_tokens, gen)
    layers = text.num_layers
    decode = layers * timer.us("target_layer_decode") + timer.us("target_lm_head_decode")
    verify = layers * timer.us("target_layer_verify") + timer.us("target_lm_head_verify")
    row["components"] = timer.results
    row["estimates"] = {"target_decode_step_us": decode, "target_verify_step_us": verify,
                        "draft_round_us": args.depth * timer.us("draft_step"), "target_layers": layers,
                        "depth": args.depth}
    row["ratios"] = {"draft_step_over_target_decode": timer.us("draft_step") / decode,
                     "draft_round_over_target_decode": args.depth * timer.us("draft_step") / decode,
                     "target_verify_over_decode": verify / decode}
    if cfg.draft_vocab_size:
        row["ratios"]["draft_step_reduced_over_target_decode"] = timer.us("draft_step_reduced") / decode
    return row


def print_row(row: dict) -> None:
    head = f"{row['dtype']:>8} {row['backend']:>6}"
    if "skipped" in row:
        print(f"{head}: skipped: {row['skipped']}")
        return
    for name, r in row["components"].items():
        frac = f"  {r['GBps']:7.1f} GB/s ({100 * r['fraction_of_copy']:.0f}% of copy)" if r["bytes"] else ""
        print(f"{head} {name:<22} {r['median_us']:10.1f} us [{r['p10_us']:.1f}, {r['p90_us']:.1f}]{frac}")
    e, q = row["estimates"], row["ratios"]
    print(f"{head} target decode step ~{e['target_decode_step_us']:.0f} us, verify ~{e['target_verify_step_us']:.0f} us"
          f" ({e['target_layers']} layers + lm_head); draft step / target decode = "
          f"{q['draft_step_over_target_decode']:.3f}, {e['depth']} levels = {q['draft_round_over_target_decode']:.2f}")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", nargs="+", default=None, help="default float16 (smoke: float32)")
    ap.add_argument("--backends", nargs="+", default=None, choices=("torch", "triton", "cuda", "cpu"),
                    help="default: torch triton cuda on a GPU, torch cpu triton on a CPU")
    ap.add_argument("--prefix", type=int, default=1200, help="committed positions in the caches")
    ap.add_argument("--top-k", type=int, default=TreeParams().top_k, help="frontier rows per draft level")
    ap.add_argument("--depth", type=int, default=TreeParams().depth, help="draft levels per round")
    ap.add_argument("--tree-tokens", type=int, default=TreeParams().total_tokens, help="rows of a verify step")
    ap.add_argument("--draft-vocab", type=int, default=0, help="also time a reduced draft vocabulary of N tokens")
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None, help="default bench/results/draft_head_<device>.json")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes on the CPU, 2 repeats (CI: the script still runs); Triton only under "
                         "TRITON_INTERPRET=1")
    args = ap.parse_args()
    if args.smoke:
        args.prefix, args.top_k, args.tree_tokens = 24, 4, 8
        args.draft_vocab = args.draft_vocab or SMOKE_DRAFT_VOCAB
        args.repeats, args.warmup = min(args.repeats, 2), 0
    args.dtype = args.dtype or (["float32"] if args.smoke else ["float16"])
    return args


def main() -> None:
    args = parse_args()
    device = require_device(args.device, args.smoke, "bench_draft_head")
    text = SMOKE_TEXT if args.smoke else preset("llava-1.5-7b").text
    cfg = dataclasses.replace(draft_config_for(ModelConfig(text=text)), draft_vocab_size=args.draft_vocab)
    backends = args.backends or (["torch", "cpu", "triton"] if device.type == "cpu" else ["torch", "triton", "cuda"])
    bandwidth = copy_bandwidth(device, 16 * 2**20 if args.smoke else 1 << 30)
    info = device_info(device)
    print(f"{info['device_name']}: copy {bandwidth['copy_GBps']:.0f} GB/s (read + write); torch {info['torch']}, "
          f"triton {info['triton']}; draft H={cfg.hidden_size} F={cfg.intermediate_size} heads={cfg.num_heads} "
          f"V={cfg.vocab_size} draft vocab={cfg.draft_vocab_size or 'full'}; P={args.prefix} k={args.top_k}")
    rows = []
    for dtype in args.dtype:
        for name in backends:
            rows.append(bench_backend(name, getattr(torch, dtype), device, args, text, cfg, bandwidth["copy_GBps"]))
            print_row(rows[-1])
            if device.type == "cuda":
                torch.cuda.empty_cache()
    out = args.out or ROOT / "bench" / "results" / f"draft_head_{device_slug(device)}.json"
    write_report(out, {**info, "smoke": args.smoke, "bandwidth": bandwidth, "repeats": args.repeats,
                       "warmup": args.warmup, "l2_flushed": device.type == "cuda",
                       "draft_config": dataclasses.asdict(cfg), "target_config": dataclasses.asdict(text),
                       "prefix": args.prefix, "top_k": args.top_k, "tree_tokens": args.tree_tokens,
                       "level": LEVEL, "rows": rows})


if __name__ == "__main__":
    main()
