"""`msd-engine train-data | train | eval-draft`: record shards, train a draft head, measure its tau."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

TRAIN_COMMANDS = ("train-data", "train", "eval-draft")
DEVICES = ["cpu", "cuda"]
DTYPES = ["float32", "float16", "bfloat16"]
DEFAULT_MAX_LEN = 2048


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="converted target model directory")
    p.add_argument("--device", default="cpu", choices=DEVICES)
    p.add_argument("--dtype", default=None, choices=DTYPES, help="target dtype (default: the checkpoint's)")


def add_train_parsers(sub) -> None:
    p = sub.add_parser("train-data", help="record target features of conversations into training shards")
    _add_model_args(p)
    p.add_argument("--data", required=True, type=Path, help="ShareGPT- or LLaVA-style JSON")
    p.add_argument("--images", type=Path, default=None, help="image folder (default: the JSON's folder)")
    p.add_argument("--out", required=True, type=Path, help="shard directory (resumed when it has a manifest)")
    p.add_argument("--max-len", type=int, default=DEFAULT_MAX_LEN, help="skip conversations longer than this (tokens)")
    p.add_argument("--regenerate", action="store_true", help="replace answers by the target's own answers")
    p.add_argument("--max-new-tokens", type=int, default=512, help="answer length limit with --regenerate")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="with --regenerate: 0 = greedy answers, else sampled at this temperature")
    p.add_argument("--seed", type=int, default=0, help="with --temperature: the seed the answers' seeds come from")
    p.add_argument("--draft", type=Path, default=None,
                   help="with --regenerate: write the answers with speculative decoding on this converted draft "
                        "(the same answers, or the same distribution when sampling, only faster)")
    p.add_argument("--batch-size", type=int, default=0,
                   help="with --regenerate: answer this many single-turn conversations at once with transformers' "
                        "batched generate on the same weights, greedy (needs transformers; 0: one at a time "
                        "in the engine)")
    p.add_argument("--shard-size", type=int, default=256, help="records per shard")

    p = sub.add_parser("train", help="train a draft head on recorded shards, or on conversations on the fly")
    _add_model_args(p)
    p.add_argument("--data", required=True, type=Path, nargs="+",
                   help="shard directories (msd-engine train-data; their records in the order given), or one "
                        "ShareGPT/LLaVA conversations JSON file: then the target computes each batch's features "
                        "as training goes (nothing stored)")
    p.add_argument("--images", type=Path, default=None,
                   help="with a conversations JSON: image folder (default: the JSON's folder)")
    p.add_argument("--max-len", type=int, default=None,
                   help=f"with a conversations JSON: skip conversations longer than this (default {DEFAULT_MAX_LEN})")
    p.add_argument("--out", required=True, type=Path, help="run directory (checkpoints, metrics)")
    p.add_argument("--mode", default="msd", choices=["msd", "eagle"])
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--text-epochs", type=int, default=None, help="text-only epochs (default: epochs // 2)")
    p.add_argument("--ramp-epochs", type=int, default=None,
                   help="epochs ramping in visual samples (default: the rest but one)")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--warmup", type=int, default=2000, help="warmup steps")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: at the end)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--draft-vocab", type=int, default=0,
                   help="reduced draft vocabulary: the N most frequent answer tokens of the data, EOS included "
                        "(0: the whole vocabulary)")
    p.add_argument("--no-autocast", action="store_true",
                   help="train in float32 on CUDA too (default there: bf16 autocast of forward and loss)")
    p.add_argument("--init-from", type=Path, default=None,
                   help="a training checkpoint-STEP directory to start from (fresh optimizer and schedule): "
                        "fine-tune a trained draft on more data; it keeps the checkpoint's draft vocabulary")
    p.add_argument("--unroll-steps", type=int, default=1,
                   help="train the draft N steps deep, each step fed the previous step's predicted features as "
                        "drafting feeds them (training-time test; 3 steps took 3.8x a plain step on a 2-core CPU; 1: plain)")
    p.add_argument("--ce-weight", type=float, default=None,
                   help="weight of the soft cross-entropy beside the feature regression (default: the "
                        "reference's 0.1, msd_engine.train.losses.CE_WEIGHT)")

    p = sub.add_parser("eval-draft", help="acceptance length (tau) of a converted draft on prompts")
    _add_model_args(p)
    p.add_argument("--draft", required=True, type=Path, help="converted draft (msd-engine convert msd-draft)")
    p.add_argument("--prompts", required=True, type=Path, help='JSON list of {"prompt": ..., "image": optional}')
    p.add_argument("--image-dir", type=Path, default=None, help="images folder (default: the JSON's folder)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run_train_command(args: argparse.Namespace) -> int:
    return {"train-data": run_train_data, "train": run_train, "eval-draft": run_eval_draft}[args.command](args)


def _positive(**values: int) -> None:
    for name, v in values.items():
        if v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")


def _dataset_source(path: Path, images) -> dict:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return {"data": path.name, "sha256": digest, "images": None if images is None else str(images)}


def run_train_data(args: argparse.Namespace) -> int:
    from msd_engine.engine import Engine
    from msd_engine.train.data import build_shards, read_conversations

    _positive(max_len=args.max_len, shard_size=args.shard_size, max_new_tokens=args.max_new_tokens)
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
    if not args.regenerate and (args.temperature or args.draft is not None or args.batch_size):
        raise ValueError("--temperature, --draft and --batch-size choose how the target writes answers: "
                         "they need --regenerate")
    if args.batch_size < 0:
        raise ValueError(f"--batch-size must be >= 0 (0: one conversation at a time), got {args.batch_size}")
    if args.batch_size and (args.temperature or args.draft is not None or args.device != "cpu"):
        raise ValueError("--batch-size records greedy answers with transformers on the CPU: "
                         "it takes no --temperature, --draft or --device")
    conversations, skips = read_conversations(args.data, args.images)
    engine = Engine.load(args.model, device=args.device, dtype=args.dtype, max_seq_len=args.max_len,
                         draft=args.draft)
    source = _dataset_source(args.data, args.images)
    if args.regenerate:
        source.update(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    if args.batch_size:
        writer = _record_batched(args, engine, conversations, source)
    else:
        writer = build_shards(engine, conversations, args.out, max_len=args.max_len,
                              records_per_shard=args.shard_size, regenerate=args.regenerate,
                              max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                              source=source, progress=True)
    records = sum(s["records"] for s in writer.shards)
    counts = {k: v + getattr(writer.skips, k) for k, v in skips.to_dict().items()}
    print(f"{records} records in {len(writer.shards)} shard(s) at {args.out}")
    print("skipped: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + f" (total {sum(counts.values())})")
    return 0


def _record_batched(args: argparse.Namespace, engine, conversations, source: dict):
    from msd_engine.train.batched import load_hf_target, record_batched
    from msd_engine.train.data import ShardWriter

    source = {**source, "batched": True}  # a resume must not mix batched and batch-1 answers
    writer = ShardWriter(args.out, args.shard_size, source)
    return record_batched(engine, load_hf_target(args.model, engine.model.text.embed_tokens.dtype), conversations, writer, max_len=args.max_len,
                          max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, progress=True)


def run_train(args: argparse.Namespace) -> int:
    """Under torchrun (WORLD_SIZE > 1) every rank runs this; rank 0 alone writes and prints."""
    from msd_engine.train import distributed
    from msd_engine.train.curriculum import Curriculum

    _positive(epochs=args.epochs, batch_size=args.batch_size)
    if args.draft_vocab < 0:
        raise ValueError(f"--draft-vocab must be >= 0 (0: the whole vocabulary), got {args.draft_vocab}")
    text = args.text_epochs if args.text_epochs is not None else args.epochs // 2
    ramp = args.ramp_epochs if args.ramp_epochs is not None else max(0, args.epochs - text - 1)
    curriculum = Curriculum(text, ramp, args.epochs)  # validates the epoch split
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    env = distributed.init_from_env() if launched else distributed.current()
    try:
        return _run_train(args, curriculum, env)
    finally:
        if launched:
            distributed.shutdown()


def _run_train(args: argparse.Namespace, curriculum, env) -> int:
    from msd_engine.draft.init import draft_config_for
    from msd_engine.train.plot import plot_metrics
    from msd_engine.train.trainer import METRICS_FILE, checkpoint_draft_vocab, train_draft
    from msd_engine.train.vocab import frequent_tokens

    if args.init_from is not None and args.draft_vocab:
        raise ValueError("--draft-vocab with --init-from: a fine-tuned draft keeps its checkpoint's vocabulary")
    engine, source, what = _training_source(args, env)
    draft_vocab = None
    if args.init_from is not None:
        draft_vocab = checkpoint_draft_vocab(args.init_from)
    elif args.draft_vocab:
        draft_vocab = frequent_tokens(source.token_records(), args.draft_vocab, always=engine.config.eos_token_ids,
                                      vocab_size=engine.config.text.vocab_size)
    config = draft_config_for(engine.config, args.mode,
                              draft_vocab_size=0 if draft_vocab is None else int(draft_vocab.numel()))
    text_model = engine.model.text
    result = train_draft(source, text_model.lm_head, text_model.embed_tokens, config, args.out, epochs=args.epochs,
                         lr=args.lr, warmup_steps=args.warmup, batch_size=args.batch_size, curriculum=curriculum,
                         save_every=args.save_every, seed=args.seed, resume=args.resume, draft_vocab=draft_vocab,
                         autocast=False if args.no_autocast else None, init_from=args.init_from,
                         unroll_steps=args.unroll_steps,
                         **({} if args.ce_weight is None else {"ce_weight": args.ce_weight}))
    if not env.is_main():
        return 0
    metrics = Path(args.out) / METRICS_FILE
    png = plot_metrics(metrics, metrics.with_suffix(".png"))
    print(f"{what}, {result.step} steps; metrics {metrics}, plot {png}")
    print(f"final checkpoint: {result.checkpoint} (msd-engine convert msd-draft {result.checkpoint} DST "
          f"--mode {args.mode})")
    return 0


def _training_source(args: argparse.Namespace, env):
    """(target engine, RecordSource, a one-line description): shards in memory, or a conversations
    JSON whose records the target builds on the fly (each rank only its own)."""
    from msd_engine.engine import Engine
    from msd_engine.train.data import read_conversations, read_shards
    from msd_engine.train.source import ConversationSource, RecordList

    for path in args.data:
        if not path.exists():
            raise FileNotFoundError(f"{path}: not found (give shard directories or one conversations JSON)")
    device = args.device
    if env.device.type == "cuda":  # NCCL: one GPU per rank
        if args.device != "cuda":
            raise ValueError(f"--device {args.device} under an NCCL launch; use --device cuda")
        device = env.device
    if all(path.is_dir() for path in args.data):
        if args.images is not None or args.max_len is not None:
            raise ValueError("--images and --max-len apply to a conversations JSON (on-the-fly training), "
                             f"not to shard directories ({', '.join(map(str, args.data))})")
        engine = Engine.load(args.model, device=device, dtype=args.dtype, max_seq_len=16)  # head and embedding only
        records = [r for d in args.data for r in read_shards(d, hidden_size=engine.config.text.hidden_size)]
        return engine, RecordList(records), f"{len(records)} records"
    if len(args.data) > 1:
        raise ValueError(f"--data takes shard directories or one conversations JSON, got {len(args.data)} paths "
                         f"that are not all directories: {', '.join(map(str, args.data))}")
    max_len = args.max_len if args.max_len is not None else DEFAULT_MAX_LEN
    _positive(max_len=max_len)
    conversations, skips = read_conversations(args.data[0], args.images)
    engine = Engine.load(args.model, device=device, dtype=args.dtype, max_seq_len=max_len)
    source = ConversationSource(engine, conversations, max_len, skips)
    counts = source.skips.to_dict()
    what = (f"{len(source)} conversations on the fly (skipped: "
            + ", ".join(f"{k} {v}" for k, v in counts.items()) + f", total {sum(counts.values())})")
    return engine, source, what


def read_prompts(path: Path, image_dir) -> list[tuple[str, Path | None]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: prompts file not found")
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(items, list) or not items:
        raise ValueError(f"{path}: expected a non-empty JSON list of {{\"prompt\": ..., \"image\": ...}}")
    root = Path(image_dir) if image_dir is not None else path.parent
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
            raise ValueError(f"{path}: item {i} has no string 'prompt'")
        image = item.get("image")
        if image is not None and not (root / image).is_file():
            raise FileNotFoundError(f"{root / image}: image of prompt {i} not found")
        out.append((item["prompt"], None if image is None else root / image))
    return out


def _summary(stats: list[dict]) -> dict:
    hist: dict[int, int] = {}
    for s in stats:
        for k, v in s["accepted_histogram"].items():
            hist[int(k)] = hist.get(int(k), 0) + v
    forwards = sum(hist.values())
    return {"prompts": len(stats), "verify_forwards": forwards,
            "tau": sum(k * v for k, v in hist.items()) / forwards if forwards else 0.0,
            "tau_per_prompt_mean": sum(s["tau"] for s in stats) / len(stats) if stats else 0.0,
            "accepted_histogram": {str(k): hist[k] for k in sorted(hist)}}


def tau_report(engine, prompts, max_new_tokens: int) -> dict[str, dict]:
    """Greedy speculative decoding over [(prompt, image or None)] on an engine with a draft ->
    {"with_image": summary, "text_only": summary} (tau over all verify forwards of the group)."""
    groups: dict[str, list[dict]] = {"with_image": [], "text_only": []}
    for prompt, image in prompts:
        result = engine.generate(prompt, image=image, max_new_tokens=max_new_tokens, speculative=True)
        groups["with_image" if image is not None else "text_only"].append(result.stats)
    return {name: _summary(stats) for name, stats in groups.items()}


def run_eval_draft(args: argparse.Namespace) -> int:
    from msd_engine.engine import Engine

    _positive(max_new_tokens=args.max_new_tokens)
    prompts = read_prompts(args.prompts, args.image_dir)
    engine = Engine.load(args.model, device=args.device, dtype=args.dtype, draft=args.draft)
    report = tau_report(engine, prompts, args.max_new_tokens)
    if args.json:
        print(json.dumps(report))
        return 0
    for name, r in report.items():
        if not r["prompts"]:
            print(f"{name}: no prompts")
            continue
        hist = " ".join(f"{k}:{v}" for k, v in r["accepted_histogram"].items())
        print(f"{name}: {r['prompts']} prompts, tau {r['tau']:.3f} (per-prompt mean {r['tau_per_prompt_mean']:.3f}), "
              f"accepted per forward [{hist}]")
    return 0
