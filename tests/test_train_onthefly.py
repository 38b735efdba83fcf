"""Training on the fly from conversations (`ConversationSource`): the plan is known without running the
target, skips are counted, the loss curve equals training on shards of the same conversations, a
rank builds only its own records (two gloo ranks equal one process), and
`msd-engine train --data CONVERSATIONS.json` runs end to end."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from msd_engine import Engine
from msd_engine.cli import main
from msd_engine.draft.init import draft_config_for
from msd_engine.train import data as train_data
from msd_engine.train import distributed
from msd_engine.train.curriculum import Curriculum
from msd_engine.train.data import build_shards, conversation_ids, read_conversations, read_shards
from msd_engine.train.distributed import DistEnv
from msd_engine.train.source import ConversationSource, RecordList
from msd_engine.train.trainer import _local_batch, train_draft
from msd_engine.train.vocab import count_targets
from tests.test_train_data import make_dataset

MAX_LEN = 200


@pytest.fixture(scope="module")
def engine(tiny_llava_dir):
    return Engine.load(tiny_llava_dir, dtype="float32", max_seq_len=256)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("conversations")
    return make_dataset(root), root / "img"


@pytest.fixture(scope="module")
def conversations(dataset):
    return read_conversations(*dataset)[0]  # t1, v1, long (too long for MAX_LEN), t2


def test_source_knows_the_plan_without_running_the_target(engine, conversations, monkeypatch):
    def no_target(*args, **kwargs):
        raise AssertionError("the target ran while the source was built")

    monkeypatch.setattr(train_data, "record_from_target", no_target)
    source = ConversationSource(engine, conversations, MAX_LEN)
    assert len(source) == 3 and [c.id for c in source.conversations] == ["t1", "v1", "t2"]
    assert source.skips.too_long == 1 and source.skips.total == 1
    assert source.is_visual == [False, True, False]
    kept = [c for c in conversations if c.id != "long"]
    assert source.lengths == [len(conversation_ids(engine, c.turns, 1 if c.image else 0)[0]) for c in kept]
    assert source.hidden_size == engine.config.text.hidden_size
    with pytest.raises(ValueError, match="no usable conversations"):
        ConversationSource(engine, [conversations[2]], MAX_LEN)


def test_records_and_token_views_match_the_stored_ones(engine, conversations, tmp_path):
    build_shards(engine, conversations, tmp_path, max_len=MAX_LEN, records_per_shard=2)
    stored = read_shards(tmp_path)
    source = ConversationSource(engine, conversations, MAX_LEN)
    views = list(source.token_records())
    for i, ref in enumerate(stored):
        rec = source[i]
        for key in ("token_ids", "features", "loss_mask", "image_rows", "is_image"):
            a, b = getattr(rec, key), getattr(ref, key)
            assert (a is None and b is None) or torch.equal(a, b), key
        # the token views lack only the last position (the target's pick after the final </s>)
        assert torch.equal(views[i].token_ids, ref.token_ids[:-1])
        assert torch.equal(views[i].loss_mask, ref.loss_mask[:-1])
    vocab = engine.config.text.vocab_size
    diff = count_targets(stored, vocab) - count_targets(views, vocab)
    assert int(diff.sum()) == len(stored) and int(diff.min()) >= 0


def test_on_the_fly_loss_curve_equals_training_on_shards(engine, conversations, tmp_path):
    build_shards(engine, conversations, tmp_path / "shards", max_len=MAX_LEN, records_per_shard=2)
    config = draft_config_for(engine.config, "msd")
    text = engine.model.text
    kw = dict(epochs=4, lr=1e-3, warmup_steps=2, batch_size=2, curriculum=Curriculum(1, 2, 4), seed=7,
              progress=False)
    stored = train_draft(read_shards(tmp_path / "shards"), text.lm_head, text.embed_tokens, config, tmp_path / "a",
                         **kw)
    fly = train_draft(ConversationSource(engine, conversations, MAX_LEN), text.lm_head, text.embed_tokens, config,
                      tmp_path / "b", **kw)
    assert len(fly.metrics) == len(stored.metrics) == stored.step
    assert {m["epoch"] for m in stored.metrics} == {1, 2, 3, 4}
    for a, b in zip(fly.metrics, stored.metrics):
        assert (a["step"], a["epoch"], a["positions"]) == (b["step"], b["epoch"], b["positions"])
        for key in ("loss", "feature_loss", "ce_loss", "acc", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)
    assert stored.metrics[-1]["loss"] < stored.metrics[0]["loss"]


class Counting(RecordList):
    def __init__(self, records):
        super().__init__(records)
        self.asked = []

    def __getitem__(self, index):
        self.asked.append(index)
        return super().__getitem__(index)


def test_a_rank_builds_only_its_own_records(engine, conversations):
    records = [train_data.build_record(engine, c, MAX_LEN) for c in conversations if c.id != "long"]
    source = Counting(records)
    batch = _local_batch(source, [2, 0, 1], DistEnv(rank=1, world_size=2), seed=0, step=0)
    assert source.asked == [1]  # rank 1's part of [2, 0, 1] is [1]
    assert batch["features"].shape[0] == 1
    # the noise width uses the global batch's padded length, known without reading the other records
    width = (batch["noisy"] - batch["features"]).abs().max()
    assert width <= 0.1 * 512 / max(source.lengths) and width > 0.09 * 512 / max(source.lengths)
    source.asked.clear()
    idle = _local_batch(source, [2], DistEnv(rank=1, world_size=2), seed=0, step=0)
    assert source.asked == [] and float(idle["loss_mask"].sum()) == 0.0  # a zero-weight stand-in


def test_cli_trains_on_the_fly_with_a_draft_vocab(tiny_llava_dir, dataset, tmp_path, capsys):
    data, images = dataset
    run = tmp_path / "run"
    assert main(["train", "--model", str(tiny_llava_dir), "--data", str(data), "--images", str(images),
                 "--max-len", str(MAX_LEN), "--out", str(run), "--epochs", "2", "--lr", "1e-3", "--warmup", "1",
                 "--draft-vocab", "50"]) == 0
    out = capsys.readouterr().out
    # the reading skips (4, as train-data counts them) and the too-long one found by tokenising
    assert "3 conversations on the fly (skipped: malformed 1, no_assistant_turn 1, missing_image 1, " \
           "unreadable_image 1, too_long 1, total 5)" in out
    ckpt = run / out.split("final checkpoint: ")[1].split(" ")[0].split("/")[-1]
    assert json.loads((ckpt / "config.json").read_text())["draft_vocab_size"] == 50
    vocab = load_file(str(ckpt / "model.safetensors"))["draft_vocab"]
    assert vocab.dtype == torch.int64 and vocab.shape == (50,) and 2 in vocab.tolist()  # EOS always in
    assert main(["convert", "msd-draft", str(ckpt), str(tmp_path / "draft"), "--dtype", "float32"]) == 0
    assert json.loads((tmp_path / "draft" / "config.json").read_text())["draft_vocab_size"] == 50
    capsys.readouterr()
    # conversation-only options with a shard directory, and a path that does not exist
    assert main(["train", "--model", str(tiny_llava_dir), "--data", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--max-len", "100"]) == 2
    assert main(["train", "--model", str(tiny_llava_dir), "--data", str(tmp_path / "nope.json"),
                 "--out", str(tmp_path / "o")]) == 2
    assert main(["train", "--model", str(tiny_llava_dir), "--data", str(data), "--out", str(tmp_path / "o"),
                 "--draft-vocab", "-1"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and "--max-len apply to a conversations JSON" in err[0]
    assert "not found" in err[1] and "--draft-vocab must be >= 0" in err[2]


class LoggedSource(ConversationSource):
    """Remembers which records it built."""

    def __init__(self, *args):
        super().__init__(*args)
        self.built = []

    def __getitem__(self, index):
        self.built.append(index)
        return super().__getitem__(index)


DDP_TRAIN = dict(epochs=3, lr=1e-3, warmup_steps=1, batch_size=2, seed=5, progress=False)


def _ddp_worker(rank: int, port: int, model_dir: str, data: str, images: str, root: str) -> None:
    torch.set_num_threads(1)
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})
    distributed.init_from_env("gloo")
    try:
        engine = Engine.load(model_dir, dtype="float32", max_seq_len=256)
        source = LoggedSource(engine, read_conversations(data, images)[0], MAX_LEN)
        result = train_draft(source, engine.model.text.lm_head, engine.model.text.embed_tokens,
                             draft_config_for(engine.config, "msd"), Path(root) / "ddp", **DDP_TRAIN)
        (Path(root) / f"rank{rank}.json").write_text(json.dumps({"built": source.built, "metrics": result.metrics}))
    finally:
        dist.destroy_process_group()


def test_two_ranks_on_the_fly_equal_one_process_and_split_the_work(tiny_llava_dir, engine, dataset, conversations,
                                                                 tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, str(tiny_llava_dir), str(dataset[0]), str(dataset[1]), str(tmp_path)),
             nprocs=2, join=True)
    single = train_draft(ConversationSource(engine, conversations, MAX_LEN), engine.model.text.lm_head,
                         engine.model.text.embed_tokens, draft_config_for(engine.config, "msd"), tmp_path / "one",
                         **DDP_TRAIN)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["metrics"] == ranks[1]["metrics"]  # every rank logs the global numbers
    for a, b in zip(ranks[0]["metrics"], single.metrics, strict=True):
        assert a["positions"] == b["positions"]
        for key in ("loss", "feature_loss", "ce_loss", "acc", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)
    # 3 epochs of 3 records in batches of 2 (2 + 1): each record built once per epoch, by one rank only
    assert sorted(ranks[0]["built"] + ranks[1]["built"]) == sorted([0, 1, 2] * 3)
    assert len(ranks[1]["built"]) == 3  # rank 1 holds one record of each 2-batch, none of the 1-batches
