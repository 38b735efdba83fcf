"""`msd-engine`: convert checkpoints and generate from the command line."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from msd_engine.convert.cli import add_convert_parser, run_convert
from msd_engine.demo.cli import DEMO_COMMANDS, add_demo_parsers, run_demo_command
from msd_engine.train.cli import TRAIN_COMMANDS, add_train_parsers, run_train_command


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, non-zero exit, as for every other bad input
        self.exit(2, f"error: {message}\n")


def _add_generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text for a prompt (and image) with a converted model")
    p.add_argument("--model", required=True, help="converted model directory (msd-engine convert ...)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--image", action="append", default=[], help="image file; repeat for several images")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="compute dtype (default: the converted checkpoint's)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "cuda", "cpu"],
                   help="op backend (auto: C++ kernels on a CPU, torch on a GPU)")
    p.add_argument("--max-seq-len", type=int, default=None)
    p.add_argument("--draft", default=None, help="converted draft head (msd-engine convert msd-draft) for MSD")
    p.add_argument("--no-spec", action="store_true", help="plain decoding even when --draft is given")
    p.add_argument("--draft-dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="the draft head's precision (default: the target's)")
    _add_tree_args(p)
    p.add_argument("--pause-below", type=_pause_below, default="auto", metavar="COST|auto|never",
                   help="a round's cost in plain steps, under which speculation takes plain steps (default "
                        "auto: the cost `tune --draft` measured for the tree; never: speculate every step)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print one JSON object with text, ids, reason, stats")
    out.add_argument("--stream", action="store_true", help="print text as it is generated")


def _add_tree_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--top-k", type=int, default=None, help="tree: children per frontier node (default 10)")
    p.add_argument("--depth", type=int, default=None, help="tree: expansion steps (default 5)")
    p.add_argument("--total-tokens", type=int, default=None,
                   help="tree: nodes incl. the root (default: tuned for this device, else 60)")


def _pause_below(text: str):
    """'auto', None for 'never', or the number; `PausePolicy` checks its range when the engine loads."""
    if text in ("auto", "never"):
        return None if text == "never" else text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, 'auto' or 'never', got {text!r}") from None


def _tree_from_args(args: argparse.Namespace):
    from msd_engine.spec.tree import TreeParams

    if args.top_k is None and args.depth is None and args.total_tokens is None:
        return None  # the engine's default: tuned for the device when a tuning exists
    base = TreeParams()
    return TreeParams(top_k=args.top_k or base.top_k, depth=args.depth or base.depth,
                      total_tokens=args.total_tokens or base.total_tokens)


def _add_tune_parser(sub) -> None:
    p = sub.add_parser("tune", help="pick the speculative tree size for this device and model (cached)")
    p.add_argument("--model", required=True)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "cuda", "cpu"])
    p.add_argument("--draft", default=None, help="measure whole tree shapes with this draft (needs --prompts)")
    p.add_argument("--draft-dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="the draft head's precision (default: the target's); tuned trees are cached per precision")
    p.add_argument("--prompts", default=None, help='JSON list of {"prompt": ..., "image": optional path}')
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens per prompt when measuring")


def run_tune(args: argparse.Namespace) -> int:
    from msd_engine.engine import Engine
    from msd_engine.spec.tune import candidates_for, save_tuned, tune_total_tokens

    if (args.draft is None) != (args.prompts is None):
        raise ValueError("--draft and --prompts go together (measured tuning of the whole tree)")
    if args.draft is None and args.draft_dtype:
        raise ValueError("--draft-dtype only makes sense with --draft")
    if args.draft is not None:
        return _run_measured_tune(args)
    engine = Engine.load(args.model, device=args.device, dtype=args.dtype, backend=args.backend)
    best, timings = tune_total_tokens(engine.model, engine.cache, engine.device)
    gains = candidates_for(engine.device)
    for t, ms in timings.items():
        print(f"T={t:3d}: verify {ms:8.2f} ms, / gain {gains[t]:.2f} = {ms / gains[t]:8.2f}{'  <- best' if t == best else ''}")
    dtype = engine.model.text.embed_tokens.dtype
    path = save_tuned(engine.device, engine.config, dtype, best, timings)
    print(f"total_tokens = {best} for this device and model (cached in {path})")
    return 0


def _run_measured_tune(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from msd_engine.engine import Engine
    from msd_engine.spec.tune import draft_key, save_tree_tuning, scratch_tree, trees_for, tune_tree
    from msd_engine.train.cli import read_prompts

    prompts = read_prompts(Path(args.prompts), None)
    trees = trees_for(torch.device(args.device))
    engine = Engine.load(args.model, device=args.device, dtype=args.dtype, backend=args.backend, draft=args.draft,
                         tree=scratch_tree(trees), draft_dtype=args.draft_dtype)
    tuning = tune_tree(engine, prompts, trees, args.max_new_tokens)
    best = tuning.best
    print(f"plain decoding: {tuning.plain_tokens_per_s:7.1f} tok/s")
    for tree, rate in tuning.rates.items():
        cost = tuning.round_costs.get(tree)
        print(f"top_k {tree.top_k:2d} depth {tree.depth} total {tree.total_tokens:3d}: {rate:7.1f} tok/s"
              + (f", a round costs {cost:.2f} plain steps" if cost else "")
              + ("  <- best" if tree == best else ""))
    dtype = engine.model.text.embed_tokens.dtype
    key = draft_key(Path(args.draft), engine.drafter.model.fc_weight.dtype, dtype)
    path = save_tree_tuning(engine.device, engine.config, dtype, tuning, draft=key)
    print(f"tree top_k={best.top_k} depth={best.depth} total_tokens={best.total_tokens} for this device, model and "
          f"draft (cached in {path})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="msd-engine", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    add_convert_parser(sub)
    _add_generate_parser(sub)
    _add_tune_parser(sub)
    add_train_parsers(sub)
    add_demo_parsers(sub)
    return parser


def run_generate(args: argparse.Namespace) -> int:
    from msd_engine.engine import Engine

    if args.draft is None and (args.no_spec or args.draft_dtype):
        raise ValueError(f"{'--no-spec' if args.no_spec else '--draft-dtype'} only makes sense with --draft")
    engine = Engine.load(args.model, device=args.device, dtype=args.dtype, max_seq_len=args.max_seq_len,
                         backend=args.backend, draft=args.draft, tree=_tree_from_args(args),
                         draft_dtype=args.draft_dtype, pause_below=args.pause_below)
    kwargs = dict(image=args.image or None, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                  top_p=args.top_p, seed=args.seed, speculative=False if args.no_spec else None)
    if args.stream:
        for piece in engine.stream(args.prompt, **kwargs):
            print(piece, end="", flush=True)
        print()
        return 0
    result = engine.generate(args.prompt, **kwargs)
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(result.text)
        s = result.stats
        spec = f", tau {s['tau']:.2f}" if "tau" in s else ""
        spec += f", {s['plain_steps']} paused steps" if s.get("plain_steps") else ""
        print(f"[{s['new_tokens']} tokens, {result.finish_reason}; prefill {s['prefill_ms']:.1f} ms, "
              f"decode {s['decode_tokens_per_s']:.1f} tok/s{spec}]", file=sys.stderr)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "convert":
            return run_convert(args)
        if args.command == "tune":
            return run_tune(args)
        if args.command in TRAIN_COMMANDS:
            return run_train_command(args)
        if args.command in DEMO_COMMANDS:
            return run_demo_command(args)
        return run_generate(args)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
