"""Speculative decoding vs plain decoding, one run, same model and prompts.

Rows: plain decoding, the `eagle` draft, the `msd` draft: tokens/s, tau (tokens per target forward,
bonus counted), speedup over plain, the draft / verify / other time split and the tree size used.

    python bench/bench_spec.py                                   # SmolLM2-135M + UNTRAINED random drafts
    python bench/bench_spec.py --model M --msd-draft D1 --eagle-draft D2 --image photo.png

Without trained drafts (the training issue makes them) the drafts are random and tau is about 1:
the numbers then show the overhead speculation costs, not its benefit, and say so.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from msd_engine import Engine  # noqa: E402
from msd_engine.spec.tree import TreeParams  # noqa: E402

PROMPTS = ["Explain why the sky is blue.", "Write a haiku about autumn leaves.",
           "List three uses of a paperclip.", "What is the capital of France? Answer briefly."]


def _random_draft(model: Path, directory: Path, mode: str) -> Path:
    from msd_engine.convert.msd_draft import save_draft
    from msd_engine.draft.init import draft_config_for, init_draft_weights

    target = Engine.load(model, dtype="float32", max_seq_len=64)
    cfg = draft_config_for(target.config, mode)
    save_draft(directory, cfg, init_draft_weights(cfg, target.model.text.embed_tokens, seed=0), force=True)
    return directory


def _run(engine: Engine, prompts: list[str], image, new_tokens: int, speculative: bool) -> dict:
    engine.generate(prompts[0], image=image, max_new_tokens=8, speculative=speculative)  # warm-up
    rates, stats = [], []
    tokens = None
    for prompt in prompts:
        r = engine.generate(prompt, image=image, max_new_tokens=new_tokens, speculative=speculative)
        rates.append(r.stats["decode_tokens_per_s"])
        stats.append(r.stats)
        tokens = (tokens or []) + r.token_ids
    row = {"tok_s": statistics.median(rates), "tok_s_spread": [min(rates), max(rates)], "tokens": tokens}
    if speculative:
        forwards = sum(s["verify_forwards"] for s in stats)
        row.update(tau=sum(s["tau"] * s["verify_forwards"] for s in stats) / max(forwards, 1),
                   draft_ms=sum(s["draft_ms"] for s in stats), verify_ms=sum(s["verify_ms"] for s in stats),
                   other_ms=sum(s["other_ms"] for s in stats),
                   mean_tree_nodes=sum(s["tree_nodes"] for s in stats) / max(forwards, 1))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="converted target (default: SmolLM2 from its GGUF)")
    ap.add_argument("--msd-draft", type=Path, default=None)
    ap.add_argument("--eagle-draft", type=Path, default=None)
    ap.add_argument("--image", default=None)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--depth", type=int, default=5)
    ap.add_argument("--total-tokens", type=int, default=None, help="default: tuned for this device, else 60")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "spec_cpu.json")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model
        if model is None:
            from msd_engine.convert.gguf_llama import convert_gguf
            from tests.factories import SMOLLM2_GGUF

            model = tmp / "smollm2"
            convert_gguf(SMOLLM2_GGUF, model, args.dtype, progress=False)
        trained = args.msd_draft is not None and args.eagle_draft is not None
        drafts = {"msd": args.msd_draft or _random_draft(model, tmp / "msd", "msd"),
                  "eagle": args.eagle_draft or _random_draft(model, tmp / "eagle", "eagle")}
        tree = None
        if args.total_tokens is not None:
            tree = TreeParams(args.top_k, args.depth, args.total_tokens)
        plain_engine = Engine.load(model, dtype=args.dtype, max_seq_len=1024)
        plain_engine.config = dataclasses.replace(plain_engine.config, eos_token_ids=())
        rows = {"plain": _run(plain_engine, PROMPTS, args.image, args.new_tokens, False)}
        for mode, draft in drafts.items():
            engine = Engine.load(model, dtype=args.dtype, max_seq_len=1024, draft=draft, tree=tree)
            engine.config = dataclasses.replace(engine.config, eos_token_ids=())
            rows[mode] = _run(engine, PROMPTS, args.image, args.new_tokens, True)
            rows[mode]["tree"] = dataclasses.asdict(engine.tree)
            rows[mode]["lossless"] = rows[mode]["tokens"] == rows["plain"]["tokens"]
    base = rows["plain"]["tok_s"]
    print(f"drafts: {'trained' if trained else 'UNTRAINED (random weights): tau ~ 1, this measures overhead'}")
    for name, r in rows.items():
        extra = ""
        if "tau" in r:
            extra = (f" tau {r['tau']:.2f}, tree {r['tree']['total_tokens']} (mean {r['mean_tree_nodes']:.1f} nodes), "
                     f"draft {r['draft_ms']:.0f} ms / verify {r['verify_ms']:.0f} ms / other {r['other_ms']:.0f} ms, "
                     f"lossless {r['lossless']}")
        print(f"{name:>6}: {r['tok_s']:7.1f} tok/s  x{r['tok_s'] / base:.2f}{extra}")
    for r in rows.values():
        r.pop("tokens")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"trained_drafts": trained, "dtype": args.dtype, "rows": rows,
                                    "threads": torch.get_num_threads()}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
