"""The draft training loop over a `RecordSource` (records in memory, or built by the target on the
fly; see `source.py`), checkpointing in the released format.

Each `checkpoint-STEP/` holds what `msd-engine convert msd-draft` reads (a Llama-style config.json
with num_hidden_layers 1 and a float32 model.safetensors with the released keys) plus
`training_state.pt` (optimizer, scheduler, step, epoch, RNG state) for `resume=True`.

Randomness is derived from `seed`: the samples and order of epoch e from (seed, e), the input noise
of record r at step s from (seed, s, r). A resumed run therefore replays exactly what an
uninterrupted one does, and a data-parallel run (torchrun; see `distributed.py`) sees the same
inputs as one process: every rank builds the same plan of global batches of `batch_size`, trains on
its own part of each (building only those records), and DDP averages the gradients; rank 0 alone
writes metrics and checkpoints.

Precision: master weights and AdamW state are float32. On CUDA the forward and the loss run under
bf16 autocast by default (`autocast`); on the CPU they run in float32 unless autocast is forced.
A reduced draft vocabulary (`draft_vocab`) restricts the cross-entropy to `lm_head[draft_vocab]`
(see `losses.py`) and is saved in the checkpoint as the `draft_vocab` tensor.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from msd_engine.draft.config import DraftConfig
from msd_engine.draft.weights import DRAFT_VOCAB_KEY
from msd_engine.train import distributed
from msd_engine.train.curriculum import Curriculum
from msd_engine.train.distributed import DistEnv
from msd_engine.train.losses import (CE_WEIGHT, NOISE_REF_LEN, NOISE_SCALE, check_ce_weight, unrolled_loss,
                                     unrolled_mask)
from msd_engine.train.module import DraftModule
from msd_engine.train.records import DraftRecord
from msd_engine.train.source import RecordSource, as_source
from msd_engine.train.vocab import check_draft_vocab
from msd_engine.weights import hash_file

STATE_FILE = "training_state.pt"
METRICS_FILE = "metrics.jsonl"
INIT_FILE = "init_from.json"   # which checkpoint (and its weights' sha256) a fine-tune run started from
DECAYS = ("cosine", "linear", "constant")
ADAM_BETAS = (0.9, 0.95)


@dataclass
class TrainResult:
    step: int
    checkpoint: Path
    metrics: list = field(default_factory=list)  # one dict per step run by this call


def hf_config(config: DraftConfig) -> dict:
    """The Llama-style config.json of a released MSD draft."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
            "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
            "head_dim": config.head_dim, "num_hidden_layers": 1, "vocab_size": config.vocab_size,
            "rms_norm_eps": config.rms_norm_eps, "rope_theta": config.rope_theta, "torch_dtype": "float32",
            "draft_vocab_size": config.draft_vocab_size}


def lr_factor(step: int, warmup_steps: int, total_steps: int, decay: str) -> float:
    """Multiplier of the peak lr for 0-based `step`: linear warmup, then `decay` to 0 at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress)) if decay == "cosine" else 1.0 - progress


def epoch_batches(is_visual: Sequence[bool], epoch: int, curriculum: Optional[Curriculum], seed: int,
                  batch_size: int) -> list[list[int]]:
    """The batches (record indices) of 1-based `epoch`: curriculum selection, then a seeded shuffle."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    chosen = list(range(len(is_visual))) if curriculum is None else curriculum.select(epoch, list(is_visual), g)
    order = [chosen[i] for i in torch.randperm(len(chosen), generator=g).tolist()]
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def collate(records: Sequence[DraftRecord]) -> dict[str, Optional[torch.Tensor]]:
    """Right-pad a batch: padded positions have attention_mask 0 and loss_mask 0."""
    b, n = len(records), max(r.token_ids.shape[0] for r in records)
    h = records[0].features.shape[1]
    out = {"token_ids": torch.zeros(b, n, dtype=torch.long), "features": torch.zeros(b, n, h),
           "loss_mask": torch.zeros(b, n), "attention_mask": torch.zeros(b, n, dtype=torch.bool),
           "image_rows": torch.zeros(b, n, h), "is_image": torch.zeros(b, n, dtype=torch.bool)}
    for i, r in enumerate(records):
        m = r.token_ids.shape[0]
        out["token_ids"][i, :m] = r.token_ids
        out["features"][i, :m] = r.features
        out["loss_mask"][i, :m] = r.loss_mask
        out["attention_mask"][i, :m] = True
        if r.is_image is not None:
            out["image_rows"][i, :m] = r.image_rows
            out["is_image"][i, :m] = r.is_image
    if not out["is_image"].any():
        out["image_rows"] = out["is_image"] = None
    return out


def save_checkpoint(out_dir: Path, module: DraftModule, optimizer, scheduler, step: int, epoch: int,
                    seed: int, objective: Optional[dict] = None) -> Path:
    """Write checkpoint-STEP/ atomically (a temporary directory renamed into place). objective: the
    run's loss settings (`unroll_steps`, `ce_weight`), recorded so that a resume cannot change them."""
    final = out_dir / f"checkpoint-{step}"
    tmp = out_dir / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(json.dumps(hf_config(module.config), indent=2) + "\n")
    # floating tensors in float32; the integer draft vocabulary keeps its int64 ids
    tensors = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous().clone()
               for k, v in module.state_dict().items()}
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
                "epoch": epoch, "seed": seed, **(objective or {}), "torch_rng": torch.get_rng_state()},
               tmp / STATE_FILE)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def latest_checkpoint(out_dir: Path) -> Optional[Path]:
    found = [(int(p.name.split("-", 1)[1]), p) for p in Path(out_dir).glob("checkpoint-*")
             if p.name.split("-", 1)[1].isdigit() and (p / STATE_FILE).is_file()]
    return max(found)[1] if found else None


def restore(checkpoint: Path, module: DraftModule, optimizer, scheduler) -> dict:
    """Load weights, optimizer and scheduler from `checkpoint`; returns the saved training state."""
    module.load_weights(load_file(str(checkpoint / "model.safetensors")))
    state = torch.load(checkpoint / STATE_FILE, weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return state


def _check_args(source: RecordSource, config, epochs, lr, warmup_steps, batch_size, save_every, curriculum,
                decay) -> None:
    for name, value, low in (("epochs", epochs, 1), ("batch_size", batch_size, 1), ("warmup_steps", warmup_steps, 0),
                             ("save_every", save_every, 0)):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if decay not in DECAYS:
        raise ValueError(f"decay {decay!r} not one of {DECAYS}")
    if curriculum is not None and curriculum.total_epochs != epochs:
        raise ValueError(f"epochs {epochs} != curriculum.total_epochs {curriculum.total_epochs}")
    if source.hidden_size != config.hidden_size:
        raise ValueError(f"records of feature width {source.hidden_size} != draft hidden_size {config.hidden_size}")


def _check_draft_vocab(draft_vocab: Optional[torch.Tensor], config: DraftConfig) -> None:
    if (draft_vocab is not None) != bool(config.draft_vocab_size):
        raise ValueError(f"draft_vocab {'given' if draft_vocab is not None else 'missing'} but the draft config's "
                         f"draft_vocab_size is {config.draft_vocab_size}")
    if draft_vocab is not None:
        check_draft_vocab(draft_vocab, config.draft_vocab_size, config.vocab_size, "train_draft")


def _trim_metrics(path: Path, last_step: int) -> None:
    """After a resume, drop metrics of steps past the checkpoint (they are about to be re-run)."""
    if path.is_file():
        lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= last_step]
        path.write_text("".join(ln + "\n" for ln in lines))


def train_draft(records: Union[RecordSource, Sequence[DraftRecord]], target_lm_head: torch.Tensor,
                target_embed: torch.Tensor, config: DraftConfig, out_dir: Path, *, epochs: int, lr: float = 5e-5,
                warmup_steps: int = 2000, batch_size: int = 1, grad_clip: float = 0.5,
                curriculum: Optional[Curriculum] = None, save_every: int = 0, seed: int = 0, resume: bool = False,
                decay: str = "cosine", init_std: float = 0.02, progress: bool = True,
                draft_vocab: Optional[torch.Tensor] = None, autocast: Optional[bool] = None,
                init_from: Optional[Path] = None, unroll_steps: int = 1, ce_weight: float = CE_WEIGHT) -> TrainResult:
    """Train a draft head on `records` (a RecordSource, or DraftRecords in memory) on the rank's device.

    batch_size: the global batch (split evenly over the ranks when torch.distributed is initialised).
    save_every: checkpoint every that many steps (0: only at the end). resume: continue from the
    latest complete checkpoint in out_dir (starting fresh when there is none). progress: a bar with the
    loss and top-1 accuracy on rank 0 when stderr is a terminal. draft_vocab: the reduced vocabulary,
    [config.draft_vocab_size] sorted int64 ids (given exactly when config.draft_vocab_size > 0).
    autocast: run forward and loss under bf16 autocast (None: on CUDA yes, on the CPU no).
    init_from: a checkpoint directory whose weights a fresh run starts from, with a new optimizer and
    schedule (fine-tuning a trained draft on more data); its config must be this one's and its draft
    vocabulary `draft_vocab` (the mode, msd or eagle, is not recorded in a checkpoint: not checked).
    out_dir records it (INIT_FILE); a resumed run continues from its own checkpoint and must have
    started from the same weights, so a changed init_from is an error rather than silently ignored.
    unroll_steps: train the draft as drafting runs it, that many steps deep, each later step fed the
    previous step's predicted features (`DraftModule.forward_unrolled`, `unrolled_loss`); 1: plain.
    ce_weight: the soft cross-entropy's weight beside the feature regression (`draft_loss`)."""
    source = as_source(records)
    _check_args(source, config, epochs, lr, warmup_steps, batch_size, save_every, curriculum, decay)
    _check_draft_vocab(draft_vocab, config)
    if isinstance(unroll_steps, bool) or not isinstance(unroll_steps, int) or unroll_steps < 1:
        raise ValueError(f"unroll_steps must be an int >= 1, got {unroll_steps!r}")
    objective = {"unroll_steps": unroll_steps, "ce_weight": check_ce_weight(ce_weight)}
    env = distributed.current()
    if batch_size % env.world_size:
        raise ValueError(f"batch_size {batch_size} (the global batch) not divisible by the world size "
                         f"{env.world_size}")
    use_autocast = _autocast_enabled(autocast, env.device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    module = DraftModule.from_config(config, target_embed, seed=seed, std=init_std,
                                     draft_vocab=draft_vocab).to(env.device)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=ADAM_BETAS, weight_decay=0.0)
    plan = [(e, b) for e in range(1, epochs + 1)
            for b in epoch_batches(source.is_visual, e, curriculum, seed, batch_size)]
    total = len(plan)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup_steps, total, decay))
    metrics_path = out_dir / METRICS_FILE
    start = None if init_from is None else _read_init(module, Path(init_from))  # checked before out_dir changes
    step, checkpoint = _start(out_dir, resume, module, optimizer, scheduler, draft_vocab, objective, env)
    if start is not None:
        _apply_init(out_dir, step, module, Path(init_from), *start, env)
    model = module
    if env.distributed:
        device_ids = [env.device.index] if env.device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids)
    ctx = _Step(model, optimizer, scheduler, params, target_lm_head.detach().float().to(env.device),
                None if draft_vocab is None else draft_vocab.to(env.device), grad_clip, use_autocast, env,
                unroll_steps, float(ce_weight))
    history = []
    module.train()
    bar = tqdm(total=total, initial=step, desc="train", unit="step", leave=False,
               disable=not (progress and env.is_main() and sys.stderr.isatty()))
    with bar, metrics_path.open("a") if env.is_main() else contextlib.nullcontext() as log:
        for epoch, batch in plan[step:]:
            stats = _train_step(ctx, _local_batch(source, batch, env, seed, step))
            step += 1
            row = {"step": step, "epoch": epoch, **stats}
            history.append(row)
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{row['loss']:.4f}", acc=f"{row['acc']:.3f}")
            if log is not None:
                log.write(json.dumps(row) + "\n")
                log.flush()
            if save_every and step % save_every == 0 and step < total:
                checkpoint = _save(env, out_dir, module, optimizer, scheduler, step, epoch, seed, objective)
    if checkpoint is None or checkpoint.name != f"checkpoint-{step}":
        checkpoint = _save(env, out_dir, module, optimizer, scheduler, step, plan[-1][0], seed, objective)
    return TrainResult(step, checkpoint, history)


def _start(out_dir: Path, resume: bool, module: DraftModule, optimizer, scheduler,
           draft_vocab: Optional[torch.Tensor], objective: dict, env: DistEnv) -> tuple[int, Optional[Path]]:
    """(first step, the checkpoint restored or None): resume from the latest checkpoint, or start
    afresh; the metrics of steps about to be (re-)run are dropped."""
    metrics_path = out_dir / METRICS_FILE
    # rank 0 picks the checkpoint so that every rank restores the same one
    checkpoint = distributed.broadcast_object(latest_checkpoint(out_dir) if resume and env.is_main() else None)
    if checkpoint is None:
        if metrics_path.exists() and env.is_main():
            metrics_path.unlink()
        return 0, None
    state = restore(checkpoint, module, optimizer, scheduler)
    step = state["step"]
    # one run, one objective (checkpoints written before a setting existed do not record it)
    for name, value in objective.items():
        if state.get(name, value) != value:
            raise ValueError(f"{checkpoint} was trained with {name} {state[name]}, this run has {value}; "
                             "resume with the same value or give a new out_dir")
    # The saved optimizer holds the lr its own plan gave the next step; a run resumed with more
    # epochs (a stretched schedule) must take its lr from this run's schedule instead.
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(step)
    if draft_vocab is not None:
        _check_same_vocab(module, draft_vocab, checkpoint)
    if env.is_main():
        _trim_metrics(metrics_path, step)
    return step, checkpoint


def _check_same_vocab(module: DraftModule, vocab: torch.Tensor, source) -> None:
    """The checkpoint `source`'s draft vocabulary `vocab` must be the run's (`module`'s)."""
    if not torch.equal(module.state_dict()[DRAFT_VOCAB_KEY].cpu(), vocab.cpu()):
        raise ValueError(f"{source} was trained with another draft vocabulary than the one given")


def _checkpoint_files(checkpoint: Path) -> tuple[Path, Path]:
    config_path, weights_path = Path(checkpoint) / "config.json", Path(checkpoint) / "model.safetensors"
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"init_from {checkpoint}: no {path.name} (a training checkpoint-STEP directory "
                                    "is expected)")
    return config_path, weights_path


def checkpoint_draft_vocab(checkpoint: Path) -> Optional[torch.Tensor]:
    """The reduced draft vocabulary a training checkpoint was trained with (None: the whole vocabulary)."""
    weights = load_file(str(_checkpoint_files(checkpoint)[1]))
    return weights.get(DRAFT_VOCAB_KEY)


def _read_init(module: DraftModule, checkpoint: Path) -> tuple[dict[str, torch.Tensor], str]:
    """A checkpoint's weights for a fresh module (same config.json, same draft vocabulary), and the
    sha256 of its weights file."""
    config_path, weights_path = _checkpoint_files(checkpoint)
    saved, wanted = json.loads(config_path.read_text()), hf_config(module.config)
    differ = sorted(k for k in wanted.keys() | saved.keys() if saved.get(k) != wanted.get(k))
    if differ:
        raise ValueError(f"init_from {checkpoint}: config.json differs from this run's draft in "
                         + ", ".join(f"{k} (checkpoint {saved.get(k)!r}, this run {wanted.get(k)!r})"
                                     for k in differ))
    weights = load_file(str(weights_path))
    if module.config.draft_vocab_size:
        _check_same_vocab(module, weights.get(DRAFT_VOCAB_KEY, torch.empty(0)), f"init_from {checkpoint}")
    return weights, hash_file(weights_path).hexdigest()


def _apply_init(out_dir: Path, step: int, module: DraftModule, checkpoint: Path, weights: dict[str, torch.Tensor],
                digest: str, env: DistEnv) -> None:
    """A fresh run loads the weights and records where they came from; a resumed one checks that it
    started from these same weights (it goes on from its own checkpoint)."""
    record = out_dir / INIT_FILE
    if step == 0:
        module.load_weights(weights)
        if env.is_main():
            record.write_text(json.dumps({"checkpoint": str(checkpoint), "sha256": digest}, indent=1) + "\n")
        return
    started = json.loads(record.read_text()) if record.is_file() else None
    if started is None or started.get("sha256") != digest:
        origin = "no init_from" if started is None else f"{started.get('checkpoint')} (other weights)"
        raise ValueError(f"init_from {checkpoint}: the run in {out_dir} being resumed started from {origin}; "
                         "give a new out_dir to fine-tune from these weights")


def _autocast_enabled(autocast: Optional[bool], device: torch.device) -> bool:
    enabled = device.type == "cuda" if autocast is None else bool(autocast)
    # torch would only warn and run in float32: say so instead of silently changing the precision
    if enabled and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"bf16 autocast requested but {torch.cuda.get_device_name(device)} has no bf16 support; "
                         "pass autocast=False (--no-autocast)")
    return enabled


@dataclass
class _Step:
    """What every training step uses besides its batch."""
    model: torch.nn.Module                  # the DraftModule, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    params: list                            # the trainable parameters (gradient clipping)
    lm_head: torch.Tensor                   # [V, H] float32 on the device, frozen
    draft_vocab: Optional[torch.Tensor]     # [K] int64 on the device, or None (the whole vocabulary)
    grad_clip: float
    autocast: bool                          # bf16 autocast of forward and loss
    env: DistEnv
    unroll_steps: int = 1                   # draft steps per sample (training-time test); 1: plain
    ce_weight: float = CE_WEIGHT            # the soft cross-entropy's weight in the loss


def _save(env: DistEnv, out_dir: Path, module, optimizer, scheduler, step: int, epoch: int, seed: int,
          objective: dict) -> Path:
    """Rank 0 writes (every rank holds the same state); the barrier keeps the others from running
    ahead of, or reading, a half-written checkpoint."""
    path = (save_checkpoint(out_dir, module, optimizer, scheduler, step, epoch, seed, objective) if env.is_main()
            else out_dir / f"checkpoint-{step}")
    distributed.barrier()
    return path


def _noise_seed(seed: int, step: int, index: int) -> int:
    return ((seed * 1_000_003 + step) * 1_000_003 + index) % (1 << 63)


def _local_batch(source: RecordSource, batch: list[int], env: DistEnv, seed: int,
                 step: int) -> dict[str, Optional[torch.Tensor]]:
    """This rank's part of the global `batch`, collated on env.device, with its noisy input features.

    Only this rank's records are read or built. Each record's noise comes from its own generator,
    keyed by (seed, step, record index), and its width is scaled by the padded length of the whole
    global batch (known from `source.lengths`, as `input_noise` scales by the padded length of the
    batch it is given): a sample's input is then the same whichever rank holds it and however many
    ranks there are."""
    local = distributed.shard_indices(batch, env.rank, env.world_size)
    records = [source[i] for i in local]
    if not records:
        # the epoch's last batch is shorter than the world: a zero-weight stand-in keeps this rank in
        # DDP's gradient all-reduce without reading (or building) another rank's record
        records = [_idle_record(source.hidden_size)]
    out = collate(records)
    n_global = max(source.lengths[i] for i in batch)
    noise = torch.zeros_like(out["features"])                                   # [B, N, H]
    for row, index in enumerate(local):
        m, h = records[row].features.shape
        u = torch.rand((m, h), generator=torch.Generator().manual_seed(_noise_seed(seed, step, index)))
        noise[row, :m] = (u - 0.5) * NOISE_SCALE * NOISE_REF_LEN / n_global
    out["noisy"] = out["features"] + noise
    return {k: None if v is None else v.to(env.device) for k, v in out.items()}


def _idle_record(hidden_size: int) -> DraftRecord:
    return DraftRecord(torch.zeros(2, dtype=torch.long), torch.zeros(2, hidden_size), torch.zeros(2))


def _global_loss(loss: torch.Tensor, stats: dict, batch: dict, env: DistEnv) -> tuple[torch.Tensor, dict]:
    """Rescale this rank's loss so that DDP's averaged gradient is the single-process gradient over
    the global batch, and reduce the logged statistics to their global values.

    draft_loss is a mean over this rank's weighted positions, sum_r / d_r. The single-process loss
    is sum_r' sum_r' / D (D: the global weight, the sum of the d_r, reduced here with the statistics
    so that no rank needs another rank's records), and DDP averages gradients over the W ranks, so
    rank r backpropagates loss_r * d_r * W / D; the average is then exactly grad(sum_r' sum_r' / D),
    however unevenly the positions fall on the ranks. Statistics are weighted the same way."""
    weight = float(batch["loss_mask"][:, 1:].sum())  # this rank's weight (0 on an idle rank)
    d_r = max(weight, 1.0)                            # draft_loss's own denominator
    keys = tuple(k for k in stats if k != "positions")  # the weighted means (loss, accuracies, ...)
    sums = torch.tensor([stats[k] * d_r for k in keys] + [stats["positions"], weight], dtype=torch.float64,
                        device=env.device)
    sums = distributed.all_reduce_sum(sums).tolist()
    d_global = max(sums[-1], 1.0)
    reduced = {k: v / d_global for k, v in zip(keys, sums)}
    return loss * (d_r * env.world_size / d_global), {**reduced, "positions": int(round(sums[-2]))}


def _train_step(ctx: _Step, batch: dict) -> dict:
    lr = ctx.optimizer.param_groups[0]["lr"]
    # master weights stay float32; autocast only lowers the precision of the forward's matmuls
    with torch.autocast(ctx.env.device.type, dtype=torch.bfloat16, enabled=ctx.autocast):
        # one draft step is the plain objective; with more, the first positions (no drafter state
        # reaches them at the later steps) leave every step, and the weight `_global_loss` divides by
        batch = {**batch, "loss_mask": unrolled_mask(batch["loss_mask"], ctx.unroll_steps)}
        preds = ctx.model(batch["token_ids"], batch["noisy"], batch["image_rows"], batch["is_image"],
                          batch["attention_mask"], steps=ctx.unroll_steps)
        loss, stats = unrolled_loss(preds, batch["features"], batch["loss_mask"], ctx.lm_head, ctx.draft_vocab,
                                    ctx.ce_weight)
    if ctx.env.distributed:
        loss, stats = _global_loss(loss, stats, batch, ctx.env)
    ctx.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(ctx.params, ctx.grad_clip)  # DDP's gradients are already global
    ctx.optimizer.step()
    ctx.scheduler.step()
    return {**stats, "lr": lr, "grad_norm": float(grad_norm)}
