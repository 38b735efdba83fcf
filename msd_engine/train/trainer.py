"""The draft training loop over in-memory `DraftRecord`s, checkpointing in the released format.

Each `checkpoint-STEP/` holds what `msd-engine convert msd-draft` reads (a Llama-style config.json
with num_hidden_layers 1 and a float32 model.safetensors with the released keys) plus
`training_state.pt` (optimizer, scheduler, step, epoch, RNG state) for `resume=True`.

Randomness is derived from `seed`: the samples and order of epoch e from (seed, e), the input noise
of record r at step s from (seed, s, r). A resumed run therefore replays exactly what an
uninterrupted one does, and a data-parallel run (torchrun; see `distributed.py`) sees the same
inputs as one process: every rank builds the same plan of global batches of `batch_size`, trains on
its own part of each, and DDP averages the gradients; rank 0 alone writes metrics and checkpoints.
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
from typing import Optional, Sequence

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from msd_engine.draft.config import DraftConfig
from msd_engine.train import distributed
from msd_engine.train.curriculum import Curriculum
from msd_engine.train.distributed import DistEnv
from msd_engine.train.losses import NOISE_REF_LEN, NOISE_SCALE, draft_loss
from msd_engine.train.module import DraftModule
from msd_engine.train.records import DraftRecord

STATE_FILE = "training_state.pt"
METRICS_FILE = "metrics.jsonl"
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
            "rms_norm_eps": config.rms_norm_eps, "rope_theta": config.rope_theta, "torch_dtype": "float32"}


def lr_factor(step: int, warmup_steps: int, total_steps: int, decay: str) -> float:
    """Multiplier of the peak lr for 0-based `step`: linear warmup, then `decay` to 0 at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress)) if decay == "cosine" else 1.0 - progress


def epoch_batches(records: Sequence[DraftRecord], epoch: int, curriculum: Optional[Curriculum], seed: int,
                  batch_size: int) -> list[list[int]]:
    """The batches (record indices) of 1-based `epoch`: curriculum selection, then a seeded shuffle."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    chosen = (list(range(len(records))) if curriculum is None
              else curriculum.select(epoch, [r.is_visual for r in records], g))
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
                    seed: int) -> Path:
    """Write checkpoint-STEP/ atomically (a temporary directory renamed into place)."""
    final = out_dir / f"checkpoint-{step}"
    tmp = out_dir / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(json.dumps(hf_config(module.config), indent=2) + "\n")
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in module.state_dict().items()}
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
                "epoch": epoch, "seed": seed, "torch_rng": torch.get_rng_state()}, tmp / STATE_FILE)
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


def _check_args(records, config, epochs, lr, warmup_steps, batch_size, save_every, curriculum, decay) -> None:
    if not records:
        raise ValueError("no training records")
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
    bad = [i for i, r in enumerate(records) if r.features.shape[1] != config.hidden_size]
    if bad:
        raise ValueError(f"record {bad[0]}: feature width {records[bad[0]].features.shape[1]} != "
                         f"draft hidden_size {config.hidden_size}")


def _trim_metrics(path: Path, last_step: int) -> None:
    """After a resume, drop metrics of steps past the checkpoint (they are about to be re-run)."""
    if path.is_file():
        lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= last_step]
        path.write_text("".join(ln + "\n" for ln in lines))


def train_draft(records: Sequence[DraftRecord], target_lm_head: torch.Tensor, target_embed: torch.Tensor,
                config: DraftConfig, out_dir: Path, *, epochs: int, lr: float = 5e-5, warmup_steps: int = 2000,
                batch_size: int = 1, grad_clip: float = 0.5, curriculum: Optional[Curriculum] = None,
                save_every: int = 0, seed: int = 0, resume: bool = False, decay: str = "cosine",
                init_std: float = 0.02, progress: bool = True) -> TrainResult:
    """Train a draft head on `records` (float32, on CPU; on the rank's GPU under NCCL).

    batch_size: the global batch (split evenly over the ranks when torch.distributed is initialised).
    save_every: checkpoint every that many steps (0: only at the end). resume: continue from the
    latest complete checkpoint in out_dir (starting fresh when there is none). progress: a bar with the
    loss and top-1 accuracy on rank 0 when stderr is a terminal."""
    _check_args(records, config, epochs, lr, warmup_steps, batch_size, save_every, curriculum, decay)
    env = distributed.current()
    if batch_size % env.world_size:
        raise ValueError(f"batch_size {batch_size} (the global batch) not divisible by the world size "
                         f"{env.world_size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lm_head = target_lm_head.detach().float().to(env.device)
    module = DraftModule.from_config(config, target_embed, seed=seed, std=init_std).to(env.device)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=ADAM_BETAS, weight_decay=0.0)
    plan = [(e, b) for e in range(1, epochs + 1) for b in epoch_batches(records, e, curriculum, seed, batch_size)]
    total = len(plan)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup_steps, total, decay))
    step, metrics_path = 0, out_dir / METRICS_FILE
    # rank 0 picks the checkpoint so that every rank restores the same one
    checkpoint = distributed.broadcast_object(latest_checkpoint(out_dir) if resume and env.is_main() else None)
    if checkpoint is not None:
        step = restore(checkpoint, module, optimizer, scheduler)["step"]
        if env.is_main():
            _trim_metrics(metrics_path, step)
    elif metrics_path.exists() and env.is_main():
        metrics_path.unlink()
    model = module
    if env.distributed:
        device_ids = [env.device.index] if env.device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids)
    history = []
    module.train()
    bar = tqdm(total=total, initial=step, desc="train", unit="step", leave=False,
               disable=not (progress and env.is_main() and sys.stderr.isatty()))
    with bar, metrics_path.open("a") if env.is_main() else contextlib.nullcontext() as log:
        for epoch, batch in plan[step:]:
            stats = _train_step(model, optimizer, scheduler, _local_batch(records, batch, env, seed, step), lm_head,
                                params, grad_clip, env)
            step += 1
            row = {"step": step, "epoch": epoch, **stats}
            history.append(row)
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{row['loss']:.4f}", acc=f"{row['acc']:.3f}")
            if log is not None:
                log.write(json.dumps(row) + "\n")
                log.flush()
            if save_every and step % save_every == 0 and step < total:
                checkpoint = _save(env, out_dir, module, optimizer, scheduler, step, epoch, seed)
    if checkpoint is None or checkpoint.name != f"checkpoint-{step}":
        checkpoint = _save(env, out_dir, module, optimizer, scheduler, step, plan[-1][0], seed)
    return TrainResult(step, checkpoint, history)


def _save(env: DistEnv, out_dir: Path, module, optimizer, scheduler, step: int, epoch: int, seed: int) -> Path:
    """Rank 0 writes (every rank holds the same state); the barrier keeps the others from running
    ahead of, or reading, a half-written checkpoint."""
    path = (save_checkpoint(out_dir, module, optimizer, scheduler, step, epoch, seed) if env.is_main()
            else out_dir / f"checkpoint-{step}")
    distributed.barrier()
    return path


def _noise_seed(seed: int, step: int, index: int) -> int:
    return ((seed * 1_000_003 + step) * 1_000_003 + index) % (1 << 63)


def _local_batch(records: Sequence[DraftRecord], batch: list[int], env: DistEnv, seed: int,
                 step: int) -> dict[str, Optional[torch.Tensor]]:
    """This rank's part of the global `batch`, collated on env.device, with its noisy input features.

    Each record's noise comes from its own generator, keyed by (seed, step, record index), and its
    width is scaled by the padded length of the whole global batch (as `input_noise` scales by the
    padded length of the batch it is given): a sample's input is then the same whichever rank holds
    it and however many ranks there are."""
    local = distributed.shard_indices(batch, env.rank, env.world_size)
    idle = not local
    if idle:
        # the epoch's last batch is shorter than the world: run its first record with zero weight
        # so that this rank still joins DDP's gradient all-reduce
        local = batch[:1]
    out = collate([records[i] for i in local])
    if idle:
        out["loss_mask"].zero_()
    n_global = max(records[i].token_ids.shape[0] for i in batch)
    noise = torch.zeros_like(out["features"])                                   # [B, N, H]
    for row, index in enumerate(local):
        m, h = records[index].features.shape
        u = torch.rand((m, h), generator=torch.Generator().manual_seed(_noise_seed(seed, step, index)))
        noise[row, :m] = (u - 0.5) * NOISE_SCALE * NOISE_REF_LEN / n_global
    out["noisy"] = out["features"] + noise
    # the global batch's loss weight, known to every rank without communication
    out["global_weight"] = torch.tensor(sum(float(records[i].loss_mask[1:].sum()) for i in batch))
    return {k: None if v is None else v.to(env.device) for k, v in out.items()}


def _global_loss(loss: torch.Tensor, stats: dict, batch: dict, env: DistEnv) -> tuple[torch.Tensor, dict]:
    """Rescale this rank's loss so that DDP's averaged gradient is the single-process gradient over
    the global batch, and reduce the logged statistics to their global values.

    draft_loss is a mean over this rank's weighted positions, sum_r / d_r. The single-process loss
    is sum_r' sum_r' / D (D: the global weight), and DDP averages gradients over the W ranks, so
    rank r backpropagates loss_r * d_r * W / D; the average is then exactly grad(sum_r' sum_r' / D),
    however unevenly the positions fall on the ranks. Statistics are weighted the same way."""
    d_r = max(float(batch["loss_mask"][:, 1:].sum()), 1.0)  # draft_loss's own denominator
    d_global = max(float(batch["global_weight"]), 1.0)
    keys = ("loss", "feature_loss", "ce_loss", "acc")
    sums = torch.tensor([stats[k] * d_r for k in keys] + [stats["positions"]], dtype=torch.float64,
                        device=env.device)
    sums = distributed.all_reduce_sum(sums).tolist()
    reduced = {k: v / d_global for k, v in zip(keys, sums)}
    return loss * (d_r * env.world_size / d_global), {**reduced, "positions": int(round(sums[-1]))}


def _train_step(model, optimizer, scheduler, batch, lm_head, params, grad_clip, env: DistEnv) -> dict:
    lr = optimizer.param_groups[0]["lr"]
    pred = model(batch["token_ids"], batch["noisy"], batch["image_rows"], batch["is_image"], batch["attention_mask"])
    loss, stats = draft_loss(pred, batch["features"], batch["loss_mask"], lm_head)
    if env.distributed:
        loss, stats = _global_loss(loss, stats, batch, env)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)  # DDP's gradients are already global
    optimizer.step()
    scheduler.step()
    return {**stats, "lr": lr, "grad_norm": float(grad_norm)}
