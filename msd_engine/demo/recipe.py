"""`msd-engine demo-recipe`: how the shipped demo drafts are made, in one resumable command.

1. build the demo target (SmolLM2 + seeded vision tower, `target.py`);
2. write the project's training instructions as LLaVA-style conversations, with scikit-image
   photographs for the image prompts: the hand-written set (`data/train_prompts.json`) and a mix
   composed from templates and word lists (`prompt_mix.py`);
3. `train-data --regenerate --batch-size`: the target answers every instruction greedily, many at a
   time (transformers' batched generate on the same weights, `train/batched.py`), and its features
   over each conversation are recorded into shards (resumed where a previous run stopped);
4. pick the draft vocabulary (the most frequent answer tokens, EOS always in) and train an `msd`
   and an `eagle` draft with the project's trainer and curriculum (resumed from checkpoints) on the
   hand-written set and the first mix, then fine-tune both on all three sets (the second mix,
   `prompt_mix_wide.py`, came after: held-out tau showed the drafts generalising short of their
   training prompts);
5. stage 5: the target writes instructions itself (`prompt_self.py`), answers them and a replay
   sample of the earlier ones, and both drafts are trained on those from their last weights;
   stage 6: passes over that data again, one epoch each, the soft cross-entropy weighted more;
6. convert both, pack them into `msd_engine/demo/drafts/` and report tau on the held-out prompts.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Optional, Sequence

import torch

from msd_engine.demo.assets import (DRAFT_DTYPE, HELDOUT_PROMPTS, PHOTOS, SHIPPED_DRAFTS, TRAIN_PROMPTS, demo_home,
                                    export_photo, load_prompts, pack_draft)
from msd_engine.demo.prompt_mix import composed_prompts
from msd_engine.demo.prompt_mix_wide import wide_prompts
from msd_engine.demo.prompt_self import hf_sampler, replay_sample, self_written_prompts
from msd_engine.demo.target import ensure_target
from msd_engine.train.losses import check_ce_weight


@dataclass(frozen=True)
class Recipe:
    max_new_tokens: int = 128   # answer length the target writes for each instruction
    record_batch: int = 128     # instructions answered at once while recording
    composed_prompts: int = 2200  # instructions of the composed mix, on top of the hand-written ones
    wide_prompts: int = 2780    # instructions of the second composed mix (`prompt_mix_wide.py`)
    max_len: int = 1024         # tokens per conversation (prompt + image + answer)
    draft_vocab: int = 8192     # reduced draft vocabulary (0: the whole 49k)
    epochs: int = 8
    text_epochs: int = 3        # curriculum stage 1 (text only)
    ramp_epochs: int = 4        # stage 2: visual share rising linearly to 1, then 1 epoch of everything
    extra_epochs: int = 6       # then resumed with the schedule stretched to epochs + extra_epochs (0: none)
    finetune_epochs: int = 4    # then from those weights, a new schedule over all three sets (0: none)
    finetune_lr: float = 2e-4
    unroll_epochs: int = 1      # then from those weights, trained 3 draft steps deep (0: none)
    unroll_extra_epochs: int = 1  # that run resumed with its schedule stretched by so many epochs (0: none)
    unroll_steps: int = 3
    unroll_lr: float = 1e-4
    self_prompts: int = 3000    # stage 5: instructions the target writes itself (`prompt_self.py`; 0: no stage 5)
    replay_prompts: int = 1000  # ... recorded beside a sample of so many earlier prompts
    self_epochs: int = 1        # ... from stage 4's weights, trained as stage 4 (unrolled) over both
    self_lr: float = 1e-4
    # stage 6: from stage 5's weights, one epoch over its data per weight here, each pass from the last
    # one's weights, the soft cross-entropy weighted so (the reference's 0.1 before; (): no stage 6)
    ce_weights: tuple[float, ...] = (0.5, 1.0, 1.0)
    lr: float = 3e-4
    warmup: int = 60
    batch_size: int = 8
    seed: int = 0
    eval_max_new_tokens: int = 96

    def __post_init__(self) -> None:
        # Checked here, not hours later when stage 6 starts; stored as a tuple (the CLI gives a list).
        if isinstance(self.ce_weights, (str, bytes)) or not hasattr(self.ce_weights, "__iter__"):
            raise ValueError(f"Recipe.ce_weights must be a sequence of weights, got {self.ce_weights!r}")
        object.__setattr__(self, "ce_weights", tuple(check_ce_weight(w, f"Recipe.ce_weights[{i}]")
                                                     for i, w in enumerate(self.ce_weights)))


def write_conversations(prompts: Sequence[dict], images_dir: Path, path: Path) -> Path:
    """LLaVA-style conversations (the answer is a placeholder: --regenerate replaces it)."""
    items = []
    for i, p in enumerate(prompts):
        item: dict = {"id": f"demo-{i:04d}",
                      "conversations": [{"from": "human", "value": p["prompt"]}, {"from": "gpt", "value": "-"}]}
        if p.get("image"):
            item["image"] = export_photo(p["image"], images_dir).name
            item["conversations"][0]["value"] = "<image>\n" + p["prompt"]
        items.append(item)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(items, indent=1) + "\n", encoding="utf-8")
    return path


def training_prompt_sets(recipe: "Recipe") -> dict[str, list[dict]]:
    """The instructions the drafts learn from: the hand-written set, the composed mix (`prompt_mix.py`)
    and the second mix (`prompt_mix_wide.py`); a mix never repeats an earlier set's or a held-out prompt."""
    written = load_prompts(TRAIN_PROMPTS)
    exclude = [p["prompt"] for p in written + load_prompts(HELDOUT_PROMPTS)]
    composed = composed_prompts(recipe.composed_prompts, exclude, PHOTOS, seed=recipe.seed)
    wide = wide_prompts(recipe.wide_prompts, exclude + [p["prompt"] for p in composed], PHOTOS,
                        image_share=0.19, seed=recipe.seed)
    return {"written": written, "composed": composed, "wide": wide}


def later_prompt_sets(target_dir: Path, work: Path, recipe: "Recipe", earlier: dict[str, list[dict]],
                      progress: bool) -> dict[str, list[dict]]:
    """Stage 5's instructions: `recipe.self_prompts` the target writes (`prompt_self.py`; kept in
    work/self-prompts.json, so a resumed recipe does not sample them again) and a seeded replay sample of
    `recipe.replay_prompts` from the earlier sets."""
    path = work / "self-prompts.json"
    if path.is_file():
        written = json.loads(path.read_text(encoding="utf-8"))
        if len(written) != recipe.self_prompts:
            raise ValueError(f"{path} holds {len(written)} target-written prompts, the recipe asks for "
                             f"{recipe.self_prompts}: give a new --work (its answers and runs came from that set)")
    else:
        from msd_engine.engine import Engine
        from msd_engine.train.batched import load_hf_target

        engine = Engine.load(target_dir, dtype="float32", max_seq_len=16)
        sample = hf_sampler(load_hf_target(target_dir, torch.float32), engine.tokenizer, engine.config.eos_token_ids)
        examples = [p["prompt"] for p in earlier["written"] if not p.get("image")]
        exclude = [p["prompt"] for s in earlier.values() for p in s] + [p["prompt"] for p in load_prompts(HELDOUT_PROMPTS)]
        written = self_written_prompts(sample, recipe.self_prompts, examples, exclude, seed=recipe.seed,
                                       batch_size=recipe.record_batch, progress=progress)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(written, indent=1) + "\n", encoding="utf-8")
        tmp.replace(path)
    return {"self": written, "replay": replay_sample(list(earlier.values()), recipe.replay_prompts, recipe.seed)}


def record_answers(target_dir: Path, work: Path, name: str, prompts: Sequence[dict], recipe: Recipe,
                   progress: bool) -> Path:
    """The target's greedy answers to `prompts` and its features over them, as shards in work/shards-<name>."""
    from msd_engine.engine import Engine
    from msd_engine.train.batched import load_hf_target, record_batched
    from msd_engine.train.data import ShardWriter, read_conversations

    images = work / "images"
    conv_path = write_conversations(prompts, images, work / f"{name}.json")
    conversations, skips = read_conversations(conv_path, images)
    if skips.total:
        raise RuntimeError(f"{conv_path}: {skips.to_dict()} conversations unusable; the prompt set is broken")
    engine = Engine.load(target_dir, dtype="float32", max_seq_len=recipe.max_len)
    shards = work / f"shards-{name}"
    source = {"data": name, "prompts": len(prompts), "max_new_tokens": recipe.max_new_tokens, "batched": True}
    writer = record_batched(engine, load_hf_target(target_dir, torch.float32), conversations,
                            ShardWriter(shards, recipe.record_batch, source), max_len=recipe.max_len,
                            max_new_tokens=recipe.max_new_tokens, batch_size=recipe.record_batch, progress=progress)
    print(f"{name}: recorded {sum(s['records'] for s in writer.shards)} conversations; skipped {writer.skips.to_dict()}")
    return shards


def train_drafts(target_dir: Path, shards: Sequence[Path], work: Path, recipe: Recipe, modes: Sequence[str],
                 ship_to: Optional[Path], progress: bool, added: Sequence[Path] = (),
                 later: Sequence[Path] = ()) -> dict[str, Path]:
    """Train on `shards` (the draft vocabulary is theirs), then fine-tune on `shards` + `added`,
    then (stage 5) on `later` alone."""
    from msd_engine.convert.msd_draft import convert_msd_draft
    from msd_engine.draft.init import draft_config_for
    from msd_engine.engine import Engine
    from msd_engine.train.curriculum import Curriculum
    from msd_engine.train.data import read_shards
    from msd_engine.train.trainer import train_draft
    from msd_engine.train.vocab import frequent_tokens

    engine = Engine.load(target_dir, dtype="float32", max_seq_len=16)
    hidden = engine.config.text.hidden_size
    records = [r for d in shards for r in read_shards(d, hidden_size=hidden)]
    vocab = None
    if recipe.draft_vocab:
        vocab = frequent_tokens(records, recipe.draft_vocab, always=engine.config.eos_token_ids,
                                vocab_size=engine.config.text.vocab_size)
    more = [r for d in added for r in read_shards(d, hidden_size=hidden)] if recipe.finetune_epochs else []
    newest = [r for d in later for r in read_shards(d, hidden_size=hidden)] if recipe.self_prompts else []
    text = engine.model.text
    # Stage 2 resumes stage 1's checkpoint with the cosine schedule re-planned over more epochs: the lr
    # climbs back to where the longer schedule stands (0.4 of the peak for 8 -> 14) and decays to 0
    # again. Why: on the shipped drafts, training accuracy was still rising when 8 epochs ended
    # (bench/results/demo_train_*.png: top-1 0.66 over the last 400 steps of 8 epochs, 0.70 of 14).
    out = {}
    for mode in modes:
        config = draft_config_for(engine.config, mode, draft_vocab_size=0 if vocab is None else len(vocab))

        def run(name: str, data, epochs: int, extra: int, lr: float, curriculum, seed: int = recipe.seed, **kw):
            """One run directory, resumed; then (extra > 0) resumed with its schedule stretched by `extra`."""
            for total in [epochs] + ([epochs + extra] if extra else []):
                result = train_draft(data, text.lm_head, text.embed_tokens, config, work / "runs" / name,
                                     epochs=total, lr=lr, warmup_steps=recipe.warmup, batch_size=recipe.batch_size,
                                     curriculum=curriculum(total), seed=seed, resume=True,
                                     progress=progress, draft_vocab=vocab, **kw)
            return result

        started = time.perf_counter()
        result = run(mode, records, recipe.epochs, recipe.extra_epochs, recipe.lr,
                     lambda total: Curriculum(recipe.text_epochs, recipe.ramp_epochs, total))
        everything = partial(Curriculum, 0, 0)  # no text-only epochs, no ramp: images in from the start
        if more:
            # Stage 3: a new run from stage 2's weights over every set.
            result = run(f"{mode}-finetune", records + more, recipe.finetune_epochs, 0, recipe.finetune_lr,
                         everything, init_from=result.checkpoint)
        if recipe.unroll_epochs:
            # Stage 4: trained as drafting runs it, each step fed the last step's predicted features.
            # Why: the drafts' top-1 on training text fell from 0.67 at step 1 to 0.53 at step 2 and
            # 0.49 at step 3 when fed their own predictions (noise training alone left that gap).
            # Like stage 2, the run is then resumed with its schedule stretched (held-out text tau
            # rose 2.85 -> 2.92 over the first epoch, and the later steps' accuracy was still rising).
            result = run(f"{mode}-unroll", records + more, recipe.unroll_epochs, recipe.unroll_extra_epochs,
                         recipe.unroll_lr, everything, init_from=result.checkpoint, unroll_steps=recipe.unroll_steps)
        if newest:
            # Stage 5: the target-written set and a replay sample of the earlier sets (which keeps
            # what they taught), trained as stage 4. Why: each new set of varied prompts had raised
            # held-out tau more than more epochs over the same ones.
            result = run(f"{mode}-self", newest, recipe.self_epochs, 0, recipe.self_lr, everything,
                         init_from=result.checkpoint, unroll_steps=recipe.unroll_steps)
            for i, weight in enumerate(recipe.ce_weights):
                # Stage 6: the same data again, one epoch a pass (each pass another seed: another
                # batch order), the soft cross-entropy weighted more than the reference's 0.1. Why:
                # held-out msd tau, images / text: stage 5 4.41 / 2.965; a pass at 0.5 4.50 / 2.976
                # (a plain second epoch at 0.1 instead: 4.42 / 2.97); then 1.0: 4.51 / 2.998; 1.0 again:
                # 4.51 / 3.006. The first pass keeps the run name it had when stage 6 was one pass.
                result = run(f"{mode}-ce" + (f"{i + 1}" if i else ""), newest, 1, 0, recipe.self_lr, everything,
                             seed=recipe.seed + 1 + i, init_from=result.checkpoint,
                             unroll_steps=recipe.unroll_steps, ce_weight=weight)
        last = result.metrics[-1] if result.metrics else {}
        print(f"{mode}: {result.step} steps in {time.perf_counter() - started:.0f} s, final loss "
              f"{last.get('loss', float('nan')):.4f}, top-1 {last.get('acc', float('nan')):.3f}")
        dst = work / "drafts" / mode
        convert_msd_draft(result.checkpoint, dst, mode=mode, dtype="float32", force=True, progress=False)
        if ship_to is not None:
            pack_draft(dst, Path(ship_to) / mode)
        out[mode] = dst
    return out


def heldout_tau(target_dir: Path, draft_dir: Path, images: Path, max_new_tokens: int) -> dict[str, float]:
    """tau of a draft at the default tree over the held-out prompts, with and without an image."""
    from msd_engine.engine import Engine
    from msd_engine.spec.tree import TreeParams
    from msd_engine.train.cli import tau_report

    engine = Engine.load(target_dir, dtype="float32", max_seq_len=1024, draft=draft_dir, tree=TreeParams(),
                         draft_dtype=DRAFT_DTYPE)
    prompts = [(p["prompt"], export_photo(p["image"], images) if p.get("image") else None)
               for p in load_prompts(HELDOUT_PROMPTS)]
    return {group: r["tau"] for group, r in tau_report(engine, prompts, max_new_tokens).items()}


def run_recipe(work: Optional[Path] = None, recipe: Recipe = Recipe(), modes: Sequence[str] = ("msd", "eagle"),
               ship_to: Optional[Path] = SHIPPED_DRAFTS, progress: bool = True) -> dict:
    work = Path(work) if work is not None else demo_home() / "recipe"
    work.mkdir(parents=True, exist_ok=True)
    (work / "recipe.json").write_text(json.dumps(asdict(recipe), indent=2) + "\n")
    target = ensure_target(demo_home() / "target", progress)
    torch.manual_seed(recipe.seed)
    # the second mix only feeds stage 3, the later sets only stage 5: not recorded without them
    earlier = training_prompt_sets(recipe)
    later = later_prompt_sets(target, work, recipe, earlier, progress) if recipe.self_prompts else {}
    shards = {name: record_answers(target, work, name, prompts, recipe, progress)
              for name, prompts in {**earlier, **later}.items() if name != "wide" or recipe.finetune_epochs}
    drafts = train_drafts(target, [shards["written"], shards["composed"]], work, recipe, modes, ship_to, progress,
                          added=[shards["wide"]] if "wide" in shards else [],
                          later=[shards[name] for name in later])
    report = {mode: heldout_tau(target, path, work / "images", recipe.eval_max_new_tokens)
              for mode, path in drafts.items()}
    (work / "heldout_tau.json").write_text(json.dumps(report, indent=2) + "\n")
    for mode, taus in report.items():
        print(f"{mode}: held-out tau " + ", ".join(f"{k} {v:.2f}" for k, v in taus.items()))
    return report
