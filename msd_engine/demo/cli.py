"""`msd-engine demo` (the main job: prepare, then stream an MSD generation and measure it) and
`msd-engine demo-recipe` (rebuild the shipped demo drafts)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

DEMO_COMMANDS = ("demo", "demo-recipe")

ABOUT = ("Demo target: SmolLM2-135M-Instruct (real weights) as the language model of a LLaVA-architecture model "
         "whose small CLIP tower and projector are UNTRAINED (seeded): it sees that an image is there, not what it "
         "shows, so its answers about pictures are made up. What the demo shows is speed: the MSD draft "
         "proposes token trees, the target verifies them, and the text is exactly what plain decoding gives.")


def add_demo_parsers(sub) -> None:
    from msd_engine.demo.assets import SAMPLE

    p = sub.add_parser("demo", help="the demo: SmolLM2 + a vision tower with a trained MSD draft, measured")
    p.add_argument("--prompt", default=SAMPLE["prompt"])
    p.add_argument("--image", default=None,
                   help=f"image file (default: scikit-image's {SAMPLE['image']!r} photograph; 'none': text only)")
    p.add_argument("--draft", default="msd", choices=["msd", "eagle"], help="which shipped draft to use")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="the target's precision (the draft runs in bfloat16 either way)")
    p.add_argument("--no-compare", action="store_true", help="skip the plain-decoding run for the speedup")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")

    p = sub.add_parser("demo-recipe", help="rebuild the demo drafts: target answers, features, training, eval")
    p.add_argument("--work", type=Path, default=None, help="working directory (default: the demo cache)")
    p.add_argument("--modes", nargs="+", default=["msd", "eagle"], choices=["msd", "eagle"])
    p.add_argument("--no-ship", action="store_true", help="do not overwrite the drafts in the package")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--extra-epochs", type=int, default=None, help="epochs of the resumed second stage (0: none)")
    p.add_argument("--finetune-epochs", type=int, default=None,
                   help="epochs of the third stage, a fine-tune over all three prompt sets (0: none)")
    p.add_argument("--unroll-epochs", type=int, default=None,
                   help="epochs of the fourth stage, trained 3 draft steps deep (0: none)")
    p.add_argument("--unroll-extra-epochs", type=int, default=None,
                   help="epochs the fourth stage's schedule is then stretched by (0: none)")
    p.add_argument("--self-prompts", type=int, default=None,
                   help="instructions the target writes itself for the fifth stage (0: no fifth stage)")
    p.add_argument("--self-epochs", type=int, default=None, help="epochs of the fifth stage")
    p.add_argument("--ce-weights", type=float, nargs="*", default=None, metavar="W",
                   help="the sixth stage: one epoch over the fifth's data per weight, the soft cross-entropy "
                        "weighted W (none given: no sixth stage)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="answer length of the target's answers")


RECIPE_OVERRIDES = ("epochs", "extra_epochs", "finetune_epochs", "unroll_epochs", "unroll_extra_epochs",
                    "self_prompts", "self_epochs", "ce_weights", "max_new_tokens")


def run_demo_command(args: argparse.Namespace) -> int:
    return run_demo(args) if args.command == "demo" else run_recipe_command(args)


def run_recipe_command(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from msd_engine.demo.assets import SHIPPED_DRAFTS
    from msd_engine.demo.recipe import Recipe, run_recipe

    recipe = replace(Recipe(), **{k: getattr(args, k) for k in RECIPE_OVERRIDES if getattr(args, k) is not None})
    run_recipe(args.work, recipe, args.modes, None if args.no_ship else SHIPPED_DRAFTS)
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from msd_engine.demo.assets import DRAFT_DTYPE, SAMPLE, demo_home, export_photo, prepare
    from msd_engine.demo.tuning import ensure_tuned_tree
    from msd_engine.engine import Engine

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    quiet = args.json
    if not quiet:
        print(ABOUT + "\n", flush=True)
    target, draft = prepare(args.draft, progress=not quiet)
    ensure_tuned_tree(target, draft, dtype=args.dtype, progress=not quiet)  # else a CPU would verify the GPU's 60-node tree
    if args.image is None:
        image = export_photo(SAMPLE["image"], demo_home() / "images")
    elif args.image.lower() == "none":
        image = None
    else:
        image = Path(args.image)
    engine = Engine.load(target, dtype=args.dtype, max_seq_len=2048, draft=draft, draft_dtype=DRAFT_DTYPE)
    kwargs = dict(image=image, max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    if quiet:
        spec = engine.generate(args.prompt, speculative=True, **kwargs)
    else:
        print(f"prompt: {args.prompt}" + (f"  [image: {image}]" if image else ""))
        print(f"--- {args.draft} speculative decoding (tree {engine.tree.total_tokens} nodes) ---", flush=True)
        stream = engine.stream(args.prompt, speculative=True, **kwargs)
        for piece in stream:
            print(piece, end="", flush=True)
        print()
        spec = stream.result
    report = {"draft": args.draft, "text": spec.text, "spec": spec.stats}
    if not args.no_compare:
        if not quiet:
            print("--- plain decoding, same prompt, for the speedup ---", flush=True)
        plain = engine.generate(args.prompt, speculative=False, **kwargs)
        report["plain"] = plain.stats
        report["speedup"] = spec.stats["decode_tokens_per_s"] / max(plain.stats["decode_tokens_per_s"], 1e-9)
        report["same_text"] = plain.text == spec.text
    if quiet:
        print(json.dumps(report))
        return 0
    s = spec.stats
    print(f"{args.draft}: {s['new_tokens']} tokens, {s['decode_tokens_per_s']:.1f} tok/s, tau {s['tau']:.2f} "
          f"(draft {s['draft_ms']:.0f} ms, verify {s['verify_ms']:.0f} ms"
          + (f"; {s['plain_steps']} plain steps while rounds did not pay" if s["plain_steps"] else "") + ")")
    if "plain" in report:
        p = report["plain"]
        same = "identical" if report["same_text"] else "different (sampling draws differ)"
        print(f"plain: {p['new_tokens']} tokens, {p['decode_tokens_per_s']:.1f} tok/s; "
              f"speedup {report['speedup']:.2f}x; text {same}")
    return 0

