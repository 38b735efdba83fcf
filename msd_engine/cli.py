"""`msd-engine`: convert checkpoints and generate from the command line."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from msd_engine.convert.cli import add_convert_parser, run_convert


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
    p.add_argument("--backend", default="torch", choices=["torch", "triton", "cuda"])
    p.add_argument("--max-seq-len", type=int, default=None)
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print one JSON object with text, ids, reason, stats")
    out.add_argument("--stream", action="store_true", help="print text as it is generated")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="msd-engine", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    add_convert_parser(sub)
    _add_generate_parser(sub)
    return parser


def run_generate(args: argparse.Namespace) -> int:
    from msd_engine.engine import Engine

    engine = Engine.load(args.model, device=args.device, dtype=args.dtype, max_seq_len=args.max_seq_len,
                         backend=args.backend)
    kwargs = dict(image=args.image or None, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                  top_p=args.top_p, seed=args.seed)
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
        print(f"[{s['new_tokens']} tokens, {result.finish_reason}; prefill {s['prefill_ms']:.1f} ms, "
              f"decode {s['decode_tokens_per_s']:.1f} tok/s]", file=sys.stderr)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "convert":
            return run_convert(args)
        return run_generate(args)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
