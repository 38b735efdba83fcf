"""bf16 autocast in the trainer: forced on the CPU for one step it runs, its loss is finite and close to
the float32 loss, and the master weights and AdamW state stay float32. Off by default on the CPU."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from msd_engine.draft.config import DraftConfig
from msd_engine.train.records import DraftRecord
from msd_engine.train.trainer import STATE_FILE, train_draft

CONFIG = DraftConfig(hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=4, vocab_size=64,
                     dtype="float32")


def _data():
    g = torch.Generator().manual_seed(0)
    records = []
    for n in (9, 14, 6):
        records.append(DraftRecord(torch.randint(0, 64, (n,), generator=g), torch.randn(n, 32, generator=g),
                                   (torch.rand(n, generator=g) < 0.8).float()))
    return records, torch.randn(64, 32, generator=g) * 0.5, torch.randn(64, 32, generator=g)


def _one_step(tmp_path, name, autocast):
    records, lm_head, embed = _data()
    return train_draft(records, lm_head, embed, CONFIG, tmp_path / name, epochs=1, batch_size=3, lr=1e-3,
                       warmup_steps=1, progress=False, autocast=autocast)


def test_cpu_bf16_autocast_step_is_close_to_float32(tmp_path):
    f32 = _one_step(tmp_path, "f32", autocast=False)
    bf16 = _one_step(tmp_path, "bf16", autocast=True)
    assert f32.step == bf16.step == 1
    a, b = f32.metrics[0], bf16.metrics[0]
    assert all(math.isfinite(b[k]) for k in ("loss", "feature_loss", "ce_loss", "grad_norm"))
    # bf16 rounds each operand to 2^-9 relative; averaged over the positions the loss moves ~1e-4 here,
    # so one bf16 ulp (2e-3) bounds it with room to spare
    assert b["loss"] == pytest.approx(a["loss"], rel=2e-3)
    assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-2)
    assert b["loss"] != a["loss"]  # autocast really lowered the precision of the forward
    weights = load_file(str(bf16.checkpoint / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.float32}
    state = torch.load(bf16.checkpoint / STATE_FILE, weights_only=True)["optimizer"]["state"]
    assert {t.dtype for s in state.values() for k, t in s.items() if k != "step"} == {torch.float32}


def test_autocast_is_off_by_default_on_the_cpu(tmp_path):
    default = _one_step(tmp_path, "default", autocast=None)
    f32 = _one_step(tmp_path, "f32", autocast=False)
    assert default.metrics[0]["loss"] == f32.metrics[0]["loss"]
