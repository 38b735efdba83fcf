"""Data-parallel draft training (2 gloo ranks on CPU) equals one process on the same global batch:
the same loss curve, the same final weights, files from rank 0 only, and a resumed 2-rank run
replays the uninterrupted one."""
from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from msd_engine.draft.config import DraftConfig
from msd_engine.train import distributed
from msd_engine.train.curriculum import Curriculum
from msd_engine.train.records import DraftRecord
from msd_engine.train.trainer import train_draft

CONFIG = DraftConfig(hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2, vocab_size=64,
                     dtype="float32")
WORLD = 2
# 9 records, 3 visual; epoch 1 text only (6 records: batches of 4 and 2), epoch 2 all 9 (4, 4, 1):
# the last batch leaves rank 1 idle, and random masks put uneven positions on the ranks.
TRAIN = dict(epochs=2, lr=1e-3, warmup_steps=1, batch_size=4, curriculum=Curriculum(1, 0, 2), save_every=2, seed=3)
STEPS = 5
UNROLLED = {**TRAIN, "save_every": 0, "unroll_steps": 3}


def _data() -> tuple[list[DraftRecord], torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    h, v = CONFIG.hidden_size, CONFIG.vocab_size
    records = []
    for i in range(9):
        n = int(torch.randint(5, 13, (1,), generator=g))
        mask = (torch.rand(n, generator=g) < 0.6).float()
        visual = i % 3 == 0
        is_image = (torch.arange(n) >= 1) & (torch.arange(n) < 4) if visual else None
        records.append(DraftRecord(torch.randint(0, v, (n,), generator=g), torch.randn(n, h, generator=g), mask,
                                   torch.randn(n, h, generator=g) if visual else None, is_image, visual))
    return records, torch.randn(v, h, generator=g) * 0.5, torch.randn(v, h, generator=g)  # lm_head, embed


def _worker(rank: int, port: int, root: str) -> None:
    torch.set_num_threads(1)
    env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    os.environ.update(env)
    dist_env = distributed.init_from_env("gloo")
    assert (dist_env.rank, dist_env.world_size) == (rank, WORLD)
    try:
        root = Path(root)
        records, lm_head, embed = _data()
        with pytest.raises(ValueError, match="batch_size 3 .* not divisible by the world size 2"):
            train_draft(records, lm_head, embed, CONFIG, root / "bad", **{**TRAIN, "batch_size": 3})
        # each rank gets its own out_dir here, so that "rank 1 wrote nothing" can be checked
        result = train_draft(records, lm_head, embed, CONFIG, root / f"rank{rank}", **TRAIN)
        (root / f"history{rank}.json").write_text(json.dumps(result.metrics))
        # resume (shared dir): keep checkpoint-2 only, then every rank restores it and trains on
        if rank == 0:
            shutil.copytree(root / "rank0", root / "part")
            for step in (4, STEPS):
                shutil.rmtree(root / "part" / f"checkpoint-{step}")
        distributed.barrier()
        resumed = train_draft(records, lm_head, embed, CONFIG, root / "part", resume=True, **TRAIN)
        assert [m["step"] for m in resumed.metrics] == [3, 4, 5]
        # unrolled training (a list of predictions through the DDP wrapper) reduces its extra stats too
        unrolled = train_draft(records, lm_head, embed, CONFIG, root / f"unroll{rank}", **UNROLLED)
        (root / f"unroll_history{rank}.json").write_text(json.dumps(unrolled.metrics))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    records, lm_head, embed = _data()
    single = train_draft(records, lm_head, embed, CONFIG, root / "single", **TRAIN)
    train_draft(records, lm_head, embed, CONFIG, root / "unroll_single", **UNROLLED)
    mp.spawn(_worker, args=(_free_port(), str(root)), nprocs=WORLD, join=True)
    return root, single


def test_shard_indices_partition_the_batch():
    for n in range(0, 9):
        for world in (1, 2, 3, 4):
            parts = [distributed.shard_indices(list(range(n)), r, world) for r in range(world)]
            assert sum(parts, []) == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError, match="rank 2"):
        distributed.shard_indices([0, 1], 2, 2)


def test_single_process_env_and_helpers():
    env = distributed.current()
    assert (env.rank, env.world_size, env.distributed) == (0, 1, False) and distributed.is_main()
    x = torch.tensor([1.0, 2.0])
    assert torch.equal(distributed.all_reduce_mean(x), x)
    distributed.barrier()


# Tolerance: the ranks pad their halves to their own lengths (softmax and matmuls over a different
# number of masked keys round differently) and DDP sums the gradients in another order, so float32
# rounding (~1e-7 relative per op) differs; after 5 Adam steps it stays far below 1e-5 relative.
def _assert_same_run(root, got: str, ref: str, history: str, keys: tuple) -> None:
    """The 2-rank run `got` equals the single-process run `ref`: logged values and final weights."""
    ref_rows, got_rows = _rows(root / ref / "metrics.jsonl"), _rows(root / got / "metrics.jsonl")
    assert [r["step"] for r in got_rows] == list(range(1, STEPS + 1)) == [r["step"] for r in ref_rows]
    for a, b in zip(got_rows, ref_rows):
        assert a.keys() == b.keys() and set(keys) <= a.keys()
        assert a["epoch"] == b["epoch"] and a["positions"] == b["positions"] and a["lr"] == b["lr"]
        for key in keys:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)
    # rank 1 logged the same (global) numbers it computed
    assert (json.loads((root / f"{history}1.json").read_text())
            == json.loads((root / f"{history}0.json").read_text()))
    a = load_file(str(root / got / f"checkpoint-{STEPS}" / "model.safetensors"))
    b = load_file(str(root / ref / f"checkpoint-{STEPS}" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


def test_two_ranks_equal_one_process(runs):
    root, single = runs
    assert single.checkpoint == root / "single" / f"checkpoint-{STEPS}"
    _assert_same_run(root, "rank0", "single", "history", ("loss", "feature_loss", "ce_loss", "acc", "grad_norm"))


def test_two_ranks_equal_one_process_unrolled(runs):
    root, _ = runs
    _assert_same_run(root, "unroll0", "unroll_single", "unroll_history",
                     ("loss", "feature_loss", "ce_loss", "acc", "acc_2", "acc_3", "grad_norm"))


def test_only_rank0_writes(runs):
    root, _ = runs
    assert sorted(p.name for p in (root / "rank0").iterdir()) == ["checkpoint-2", "checkpoint-4",
                                                                   f"checkpoint-{STEPS}", "metrics.jsonl"]
    assert list((root / "rank1").iterdir()) == []


def test_resumed_two_ranks_replay_the_uninterrupted_run(runs):
    root, _ = runs
    assert [r["step"] for r in _rows(root / "part" / "metrics.jsonl")] == list(range(1, STEPS + 1))
    for a, b in zip(_rows(root / "part" / "metrics.jsonl"), _rows(root / "rank0" / "metrics.jsonl")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    a = load_file(str(root / "part" / f"checkpoint-{STEPS}" / "model.safetensors"))
    b = load_file(str(root / "rank0" / f"checkpoint-{STEPS}" / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-7)


def test_uneven_batch_and_missing_process_group_are_refused(runs, monkeypatch):
    root, _ = runs
    assert not (root / "bad").exists()  # the workers' batch_size 3 over 2 ranks raised before writing
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="not initialised"):
        distributed.current()
