"""End-to-end speed of the demo pair over the held-out prompts, all systems in one run.

Systems: transformers `generate` on the same weights (`msd_engine.convert.to_transformers`), the engine's plain
decoding, the engine with the `eagle` draft, the engine with the `msd` draft. For every held-out
prompt (with and without images) and every temperature, each system generates the same number of
tokens at most. The engine runs in `--dtype`; transformers runs in each of `--hf-dtypes`, and the
speedup "vs transformers" is over the fastest of those (each system at its best precision). Decode
tokens/s is (new tokens - 1) / (time after the first token), summed over the prompts of a group.
tau = tokens per verify forward of a draft tree. Both drafts step aside for plain steps while their
rounds do not pay (`PausePolicy`, from the round cost the tuner measured for the tree), and "paused"
is the share of decode tokens those plain steps gave; `msd-always` is the msd draft speculating
every step, for the pause's effect side by side. Greedy outputs of the speculative systems are checked equal
to plain decoding's (the method is lossless); transformers' greedy agreement with the engine is
reported too. Writes JSON and a PNG chart.

    python bench/bench_e2e.py                       # all held-out prompts, greedy + temperature 1
    python bench/bench_e2e.py --limit 8 --temperatures 0
    python bench/bench_e2e.py --dtype bfloat16 --hf-dtypes float32 bfloat16
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from hf_reference import hf_generate  # noqa: E402

from msd_engine import native  # noqa: E402
from msd_engine.convert.to_transformers import build_hf_llava  # noqa: E402
from msd_engine.demo.assets import (DRAFT_DTYPE, HELDOUT_PROMPTS, demo_home, export_photo, load_prompts,  # noqa: E402
                                    prepare)
from msd_engine.demo.tuning import ensure_tuned_tree  # noqa: E402
from msd_engine.engine import Engine  # noqa: E402
from msd_engine.request import expand_image_tokens, pixel_values_for, prompt_ids  # noqa: E402
from msd_engine.spec.tree import TreeParams  # noqa: E402

SYSTEMS = ("transformers", "plain", "eagle", "msd", "msd-always")
SPECULATIVE = ("eagle", "msd", "msd-always")
DTYPES = ("float32", "bfloat16")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=Path, default=HELDOUT_PROMPTS)
    p.add_argument("--limit", type=int, default=0, help="first N prompts of each group (0: all)")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0])
    p.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    p.add_argument("--tree", default=None,
                   help="TOP_K,DEPTH,TOTAL (default: the tree measured for the msd draft on this machine, cached)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="the engine's target precision")
    p.add_argument("--hf-dtypes", nargs="+", default=["float32"], choices=DTYPES,
                   help="transformers' precisions (the speedup is over the fastest)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "e2e_cpu.json")
    return p.parse_args(argv)


def select_prompts(path: Path, limit: int) -> list[dict]:
    items = load_prompts(path)
    groups = {"with_image": [p for p in items if p.get("image")], "text_only": [p for p in items if not p.get("image")]}
    return [p for g in groups.values() for p in (g[:limit] if limit else g)]


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    target, msd_dir = prepare("msd")
    _, eagle_dir = prepare("eagle")
    if args.tree:
        k, d, n = (int(x) for x in args.tree.split(","))
        tree = TreeParams(top_k=k, depth=d, total_tokens=n)
    else:  # the tree measured for the msd draft on this machine (as the demo uses), for both drafts
        tree = ensure_tuned_tree(target, msd_dir, dtype=args.dtype)
    engines = {"msd": Engine.load(target, dtype=args.dtype, max_seq_len=2048, draft=msd_dir, tree=tree,
                                  draft_dtype=DRAFT_DTYPE)}
    # The msd draft's tree, and its pause policy (the tuner measured that tree's round cost), for both.
    engines["eagle"] = Engine.load(target, dtype=args.dtype, max_seq_len=2048, draft=eagle_dir,
                                   tree=engines["msd"].tree, draft_dtype=DRAFT_DTYPE, pause_below=None)
    pause = engines["msd"].pause
    pauses = {"eagle": pause, "msd": pause, "msd-always": None, "plain": None}
    engines["plain"] = engines["msd-always"] = engines["msd"]
    hf = ({f"transformers:{d}": build_hf_llava(target, getattr(torch, d)) for d in args.hf_dtypes}
          if "transformers" in args.systems else {})
    systems = [label for s in args.systems for label in (hf if s == "transformers" else [s])]
    images = demo_home() / "images"
    rows = []
    prompts = select_prompts(args.prompts, args.limit)
    for temperature in args.temperatures:
        for i, p in enumerate(prompts):
            image = export_photo(p["image"], images) if p.get("image") else None
            outputs = {}
            for system in systems:
                seed = args.seed + i
                row = {"prompt": i, "image": p.get("image"), "temperature": temperature, "system": system}
                if system in hf:
                    eng = engines["msd"]
                    cfg = eng.config
                    ids = prompt_ids(cfg, eng.tokenizer, p["prompt"], 1 if image else 0)
                    pixels = pixel_values_for(cfg, [image]) if image else None
                    if image:
                        ids = expand_image_tokens(ids, cfg.image_token_id, cfg.vision.num_image_tokens, 1)
                    tokens, rate = hf_generate(*hf[system], ids, pixels, args.max_new_tokens, temperature, seed)
                    row.update(new_tokens=len(tokens), tokens_per_s=rate)
                else:
                    engines[system].pause = pauses[system]
                    result = engines[system].generate(p["prompt"], image=image, max_new_tokens=args.max_new_tokens,
                                                      temperature=temperature, seed=seed,
                                                      speculative=system != "plain")
                    s = result.stats
                    tokens = result.token_ids
                    decode_s = (s.get("draft_ms", 0) + s.get("verify_ms", 0) + s.get("other_ms", 0)
                                + s.get("plain_ms", 0) if system != "plain" else s["decode_ms"]) / 1e3
                    row.update(new_tokens=s["new_tokens"], tokens_per_s=s["decode_tokens_per_s"], decode_s=decode_s)
                    if system != "plain":
                        row.update(tau=s["tau"], verify_forwards=s["verify_forwards"],
                                   accepted_tokens=sum(int(n) * c for n, c in s["accepted_histogram"].items()),
                                   draft_ms=s["draft_ms"], verify_ms=s["verify_ms"], other_ms=s["other_ms"],
                                   plain_steps=s["plain_steps"], plain_ms=s["plain_ms"])
                outputs[system] = tokens
                rows.append(row)
            if temperature == 0 and "plain" in outputs:
                for system in SPECULATIVE:
                    if system in outputs and outputs[system] != outputs["plain"]:
                        raise AssertionError(f"prompt {i}: {system} greedy output differs from plain decoding")
                for row in rows[-len(outputs):]:
                    if row["system"] in hf:
                        a, b = outputs[row["system"]], outputs["plain"]
                        row["agrees_with_plain_tokens"] = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y),
                                                               min(len(a), len(b)))
            done = sum(1 for r in rows if r["system"] == systems[-1])
            print(f"T={temperature:g} prompt {i + 1}/{len(prompts)}: "
                  + ", ".join(f"{r['system']} {r['tokens_per_s']:.1f}" for r in rows[-len(systems):])
                  + f"  ({done} done)", flush=True)
    return {"rows": rows, "summary": summarise(rows, systems),
            "config": {"max_new_tokens": args.max_new_tokens, "temperatures": args.temperatures,
                       "prompts": len(prompts), "tree": dataclasses.asdict(engines["msd"].tree), "dtype": args.dtype,
                       "hf_dtypes": args.hf_dtypes,
                       "draft_dtype": DRAFT_DTYPE, "backend": engines["msd"].backend,
                       "pause": dataclasses.asdict(pause) if pause else None},
            "machine": {"platform": platform.platform(), "processor": platform.processor(),
                        "threads": torch.get_num_threads(), "torch": torch.__version__,
                        "msd_cpu_isa": native.cpu_isa() if native.is_built() else None}}


def summarise(rows: list[dict], systems) -> dict:
    """Per temperature and group: tok/s of each system (time-weighted), tau, speedups. Systems named
    "transformers:DTYPE" are also summed up as "transformers", the fastest of them in that group."""
    out: dict = {}
    for temperature in sorted({r["temperature"] for r in rows}):
        for group in ("with_image", "text_only", "all"):
            sel = [r for r in rows if r["temperature"] == temperature
                   and (group == "all" or (r["image"] is not None) == (group == "with_image"))]
            if not sel:
                continue
            entry = {}
            for system in systems:
                rs = [r for r in sel if r["system"] == system]
                steps = sum(max(r["new_tokens"] - 1, 0) for r in rs)
                secs = sum(max(r["new_tokens"] - 1, 0) / r["tokens_per_s"] for r in rs if r["tokens_per_s"] > 0)
                e = {"tokens_per_s": steps / secs if secs else 0.0, "prompts": len(rs)}
                if system in SPECULATIVE:
                    fw = sum(r["verify_forwards"] for r in rs)
                    e["tau"] = sum(r["accepted_tokens"] for r in rs) / fw if fw else 0.0
                    e["paused"] = sum(r.get("plain_steps", 0) for r in rs) / steps if steps else 0.0
                entry[system] = e
            hf = [s for s in systems if s.startswith("transformers")]
            if hf:
                best = max(hf, key=lambda s: entry[s]["tokens_per_s"])
                entry["transformers"] = {**entry[best], "best_of": best}
            for system in systems:
                for base in ("plain", "transformers"):
                    if base in entry and entry[base]["tokens_per_s"] and not system.startswith(base):
                        entry[system][f"speedup_vs_{base}"] = entry[system]["tokens_per_s"] / entry[base]["tokens_per_s"]
            out[f"T={temperature:g}/{group}"] = entry
    return out


def plot(result: dict, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [k for k in result["summary"] if not k.endswith("/all")]
    systems = list(dict.fromkeys(s for g in groups for s in result["summary"][g] if s != "transformers"))
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / len(systems)
    for j, system in enumerate(systems):
        values = [result["summary"][g].get(system, {}).get("tokens_per_s", 0.0) for g in groups]
        bars = ax.bar([i + j * width for i in range(len(groups))], values, width, label=system)
        for bar, g in zip(bars, groups):
            tau = result["summary"][g].get(system, {}).get("tau")
            if tau:
                ax.annotate(f"τ{tau:.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=7)
    ax.set_xticks([i + width * (len(systems) - 1) / 2 for i in range(len(groups))], groups)
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"demo pair (SmolLM2-135M + seeded CLIP), held-out prompts, CPU, engine {result['config']['dtype']}")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)  # beside the bars, not over them
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    result = run(args)
    result["wall_s"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    png = plot(result, args.out.with_suffix(".png"))
    for key, entry in result["summary"].items():
        print(key + ": " + "; ".join(
            f"{s} {e['tokens_per_s']:.1f} tok/s" + (f" tau {e['tau']:.2f}" if "tau" in e else "")
            + (f" paused {100 * e['paused']:.0f}%" if e.get("paused") else "")
            + (f" x{e['speedup_vs_plain']:.2f} plain" if "speedup_vs_plain" in e else "")
            + (f" x{e['speedup_vs_transformers']:.2f} hf" if "speedup_vs_transformers" in e else "")
            for s, e in entry.items()))
    print(f"wrote {args.out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
