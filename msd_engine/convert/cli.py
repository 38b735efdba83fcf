"""`msd-engine convert {llava-hf,llava,gguf} ...`: argument parsing and the one-line summary."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from msd_engine.config import DTYPES, ModelConfig
from msd_engine.convert.common import ConversionError
from msd_engine.convert.gguf_llama import convert_gguf
from msd_engine.convert.llava_hf import convert_llava_hf
from msd_engine.convert.llava_orig import convert_llava_original
from msd_engine.convert.msd_draft import convert_msd_draft
from msd_engine.draft.config import DRAFT_MODES
from msd_engine.weights import WEIGHTS_FILE, expected_shapes


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=DTYPES, default="float16",
                        help="dtype of the written weights (default float16)")
    parser.add_argument("--force", action="store_true", help="replace DST if it exists and is not empty")
    parser.add_argument("--no-progress", action="store_true", help="do not show a progress bar")


def add_convert_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `convert` with one sub-command per source format to a top-level subparsers object."""
    parser = subparsers.add_parser(
        "convert", help="convert a checkpoint to the msd-engine format (offline)",
        description="Convert a checkpoint into an msd-engine model directory (config.json, model.safetensors, "
                    "tokenizer.json). DST is written atomically.")
    formats = parser.add_subparsers(dest="convert_format", metavar="FORMAT", required=True)
    hf = formats.add_parser("llava-hf", help="a llava-hf LlavaForConditionalGeneration directory",
                            description="Convert a llava-hf (LlavaForConditionalGeneration) directory.")
    hf.add_argument("src", type=Path, metavar="SRC", help="llava-hf model directory")
    hf.add_argument("dst", type=Path, metavar="DST", help="output directory")
    orig = formats.add_parser("llava", help="an original LLaVA release (LlavaLlamaForCausalLM) + CLIP directory",
                              description="Convert an original LLaVA-1.5 release with its CLIP vision tower.")
    orig.add_argument("src", type=Path, metavar="SRC", help="original LLaVA model directory")
    orig.add_argument("--clip", type=Path, required=True, metavar="CLIP_DIR",
                      help="clip-vit-large-patch14-336 directory (config.json + weights)")
    orig.add_argument("dst", type=Path, metavar="DST", help="output directory")
    gguf = formats.add_parser("gguf", help="a Llama-architecture GGUF file (text only)",
                              description="Convert a Llama-architecture GGUF file (dequantised) to a text-only model.")
    gguf.add_argument("src", type=Path, metavar="SRC.gguf", help="GGUF file")
    gguf.add_argument("dst", type=Path, metavar="DST", help="output directory")
    draft = formats.add_parser("msd-draft", help="a released MSD / EAGLE draft head checkpoint",
                               description="Convert a released MSD/EAGLE one-layer draft head (config.json + "
                                           "model.safetensors or pytorch_model.bin).")
    draft.add_argument("src", type=Path, metavar="SRC", help="draft checkpoint directory")
    draft.add_argument("dst", type=Path, metavar="DST", help="output directory")
    draft.add_argument("--mode", choices=DRAFT_MODES, default="msd",
                       help="msd: image positions bypass fc (decoupled); eagle: they go through fc")
    for sub in (hf, orig, gguf, draft):
        _add_common(sub)
    return parser


def _summary(args: argparse.Namespace, config: ModelConfig) -> str:
    text = config.text
    kind = "LLaVA" if config.has_vision else "text-only"
    vision = f", vision {config.vision.num_layers} layers" if config.vision is not None else ""
    size_gb = (Path(args.dst) / WEIGHTS_FILE).stat().st_size / 1e9
    return (f"converted {args.convert_format} {args.src} -> {args.dst}: {kind}, text {text.num_layers} layers "
            f"x {text.hidden_size}{vision}, {len(expected_shapes(config))} tensors, {config.dtype}, {size_gb:.2f} GB")


def run_convert(args: argparse.Namespace) -> int:
    """Run the conversion `args` describes; 0 on success, 2 (with `error: ...` on stderr) on failure."""
    progress = not args.no_progress
    try:
        if args.convert_format == "llava-hf":
            config = convert_llava_hf(args.src, args.dst, args.dtype, args.force, progress)
        elif args.convert_format == "llava":
            config = convert_llava_original(args.src, args.clip, args.dst, args.dtype, args.force, progress)
        elif args.convert_format == "gguf":
            config = convert_gguf(args.src, args.dst, args.dtype, args.force, progress)
        elif args.convert_format == "msd-draft":
            draft = convert_msd_draft(args.src, args.dst, args.mode, args.dtype, args.force, progress)
            print(f"converted msd-draft {args.src} -> {args.dst}: {draft.mode} draft, hidden {draft.hidden_size}, "
                  f"vocab {draft.vocab_size}, {draft.dtype}")
            return 0
        else:
            raise ValueError(f"unknown convert format {args.convert_format!r}")
    except (ConversionError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(_summary(args, config))
    return 0
